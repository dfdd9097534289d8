"""OpenAI Chat Completions and Responses API tool calls through the guard.

The model is scripted with the ``openai`` package's own response objects (no network). A
"run" is the usual tool loop: ask the model, run its tool calls, send the results back,
until it answers. The first two attempts of a run die when the model call after the tool
call times out; the run is retried from the start and the model re-emits ``charge_card``
with the same arguments under a new tool-call id. Side effects are counted in the effect
ledger (``tests/conftest.py``), a SQLite file separate from the guard's database.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.integrations import require, run_example

require("openai")

from openai.types.chat import (  # noqa: E402
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
)
from openai.types.chat.chat_completion import Choice  # noqa: E402
from openai.types.chat.chat_completion_message_tool_call import Function  # noqa: E402
from openai.types.responses import (  # noqa: E402
    Response,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

from safeagent import AsyncGuard, Guard, NotExecuted, Status, current_context  # noqa: E402
from safeagent.errors import (  # noqa: E402
    ConfigurationError,
    InvalidInputError,
    OutcomeUnknownError,
    ResultNotSerializableError,
)
from safeagent.integrations.openai import (  # noqa: E402
    REPLAY_MARKER,
    TransportIdWarning,
    arun_function_calls,
    arun_tool_calls,
    run_function_calls,
    run_tool_calls,
)

ORDER = "order-42"
ARGS = {"customer": "cus_1", "amount_cents": 1999}


class CardDeclined(Exception):
    """The payment provider refused the charge."""


# -- the scripted model ----------------------------------------------------------------------


def chat_call(call_id: str, arguments: dict[str, Any] | str, name: str = "charge_card") -> Any:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ChatCompletionMessageToolCall(
        id=call_id, type="function", function=Function(name=name, arguments=text)
    )


def completion(*tool_calls: Any, text: str | None = None) -> ChatCompletion:
    message = ChatCompletionMessage(
        role="assistant", content=text, tool_calls=list(tool_calls) or None
    )
    return ChatCompletion(
        id="chatcmpl-scripted",
        object="chat.completion",
        created=0,
        model="scripted",
        choices=[
            Choice(
                index=0,
                finish_reason="tool_calls" if tool_calls else "stop",
                message=message,
            )
        ],
    )


class ScriptedChat:
    """``create(messages=...)`` answers from a script; an exception in it is raised."""

    def __init__(self, script: list[ChatCompletion | BaseException]) -> None:
        self.script = list(script)
        self.seen: list[list[Any]] = []

    def create(self, *, messages: list[Any]) -> ChatCompletion:
        self.seen.append(list(messages))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


def chat_run(
    model: ScriptedChat,
    tools: dict[str, Callable[..., Any]],
    guard: Guard,
    sent: list[Any],
    **options: Any,
) -> str | None:
    """The tool loop; the tool messages sent back to the model go to ``sent`` as well."""
    messages: list[Any] = [{"role": "user", "content": "Charge order 42."}]
    while True:
        message = model.create(messages=messages).choices[0].message
        messages.append(message)
        if not message.tool_calls:
            return message.content
        results = run_tool_calls(message, tools, guard=guard, scope=ORDER, **options)
        sent += results
        messages += results


def retried_chat_script(attempt: int, arguments: dict[str, Any] = ARGS) -> list[Any]:
    """Attempts 1 and 2 time out after the tool call; attempt 3 gets its answer."""
    tool_turn = completion(chat_call(f"call_{attempt}_{'abc'[attempt - 1]}", arguments))
    if attempt < 3:
        return [tool_turn, TimeoutError("model call timed out")]
    return [tool_turn, completion(text="Charged.")]


# -- the tools -------------------------------------------------------------------------------


@pytest.fixture
def charge_card(ledger: Any) -> Callable[..., dict[str, Any]]:
    def charge_card(customer: str, amount_cents: int, currency: str = "usd") -> dict[str, Any]:
        ctx = current_context()
        assert ctx is not None
        row = ledger.append(f"{customer}:{amount_cents}:{currency}", ctx.downstream_key)
        return {"charge_id": f"ch_{row}", "amount_cents": amount_cents, "currency": currency}

    return charge_card


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "guard.db"


@pytest.fixture
def guards(db: Path) -> Iterator[Callable[[], Guard]]:
    """``new()`` opens a fresh Guard on the same SQLite file: a restarted worker."""
    opened: list[Guard] = []

    def new() -> Guard:
        opened.append(Guard(db))
        return opened[-1]

    yield new
    for guard in opened:
        guard.close()


def run_retried(
    script: Callable[[int], list[Any]], tools: dict[str, Any], guards: Any, **options: Any
) -> list[list[Any]]:
    """Three attempts of one run, each in a fresh worker; the tool messages of each."""
    per_attempt = []
    for attempt in (1, 2, 3):
        sent: list[Any] = []
        try:
            assert chat_run(ScriptedChat(script(attempt)), tools, guards(), sent, **options)
            assert attempt == 3
        except TimeoutError:
            assert attempt < 3
        per_attempt.append(sent)
    return per_attempt


# -- Chat Completions ------------------------------------------------------------------------


def test_chat_run_retried_three_times_charges_once(charge_card, guards, ledger):
    """A re-emitted charge_card with new tool-call ids charges once; all attempts agree."""
    attempts = run_retried(retried_chat_script, {"charge_card": charge_card}, guards)
    assert ledger.count() == 1
    contents = [sent[0]["content"] for sent in attempts]
    assert contents == [contents[0]] * 3
    assert json.loads(contents[0])["charge_id"] == "ch_1"
    assert [sent[0]["tool_call_id"] for sent in attempts] == ["call_1_a", "call_2_b", "call_3_c"]


def test_chat_keyed_on_tool_call_ids_charges_every_attempt(charge_card, guards, ledger):
    """Negative control: keyed on tool-call ids, the same script charges three times."""
    with pytest.warns(TransportIdWarning, match="tool-call ids"):
        attempts = run_retried(
            retried_chat_script, {"charge_card": charge_card}, guards, key="tool_call_id"
        )
    assert ledger.count() == 3
    assert len({sent[0]["content"] for sent in attempts}) == 3


def test_chat_equivalent_calls_in_one_message_run_once(charge_card, guards, ledger):
    """Three equivalent calls (keys reordered) run once; each keeps its own tool_call_id."""
    message = (
        completion(
            chat_call("call_a", {"customer": "cus_1", "amount_cents": 1999}),
            chat_call("call_b", {"amount_cents": 1999, "customer": "cus_1"}),
            chat_call("call_c", {"amount_cents": 1999, "currency": "usd", "customer": "cus_1"}),
        )
        .choices[0]
        .message
    )
    results = run_tool_calls(message, {"charge_card": charge_card}, guard=guards(), scope=ORDER)
    assert ledger.count() == 1
    assert [r["tool_call_id"] for r in results] == ["call_a", "call_b", "call_c"]
    assert all(r["role"] == "tool" for r in results)
    assert len({r["content"] for r in results}) == 1


def test_chat_call_with_other_arguments_runs_separately(charge_card, guards, ledger):
    """A call whose arguments really differ is another request: it runs too."""
    message = (
        completion(
            chat_call("call_a", ARGS),
            chat_call("call_b", {**ARGS, "amount_cents": 2999}),
            chat_call("call_c", {**ARGS, "currency": "eur"}),
        )
        .choices[0]
        .message
    )
    results = run_tool_calls(message, {"charge_card": charge_card}, guard=guards(), scope=ORDER)
    assert ledger.count() == 3
    assert len({r["content"] for r in results}) == 3


def test_chat_same_purchase_in_two_scopes_runs_twice(charge_card, guards, ledger):
    """The scope keeps two intentional identical purchases (two orders) apart."""
    guard = guards()
    for scope in ("order-1", "order-2"):
        message = completion(chat_call(f"call_{scope}", ARGS)).choices[0].message
        run_tool_calls(message, {"charge_card": charge_card}, guard=guard, scope=scope)
    assert ledger.count() == 2


def test_chat_dict_message_replays_the_sdk_object(charge_card, guards, ledger):
    """A message given as a plain dict is the same request as the SDK object."""
    guard = guards()
    message = completion(chat_call("call_1", ARGS)).choices[0].message
    first = run_tool_calls(message, {"charge_card": charge_card}, guard=guard, scope=ORDER)
    as_dict = completion(chat_call("call_2", ARGS)).choices[0].message.model_dump()
    again = run_tool_calls(as_dict, {"charge_card": charge_card}, guard=guard, scope=ORDER)
    assert ledger.count() == 1
    assert again[0]["tool_call_id"] == "call_2"
    assert again[0]["content"] == first[0]["content"]


def test_chat_failure_is_shown_and_replayed_identically(guards, ledger):
    """The tool's exception becomes an error message; a re-emitted call gets the same text."""

    def charge_card(customer: str, amount_cents: int) -> str:
        ledger.append(customer)
        raise CardDeclined("insufficient funds")

    guard = guards()
    contents = []
    for call_id in ("call_1", "call_2"):
        message = completion(chat_call(call_id, ARGS)).choices[0].message
        (result,) = run_tool_calls(message, {"charge_card": charge_card}, guard=guard, scope=ORDER)
        contents.append(result["content"])
    assert ledger.count() == 1
    assert contents == ["Error: CardDeclined: insufficient funds"] * 2


def test_chat_volatile_argument_is_excluded_on_request(guards, ledger):
    """An excluded argument (a timestamp) does not make a re-emitted call a new request."""

    def charge_card(customer: str, amount_cents: int, requested_at: str) -> str:
        ledger.append(requested_at)
        return "ok"

    guard = guards()
    tools = {"charge_card": charge_card}
    for i, stamp in enumerate(("10:00:01", "10:00:07")):
        message = completion(chat_call(f"c{i}", {**ARGS, "requested_at": stamp})).choices[0]
        run_tool_calls(
            message.message,
            tools,
            guard=guard,
            scope=ORDER,
            exclude={"charge_card": ["requested_at"]},
        )
    assert ledger.count() == 1
    message = completion(chat_call("c9", {**ARGS, "requested_at": "10:00:09"})).choices[0].message
    run_tool_calls(message, tools, guard=guard, scope=ORDER)
    assert ledger.count() == 2


def test_chat_volatile_argument_inside_kwargs_is_excluded_on_request(guards, ledger):
    """A tool taking ``**extra``: the volatile name the model passes lands in that dict, and
    excluding it for that tool leaves it out of the request id and the fingerprint, so the
    re-emitted call with a new timestamp replays. The tool still gets the argument, and the
    stored payload keeps it."""

    def charge_card(customer: str, amount_cents: int, **extra: Any) -> str:
        ledger.append(extra["requested_at"])
        return f"charged at {extra['requested_at']}"

    guard = guards()
    tools = {"charge_card": charge_card}
    contents = []
    for i, stamp in enumerate(("10:00:01", "10:00:07")):
        message = completion(chat_call(f"c{i}", {**ARGS, "requested_at": stamp})).choices[0]
        sent = run_tool_calls(
            message.message,
            tools,
            guard=guard,
            scope=ORDER,
            exclude={"charge_card": ["requested_at"]},
        )
        contents.append(sent[0]["content"])
    assert ledger.rows() == [("10:00:01", None)]
    assert contents == ["charged at 10:00:01"] * 2
    (record,), _ = guard.store.records()
    assert json.loads(record.payload_json) == {**ARGS, "requested_at": "10:00:01", "extra": {}}


def test_chat_exclude_names_for_kwargs_are_given_per_tool(guards, ledger):
    """A name for every tool must be a named argument of some tool: a ``**kwargs`` tool
    must not vouch for a misspelt name of another tool (which would stay in that tool's
    request id, so every retry charges again); a name meant for the ``**kwargs`` goes in
    the per-tool form."""

    def charge_card(customer: str, amount_cents: int, requested_at: str = "") -> str:
        ledger.append(requested_at)
        return "ok"

    def log_event(**fields: Any) -> str:
        return "logged"

    message = completion(chat_call("c1", {**ARGS, "requested_at": "10:00:01"})).choices[0]
    tools = {"charge_card": charge_card, "log_event": log_event}
    with pytest.raises(ConfigurationError, match=r"\['requsted_at'\].*exclude=\{'log_event'"):
        run_tool_calls(message.message, tools, guard=guards(), scope=ORDER, exclude=["requsted_at"])
    with pytest.raises(ConfigurationError, match="name them for that tool"):
        run_tool_calls(
            message.message,
            {"log_event": log_event},
            guard=guards(),
            scope=ORDER,
            exclude=["ts"],
        )
    assert ledger.count() == 0
    run_tool_calls(  # the named argument of one tool is fine for every tool
        message.message, tools, guard=guards(), scope=ORDER, exclude=["requested_at"]
    )
    run_tool_calls(
        message.message,
        {"log_event": log_event},
        guard=guards(),
        scope=ORDER,
        exclude={"log_event": ["ts"]},
    )
    assert ledger.count() == 1
    with pytest.raises(ConfigurationError, match="the \\*\\*kwargs parameter"):
        run_tool_calls(  # the whole **kwargs dict out of the request id: two calls as one
            message.message,
            {"log_event": log_event},
            guard=guards(),
            scope=ORDER,
            exclude={"log_event": ["fields"]},
        )


def test_chat_result_that_cannot_be_dumped_is_a_success_never_a_failure(guards, ledger):
    """The tool charged, then returned a pydantic model whose dump raises (``bytes`` that
    are not UTF-8). The dump is not the tool failing: the record is SUCCEEDED without a
    stored result and the caller gets ResultNotSerializableError, as from the core guard;
    never FAILED, a status an operator may re-run."""
    pydantic = pytest.importorskip("pydantic")

    class Charge(pydantic.BaseModel):
        charge_id: str
        raw: bytes

    def charge_card(customer: str, amount_cents: int) -> Any:
        ledger.append(customer)
        return Charge(charge_id="ch_1", raw=b"\xff\xfe")

    guard = guards()
    message = completion(chat_call("c1", ARGS)).choices[0].message
    for _ in range(2):
        with pytest.raises(ResultNotSerializableError):
            run_tool_calls(message, {"charge_card": charge_card}, guard=guard, scope=ORDER)
    (record,), _ = guard.store.records()
    assert record.status is Status.SUCCEEDED
    assert record.error is not None
    assert record.error.type == "safeagent.ResultNotSerializable"
    assert guard.in_doubt() == []
    assert ledger.count() == 1


def test_chat_bad_tool_call_id_is_refused_for_that_call_only(charge_card, guards, ledger):
    """Keyed on tool-call ids, an id that cannot be a request id (empty, too long, the
    reserved ``case:`` prefix) refuses that call, before anything runs for it, and the
    caller still gets every other call's output."""
    calls = [
        chat_call("call_ok", ARGS),
        chat_call("", {**ARGS, "customer": "cus_2"}),
        chat_call("x" * 256, {**ARGS, "customer": "cus_3"}),
        chat_call("case:1", {**ARGS, "customer": "cus_4"}),
    ]
    message = completion(*calls).choices[0].message
    with pytest.warns(TransportIdWarning):
        sent = run_tool_calls(
            message, {"charge_card": charge_card}, guard=guards(), scope=ORDER, key="tool_call_id"
        )
    assert [m["tool_call_id"] for m in sent] == ["call_ok", "", "x" * 256, "case:1"]
    assert json.loads(sent[0]["content"])["charge_id"] == "ch_1"
    assert [m["content"].split(":")[:2] for m in sent[1:]] == [["Error", " InvalidToolCallId"]] * 3
    assert ledger.count() == 1


def test_chat_unknown_tool_and_bad_arguments_run_nothing(charge_card, guards, ledger):
    """Unknown tools and unfit arguments are shown to the model; nothing runs or is stored."""
    guard = guards()
    message = (
        completion(
            chat_call("call_1", ARGS, name="refund"),
            chat_call("call_2", "{not json"),
            chat_call("call_3", {"customer": "cus_1"}),
            chat_call("call_4", '{"customer": "cus_1", "amount_cents": NaN}'),
        )
        .choices[0]
        .message
    )
    results = run_tool_calls(message, {"charge_card": charge_card}, guard=guard, scope=ORDER)
    assert [r["content"].split(":")[1].strip() for r in results] == [
        "UnknownTool",
        "InvalidArguments",
        "InvalidArguments",
        "InvalidArguments",
    ]
    assert "missing a required argument: 'amount_cents'" in results[2]["content"]
    assert ledger.count() == 0
    assert guard.audit_trail() == []


def test_chat_replay_marker_marks_replays_only(charge_card, guards):
    """With a replay marker, replays are prefixed with it and first runs are not."""
    guard = guards()
    message = completion(chat_call("a", ARGS), chat_call("b", ARGS)).choices[0].message
    first, second = run_tool_calls(
        message,
        {"charge_card": charge_card},
        guard=guard,
        scope=ORDER,
        replay_marker=REPLAY_MARKER,
    )
    assert second["content"] == REPLAY_MARKER + first["content"]
    assert not first["content"].startswith(REPLAY_MARKER)


def test_chat_not_executed_lets_the_next_call_run(guards, ledger):
    """A tool that raises NotExecuted is shown the error, and a re-emitted call runs again."""
    outcomes = iter([NotExecuted("provider unreachable, nothing sent"), None])

    def charge_card(customer: str, amount_cents: int) -> str:
        error = next(outcomes)
        if error is not None:
            raise error
        ledger.append(customer)
        return "charged"

    guard = guards()
    contents = []
    for call_id in ("call_1", "call_2", "call_3"):
        message = completion(chat_call(call_id, ARGS)).choices[0].message
        (result,) = run_tool_calls(message, {"charge_card": charge_card}, guard=guard, scope=ORDER)
        contents.append(result["content"])
    assert contents == [
        "Error: NotExecuted: provider unreachable, nothing sent",
        "charged",
        "charged",
    ]
    assert ledger.count() == 1


def test_chat_in_doubt_propagates_instead_of_telling_the_model(db, ledger):
    """A tool exception that leaves the record in doubt propagates; so does the next call."""

    def charge_card(customer: str, amount_cents: int) -> str:
        ledger.append(customer)
        raise TimeoutError("provider did not answer")

    guard = Guard(db, outcome_unknown=(TimeoutError,))
    try:
        with pytest.raises(TimeoutError):
            run_tool_calls(
                completion(chat_call("call_1", ARGS)).choices[0].message,
                {"charge_card": charge_card},
                guard=guard,
                scope=ORDER,
            )
        with pytest.raises(OutcomeUnknownError):
            run_tool_calls(
                completion(chat_call("call_2", ARGS)).choices[0].message,
                {"charge_card": charge_card},
                guard=guard,
                scope=ORDER,
            )
    finally:
        guard.close()
    assert ledger.count() == 1


def test_chat_misuse_is_refused_before_anything_runs(charge_card, guards, db, ledger):
    """A whole completion, empty scope, AsyncGuard, async tool or bad option is refused."""
    message = completion(chat_call("call_1", ARGS)).choices[0].message
    tools = {"charge_card": charge_card}

    async def async_tool(customer: str, amount_cents: int) -> str:
        return "never"

    with pytest.raises(InvalidInputError):
        run_tool_calls(message, tools, guard=guards(), scope="")
    with pytest.raises(TypeError, match=r"choices\[0\]\.message"):
        run_tool_calls(completion(chat_call("call_1", ARGS)), tools, guard=guards(), scope=ORDER)
    for not_a_list in (True, 5, "call_1"):
        bad = {"role": "assistant", "tool_calls": not_a_list}
        with pytest.raises(TypeError, match="tool_calls is a list of tool calls"):
            run_tool_calls(bad, tools, guard=guards(), scope=ORDER)
    aguard = AsyncGuard(db)
    with pytest.raises(ConfigurationError, match="arun_tool_calls"):
        run_tool_calls(message, tools, guard=aguard, scope=ORDER)  # type: ignore[arg-type]
    asyncio.run(aguard.aclose())
    with pytest.raises(ConfigurationError, match="arun_tool_calls"):
        run_tool_calls(message, {"charge_card": async_tool}, guard=guards(), scope=ORDER)
    with pytest.raises(ConfigurationError, match="exclude"):
        run_tool_calls(message, tools, guard=guards(), scope=ORDER, exclude="currency")
    with pytest.raises(ConfigurationError, match=r"no tool \(charge_card\) takes"):
        run_tool_calls(message, tools, guard=guards(), scope=ORDER, exclude=["requested_at"])
    with pytest.raises(ConfigurationError, match="not in tools"):
        run_tool_calls(message, tools, guard=guards(), scope=ORDER, exclude={"refund": ["x"]})
    with pytest.raises(ConfigurationError, match="key"):
        run_tool_calls(message, tools, guard=guards(), scope=ORDER, key="id")  # type: ignore[arg-type]
    assert ledger.count() == 0


def test_chat_a_guarded_function_as_a_tool_is_refused(charge_card, guards, ledger):
    """A function decorated with ``guard.guarded`` (or a method of one) is already guarded:
    run_tool_calls refuses it before anything runs or is recorded."""
    guard = guards()
    message = completion(chat_call("call_1", ARGS)).choices[0].message
    keyed = guard.guarded(action="charge_card", key_arg="customer")(charge_card)

    class Till:
        @guard.guarded(action="charge_card", key_arg="customer")
        def charge(self, customer: str, amount_cents: int) -> str:
            return "never"

    for tool in (keyed, Till().charge, Till.charge):
        with pytest.raises(ConfigurationError, match="'charge_card' is already guarded"):
            run_tool_calls(message, {"charge_card": tool}, guard=guard, scope=ORDER)
    assert ledger.count() == 0
    assert guard.store.records()[0] == []


def test_chat_async_twin_retried_run_charges_once(db, ledger):
    """arun_tool_calls with an AsyncGuard and an async tool: three attempts, one charge."""

    async def charge_card(customer: str, amount_cents: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"charge_id": f"ch_{ledger.append(customer)}"}

    async def main() -> list[str]:
        contents = []
        for attempt in (1, 2, 3):
            guard = AsyncGuard(db)
            message = completion(chat_call(f"call_{attempt}", ARGS)).choices[0].message
            (result,) = await arun_tool_calls(
                message, {"charge_card": charge_card}, guard=guard, scope=ORDER
            )
            contents.append(result["content"])
            await guard.aclose()
        return contents

    contents = asyncio.run(main())
    assert ledger.count() == 1
    assert contents == [contents[0]] * 3


# -- Responses API ---------------------------------------------------------------------------


def function_call(call_id: str, arguments: dict[str, Any]) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        type="function_call",
        id=f"fc_{call_id}",
        call_id=call_id,
        name="charge_card",
        arguments=json.dumps(arguments),
        status="completed",
    )


def response(*output: Any) -> Response:
    return Response(
        id="resp_scripted",
        object="response",
        created_at=0,
        model="scripted",
        output=list(output),
        parallel_tool_calls=True,
        tool_choice="auto",
        tools=[],
    )


def answer(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id="msg_1",
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


def responses_run(
    script: list[Any], tools: dict[str, Any], guard: Guard, sent: list[Any], **options: Any
) -> str:
    """The Responses tool loop; the function_call_output items sent back go to ``sent``."""
    for step in script:
        if isinstance(step, BaseException):
            raise step
        if not any(item.type == "function_call" for item in step.output):
            return str(step.output_text)
        sent += run_function_calls(step, tools, guard=guard, scope=ORDER, **options)
    raise AssertionError("the script ended without an answer")


def retried_responses(tools: dict[str, Any], guards: Any, **options: Any) -> list[list[Any]]:
    """Three attempts of one run, each in a fresh worker; the outputs each one sent."""
    per_attempt = []
    for attempt in (1, 2, 3):
        script: list[Any] = [response(function_call(f"call_{attempt}", ARGS))]
        script.append(TimeoutError("timed out") if attempt < 3 else response(answer("Done.")))
        sent: list[Any] = []
        try:
            assert responses_run(script, tools, guards(), sent, **options) == "Done."
        except TimeoutError:
            assert attempt < 3
        per_attempt.append(sent)
    return per_attempt


def test_responses_run_retried_three_times_charges_once(charge_card, guards, ledger):
    """Re-emitted function_call items with new call_ids charge once; all attempts agree."""
    attempts = retried_responses({"charge_card": charge_card}, guards)
    assert ledger.count() == 1
    outputs = [sent[0]["output"] for sent in attempts]
    assert outputs == [outputs[0]] * 3
    assert [sent[0]["call_id"] for sent in attempts] == ["call_1", "call_2", "call_3"]
    assert all(sent[0]["type"] == "function_call_output" for sent in attempts)


def test_responses_keyed_on_call_ids_charges_every_attempt(charge_card, guards, ledger):
    """Negative control: keyed on call_ids, the same script charges three times."""
    with pytest.warns(TransportIdWarning):
        retried_responses({"charge_card": charge_card}, guards, key="tool_call_id")
    assert ledger.count() == 3


def test_responses_equivalent_items_run_once_and_others_separately(charge_card, guards, ledger):
    """Three equivalent function_call items run once; one with other arguments runs too."""
    reply = response(
        answer("Charging now."),
        function_call("a", {"customer": "cus_1", "amount_cents": 1999}),
        function_call("b", {"amount_cents": 1999, "customer": "cus_1"}),
        function_call("c", {"currency": "usd", "amount_cents": 1999, "customer": "cus_1"}),
        function_call("d", {"customer": "cus_1", "amount_cents": 5}),
    )
    outputs = run_function_calls(reply, {"charge_card": charge_card}, guard=guards(), scope=ORDER)
    assert [o["call_id"] for o in outputs] == ["a", "b", "c", "d"]
    assert len({o["output"] for o in outputs[:3]}) == 1
    assert outputs[3]["output"] != outputs[0]["output"]
    assert ledger.count() == 2


def test_responses_async_twin_takes_output_items(db, charge_card, ledger):
    """arun_function_calls reads a list of output items (dicts too) with an AsyncGuard."""

    async def main() -> list[Any]:
        guard = AsyncGuard(db)
        try:
            first = await arun_function_calls(
                [function_call("a", ARGS)], {"charge_card": charge_card}, guard=guard, scope=ORDER
            )
            second = await arun_function_calls(
                [function_call("b", ARGS).model_dump()],
                {"charge_card": charge_card},
                guard=guard,
                scope=ORDER,
            )
        finally:
            await guard.aclose()
        return [first[0], second[0]]

    first, second = asyncio.run(main())
    assert ledger.count() == 1
    assert (first["call_id"], second["call_id"]) == ("a", "b")
    assert first["output"] == second["output"]


def test_responses_namespaced_call_runs_the_qualified_tool_and_echoes_caller(guards, ledger):
    """A namespaced call runs "<namespace>.<name>"; a program caller is echoed back."""

    def charge_card(customer: str, amount_cents: int) -> str:
        ledger.append(customer)
        return "charged"

    item = ResponseFunctionToolCall.model_validate(
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "charge_card",
            "namespace": "billing",
            "arguments": json.dumps(ARGS),
            "caller": {"type": "program", "caller_id": "prog_1"},
        }
    )
    (output,) = run_function_calls(
        [item], {"billing.charge_card": charge_card}, guard=guards(), scope=ORDER
    )
    assert output == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": "charged",
        "caller": {"type": "program", "caller_id": "prog_1"},
    }
    assert ledger.count() == 1


def test_chat_custom_tool_call_is_refused_and_runs_nothing(charge_card, guards, ledger):
    """A custom (free-text) tool call gets an error reply; nothing runs or is recorded."""
    message = {
        "role": "assistant",
        "tool_calls": [
            {"id": "call_1", "type": "custom", "custom": {"name": "charge_card", "input": "x"}}
        ],
    }
    guard = guards()
    (result,) = run_tool_calls(message, {"charge_card": charge_card}, guard=guard, scope=ORDER)
    assert result["tool_call_id"] == "call_1"
    assert result["content"].startswith("Error: UnsupportedToolCall:")
    assert ledger.count() == 0
    assert guard.audit_trail() == []


# -- arguments and tools that are refused up front, or run --------------------------------


def nested(depth: int) -> str:
    """JSON text of a call's arguments whose ``payload`` nests ``depth`` arrays."""
    return '{"to": "bob", "payload": ' + "[" * depth + "]" * depth + "}"


def test_chat_deeply_nested_arguments_are_refused_for_that_call_only(guards, ledger):
    """Arguments nested too deep, whether json.loads gives up (RecursionError on some
    Python versions) or parses them: the same InvalidArguments answer for that call, on
    every version; the calls before and after it run."""

    def notify(to: str, payload: Any = None) -> str:
        ledger.append(to)
        return "sent"

    answers = set()
    for depth in (99, 150, 5_000, 200_000):
        message = (
            completion(
                chat_call(f"a{depth}", {"to": f"ann{depth}"}, "notify"),
                chat_call(f"b{depth}", nested(depth), "notify"),
                chat_call(f"c{depth}", {"to": f"cy{depth}"}, "notify"),
            )
            .choices[0]
            .message
        )
        results = run_tool_calls(message, {"notify": notify}, guard=guards(), scope=ORDER)
        assert [r["tool_call_id"] for r in results] == [f"a{depth}", f"b{depth}", f"c{depth}"]
        assert results[0]["content"] == results[2]["content"] == "sent"
        answers.add(results[1]["content"])
    assert answers == {"Error: InvalidArguments: arguments nest deeper than 99 levels"}
    assert len([key for key, _ in ledger.rows() if key.startswith(("ann", "cy"))]) == 8
    assert ledger.count() == 8  # bob never notified
    ok = completion(chat_call("d", nested(97), "notify")).choices[0].message
    assert run_tool_calls(ok, {"notify": notify}, guard=guards(), scope=ORDER)[0]["content"] == (
        "sent"
    )


class Currency(enum.Enum):
    """A plain Enum: its members are no JSON values."""

    USD = "usd"
    EUR = "eur"


class Speed(str, enum.Enum):
    """A str Enum."""

    STANDARD = "standard"
    EXPRESS = "express"


def test_chat_enum_decimal_and_set_defaults_just_work(guards, ledger):
    """A tool whose defaults are an Enum member, a Decimal or a frozenset runs (it gets the
    defaults themselves); a call that spells a default out is the same request."""
    seen: list[tuple[Any, ...]] = []

    def charge(
        customer: str,
        currency: Currency = Currency.USD,
        speed: Speed = Speed.STANDARD,
        fee: Decimal = Decimal("0.50"),
        tags: frozenset[str] = frozenset({"web", "api", "card", "eu", "retry"}),
    ) -> str:
        seen.append((currency, speed, fee, tags))
        return f"charged {ledger.append(customer)}"

    spelt_out = {
        "customer": "cus_1",
        "currency": "usd",
        "speed": "standard",
        "fee": "0.5",
        "tags": ["api", "card", "eu", "retry", "web"],
    }
    message = (
        completion(
            chat_call("a", {"customer": "cus_1"}),
            chat_call("b", spelt_out),
            chat_call("c", {"customer": "cus_1", "currency": "eur"}),
        )
        .choices[0]
        .message
    )
    results = run_tool_calls(message, {"charge_card": charge}, guard=guards(), scope=ORDER)
    assert [r["content"] for r in results] == ["charged 1", "charged 1", "charged 2"]
    assert seen[0] == (Currency.USD, Speed.STANDARD, Decimal("0.50"), charge.__defaults__[-1])
    assert seen[1][0] == "eur"
    assert ledger.count() == 2


def test_chat_defaults_without_a_json_form_are_left_out_of_the_request_id(guards, ledger):
    """A default with no JSON form (a sentinel meaning "not given", NaN, a huge int) is left
    out of the request id, as LangChain's integration leaves it: the tool runs (it was
    refused with InvalidArguments on every call), a re-emitted call replays, and a call
    that gives the argument is another request."""
    missing = object()
    seen: list[Any] = []

    def remind(
        customer: str,
        note: object = missing,
        rate: float = float("nan"),
        fee: Decimal = Decimal("NaN"),
        limit: int = 2**60,
    ) -> str:
        seen.append((note is missing, rate != rate, fee.is_nan(), limit))
        return f"reminded {ledger.append(customer)}"

    message = (
        completion(
            chat_call("a", {"customer": "cus_1"}, "remind"),
            chat_call("b", {"customer": "cus_1"}, "remind"),
            chat_call("c", {"customer": "cus_1", "note": "late"}, "remind"),
            chat_call("d", {"customer": "cus_1", "limit": 5}, "remind"),
        )
        .choices[0]
        .message
    )
    results = run_tool_calls(message, {"remind": remind}, guard=guards(), scope=ORDER)
    assert [r["content"] for r in results] == [
        "reminded 1",
        "reminded 1",
        "reminded 2",
        "reminded 3",
    ]
    assert seen[0] == (True, True, True, 2**60)
    assert ledger.count() == 3


def test_bad_scope_tool_name_and_namespace_are_refused_up_front(charge_card, guards, ledger):
    """A scope or namespace with NUL or a lone surrogate, and a tool name that cannot be
    an action, are the caller's error before anything runs (not every call's answer)."""
    message = completion(chat_call("a", ARGS)).choices[0].message
    for scope in ("order-\x00-42", "order-\ud800"):
        with pytest.raises(InvalidInputError, match="scope"):
            run_tool_calls(message, {"charge_card": charge_card}, guard=guards(), scope=scope)
    for namespace in ("", "t\x00", "t" * 256):
        with pytest.raises(InvalidInputError, match="namespace"):
            run_tool_calls(
                message,
                {"charge_card": charge_card},
                guard=guards(),
                scope=ORDER,
                namespace=namespace,
            )
    for name in ("x" * 256, "bad\x00name", ""):
        long_call = completion(chat_call("a", ARGS, name)).choices[0].message
        with pytest.raises(ConfigurationError, match="tool name"):
            run_tool_calls(long_call, {name: charge_card}, guard=guards(), scope=ORDER)
    assert ledger.count() == 0


def test_generator_tools_are_refused_up_front(guards, db, ledger):
    """Generator and async generator function tools (calling one runs none of its body) are
    refused by every function, sync and async, before anything runs or is recorded."""

    def charge(customer: str) -> Any:
        ledger.append(customer)
        yield "charged"

    async def acharge(customer: str) -> Any:
        ledger.append(customer)
        yield "charged"

    class Charger:
        def __call__(self, customer: str) -> Any:
            ledger.append(customer)
            yield "charged"

    message = completion(chat_call("a", {"customer": "cus_1"})).choices[0].message
    items = [function_call("a", {"customer": "cus_1"})]
    guard = guards()
    for tool in (charge, acharge, Charger()):
        tools = {"charge_card": tool}
        with pytest.raises(ConfigurationError, match="generator function"):
            run_tool_calls(message, tools, guard=guard, scope=ORDER)
        with pytest.raises(ConfigurationError, match="generator function"):
            run_function_calls(items, tools, guard=guard, scope=ORDER)

        async def run_async(tools: dict[str, Any] = tools) -> None:
            aguard = AsyncGuard(db)
            try:
                with pytest.raises(ConfigurationError, match="generator function"):
                    await arun_tool_calls(message, tools, guard=aguard, scope=ORDER)
                with pytest.raises(ConfigurationError, match="generator function"):
                    await arun_function_calls(items, tools, guard=aguard, scope=ORDER)
            finally:
                await aguard.aclose()

        asyncio.run(run_async())
    assert ledger.count() == 0
    assert guard.store.records()[0] == []


@pytest.mark.slow
def test_example_runs_offline_and_charges_once_on_every_run(tmp_path):
    """examples/openai_tool_calls.py runs offline: one charge per API (derived ids), every run."""
    for _ in range(2):
        result = run_example("openai_tool_calls.py", tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.rstrip().endswith("RESULT: ok")
    assert (tmp_path / "safeagent.db").exists()
