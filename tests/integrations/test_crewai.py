"""CrewAI tools through the guard, with the real ``crewai`` package and its own retries.

The agent's model is a scripted ``crewai.llms.base_llm.BaseLLM`` (CrewAI's documented way
to plug in a custom model) that answers in CrewAI's ReAct text format; no network, no
telemetry. Side effects are counted in the effect ledger (``tests/conftest.py``), a SQLite
file separate from the guard's database.
"""

from __future__ import annotations

import enum
import os

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")  # before crewai is imported
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

import asyncio
import functools
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integrations import require

with warnings.catch_warnings():  # as pytest.importorskip does, also under CI=true:
    warnings.simplefilter("ignore", ImportWarning)  # crewai.rag refuses a child attribute
    require("crewai")

from crewai import Agent, Crew, Task
from crewai.llms.base_llm import BaseLLM
from crewai.tools import BaseTool, tool
from pydantic import BaseModel, Field, SecretStr

from safeagent import AsyncGuard, Guard, MemoryStore, NotExecuted, Status, derive_request_id
from safeagent.errors import (
    ConfigurationError,
    InvalidInputError,
    MissingKeyError,
    OutcomeUnknownError,
    ReplayedFailureError,
    ResultNotSerializableError,
)
from safeagent.integrations.crewai import GuardedTool, guard_tool
from tests.conftest import Ledger
from tests.integrations import run_example

# CrewAI warns about its own deprecated fields while building agents; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAIL = {"to": "user@example.test", "template": "welcome"}


@pytest.fixture(autouse=True)
def crewai_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep CrewAI's own files (task outputs) in the test's directory."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CREWAI_STORAGE_DIR", "safeagent-tests")


class Scripted(BaseLLM):
    """A model that answers with ``replies`` in order and records what it was shown."""

    replies: list[str]
    seen: list[str] = Field(default_factory=list)

    def call(self, messages: Any, *args: Any, **kwargs: Any) -> str:
        text = messages if isinstance(messages, str) else json.dumps(messages, default=str)
        self.seen.append(text)
        return self.replies[min(len(self.seen) - 1, len(self.replies) - 1)]

    def supports_function_calling(self) -> bool:
        return False  # CrewAI's text tool calling, with ToolUsage and its retries


def action(tool_name: str, args: dict[str, Any]) -> str:
    return f"Thought: I will use the tool.\nAction: {tool_name}\nAction Input: {json.dumps(args)}"


FINISH = "Thought: I now know the final answer.\nFinal Answer: done"


def kickoff(tools: list[BaseTool], replies: list[str]) -> tuple[Any, Scripted]:
    """Run a one-agent, one-task crew whose model follows ``replies``."""
    llm = Scripted(model="scripted", replies=replies)
    agent = Agent(
        role="Customer mailer",
        goal="Send the customer the right email",
        backstory="Sends transactional emails.",
        llm=llm,
        tools=tools,
        max_iter=4,
        verbose=False,
    )
    task = Task(description="Send the welcome email.", expected_output="status", agent=agent)
    return Crew(agents=[agent], tasks=[task], verbose=False).kickoff(), llm


class SendEmailArgs(BaseModel):
    to: str
    template: str


class SendEmail(BaseTool):
    """P6's ``send_email``: writes the sent-mail row, then the acknowledgement times out."""

    name: str = "send_email"
    description: str = "Send a templated email to a customer."
    args_schema: type[BaseModel] = SendEmailArgs
    ledger: Any = None
    entered: int = 0

    def _run(self, to: str, template: str) -> str:
        self.entered += 1
        self.ledger.append("mail", f"{to}|{template}")
        raise TimeoutError("mail server did not acknowledge")


def test_p6_failing_tool_runs_once_under_crewai_retries(tmp_path: Path, ledger: Ledger) -> None:
    """P6: under CrewAI's retries a failing tool runs once; every retry gets the stored failure."""
    unguarded = SendEmail(ledger=Ledger(tmp_path / "baseline.db"))
    kickoff([unguarded], [action("send_email", MAIL), FINISH])
    assert unguarded.entered > 1  # the default retry path really calls the tool again

    guard = Guard(tmp_path / "guard.db")
    inner = SendEmail(ledger=ledger)
    guarded = guard_tool(inner, guard, scope="run-1")

    result, llm = kickoff([guarded], [action("send_email", MAIL), FINISH])

    assert result.raw == "done"
    assert inner.entered == 1
    assert ledger.count("mail") == 1
    assert "mail server did not acknowledge" in llm.seen[1]
    guard.close()
    reader = Guard(tmp_path / "guard.db")
    kinds = [e.kind.value for e in reader.audit_trail()]
    assert kinds.count("claimed") == 1
    assert kinds.count("failed") == 1
    assert kinds.count("replayed") == unguarded.entered - 1
    [receipt] = [reader.get(e.subject) for e in reader.audit_trail() if e.kind.value == "failed"]
    assert receipt is not None
    assert receipt.error is not None
    assert receipt.error.type == "TimeoutError"
    reader.close()


def test_p6_not_executed_tool_may_run_on_every_attempt(ledger: Ledger) -> None:
    """P6: a tool raising NotExecuted runs on every CrewAI attempt and writes nothing."""
    entered: list[str] = []

    @tool("reserve_slot")
    def reserve_slot(day: str) -> str:
        """Reserve a delivery slot."""
        entered.append(day)
        raise NotExecuted("calendar busy: nothing was reserved")

    guard = Guard(MemoryStore())
    kickoff(
        [guard_tool(reserve_slot, guard, scope="run-1")],
        [action("reserve_slot", {"day": "mon"}), FINISH],
    )

    assert len(entered) > 1
    assert ledger.count() == 0
    kinds = [e.kind.value for e in guard.audit_trail()]
    assert kinds.count("claimed") == kinds.count("released") == len(entered)


def test_succeeding_tool_replayed_when_the_crew_runs_again(tmp_path: Path, ledger: Ledger) -> None:
    """A crew re-run after a restart gets the stored result of a tool that succeeded."""
    inner_runs: list[str] = []

    @tool("send_receipt")
    def send_receipt(to: str, order_id: str) -> dict[str, Any]:
        """Email the customer a receipt for an order."""
        inner_runs.append(order_id)
        return {"message_id": f"M-{ledger.append('mail', order_id)}"}

    outputs = []
    for _ in range(2):
        guard = Guard(tmp_path / "guard.db")
        guarded = guard_tool(send_receipt, guard, scope_arg="order_id")
        args = {"to": "user@example.test", "order_id": "ORD-1"}
        _, llm = kickoff([guarded], [action("send_receipt", args), FINISH])
        outputs.append(llm.seen[1])
        guard.close()

    assert ledger.count("mail") == 1
    assert inner_runs == ["ORD-1"]
    assert all('"message_id": "M-1"' in text or "'message_id': 'M-1'" in text for text in outputs)


@tool("create_ticket")
def create_ticket_tool(order_id: str, title: str, priority: str = "normal") -> str:
    """Open a support ticket for an order."""
    return f"T-{LEDGER[0].append('ticket', order_id)}"


LEDGER: list[Ledger] = []


@pytest.fixture
def ticket_ledger(ledger: Ledger) -> Any:
    """The ledger ``create_ticket_tool`` writes to."""
    LEDGER[:] = [ledger]
    yield ledger
    LEDGER.clear()


def test_guarded_tool_keeps_name_description_and_schema() -> None:
    """The guarded tool has the CrewAI tool's name, description and argument schema."""
    guarded = guard_tool(create_ticket_tool, Guard(MemoryStore()), scope="s")

    assert isinstance(guarded, GuardedTool)
    assert guarded.inner is create_ticket_tool
    assert (guarded.name, guarded.description) == ("create_ticket", create_ticket_tool.description)
    schema = guarded.args_schema.model_json_schema()
    assert schema == create_ticket_tool.args_schema.model_json_schema()


def test_scope_arg_keys_direct_and_structured_calls_alike(ticket_ledger: Ledger) -> None:
    """run() and CrewAI's structured tool share request ids; another scope value runs again."""
    guarded = guard_tool(create_ticket_tool, Guard(MemoryStore()), scope_arg="order_id")

    first = guarded.run(order_id="ORD-1", title="Printer on fire")
    structured = guarded.to_structured_tool()
    again = structured.invoke({"title": "Printer on fire", "order_id": "ORD-1"})
    other = guarded.run(order_id="ORD-2", title="Printer on fire")

    assert again == first != other
    assert ticket_ledger.count("ticket") == 2


def test_empty_scope_argument_is_refused(ticket_ledger: Ledger) -> None:
    """An empty scope argument raises MissingKeyError and runs nothing."""
    guarded = guard_tool(create_ticket_tool, Guard(MemoryStore()), scope_arg="order_id")

    with pytest.raises(MissingKeyError, match="order_id"):
        guarded.run(order_id="", title="x")
    assert ticket_ledger.count() == 0


def test_a_scope_argument_or_callable_must_give_a_str_or_an_int(
    ticket_ledger: Ledger,
) -> None:
    """A value whose ``str()`` may change between two reads of the same scope (an
    object's default repr holds its address) is refused before anything runs."""
    guard = Guard(MemoryStore())
    by_object = guard_tool(create_ticket_tool, guard, scope=lambda args: object())
    with pytest.raises(ConfigurationError, match="scope callable gave object"):
        by_object.run(order_id="ORD-1", title="x")
    by_number = guard_tool(create_ticket_tool, guard, scope=lambda args: 7)
    first = by_number.run(order_id="ORD-1", title="x")
    fixed = guard_tool(create_ticket_tool, guard, scope="7")
    assert fixed.run(order_id="ORD-1", title="x") == first
    assert ticket_ledger.count("ticket") == 1

    class Shop(enum.IntEnum):
        SEVEN = 7

    class Loud(str):
        def __str__(self) -> str:
            return "LOUD"

    # An int subclass by its digits (an IntEnum's str() differs between Python 3.10 and
    # 3.11); a str subclass by its text, not its __str__.
    by_enum = guard_tool(create_ticket_tool, guard, scope=lambda args: Shop.SEVEN)
    assert by_enum.run(order_id="ORD-1", title="x") == first
    by_loud = guard_tool(create_ticket_tool, guard, scope=lambda args: Loud("7"))
    assert by_loud.run(order_id="ORD-1", title="x") == first
    assert ticket_ledger.count("ticket") == 1
    huge = guard_tool(create_ticket_tool, guard, scope=lambda args: 10**5000)
    with pytest.raises(ConfigurationError, match="too long"):
        huge.run(order_id="ORD-1", title="x")


def test_direct_failure_is_raised_once_then_replayed() -> None:
    """A failing tool raises its own exception once, then ReplayedFailureError."""
    entered: list[str] = []

    def failing(order_id: str) -> str:
        entered.append(order_id)
        raise TimeoutError("late ack")

    flaky = guard_tool(tool("flaky")(_doc(failing)), Guard(MemoryStore()), scope="s")

    with pytest.raises(TimeoutError):
        flaky.run(order_id="ORD-1")
    with pytest.raises(ReplayedFailureError, match="late ack"):
        flaky.run(order_id="ORD-1")
    assert entered == ["ORD-1"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one"),
        ({"scope": "s", "scope_arg": "order_id"}, "exactly one"),
        ({"scope_arg": "customer"}, "no argument"),
        ({"scope": "s", "exclude": ["sent_ta"]}, "no arguments"),
    ],
)
def test_bad_scope_settings_are_refused(options: dict[str, Any], message: str) -> None:
    """guard_tool needs one of scope and scope_arg, and real argument names."""
    with pytest.raises(ConfigurationError, match=message):
        guard_tool(create_ticket_tool, Guard(MemoryStore()), **options)


def test_async_guard_and_double_guarding_are_refused() -> None:
    """guard_tool refuses an AsyncGuard (CrewAI runs tools synchronously) and a guarded tool."""
    with pytest.raises(ConfigurationError, match="Guard"):
        guard_tool(create_ticket_tool, AsyncGuard(MemoryStore()), scope="s")  # type: ignore[arg-type]
    guarded = guard_tool(create_ticket_tool, Guard(MemoryStore()), scope="s")
    with pytest.raises(ConfigurationError, match="already guarded"):
        guard_tool(guarded, Guard(MemoryStore()), scope="s")


class PspReceipt(BaseModel):
    """A payment provider's answer with its raw body: non-UTF-8 ``bytes`` cannot be dumped."""

    charge_id: str
    raw: bytes


class ChargeArgs(BaseModel):
    order_id: str
    amount_cents: int


class AsyncCharge(BaseTool):
    """A CrewAI tool with an async body only: ``_run`` refuses, ``_arun`` charges."""

    name: str = "charge"
    description: str = "Charge the order's card."
    args_schema: type[BaseModel] = ChargeArgs
    ledger: Any = None
    delay: float = 0.0
    unstorable: bool = False

    def _run(self, order_id: str, amount_cents: int) -> Any:
        """No sync body."""
        raise NotImplementedError("charge is async-only: use arun")

    async def _arun(self, order_id: str, amount_cents: int) -> Any:
        row = self.ledger.append("charge", order_id)  # the request went out
        await asyncio.sleep(self.delay)  # waiting for the provider's answer
        if self.unstorable:
            return PspReceipt(charge_id=f"ch_{row}", raw=b"\xff\xfe")
        return {"charge_id": f"ch_{row}"}


def test_result_that_cannot_be_stored_is_never_recorded_as_failed(
    tmp_path: Path, ledger: Ledger
) -> None:
    """The tool charged the card and returned a result whose dump fails. The record is
    SUCCEEDED without a result (never FAILED, which an operator may re-run): every CrewAI
    retry, a re-run crew, run() and arun() get ResultNotSerializableError; one charge."""

    @tool("charge_card")
    def charge_card(order_id: str) -> PspReceipt:
        """Charge the order's card."""
        return PspReceipt(charge_id=f"ch_{ledger.append('charge', order_id)}", raw=b"\xff")

    guard = Guard(tmp_path / "guard.db")
    guarded = guard_tool(charge_card, guard, scope_arg="order_id")
    async_charge = guard_tool(AsyncCharge(ledger=ledger, unstorable=True), guard, scope="run-1")

    result, llm = kickoff([guarded], [action("charge_card", {"order_id": "ORD-1"}), FINISH])
    assert result.raw == "done"
    assert "ran, but its result could not be stored" in llm.seen[1]
    with pytest.raises(ResultNotSerializableError):
        guarded.run(order_id="ORD-1")
    with pytest.raises(ResultNotSerializableError):
        asyncio.run(guarded.arun(order_id="ORD-1"))
    for _ in range(2):
        with pytest.raises(ResultNotSerializableError):
            asyncio.run(async_charge.arun(order_id="ORD-2", amount_cents=5))

    assert ledger.rows("charge") == [("charge", "ORD-1"), ("charge", "ORD-2")]
    for request_id in (
        derive_request_id("ORD-1", "charge_card", {"order_id": "ORD-1"}),
        derive_request_id("run-1", "charge", {"order_id": "ORD-2", "amount_cents": 5}),
    ):
        receipt = guard.get(request_id)
        assert receipt is not None
        assert receipt.status is Status.SUCCEEDED
        assert receipt.error is not None
        assert receipt.error.type == "safeagent.ResultNotSerializable"
    guard.close()


@pytest.mark.parametrize("retry", ["run", "arun"])
def test_cancelled_async_body_is_in_doubt(tmp_path: Path, ledger: Ledger, retry: str) -> None:
    """An async tool body cut off when the caller times out and its event loop shuts down
    may have sent its request: the record is IN_DOUBT, and the retry raises
    OutcomeUnknownError without charging again."""
    guard = Guard(tmp_path / "guard.db")
    guarded = guard_tool(AsyncCharge(ledger=ledger, delay=5), guard, scope_arg="order_id")

    async def caller_times_out() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(guarded.arun(order_id="ORD-1", amount_cents=500), 0.3)

    asyncio.run(caller_times_out())  # the loop's shutdown cancels the tool body

    args = {"order_id": "ORD-1", "amount_cents": 500}
    receipt = guard.get(derive_request_id("ORD-1", "charge", args))
    assert receipt is not None
    assert receipt.status is Status.IN_DOUBT
    assert receipt.error is not None
    assert receipt.error.type == "concurrent.futures._base.CancelledError"
    guard.close()

    again = guard_tool(
        AsyncCharge(ledger=ledger), Guard(tmp_path / "guard.db"), scope_arg="order_id"
    )
    with pytest.raises(OutcomeUnknownError, match="in doubt"):
        again.run(**args) if retry == "run" else asyncio.run(again.arun(**args))
    assert ledger.count("charge") == 1


def test_sync_run_of_an_async_only_tool_leaves_no_outcome(ledger: Ledger) -> None:
    """run() on a tool whose _run only raises NotImplementedError runs nothing and stores
    no outcome: ConfigurationError, the claim released; the later arun charges once, and a
    run() after that replays the stored result."""
    guard = Guard(MemoryStore())
    guarded = guard_tool(AsyncCharge(ledger=ledger), guard, scope_arg="order_id")
    args = {"order_id": "ORD-1", "amount_cents": 5}

    with pytest.raises(ConfigurationError, match=r"no sync body.*call it with arun"):
        guarded.run(**args)
    receipt = guard.get(derive_request_id("ORD-1", "charge", args))
    assert receipt is not None
    assert receipt.status is Status.RELEASED

    assert asyncio.run(guarded.arun(**args)) == {"charge_id": "ch_1"}
    assert guarded.run(**args) == {"charge_id": "ch_1"}
    assert ledger.count("charge") == 1


def test_arun_of_a_sync_tool_function_runs_its_body_once(ledger: Ledger) -> None:
    """arun() on a sync ``@tool`` function runs it once in the guard's thread and returns
    its result (crewai's own Tool._arun would run it and then raise NotImplementedError,
    which would be stored as the tool's failure)."""

    @tool("send_receipt")
    def send_receipt(order_id: str) -> str:
        """Email the customer a receipt."""
        return f"M-{ledger.append('mail', order_id)}"

    guarded = guard_tool(send_receipt, Guard(MemoryStore()), scope_arg="order_id")

    assert asyncio.run(guarded.arun(order_id="ORD-1")) == "M-1"
    assert asyncio.run(guarded.arun(order_id="ORD-1")) == "M-1"
    assert guarded.run(order_id="ORD-1") == "M-1"
    assert ledger.count("mail") == 1


class ExecutorCharge(AsyncCharge):
    """AsyncCharge whose body also needs the loop's default executor (as DNS look-ups and
    asyncio.to_thread do)."""

    async def _arun(self, order_id: str, amount_cents: int) -> Any:
        await asyncio.to_thread(lambda: None)
        return await super()._arun(order_id, amount_cents)


def test_async_bodies_that_need_the_executor_do_not_starve_a_sync_guard(ledger: Ledger) -> None:
    """More concurrent arun calls than the loop's default executor has threads, each body
    needing a thread of it: all finish, each charges once. The guard must not wait for the
    bodies from executor threads."""
    guarded = guard_tool(ExecutorCharge(ledger=ledger), Guard(MemoryStore()), scope="s")

    async def main() -> list[Any]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        calls = (guarded.arun(order_id=f"ORD-{n}", amount_cents=5) for n in range(4))
        return list(await asyncio.wait_for(asyncio.gather(*calls), 20))

    results = asyncio.run(main())

    assert sorted(r["charge_id"] for r in results) == ["ch_1", "ch_2", "ch_3", "ch_4"]
    assert ledger.count("charge") == 4


def _doc(fn: Any) -> Any:
    fn.__doc__ = "A tool that fails after sending."
    return fn


def test_example_runs_offline(tmp_path: Path) -> None:
    """examples/crewai_tools.py runs offline and exits 0."""
    result = run_example("crewai_tools.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "guarded tool: emails sent 1" in result.stdout


class EmStyleAsyncCharge(AsyncCharge):
    """The same async-only tool with its stub written as ruff's EM101 asks."""

    def _run(self, order_id: str, amount_cents: int) -> Any:
        msg = f"{self.name} is async-only: use arun"
        raise NotImplementedError(msg)


def _logged(method: Any) -> Any:
    """A decorator that supplies the body: the wrapped method is only a placeholder."""

    @functools.wraps(method)
    def run(self: Any, order_id: str, amount_cents: int) -> Any:
        return {"charge_id": f"ch_{self.ledger.append('charge', order_id)}"}

    return run


class DecoratedCharge(AsyncCharge):
    """A tool whose ``_run`` body comes from its decorator: it is not a stub."""

    @_logged
    def _run(self, order_id: str, amount_cents: int) -> Any:
        raise NotImplementedError


def test_a_stub_in_the_em101_style_is_a_stub_and_a_decorated_one_is_not(ledger: Ledger) -> None:
    """run() of a tool whose _run assigns its message and then raises NotImplementedError
    releases the claim (arun charges later, once); a _run whose decorator supplies the body
    runs, and its result is replayed."""
    args = {"order_id": "ORD-1", "amount_cents": 5}
    guard = Guard(MemoryStore())
    em = guard_tool(EmStyleAsyncCharge(ledger=ledger), guard, scope_arg="order_id")
    with pytest.raises(ConfigurationError, match="no sync body"):
        em.run(**args)
    assert asyncio.run(em.arun(**args)) == {"charge_id": "ch_1"}
    assert em.run(**args) == {"charge_id": "ch_1"}

    decorated = guard_tool(
        DecoratedCharge(ledger=ledger), Guard(MemoryStore()), scope_arg="order_id"
    )
    assert decorated.run(**args) == {"charge_id": "ch_2"}
    assert decorated.run(**args) == {"charge_id": "ch_2"}
    assert ledger.count("charge") == 2


class CardArgs(BaseModel):
    card_token: SecretStr
    amount_cents: int


class SecretCharge(BaseTool):
    name: str = "charge"
    description: str = "Charge a card token."
    args_schema: type[BaseModel] = CardArgs
    ledger: Any = None

    def _run(self, card_token: SecretStr, amount_cents: int) -> Any:
        return f"ch_{self.ledger.append('charge', card_token.get_secret_value())}"


def test_charges_to_two_card_tokens_are_two_requests(ledger: Ledger) -> None:
    """A SecretStr argument counts toward the request id by its secret's SHA-256 (pydantic
    dumps every secret as '**********', which made two cards one request)."""
    store = MemoryStore()
    guarded = guard_tool(SecretCharge(ledger=ledger), Guard(store), scope="run-1")
    firsts = [guarded.run(card_token=t, amount_cents=500) for t in ("tok_ALICE", "tok_BOB")]
    again = [guarded.run(card_token=t, amount_cents=500) for t in ("tok_ALICE", "tok_BOB")]
    assert firsts == again == ["ch_1", "ch_2"]
    assert [detail for _, detail in ledger.rows()] == ["tok_ALICE", "tok_BOB"]
    assert "tok_ALICE" not in " ".join(r.payload_json for r in store.records()[0])


class SendOnceArgs(BaseModel):
    to: str
    template: str = "welcome"


class SendOnce(BaseTool):
    """Sends an email (a ledger row) and returns the row's number."""

    name: str = "send_email"
    description: str = "Send a templated email to a customer."
    args_schema: type[BaseModel] = SendOnceArgs
    ledger: Any = None

    def _run(self, to: str, template: str = "welcome") -> str:
        return f"sent {self.ledger.append('mail', f'{to}|{template}')}"


def test_positional_and_keyword_calls_are_one_request(tmp_path: Path, ledger: Ledger) -> None:
    """``run(x)``, ``run(x, "welcome")`` and ``run(to=x)`` (CrewAI validates only keyword
    arguments) bind to the same names with the schema's defaults: one request id, one
    record, one email; another positional template is another request, and the body gets
    the arguments by keyword."""
    to = "user@example.test"
    with Guard(tmp_path / "guard.db") as guard:
        send = guard_tool(SendOnce(ledger=ledger), guard, scope="run-1")
        results = [
            send.run(to=to),
            send.run(to=to, template="welcome"),
            send.run(to),
            send.run(to, "welcome"),
            send.run(to, template="welcome"),
            asyncio.run(send.arun(to)),
        ]
        other = send.run(to, "reminder")
        expected = derive_request_id("run-1", "send_email", {"to": to, "template": "welcome"})
        receipt = guard.get(expected)
        records = guard.store.records()[0]

    assert results == ["sent 1"] * 6
    assert other == "sent 2"
    assert ledger.rows("mail") == [("mail", f"{to}|welcome"), ("mail", f"{to}|reminder")]
    assert receipt is not None
    assert receipt.status is Status.SUCCEEDED
    assert receipt.payload == {"to": to, "template": "welcome"}
    assert len(records) == 2


def test_positional_call_of_a_tool_function_uses_its_parameter_names(
    ticket_ledger: Ledger,
) -> None:
    """A ``@tool`` function's positional arguments are bound to its parameters: the scope
    argument is found, the default applies, and the keyword form replays."""
    guarded = guard_tool(create_ticket_tool, Guard(MemoryStore()), scope_arg="order_id")

    first = guarded.run("ORD-1", "Printer on fire")
    again = guarded.run(order_id="ORD-1", title="Printer on fire", priority="normal")

    assert first == again == "T-1"
    assert ticket_ledger.count("ticket") == 1


def test_positional_arguments_that_cannot_be_bound_run_nothing(ledger: Ledger) -> None:
    """Too many positional arguments, or a name given twice, raise InvalidInputError; a
    positional value the schema refuses raises CrewAI's own ValueError, as the keyword
    form does. Nothing runs and nothing is recorded."""
    guard = Guard(MemoryStore())
    send = guard_tool(SendOnce(ledger=ledger), guard, scope="run-1")

    with pytest.raises(InvalidInputError, match="3 positional arguments"):
        send.run("a@example.test", "welcome", "extra")
    with pytest.raises(InvalidInputError, match=r"\['to'\] both positionally and by keyword"):
        send.run("a@example.test", to="b@example.test")
    for call in (lambda: send.run(["not", "a", "str"]), lambda: send.run(to=["not", "a", "str"])):
        with pytest.raises(ValueError, match="arguments validation failed"):
            call()
    assert ledger.count() == 0
    assert guard.store.records()[0] == []


class ToOnlyArgs(BaseModel):
    to: str


class SendWithSubject(SendOnce):
    """A body taking more than its schema declares (``template`` is not in it)."""

    args_schema: type[BaseModel] = ToOnlyArgs


def test_a_positional_argument_the_schema_does_not_declare_runs_nothing(ledger: Ledger) -> None:
    """``run(x, "invoice")`` where the schema declares only ``to``: the schema's validation
    would drop ``template`` (the body would send "welcome", and ``run(x, "refund")`` would
    replay it), so InvalidInputError, nothing run or recorded; ``run(x)`` works."""
    guard = Guard(MemoryStore())
    send = guard_tool(SendWithSubject(ledger=ledger), guard, scope="run-1")

    for template in ("invoice", "refund"):
        with pytest.raises(InvalidInputError, match=r"\['template'\], which its schema"):
            send.run("a@example.test", template)
    assert ledger.count() == 0
    assert guard.store.records()[0] == []
    assert send.run("a@example.test") == "sent 1"


def test_a_tool_function_over_a_guarded_function_is_refused(ledger: Ledger) -> None:
    """A ``@tool`` whose function is already guarded (``guard.guarded``) is refused: the
    two guards would share nothing, and the inner one would record a second time."""
    guard = Guard(MemoryStore())

    @guard.guarded(action="notify", key_arg="order_id")
    def notify(order_id: str) -> str:
        """Notify the customer."""
        ledger.append("notify", order_id)
        return "ok"

    with pytest.raises(ConfigurationError, match="'notify' is already guarded"):
        guard_tool(tool("notify")(notify), guard, scope="s")
    assert ledger.count() == 0


def test_generator_tools_are_refused_when_wrapped(ledger: Ledger) -> None:
    """A ``@tool`` over a generator or async generator function, or a subclass whose
    ``_run`` is a generator, is refused: calling it runs none of its body, so the guard
    would record a call whose side effect never happened."""

    def charge(customer: str) -> Any:
        """Charge a card."""
        ledger.append(customer)
        yield "charged"

    async def acharge(customer: str) -> Any:
        """Charge a card."""
        ledger.append(customer)
        yield "charged"

    class GenTool(BaseTool):
        name: str = "charge"
        description: str = "Charge a card."

        def _run(self, customer: str) -> Any:
            ledger.append(customer)
            yield "charged"

    for inner in (tool("charge")(charge), tool("acharge")(acharge), GenTool()):
        with pytest.raises(ConfigurationError, match="generator function"):
            guard_tool(inner, Guard(MemoryStore()), scope="s")
    assert ledger.count() == 0
