"""OpenAI Agents SDK function tools through the guard.

Runs use the real ``Runner`` with a scripted ``Model`` (the SDK accepts any ``Model``
implementation on an ``Agent``) that answers with the ``openai`` package's own Responses
types; no network, tracing off. The first two attempts of a run die when the model call
after the tool call times out; the run is retried from the start with the same context,
and the model re-emits ``charge_card`` with the same arguments under a new call id. Side
effects are counted in the effect ledger (``tests/conftest.py``), separate from the guard's
database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import pytest

from tests.integrations import require, run_example

require("agents")

from agents import (  # noqa: E402
    Agent,
    FunctionTool,
    RunConfig,
    RunContextWrapper,
    Runner,
    ToolOutputImage,
    function_tool,
    tool_namespace,
)
from agents.items import ModelResponse  # noqa: E402
from agents.models.interface import Model  # noqa: E402
from agents.usage import Usage  # noqa: E402
from openai.types.responses import (  # noqa: E402
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)
from pydantic import BaseModel, Field  # noqa: E402

from safeagent import AsyncGuard, Guard  # noqa: E402
from safeagent._keys import canonical_json  # noqa: E402
from safeagent.errors import (  # noqa: E402
    ConfigurationError,
    InvalidInputError,
    InvalidPayloadError,
)
from safeagent.integrations._keyform import key_form  # noqa: E402
from safeagent.integrations.openai_agents import (  # noqa: E402
    REPLAY_MARKER,
    ToolCallError,
    TransportIdWarning,
    guard_tool,
)

ARGS = {"customer": "cus_1", "amount_cents": 1999}
NO_TRACING = RunConfig(tracing_disabled=True)


@dataclasses.dataclass
class Order:
    """The run context: what the caller passes as ``Runner.run(..., context=...)``."""

    order_id: str


class CardDeclined(Exception):
    """The payment provider refused the charge."""


# -- the scripted model ----------------------------------------------------------------------


def function_call(call_id: str, arguments: dict[str, Any], name: str = "charge_card") -> Any:
    return ResponseFunctionToolCall(
        type="function_call",
        id=f"fc_{call_id}",
        call_id=call_id,
        name=name,
        arguments=json.dumps(arguments),
        status="completed",
    )


def answer(text: str) -> Any:
    return ResponseOutputMessage(
        id="msg_1",
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


class ScriptedModel(Model):
    """Answers each model call with the next turn of a script (a list of output items, or an
    exception to raise), and remembers the tool outputs it was sent."""

    def __init__(self, turns: list[list[Any] | BaseException]) -> None:
        self.turns = list(turns)
        self.tool_outputs: list[dict[str, Any]] = []

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
        if isinstance(input, list):
            seen = {o["call_id"] for o in self.tool_outputs}
            self.tool_outputs += [
                dict(item)
                for item in input
                if isinstance(item, dict)
                and item.get("type") == "function_call_output"
                and item["call_id"] not in seen
            ]
        turn = self.turns.pop(0)
        if isinstance(turn, BaseException):
            raise turn
        return ModelResponse(output=turn, usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("the scripted model does not stream")


async def run_once(tool: FunctionTool, turns: list[Any], order: str = "order-42") -> ScriptedModel:
    model = ScriptedModel(turns)
    agent = Agent(name="cashier", instructions="Charge orders.", model=model, tools=[tool])
    await Runner.run(agent, "Charge the order.", context=Order(order), run_config=NO_TRACING)
    return model


async def run_retried(tool: FunctionTool) -> list[list[dict[str, Any]]]:
    """Three attempts of one run; the tool outputs the model was sent in each."""
    per_attempt = []
    for attempt in (1, 2, 3):
        turns: list[Any] = [[function_call(f"call_{attempt}", ARGS)]]
        turns.append(TimeoutError("model call timed out") if attempt < 3 else [answer("Done.")])
        model = ScriptedModel(turns)
        agent = Agent(name="cashier", instructions="Charge orders.", model=model, tools=[tool])
        try:
            result = await Runner.run(
                agent, "Charge the order.", context=Order("order-42"), run_config=NO_TRACING
            )
            assert result.final_output == "Done."
        except TimeoutError:
            assert attempt < 3
        per_attempt.append(model.tool_outputs)
    return per_attempt


# -- the tools -------------------------------------------------------------------------------


def charge_tool(ledger: Any) -> FunctionTool:
    @function_tool
    def charge_card(customer: str, amount_cents: int, currency: str = "usd") -> dict[str, Any]:
        """Charge a customer's card.

        Args:
            customer: The customer id.
            amount_cents: The amount, in cents.
            currency: ISO currency code.
        """
        row = ledger.append(f"{customer}:{amount_cents}:{currency}")
        return {"charge_id": f"ch_{row}", "amount_cents": amount_cents}

    return charge_card


@pytest.fixture
def aguard(tmp_path: Path) -> Any:
    guard = AsyncGuard(tmp_path / "guard.db")
    yield guard
    asyncio.run(guard.aclose())


def by_order(ctx: RunContextWrapper[Order]) -> str:
    return ctx.context.order_id


# -- tests -----------------------------------------------------------------------------------


def test_run_retried_three_times_charges_once(ledger, aguard):
    """A re-emitted charge_card with new call ids charges once; every attempt sees the same."""
    tool = guard_tool(charge_tool(ledger), guard=aguard, scope=by_order)
    attempts = asyncio.run(run_retried(tool))
    assert ledger.count() == 1
    assert [[o["call_id"] for o in sent] for sent in attempts] == [
        ["call_1"],
        ["call_2"],
        ["call_3"],
    ]
    outputs = [sent[0]["output"] for sent in attempts]
    assert outputs == [outputs[0]] * 3
    assert "ch_1" in outputs[0]


def test_keyed_on_call_ids_charges_every_attempt(ledger, aguard):
    """Negative control: keyed on the SDK's call ids, the same script charges three times."""
    with pytest.warns(TransportIdWarning, match="charge_card"):
        tool = guard_tool(charge_tool(ledger), guard=aguard, scope=by_order, key="tool_call_id")
    attempts = asyncio.run(run_retried(tool))
    assert ledger.count() == 3
    assert len({sent[0]["output"] for sent in attempts}) == 3


def test_equivalent_calls_in_one_response_run_once(ledger, aguard):
    """Three equivalent calls in one response run once; a call with other arguments runs too."""
    tool = guard_tool(charge_tool(ledger), guard=aguard, scope=by_order)
    turns: list[Any] = [
        [
            function_call("a", {"customer": "cus_1", "amount_cents": 1999}),
            function_call("b", {"amount_cents": 1999, "customer": "cus_1"}),
            function_call("c", {"currency": "usd", "customer": "cus_1", "amount_cents": 1999}),
            function_call("d", {"customer": "cus_1", "amount_cents": 5}),
        ],
        [answer("Done.")],
    ]
    model = asyncio.run(run_once(tool, turns))
    outputs = {o["call_id"]: o["output"] for o in model.tool_outputs}
    assert sorted(outputs) == ["a", "b", "c", "d"]
    assert outputs["a"] == outputs["b"] == outputs["c"] != outputs["d"]
    assert ledger.count() == 2


def test_guarded_tool_keeps_name_description_and_schema(ledger, aguard):
    """The guarded copy shows the model the same tool; the original is left unchanged."""
    original = charge_tool(ledger)
    schema = json.loads(json.dumps(original.params_json_schema))
    tool = guard_tool(original, guard=aguard, scope="order-42")
    assert tool is not original
    assert (tool.name, tool.description) == ("charge_card", "Charge a customer's card.")
    assert tool.params_json_schema == schema == original.params_json_schema
    assert tool.strict_json_schema is original.strict_json_schema is True
    assert schema["properties"]["amount_cents"]["description"] == "The amount, in cents."
    assert original.on_invoke_tool is not tool.on_invoke_tool


def test_guarded_tool_keeps_the_sdk_settings(ledger, aguard):
    """Timeout, strict mode, approval and enablement settings survive the wrapping."""

    @function_tool(timeout=5.0, strict_mode=False, needs_approval=True, is_enabled=False)
    async def charge_card(customer: str, amount_cents: int = 100) -> str:
        """Charge a customer's card."""
        return f"charged {ledger.append(customer)}"

    tool = guard_tool(charge_card, guard=aguard, scope="order-42")
    assert tool.timeout_seconds == 5.0
    assert tool.strict_json_schema is False
    assert tool.needs_approval is True
    assert tool.is_enabled is False
    assert tool.params_json_schema == charge_card.params_json_schema
    assert "amount_cents" not in tool.params_json_schema.get("required", [])


def test_defaults_are_applied_before_deriving(ledger, aguard):
    """With a non-strict schema, a call that omits a defaulted argument is the same request."""

    @function_tool(strict_mode=False)
    def charge_card(customer: str, amount_cents: int, currency: str = "usd") -> str:
        """Charge a customer's card."""
        return f"charged {ledger.append(currency)}"

    tool = guard_tool(charge_card, guard=aguard, scope="order-42")
    turns: list[Any] = [
        [function_call("a", ARGS), function_call("b", {**ARGS, "currency": "usd"})],
        [answer("Done.")],
    ]
    model = asyncio.run(run_once(tool, turns))
    assert [o["output"] for o in model.tool_outputs] == ["charged 1", "charged 1"]
    assert ledger.count() == 1


def test_async_tool_with_context_parameter(ledger, aguard):
    """An async tool that takes the run context is guarded too and still gets its context."""
    seen: list[str] = []

    @function_tool
    async def charge_card(ctx: RunContextWrapper[Order], customer: str, amount_cents: int) -> str:
        """Charge a customer's card."""
        await asyncio.sleep(0)
        seen.append(ctx.context.order_id)
        return f"charged {ledger.append(customer)}"

    tool = guard_tool(charge_card, guard=aguard, scope=by_order)
    assert "ctx" not in tool.params_json_schema["properties"]
    for call_id in ("call_1", "call_2"):
        model = asyncio.run(run_once(tool, [[function_call(call_id, ARGS)], [answer("Done.")]]))
        assert model.tool_outputs[0]["output"] == "charged 1"
    assert seen == ["order-42"]
    assert ledger.count() == 1


def test_scope_keeps_two_orders_apart(ledger, aguard):
    """The same purchase in two runs with two order ids (scopes) charges twice."""
    tool = guard_tool(charge_tool(ledger), guard=aguard, scope=by_order)
    for order in ("order-1", "order-2", "order-1"):
        asyncio.run(run_once(tool, [[function_call("c", ARGS)], [answer("Done.")]], order=order))
    assert ledger.count() == 2


def test_failure_reaches_the_failure_function_identically(ledger, aguard):
    """A failing tool and its replay both reach failure_error_function as ToolCallError."""
    errors: list[BaseException] = []

    def show(ctx: RunContextWrapper[Any], error: Exception) -> str:
        errors.append(error)
        return f"failed: {error}"

    @function_tool(failure_error_function=show)
    def charge_card(customer: str, amount_cents: int) -> str:
        """Charge a customer's card."""
        ledger.append(customer)
        raise CardDeclined("insufficient funds")

    tool = guard_tool(charge_card, guard=aguard, scope=by_order)
    outputs = []
    for call_id in ("call_1", "call_2"):
        model = asyncio.run(run_once(tool, [[function_call(call_id, ARGS)], [answer("Sorry.")]]))
        outputs.append(model.tool_outputs[0]["output"])
    assert outputs == ["failed: CardDeclined: insufficient funds"] * 2
    assert ledger.count() == 1
    assert all(isinstance(e, ToolCallError) for e in errors)
    first, replay = errors
    assert isinstance(first.__cause__, CardDeclined)
    assert replay.__cause__ is None
    assert (first.replay, replay.replay) == (False, True)
    assert first.error_type == replay.error_type
    assert first.error_type.endswith(".CardDeclined")


def test_replay_marker_and_volatile_argument(ledger, aguard):
    """An excluded argument does not split a request; a replay marker prefixes replays."""

    @function_tool
    def charge_card(customer: str, amount_cents: int, requested_at: str) -> str:
        """Charge a customer's card."""
        ledger.append(requested_at)
        return "charged"

    tool = guard_tool(
        charge_card,
        guard=aguard,
        scope="order-42",
        exclude=["requested_at"],
        replay_marker=REPLAY_MARKER,
    )
    outputs = []
    for i, stamp in enumerate(("10:00:01", "10:00:07")):
        turns = [[function_call(f"c{i}", {**ARGS, "requested_at": stamp})], [answer("Done.")]]
        outputs.append(asyncio.run(run_once(tool, turns)).tool_outputs[0]["output"])
    assert outputs == ["charged", REPLAY_MARKER + "charged"]
    assert ledger.count() == 1


def test_sync_guard_runs_sync_tools(ledger, tmp_path):
    """A sync Guard guards a sync tool (the SDK runs it in a worker thread)."""
    guard = Guard(tmp_path / "guard.db")
    try:
        tool = guard_tool(charge_tool(ledger), guard=guard, scope=by_order)
        turns: list[Any] = [[function_call("a", ARGS), function_call("b", ARGS)], [answer("ok")]]
        model = asyncio.run(run_once(tool, turns))
        asyncio.run(run_once(tool, [[function_call("c", ARGS)], [answer("ok")]]))
    finally:
        guard.close()
    assert ledger.count() == 1
    assert len({o["output"] for o in model.tool_outputs}) == 1


def test_misuse_is_refused_when_wrapping(ledger, aguard, tmp_path):
    """Hand-built tools, async tools on a sync Guard, bad scopes, excludes, keys are refused."""

    async def invoke(ctx: Any, arguments: str) -> str:
        return "never"

    hand_built = FunctionTool(
        name="charge_card",
        description="Charge a card.",
        params_json_schema={"type": "object", "properties": {}, "additionalProperties": False},
        on_invoke_tool=invoke,
    )
    with pytest.raises(ConfigurationError, match="@function_tool"):
        guard_tool(hand_built, guard=aguard, scope="s")

    @function_tool
    async def refund(customer: str) -> str:
        """Refund."""
        return "never"

    guard = Guard(tmp_path / "sync.db")
    try:
        with pytest.raises(ConfigurationError, match="AsyncGuard"):
            guard_tool(refund, guard=guard, scope="s")
    finally:
        guard.close()
    with pytest.raises(InvalidInputError):
        guard_tool(charge_tool(ledger), guard=aguard, scope="")
    with pytest.raises(ConfigurationError, match="does not take"):
        guard_tool(charge_tool(ledger), guard=aguard, scope="s", exclude=["requested_at"])
    with pytest.raises(ConfigurationError):
        guard_tool(charge_tool(ledger), guard=aguard, scope="s", key="call_id")  # type: ignore[arg-type]
    assert ledger.count() == 0


def test_guarding_a_guarded_tool_is_refused(ledger, aguard, tmp_path):
    """guard_tool refuses a tool it made (and a copy of one), and a ``@function_tool`` over
    a ``guard.guarded`` function: the inner guard would meet the outer one's claim and its
    InProgressError be stored as the tool's failure. The tool guarded once charges once."""
    once = guard_tool(charge_tool(ledger), guard=aguard, scope=by_order)
    for again in (once, dataclasses.replace(once)):
        with pytest.raises(ConfigurationError, match="'charge_card' is already guarded"):
            guard_tool(again, guard=aguard, scope=by_order)
    sync_guard = Guard(tmp_path / "sync.db")
    try:

        @sync_guard.guarded(action="refund", key_arg="customer")
        def refund(customer: str) -> str:
            """Refund."""
            ledger.append(f"refund:{customer}")
            return "refunded"

        with pytest.raises(ConfigurationError, match="'refund' is already guarded"):
            guard_tool(function_tool(refund), guard=sync_guard, scope="s")
    finally:
        sync_guard.close()
    turns: list[Any] = [[function_call("a", ARGS), function_call("b", ARGS)], [answer("ok")]]
    model = asyncio.run(run_once(once, turns))
    [record] = aguard.store.records()[0]
    assert ledger.rows() == [("cus_1:1999:usd", None)]
    assert len({o["output"] for o in model.tool_outputs}) == 1
    assert "ch_1" in model.tool_outputs[0]["output"]
    assert record.status.value == "SUCCEEDED"


def test_scope_function_returning_nothing_runs_nothing(ledger, aguard):
    """A scope function that returns no scope makes the call fail before the tool runs."""
    errors: list[BaseException] = []

    def show(ctx: RunContextWrapper[Any], error: Exception) -> str:
        errors.append(error)
        return "failed"

    @function_tool(failure_error_function=show)
    def charge_card(customer: str, amount_cents: int) -> str:
        """Charge a customer's card."""
        ledger.append(customer)
        return "charged"

    no_scope: Callable[[Any], str] = lambda ctx: ""  # noqa: E731
    tool = guard_tool(charge_card, guard=aguard, scope=no_scope)
    model = asyncio.run(run_once(tool, [[function_call("c", ARGS)], [answer("Done.")]]))
    assert model.tool_outputs[0]["output"] == "failed"
    assert isinstance(errors[0], InvalidInputError)
    assert ledger.count() == 0


# -- arguments with one form per value ------------------------------------------------------

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_set_arguments_get_one_request_id_whatever_the_hash_seed(ledger, tmp_path):
    """Set-shaped arguments (a set, a frozenset, and sets in a model, a dataclass and a
    dict) count in canonical order: four worker processes with four hash seeds, the model
    listing the elements in two orders, run each tool once."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env.update(GUARD_DB=str(tmp_path / "guard.db"), LEDGER_DB=ledger.path)
    for seed, order in (("1", "forward"), ("2", "reverse"), ("3", "forward"), ("4", "reverse")):
        worker = subprocess.run(
            [sys.executable, str(HERE / "agents_worker.py")],
            env={**env, "PYTHONHASHSEED": seed, "ORDER": order},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr
    effects = [key for key, _ in ledger.rows()]
    assert sorted(effects) == [
        "send_batch",
        "send_by_team",
        "send_invoice",
        "send_mailing",
        "send_reminder",
    ]


class Refund(BaseModel):
    """A refund line, with a Decimal inside."""

    reason: str
    amount: Decimal


def test_decimal_spellings_are_one_request(ledger, aguard):
    """10, 10.0, 1e1 and "10.00" are one amount, at the top level and inside a model or a
    dict; 10.5 is another, however it is spelt."""

    @function_tool
    def charge_card(customer: str, amount: Decimal) -> str:
        """Charge a customer's card."""
        return f"charged {ledger.append(f'charge:{amount}')}"

    @function_tool(strict_mode=False)
    def refund(line: Refund, fees: dict[str, Decimal]) -> str:
        """Refund a line."""
        return f"refunded {ledger.append(f'refund:{line.amount}')}"

    charge = guard_tool(charge_card, guard=aguard, scope=by_order)
    spellings = [10, 10.0, 1e1, "10.00", "1E+1", 10.5, "10.50", 1.05e1]
    calls = [
        function_call(f"c{i}", {"customer": "cus_1", "amount": a}) for i, a in enumerate(spellings)
    ]
    model = asyncio.run(run_once(charge, [calls, [answer("Done.")]]))
    outputs = [o["output"] for o in model.tool_outputs]  # the SDK runs them concurrently
    assert len(set(outputs[:5])) == len(set(outputs[5:])) == 1
    assert outputs[0] != outputs[5]

    back = guard_tool(refund, guard=aguard, scope=by_order)
    calls = [
        function_call(
            f"r{i}", {"line": {"reason": "late", "amount": a}, "fees": {"eur": f}}, "refund"
        )
        for i, (a, f) in enumerate(((2, "0.50"), ("2.00", 0.5), (2.0, "5E-1")))
    ]
    model = asyncio.run(run_once(back, [calls, [answer("Done.")]]))
    assert len({o["output"] for o in model.tool_outputs}) == 1
    effects = [key.split(":") for key, _ in ledger.rows()]
    assert sorted((kind, Decimal(amount)) for kind, amount in effects) == [
        ("charge", Decimal(10)),
        ("charge", Decimal("10.5")),
        ("refund", Decimal(2)),
    ]


def test_decimal_key_form_is_one_spelling_per_number():
    """Every spelling of a number gets one form; -0 is 0; an exponent form of an integer is
    written out; NaN and infinities are refused with InvalidPayloadError."""
    same = [
        ["10", "10.0", "1E+1", "10.000", "0.1E+2"],
        ["0", "-0", "0.000", "0E+5", "-0E-3"],
        ["-2.5", "-2.50", "-0.25E+1"],
        ["0.0000001", "1E-7", "1.0E-7"],
        ["1E+120", "1.000E+120"],
    ]
    for spellings in same:
        forms = {key_form({"v": Decimal(s)})["v"] for s in spellings}
        assert len(forms) == 1, (spellings, forms)
    assert key_form(Decimal("1E+2")) == "100"
    assert key_form(Decimal("-0")) == "0"
    assert key_form(Decimal("1.5E+3")) == "1500"
    assert Decimal(key_form(Decimal("1E+120"))) == Decimal("1E+120")
    assert len({key_form(Decimal(s)) for s in ("10", "10.5", "1.05", "100", "1E-7")}) == 5
    from safeagent.integrations._keyform import canonical_decimal

    already = Decimal("10.5")
    assert canonical_decimal(already) is already  # the usual spelling: the same object
    for bad in ("NaN", "-NaN", "sNaN", "Infinity", "-Infinity"):
        with pytest.raises(InvalidPayloadError, match="not a number"):
            key_form({"v": Decimal(bad)})


def test_decimal_in_a_model_of_any_shape_is_one_form_per_number():
    """A Decimal inside a model that pydantic dumps in its own shape (a root model, an
    alias, a computed field, a field serializer): every spelling of the number gives one
    form. The model used to be dumped by pydantic when its Decimal was already in its one
    spelling and by field names otherwise: two request ids for one amount."""
    import pydantic

    class Amount(pydantic.RootModel[Decimal]):
        pass

    class Aliased(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(serialize_by_alias=True)
        amount: Decimal = pydantic.Field(alias="amt")

    class WithComputed(pydantic.BaseModel):
        amount: Decimal

        @pydantic.computed_field  # type: ignore[prop-decorator]
        @property
        def currency(self) -> str:
            return "EUR"

    class Serialized(pydantic.BaseModel):
        amount: Decimal

        @pydantic.field_serializer("amount")
        def show(self, value: Decimal) -> str:
            return f"EUR {value}"

    @dataclasses.dataclass
    class Plain:
        amount: Decimal

    makers = [
        Amount,
        lambda d: Aliased(amt=d),
        lambda d: WithComputed(amount=d),
        lambda d: Serialized(amount=d),
        Plain,
    ]
    for make in makers:
        forms = {canonical_json(key_form({"x": make(Decimal(s))})) for s in ("10", "10.00", "1E+1")}
        assert len(forms) == 1, forms


def test_decimal_nan_argument_runs_nothing(ledger, aguard):
    """A Decimal parameter that admits NaN: the call is refused (InvalidPayloadError, shown
    through the tool's failure function) and the tool does not run."""
    errors: list[BaseException] = []

    def show(ctx: RunContextWrapper[Any], error: Exception) -> str:
        errors.append(error)
        return "failed"

    @function_tool(failure_error_function=show)
    def charge_card(amount: Annotated[Decimal, Field(allow_inf_nan=True)]) -> str:
        """Charge a card."""
        ledger.append(str(amount))
        return "charged"

    tool = guard_tool(charge_card, guard=aguard, scope=by_order)
    calls = [function_call("a", {"amount": "NaN"}), function_call("b", {"amount": "Infinity"})]
    model = asyncio.run(run_once(tool, [calls, [answer("Done.")]]))
    assert [o["output"] for o in model.tool_outputs] == ["failed", "failed"]
    assert all(isinstance(e, InvalidPayloadError) for e in errors)
    assert ledger.count() == 0


# -- tool namespaces -------------------------------------------------------------------------


async def run_tools(tools: list[Any], turns: list[Any]) -> ScriptedModel:
    model = ScriptedModel(turns)
    agent = Agent(name="clerk", instructions="Invoice.", model=model, tools=tools)
    await Runner.run(agent, "Invoice.", context=Order("order-42"), run_config=NO_TRACING)
    return model


def namespaced_call(call_id: str, namespace: str | None, name: str = "create_invoice") -> Any:
    return ResponseFunctionToolCall(
        type="function_call",
        id=f"fc_{call_id}",
        call_id=call_id,
        name=name,
        namespace=namespace,
        arguments=json.dumps({"customer": "cus_1", "amount_cents": 500}),
        status="completed",
    )


def test_same_named_tools_in_two_namespaces_keep_their_own_records(ledger, aguard):
    """billing.create_invoice and refunds.create_invoice, with the same arguments, both run
    (each replays only itself); the action is the namespace-qualified name, and a tool
    outside any namespace keeps its plain name."""

    def invoice_tool(kind: str, name: str = "create_invoice") -> FunctionTool:
        @function_tool(name_override=name)
        def create_invoice(customer: str, amount_cents: int) -> str:
            """Create an invoice."""
            return f"{kind} {ledger.append(kind)}"

        return guard_tool(create_invoice, guard=aguard, scope=by_order)

    tools = [
        *tool_namespace(name="billing", description="Billing", tools=[invoice_tool("billing")]),
        *tool_namespace(name="refunds", description="Refunds", tools=[invoice_tool("refunds")]),
        invoice_tool("plain", name="create_credit_note"),
    ]
    turns: list[Any] = [
        [
            namespaced_call("a", "billing"),
            namespaced_call("b", "refunds"),
            namespaced_call("c", None, "create_credit_note"),
        ],
        [namespaced_call("d", "refunds"), namespaced_call("e", "billing")],
        [answer("Done.")],
    ]
    model = asyncio.run(run_tools(tools, turns))
    outputs = {o["call_id"]: o["output"] for o in model.tool_outputs}
    assert outputs["a"] == outputs["e"]  # the SDK runs a response's calls concurrently
    assert outputs["b"] == outputs["d"]
    assert [outputs[c].split()[0] for c in "abc"] == ["billing", "refunds", "plain"]
    assert sorted(key for key, _ in ledger.rows()) == ["billing", "plain", "refunds"]
    [records] = aguard.store.records()[:1]
    assert sorted(r.action for r in records) == [
        "billing.create_invoice",
        "create_credit_note",
        "refunds.create_invoice",
    ]


# -- replays keep the first call's shape -----------------------------------------------------


def replayed_outputs(tool: FunctionTool, arguments: dict[str, Any], name: str) -> list[Any]:
    """What the model is sent for the first call and for a re-emitted one."""
    outputs = []
    for call_id in ("call_1", "call_2"):
        turns = [[function_call(call_id, arguments, name)], [answer("Done.")]]
        outputs.append(asyncio.run(run_once(tool, turns)).tool_outputs[0]["output"])
    return outputs


def test_replay_marker_never_changes_what_the_model_is_shown(ledger, aguard):
    """With replay_marker, a dict result, a ToolOutputImage and a list of them replay with
    the first call's type and shape (unmarked); a str result replays marked; a tool with
    an output schema replays its str result unmarked (the SDK parses it as JSON)."""

    @function_tool
    def charge_card(customer: str) -> dict[str, Any]:
        """Charge."""
        return {"charge_id": f"ch_{ledger.append('charge')}", "ok": True}

    @function_tool
    def screenshot(page: str) -> ToolOutputImage:
        """Screenshot."""
        return ToolOutputImage(image_url=f"https://example.com/{ledger.append('shot')}.png")

    @function_tool
    def screenshots(page: str) -> list[ToolOutputImage]:
        """Screenshots."""
        row = ledger.append("shots")
        return [ToolOutputImage(image_url=f"https://example.com/{row}-{n}.png") for n in (1, 2)]

    @function_tool
    def note(text: str) -> str:
        """Note."""
        return f"noted {ledger.append('note')}"

    schema = {
        "type": "object",
        "properties": {"ticket": {"type": "string"}},
        "required": ["ticket"],
        "additionalProperties": False,
    }

    @function_tool(output_json_schema=schema)
    def open_ticket(title: str) -> str:
        """Open a ticket."""
        return json.dumps({"ticket": f"T-{ledger.append('ticket')}"})

    cases = [
        (charge_card, {"customer": "cus_1"}),
        (screenshot, {"page": "home"}),
        (screenshots, {"page": "home"}),
        (open_ticket, {"title": "broken"}),
    ]
    for original, arguments in cases:
        tool = guard_tool(original, guard=aguard, scope=by_order, replay_marker=REPLAY_MARKER)
        first, replay = replayed_outputs(tool, arguments, original.name)
        assert replay == first, original.name
        assert type(replay) is type(first)
    assert ledger.count() == 4
    shot = guard_tool(screenshot, guard=aguard, scope="other", replay_marker=REPLAY_MARKER)
    assert isinstance(replayed_outputs(shot, {"page": "home"}, "screenshot")[0], list)
    noted = guard_tool(note, guard=aguard, scope=by_order, replay_marker=REPLAY_MARKER)
    assert replayed_outputs(noted, {"text": "hi"}, "note") == ["noted 6", REPLAY_MARKER + "noted 6"]


# -- refused when wrapping -------------------------------------------------------------------


def test_generator_tools_are_refused_when_wrapping(ledger, aguard, tmp_path):
    """A generator or async generator function tool is refused (calling it runs none of its
    body, so the guard would record a charge that never happened), with either guard."""

    def gen_charge(customer: str) -> Any:
        ledger.append(customer)
        yield "charged"

    async def agen_charge(customer: str) -> Any:
        ledger.append(customer)
        yield "charged"

    sync_guard = Guard(tmp_path / "sync.db")
    try:
        for func, kind in ((gen_charge, "a generator"), (agen_charge, "an async generator")):
            tool = function_tool(func)
            for guard in (aguard, sync_guard):
                with pytest.raises(ConfigurationError, match=f"is {kind} function"):
                    guard_tool(tool, guard=guard, scope="order-42")
    finally:
        sync_guard.close()
    assert ledger.count() == 0


def test_bad_names_are_refused_when_wrapping(ledger, aguard):
    """A tool name that cannot be an action (over 255 characters), a scope or a namespace
    with NUL or a lone surrogate: refused by guard_tool, not on every call."""

    @function_tool(name_override="x" * 256)
    def charge_card(customer: str) -> str:
        """Charge."""
        return "charged"

    with pytest.raises(ConfigurationError, match="tool name"):
        guard_tool(charge_card, guard=aguard, scope="order-42")
    for scope in ("order-\x00-42", "order-\ud800"):
        with pytest.raises(InvalidInputError, match="scope"):
            guard_tool(charge_tool(ledger), guard=aguard, scope=scope)
    for namespace in ("", "tenant\x00", "t" * 256):
        with pytest.raises(InvalidInputError, match="namespace"):
            guard_tool(charge_tool(ledger), guard=aguard, scope="s", namespace=namespace)
    assert ledger.count() == 0


@pytest.mark.slow
def test_example_runs_offline_and_charges_once_on_every_run(tmp_path):
    """examples/openai_agents_sdk.py runs offline: one charge with derived ids, every run."""
    for _ in range(2):
        result = run_example("openai_agents_sdk.py", tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.rstrip().endswith("RESULT: ok")
    assert (tmp_path / "safeagent.db").exists()
