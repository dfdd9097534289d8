"""Statuses, stored records, receipts and the execution context handed to ``fn``."""

from __future__ import annotations

import copy
import enum
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import Any, cast


class Status(str, enum.Enum):
    """Stored status of an execution record (docs/design.md section 2).

    A PENDING record whose lease has expired on the store's clock is *read* as
    IN_DOUBT; expiry is derived on read, never stored.
    """

    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    RELEASED = "RELEASED"
    IN_DOUBT = "IN_DOUBT"

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED})
_IN_DOUBT = Status.IN_DOUBT  # a module global: reading an Enum member costs ~80 ns more


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A stored failure: the exception's type name and message. Never a pickled object."""

    type: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


@dataclass(slots=True, unsafe_hash=True)
class Record:
    """One execution record as a store holds it (JSON kept as text).

    Identity is ``(namespace, request_id)``. Instants are integer milliseconds since the
    Unix epoch on the store's clock.

    A snapshot: treat it as read-only (the memory store hands out the object it holds).
    It is not ``frozen`` because every call builds one or two, and a frozen dataclass sets
    each of its fields through ``object.__setattr__`` (about 2 us per record against
    0.2 us); it still hashes by value, as it did when frozen.
    """

    namespace: str
    request_id: str
    action: str
    fingerprint: str
    status: Status
    payload_json: str
    result_json: str | None
    error: ErrorInfo | None
    execution_id: str
    attempt: int
    fencing_token: int
    lease_owner: str | None
    lease_expires_at_ms: int | None
    downstream_key: str
    created_at_ms: int
    claimed_at_ms: int
    updated_at_ms: int
    completed_at_ms: int | None
    purged_at_ms: int | None = None
    """Set when retention purged the record's payload and result, leaving a tombstone."""
    attempt_owner: str | None = None
    """The lease owner of attempt ``ended_attempt``, the attempt that ran ``fn``: recorded
    by the first reconcile take-over of that attempt, kept by the later ones (each of which
    overwrites ``lease_owner`` with its reconciler's). ``None`` until then. Read it through
    :meth:`attempt_facts`."""
    attempt_ended_at_ms: int | None = None
    """When attempt ``ended_attempt`` ended, store clock, ms: its lease expiry if it died,
    or when it recorded IN_DOUBT itself. Recorded with ``attempt_owner``."""
    ended_attempt: int | None = None
    """The attempt number ``attempt_owner`` and ``attempt_ended_at_ms`` describe. They count
    only while it equals ``attempt``: a claim by a writer that does not know these columns
    (an older SafeAgent during a rolling upgrade) starts a new attempt without clearing them."""

    def attempt_facts(self) -> tuple[str | None, int | None]:
        """``(owner, ended_at_ms)`` of the attempt that ran ``fn`` (attempt ``attempt``), the
        one that may have sent a downstream request; ``ended_at_ms`` on the store's clock, in
        ms. Meaningful while the record is in doubt or being reconciled.

        The values recorded by a reconcile take-over when they describe this attempt; before
        the first take-over, the current record's: its ``lease_owner``, and when it ended:
        ``updated_at_ms`` if it is stored IN_DOUBT (the instant ``fn``'s attempt recorded
        that outcome: it sent nothing after), else its lease expiry (it died). Rows written
        before these columns existed, and already taken over by an older SafeAgent, get the
        previous reconciler's owner and an instant no earlier than the attempt's true end
        (that reconciler took over only after the attempt ended).
        """
        if self.ended_attempt == self.attempt:
            return self.attempt_owner, self.attempt_ended_at_ms
        if self.status is Status.IN_DOUBT:
            return self.lease_owner, self.updated_at_ms
        return self.lease_owner, self.lease_expires_at_ms

    def effective_status(self, now_ms: int) -> Status:
        """The status as read at ``now_ms``: an expired PENDING lease reads as IN_DOUBT."""
        if (
            self.status is Status.PENDING
            and self.lease_expires_at_ms is not None
            and now_ms >= self.lease_expires_at_ms
        ):
            return Status.IN_DOUBT
        return self.status


@dataclass(frozen=True, slots=True)
class Receipt:
    """What an execution produced, as returned to every caller of one request id.

    Immutable. ``result`` is ``fn``'s return value as stored (serialized to JSON, then
    deserialized), so the first call and every replay see an equal value of the same type.

    Attributes:
        namespace: the tenant scope of the request id.
        request_id: the idempotency key.
        action: the action name the record was claimed under.
        status: the status as read (an expired PENDING lease reads as IN_DOUBT).
        result: the stored return value (a JSON value), or ``None``.
        error: the stored failure (type and message), or ``None``.
        execution_id: unique id of the attempt that produced this record.
        fingerprint: hex SHA-256 of the canonical action and payload.
        attempt: 1 for the first claim, +1 for each claim after a release.
        fencing_token: the token of the attempt that wrote the record.
        downstream_key: the idempotency key handed to the downstream system.
        created_at_ms / claimed_at_ms / completed_at_ms: store-clock instants in ms.
        replay: ``True`` when this call did not run ``fn`` but returned a stored outcome.
        lease_owner / lease_expires_at_ms: the current lease's holder and expiry (store
            clock, ms): after a reconcile take-over, the reconciler's.
        attempt_owner / attempt_ended_at_ms: for a receipt in doubt, the lease owner of the
            attempt in doubt (the one that ran ``fn``) and when it ended (store clock, ms:
            its lease expiry if it died, or when it recorded the in-doubt outcome itself),
            whatever reconcile rounds came since (:meth:`Record.attempt_facts`); ``None``
            for a receipt not in doubt.
        purged_at_ms: when retention purged the payload and result (store clock, ms),
            else ``None``: tells a tombstone from a ``fn`` that returned ``None``.
    """

    namespace: str
    request_id: str
    action: str
    status: Status
    result: Any
    error: ErrorInfo | None
    execution_id: str
    fingerprint: str
    attempt: int
    fencing_token: int
    downstream_key: str
    created_at_ms: int
    claimed_at_ms: int
    completed_at_ms: int | None
    replay: bool
    lease_owner: str | None = None
    lease_expires_at_ms: int | None = None
    payload_json: str | None = field(default=None, repr=False)
    """The payload as stored, canonical JSON text (``None`` once retention purged it)."""
    attempt_owner: str | None = None
    attempt_ended_at_ms: int | None = None
    purged_at_ms: int | None = None
    """Set (store clock, ms) when retention purged the payload and result, leaving a
    tombstone: ``result`` and ``payload`` are then ``None`` whatever ``fn`` returned."""

    @property
    def payload(self) -> Any:
        """The payload as stored (``None`` once retention purged it): what an operator
        needs to decide an in-doubt record. Parsed on access, so a replay that never
        looks at it does not pay for it."""
        return json.loads(self.payload_json) if self.payload_json else None

    @classmethod
    def from_record(cls, record: Record, *, replay: bool, now_ms: int | None = None) -> Receipt:
        status = record.status if now_ms is None else record.effective_status(now_ms)
        owner = ended = None
        if status is _IN_DOUBT:
            owner, ended = record.attempt_facts()
        values = (
            record.namespace,
            record.request_id,
            record.action,
            status,
            _result(record.result_json),
            record.error,
            record.execution_id,
            record.fingerprint,
            record.attempt,
            record.fencing_token,
            record.downstream_key,
            record.created_at_ms,
            record.claimed_at_ms,
            record.completed_at_ms,
            replay,
            record.lease_owner,
            record.lease_expires_at_ms,
            record.payload_json or None,
            owner,
            ended,
            record.purged_at_ms,
        )
        if cls is not Receipt:  # a subclass may have fields and a __post_init__ of its own
            return cls(*values)
        # Field by field through the slots' own setters, in field order: one receipt per
        # call on the hot path, and the frozen __init__ goes through object.__setattr__
        # for each of its 21 fields (about 1 us more). Equal to cls(...) with the same
        # values (tests/test_receipt.py).
        receipt = _new_object(cls)
        for setter, value in zip(_RECEIPT_SETTERS, values, strict=True):
            setter(receipt, value)
        return receipt

    @property
    def ok(self) -> bool:
        """``True`` when the stored outcome is a success."""
        return self.status is Status.SUCCEEDED and self.error is None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON values (status as its string)."""
        return {
            "namespace": self.namespace,
            "request_id": self.request_id,
            "action": self.action,
            "status": self.status.value,
            "result": self.result,
            "error": None if self.error is None else self.error.to_dict(),
            "execution_id": self.execution_id,
            "fingerprint": self.fingerprint,
            "attempt": self.attempt,
            "fencing_token": self.fencing_token,
            "downstream_key": self.downstream_key,
            "created_at_ms": self.created_at_ms,
            "claimed_at_ms": self.claimed_at_ms,
            "completed_at_ms": self.completed_at_ms,
            "replay": self.replay,
            "payload": self.payload,
            "purged_at_ms": self.purged_at_ms,
            "attempt_owner": self.attempt_owner,
            "attempt_ended_at_ms": self.attempt_ended_at_ms,
        }

    def to_json(self) -> str:
        """The receipt as a JSON string (see :meth:`to_dict`): UTF-8 text as is, except
        when a stored string holds a lone surrogate (a result may), which no UTF-8
        transport can carry: then every non-ASCII character is a ``\\uXXXX`` escape."""
        try:
            return _json_text(self.to_dict())
        except RecursionError:  # a result nested nearly as deep as the limit allows
            return cast(str, _on_a_fresh_stack(_json_text, self.to_dict()))


def _json_text(value: dict[str, Any]) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    return text


_new_object = object.__new__
_decode = json.JSONDecoder().decode  # json.loads with default options, without its checks


def _result(text: str | None) -> Any:
    """The stored result parsed; text from the store, or bytes where a row holds a BLOB
    (written by another tool), which json.loads reads and the bare decoder does not."""
    if text is None:
        return None
    try:
        return _decode(text) if type(text) is str else json.loads(text)
    except RecursionError:
        # Nested nearly as deep as the recursion limit allows: encoded from a shallow
        # stack, read from a deeper one. A new thread's stack is empty.
        return _on_a_fresh_stack(json.loads, text)


def _on_a_fresh_stack(fn: Callable[[Any], Any], arg: Any) -> Any:
    """``fn(arg)`` in a new thread, whose Python stack starts empty; its exception is
    raised here."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn(arg)))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            box.append((False, exc))

    thread = threading.Thread(target=run, name="safeagent-decode")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


# The member descriptors of Receipt's slots, in field order (what Receipt.from_record sets).
_RECEIPT_SETTERS = tuple(Receipt.__dict__[f.name].__set__ for f in fields(Receipt))


@dataclass(frozen=True, slots=True)
class ExecutionContext:
    """What ``fn`` gets to know about the attempt it runs in (docs/design.md section 2).

    Attributes:
        request_id: the idempotency key of the call.
        namespace: its tenant scope.
        action: the action name.
        payload: the payload as given (a JSON value).
        attempt: 1 on the first claim; +1 on each claim after a release.
        fencing_token: increases on every claim and resolution; a completion is accepted
            only while it is still current.
        execution_id: unique id of this attempt.
        downstream_key: pass this to the downstream system as *its* idempotency key
            (for example Stripe's ``Idempotency-Key`` header): the same on every attempt.

    :meth:`lease_left` tells ``fn`` whether its lease still holds, to check right before
    it sends the side effect.
    """

    request_id: str
    namespace: str
    action: str
    payload: Any
    attempt: int
    fencing_token: int
    execution_id: str
    downstream_key: str

    def lease_left(self) -> float:
        """Seconds this attempt's lease surely has left, as this process last confirmed
        it: from the moment its claim (or its latest renewal, every third of the lease)
        was sent, less the store clock's millisecond, on a monotonic clock that counts a
        suspend (:func:`lease_clock`); ``0.0`` once it ran out unrenewed, another caller
        took the record over, or ``fn`` returned or raised (a thread or task it left
        behind must not send then). A ``copy`` or ``deepcopy`` reads the same; a context
        pickled to another process, in a forked child, or made with
        ``dataclasses.replace``, reads ``0.0``
        (it cannot learn of renewals or of the end of ``fn``: check here, before handing
        the send off, and do not return while a worker may still send). ``math.inf`` for
        a context no guard runs (one built by hand).

        A process can stall (a GC pause, a call holding the GIL, SIGSTOP) past its lease
        while ``fn`` is about to send; the record then reads as in doubt, and a reconcile
        hook or an operator may let a retry run ``fn`` again. Call this right before the
        send and raise an exception declared not executed (such as
        :class:`~safeagent.NotExecuted`) when it is below your margin (the time the send
        takes to leave). Not covered: a stall between the check and the send, a forward
        step of the store's clock, and a VM paused with its clocks; only a downstream
        system that honours ``downstream_key`` or ``fencing_token`` closes those
        (docs/guide.md, Reconcile hooks).
        """
        lease = getattr(self, "_lease", None)  # only a running context has one
        if lease is None:
            return 0.0 if isinstance(self, RunningContext) else math.inf
        if lease.lost or lease.ended or lease.pid != os.getpid():
            return 0.0
        return max(0.0, float(lease.valid_until) - lease_clock())


def lease_clock() -> float:
    """Seconds on the clock leases are counted on here: monotonic, and counting a
    suspend where the platform has such a clock (Linux: ``CLOCK_BOOTTIME``; macOS:
    ``CLOCK_MONOTONIC``, which counts sleep there), else ``time.monotonic``."""
    return _clock_gettime(_LEASE_CLOCK)


if hasattr(time, "CLOCK_BOOTTIME"):
    _LEASE_CLOCK: int = time.CLOCK_BOOTTIME
    _clock_gettime: Callable[[int], float] = time.clock_gettime
elif sys.platform == "darwin" and hasattr(time, "CLOCK_MONOTONIC"):
    _LEASE_CLOCK = time.CLOCK_MONOTONIC
    _clock_gettime = time.clock_gettime
else:
    _LEASE_CLOCK = 0
    _clock_gettime = lambda _clock: time.monotonic()  # noqa: E731 - one expression

STORE_CLOCK_RESOLUTION = 0.001
"""Seconds: the stores count time in whole milliseconds (rounded down), so a lease may
end up to this much before its send time plus its length."""


class LeaseView:
    """What :meth:`ExecutionContext.lease_left` reads: ``valid_until`` (seconds on
    :func:`lease_clock`), ``lost`` (a renewal found the record taken over) and ``ended``
    (``fn`` returned or raised). The runner's heartbeat updates the one of a running
    ``fn``."""

    __slots__ = ("ended", "lost", "pid", "valid_until")

    def __init__(self, valid_until: float, lost: bool = False, ended: bool = False) -> None:
        self.valid_until = valid_until
        self.lost = lost
        self.ended = ended
        self.pid = os.getpid()  # a forked child's copy never learns of renewals or the end


_CONTEXT_FIELDS = tuple(f.name for f in fields(ExecutionContext))


class RunningContext(ExecutionContext):
    """The :class:`ExecutionContext` a guard hands a running ``fn``: the same fields, and
    the view of its lease that :meth:`~ExecutionContext.lease_left` reads (not a field:
    ``dataclasses.asdict`` and equality see the eight fields). Named ``ExecutionContext``
    (``repr``, error messages). A copy shares the view; a pickled one, one made by
    ``dataclasses.replace`` and a forked child's have none that holds (they read
    ``0.0``)."""

    __slots__ = ("_lease",)

    @classmethod
    def of(cls, context: ExecutionContext, lease: LeaseView | None) -> RunningContext:
        running = cls(*(getattr(context, name) for name in _CONTEXT_FIELDS))
        if lease is not None:
            object.__setattr__(running, "_lease", lease)
        return running

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _CONTEXT_FIELDS)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_viewless, self._values())  # another process reads 0.0

    def __copy__(self) -> RunningContext:
        return RunningContext.of(self, getattr(self, "_lease", None))

    def __deepcopy__(self, memo: dict[int, Any]) -> RunningContext:
        values = copy.deepcopy(self._values(), memo)
        return RunningContext.of(ExecutionContext(*values), getattr(self, "_lease", None))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExecutionContext):
            return self._values() == tuple(getattr(other, name) for name in _CONTEXT_FIELDS)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())


RunningContext.__name__ = RunningContext.__qualname__ = "ExecutionContext"


def _viewless(*values: Any) -> RunningContext:
    """A running context without a lease view (it reads ``0.0``): an unpickled copy."""
    return RunningContext(*values)


_current: ContextVar[ExecutionContext | None] = ContextVar("safeagent_context", default=None)


def current_context() -> ExecutionContext | None:
    """The :class:`ExecutionContext` of the guarded call running now, or ``None``.

    Useful inside a function wrapped with ``Guard.guarded``, which receives its own
    arguments rather than the context.
    """
    return _current.get()
