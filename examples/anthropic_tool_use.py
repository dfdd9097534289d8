"""A retried Anthropic tool-use run charges the card once.

Run it from any directory, offline (``pip install -e '.[anthropic]'``)::

    python examples/anthropic_tool_use.py

The model is scripted with the ``anthropic`` package's own ``Message`` and
``ToolUseBlock`` objects, so no network and no API key are needed. The agent is the usual
tool loop: ask the model, run its ``tool_use`` blocks, send the ``tool_result`` blocks back,
until it answers. The first two attempts die when the model call *after* the tool call
times out; the whole run is retried, and the model re-emits ``charge_card`` with the same
input under a new ``tool_use`` id, as real models do. In the last attempt the model also
asks twice in one message (the input keys in another order): one request, one charge.

The scenario runs twice:

* keyed on the ``tool_use`` ids (``key="tool_call_id"``, which warns with
  ``TransportIdWarning``): every ``tool_use`` block is a new request, so the card is
  charged four times;
* with SafeAgent's derived request ids (the default: scope = the order id, the tool name
  and the input): the card is charged once, and every ``tool_result`` carries the same
  content, each under its own ``tool_use_id``.

A declined card shows how failures look: a ``tool_result`` with ``is_error: True``, the
same text on every replay, and no second attempt at the charge.

The guard keeps its records in the default SQLite file (``$SAFEAGENT_DB`` if set, else
``safeagent.db`` in the working directory), reopened for every attempt. Each run uses
fresh order ids, so the demo works on every run. Exit code 0 when the tool_use ids charged
four times and the derived ids once.
"""

from __future__ import annotations

import sys
import uuid
import warnings
from typing import Any

from anthropic.types import Message, TextBlock, ToolUseBlock, Usage

from safeagent import Guard
from safeagent.integrations.anthropic import TransportIdWarning, run_tool_uses

INPUT = {"customer": "cus_ada", "amount_cents": 4200}
REORDERED = {"amount_cents": 4200, "customer": "cus_ada"}


class CardDeclinedError(Exception):
    """The payment provider refused the charge."""


class PaymentProvider:
    """The downstream system; its list of charges is the ground truth."""

    def __init__(self) -> None:
        self.charges: list[str] = []
        self.attempts = 0

    def charge_card(self, customer: str, amount_cents: int) -> dict[str, Any]:
        self.charges.append(customer)
        return {"charge_id": f"ch_{len(self.charges)}", "amount_cents": amount_cents}

    def charge_blocked_card(self, customer: str, amount_cents: int) -> dict[str, Any]:
        self.attempts += 1
        raise CardDeclinedError(f"card of {customer} declined: insufficient funds")


def tool_use(tool_input: dict[str, Any], name: str = "charge_card") -> ToolUseBlock:
    return ToolUseBlock(
        type="tool_use", id=f"toolu_{uuid.uuid4().hex[:10]}", name=name, input=tool_input
    )


def message(*content: Any, stop_reason: str) -> Message:
    return Message(
        id="msg_scripted",
        type="message",
        role="assistant",
        model="scripted",
        content=list(content),
        stop_reason=stop_reason,  # type: ignore[arg-type]
        usage=Usage(input_tokens=10, output_tokens=10),
    )


class ScriptedMessages:
    """Stands in for ``client.messages``: tool use, then a timeout (attempts 1 and 2) or the
    final answer (attempt 3, which also asks twice in one message)."""

    def __init__(self, attempt: int, tool: str) -> None:
        self.attempt = attempt
        self.tool = tool
        self.turn = 0

    def create(self, **request: Any) -> Message:
        self.turn += 1
        if self.turn == 1:
            blocks = [tool_use(INPUT, self.tool)]
            if self.attempt == 3:
                blocks.append(tool_use(REORDERED, self.tool))
            text = TextBlock(type="text", text="Charging the card.")
            return message(text, *blocks, stop_reason="tool_use")
        if self.attempt < 3:
            raise TimeoutError("the model call timed out")  # stands in for APITimeoutError
        return message(TextBlock(type="text", text="Done."), stop_reason="end_turn")


def agent(
    model: ScriptedMessages, tools: dict[str, Any], guard: Guard, order: str, key: Any
) -> list[Any]:
    """One attempt of the run; returns the tool_result blocks the model was sent."""
    messages: list[Any] = [{"role": "user", "content": f"Charge order {order}."}]
    shown: list[Any] = []
    try:
        while True:
            reply = model.create(model="claude-sonnet", max_tokens=1024, messages=messages)
            messages.append({"role": "assistant", "content": reply.content})
            if reply.stop_reason != "tool_use":
                return shown
            results = run_tool_uses(reply, tools, guard=guard, scope=order, key=key)
            shown += results
            messages.append({"role": "user", "content": results})
    except TimeoutError:
        return shown


def scenario(key: str, tool: str = "charge_card") -> tuple[PaymentProvider, list[Any]]:
    """Three attempts of one run, each in a fresh worker."""
    provider = PaymentProvider()
    tools = {
        "charge_card": provider.charge_card,
        "charge_blocked_card": provider.charge_blocked_card,
    }
    order = f"order-{uuid.uuid4().hex[:8]}"
    shown: list[Any] = []
    for attempt in (1, 2, 3):
        with Guard() as guard:
            shown += agent(ScriptedMessages(attempt, tool), tools, guard, order, key)
    return provider, shown


def main() -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TransportIdWarning)
        by_transport, _ = scenario("tool_call_id")
    by_derived, shown = scenario("derived")
    declined, failures = scenario("derived", tool="charge_blocked_card")

    print("Anthropic tool use: a run retried three times, the model re-emitting charge_card")
    print(f"  {'tool_use_id':<18}{'is_error':<10}the model is shown (derived request ids)")
    for result in shown + failures:
        is_error = str(result.get("is_error", False))
        print(f"  {result['tool_use_id']:<18}{is_error:<10}{result['content']}")
    print(f"\n  {'':<34}{'tool_use ids':>14}{'derived ids':>13}")
    print(
        f"  {'charges in ledger':<34}{len(by_transport.charges):>14}{len(by_derived.charges):>13}"
    )
    print(f"  {'declined card: attempts to charge':<34}{'':>14}{declined.attempts:>13}")
    print(f"  TransportIdWarning emitted: {len(caught)} time(s)\n")

    same = len({r["content"] for r in shown}) == 1 and len({r["content"] for r in failures}) == 1
    own_ids = len({r["tool_use_id"] for r in shown}) == len(shown) == 4
    ok = (
        len(by_transport.charges) == 4
        and len(by_derived.charges) == 1
        and declined.attempts == 1
        and same
        and own_ids
        and all(r.get("is_error") for r in failures)
    )
    print("RESULT: ok" if ok else "RESULT: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
