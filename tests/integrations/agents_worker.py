"""One Agents SDK run in a process of its own, for ``test_openai_agents.py``: a worker
restarted with another hash seed (``PYTHONHASHSEED``) must derive the same request ids.

The scripted model calls every tool below once, with set-shaped arguments (top level,
and inside a pydantic model, a dataclass and a dict), listing the elements in the order
``ORDER`` gives (``forward`` or ``reverse``). Each tool writes one row per run to the
effect ledger. Environment: ``GUARD_DB`` (the guard's SQLite file), ``LEDGER_DB`` (the
ledger, ``tests/conftest.py``'s table), ``ORDER``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from agents import Agent, RunConfig, Runner, function_tool
from agents.items import ModelResponse
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)
from pydantic import BaseModel

from safeagent import AsyncGuard
from safeagent.integrations.openai_agents import guard_tool

RECIPIENTS = [f"{name}@example.com" for name in ("ann", "bob", "cy", "di", "ed", "flo", "gus")]


def effect(key: str) -> None:
    conn = sqlite3.connect(os.environ["LEDGER_DB"], timeout=30, isolation_level=None)
    try:
        conn.execute("INSERT INTO effects (key, detail) VALUES (?, ?)", (key, str(os.getpid())))
    finally:
        conn.close()


class Mailing(BaseModel):
    subject: str
    recipients: frozenset[str]


@dataclasses.dataclass
class Batch:
    label: str
    recipients: set[str]


@function_tool
def send_invoice(recipients: set[str], amount_cents: int) -> str:
    """Send an invoice."""
    effect("send_invoice")
    return "sent"


@function_tool
def send_reminder(recipients: frozenset[str]) -> str:
    """Send a reminder."""
    effect("send_reminder")
    return "sent"


@function_tool
def send_mailing(mailing: Mailing) -> str:
    """Send a mailing."""
    effect("send_mailing")
    return "sent"


@function_tool
def send_batch(batch: Batch) -> str:
    """Send a batch."""
    effect("send_batch")
    return "sent"


@function_tool(strict_mode=False)
def send_by_team(teams: dict[str, set[str]]) -> str:
    """Send to teams."""
    effect("send_by_team")
    return "sent"


TOOLS = [send_invoice, send_reminder, send_mailing, send_batch, send_by_team]


def calls(order: str) -> list[tuple[str, dict[str, Any]]]:
    def ordered(items: list[str]) -> list[str]:
        return items if order == "forward" else items[::-1]

    recipients = ordered(RECIPIENTS)
    return [
        ("send_invoice", {"recipients": recipients, "amount_cents": 100}),
        ("send_reminder", {"recipients": recipients}),
        ("send_mailing", {"mailing": {"subject": "May", "recipients": recipients}}),
        ("send_batch", {"batch": {"label": "b1", "recipients": recipients}}),
        ("send_by_team", {"teams": {"sales": recipients, "ops": ordered(RECIPIENTS[:3])}}),
    ]


class ScriptedModel(Model):
    """Calls every tool once, then answers."""

    def __init__(self, order: str) -> None:
        self.turns: list[list[Any]] = [
            [
                ResponseFunctionToolCall(
                    type="function_call",
                    id=f"fc_{n}",
                    call_id=f"call_{os.getpid()}_{n}",  # a new id in every process
                    name=name,
                    arguments=json.dumps(arguments),
                    status="completed",
                )
                for n, (name, arguments) in enumerate(calls(order))
            ],
            [
                ResponseOutputMessage(
                    id="msg_1",
                    type="message",
                    role="assistant",
                    status="completed",
                    content=[ResponseOutputText(type="output_text", text="Done.", annotations=[])],
                )
            ],
        ]

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        return ModelResponse(output=self.turns.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("the scripted model does not stream")


async def main() -> None:
    guard = AsyncGuard(os.environ["GUARD_DB"])
    try:
        tools = [guard_tool(t, guard=guard, scope="order-42") for t in TOOLS]
        agent = Agent(
            name="mailer",
            instructions="Send.",
            model=ScriptedModel(os.environ["ORDER"]),
            tools=tools,
        )
        result = await Runner.run(agent, "Send.", run_config=RunConfig(tracing_disabled=True))
        assert result.final_output == "Done."
    finally:
        await guard.aclose()


if __name__ == "__main__":
    asyncio.run(main())
