"""The sync guard: a thin driver that performs the I/O a flow asks for.

All rules live in :mod:`safeagent._decide` (what a call meets) and :mod:`safeagent._flow`
(what happens next); :class:`AsyncGuard` drives the same flows with ``await``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator
from typing import Any, ParamSpec, TypeVar, cast

from safeagent._audit import AuditEvent
from safeagent._core import GuardCore, Outcome, ReconcileReport, ended_before_fn, tally
from safeagent._decorator import GuardedFunction, decorator_options
from safeagent._flow import (
    AskHook,
    Claim,
    Complete,
    Emit,
    Get,
    Op,
    Reraise,
    Resolve,
    Run,
    TakeOver,
    Wait,
    call_for_record,
    capture,
    execute_flow,
    reconcile_flow,
    resolve_flow,
)
from safeagent._flow import Outcome as FnOutcome
from safeagent._keys import check_request_id
from safeagent._policy import CASE_PREFIX, Seconds
from safeagent._receipt import (
    ExecutionContext,
    Receipt,
    Status,
    _current,
    lease_clock,
)
from safeagent._runtime import Slot, heartbeats, wakeups
from safeagent._telemetry import Observation, observe
from safeagent._telemetry import enabled as telemetry_enabled
from safeagent.errors import OutcomeUnknownError, ReplayedFailureError, ResultNotSerializableError
from safeagent.stores._base import ClaimFirstStore, ClaimRequest, ClaimResult

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class Guard(GuardCore):
    """Runs side effects at most once per ``(namespace, request_id)``.

    Args:
        store: a :class:`~safeagent.stores.ReceiptStore`; a PostgreSQL ``postgresql://``
            URL or libpq keyword string (``"host=db dbname=app"``); or a path to an SQLite
            file. A URL of another scheme raises ConfigurationError. ``None`` opens
            ``$SAFEAGENT_DATABASE_URL`` (PostgreSQL) if set, else the SQLite file
            ``$SAFEAGENT_DB``, else ``safeagent.db`` in the working directory (the CLI's
            rule too).
        namespace: the default tenant scope (default ``"default"``). A scoping tool, not an
            authorization boundary.
        lease: seconds a claim stays live without a heartbeat (default 60). While ``fn``
            runs, a heartbeat thread renews it every third of its length; a claim whose
            owner died reads as in doubt once its lease expires on the store's clock.
        wait: seconds a call waits for another caller's live claim before raising
            :class:`~safeagent.errors.InProgressError` (default 10; 0 answers at once).
        durability: ``"durable"`` (default) or ``"claim-durable"``; only when the guard
            opens the SQLite store itself (a store object carries its own mode).
        not_executed: exception types that mean "surely did not happen": they release the
            claim so the next call runs. Beware ``ConnectionError``: it also covers a
            connection reset *after* the request was sent.
        outcome_unknown: exception types that mean "may have happened" (a timeout after
            the request was sent): they leave the record in doubt.
        actions: per-action settings (:class:`~safeagent.ActionPolicy`): lease, exception
            types and the reconcile hook, by action name.
        redact: the redaction hook applied to payloads written to the audit trail.
        result_encoder: ``default=`` hook for ``json.dumps`` of results
            (:func:`~safeagent.json_default` by default).
        owner: the lease owner recorded with claims; defaults to ``host:pid:thread``.

    Raises:
        ConfigurationError: an invalid setting, or a store string that is a URL of
            another database.
        StoreError: the default store cannot be opened.
    """

    # -- public API --------------------------------------------------------------------------

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
        without running ``fn`` (docs/design.md section 2; the semantics of Stripe's idempotency keys
        and the IETF ``Idempotency-Key`` draft: the key names one request, and reusing it
        with another payload is an error).

        Args:
            request_id: the idempotency key, a non-empty str of at most 255 characters
                (``case:`` ids are reserved for :class:`~safeagent.FinalityGate`).
            action: the side effect's name (for example ``"charge_card"``).
            payload: the request, a JSON value; it is fingerprinted (RFC 8785 canonical
                JSON, SHA-256) and stored so a reconcile hook can read it.
            fn: the side effect, called with an :class:`ExecutionContext`; its return value
                must be JSON-encodable (see :func:`~safeagent.json_default`).
            namespace: tenant scope for this call (default: the guard's).
            exclude: top-level payload fields left out of the fingerprint (volatile fields).
            wait, lease, not_executed, outcome_unknown: per-call overrides of the action's
                and the guard's settings (seconds; exception types).

        Returns:
            The :class:`Receipt`; ``receipt.result`` is ``fn``'s return value as stored,
            and ``receipt.replay`` says whether this call ran ``fn``.

        Raises:
            InvalidRequestIdError, InvalidPayloadError, InvalidInputError: bad input;
                nothing was recorded.
            ActionMismatchError, FingerprintMismatchError: the request id is used by
                another request; nothing ran.
            InProgressError: another caller's claim was still live after ``wait`` seconds.
            OutcomeUnknownError: the record is in doubt and no reconcile hook could settle
                it; ``fn`` is not run again silently.
            ReplayedFailureError: the stored failure of an earlier execution.
            ResultNotSerializableError: ``fn`` ran but its result could not be stored.
            LeaseLostError: ``fn`` finished after someone else resolved the record.
            StoreError: the store failed. Before ``fn`` started: ``fn`` did not run.
            Any exception ``fn`` raised, on the call that ran it.
        """
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
        if not telemetry_enabled():  # the common case: no span, no counter, no wrapper
            return self._drive(execute_flow(call, fn, self._settings()))
        with observe(call.action, call.namespace) as seen:
            receipt = self._drive(execute_flow(call, fn, self._settings()), seen)
            seen.replay = receipt.replay
        return receipt

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
        three different ids (docs/design.md section 6).

        Args:
            action: the action name; defaults to ``module.qualname`` of the function (of
                the function under a ``functools.partial``, or of a callable object's
                class).
            key_arg: the parameter whose value is the request id.
            exclude: parameters left out of the payload and fingerprint (volatile ones);
                for a function taking ``**kwargs``, names passed in them are left out too.
            allow_missing_key: when the ``key_arg`` value is ``None`` or ``""``, run the
                function unguarded (nothing is recorded) instead of raising
                :class:`~safeagent.errors.MissingKeyError`.
            namespace, wait, lease, not_executed, outcome_unknown: as for :meth:`execute`.

        Returns:
            A decorator producing a :class:`GuardedFunction`.

        Raises:
            ConfigurationError: when decorating: ``key_arg`` or a name in ``exclude`` is
                not a parameter of the function (``exclude`` names cannot be checked for a
                function taking ``**kwargs``, but the name of that parameter itself is
                refused), or ``exclude`` is a bare ``str``; the function is ``async``
                (use :meth:`AsyncGuard.guarded`) or already guarded; no ``action`` and no
                usable default name.
        """
        options = decorator_options(namespace, wait, lease, not_executed, outcome_unknown)

        def decorate(func: Callable[P, R]) -> GuardedFunction[P, R]:
            return GuardedFunction(self, func, action, key_arg, exclude, allow_missing_key, options)

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
        """An operator's resolution, audited with ``by`` and ``reason``.

        - ``"succeeded"`` (with ``result``), ``"failed"`` (``error_type``,
          ``error_message``, default: the reason) or ``"released"``: only while the record
          is in doubt (stored IN_DOUBT, or PENDING with an expired lease). ``"released"``
          lets the next call run ``fn``: use it only when you know the side effect did not
          happen.
        - ``"rerun"``: an audited re-run of a FAILED record (FAILED -> RELEASED, so the
          next call runs ``fn`` again).

        A ``case:`` record is never re-run by an operator (a new decision needs a new
        case, docs/design.md section 4): ``"rerun"`` and ``"released"`` are refused for
        one; resolve it succeeded or failed. (Its reconcile hook, which asks the
        provider, may still answer "did not happen" and release it.)

        The fencing token is bumped, so the attempt in doubt can no longer complete. An
        in-doubt ``case:`` record resolved as succeeded or failed settles its case in the
        same transaction.

        Returns:
            The receipt of the resolved record.

        Raises:
            InvalidInputError: bad arguments (text that is blank where it must not be, or
                not valid UTF-8 without NUL); nothing changes.
            InvalidTransitionError: no such record, or not in a state this outcome allows.
        """
        ns, status, result_json, error, rerun = self._resolution_args(
            request_id, outcome, by, reason, namespace, result, error_type, error_message
        )
        return self._drive(
            resolve_flow(
                ns,
                request_id,
                status,
                result_json,
                error,
                by,
                reason,
                rerun=rerun,
                case_prefix=CASE_PREFIX,
            )
        )

    def reconcile(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> ReconcileReport:
        """Run the reconcile hooks over the records now in doubt in ``namespace`` (default:
        the guard's), or in every namespace with ``all_namespaces=True`` (not only when a retry
        arrives): "happened" stores the result, "failed" the failure, "did not happen"
        releases the record (the next call runs ``fn``), "unknown" leaves it in doubt.
        Records whose action has no hook are counted as ``no_hook``; records someone else
        is reconciling at the same moment as ``skipped``.

        Raises:
            InvalidInputError: an invalid namespace, or one given with
                ``all_namespaces=True``.
        """
        items: list[tuple[str, str, str]] = []
        for receipt in self.in_doubt(namespace=namespace, all_namespaces=all_namespaces):
            items.append((receipt.namespace, receipt.request_id, self._reconcile_one(receipt)))
        return tally(items)

    def _reconcile_one(self, receipt: Receipt) -> str:
        hook = self._reconcile_hook(receipt.action)
        if hook is None:
            return "no_hook"
        record, _ = self.store.get(receipt.namespace, receipt.request_id)
        if record is None:
            return "skipped"
        call = call_for_record(record, self._lease_ms(record.action), hook, CASE_PREFIX)
        try:
            done = self._drive(reconcile_flow(call, record, self._settings()))
        except OutcomeUnknownError:
            return "unknown"
        except ReplayedFailureError:
            return "failed"
        except ResultNotSerializableError:
            return "happened"
        if done is not None:
            return "happened"
        after, _ = self.store.get(receipt.namespace, receipt.request_id)
        return (
            "not_happened" if after is not None and after.status is Status.RELEASED else ("skipped")
        )

    def get(self, request_id: str, *, namespace: str | None = None) -> Receipt | None:
        """The receipt of ``request_id`` as stored now (status as read), or ``None``."""
        record, now = self.store.get(self._ns(namespace), check_request_id(request_id))
        return None if record is None else Receipt.from_record(record, replay=False, now_ms=now)

    def in_doubt(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> list[Receipt]:
        """Every record now in doubt (stored IN_DOUBT, or PENDING with an expired lease) in
        ``namespace`` (default: the guard's), or in every namespace with
        ``all_namespaces=True``.

        Raises:
            InvalidInputError: an invalid namespace, or one given with
                ``all_namespaces=True``.
        """
        records, now = self.store.records(
            namespace=self._scope(namespace, all_namespaces),
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
        namespace with ``all_namespaces=True``, optionally for one request id or case id.

        Raises:
            InvalidInputError: an invalid namespace, or one given with
                ``all_namespaces=True``.
        """
        return self.store.events(
            namespace=self._scope(namespace, all_namespaces), subject=request_id
        )

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

    def _drive(self, flow: Generator[Op, Any, T], seen: Observation | None = None) -> T:
        """Perform each operation the flow yields until it returns or raises; ``seen``
        (telemetry on) learns whether ``fn`` ran and what outcome was recorded.

        An exception of ``fn`` the flow could not raise itself (:class:`Reraise`: a
        ``StopIteration``) is raised here, outside the generator and outside any
        ``except`` block, so the caller gets it exactly as ``fn`` raised it.
        """
        store = self.store
        wake_key: tuple[str, str, str] | None = None
        slot = None
        claim_sent = 0.0  # monotonic: when the last claim was sent (its lease counts from it)
        op: Op | None = None
        answer: Any = None
        error: BaseException | None = None
        raised: BaseException
        try:
            while True:
                try:
                    op = flow.send(answer) if error is None else flow.throw(error)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                except Reraise as carried:
                    raised = carried.error
                    break
                answer = error = None
                if isinstance(op, Run):
                    wake_key = (store.identity, op.context.namespace, op.context.request_id)
                    slot = Slot()  # held before registering: ``finally`` can always end it
                    wakeups.register(wake_key, slot)
                    answer = self._run(op, claim_sent)
                    if seen is not None:
                        seen.ran = not answer.unstarted
                    continue
                if seen is not None and isinstance(op, Complete):
                    seen.status = op.completion.status
                if isinstance(op, Claim):
                    claim_sent = lease_clock()
                try:
                    answer = self._perform(op)
                except BaseException as exc:  # noqa: BLE001 - thrown into the flow
                    error = exc
                    if seen is not None and isinstance(op, Complete):
                        seen.unrecorded = True
            raise raised
        except BaseException as exc:
            if isinstance(op, Claim) and not isinstance(exc, Exception):
                self._undo_claim(op.request, answer, exc)  # interrupted between claim and fn
            elif isinstance(op, Run) and not op.started:  # ended on the way to fn
                ctx = op.context
                self._release_unrun(
                    ctx.namespace,
                    ctx.request_id,
                    ctx.fencing_token,
                    ctx.action,
                    ctx.execution_id,
                    ended_before_fn(exc),
                    "unrun",
                )
            raise
        finally:
            if slot is not None and wake_key is not None:
                wakeups.done(wake_key, slot)  # first: nothing before it to interrupt
            flow.close()

    def _undo_claim(self, request: ClaimRequest, answer: Any, exc: BaseException) -> None:
        """An interrupt (``KeyboardInterrupt``, ``SystemExit``) ends the call right after
        its claim, before ``fn`` could run: while the claim commits (it may have committed
        all the same) or between its answer and ``fn``. A claim of this call that
        landed is released (the next call runs ``fn``) instead of left PENDING, to read as
        in doubt once its lease runs out. The record is this call's only if it carries
        the execution id this call's claim wrote, is still PENDING under this call's
        owner, and was not taken over by a reconciler since (its lease ran out). Never
        raises an ``Exception``: a claim left behind is safe, only in doubt."""
        record = answer.record if isinstance(answer, ClaimResult) and answer.won else None
        if record is None:
            try:
                record, _ = self.store.get(request.namespace, request.request_id)
            except Exception:  # noqa: BLE001 - the store's failure: the lease decides
                return
            if (
                record is None
                or record.execution_id != request.execution_id
                or record.status is not Status.PENDING
                or record.lease_owner != request.owner
                or record.ended_attempt == record.attempt  # a reconciler took it over
            ):
                return
        self._release_unrun(
            record.namespace,
            record.request_id,
            record.fencing_token,
            record.action,
            record.execution_id,
            ended_before_fn(exc),
            "unrun",
        )

    def _perform(self, op: Op) -> Any:
        store = self.store
        if isinstance(op, Get):
            if op.first and self._claim_first:
                return cast(ClaimFirstStore, store).look(op.namespace, op.request_id)
            return store.get(op.namespace, op.request_id)
        if isinstance(op, Emit):
            store.record_event(op.event, buffered=op.buffered)
            return None
        if isinstance(op, Claim):
            if op.new:
                return cast(ClaimFirstStore, store).claim_new(op.request)
            return store.claim(op.request)
        if isinstance(op, Complete):
            return store.complete(op.completion)
        if isinstance(op, Wait):
            wakeups.wait((store.identity, op.namespace, op.request_id), op.timeout)
            return None
        if isinstance(op, TakeOver):
            return store.take_over(
                op.namespace, op.request_id, op.expected_token, op.owner, op.lease_ms
            )
        if isinstance(op, Resolve):
            return store.resolve(op.resolution)
        if isinstance(op, AskHook):
            with heartbeats.beating(
                store,
                op.request.namespace,
                op.request.request_id,
                op.request.fencing_token,
                op.lease_ms,
            ):
                return capture(op.hook, op.request)
        raise TypeError(f"unknown operation {op!r}")  # pragma: no cover

    def _run(self, op: Run, claim_sent: float) -> FnOutcome:
        """``fn`` under its heartbeat, its lease counted from ``claim_sent`` (monotonic
        seconds); an interrupt before ``op.started`` is set is undone by :meth:`_drive`,
        whatever line of the way here it landed on."""
        ctx = op.context
        outer = _current.get()  # restored as it was, not by a token an interrupt may lose
        beating = None
        try:
            _current.set(ctx)
            beating = heartbeats.running(self.store, ctx, op.lease_ms, claim_sent)
            with beating:
                op.started = True
                return capture(op.fn, ctx)
        finally:
            # Also here, inline (plain stores and a C-level discard: no call where a
            # signal handler runs): an interrupt as the ``with`` calls __exit__ would
            # otherwise leave the lease renewed for as long as the process lives.
            try:
                if beating is not None:
                    beating.beat.view.ended = True
                    beating.beater.beats.discard(beating.beat)
            finally:
                _current.set(outer)
