"""The execution flow, written once for the sync and async drivers.

A flow is a generator: it decides (with :func:`~safeagent._decide.decide`) and *yields*
the I/O it needs as small operation objects; a driver performs each one and sends back
the answer (or throws the store's error into the flow). :class:`~safeagent.Guard`
performs them with blocking calls, :class:`~safeagent.AsyncGuard` with ``await``; neither
holds any rule of its own. This is the "sans-I/O" shape of httpx's auth flows.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import json
import math
import time
import types
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from safeagent._audit import AuditEvent, EventKind, Redactor, new_event
from safeagent._decide import Verdict, classify_exception, decide
from safeagent._keys import downstream_key, new_execution_id, storable_text
from safeagent._policy import ExceptionTypes, ReconcileHook, ReconcileRequest, Reconciliation
from safeagent._receipt import (
    ErrorInfo,
    ExecutionContext,
    LeaseView,
    Receipt,
    Record,
    RunningContext,
    Status,
)
from safeagent.errors import (
    ActionMismatchError,
    ConfigurationError,
    FingerprintMismatchError,
    InProgressError,
    InvalidTransitionError,
    LeaseLostError,
    OutcomeUnknownError,
    ReceiptPurgedError,
    ReplayedFailureError,
    ResultNotSerializableError,
    StoreError,
)
from safeagent.stores._base import (
    ClaimRequest,
    ClaimResult,
    Completion,
    Resolution,
    WriteResult,
)

POLL_START = 0.002
POLL_MAX = 0.1
UNSERIALIZABLE = "safeagent.ResultNotSerializable"
CLAIM_FIRST_MAX_PAYLOAD = 2048
"""On a store that claims before it reads, a call whose canonical payload is longer than
this reads first: a replay would otherwise send the payload again, about three times over
(the record's column, and the claimed event's detail twice: its text and its chain text).
Counted in characters, each non-ASCII one as six (the event escapes it as six ASCII)."""
MAX_RESULT_BYTES = 512 * 1024 * 1024
"""The longest result JSON a record keeps, in bytes (the JSON is ASCII). A longer result is
refused before the write (SUCCEEDED without a result) instead of failing the write and
leaving a call that ran in doubt: SQLite allows 1,000,000,000 bytes in one value and in
one row, PostgreSQL 1 GB in a field."""
MAX_RECORD_BYTES = 900_000_000
"""The most a record's result and payload JSON may hold together, in bytes: SQLite's
1,000,000,000-byte limit is on the whole row, which keeps both (and its other, short,
columns)."""


# -- the operations a flow yields ------------------------------------------------------------
# These, like Call and Settings below, are plain slots dataclasses, built and read once per
# call and never changed: a frozen dataclass sets every field through object.__setattr__,
# which cost about 9% of a first execution's instructions (callgrind) across these objects,
# the store's requests and the Record.


@dataclass(slots=True)
class Get:
    """Read the record: answers ``(Record | None, now_ms)``. ``first``: a call's first
    step (the store's ``look`` on a :class:`ClaimFirstStore`, which counts its answer)."""

    namespace: str
    request_id: str
    first: bool = False


@dataclass(slots=True)
class Claim:
    """Claim atomically: answers a :class:`ClaimResult`. ``new``: only if the request id
    has no record, else answer the record that is there, unchanged (the store's
    ``claim_new``, on a store whose ``claim_first`` is true)."""

    request: ClaimRequest
    new: bool = False


@dataclass(slots=True)
class Complete:
    """Record an outcome (fenced): answers a :class:`WriteResult`."""

    completion: Completion


@dataclass(slots=True)
class TakeOver:
    """Take a new lease on an in-doubt record (token + 1): answers a :class:`WriteResult`."""

    namespace: str
    request_id: str
    expected_token: int
    owner: str
    lease_ms: int


@dataclass(slots=True)
class Emit:
    """Append an audit event (``buffered``: with the next write). Answers ``None``."""

    event: AuditEvent
    buffered: bool


@dataclass(slots=True)
class Wait:
    """Wait up to ``timeout`` seconds, or until the in-process holder of the claim finishes."""

    namespace: str
    request_id: str
    timeout: float


@dataclass(slots=True)
class Run:
    """Run ``fn(context)`` under a heartbeat: answers an :class:`Outcome`, never raises.

    ``started`` is set by the runner as ``fn`` is about to be called: an interrupt that
    ends the call before then leaves a claim whose ``fn`` never ran, which the runner
    releases."""

    fn: Callable[[ExecutionContext], Any]
    context: ExecutionContext
    lease_ms: int
    started: bool = False


@dataclass(slots=True)
class AskHook:
    """Run a reconcile hook under a heartbeat: answers an :class:`Outcome`."""

    hook: ReconcileHook
    request: ReconcileRequest
    lease_ms: int


@dataclass(slots=True)
class Resolve:
    """Apply an operator's resolution (fenced): answers a :class:`WriteResult`."""

    resolution: Resolution


@dataclass(slots=True)
class Outcome:
    """What ``fn`` (or a hook) did: returned ``value``, or raised ``error``; ``unstarted``
    when none of ``fn``'s code ran: ``error`` is the ``TypeError`` of the call itself
    (:func:`never_started`), or ``value`` is its own un-started ``async def`` body
    (:func:`body_unstarted`). Decided where ``fn`` is called, so an error of awaiting
    what it returned never counts."""

    value: Any = None
    error: BaseException | None = None
    unstarted: bool = False

    def unwrap(self) -> Any:
        """``value``, or raise ``error``."""
        if self.error is not None:
            raise self.error
        return self.value


def capture(fn: Callable[..., Any], *args: Any) -> Outcome:
    """Call ``fn(*args)`` and return what it did as an :class:`Outcome`; never raises.

    Whatever ``fn`` raises travels back as a value: a worker thread hands it to the event
    loop through a future, and asyncio can deliver neither ``StopIteration`` through a
    future (the awaiting task never wakes) nor ``GeneratorExit`` to the handler that
    awaits it (it is thrown into the task's outermost coroutine).
    """
    try:
        value = fn(*args)
    except TypeError as exc:
        return Outcome(error=exc, unstarted=never_started(fn, exc))
    except BaseException as exc:  # noqa: BLE001 - the flow classifies it
        return Outcome(error=exc)
    return Outcome(value=value, unstarted=body_unstarted(fn, value))


def _python_function(fn: Any) -> types.FunctionType | None:
    """The Python function ``fn`` calls directly (itself, a bound method's function, the
    function of a ``functools.partial``), or ``None``. Judged by exact types, which a
    proxy that fakes ``__class__`` or forwards ``__code__`` cannot pass for."""
    while type(fn) is functools.partial:
        fn = fn.func
    if type(fn) is types.MethodType:
        fn = fn.__func__
    return fn if type(fn) is types.FunctionType else None


def never_started(fn: Callable[..., Any], exc: BaseException) -> bool:
    """Whether ``exc`` is the ``TypeError`` of calling ``fn`` with arguments its signature
    refuses (``fn`` takes no context, say): raised before any line of ``fn`` ran.

    Told apart by the traceback, caught right where ``fn`` is called (by :func:`capture`
    and the async driver, never around an ``await`` of what ``fn`` returned): it has no
    frame below the one that called ``fn``. Only for ``fn`` written in Python (a function,
    a method, a ``functools.partial`` of one, an object whose class has a Python
    ``__call__``): a C callable raises from no Python frame whether or not it did something
    first, so its ``TypeError`` stays a failure.
    """
    if type(exc) is not TypeError:
        return False
    tb = exc.__traceback__
    if tb is None or tb.tb_next is not None:
        return False
    if _python_function(fn) is not None:
        return True
    if isinstance(fn, type):  # a class: type.__call__ runs __new__, maybe in C
        return False
    return type(inspect.getattr_static(type(fn), "__call__", None)) is types.FunctionType


def body_unstarted(fn: Callable[..., Any], value: Any) -> bool:
    """Whether ``value`` is ``fn``'s own ``async def`` body, not started: the coroutine
    object of exactly that function's code. Only then did nothing run; a plain function,
    or a wrapper, that returns a coroutine has run its own code first."""
    if type(value) is not types.CoroutineType:
        return False
    func = _python_function(fn)
    return (
        func is not None
        and value.cr_code is func.__code__
        and inspect.getcoroutinestate(value) == inspect.CORO_CREATED
    )


class Reraise(BaseException):  # a carrier: never reaches the caller
    """Carries an exception of ``fn`` that a flow cannot raise itself out to its driver.

    A ``StopIteration`` leaving a generator frame becomes ``RuntimeError`` (PEP 479), so
    the flow raises it wrapped and the driver raises ``error`` outside any generator.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def raisable(exc: BaseException) -> BaseException:
    """``exc`` as a flow may raise it: a ``StopIteration`` wrapped in :class:`Reraise`."""
    return Reraise(exc) if isinstance(exc, StopIteration) else exc


Op = Get | Claim | Complete | TakeOver | Emit | Wait | Run | AskHook | Resolve
Flow = Generator[Op, Any, Receipt]


# -- the inputs of a flow --------------------------------------------------------------------


@dataclass(slots=True)
class Call:
    """One validated call: everything the flow needs, computed once."""

    namespace: str
    request_id: str
    action: str
    payload: Any
    payload_json: str
    fingerprint: str
    lease_ms: int
    wait: float
    not_executed: ExceptionTypes
    outcome_unknown: ExceptionTypes
    reconcile: ReconcileHook | None = None
    settle_case: str | None = None


@dataclass(slots=True)
class Settings:
    """The guard-wide settings a flow reads."""

    owner: str
    redact: Redactor
    result_encoder: Callable[[Any], Any]
    claim_first: bool = False
    """The store claims before it reads, for this call (its ``claim_new``, while its
    ``claim_first`` says so): the first step is a claim of a new record, which answers the
    record that is there when it is not new."""


_QUALNAME = type.__dict__["__qualname__"]


def type_name(exc: BaseException) -> str:
    """The qualified name of ``exc``'s type (``module.Qualname``; builtins bare), as a
    failure stores it. Never raises, even for a metaclass that overrides the names."""
    cls = type(exc)
    try:
        module, name = cls.__module__, cls.__qualname__
        if type(module) is str and type(name) is str:
            return name if module == "builtins" else f"{module}.{name}"
    except Exception:  # noqa: BLE001, S110 - fall back to the name the class was built with
        pass
    return str(_QUALNAME.__get__(cls))


def error_message(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder naming the exception when its ``__str__`` raises:
    an exception that cannot print itself must still be recorded."""
    try:
        text = str(exc)
    except Exception as failure:  # noqa: BLE001 - any failure of user code
        return f"<unprintable {type_name(exc)}: __str__ raised {type_name(failure)}>"
    return text if type(text) is str else str.__str__(text)


def value_type_name(value: object) -> str:
    """The name of ``value``'s type, for messages; never raises."""
    try:
        name = type(value).__name__
    except Exception:  # noqa: BLE001 - a metaclass overriding __name__
        name = None
    return name if type(name) is str else str(_QUALNAME.__get__(type(value)))


_encoders: dict[Callable[[Any], Any], Callable[[Any], str]] = {}


def _result_encoder(default: Callable[[Any], Any]) -> Callable[[Any], str]:
    """One ``JSONEncoder`` per ``default`` hook: ``json.dumps`` with options would build a
    new encoder on every call."""
    encode = _encoders.get(default)
    if encode is None:
        encode = json.JSONEncoder(
            default=default, allow_nan=False, ensure_ascii=True, separators=(",", ":")
        ).encode
        if len(_encoders) < 64:
            _encoders[default] = encode
    return encode


def stored_error(error_type: str, message: str) -> ErrorInfo:
    """An :class:`ErrorInfo` whose text can be stored: a lone surrogate or NUL in an
    exception's type name or message, or in a hook's answer, must not stop the outcome
    from being recorded (see :func:`~safeagent._keys.storable_text`). An operator's text
    is refused instead (:func:`~safeagent._keys.check_text`): it can be typed again."""
    return ErrorInfo(storable_text(error_type), storable_text(message))


def encode_result(
    value: Any, encoder: Callable[[Any], Any], beside: str = ""
) -> tuple[str | None, ErrorInfo | None]:
    """JSON text of ``value``, or ``None`` and why it cannot be stored: not JSON, longer
    than :data:`MAX_RESULT_BYTES`, or longer than :data:`MAX_RECORD_BYTES` with ``beside``
    (the payload JSON the record keeps with it).

    Any ``Exception`` from encoding counts as "cannot be stored", not only the
    ``TypeError`` or ``ValueError`` of ``json``: the encoder runs user code (a
    ``model_dump`` or a field's ``__deepcopy__`` under ``dataclasses.asdict``), and ``fn``
    has already run, so its success must be recorded whatever that code raises. A
    ``BaseException`` (``KeyboardInterrupt``) propagates.
    """
    try:
        text = _result_encoder(encoder)(value)
    except Exception as exc:  # noqa: BLE001 - see above
        reason = error_message(exc)
        if not isinstance(exc, (TypeError, ValueError, RecursionError)):  # not json's own
            reason = f"{type_name(exc)}: {reason}"
        return None, stored_error(UNSERIALIZABLE, f"{value_type_name(value)}: {reason}")
    size = len(text)
    if size > MAX_RESULT_BYTES:
        return None, stored_error(
            UNSERIALIZABLE,
            f"{value_type_name(value)}: its JSON is {size:,} bytes, over the "
            f"{MAX_RESULT_BYTES:,} a receipt keeps",
        )
    if size + 4 * len(beside) > MAX_RECORD_BYTES:  # UTF-8 takes at most 4 bytes a character
        payload = len(beside.encode("utf-8", "surrogatepass"))
        if size + payload > MAX_RECORD_BYTES:
            return None, stored_error(
                UNSERIALIZABLE,
                f"{value_type_name(value)}: its JSON is {size:,} bytes, and with the "
                f"payload's {payload:,} over the {MAX_RECORD_BYTES:,} a record keeps",
            )
    return text, None


# -- the flows -------------------------------------------------------------------------------


def execute_flow(call: Call, fn: Callable[[ExecutionContext], Any], s: Settings) -> Flow:
    """Run ``fn`` at most once for ``call`` (the behaviour table of docs/design.md section 2)."""
    request = _first_claim(call, s) if s.claim_first else None
    if request is not None:
        first: ClaimResult = yield Claim(request, new=True)
        if first.won:
            return (yield from run_flow(call, first.record, fn, s))
        record, now = first.record, first.now_ms
    else:
        record, now = yield Get(call.namespace, call.request_id, True)
    deadline: float | None = None
    poll = POLL_START
    while True:
        decision = decide(record, call.action, call.fingerprint, now)
        verdict = decision.verdict
        if verdict is Verdict.CLAIM:
            claim: ClaimResult = yield Claim(claim_request(call, s))
            if claim.won:
                return (yield from run_flow(call, claim.record, fn, s))
            record, now = claim.record, claim.now_ms
            continue
        assert record is not None
        if verdict is Verdict.REPLAY:  # the stored outcome; fn does not run
            yield Emit(
                _event(EventKind.REPLAYED, call, record, now, s, {"status": record.status.value}),
                buffered=True,
            )
            return replay_receipt(call.request_id, record, now)
        if verdict is Verdict.CONFLICT_ACTION or verdict is Verdict.CONFLICT_FINGERPRINT:
            raise (yield from conflict_flow(call, record, now, verdict, s))
        if verdict is Verdict.PURGED:
            raise ReceiptPurgedError(
                f"request {call.request_id!r} ran (status {record.status.value}), but its "
                "receipt was purged by retention; it is not run again",
                receipt=Receipt.from_record(record, replay=True, now_ms=now),
            )
        if verdict is Verdict.IN_DOUBT:
            if call.reconcile is None:
                raise (yield from in_doubt_flow(call, record, now, s))
            receipt = yield from reconcile_flow(call, record, s)
            if receipt is not None:
                return receipt
            # The record was released ("did not happen"), or someone else took it over:
            # read it again and decide afresh.
            record, now = yield Get(call.namespace, call.request_id)
            continue
        # WAIT: a live claim is held by someone else.
        if deadline is None:
            deadline = time.monotonic() + call.wait
        remaining = deadline - time.monotonic()
        retry_after = decision.retry_after_ms / 1000
        if remaining <= 0:
            raise InProgressError(
                f"request {call.request_id!r} is claimed by {record.lease_owner} under a "
                f"live lease: it is running, or its owner died and the lease has not run "
                f"out yet (then it reads as in doubt, never re-run); retry after "
                f"{retry_after:.3f} s",
                request_id=call.request_id,
                namespace=call.namespace,
                retry_after=retry_after,
                receipt=Receipt.from_record(record, replay=False, now_ms=now),
            )
        yield Wait(call.namespace, call.request_id, max(0.0, min(poll, remaining, retry_after)))
        poll = min(poll * 2, POLL_MAX)
        record, now = yield Get(call.namespace, call.request_id)


def _first_claim(call: Call, s: Settings) -> ClaimRequest | None:
    """The claim a call makes before it reads (``s.claim_first``), or None to read first:
    when the payload is over CLAIM_FIRST_MAX_PAYLOAD, or the redact hook raises an
    ``Exception`` on it. Building the claim calls the hook, so on such a store it runs for
    every call, replays included (a hook must be a pure function of the payload); a
    replay does not fail when it fails. A call that does claim after its read builds its
    request again, and a hook failing then fails the call before anything is written, as
    on any store."""
    payload = call.payload_json
    if (len(payload) if payload.isascii() else 6 * len(payload)) > CLAIM_FIRST_MAX_PAYLOAD:
        return None
    try:
        return claim_request(call, s)
    except Exception:  # noqa: BLE001 - the read-first path raises it where it belongs
        return None


def claim_request(call: Call, s: Settings) -> ClaimRequest:
    return ClaimRequest(
        namespace=call.namespace,
        request_id=call.request_id,
        action=call.action,
        fingerprint=call.fingerprint,
        payload_json=call.payload_json,
        execution_id=new_execution_id(),
        owner=s.owner,
        lease_ms=call.lease_ms,
        downstream_key=downstream_key(call.namespace, call.action, call.request_id),
        detail={"payload": s.redact(call.payload), "fingerprint": call.fingerprint},
    )


def run_flow(
    call: Call, record: Record, fn: Callable[[ExecutionContext], Any], s: Settings
) -> Generator[Op, Any, Receipt]:
    """Run ``fn`` under the claim just won and record what it did."""
    # The context fn gets, with the view of its lease the runner's heartbeat keeps.
    context = RunningContext(
        request_id=call.request_id,
        namespace=call.namespace,
        action=call.action,
        payload=call.payload,
        attempt=record.attempt,
        fencing_token=record.fencing_token,
        execution_id=record.execution_id,
        downstream_key=record.downstream_key,
    )
    object.__setattr__(context, "_lease", LeaseView(-math.inf))  # 0 until the runner arms it
    outcome: Outcome = yield Run(fn, context, call.lease_ms)
    if outcome.error is not None:
        exc = outcome.error
        status = classify_exception(exc, call.not_executed, call.outcome_unknown)
        if status is Status.FAILED and outcome.unstarted:
            status = Status.RELEASED  # fn's code never ran: let the fixed call run
        error = stored_error(type_name(exc), error_message(exc))
        written = yield from store_completion(call, record, status, None, error, s, cause=exc)
        if not written.accepted and isinstance(exc, Exception):
            raise lease_lost(call, record, written.record) from exc
        raise raisable(exc)
    value = outcome.value
    if inspect.isawaitable(value):
        # An ``async def`` fn called without await returns its body as an un-started
        # coroutine: it surely did nothing, so close it and release the claim. A plain fn
        # that returned a coroutine has run its own code first, and any other awaitable (a
        # scheduled Task or Future) may be running: both are in doubt.
        if inspect.iscoroutine(value) and (
            inspect.getcoroutinestate(value) == inspect.CORO_CREATED
        ):
            value.close()  # never run now: no "was never awaited" warning
        unstarted = outcome.unstarted  # fn's own async body (body_unstarted)
        yield from store_completion(
            call,
            record,
            Status.RELEASED if unstarted else Status.IN_DOUBT,
            None,
            ErrorInfo("safeagent.AwaitableReturned", "fn returned an awaitable"),
            s,
        )
        raise ConfigurationError(
            "fn returned an awaitable, which the sync Guard cannot await (use AsyncGuard); "
            + (
                "it never started, so the claim was released"
                if unstarted
                else "fn's own code ran or it may be running, so the record is in doubt"
            )
        )
    result_json, unstorable = encode_result(value, s.result_encoder, call.payload_json)
    written = yield from store_completion(
        call, record, Status.SUCCEEDED, result_json, unstorable, s
    )
    if not written.accepted or written.record is None:
        raise lease_lost(call, record, written.record)
    receipt = Receipt.from_record(written.record, replay=False)
    if unstorable is not None:
        raise ResultNotSerializableError(
            f"request {call.request_id!r} ({call.action}) ran, but its result could not be "
            f"stored ({unstorable.message}); "
            "the record is SUCCEEDED without a result and will not run again",
            receipt=receipt,
        )
    return receipt


def store_completion(
    call: Call,
    record: Record,
    status: Status,
    result_json: str | None,
    error: ErrorInfo | None,
    s: Settings,
    *,
    cause: BaseException | None = None,
    event_kind: EventKind | None = None,
    detail: dict[str, Any] | None = None,
) -> Generator[Op, Any, WriteResult]:
    """Record an outcome under ``record``'s fencing token. If the store fails, the record
    stays PENDING (read as in doubt after its lease) and the caller learns why."""
    completion = Completion(
        namespace=call.namespace,
        request_id=call.request_id,
        fencing_token=record.fencing_token,
        status=status,
        result_json=result_json,
        error=error,
        actor=s.owner,
        detail={"error": None if error is None else s.redact(error.to_dict()), **(detail or {})},
        settle_case=call.settle_case,
        event_kind=event_kind,
        action=record.action,
        execution_id=record.execution_id,
    )
    try:
        written: WriteResult = yield Complete(completion)
    except StoreError as exc:
        if cause is not None and not isinstance(cause, Exception):
            raise cause from exc  # never swallow KeyboardInterrupt / SystemExit
        where = (
            # The store's file was removed or replaced (SQLite): the claim is in that file.
            "its claim is in the database file the store opened, which is no longer at its "
            "path: put it back and the record reads as in doubt once its lease expires; a "
            "retry against what is at that path now runs fn again"
            if isinstance(exc.__cause__, OSError)
            else "the record stays PENDING and reads as in doubt once its lease expires"
        )
        raise StoreError(
            f"{call.action} ran, but its outcome could not be recorded ({exc}); {where}",
            request_id=call.request_id,
            namespace=call.namespace,
        ) from (cause or exc)
    return written


def lease_lost(call: Call, record: Record, current: Record | None) -> LeaseLostError:
    return LeaseLostError(
        f"{call.action} ended, but request {call.request_id!r} was resolved by "
        "someone else meanwhile (fencing token no longer current); the completion "
        "was rejected and audited",
        request_id=call.request_id,
        namespace=call.namespace,
        fencing_token=record.fencing_token,
        receipt=None if current is None else Receipt.from_record(current, replay=False),
    )


def _event(
    kind: EventKind, call: Call, record: Record, now: int, s: Settings, detail: dict[str, Any]
) -> AuditEvent:
    return new_event(
        kind,
        now,
        call.namespace,
        call.request_id,
        call.action,
        s.owner,
        record.execution_id,
        record.fencing_token,
        detail,
    )


def replay_receipt(request_id: str, record: Record, now: int) -> Receipt:
    """The stored outcome as the caller gets it: a receipt, or the typed replay error."""
    receipt = Receipt.from_record(record, replay=True, now_ms=now)
    if record.status is Status.FAILED:
        error = record.error or ErrorInfo("unknown", "")
        raise ReplayedFailureError(
            f"request {request_id!r} failed earlier with {error.type}: "
            f"{error.message} (replayed; not run again)",
            error_type=error.type,
            error_message=error.message,
            receipt=receipt,
        )
    if record.error is not None:
        raise ResultNotSerializableError(
            f"request {request_id!r} ran, but its result could not be stored "
            f"({record.error.message}); not run again",
            receipt=receipt,
        )
    return receipt


def conflict_flow(
    call: Call, record: Record, now: int, verdict: Verdict, s: Settings
) -> Generator[Op, Any, ActionMismatchError | FingerprintMismatchError]:
    """Audit the rejected request and build the conflict error; nothing runs."""
    event = _event(
        EventKind.CONFLICT,
        call,
        record,
        now,
        s,
        {
            "reason": verdict.value,
            "stored_action": record.action,
            "stored_fingerprint": record.fingerprint,
            "fingerprint": call.fingerprint,
            "payload": s.redact(call.payload),
        },
    )
    try:
        yield Emit(event, buffered=False)
    except StoreError:  # the answer matters more: keep the event for the next write
        yield Emit(event, buffered=True)
    receipt = Receipt.from_record(record, replay=False, now_ms=now)
    if verdict is Verdict.CONFLICT_ACTION:
        return ActionMismatchError(
            f"request id {call.request_id!r} is already used by action "
            f"{record.action!r}, not {call.action!r}; nothing ran",
            request_id=call.request_id,
            namespace=call.namespace,
            receipt=receipt,
        )
    return FingerprintMismatchError(
        f"request id {call.request_id!r} is already used with another payload "
        f"(fingerprint {record.fingerprint[:12]}..., this one {call.fingerprint[:12]}...); "
        "nothing ran",
        request_id=call.request_id,
        namespace=call.namespace,
        receipt=receipt,
    )


def in_doubt_flow(
    call: Call, record: Record, now: int, s: Settings, note: str = ""
) -> Generator[Op, Any, OutcomeUnknownError]:
    """Audit the observation and build the "outcome unknown" error; nothing runs."""
    yield Emit(
        _event(
            EventKind.IN_DOUBT,
            call,
            record,
            now,
            s,
            {
                "observed": True,
                "stored_status": record.status.value,
                "owner": record.attempt_facts()[0],
                **({"note": note} if note else {}),
            },
        ),
        buffered=True,
    )
    return in_doubt_error(call.request_id, call.namespace, record, now, note)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _utc(ms: int) -> str:
    """Store-clock milliseconds as ISO 8601 UTC, for messages."""
    try:
        at = _EPOCH + datetime.timedelta(milliseconds=ms)  # exact, unlike ms / 1000
    except (OverflowError, TypeError, ValueError):
        return f"{ms} ms"
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def in_doubt_error(
    request_id: str, namespace: str, record: Record, now: int, note: str = ""
) -> OutcomeUnknownError:
    """The "outcome unknown" error for ``record``: it names the attempt in doubt (the one
    that ran ``fn``) and its owner, never a reconciler that took the record over since."""
    owner = record.attempt_facts()[0]
    if record.status is not Status.IN_DOUBT:  # PENDING, its lease expired: the owner died
        what = "never recorded an outcome (its lease expired)"
    elif record.error is not None:  # fn raised an "outcome unknown" exception
        what = (
            f"ended with {record.error.type}: {record.error.message}, so its side effect "
            "may or may not have happened"
        )
    else:
        what = "left its outcome unknown"
    return OutcomeUnknownError(
        f"request {request_id!r} is in doubt: attempt {record.attempt} by "
        f"{owner} (claimed at {_utc(record.claimed_at_ms)}) {what}; it is not run again. "
        "Resolve it with Guard.resolve or a reconcile hook" + (f" ({note})" if note else ""),
        request_id=request_id,
        namespace=namespace,
        owner=owner,
        claimed_at_ms=record.claimed_at_ms,
        attempt=record.attempt,
        receipt=Receipt.from_record(record, replay=False, now_ms=now),
    )


def reconcile_flow(call: Call, record: Record, s: Settings) -> Generator[Op, Any, Receipt | None]:
    """Take a reconcile lease on an in-doubt record and ask the action's hook.

    Returns the receipt (happened), raises the replayed failure (failed) or "outcome
    unknown" (unknown, or the hook failed), or returns ``None`` when the caller should
    read the record again: it was released (did not happen) or someone else took it over.
    """
    assert call.reconcile is not None
    taken: WriteResult = yield TakeOver(
        call.namespace, call.request_id, record.fencing_token, s.owner, call.lease_ms
    )
    if not taken.accepted or taken.record is None:
        return None
    lease = taken.record
    # The take-over recorded the facts of the attempt in doubt (or kept those an earlier
    # round recorded); lease_owner and lease_expires_at_ms are now this reconciler's own.
    # A store that records no facts (one of the user's own) leaves the record as read.
    owner, ended_at = (lease if lease.ended_attempt == lease.attempt else record).attempt_facts()
    request = ReconcileRequest(
        namespace=lease.namespace,
        request_id=lease.request_id,
        action=lease.action,
        payload=json.loads(lease.payload_json),
        attempt=lease.attempt,
        downstream_key=lease.downstream_key,
        owner=owner,
        claimed_at_ms=lease.claimed_at_ms,
        fencing_token=lease.fencing_token,
        lease_expired_at_ms=ended_at,
        now_ms=lease.updated_at_ms,  # the take-over's instant, store clock
    )
    outcome: Outcome = yield AskHook(call.reconcile, request, call.lease_ms)
    answer = outcome.value
    note = ""
    if outcome.error is not None:
        if not isinstance(outcome.error, Exception):
            yield from store_completion(
                call,
                lease,
                Status.IN_DOUBT,
                None,
                None,
                s,
                cause=outcome.error,
                event_kind=EventKind.RECONCILED,
                detail={"verdict": "unknown", "note": "hook interrupted"},
            )
            raise outcome.error
        note = f"reconcile hook raised {type_name(outcome.error)}: {error_message(outcome.error)}"
        answer = Reconciliation.unknown(note=note)
    elif not isinstance(answer, Reconciliation):
        note = f"reconcile hook returned {value_type_name(answer)}, not a Reconciliation"
        answer = Reconciliation.unknown(note=note)
    detail = {"verdict": answer.verdict, "note": answer.note}
    if answer.verdict == "happened":
        result_json, error = encode_result(answer.result, s.result_encoder, record.payload_json)
        written = yield from store_completion(
            call,
            lease,
            Status.SUCCEEDED,
            result_json,
            error,
            s,
            event_kind=EventKind.RECONCILED,
            detail=detail,
        )
    elif answer.verdict == "failed":
        error = stored_error(
            answer.error_type or "safeagent.ReconciledFailed", answer.error_message or answer.note
        )
        written = yield from store_completion(
            call,
            lease,
            Status.FAILED,
            None,
            error,
            s,
            event_kind=EventKind.RECONCILED,
            detail=detail,
        )
    elif answer.verdict == "not_happened":
        yield from store_completion(
            call,
            lease,
            Status.RELEASED,
            None,
            None,
            s,
            event_kind=EventKind.RECONCILED,
            detail=detail,
        )
        return None
    else:
        written = yield from store_completion(
            call,
            lease,
            Status.IN_DOUBT,
            None,
            None,
            s,
            event_kind=EventKind.RECONCILED,
            detail=detail,
        )
        if written.record is not None:
            raise in_doubt_error(
                call.request_id,
                call.namespace,
                written.record,
                written.record.updated_at_ms,
                answer.note or note,
            )
        raise in_doubt_error(call.request_id, call.namespace, lease, lease.updated_at_ms, note)
    if not written.accepted or written.record is None:
        raise lease_lost(call, lease, written.record)
    return replay_receipt(call.request_id, written.record, written.record.updated_at_ms)


def resolve_flow(
    namespace: str,
    request_id: str,
    status: Status,
    result_json: str | None,
    error: ErrorInfo | None,
    by: str,
    reason: str,
    *,
    rerun: bool,
    case_prefix: str,
) -> Generator[Op, Any, Receipt]:
    """An operator's resolution: in doubt -> SUCCEEDED | FAILED | RELEASED, or (``rerun``)
    FAILED -> RELEASED. Refused otherwise; a ``case:`` record is never re-run by an
    operator, so neither ``rerun`` nor ``released`` is accepted for one (resolve it
    succeeded or failed; only its reconcile hook, which asks the provider, may release it)."""
    record, now = yield Get(namespace, request_id)
    if record is None:
        raise InvalidTransitionError(
            f"no record for request {request_id!r} in namespace {namespace!r}",
            request_id=request_id,
            namespace=namespace,
        )
    current = record.effective_status(now)
    is_case = request_id.startswith(case_prefix)
    if rerun or (is_case and status is Status.RELEASED):
        if is_case:
            raise InvalidTransitionError(
                f"{request_id!r} settles a case: an operator never re-runs it, so it cannot "
                f"be {'re-run' if rerun else 'released'} (resolve it succeeded or failed; a "
                "new decision needs a new case)",
                request_id=request_id,
                namespace=namespace,
                status=current,
            )
        if current is not Status.FAILED:
            raise InvalidTransitionError(
                f"request {request_id!r} is {current.value}: only a FAILED record is re-run",
                request_id=request_id,
                namespace=namespace,
                status=current,
            )
    elif current is not Status.IN_DOUBT:
        raise InvalidTransitionError(
            f"request {request_id!r} is {current.value}, not in doubt: nothing to resolve",
            request_id=request_id,
            namespace=namespace,
            status=current,
        )
    written: WriteResult = yield Resolve(
        Resolution(
            namespace,
            request_id,
            record.fencing_token,
            status,
            result_json,
            error,
            actor=by,
            reason=reason,
            rerun=rerun,
            settle_case=request_id[len(case_prefix) :] if is_case else None,
        )
    )
    if not written.accepted or written.record is None:
        raise InvalidTransitionError(
            f"request {request_id!r} changed while resolving it; read it again",
            request_id=request_id,
            namespace=namespace,
        )
    return Receipt.from_record(written.record, replay=False)


def call_for_record(
    record: Record, lease_ms: int, reconcile: ReconcileHook | None, case_prefix: str
) -> Call:
    """A :class:`Call` that stands for the stored request (for a proactive reconcile)."""
    rid = record.request_id
    return Call(
        namespace=record.namespace,
        request_id=rid,
        action=record.action,
        payload=json.loads(record.payload_json),
        payload_json=record.payload_json,
        fingerprint=record.fingerprint,
        lease_ms=lease_ms,
        wait=0.0,
        not_executed=(),
        outcome_unknown=(),
        reconcile=reconcile,
        settle_case=rid[len(case_prefix) :] if rid.startswith(case_prefix) else None,
    )
