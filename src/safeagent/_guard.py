"""The sync driver: validates input, asks ``decide`` what to do, and does the I/O.

All rules live in :mod:`safeagent._decide`; this module only reads and writes the store,
runs ``fn``, waits, and turns decisions into receipts and errors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import inspect
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any, Generic, Literal, ParamSpec, TypeVar

from safeagent._audit import AuditEvent, EventKind, Redactor, default_redactor
from safeagent._decide import Verdict, classify_exception, decide
from safeagent._keys import (
    canonical_json,
    check_name,
    check_request_id,
    downstream_key,
    fingerprint,
    fingerprint_payload,
    key_from_value,
)
from safeagent._receipt import ErrorInfo, ExecutionContext, Receipt, Record, Status, _current
from safeagent.errors import (
    ActionMismatchError,
    ConfigurationError,
    FingerprintMismatchError,
    InProgressError,
    InvalidInputError,
    InvalidRequestIdError,
    InvalidTransitionError,
    LeaseLostError,
    MissingKeyError,
    OutcomeUnknownError,
    ReplayedFailureError,
    ResultNotSerializableError,
    StoreError,
)
from safeagent.stores._base import ClaimRequest, Completion, ReceiptStore, Resolution
from safeagent.stores.sqlite import SQLiteStore

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_LEASE = 60.0
"""Seconds a claim stays live before a crash of its owner makes it read as in doubt."""
DEFAULT_WAIT = 10.0
"""Seconds a call waits for another caller's live claim before raising InProgressError."""
POLL_START = 0.002
POLL_MAX = 0.1
UNSERIALIZABLE = "safeagent.ResultNotSerializable"
CASE_PREFIX = "case:"
"""Request ids of case settlements (DESIGN section 4); reserved for FinalityGate.settle."""

ExceptionTypes = tuple[type[BaseException], ...]
Seconds = float | dt.timedelta
Outcome = Literal["succeeded", "failed", "released"]

_HOST = socket.gethostname()


def _seconds(name: str, value: Seconds, *, allow_zero: bool) -> float:
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be seconds (float or timedelta), got {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero) or value == float("inf"):
        raise ConfigurationError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _exception_types(name: str, value: Collection[type[BaseException]] | None) -> ExceptionTypes:
    if value is None:
        return ()
    types = tuple(value)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise ConfigurationError(f"{name} must hold exception types, got {t!r}")
    return types


def json_default(value: Any) -> Any:
    """The documented result encoding for values ``json`` cannot store on its own.

    ``datetime``/``date``/``time`` become ISO 8601 strings, ``Decimal`` and ``UUID``
    strings, ``Enum`` members their value, sets and frozensets lists, dataclass instances
    dicts. Anything else raises ``TypeError`` (the result is then not serializable).
    """
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class _Wakeups:
    """In-process wake-up for callers waiting on a claim held in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str, str], threading.Event] = {}

    def register(self, key: tuple[str, str, str]) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[key] = event
        return event

    def done(self, key: tuple[str, str, str], event: threading.Event) -> None:
        with self._lock:
            if self._events.get(key) is event:
                del self._events[key]
        event.set()

    def wait(self, key: tuple[str, str, str], timeout: float) -> None:
        with self._lock:
            event = self._events.get(key)
        if event is None:
            time.sleep(timeout)  # held by another process: poll
        else:
            event.wait(timeout)


_wakeups = _Wakeups()


@dataclasses.dataclass(frozen=True, slots=True)
class _Call:
    """One validated call: everything the driver needs, computed once."""

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
    settle_case: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.request_id)


class Guard:
    """Runs side effects at most once per ``(namespace, request_id)``.

    Args:
        store: a :class:`~safeagent.stores.ReceiptStore`, or a path to an SQLite file.
            ``None`` opens the default SQLite file (``$SAFEAGENT_DB``, else
            ``safeagent.db`` in the working directory).
        namespace: the default tenant scope (default ``"default"``). A scoping tool, not an
            authorization boundary.
        lease: seconds a claim stays live (default 60). A claim whose owner died reads as
            in doubt once its lease expires on the store's clock.
        wait: seconds a call waits for another caller's live claim before raising
            :class:`~safeagent.errors.InProgressError` (default 10; 0 answers at once).
        durability: ``"durable"`` (default) or ``"claim-durable"``; only when the guard
            opens the SQLite store itself (a store object carries its own mode).
        not_executed: exception types that mean "surely did not happen": they release the
            claim so the next call runs. Beware ``ConnectionError``: it also covers a
            connection reset *after* the request was sent.
        outcome_unknown: exception types that mean "may have happened" (a timeout after
            the request was sent): they leave the record in doubt.
        redact: the redaction hook applied to payloads written to the audit trail.
        result_encoder: ``default=`` hook for ``json.dumps`` of results
            (:func:`json_default` by default).
        owner: the lease owner recorded with claims; defaults to ``host:pid:thread``.

    Raises:
        ConfigurationError: an invalid setting.
        StoreError: the default store cannot be opened.
    """

    def __init__(
        self,
        store: ReceiptStore | str | os.PathLike[str] | None = None,
        *,
        namespace: str = "default",
        lease: Seconds = DEFAULT_LEASE,
        wait: Seconds = DEFAULT_WAIT,
        durability: str | None = None,
        not_executed: Collection[type[BaseException]] = (),
        outcome_unknown: Collection[type[BaseException]] = (),
        redact: Redactor = default_redactor,
        result_encoder: Callable[[Any], Any] = json_default,
        owner: str | None = None,
    ) -> None:
        check_name("namespace", namespace)
        self.namespace = namespace
        self.lease = _seconds("lease", lease, allow_zero=False)
        self.wait = _seconds("wait", wait, allow_zero=True)
        self.not_executed = _exception_types("not_executed", not_executed)
        self.outcome_unknown = _exception_types("outcome_unknown", outcome_unknown)
        self.redact = redact
        self.result_encoder = result_encoder
        self._owner = owner
        if store is None or isinstance(store, (str, os.PathLike)):
            self.store: ReceiptStore = SQLiteStore(store, durability=durability or "durable")
            self._owns_store = True
        else:
            store_mode = getattr(store, "durability", None)
            if durability is not None and store_mode != durability:
                raise ConfigurationError(
                    f"durability={durability!r} conflicts with the store's own mode "
                    f"{store_mode!r}: set it on the store"
                )
            self.store = store
            self._owns_store = False

    # -- public API ----------------------------------------------------------------------

    def execute(
        self,
        request_id: str,
        action: str,
        payload: Any,
        fn: Callable[[ExecutionContext], Any],
        *,
        namespace: str | None = None,
        exclude: Collection[str] = (),
        wait: Seconds | None = None,
        lease: Seconds | None = None,
        not_executed: Collection[type[BaseException]] | None = None,
        outcome_unknown: Collection[type[BaseException]] | None = None,
    ) -> Receipt:
        """Run ``fn(context)`` at most once for ``(namespace, request_id)``.

        The first call records a durable claim, runs ``fn`` and stores its outcome; every
        later call with the same request, action and payload returns the stored outcome
        without running ``fn`` (DESIGN section 2; the semantics of Stripe's idempotency keys
        and the IETF ``Idempotency-Key`` draft: the key names one request, and reusing it
        with another payload is an error).

        Args:
            request_id: the idempotency key, a non-empty str of at most 255 characters.
            action: the side effect's name (for example ``"charge_card"``).
            payload: the request, a JSON value; it is fingerprinted (RFC 8785 canonical
                JSON, SHA-256) and stored so a reconcile hook can read it.
            fn: the side effect, called with an :class:`ExecutionContext`; its return value
                must be JSON-encodable (see :func:`json_default`).
            namespace: tenant scope for this call (default: the guard's).
            exclude: top-level payload fields left out of the fingerprint (volatile fields).
            wait, lease, not_executed, outcome_unknown: per-call overrides of the guard's
                settings (seconds; exception types).

        Returns:
            The :class:`Receipt`; ``receipt.result`` is ``fn``'s return value as stored,
            and ``receipt.replay`` says whether this call ran ``fn``.

        Raises:
            InvalidRequestIdError, InvalidPayloadError, InvalidInputError: bad input;
                nothing was recorded.
            ActionMismatchError, FingerprintMismatchError: the request id is used by
                another request; nothing ran.
            InProgressError: another caller's claim was still live after ``wait`` seconds.
            OutcomeUnknownError: the record is in doubt; ``fn`` is not run again silently.
            ReplayedFailureError: the stored failure of an earlier execution.
            ResultNotSerializableError: ``fn`` ran but its result could not be stored.
            LeaseLostError: ``fn`` finished after someone else resolved the record.
            StoreError: the store failed. Before ``fn`` started: ``fn`` did not run.
            Any exception ``fn`` raised, on the call that ran it.
        """
        if isinstance(request_id, str) and request_id.startswith(CASE_PREFIX):
            raise InvalidRequestIdError(
                f"request ids starting with {CASE_PREFIX!r} are reserved for case settlement "
                "(FinalityGate.settle)",
                request_id=request_id,
            )
        call = self._prepare(
            request_id,
            action,
            payload,
            namespace,
            exclude,
            wait,
            lease,
            not_executed,
            outcome_unknown,
        )
        return self._execute(call, fn)

    def _execute(self, call: _Call, fn: Callable[[ExecutionContext], Any]) -> Receipt:
        """The driver loop shared by :meth:`execute` and case settlement."""
        store = self.store
        record, now = store.get(call.namespace, call.request_id)
        deadline: float | None = None
        poll = POLL_START
        while True:
            decision = decide(record, call.action, call.fingerprint, now)
            verdict = decision.verdict
            if verdict is Verdict.CLAIM:
                claim = store.claim(self._claim_request(call))
                if claim.won:
                    return self._run(call, claim.record, fn)
                record, now = claim.record, claim.now_ms
                continue
            assert record is not None
            if verdict is Verdict.REPLAY:
                return self._replay(call, record, now)
            if verdict is Verdict.CONFLICT_ACTION or verdict is Verdict.CONFLICT_FINGERPRINT:
                raise self._conflict(call, record, now, verdict)
            if verdict is Verdict.IN_DOUBT:
                raise self._in_doubt(call, record, now)
            # WAIT: a live claim is held by someone else.
            if deadline is None:
                deadline = time.monotonic() + call.wait
            remaining = deadline - time.monotonic()
            retry_after = decision.retry_after_ms / 1000
            if remaining <= 0:
                raise InProgressError(
                    f"request {call.request_id!r} is still running elsewhere; "
                    f"retry after {retry_after:.3f} s",
                    request_id=call.request_id,
                    namespace=call.namespace,
                    retry_after=retry_after,
                    receipt=Receipt.from_record(record, replay=False, now_ms=now),
                )
            _wakeups.wait((store.identity, *call.key), max(0.0, min(poll, remaining, retry_after)))
            poll = min(poll * 2, POLL_MAX)
            record, now = store.get(call.namespace, call.request_id)

    def guarded(
        self,
        action: str | None = None,
        *,
        key_arg: str | None = None,
        exclude: Collection[str] = (),
        allow_missing_key: bool = False,
        namespace: str | None = None,
        wait: Seconds | None = None,
        lease: Seconds | None = None,
        not_executed: Collection[type[BaseException]] | None = None,
        outcome_unknown: Collection[type[BaseException]] | None = None,
    ) -> Callable[[Callable[P, R]], GuardedFunction[P, R]]:
        """Decorate a plain function so each call runs through :meth:`execute`.

        The payload is the function's arguments bound through its signature with defaults
        applied (minus ``key_arg`` and ``exclude``). The request id is either given by the
        caller (``fn.call(request_id, *args, **kwargs)``) or taken from the argument named
        ``key_arg``, encoded as canonical JSON so that ``0``, ``False`` and ``"0"`` are
        three different ids (DESIGN section 6).

        Args:
            action: the action name; defaults to the function's ``__qualname__``.
            key_arg: the parameter whose value is the request id.
            exclude: parameters left out of the payload and fingerprint (volatile ones).
            allow_missing_key: when the ``key_arg`` value is ``None`` or ``""``, run the
                function unguarded (nothing is recorded) instead of raising
                :class:`~safeagent.errors.MissingKeyError`.
            namespace, wait, lease, not_executed, outcome_unknown: as for :meth:`execute`.

        Returns:
            A decorator producing a :class:`GuardedFunction`. Calling it returns the stored
            result (the same value on the first call and on replays).
        """

        def decorate(func: Callable[P, R]) -> GuardedFunction[P, R]:
            if inspect.iscoroutinefunction(func):
                raise ConfigurationError(
                    f"{func.__qualname__} is async; the sync guard cannot await it"
                )
            sig = inspect.signature(func)
            if key_arg is not None and key_arg not in sig.parameters:
                raise ConfigurationError(f"key_arg {key_arg!r} is not a parameter of {func}")
            return GuardedFunction(
                self,
                func,
                action or func.__qualname__,
                sig,
                key_arg,
                frozenset(exclude),
                allow_missing_key,
                {
                    "namespace": namespace,
                    "wait": wait,
                    "lease": lease,
                    "not_executed": not_executed,
                    "outcome_unknown": outcome_unknown,
                },
            )

        return decorate

    def resolve(
        self,
        request_id: str,
        outcome: Outcome | Status,
        *,
        by: str,
        reason: str,
        namespace: str | None = None,
        result: Any = None,
        error_type: str = "safeagent.ResolvedFailed",
        error_message: str | None = None,
    ) -> Receipt:
        """An operator's resolution of an in-doubt record (audited).

        Allowed only while the record is in doubt (stored IN_DOUBT, or PENDING with an
        expired lease); the fencing token is bumped, so the attempt in doubt can no longer
        complete. ``"succeeded"`` stores ``result`` (later calls replay it), ``"failed"``
        stores a failure (``error_type``, ``error_message``, default: the reason),
        ``"released"`` lets the next call run ``fn`` (use it only when you know the side
        effect did not happen).

        Args:
            request_id: the record's request id.
            outcome: ``"succeeded"``, ``"failed"`` or ``"released"`` (or the Status).
            by: who resolves (required, recorded in the audit trail).
            reason: why (required, recorded in the audit trail).
            namespace: the record's namespace (default: the guard's).
            result: the JSON result to store with ``"succeeded"``.

        Returns:
            The receipt of the resolved record.

        Raises:
            InvalidInputError: bad arguments.
            InvalidTransitionError: no such record, or it is not in doubt (its lease is
                still live, or it already has an outcome).
        """
        ns = self._ns(namespace)
        check_request_id(request_id)
        check_name("by", by)
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidInputError("reason must be a non-empty str")
        try:
            status = Status(outcome.upper() if isinstance(outcome, str) else outcome)
        except ValueError:
            status = Status.PENDING  # rejected just below
        if status not in (Status.SUCCEEDED, Status.FAILED, Status.RELEASED):
            raise InvalidInputError(
                f"outcome must be 'succeeded', 'failed' or 'released', got {outcome!r}"
            )
        result_json = None
        if status is Status.SUCCEEDED:
            result_json = canonical_json(result).decode()
        error = ErrorInfo(error_type, error_message or reason) if status is Status.FAILED else None
        record, now = self.store.get(ns, request_id)
        if record is None:
            raise InvalidTransitionError(
                f"no record for request {request_id!r} in namespace {ns!r}",
                request_id=request_id,
                namespace=ns,
            )
        current = record.effective_status(now)
        if current is not Status.IN_DOUBT:
            raise InvalidTransitionError(
                f"request {request_id!r} is {current.value}, not in doubt: nothing to resolve",
                request_id=request_id,
                namespace=ns,
                status=current,
            )
        settle_case = request_id[len(CASE_PREFIX) :] if request_id.startswith(CASE_PREFIX) else None
        written = self.store.resolve(
            Resolution(
                ns,
                request_id,
                record.fencing_token,
                status,
                result_json,
                error,
                actor=by,
                reason=reason,
                settle_case=settle_case,
            )
        )
        if not written.accepted or written.record is None:
            raise InvalidTransitionError(
                f"request {request_id!r} changed while resolving it; read it again",
                request_id=request_id,
                namespace=ns,
            )
        return Receipt.from_record(written.record, replay=False)

    def get(self, request_id: str, *, namespace: str | None = None) -> Receipt | None:
        """The receipt of ``request_id`` as stored now (status as read), or ``None``."""
        ns = self._ns(namespace)
        record, now = self.store.get(ns, check_request_id(request_id))
        return None if record is None else Receipt.from_record(record, replay=False, now_ms=now)

    def in_doubt(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> list[Receipt]:
        """Every record now in doubt (stored IN_DOUBT, or PENDING with an expired lease) in
        ``namespace`` (default: the guard's), or in every namespace."""
        records, now = self.store.records(
            namespace=None if all_namespaces else self._ns(namespace),
            statuses=(Status.IN_DOUBT, Status.PENDING),
        )
        return [
            Receipt.from_record(r, replay=False, now_ms=now)
            for r in records
            if r.effective_status(now) is Status.IN_DOUBT
        ]

    def audit_trail(
        self,
        request_id: str | None = None,
        *,
        namespace: str | None = None,
        all_namespaces: bool = False,
    ) -> list[AuditEvent]:
        """Audit events in write order, in ``namespace`` (default: the guard's) or in every
        namespace, optionally for one request id or case id."""
        return self.store.events(
            namespace=None if all_namespaces else self._ns(namespace), subject=request_id
        )

    def _ns(self, namespace: str | None) -> str:
        return self.namespace if namespace is None else check_name("namespace", namespace)

    def close(self) -> None:
        """Write buffered audit events; close the store if the guard opened it."""
        if self._owns_store:
            self.store.close()
        else:
            self.store.flush_events()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the driver ------------------------------------------------------------------------

    def _prepare(
        self,
        request_id: str,
        action: str,
        payload: Any,
        namespace: str | None,
        exclude: Collection[str],
        wait: Seconds | None,
        lease: Seconds | None,
        not_executed: Collection[type[BaseException]] | None,
        outcome_unknown: Collection[type[BaseException]] | None,
        *,
        settle_case: str | None = None,
    ) -> _Call:
        check_request_id(request_id)
        check_name("action", action)
        ns = self._ns(namespace)
        if isinstance(exclude, str):
            raise InvalidInputError("exclude must be a collection of field names, not a str")
        payload_bytes = canonical_json(payload)
        covered = (
            canonical_json(fingerprint_payload(payload, exclude)) if exclude else (payload_bytes)
        )
        return _Call(
            namespace=ns,
            request_id=request_id,
            action=action,
            payload=payload,
            payload_json=payload_bytes.decode(),
            fingerprint=fingerprint(action, covered),
            lease_ms=int(
                1000 * (self.lease if lease is None else _seconds("lease", lease, allow_zero=False))
            ),
            wait=self.wait if wait is None else _seconds("wait", wait, allow_zero=True),
            not_executed=self.not_executed
            if not_executed is None
            else _exception_types("not_executed", not_executed),
            outcome_unknown=self.outcome_unknown
            if outcome_unknown is None
            else _exception_types("outcome_unknown", outcome_unknown),
            settle_case=settle_case,
        )

    def _owner_name(self) -> str:
        return self._owner or f"{_HOST}:{os.getpid()}:{threading.current_thread().name}"

    def _claim_request(self, call: _Call) -> ClaimRequest:
        return ClaimRequest(
            namespace=call.namespace,
            request_id=call.request_id,
            action=call.action,
            fingerprint=call.fingerprint,
            payload_json=call.payload_json,
            execution_id=uuid.uuid4().hex,
            owner=self._owner_name(),
            lease_ms=call.lease_ms,
            downstream_key=downstream_key(call.namespace, call.action, call.request_id),
            detail={"payload": self.redact(call.payload), "fingerprint": call.fingerprint},
        )

    def _run(self, call: _Call, record: Record, fn: Callable[[ExecutionContext], Any]) -> Receipt:
        context = ExecutionContext(
            request_id=call.request_id,
            namespace=call.namespace,
            action=call.action,
            payload=call.payload,
            attempt=record.attempt,
            fencing_token=record.fencing_token,
            execution_id=record.execution_id,
            downstream_key=record.downstream_key,
        )
        wake_key = (self.store.identity, *call.key)
        wake = _wakeups.register(wake_key)
        token = _current.set(context)
        try:
            try:
                value = fn(context)
            except BaseException as exc:
                self._complete_failure(call, record, exc)
                raise
            if inspect.isawaitable(value):
                close = getattr(value, "close", None)
                if close is not None:
                    close()
                self._store_completion(
                    call,
                    record,
                    Status.RELEASED,
                    None,
                    ErrorInfo("safeagent.AwaitableReturned", "fn returned an awaitable"),
                )
                raise ConfigurationError(
                    "fn returned an awaitable, which the sync guard cannot await; "
                    "nothing ran and the claim was released"
                )
            return self._complete_success(call, record, value)
        finally:
            _current.reset(token)
            _wakeups.done(wake_key, wake)

    def _complete_success(self, call: _Call, record: Record, value: Any) -> Receipt:
        try:
            result_json: str | None = json.dumps(
                value,
                default=self.result_encoder,
                allow_nan=False,
                ensure_ascii=False,
                separators=(",", ":"),
            )
            error = None
        except (TypeError, ValueError, RecursionError) as exc:
            result_json = None
            error = ErrorInfo(UNSERIALIZABLE, f"{type(value).__name__}: {exc}")
        written = self._store_completion(call, record, Status.SUCCEEDED, result_json, error)
        if not written.accepted or written.record is None:
            raise self._lease_lost(call, record, written.record)
        receipt = Receipt.from_record(written.record, replay=False)
        if error is not None:
            raise ResultNotSerializableError(
                f"{call.action} ran, but its result could not be stored ({error.message}); "
                "the record is SUCCEEDED without a result and will not run again",
                receipt=receipt,
            )
        return receipt

    def _complete_failure(self, call: _Call, record: Record, exc: BaseException) -> None:
        status = classify_exception(exc, call.not_executed, call.outcome_unknown)
        error = ErrorInfo(_type_name(exc), str(exc))
        written = self._store_completion(call, record, status, None, error, cause=exc)
        if not written.accepted and isinstance(exc, Exception):
            raise self._lease_lost(call, record, written.record) from exc

    def _store_completion(
        self,
        call: _Call,
        record: Record,
        status: Status,
        result_json: str | None,
        error: ErrorInfo | None,
        cause: BaseException | None = None,
    ) -> Any:
        completion = Completion(
            namespace=call.namespace,
            request_id=call.request_id,
            fencing_token=record.fencing_token,
            status=status,
            result_json=result_json,
            error=error,
            actor=self._owner_name(),
            detail={"error": None if error is None else error.to_dict()},
            settle_case=call.settle_case,
        )
        try:
            return self.store.complete(completion)
        except StoreError as exc:
            if cause is not None and not isinstance(cause, Exception):
                raise cause from exc  # never swallow KeyboardInterrupt / SystemExit
            raise StoreError(
                f"{call.action} ran, but its outcome could not be recorded ({exc}); the "
                "record stays PENDING and reads as in doubt once its lease expires",
                request_id=call.request_id,
                namespace=call.namespace,
            ) from (cause or exc)

    def _lease_lost(self, call: _Call, record: Record, current: Record | None) -> LeaseLostError:
        return LeaseLostError(
            f"{call.action} finished, but request {call.request_id!r} was resolved by "
            "someone else meanwhile (fencing token no longer current); the completion "
            "was rejected and audited",
            request_id=call.request_id,
            namespace=call.namespace,
            fencing_token=record.fencing_token,
            receipt=None if current is None else Receipt.from_record(current, replay=False),
        )

    def _replay(self, call: _Call, record: Record, now: int) -> Receipt:
        self.store.record_event(
            AuditEvent(
                kind=EventKind.REPLAYED,
                at_ms=now,
                namespace=call.namespace,
                subject=call.request_id,
                action=call.action,
                actor=self._owner_name(),
                execution_id=record.execution_id,
                fencing_token=record.fencing_token,
                detail={"status": record.status.value},
            ),
            buffered=True,
        )
        receipt = Receipt.from_record(record, replay=True, now_ms=now)
        if record.status is Status.FAILED:
            error = record.error or ErrorInfo("unknown", "")
            raise ReplayedFailureError(
                f"request {call.request_id!r} failed earlier with {error.type}: "
                f"{error.message} (replayed; not run again)",
                error_type=error.type,
                error_message=error.message,
                receipt=receipt,
            )
        if record.error is not None:
            raise ResultNotSerializableError(
                f"request {call.request_id!r} ran, but its result could not be stored "
                f"({record.error.message}); not run again",
                receipt=receipt,
            )
        return receipt

    def _conflict(
        self, call: _Call, record: Record, now: int, verdict: Verdict
    ) -> ActionMismatchError | FingerprintMismatchError:
        self.store.record_event(
            AuditEvent(
                kind=EventKind.CONFLICT,
                at_ms=now,
                namespace=call.namespace,
                subject=call.request_id,
                action=call.action,
                actor=self._owner_name(),
                execution_id=record.execution_id,
                fencing_token=record.fencing_token,
                detail={
                    "reason": verdict.value,
                    "stored_action": record.action,
                    "stored_fingerprint": record.fingerprint,
                    "fingerprint": call.fingerprint,
                    "payload": self.redact(call.payload),
                },
            )
        )
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

    def _in_doubt(self, call: _Call, record: Record, now: int) -> OutcomeUnknownError:
        self.store.record_event(
            AuditEvent(
                kind=EventKind.IN_DOUBT,
                at_ms=now,
                namespace=call.namespace,
                subject=call.request_id,
                action=call.action,
                actor=self._owner_name(),
                execution_id=record.execution_id,
                fencing_token=record.fencing_token,
                detail={
                    "observed": True,
                    "stored_status": record.status.value,
                    "owner": record.lease_owner,
                },
            ),
            buffered=True,
        )
        return OutcomeUnknownError(
            f"request {call.request_id!r} is in doubt: attempt {record.attempt} by "
            f"{record.lease_owner} (claimed at {record.claimed_at_ms} ms) never recorded an "
            "outcome; it is not run again. Resolve it with Guard.resolve or a reconcile hook",
            request_id=call.request_id,
            namespace=call.namespace,
            owner=record.lease_owner,
            claimed_at_ms=record.claimed_at_ms,
            attempt=record.attempt,
            receipt=Receipt.from_record(record, replay=False, now_ms=now),
        )


class GuardedFunction(Generic[P, R]):
    """A function whose calls run through :meth:`Guard.execute`. Made by :meth:`Guard.guarded`.

    Keeps the wrapped function's name, docstring and signature.
    """

    def __init__(
        self,
        guard: Guard,
        func: Callable[P, R],
        action: str,
        signature: inspect.Signature,
        key_arg: str | None,
        exclude: frozenset[str],
        allow_missing_key: bool,
        options: dict[str, Any],
    ) -> None:
        self.guard = guard
        self.func = func
        self.action = check_name("action", action)
        self.signature = signature
        self.key_arg = key_arg
        self.exclude = exclude
        self.allow_missing_key = allow_missing_key
        self._options = options
        functools.update_wrapper(self, func)

    def payload(self, *args: P.args, **kwargs: P.kwargs) -> dict[str, Any]:
        """The payload a call with these arguments is fingerprinted on."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"{self.action}: {exc}") from exc
        bound.apply_defaults()
        skip = self.exclude | ({self.key_arg} if self.key_arg else set())
        return {k: v for k, v in bound.arguments.items() if k not in skip}

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.key_arg is None:
            raise MissingKeyError(
                f"{self.action} has no key_arg: call it as .call(request_id, ...)"
            )
        bound = self.signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        request_id = key_from_value(bound.arguments.get(self.key_arg))
        if request_id is None:
            if self.allow_missing_key:
                return self.func(*args, **kwargs)
            raise MissingKeyError(
                f"{self.action}: the idempotency key argument {self.key_arg!r} is missing "
                "(None or empty); nothing ran",
            )
        return self._execute(request_id, args, kwargs)

    def call(self, request_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call with an explicit request id (the caller's idempotency key)."""
        return self._execute(request_id, args, kwargs)

    def _execute(self, request_id: str, args: Sequence[Any], kwargs: dict[str, Any]) -> R:
        payload = self.payload(*args, **kwargs)
        receipt = self.guard.execute(
            request_id,
            self.action,
            payload,
            lambda _ctx: self.func(*args, **kwargs),
            **self._options,
        )
        return receipt.result  # type: ignore[no-any-return]
