"""The store interface, its request and result types, and helpers every store shares.

Stores stay simple: each operation is one atomic step (one transaction) and holds no
policy. What a call should do with a record is decided in ``safeagent._decide``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

from safeagent._audit import (
    REPLAY_BUFFER_EVENTS,
    REPLAY_BUFFER_SECONDS,
    AuditEvent,
    EventKind,
    new_event,
)
from safeagent._cases import CaseChange, CaseRow, CaseState, Signal
from safeagent._receipt import TERMINAL, ErrorInfo, Record, Status
from safeagent.errors import ConfigurationError, StoreError

DATABASE_URL_ENV = "SAFEAGENT_DATABASE_URL"
"""The PostgreSQL URL ``Guard()`` (no store given) and the CLI use when set; it wins over
``$SAFEAGENT_DB``."""

Durability = Literal["durable", "claim-durable"]
DURABILITY_MODES: tuple[str, ...] = ("durable", "claim-durable")

Clock = Callable[[], int]
"""A clock: returns integer milliseconds since the Unix epoch."""


def system_clock_ms() -> int:
    """The host's wall clock in integer milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def stored_number(value: Any) -> int | None:
    """A number ``safeagent_meta`` holds, as every release writes it: decimal digits (at
    most 9; ``int()`` refuses over 4,300), or an int >= 0 (SQLite keeps what it was
    given); ``None`` for anything else."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        return int(value)
    if type(value) is int and value >= 0:
        return value
    return None


def stored_version(value: Any, where: str) -> int:
    """``safeagent_meta.schema_version`` as read from ``where`` (a file or a schema).

    Raises:
        StoreError: not a :func:`stored_number` (edited by hand, or another program's
            table).
    """
    version = stored_number(value)
    if version is not None:
        return version
    raise StoreError(
        f"{where} has a schema_version of {value!r}, which no SafeAgent writes: it was edited "
        "by hand, or the table is another program's"
    )


def check_durability(durability: str) -> Durability:
    if durability not in DURABILITY_MODES:
        raise ConfigurationError(
            f"durability must be one of {DURABILITY_MODES}, got {durability!r}"
        )
    return durability  # type: ignore[return-value]


# The requests and answers below are plain slots dataclasses: one or two of each per call,
# never changed after they are built (a frozen dataclass would set each field through
# object.__setattr__ on the hot path). Treat them as read-only: they still hash by value,
# as they did when frozen (unsafe_hash), which is only sound if nobody changes them.


@dataclass(slots=True, unsafe_hash=True)
class ClaimRequest:
    """Ask the store to claim ``(namespace, request_id)``: insert it PENDING if absent,
    or take over a RELEASED record (attempt + 1, fencing token + 1, the previous attempt's
    ``attempt_owner``, ``attempt_ended_at_ms`` and ``ended_attempt`` cleared), atomically.

    ``lease_ms`` is measured on the store's clock. ``detail`` goes into the ``claimed``
    audit event written in the same transaction.
    """

    namespace: str
    request_id: str
    action: str
    fingerprint: str
    payload_json: str
    execution_id: str
    owner: str
    lease_ms: int
    downstream_key: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, unsafe_hash=True)
class ClaimResult:
    """``won``: this request made the claim and ``record`` is its PENDING record.
    Otherwise ``record`` is the record that is there (the winner's). ``now_ms`` is the
    store's clock at the claim."""

    won: bool
    record: Record
    now_ms: int


@dataclass(slots=True, unsafe_hash=True)
class Completion:
    """Ask the store to record an outcome for the attempt holding ``fencing_token``.

    Accepted only while the record is PENDING with that token (fencing). ``status`` is
    SUCCEEDED, FAILED, RELEASED or IN_DOUBT.
    """

    namespace: str
    request_id: str
    fencing_token: int
    status: Status
    result_json: str | None
    error: ErrorInfo | None
    actor: str
    detail: dict[str, Any] = field(default_factory=dict)
    settle_case: str | None = None
    """A case id: a terminal outcome moves that case FINAL -> SETTLED in the same
    transaction (docs/design.md section 4)."""
    event_kind: EventKind | None = None
    """The audit event to write instead of the one the status implies (``reconciled``)."""
    action: str | None = None
    execution_id: str | None = None
    """The action and execution id of the attempt completing (the record its claim or
    take-over returned), when the caller knows them: a store may then write the
    completion and its event in one statement, checked against the row (PostgreSQL)."""


@dataclass(slots=True, unsafe_hash=True)
class Resolution:
    """An operator's resolution of an in-doubt record (stored IN_DOUBT, or PENDING with
    an expired lease), conditional on ``expected_token``; bumps the fencing token so the
    attempt in doubt can no longer complete."""

    namespace: str
    request_id: str
    expected_token: int
    status: Status
    result_json: str | None
    error: ErrorInfo | None
    actor: str
    reason: str
    settle_case: str | None = None
    rerun: bool = False
    """An audited re-run: FAILED -> RELEASED instead of resolving an in-doubt record."""


@dataclass(slots=True, unsafe_hash=True)
class WriteResult:
    """``accepted``: the change was made (``late``: after the lease had expired).
    ``record``: the record after the change, or as found when refused (``None`` if absent)."""

    accepted: bool
    record: Record | None
    late: bool = False


@runtime_checkable
class ReceiptStore(Protocol):
    """What the guard needs from a store. Every method is one atomic step.

    Implementations: :class:`~safeagent.stores.MemoryStore` (not durable) and
    :class:`~safeagent.stores.SQLiteStore`. Store failures raise
    :class:`~safeagent.errors.StoreError` chained to the driver's exception.
    """

    @property
    def identity(self) -> str:
        """A string naming the underlying storage (two stores on one database share it)."""
        ...

    def get(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        """Return the record (or ``None``) and the store's clock in ms."""
        ...

    def claim(self, request: ClaimRequest) -> ClaimResult:
        """Claim atomically (see :class:`ClaimRequest`), with its audit event."""
        ...

    def complete(self, completion: Completion) -> WriteResult:
        """Record an outcome if the fencing token is current, with its audit events."""
        ...

    def resolve(self, resolution: Resolution) -> WriteResult:
        """Apply an operator's resolution if the record is in doubt, with its audit event."""
        ...

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        """Extend a PENDING lease to now + ``lease_ms`` if ``fencing_token`` is current."""
        ...

    def take_over(
        self, namespace: str, request_id: str, expected_token: int, owner: str, lease_ms: int
    ) -> WriteResult:
        """Take a new lease (token + 1, PENDING) on an in-doubt record (stored IN_DOUBT, or
        PENDING with an expired lease) whose token is ``expected_token``; audited.

        In the same step, record the facts of the attempt in doubt unless they are already
        recorded for it (``ended_attempt == attempt``): ``attempt_owner``,
        ``attempt_ended_at_ms`` and ``ended_attempt`` from :meth:`Record.attempt_facts` of
        the record before the take-over. Later rounds keep them, so every reconcile round
        is told about the attempt that ran ``fn``, not a previous reconciler."""
        ...

    def record_event(self, event: AuditEvent, *, buffered: bool = False) -> None:
        """Append an audit event: now, or (``buffered``) with the next write."""
        ...

    def flush_events(self) -> None:
        """Write any buffered audit events now."""
        ...

    def events(
        self,
        *,
        namespace: str | None = None,
        subject: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        """Audit events in write order, optionally filtered."""
        ...

    def records(
        self,
        *,
        namespace: str | None = None,
        statuses: Sequence[Status] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Record], int]:
        """Records (stored statuses), and the store's clock in ms."""
        ...

    def close(self) -> None:
        """Flush buffered events and release connections."""
        ...

    # -- cases (the finality gate) ---------------------------------------------------------

    def get_case(self, namespace: str, case_id: str) -> tuple[CaseRow | None, list[Signal]]:
        """The case (or ``None``) and its live signals, oldest first."""
        ...

    def open_case(self, namespace: str, case_id: str, threshold: float, quorum: int) -> CaseRow:
        """Create the case OPEN if absent (audited); return the case as stored."""
        ...

    def update_case(
        self,
        namespace: str,
        case_id: str,
        mutate: CaseMutation,
        *,
        signal: Signal | None,
        actor: str,
        detail: dict[str, Any],
        open_with: tuple[float, int] | None = None,
    ) -> CaseUpdate:
        """In one transaction with the case locked: read it and its live signals, ask
        ``mutate`` for the change (it may raise to change nothing), store ``signal`` (live,
        or late) and the new state, and audit the signal and every state passed through.
        ``open_with`` (threshold, quorum) opens an absent case first."""
        ...

    def cases(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[CaseRow]:
        """Cases, oldest first, optionally filtered."""
        ...

    def case_signals(self, namespace: str, case_id: str) -> list[tuple[Signal, str]]:
        """Every signal of a case in arrival order, with its status: live, replaced, late."""
        ...


class ClaimFirstStore(ReceiptStore, Protocol):
    """A store that can claim before it reads: while ``claim_first`` is true, a guard's
    first step for a call is :meth:`claim_new`, not :meth:`get`, so a first execution
    costs one round trip fewer and a replay's read is the claim statement (PostgreSQL).
    Optional: a store without it is read first (SQLite, where a read is cheap and a claim
    takes the write lock). A wrapper or subclass that changes :meth:`claim` must change
    :meth:`claim_new` too: a call's first claim may go through either."""

    @property
    def claim_first(self) -> bool:
        """Read per call: whether the next call should claim first."""
        ...

    def claim_new(self, request: ClaimRequest) -> ClaimResult:
        """Claim ``request``'s id only if it has no record, atomically, with its audit
        event; when it has one (any status, RELEASED too), change nothing and answer it,
        not won."""
        ...

    def look(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        """:meth:`get`, as a call's first step when it reads first: what it finds tells
        the store whether claiming first would have paid."""
        ...


Lease = tuple[str, str, int, int]
"""One lease to renew: ``(namespace, request_id, fencing_token, lease_ms)``."""


@runtime_checkable
class BatchRenewStore(ReceiptStore, Protocol):
    """A store that renews many leases in one transaction. Optional: the heartbeat renews
    one lease per transaction on a store without it. With it, a process running many calls
    at once pays one commit (one fsync on SQLite, one round trip on PostgreSQL) per
    heartbeat round, not one per call, so its leases keep up with the load: one commit
    each for 1,500 calls on a 1 s lease took longer than the lease, and healthy calls read
    as in doubt. The heartbeat calls it only where the class that defines :meth:`renew`
    defines it too: a subclass that changes :meth:`renew` alone keeps its ``renew``
    called, one lease per transaction, and so does a proxy reaching ``renew`` through
    ``__getattr__``. An answer that is not one bool per lease counts as a failure."""

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        """:meth:`~ReceiptStore.renew` each lease, all in one transaction: for each, in
        order, whether it was renewed (False: its token is no longer current, or it is no
        longer PENDING).

        Raises:
            StoreError: the store failed; none was renewed.
        """
        ...


CaseMutation = Callable[[CaseRow, list[Signal]], CaseChange]
"""A pure function from (case, live signals) to the change to apply (see ``_cases``)."""


@dataclass(slots=True, unsafe_hash=True)
class CaseUpdate:
    """The case after an update, its live signals, and the change that was applied."""

    case: CaseRow
    live: list[Signal]
    change: CaseChange


def case_events(
    before: CaseRow,
    change: CaseChange,
    signal: Signal | None,
    actor: str,
    detail: dict[str, Any],
    now_ms: int,
) -> list[AuditEvent]:
    """The audit events of one case update: the signal (with what it replaced, or that it
    came late), then one state change per state passed through."""
    out: list[AuditEvent] = []
    if signal is not None:
        out.append(
            AuditEvent(
                kind=EventKind.SIGNAL,
                at_ms=now_ms,
                namespace=before.namespace,
                subject=before.case_id,
                actor=signal.source,
                detail={
                    **detail,
                    "outcome": signal.outcome,
                    "confidence": signal.confidence,
                    "late": change.late,
                    "replaced": None
                    if change.replaced is None
                    else {
                        "outcome": change.replaced.outcome,
                        "confidence": change.replaced.confidence,
                    },
                },
            )
        )
    state = before.state
    for to in change.path:
        out.append(state_change_event(before, state, to, change, actor, detail, now_ms))
        state = to
    return out


def state_change_event(
    case: CaseRow,
    frm: CaseState | None,
    to: CaseState,
    change: CaseChange | None,
    actor: str,
    detail: dict[str, Any],
    now_ms: int,
) -> AuditEvent:
    return AuditEvent(
        kind=EventKind.STATE_CHANGE,
        at_ms=now_ms,
        namespace=case.namespace,
        subject=case.case_id,
        actor=actor,
        detail={
            "from": None if frm is None else frm.value,
            "to": to.value,
            "outcome": None
            if change is None
            else (
                change.outcome
                if to in (CaseState.FINAL, CaseState.SETTLED)
                else change.provisional_outcome
            ),
            **{k: v for k, v in detail.items() if k in ("by", "reason", "execution_id")},
            # The opening records the case's policy, which no later event repeats: verify
            # compares the stored one with it.
            **({"threshold": case.threshold, "quorum": case.quorum} if frm is None else {}),
        },
    )


def settled_event(case: CaseRow, execution_id: str, actor: str, now_ms: int) -> AuditEvent:
    return AuditEvent(
        kind=EventKind.STATE_CHANGE,
        at_ms=now_ms,
        namespace=case.namespace,
        subject=case.case_id,
        actor=actor,
        execution_id=execution_id,
        detail={
            "from": CaseState.FINAL.value,
            "to": CaseState.SETTLED.value,
            "outcome": case.outcome,
        },
    )


def completion_kind(completion: Completion) -> EventKind:
    """The kind of the event an accepted ``completion`` writes first (its outcome's)."""
    return completion.event_kind or _OUTCOME_EVENTS[completion.status]


def completion_events(
    completion: Completion, before: Record | None, after: Record | None, now_ms: int
) -> list[AuditEvent]:
    """The audit events a completion writes: its outcome (accepted), a late-completion
    note (accepted after the lease expired), or a rejection (fencing token not current)."""
    known = after or before

    def event(kind: EventKind, detail: dict[str, Any]) -> AuditEvent:
        return new_event(
            kind,
            now_ms,
            completion.namespace,
            completion.request_id,
            None if known is None else known.action,
            completion.actor,
            None if known is None else known.execution_id,
            completion.fencing_token,
            detail,
        )

    if after is None:
        current = None if before is None else before.fencing_token
        return [
            event(
                EventKind.COMPLETION_REJECTED,
                {
                    **completion.detail,
                    "status": completion.status.value,
                    "current_fencing_token": current,
                },
            )
        ]
    kind = completion_kind(completion)
    detail = {**completion.detail, "status": completion.status.value}
    if completion.status in TERMINAL:
        error = completion.error
        detail[OUTCOME_DIGEST] = outcome_digest(
            after.execution_id,
            completion.status.value,
            completion.result_json,
            None if error is None else error.type,
            None if error is None else error.message,
        )
    out = [event(kind, detail)]
    if after.lease_expires_at_ms is not None and now_ms >= after.lease_expires_at_ms:
        out.append(
            event(
                EventKind.LATE_COMPLETION,
                {
                    "status": completion.status.value,
                    "lease_expired_ms_ago": now_ms - after.lease_expires_at_ms,
                },
            )
        )
    return out


OUTCOME_DIGEST = "outcome_sha256"
"""The detail field of an event that stored an outcome: :func:`outcome_digest` of it."""
_json_str = json.encoder.encode_basestring_ascii


def outcome_digest(
    execution_id: str,
    status: str,
    result_json: str | None,
    error_type: str | None,
    error_message: str | None,
) -> str:
    """Hex SHA-256 of a stored outcome: the JSON array ``[execution_id, status, result,
    error_type, error_message]`` (the result as its stored JSON text). The event that
    stores an outcome carries it, so :func:`safeagent.audit.verify` can tell a receipt
    edited in the database from the one the chain recorded. The execution id (128 random
    bits) keeps equal outcomes of different records from having equal digests."""
    text = (
        f"[{'null' if execution_id is None else _json_str(execution_id)},"
        f"{'null' if status is None else _json_str(status)},"
        f"{'null' if result_json is None else _json_str(result_json)},"
        f"{'null' if error_type is None else _json_str(error_type)},"
        f"{'null' if error_message is None else _json_str(error_message)}]"
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


_OUTCOME_EVENTS = {
    Status.SUCCEEDED: EventKind.SUCCEEDED,
    Status.FAILED: EventKind.FAILED,
    Status.RELEASED: EventKind.RELEASED,
    Status.IN_DOUBT: EventKind.IN_DOUBT,
}


def take_over_event(record: Record, owner: str, now_ms: int) -> AuditEvent:
    """The event of a reconcile take-over (``record`` as it is after it): it names the
    attempt in doubt's owner and end (:meth:`Record.attempt_facts`), kept in the hash
    chain, so the facts each round was told can be checked against the trail."""
    attempt_owner, ended_at = record.attempt_facts()
    return AuditEvent(
        kind=EventKind.CLAIMED,
        at_ms=now_ms,
        namespace=record.namespace,
        subject=record.request_id,
        action=record.action,
        actor=owner,
        execution_id=record.execution_id,
        fencing_token=record.fencing_token,
        detail={
            "reconcile": True,
            "attempt": record.attempt,
            "attempt_owner": attempt_owner,
            "attempt_ended_at_ms": ended_at,
        },
    )


def claimed_event(request: ClaimRequest, record: Record, now_ms: int) -> AuditEvent:
    return new_event(
        EventKind.CLAIMED,
        now_ms,
        request.namespace,
        request.request_id,
        request.action,
        request.owner,
        record.execution_id,
        record.fencing_token,
        {**request.detail, "attempt": record.attempt},
    )


def resolved_event(resolution: Resolution, record: Record, now_ms: int) -> AuditEvent:
    return AuditEvent(
        kind=EventKind.RESOLVED,
        at_ms=now_ms,
        namespace=resolution.namespace,
        subject=resolution.request_id,
        action=record.action,
        actor=resolution.actor,
        execution_id=record.execution_id,
        fencing_token=record.fencing_token,
        detail={
            "status": resolution.status.value,
            "rerun": resolution.rerun,
            "reason": resolution.reason,
            "previous_fencing_token": resolution.expected_token,
            "error": None if resolution.error is None else resolution.error.to_dict(),
            **_resolved_outcome(resolution, record),
        },
    )


def _resolved_outcome(resolution: Resolution, record: Record) -> dict[str, str]:
    if resolution.rerun or resolution.status not in TERMINAL:
        return {}
    error = resolution.error
    digest = outcome_digest(
        record.execution_id,
        resolution.status.value,
        resolution.result_json,
        None if error is None else error.type,
        None if error is None else error.message,
    )
    return {OUTCOME_DIGEST: digest}


CLOCK_STEP_MS = 1000
"""How far a store's clock may step back between two readings before audit verification
takes what it sees for an edit (a retention pass and the records it purged, say)."""


def purge_cutoff(cutoff_ms: int, now_ms: int) -> int:
    """The cutoff a retention pass running at ``now_ms`` applies: the one asked for, but
    never later than its own clock plus :data:`CLOCK_STEP_MS`. A pass purges only what
    finished before it ran, which is what audit verification checks a tombstone against:
    a cutoff read earlier (``purge(before_ms=...)`` after a confirmation), from a clock
    that has since stepped back, would otherwise purge records that verification then
    reports as edited."""
    return min(cutoff_ms, now_ms + CLOCK_STEP_MS)


def purged_event(now_ms: int, cutoff_ms: int, actor: str, counts: dict[str, int]) -> AuditEvent:
    """The audit event of one retention pass (subject ``*retention*``)."""
    return AuditEvent(
        kind=EventKind.PURGED,
        at_ms=now_ms,
        namespace="*",
        subject="*retention*",
        actor=actor,
        detail={"cutoff_ms": cutoff_ms, **counts},
    )


def stamped(event: AuditEvent, now_ms: int) -> AuditEvent:
    """``event`` with ``at_ms`` set from the store's clock when the caller left it 0."""
    return event if event.at_ms else replace(event, at_ms=now_ms)


class EventBuffer:
    """Replay-type audit events waiting for the next write (docs/design.md section 5).

    Thread-safe. ``due()`` says when the buffer must be written on its own: it holds
    ``max_events`` events, or its oldest is ``max_age`` seconds old. Every live buffer is
    written at interpreter exit (one process-wide hook over a weak set, so stores that are
    never closed leave nothing behind); a forked child starts with an empty buffer, so
    the parent's events are never written twice.
    """

    def __init__(
        self,
        flush: Callable[[], None],
        *,
        max_events: int = REPLAY_BUFFER_EVENTS,
        max_age: float = REPLAY_BUFFER_SECONDS,
    ) -> None:
        self._lock = threading.RLock()  # a signal handler's replay may re-enter
        self._events: list[AuditEvent] = []
        self._oldest = 0.0
        self.max_events = max_events
        self.max_age = max_age
        self._flush: Callable[[], Callable[[], None] | None] = (
            weakref.WeakMethod(flush) if hasattr(flush, "__self__") else (lambda: flush)
        )
        _live_buffers.add(self)

    def add(self, event: AuditEvent) -> None:
        with self._lock:
            if not self._events:
                self._oldest = time.monotonic()
            self._events.append(event)

    def due(self) -> bool:
        # Read without the lock (it runs on every replay, twice): a race with add or take
        # can only make one flush a little early or late, never lose an event.
        events = self._events
        return bool(events) and (
            len(events) >= self.max_events or time.monotonic() - self._oldest >= self.max_age
        )

    def take(self) -> list[AuditEvent]:
        with self._lock:
            events, self._events = self._events, []
            return events

    def put_back(self, events: list[AuditEvent]) -> None:
        """Return events whose write failed, ahead of newer ones."""
        with self._lock:
            self._events[:0] = events

    def __bool__(self) -> bool:
        return bool(self._events)

    def detach(self) -> None:
        _live_buffers.discard(self)

    def _forget(self) -> None:
        self._lock = threading.RLock()  # a signal handler's replay may re-enter
        self._events = []

    def _flush_at_exit(self) -> None:
        flush = self._flush()
        if flush is not None and self._events:
            with contextlib.suppress(Exception):  # nothing can be reported at exit
                flush()


_live_buffers: weakref.WeakSet[EventBuffer] = weakref.WeakSet()


def _flush_all_at_exit() -> None:
    for buffer in list(_live_buffers):
        buffer._flush_at_exit()


def _forget_all_in_child() -> None:
    for buffer in list(_live_buffers):
        buffer._forget()


atexit.register(_flush_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)
