"""A retried OpenAI Agents SDK run charges the card once.

Run it from any directory, offline (``pip install -e '.[openai-agents]'``)::

    python examples/openai_agents_sdk.py

The agent runs on the SDK's real ``Runner`` with a scripted ``Model`` (an ``Agent`` takes
any ``Model`` implementation) that answers with the ``openai`` package's own Responses
types, so no network and no API key are needed; tracing is off. The first two attempts die
when the model call *after* the tool call times out; the whole run is retried with the
same context (the order), and the model re-emits ``charge_card`` with the same arguments
under a new call id, as real models do.

The same scenario runs three times:

* the plain ``@function_tool``: every retry charges the card again;
* guarded, keyed on the SDK's call ids (``key="tool_call_id"``, which warns with
  ``TransportIdWarning``): still charged on every retry;
* guarded with SafeAgent's derived request ids (the default; the scope is read from the run
  context: ``scope=lambda ctx: ctx.context.order_id``): charged once, and every attempt
  shows the model the same result.

The guarded tool shows the model the same name, description and parameters schema.
The guard keeps its records in the default SQLite file (``$SAFEAGENT_DB`` if set, else
``safeagent.db`` in the working directory). Each run uses fresh order ids, so the demo works
on every run. Exit code 0 when the plain and call-id-keyed tools charged three times and
the derived ids once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any

from agents import Agent, FunctionTool, RunConfig, RunContextWrapper, Runner, function_tool
from agents.items import ModelResponse
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

from safeagent import AsyncGuard
from safeagent.integrations.openai_agents import TransportIdWarning, guard_tool

ARGUMENTS = {"customer": "cus_ada", "amount_cents": 4200}
CHARGES: list[str] = []  # the payment provider's ledger: the ground truth


@dataclasses.dataclass
class Order:
    """The run context: what the app passes as ``Runner.run(..., context=...)``."""

    order_id: str


@function_tool
def charge_card(customer: str, amount_cents: int) -> dict[str, Any]:
    """Charge a customer's card.

    Args:
        customer: The customer id.
        amount_cents: The amount to charge, in cents.
    """
    CHARGES.append(customer)
    return {"charge_id": f"ch_{len(CHARGES)}", "amount_cents": amount_cents}


def order_scope(ctx: RunContextWrapper[Order]) -> str:
    """The scope of a tool call: the order the run works on."""
    return ctx.context.order_id


class ScriptedModel(Model):
    """A model that calls ``charge_card``, then times out (attempts 1 and 2) or answers
    (attempt 3). It remembers the tool outputs it was sent."""

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.turn = 0
        self.shown: list[dict[str, Any]] = []

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[Any],
        model_settings: Any,
        tools: list[Any],
        output_schema: Any,
        handoffs: list[Any],
        tracing: Any,
        *,
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        prompt: Any = None,
        **_: Any,
    ) -> ModelResponse:
        self.turn += 1
        if isinstance(input, list):
            self.shown = [
                dict(item)
                for item in input
                if isinstance(item, dict) and item.get("type") == "function_call_output"
            ]
        output: list[Any]
        if self.turn == 1:
            call_id = f"call_{uuid.uuid4().hex[:10]}"
            output = [
                ResponseFunctionToolCall(
                    type="function_call",
                    id=f"fc_{call_id}",
                    call_id=call_id,
                    name="charge_card",
                    arguments=json.dumps(ARGUMENTS),
                    status="completed",
                )
            ]
        elif self.attempt < 3:
            raise TimeoutError("the model call timed out")
        else:
            text = ResponseOutputText(type="output_text", text="Charged.", annotations=[])
            output = [
                ResponseOutputMessage(
                    id="msg_1", type="message", role="assistant", status="completed", content=[text]
                )
            ]
        return ModelResponse(output=output, usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("this scripted model does not stream")


async def scenario(tool: FunctionTool) -> tuple[int, list[str]]:
    """Three attempts of one run; the charges made and what the model was shown."""
    before = len(CHARGES)
    order = Order(f"order-{uuid.uuid4().hex[:8]}")
    shown: list[str] = []
    for attempt in (1, 2, 3):
        model = ScriptedModel(attempt)
        cashier = Agent(name="cashier", instructions="Charge orders.", model=model, tools=[tool])
        with contextlib.suppress(TimeoutError):  # the run died: the app retries it
            await Runner.run(
                cashier,
                "Charge the order.",
                context=order,
                run_config=RunConfig(tracing_disabled=True),
            )
        shown += [f"{item['call_id']}  {item['output']}" for item in model.shown]
    return len(CHARGES) - before, shown


async def main() -> int:
    async with AsyncGuard() as guard:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TransportIdWarning)
            by_call_id = guard_tool(charge_card, guard=guard, scope=order_scope, key="tool_call_id")
        guarded = guard_tool(charge_card, guard=guard, scope=order_scope)
        plain_charges, _ = await scenario(charge_card)
        call_id_charges, _ = await scenario(by_call_id)
        derived_charges, shown = await scenario(guarded)

    keeps = (
        guarded.name == charge_card.name
        and guarded.description == charge_card.description
        and guarded.params_json_schema == charge_card.params_json_schema
    )
    print("OpenAI Agents SDK: a run retried three times, the model re-emitting charge_card")
    print(f"  the guarded tool keeps name, description and schema: {keeps}")
    print("  the model is shown (derived request ids):")
    for line in shown:
        print(f"    {line}")
    print(f"\n  {'charges in ledger':<40}{'plain':>7}{'call ids':>10}{'derived':>9}")
    print(f"  {'':<40}{plain_charges:>7}{call_id_charges:>10}{derived_charges:>9}")
    print(f"  TransportIdWarning emitted: {len(caught)} time(s)\n")
    same = len({line.split("  ", 1)[1] for line in shown}) == 1 and len(shown) == 3
    ok = (plain_charges, call_id_charges, derived_charges) == (3, 3, 1) and same and keeps
    print("RESULT: ok" if ok else "RESULT: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
