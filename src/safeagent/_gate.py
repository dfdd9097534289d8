"""The finality gate's driver: cases, signals, operator resolution and settlement.

The rules are in :mod:`safeagent._cases` (pure); the store applies them atomically. A
case's side effect runs through the execution guard under request id ``case:<case_id>``
with the fingerprint over ``(case_id, outcome, action)``, only from FINAL, and a terminal
receipt moves the case to SETTLED in the same transaction as the completion
(docs/design.md section 4).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from safeagent._aguard import AsyncGuard
from safeagent._case_view import Case, case_of, list_cases, read_case, write_case
from safeagent._cases import (
    BEFORE_FINAL,
    CaseRow,
    CaseState,
    ConsensusPolicy,
    Signal,
    apply_resolution,
    apply_signal,
    check_signal,
)
from safeagent._core import GuardCore, scope
from safeagent._flow import Call, execute_flow
from safeagent._guard import Guard
from safeagent._keys import canonical_json, check_name, check_request_id, check_text
from safeagent._policy import CASE_PREFIX, Seconds
from safeagent._receipt import ExecutionContext, Receipt
from safeagent._telemetry import observe
from safeagent.errors import (
    ConfigurationError,
    InvalidInputError,
    InvalidPayloadError,
    InvalidRequestIdError,
    NotFinalError,
)


def _states(states: Collection[CaseState | str] | None) -> tuple[CaseState, ...] | None:
    """``states=`` as case states: members or their names (``"FINAL"``).

    Raises:
        InvalidInputError: a bare ``str``, or a value that names no state.
    """
    if states is None:
        return None
    if isinstance(states, str):
        raise InvalidInputError(f"states must be a collection of case states, got {states!r}")
    try:
        return tuple(CaseState(s) for s in states)
    except (ValueError, TypeError) as exc:
        names = ", ".join(state.value for state in CaseState)
        raise InvalidInputError(f"states must name case states ({names}): {exc}") from exc


def _check_policy(policy: object) -> None:
    """Raises ConfigurationError: ``policy`` is neither ``None`` nor a ConsensusPolicy."""
    if policy is not None and not isinstance(policy, ConsensusPolicy):
        raise ConfigurationError(f"policy must be a ConsensusPolicy, got {policy!r}")


def _check_guard(gate: str, guard: object, wanted: type) -> None:
    """Refuse a gate's ``guard`` of the wrong kind when the gate is built, not at its first
    settlement (an AttributeError and a coroutine never awaited).

    Raises:
        ConfigurationError: ``guard`` is not a ``wanted`` (Guard or AsyncGuard).
    """
    if isinstance(guard, wanted):
        return
    if isinstance(guard, AsyncGuard):
        advice = "use AsyncFinalityGate(guard) with an AsyncGuard"
    elif isinstance(guard, Guard):
        advice = "use FinalityGate(guard) with a Guard"
    else:
        advice = f"wrap a store in one: {gate}({wanted.__name__}(store))"
    article = "an" if wanted is AsyncGuard else "a"
    raise ConfigurationError(
        f"{gate} takes {article} {wanted.__name__}, got {type(guard).__name__}: {advice}"
    )


def _same_policy(case: CaseRow, policy: ConsensusPolicy | None) -> None:
    """Refuse an ``open(policy=...)`` of an existing case opened with another policy: a
    case's policy never changes, and returning it silently would let a weaker one (an
    auto-open by any gate's ``signal``) decide what ``settle`` runs.

    Raises:
        ConfigurationError: ``policy`` is given and differs from the stored one; nothing
            changed (``case_id``, ``namespace``, ``threshold`` and ``quorum`` as stored,
            ``requested``: ``policy``).
    """
    if policy is None or (case.threshold, case.quorum) == (policy.threshold, policy.quorum):
        return
    raise ConfigurationError(
        f"case {case.case_id!r} in namespace {case.namespace!r} exists with threshold "
        f"{case.threshold!r} and quorum {case.quorum!r}, not the threshold "
        f"{policy.threshold!r} and quorum {policy.quorum!r} asked for: a case's policy never "
        "changes once it is opened (nothing changed; open it under a new case id)",
        case_id=case.case_id,
        namespace=case.namespace,
        threshold=case.threshold,
        quorum=case.quorum,
        requested=policy,
    )


def _check_settle_fn(fn: object, *, sync: bool) -> None:
    """Refuse a settlement ``fn`` that cannot be called as ``fn(outcome, context)``.

    Raises:
        ConfigurationError: ``fn`` is not callable, its signature cannot take two
            positional arguments, or it is ``async def`` and ``sync`` (use
            :class:`AsyncFinalityGate`). A signature that cannot be read (some builtins)
            is not checked.
    """
    if not callable(fn):
        raise ConfigurationError(
            f"fn must be a function called as fn(outcome, context), got {fn!r}; nothing ran"
        )
    if sync and (
        inspect.iscoroutinefunction(fn)
        or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
    ):
        raise ConfigurationError(f"{fn!r} is async: settle it with AsyncFinalityGate; nothing ran")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins: nothing to check
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        raise ConfigurationError(
            f"fn must take (outcome, context): {fn!r} cannot ({exc}); nothing ran"
        ) from exc


MAX_CASE_ID_LENGTH = 255 - len(CASE_PREFIX)
"""Longest case id, in characters: its settlement's request id ``case:<case_id>`` must be
a valid request id (at most 255 characters)."""


def _check_case_id(case_id: object) -> str:
    """Validate a case id: a non-empty ``str`` such that ``case:<case_id>``, the request id
    its settlement runs under, is a valid request id: at most :data:`MAX_CASE_ID_LENGTH`
    (250) characters of valid UTF-8 without NUL. So every case that can go FINAL can be
    settled, and every store can hold it.

    Raises:
        InvalidInputError: anything else (checked before the store is touched).
    """
    if not isinstance(case_id, str) or not case_id:
        raise InvalidInputError(f"case id must be a non-empty str, got {case_id!r}")
    try:
        check_request_id(CASE_PREFIX + case_id)
    except InvalidRequestIdError:
        what = f"{len(case_id)} characters" if len(case_id) > MAX_CASE_ID_LENGTH else f"{case_id!r}"
        raise InvalidInputError(
            f"case id must be 1 to {MAX_CASE_ID_LENGTH} characters of valid UTF-8 without "
            f"NUL (it is settled under request id {CASE_PREFIX}<case id>), got {what}"
        ) from None
    return case_id


def _check_reason(reason: object) -> str:
    return check_text("reason", reason)


class _GateCore:
    """Validation and bookkeeping shared by :class:`FinalityGate` and its async twin."""

    guard: GuardCore
    policy: ConsensusPolicy

    def _ns(self, namespace: str | None) -> str:
        return self.guard.namespace if namespace is None else check_name("namespace", namespace)

    def _signal_args(
        self,
        case_id: str,
        source: str,
        outcome: str,
        confidence: float,
        metadata: Mapping[str, Any] | None,
        namespace: str | None,
    ) -> tuple[str, Signal, dict[str, Any]]:
        ns = self._ns(namespace)
        _check_case_id(case_id)
        conf = check_signal(source, outcome, confidence)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidPayloadError(
                f"metadata must be a JSON object (a mapping), got {type(metadata).__name__}"
            )
        meta = dict(metadata or {})
        canonical_json(meta)  # a typed error now, not a store error later
        return ns, Signal(source, outcome, conf, meta), {"metadata": self.guard.redact(meta)}

    def _resolve_args(
        self, case_id: str, outcome: str, by: str, reason: str, namespace: str | None
    ) -> str:
        ns = self._ns(namespace)
        _check_case_id(case_id)
        outcome = check_name("outcome", outcome)
        by = check_name("by", by)
        _check_reason(reason)
        return ns

    def _settle_args(
        self, case_id: str, action: str, namespace: str | None, fn: object, *, sync: bool
    ) -> str:
        """Validate a settlement's case id, action, namespace and ``fn`` before the store is
        read: a settlement that could never start must not settle its case as FAILED."""
        ns = self._ns(namespace)
        _check_case_id(case_id)
        action = check_name("action", action)
        _check_settle_fn(fn, sync=sync)
        return ns

    def _settle_call(
        self,
        ns: str,
        case_id: str,
        row: CaseRow | None,
        live: Sequence[Signal],
        action: str,
        options: dict[str, Any],
    ) -> tuple[Call, str]:
        """Check the case is FINAL (or SETTLED) and prepare its settlement call."""
        if row is None or row.state in BEFORE_FINAL:
            state = None if row is None else row.state
            raise NotFinalError(
                f"case {case_id!r} is {'absent' if state is None else state.value}: "
                "its side effect runs only once it is FINAL",
                case_id=case_id,
                namespace=ns,
                state=state,
                tally=None if row is None else row.policy.tally(live),
            )
        outcome = row.outcome
        assert outcome is not None
        call = self.guard._prepare(
            CASE_PREFIX + case_id,
            action,
            {"case_id": case_id, "outcome": outcome},
            ns,
            (),
            options["wait"],
            options["lease"],
            options["not_executed"],
            options["outcome_unknown"],
            settle_case=case_id,
        )
        return call, outcome


class FinalityGate(_GateCore):
    """Lets a side effect run only once the decision about it is final.

    Sources (agents, models, people) send signals about a case; the policy decides when
    its outcome is FINAL; :meth:`settle` then runs the side effect once through the guard.
    Cases live in the guard's store, so every store (memory, SQLite, PostgreSQL) holds them.

    Args:
        guard: the :class:`~safeagent.Guard` whose store holds the cases and runs
            settlements.
        policy: the :class:`ConsensusPolicy` for cases opened without one
            (default: threshold 0.8, quorum 1): by :meth:`open` without ``policy=``, and
            by :meth:`signal` reaching a case that does not exist. An existing case keeps
            its own.

    Raises:
        ConfigurationError: ``guard`` is not a :class:`~safeagent.Guard` (an
            :class:`~safeagent.AsyncGuard` drives :class:`AsyncFinalityGate`), or
            ``policy`` is not a :class:`ConsensusPolicy`.

    Example::

        gate = FinalityGate(Guard(), policy=ConsensusPolicy(threshold=0.7, quorum=2))
        gate.signal("refund-17", "fraud-model", "approve", 0.9)
        gate.signal("refund-17", "policy-agent", "approve", 0.8)   # -> FINAL "approve"
        gate.settle("refund-17", "issue_refund", lambda outcome, ctx: refund(...))
    """

    guard: Guard

    def __init__(self, guard: Guard, *, policy: ConsensusPolicy | None = None) -> None:
        _check_guard("FinalityGate", guard, Guard)
        self.guard = guard
        self.store = guard.store
        _check_policy(policy)
        self.policy = policy or ConsensusPolicy()

    def open(
        self,
        case_id: str,
        *,
        policy: ConsensusPolicy | None = None,
        namespace: str | None = None,
    ) -> Case:
        """Open a case (OPEN) with ``policy`` (default: the gate's), or return it if it
        exists. A case's policy never changes once opened: an existing case is returned
        with its own policy when ``policy`` is not given, and refused when ``policy`` is
        given and differs (so a case opened first by another gate's :meth:`signal`, with
        that gate's policy, cannot decide under a weaker policy than you asked for).

        Raises:
            InvalidInputError: a bad case id or namespace; nothing is recorded.
            ConfigurationError: ``policy`` is not a ConsensusPolicy, or the case exists
                with another threshold or quorum than ``policy`` (the error's
                ``threshold``, ``quorum``: as stored; ``requested``: ``policy``);
                nothing changes.
        """
        ns = self._ns(namespace)
        _check_policy(policy)
        _check_case_id(case_id)
        p = policy or self.policy
        opened = self.store.open_case(ns, case_id, p.threshold, p.quorum)
        _same_policy(opened, policy)
        row, live = read_case(self.store, ns, case_id)  # the row and its signals, together
        return case_of(opened, []) if row is None else case_of(row, live)

    def signal(
        self,
        case_id: str,
        source: str,
        outcome: str,
        confidence: float,
        *,
        metadata: Mapping[str, Any] | None = None,
        namespace: str | None = None,
        open_absent: bool = True,
    ) -> Case:
        """Record ``source``'s signal and apply the transitions it causes.

        Opens the case with the gate's policy if it does not exist (``open_absent=False``:
        refuses instead, so that only whoever opens cases sets their policy). A case that exists
        keeps the policy it was opened with, whatever this gate's: so the first gate to
        reach a case fixes its policy. To be sure of a case's policy, :meth:`open` it with
        ``policy=`` before any signal (it refuses a case already opened with another).
        Before FINAL, the signal replaces the source's earlier one (audited with what it
        replaced); after FINAL it is recorded as late and changes nothing.

        Every text argument must be valid UTF-8 without NUL (no lone surrogates), so that
        every store holds it the same way.

        Args:
            case_id: the case: 1 to 250 characters, so that its settlement's request id
                ``case:<case_id>`` is valid.
            source: who signals (an agent, model or person): 1 to 255 characters.
            outcome: what it says should happen: 1 to 255 characters.
            confidence: in [0, 1]: an ``int`` or ``float``, converted (``float()``) before
                it is checked, and kept as checked.
            metadata: JSON object kept with the signal (redacted in the audit trail).
            open_absent: open an absent case (default), or refuse it.

        Returns:
            The case after the signal.

        Raises:
            InvalidInputError: a bad field (:class:`~safeagent.InvalidPayloadError` for
                metadata that is not a JSON object); nothing is recorded.
            InvalidTransitionError: no such case, with ``open_absent=False``; nothing is
                recorded.
        """
        ns, sig, detail = self._signal_args(
            case_id, source, outcome, confidence, metadata, namespace
        )
        return write_case(
            self.store,
            ns,
            case_id,
            lambda case, live: apply_signal(case, live, sig),
            signal=sig,
            actor=source,
            detail=detail,
            open_with=(self.policy.threshold, self.policy.quorum) if open_absent else None,
        )

    def resolve(
        self,
        case_id: str,
        outcome: str,
        *,
        by: str,
        reason: str,
        namespace: str | None = None,
    ) -> Case:
        """An operator's (or a human approver's) resolution: makes the case FINAL with
        ``outcome`` from RESOLVED_PROVISIONAL or IN_RECONCILIATION. Audited with ``by``
        and ``reason`` in the same transaction.

        Raises:
            InvalidInputError: a bad case id or namespace, an empty ``outcome``, ``by`` or
                ``reason``, or one that is not valid UTF-8 without NUL; nothing changes.
            InvalidTransitionError: no such case, or it is OPEN, FINAL or SETTLED;
                nothing changes.
        """
        ns = self._resolve_args(case_id, outcome, by, reason, namespace)
        return write_case(
            self.store,
            ns,
            case_id,
            lambda case, _live: apply_resolution(case, outcome),
            signal=None,
            actor=by,
            detail={"by": by, "reason": reason},
        )

    def settle(
        self,
        case_id: str,
        action: str,
        fn: Callable[[str, ExecutionContext], Any],
        *,
        namespace: str | None = None,
        wait: Seconds | None = None,
        lease: Seconds | None = None,
        not_executed: Collection[type[BaseException]] | None = None,
        outcome_unknown: Collection[type[BaseException]] | None = None,
    ) -> Receipt:
        """Run the case's side effect once, only from FINAL: ``fn(outcome, context)``.

        Runs through the guard under request id ``case:<case_id>`` with the payload
        ``{"case_id", "outcome"}`` (so the fingerprint covers case, outcome and action). A
        terminal receipt (succeeded or failed) moves the case to SETTLED in the same
        transaction; a release keeps it FINAL (the next call runs again); in doubt keeps it
        FINAL with the record in doubt. Asking again returns the stored receipt.

        Raises:
            InvalidInputError: a bad case id, action or namespace; nothing ran.
            ConfigurationError: ``fn`` cannot be called as ``fn(outcome, context)`` (or
                is ``async def``: use :class:`AsyncFinalityGate`); nothing ran.
            NotFinalError: the case does not exist or is not FINAL yet (with its state
                and tally); nothing ran.
            StoreError: the store failed, or the case's row cannot be read; nothing ran.
            Whatever :meth:`Guard.execute` raises (a replayed failure, in doubt, ...).
        """
        ns = self._settle_args(case_id, action, namespace, fn, sync=True)
        row, live = read_case(self.store, ns, case_id)
        call, outcome = self._settle_call(
            ns,
            case_id,
            row,
            live,
            action,
            {
                "wait": wait,
                "lease": lease,
                "not_executed": not_executed,
                "outcome_unknown": outcome_unknown,
            },
        )
        guard = self.guard
        with observe(call.action, call.namespace) as seen:
            receipt = guard._drive(
                execute_flow(call, lambda ctx: fn(outcome, ctx), guard._settings())
            )
            seen.replay = receipt.replay
        return receipt

    def get(self, case_id: str, *, namespace: str | None = None) -> Case | None:
        """The case as stored now (its row and live signals read together), or ``None``.

        Raises:
            InvalidInputError: a bad case id or namespace.
            StoreError: the store failed, or the case's row (or one of its live signals)
                cannot be read.
        """
        ns = self._ns(namespace)
        _check_case_id(case_id)
        row, live = read_case(self.store, ns, case_id)
        return None if row is None else case_of(row, live)

    def cases(
        self,
        *,
        namespace: str | None = None,
        states: Collection[CaseState | str] | None = None,
        all_namespaces: bool = False,
    ) -> list[Case]:
        """Cases in ``namespace`` (default: the guard's, as :meth:`get`, :meth:`signal`,
        :meth:`resolve` and :meth:`settle`), or in every namespace with
        ``all_namespaces=True`` (not both), oldest first, optionally
        by state (``states``: :class:`CaseState` members or their names, such as
        ``"FINAL"``). Each case is its row and live signals as read together, never a row
        of one moment with the signals of another; each carries its ``namespace``: pass
        it on (``gate.resolve(c.case_id, ..., namespace=c.namespace)``).

        .. versionchanged:: 0.3
            Lists the guard's namespace by default (it listed every namespace).

        Raises:
            InvalidInputError: a namespace that is not a valid name or is given with
                ``all_namespaces=True``, or ``states`` naming no case state.
            StoreError: the store failed, or case rows cannot be read (edited by hand or
                corrupt): named in the message and in the error's ``unreadable``; no
                listing is returned (``safeagent cases list`` shows the others).
        """
        ns = scope(self.guard.namespace, namespace, all_namespaces)
        return list_cases(self.store, ns, _states(states))

    def history(self, case_id: str, *, namespace: str | None = None) -> list[tuple[Signal, str]]:
        """Every signal of the case in arrival order with its status (live, replaced, late).

        Raises:
            InvalidInputError: a bad case id or namespace.
        """
        return self.store.case_signals(self._ns(namespace), _check_case_id(case_id))


class AsyncFinalityGate(_GateCore):
    """The ``async`` twin of :class:`FinalityGate`, on an :class:`~safeagent.AsyncGuard`
    (anything else, a :class:`~safeagent.Guard` too, is a ConfigurationError when the gate
    is built): the same arguments and behaviour, ``await``-able methods. ``fn`` of
    :meth:`settle` may be ``async def``."""

    guard: AsyncGuard

    def __init__(self, guard: AsyncGuard, *, policy: ConsensusPolicy | None = None) -> None:
        _check_guard("AsyncFinalityGate", guard, AsyncGuard)
        self.guard = guard
        self.store = guard.store
        _check_policy(policy)
        self.policy = policy or ConsensusPolicy()

    async def open(
        self,
        case_id: str,
        *,
        policy: ConsensusPolicy | None = None,
        namespace: str | None = None,
    ) -> Case:
        """See :meth:`FinalityGate.open`."""
        ns = self._ns(namespace)
        _check_policy(policy)
        _check_case_id(case_id)
        p = policy or self.policy
        opened = await self.guard._io(self.store.open_case, ns, case_id, p.threshold, p.quorum)
        _same_policy(opened, policy)
        row, live = await self.guard._io(read_case, self.store, ns, case_id)
        return case_of(opened, []) if row is None else case_of(row, live)

    async def signal(
        self,
        case_id: str,
        source: str,
        outcome: str,
        confidence: float,
        *,
        metadata: Mapping[str, Any] | None = None,
        namespace: str | None = None,
        open_absent: bool = True,
    ) -> Case:
        """See :meth:`FinalityGate.signal`."""
        ns, sig, detail = self._signal_args(
            case_id, source, outcome, confidence, metadata, namespace
        )
        return await self.guard._io(
            lambda: write_case(
                self.store,
                ns,
                case_id,
                lambda case, live: apply_signal(case, live, sig),
                signal=sig,
                actor=source,
                detail=detail,
                open_with=(self.policy.threshold, self.policy.quorum) if open_absent else None,
            )
        )

    async def resolve(
        self,
        case_id: str,
        outcome: str,
        *,
        by: str,
        reason: str,
        namespace: str | None = None,
    ) -> Case:
        """See :meth:`FinalityGate.resolve`."""
        ns = self._resolve_args(case_id, outcome, by, reason, namespace)
        return await self.guard._io(
            lambda: write_case(
                self.store,
                ns,
                case_id,
                lambda case, _live: apply_resolution(case, outcome),
                signal=None,
                actor=by,
                detail={"by": by, "reason": reason},
            )
        )

    async def settle(
        self,
        case_id: str,
        action: str,
        fn: Callable[[str, ExecutionContext], Any],
        *,
        namespace: str | None = None,
        wait: Seconds | None = None,
        lease: Seconds | None = None,
        not_executed: Collection[type[BaseException]] | None = None,
        outcome_unknown: Collection[type[BaseException]] | None = None,
    ) -> Receipt:
        """See :meth:`FinalityGate.settle`; ``fn`` may be ``async def``."""
        ns = self._settle_args(case_id, action, namespace, fn, sync=False)
        row, live = await self.guard._io(read_case, self.store, ns, case_id)
        call, outcome = self._settle_call(
            ns,
            case_id,
            row,
            live,
            action,
            {
                "wait": wait,
                "lease": lease,
                "not_executed": not_executed,
                "outcome_unknown": outcome_unknown,
            },
        )

        run: Callable[[ExecutionContext], Any]
        if inspect.iscoroutinefunction(fn):

            async def run(ctx: ExecutionContext) -> Any:
                return await fn(outcome, ctx)

        else:  # a plain fn runs in a worker thread, as AsyncGuard runs one (what it
            # returns, if awaitable, is awaited there too)

            def run(ctx: ExecutionContext) -> Any:
                return fn(outcome, ctx)

        guard = self.guard
        with observe(call.action, call.namespace) as seen:
            receipt = await guard._drive(execute_flow(call, run, guard._settings()))
            seen.replay = receipt.replay
        return receipt

    async def get(self, case_id: str, *, namespace: str | None = None) -> Case | None:
        """See :meth:`FinalityGate.get`."""
        ns = self._ns(namespace)
        _check_case_id(case_id)
        row, live = await self.guard._io(read_case, self.store, ns, case_id)
        return None if row is None else case_of(row, live)

    async def cases(
        self,
        *,
        namespace: str | None = None,
        states: Collection[CaseState | str] | None = None,
        all_namespaces: bool = False,
    ) -> list[Case]:
        """See :meth:`FinalityGate.cases`."""
        ns = scope(self.guard.namespace, namespace, all_namespaces)
        return await self.guard._io(list_cases, self.store, ns, _states(states))

    async def history(
        self, case_id: str, *, namespace: str | None = None
    ) -> list[tuple[Signal, str]]:
        """See :meth:`FinalityGate.history`."""
        return await self.guard._io(
            self.store.case_signals, self._ns(namespace), _check_case_id(case_id)
        )
