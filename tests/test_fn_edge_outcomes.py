"""Edge outcomes of ``fn``, reconcile hooks and the result encoder, through both drivers.

- ``StopIteration`` (PEP 479: it cannot leave a generator or coroutine, nor pass through an
  asyncio future) and ``GeneratorExit`` (thrown past the handlers between a future and its
  task's outermost coroutine) raised by ``fn`` or a hook;
- an exception whose ``__str__`` raises, or whose class cannot name itself;
- a result encoder that raises something other than ``TypeError`` or ``ValueError``.

Each test checks what is stored, what the caller gets, and that a retry does not run
``fn`` again (the effect ledger). The async guard runs under ``asyncio.wait_for``, so a
regression that hangs fails the test instead of stalling the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from safeagent import (
    ActionPolicy,
    AsyncGuard,
    ConfigurationError,
    ExecutionContext,
    Guard,
    OutcomeUnknownError,
    ReconcileRequest,
    Reconciliation,
    ReplayedFailureError,
    ResultNotSerializableError,
    Status,
)
from tests.conftest import Ledger, SyncBridge

TIMEOUT = 10.0
UNSERIALIZABLE = "safeagent.ResultNotSerializable"


def call(guard: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """``guard.<method>(...)``: an :class:`AsyncGuard` under ``asyncio.wait_for``."""
    if isinstance(guard, SyncBridge):
        coro = getattr(guard.aguard, method)(*args, **kwargs)
        return guard._run(asyncio.wait_for(coro, TIMEOUT))
    return getattr(guard, method)(*args, **kwargs)


def raising(ledger: Ledger, exc: BaseException) -> Callable[[ExecutionContext], Any]:
    """A side effect that books a ledger row, then raises ``exc``."""

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id, "then-raised")
        raise exc

    return fn


def returning(ledger: Ledger, value: Any) -> Callable[[ExecutionContext], Any]:
    """A side effect that books a ledger row, then returns ``value``."""

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id, "then-returned")
        return value

    return fn


def stop_iteration_as_raised(guard: Any) -> type[BaseException]:
    """What the caller that ran a fn raising StopIteration gets: the StopIteration from
    the sync guard; from the async one a RuntimeError caused by it (PEP 479: no coroutine
    can raise StopIteration)."""
    return RuntimeError if isinstance(guard, SyncBridge) else StopIteration


def stored(guard: Any, request_id: str) -> tuple[Status, str | None, str | None]:
    """The record's status, stored error type and message."""
    receipt = guard.get(request_id)
    assert receipt is not None
    error = receipt.error
    return receipt.status, error and error.type, error and error.message


def assert_replays_failure(guard: Any, ledger: Ledger, error_type: str, message: str) -> None:
    """A retry replays the stored failure and does not run ``fn``."""
    with pytest.raises(ReplayedFailureError) as replay:
        call(guard, "execute", "r-1", "charge", {}, returning(ledger, "again"))
    assert replay.value.error_type == error_type
    assert replay.value.error_message == message
    assert ledger.count() == 1


def assert_in_doubt(guard: Any, ledger: Ledger) -> None:
    """A retry finds the record in doubt and does not run ``fn``."""
    with pytest.raises(OutcomeUnknownError):
        call(guard, "execute", "r-1", "charge", {}, returning(ledger, "again"))
    assert ledger.count() == 1


@pytest.fixture
def make_guard(store: Any, flavour: str) -> Iterator[Callable[..., Any]]:
    """``make_guard(**guard_kwargs)``: like the ``guard`` fixture, with extra settings."""
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs = {"lease": 30.0, "wait": 0, "owner": "owner-1", **kwargs}
        g = Guard(store, **kwargs) if flavour == "sync" else SyncBridge(AsyncGuard(store, **kwargs))
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()
        if isinstance(g, SyncBridge):
            g.shutdown()


class AckTimeout(Exception):
    """Declared "outcome unknown": leaves the record in doubt for a hook to settle."""


def in_doubt_record(guard: Any, ledger: Ledger) -> None:
    """Make ``r-1`` (action ``charge``) stored IN_DOUBT after one run of ``fn``."""
    with pytest.raises(AckTimeout):
        call(
            guard,
            "execute",
            "r-1",
            "charge",
            {},
            raising(ledger, AckTimeout("no ack")),
            outcome_unknown=[AckTimeout],
        )
    assert stored(guard, "r-1")[0] is Status.IN_DOUBT


# -- StopIteration ----------------------------------------------------------------------------


def test_fn_raising_stop_iteration_is_failed_and_reraised(guard: Any, ledger: Ledger) -> None:
    """StopIteration from a plain fn: FAILED, re-raised (sync: itself; async: as the
    __cause__ of a RuntimeError, since no coroutine can raise it), replayed as a failure."""
    original = StopIteration("exhausted")
    with pytest.raises(stop_iteration_as_raised(guard)) as info:
        call(guard, "execute", "r-1", "charge", {}, raising(ledger, original))
    if isinstance(guard, SyncBridge):
        assert info.value.__cause__ is original
        assert "StopIteration" in str(info.value)
    else:
        assert info.value is original
        assert info.value.__context__ is None  # no carrier left behind
    assert stored(guard, "r-1") == (Status.FAILED, "StopIteration", "exhausted")
    assert_replays_failure(guard, ledger, "StopIteration", "exhausted")


def test_fn_calling_next_on_an_exhausted_iterator_is_failed(guard: Any, ledger: Ledger) -> None:
    """The common way to meet it: ``next()`` on an empty iterator inside fn."""

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id)
        return next(iter([]))

    with pytest.raises(stop_iteration_as_raised(guard)):
        call(guard, "execute", "r-1", "charge", {}, fn)
    assert stored(guard, "r-1") == (Status.FAILED, "StopIteration", "")
    assert_replays_failure(guard, ledger, "StopIteration", "")


def test_stop_iteration_declared_not_executed_releases_the_claim(
    guard: Any, ledger: Ledger
) -> None:
    """The exception policy still applies: declared "not executed", the next call runs."""
    with pytest.raises(stop_iteration_as_raised(guard)):
        call(
            guard,
            "execute",
            "r-1",
            "charge",
            {},
            raising(ledger, StopIteration()),
            not_executed=[StopIteration],
        )
    assert stored(guard, "r-1")[0] is Status.RELEASED
    receipt = call(guard, "execute", "r-1", "charge", {}, returning(ledger, "ok"))
    assert receipt.result == "ok"
    assert ledger.count() == 2


def test_reconcile_hook_raising_stop_iteration_leaves_it_in_doubt(
    make_guard: Callable[..., Any], ledger: Ledger
) -> None:
    """A plain hook raising StopIteration is a hook failure ("unknown"), not a hang."""

    def hook(req: ReconcileRequest) -> Reconciliation:
        return next(iter([]))  # type: ignore[no-any-return]

    guard = make_guard(actions={"charge": ActionPolicy(reconcile=hook)})
    in_doubt_record(guard, ledger)
    with pytest.raises(OutcomeUnknownError, match="reconcile hook raised StopIteration"):
        call(guard, "execute", "r-1", "charge", {}, returning(ledger, "again"))
    assert stored(guard, "r-1")[0] is Status.IN_DOUBT
    report = call(guard, "reconcile")
    assert (report.checked, report.unknown) == (1, 1)
    assert stored(guard, "r-1")[0] is Status.IN_DOUBT
    assert ledger.count() == 1


def test_work_a_sync_fn_waits_for_that_is_cancelled_is_in_doubt(
    sync_guard: Guard, ledger: Ledger
) -> None:
    """A sync ``fn`` that sends the request from a coroutine on another event loop and waits
    for it (``run_coroutine_threadsafe(...).result()``, as the LangChain and CrewAI adapters
    do for async tool bodies): when that loop cancels the coroutine midway, ``result()``
    raises ``concurrent.futures.CancelledError``, an ordinary ``Exception``. The request may
    have been sent, so the record is in doubt, not a stored failure a retry would replay."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sent = threading.Event()

    async def send_then_wait(request_id: str) -> str:
        ledger.append(request_id, "sent")
        sent.set()
        await asyncio.sleep(30)  # the answer never comes: the loop cancels us first
        return "charged"

    def fn(ctx: ExecutionContext) -> Any:
        future = asyncio.run_coroutine_threadsafe(send_then_wait(ctx.request_id), loop)
        assert sent.wait(TIMEOUT)
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        return future.result(TIMEOUT)

    try:
        with pytest.raises(concurrent.futures.CancelledError):
            sync_guard.execute("r-1", "charge", {}, fn)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
    record = sync_guard.get("r-1")
    assert record is not None
    assert record.status is Status.IN_DOUBT
    with pytest.raises(OutcomeUnknownError):
        sync_guard.execute("r-1", "charge", {}, fn)
    assert ledger.count() == 1


# -- GeneratorExit ----------------------------------------------------------------------------


def test_fn_raising_generator_exit_is_in_doubt_and_reraised(guard: Any, ledger: Ledger) -> None:
    """GeneratorExit is not an Exception: IN_DOUBT at once (not PENDING until the lease
    runs out), re-raised; the next call gets OutcomeUnknownError."""
    original = GeneratorExit()
    with pytest.raises(GeneratorExit) as info:
        call(guard, "execute", "r-1", "charge", {}, raising(ledger, original))
    assert info.value is original
    assert stored(guard, "r-1") == (Status.IN_DOUBT, "GeneratorExit", "")
    assert_in_doubt(guard, ledger)


def test_async_fn_awaiting_a_future_that_raises_generator_exit_is_in_doubt(
    store: Any, ledger: Ledger
) -> None:
    """An async fn whose awaited future fails with GeneratorExit: asyncio throws it into
    the task's outermost coroutine, past fn; it is still recorded IN_DOUBT."""
    original = GeneratorExit()

    def blocking() -> None:
        raise original

    async def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id)
        await asyncio.to_thread(blocking)

    guard = SyncBridge(AsyncGuard(store, lease=30.0, wait=0, owner="owner-1"))
    try:
        with pytest.raises(GeneratorExit) as info:
            call(guard, "execute", "r-1", "charge", {}, fn)
        assert info.value is original
        assert stored(guard, "r-1") == (Status.IN_DOUBT, "GeneratorExit", "")
        assert_in_doubt(guard, ledger)
    finally:
        guard.close()
        guard.shutdown()


def test_reconcile_hook_raising_generator_exit_is_audited_and_reraised(
    make_guard: Callable[..., Any], ledger: Ledger
) -> None:
    """A plain hook raising GeneratorExit: "hook interrupted", still in doubt, re-raised."""
    original = GeneratorExit()

    def hook(req: ReconcileRequest) -> Reconciliation:
        raise original

    guard = make_guard(actions={"charge": ActionPolicy(reconcile=hook)})
    in_doubt_record(guard, ledger)
    with pytest.raises(GeneratorExit) as info:
        call(guard, "execute", "r-1", "charge", {}, returning(ledger, "again"))
    assert info.value is original
    assert stored(guard, "r-1")[0] is Status.IN_DOUBT
    notes = [e.detail.get("note") for e in guard.audit_trail("r-1")]
    assert "hook interrupted" in notes
    assert ledger.count() == 1


# -- exceptions that cannot print or name themselves ------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")


class NonStrMessage(Exception):
    def __str__(self) -> Any:
        return 42  # noqa: PLE0307 - the point of the test


class _NamelessModule(type):
    """A metaclass whose classes cannot report their module."""

    @property
    def __module__(cls) -> str:  # type: ignore[override]
        raise AttributeError("no module")


class Nameless(Exception, metaclass=_NamelessModule):
    pass


@pytest.mark.parametrize(
    ("make", "str_error"),
    [
        pytest.param(Unprintable, "RuntimeError", id="str-raises"),
        # __str__ returns a non-str: str() raises TypeError
        pytest.param(NonStrMessage, "TypeError", id="str-not-a-str"),
    ],
)
def test_fn_raising_an_unprintable_exception_is_failed(
    guard: Any, ledger: Ledger, make: type[BaseException], str_error: str
) -> None:
    """``str(exc)`` fails: FAILED with the type name and a placeholder message; the
    caller gets the original exception, not the one from ``__str__``."""
    original = make()
    with pytest.raises(type(original)) as info:
        call(guard, "execute", "r-1", "charge", {}, raising(ledger, original))
    assert info.value is original
    error_type = f"{__name__}.{type(original).__name__}"
    message = f"<unprintable {error_type}: __str__ raised {str_error}>"
    assert stored(guard, "r-1") == (Status.FAILED, error_type, message)
    assert_replays_failure(guard, ledger, error_type, message)


def test_fn_raising_an_exception_whose_class_cannot_name_its_module(
    guard: Any, ledger: Ledger
) -> None:
    """A metaclass breaking ``__module__``: the stored type falls back to the qualname."""
    original = Nameless("declined")
    with pytest.raises(Nameless) as info:
        call(guard, "execute", "r-1", "charge", {}, raising(ledger, original))
    assert info.value is original
    assert stored(guard, "r-1") == (Status.FAILED, "Nameless", "declined")
    assert_replays_failure(guard, ledger, "Nameless", "declined")


def test_reconcile_hook_raising_an_unprintable_exception_leaves_it_in_doubt(
    make_guard: Callable[..., Any], ledger: Ledger
) -> None:
    """The hook's failure note uses the placeholder instead of failing itself."""

    def hook(req: ReconcileRequest) -> Reconciliation:
        raise Unprintable

    guard = make_guard(actions={"charge": ActionPolicy(reconcile=hook)})
    in_doubt_record(guard, ledger)
    with pytest.raises(OutcomeUnknownError, match="unprintable"):
        call(guard, "execute", "r-1", "charge", {}, returning(ledger, "again"))
    assert stored(guard, "r-1")[0] is Status.IN_DOUBT
    assert ledger.count() == 1


# -- result encoders that raise ---------------------------------------------------------------


class NoCopy:
    def __deepcopy__(self, memo: Any) -> Any:  # dataclasses.asdict deep-copies fields
        raise KeyError("no copy for you")


@dataclasses.dataclass
class ChargeResult:
    charge_id: str
    handle: NoCopy


class ClosedModel:
    """A pydantic-like SDK object whose ``model_dump`` fails (a closed lazy session)."""

    def model_dump(self, mode: str = "json") -> Any:
        raise AttributeError("session closed")


def assert_unstorable_success(guard: Any, ledger: Ledger, value: Any, reason: str) -> None:
    """fn ran and returned ``value``: SUCCEEDED without a result, ResultNotSerializableError
    now and on every retry, fn not run again."""
    with pytest.raises(ResultNotSerializableError) as info:
        call(guard, "execute", "r-1", "charge", {}, returning(ledger, value))
    assert info.value.receipt.status is Status.SUCCEEDED
    status, error_type, message = stored(guard, "r-1")
    assert (status, error_type) == (Status.SUCCEEDED, UNSERIALIZABLE)
    assert message is not None
    assert reason in message
    for _ in range(2):
        with pytest.raises(ResultNotSerializableError):
            call(guard, "execute", "r-1", "charge", {}, returning(ledger, "again"))
    assert ledger.count() == 1


def test_result_over_the_size_a_receipt_keeps_is_succeeded_unstorable(
    guard: Any, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result whose JSON is longer than any store keeps (SQLite refuses a value over
    1,000,000,000 bytes) failed the completion's write and left a call that succeeded in
    doubt. Refused before the write now: SUCCEEDED without a result. The bound is lowered
    here so the test does not build half a gigabyte."""
    monkeypatch.setattr("safeagent._flow.MAX_RESULT_BYTES", 1_000)
    assert_unstorable_success(guard, ledger, "x" * 999, "over the 1,000 a receipt keeps")


def test_result_that_overfills_the_record_with_its_payload_is_succeeded_unstorable(
    guard: Any, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's limit is on the whole row, which keeps the payload beside the result: a
    result under the result bound with a large payload still failed the write. Counted
    together (the payload in UTF-8 bytes); bounds lowered so the test stays small."""
    monkeypatch.setattr("safeagent._flow.MAX_RECORD_BYTES", 2_000)
    payload = {"memo": "\u00e9" * 700}  # 1,400 bytes of UTF-8 in 700 characters
    with pytest.raises(ResultNotSerializableError, match="with the payload's"):
        call(guard, "execute", "r-1", "charge", payload, returning(ledger, "x" * 700))
    status, error_type, _ = stored(guard, "r-1")
    assert (status, error_type) == (Status.SUCCEEDED, UNSERIALIZABLE)
    small = call(guard, "execute", "r-2", "charge", payload, returning(ledger, "x" * 100))
    assert small.result == "x" * 100
    assert ledger.count() == 2


def test_result_whose_deepcopy_raises_is_succeeded_unstorable(guard: Any, ledger: Ledger) -> None:
    """``dataclasses.asdict`` raising KeyError: the success is recorded, never in doubt."""
    value = ChargeResult("ch_1", NoCopy())
    assert_unstorable_success(guard, ledger, value, "ChargeResult: KeyError: 'no copy for you'")


def test_result_whose_model_dump_raises_is_succeeded_unstorable(guard: Any, ledger: Ledger) -> None:
    """An SDK object's ``model_dump`` raising AttributeError, nested in a dict."""
    value = {"charge": ClosedModel()}
    assert_unstorable_success(guard, ledger, value, "dict: AttributeError: session closed")


def test_custom_encoder_raising_an_unprintable_exception_is_succeeded_unstorable(
    make_guard: Callable[..., Any], ledger: Ledger
) -> None:
    """Any Exception from a ``result_encoder=`` hook, even one that cannot print itself."""

    def encoder(value: Any) -> Any:
        raise Unprintable

    guard = make_guard(result_encoder=encoder)
    reason = f"object: {__name__}.Unprintable: <unprintable"
    assert_unstorable_success(guard, ledger, object(), reason)


def test_reconcile_happened_with_an_unencodable_result_is_succeeded_unstorable(
    make_guard: Callable[..., Any], ledger: Ledger
) -> None:
    """The same rule for a hook's "happened" result."""

    def hook(req: ReconcileRequest) -> Reconciliation:
        return Reconciliation.happened(ClosedModel())

    guard = make_guard(actions={"charge": ActionPolicy(reconcile=hook)})
    in_doubt_record(guard, ledger)
    with pytest.raises(ResultNotSerializableError):
        call(guard, "execute", "r-1", "charge", {}, returning(ledger, "again"))
    status, error_type, message = stored(guard, "r-1")
    assert (status, error_type) == (Status.SUCCEEDED, UNSERIALIZABLE)
    assert message is not None
    assert "AttributeError: session closed" in message
    assert ledger.count() == 1


def test_encoder_keyboard_interrupt_still_propagates(sync_guard: Guard, ledger: Ledger) -> None:
    """A BaseException from the encoder is not "unstorable": it propagates and the record
    stays PENDING (read as in doubt once its lease expires), as before."""

    class Interrupting:
        def model_dump(self, mode: str = "json") -> Any:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sync_guard.execute("r-1", "charge", {}, returning(ledger, Interrupting()))
    assert stored(sync_guard, "r-1")[0] is Status.PENDING
    assert ledger.count() == 1


# -- fn that cannot take the context -----------------------------------------------------------


class _Charger:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def charge(self) -> str:  # no context parameter
        self.ledger.append("r-1", "ran")
        return "ch_1"

    def __call__(self) -> str:
        return self.charge()


def _wrong_signatures(ledger: Ledger) -> dict[str, Callable[..., Any]]:
    def plain() -> str:
        ledger.append("r-1", "ran")
        return "ch_1"

    async def coroutine() -> str:
        ledger.append("r-1", "ran")
        return "ch_1"

    import functools

    return {
        "function": plain,
        "lambda": lambda: ledger.append("r-1", "ran"),
        "bound method": _Charger(ledger).charge,
        "callable object": _Charger(ledger),
        "partial": functools.partial(lambda a, b: ledger.append("r-1", "ran"), 1, 2),
        "async function": coroutine,
    }


@pytest.mark.parametrize(
    "kind",
    ["function", "lambda", "bound method", "callable object", "partial", "async function"],
)
def test_fn_whose_signature_refuses_the_context_never_ran_and_is_released(
    guard: Any, ledger: Ledger, kind: str
) -> None:
    """Calling fn(context) on a fn that takes no context raises TypeError before any line
    of fn runs: the claim is released (not stored FAILED for ever), the caller gets the
    TypeError, and the corrected call with the same request id runs. (An async function
    called with the context fails the same way under the sync Guard: before it makes a
    coroutine.)"""
    fn = _wrong_signatures(ledger)[kind]
    with pytest.raises(TypeError, match="positional argument"):
        call(guard, "execute", "r-1", "charge", {}, fn)
    assert ledger.count() == 0
    assert stored(guard, "r-1")[0] is Status.RELEASED
    receipt = call(guard, "execute", "r-1", "charge", {}, returning(ledger, "ch_1"))
    assert (receipt.result, receipt.replay, ledger.count()) == ("ch_1", False, 1)


def test_a_type_error_inside_fn_is_still_a_stored_failure(guard: Any, ledger: Ledger) -> None:
    """fn ran (its first line booked a ledger row), then raised TypeError: FAILED."""

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id)
        return len(ctx)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="has no len"):
        call(guard, "execute", "r-1", "charge", {}, fn)
    assert stored(guard, "r-1")[:2] == (Status.FAILED, "TypeError")
    assert_replays_failure(
        guard, ledger, "TypeError", "object of type 'ExecutionContext' has no len()"
    )


def test_a_type_error_from_a_c_callable_stays_a_failure(guard: Any, ledger: Ledger) -> None:
    """A builtin fn raises from no Python frame whether or not it did something first:
    its TypeError is not taken for a signature mismatch."""
    with pytest.raises(TypeError):
        call(guard, "execute", "r-1", "charge", {}, len)
    assert stored(guard, "r-1")[:2] == (Status.FAILED, "TypeError")


# -- fn that returns an awaitable ---------------------------------------------------------------


class _BadAwaitable:
    """An ``__await__`` that returns no iterator (as a mistyped one does): awaiting it
    raises TypeError in the awaiting frame, after fn's body ran."""

    def __await__(self) -> Any:
        return 42


def test_a_type_error_from_awaiting_what_fn_returned_is_not_a_never_started_fn(
    guard: Any, ledger: Ledger
) -> None:
    """fn charged, then returned something that cannot be awaited: the TypeError of the
    await is not the call's own, so the record is FAILED (AsyncGuard awaits it) or in doubt
    (the sync Guard cannot await), and retries never charge again."""

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id, "charged")
        return _BadAwaitable()

    with pytest.raises((TypeError, Exception)):
        call(guard, "execute", "r-1", "charge", {}, fn)
    expected = Status.FAILED if isinstance(guard, SyncBridge) else Status.IN_DOUBT
    assert stored(guard, "r-1")[0] is expected
    for _ in range(2):
        with pytest.raises((ReplayedFailureError, OutcomeUnknownError)):
            call(guard, "execute", "r-1", "charge", {}, fn)
    assert ledger.count() == 1


def test_sync_guard_plain_fn_returning_a_coroutine_is_in_doubt(
    sync_guard: Guard, ledger: Ledger
) -> None:
    """A plain fn ran its own code, then returned a coroutine the sync Guard cannot await:
    the record is in doubt (the charge may have happened), never released to run again."""

    async def notify() -> None:
        ledger.append("r-1", "notified")

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id, "charged")
        return notify()

    with pytest.raises(ConfigurationError, match="in doubt"):
        sync_guard.execute("r-1", "charge", {}, fn)
    assert stored(sync_guard, "r-1")[:2] == (Status.IN_DOUBT, "safeagent.AwaitableReturned")
    for _ in range(2):
        with pytest.raises(OutcomeUnknownError):
            sync_guard.execute("r-1", "charge", {}, fn)
    assert ledger.count() == 1  # charged once, notify never ran


def test_sync_guard_async_fn_called_without_await_is_released(
    sync_guard: Guard, ledger: Ledger
) -> None:
    """An ``async def`` fn under the sync Guard returns its body un-started: nothing ran,
    the claim is released, and the same id runs under a fn the guard can call."""

    async def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id, "charged")

    with pytest.raises(ConfigurationError, match="released"):
        sync_guard.execute("r-1", "charge", {}, fn)
    assert stored(sync_guard, "r-1")[0] is Status.RELEASED
    assert ledger.count() == 0
    assert sync_guard.execute("r-1", "charge", {}, returning(ledger, "ok")).result == "ok"


def test_the_in_doubt_error_says_what_the_attempt_recorded(guard: Any, ledger: Ledger) -> None:
    """fn raised a declared outcome-unknown exception: the retry's error names the stored
    exception (the attempt did record something), not "never recorded an outcome"."""
    with pytest.raises(TimeoutError):
        call(
            guard,
            "execute",
            "r-1",
            "charge",
            {},
            raising(ledger, TimeoutError("read timed out after sending")),
            outcome_unknown=(TimeoutError,),
        )
    with pytest.raises(OutcomeUnknownError) as info:
        call(guard, "execute", "r-1", "charge", {}, returning(ledger, "again"))
    message = str(info.value)
    assert "ended with TimeoutError: read timed out after sending" in message
    assert "may or may not have happened" in message
    assert "never recorded" not in message
    assert ledger.count() == 1


def test_a_proxy_passing_for_an_async_function_is_not_released(
    sync_guard: Guard, ledger: Ledger
) -> None:
    """A class-based decorator that forwards ``__code__`` and friends to an ``async def``
    (so ``inspect.iscoroutinefunction`` says yes) but runs the side effect in its own
    synchronous ``__call__`` before returning the coroutine: its code ran, so the record
    is in doubt, and retries never charge again."""

    async def notify(ctx: ExecutionContext) -> None:
        ledger.append(ctx.request_id, "notified")

    class Charging:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def __call__(self, ctx: ExecutionContext) -> Any:
            ledger.append(ctx.request_id, "charged")
            return self._inner(ctx)

    fn = Charging(notify)
    with pytest.raises(ConfigurationError, match="in doubt"):
        sync_guard.execute("r-1", "charge", {}, fn)
    assert stored(sync_guard, "r-1")[0] is Status.IN_DOUBT
    for _ in range(2):
        with pytest.raises(OutcomeUnknownError):
            sync_guard.execute("r-1", "charge", {}, fn)
    assert ledger.count() == 1
