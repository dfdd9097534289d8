"""A retried OpenAI tool-calling run charges the card once: Chat Completions and Responses.

Run it from any directory, offline (``pip install -e '.[openai]'``)::

    python examples/openai_tool_calls.py

The model is scripted with the ``openai`` package's own response objects, so no network
and no API key are needed. The agent is the usual tool loop: ask the model, run its tool
calls, send the results back, until it answers. The first two attempts die when the model
call *after* the tool call times out; the whole run is retried from the start, and the
model re-emits ``charge_card`` with the same arguments under a new tool-call id, as real
models do.

Each API runs the scenario twice:

* keyed on the tool-call ids (``key="tool_call_id"``, which warns with
  ``TransportIdWarning``): every retry is a new request, so the card is charged three times;
* with SafeAgent's derived request ids (the default: scope = the order id, the tool name
  and the arguments): the card is charged once, and every attempt shows the model the same
  result.

The guard keeps its records in the default SQLite file (``$SAFEAGENT_DB`` if set, else
``safeagent.db`` in the working directory), reopened for every attempt as a restarted
worker would. Each run uses fresh order ids, so the demo works on every run. Exit code 0
when both APIs charged three times keyed on tool-call ids and once with derived ids.
"""

from __future__ import annotations

import json
import sys
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
)
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_message_tool_call import Function
from openai.types.responses import (
    Response,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

from safeagent import Guard, current_context
from safeagent.integrations.openai import (
    TransportIdWarning,
    run_function_calls,
    run_tool_calls,
)

ARGUMENTS = {"customer": "cus_ada", "amount_cents": 4200, "currency": "eur"}


class PaymentProvider:
    """The downstream system; its list of charges is the ground truth."""

    def __init__(self) -> None:
        self.charges: list[dict[str, Any]] = []

    def charge_card(
        self, customer: str, amount_cents: int, currency: str = "usd"
    ) -> dict[str, Any]:
        """The tool: charges the card and returns the charge."""
        ctx = current_context()
        charge = {
            "charge_id": f"ch_{len(self.charges) + 1}",
            "customer": customer,
            "amount_cents": amount_cents,
            "currency": currency,
            # Hand this to a real provider as *its* idempotency key (Stripe's header).
            "idempotency_key": ctx.downstream_key[:16] if ctx else None,
        }
        self.charges.append(charge)
        return charge


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:10]}"


# -- Chat Completions ------------------------------------------------------------------------


class ScriptedChat:
    """Stands in for ``client.chat.completions``: a tool call, then a timeout (attempts 1
    and 2) or the final answer (attempt 3)."""

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.turn = 0

    def create(self, **request: Any) -> ChatCompletion:
        self.turn += 1
        if self.turn == 1:
            call = ChatCompletionMessageToolCall(
                id=new_call_id(),
                type="function",
                function=Function(name="charge_card", arguments=json.dumps(ARGUMENTS)),
            )
            message = ChatCompletionMessage(role="assistant", tool_calls=[call])
        elif self.attempt < 3:
            raise TimeoutError("the model call timed out")  # stands in for APITimeoutError
        else:
            message = ChatCompletionMessage(role="assistant", content="Charged 42.00 EUR.")
        return ChatCompletion(
            id="chatcmpl-scripted",
            object="chat.completion",
            created=0,
            model="scripted",
            choices=[Choice(index=0, finish_reason="stop", message=message)],
        )


def chat_agent(
    model: ScriptedChat, tools: dict[str, Callable[..., Any]], guard: Guard, order: str, key: Any
) -> list[Any]:
    """One attempt of the run; returns the tool messages the model was sent."""
    messages: list[Any] = [{"role": "user", "content": f"Charge order {order}."}]
    shown: list[Any] = []
    try:
        while True:
            message = model.create(model="gpt-4.1", messages=messages).choices[0].message
            messages.append(message)
            if not message.tool_calls:
                return shown
            results = run_tool_calls(message, tools, guard=guard, scope=order, key=key)
            shown += results
            messages += results
    except TimeoutError:
        return shown


# -- Responses API ---------------------------------------------------------------------------


class ScriptedResponses:
    """Stands in for ``client.responses``: a function call, then a timeout or the answer."""

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.turn = 0

    def create(self, **request: Any) -> Response:
        self.turn += 1
        output: list[Any]
        if self.turn == 1:
            call_id = new_call_id()
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
        return Response(
            id="resp_scripted",
            object="response",
            created_at=0,
            model="scripted",
            output=output,
            parallel_tool_calls=True,
            tool_choice="auto",
            tools=[],
        )


def responses_agent(
    model: ScriptedResponses,
    tools: dict[str, Callable[..., Any]],
    guard: Guard,
    order: str,
    key: Any,
) -> list[Any]:
    """One attempt of the run; returns the function_call_output items the model was sent."""
    items: list[Any] = [{"role": "user", "content": f"Charge order {order}."}]
    shown: list[Any] = []
    try:
        while True:
            response = model.create(model="gpt-4.1", input=items)
            items += [item.model_dump(exclude_none=True) for item in response.output]
            outputs = run_function_calls(response, tools, guard=guard, scope=order, key=key)
            if not outputs:
                return shown
            shown += outputs
            items += outputs
    except TimeoutError:
        return shown


# -- the scenario ----------------------------------------------------------------------------


def scenario(api: str, key: str) -> tuple[int, list[tuple[str, str]]]:
    """Three attempts of one run; the charges made and (call id, content) per attempt."""
    provider = PaymentProvider()
    tools = {"charge_card": provider.charge_card}
    order = f"order-{uuid.uuid4().hex[:8]}"
    seen: list[tuple[str, str]] = []
    for attempt in (1, 2, 3):
        with Guard() as guard:  # a fresh worker: the guard reopens the same SQLite file
            if api == "chat":
                shown = chat_agent(ScriptedChat(attempt), tools, guard, order, key)
                seen += [(m["tool_call_id"], m["content"]) for m in shown]
            else:
                shown = responses_agent(ScriptedResponses(attempt), tools, guard, order, key)
                seen += [(o["call_id"], o["output"]) for o in shown]
    return len(provider.charges), seen


def shorten(text: str, width: int = 58) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> int:
    ok = True
    for api, title in (("chat", "Chat Completions"), ("responses", "Responses API")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TransportIdWarning)
            transport_charges, transport_seen = scenario(api, "tool_call_id")
        derived_charges, derived_seen = scenario(api, "derived")
        print(f"{title}: a run retried three times, the model re-emitting charge_card")
        print(f"  {'attempt':<9}{'call id':<17}the model is shown (derived request ids)")
        for attempt, (call_id, content) in enumerate(derived_seen, start=1):
            print(f"  {attempt:<9}{call_id:<17}{shorten(content)}")
        same = len({content for _, content in derived_seen}) == 1
        differ = len({content for _, content in transport_seen}) == 1
        print(f"  {'':<34}{'tool-call ids':>15}{'derived ids':>14}")
        print(f"  {'charges in ledger':<34}{transport_charges:>15}{derived_charges:>14}")
        print(f"  {'same result on every attempt':<34}{differ!s:>15}{same!s:>14}")
        print(f"  TransportIdWarning emitted: {len(caught)} time(s)\n")
        ok = ok and transport_charges == 3 and derived_charges == 1 and same and len(caught) > 0
    print("RESULT: ok" if ok else "RESULT: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
