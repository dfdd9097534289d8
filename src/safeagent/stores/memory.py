"""An in-process store. NOT DURABLE: everything is lost when the process exits."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from safeagent._audit import AuditEvent
from safeagent._cases import CaseRow, CaseState, Signal
from safeagent._receipt import Record, Status
from safeagent.errors import InvalidTransitionError
from safeagent.stores._base import (
    CaseMutation,
    CaseUpdate,
    ClaimRequest,
    ClaimResult,
    Clock,
    Completion,
    Lease,
    Resolution,
    WriteResult,
    case_events,
    claimed_event,
    completion_events,
    purge_cutoff,
    purged_event,
    resolved_event,
    settled_event,
    stamped,
    state_change_event,
    system_clock_ms,
    take_over_event,
)
from safeagent.stores._rows import CHAIN_SHARDS, GENESIS, Heads, chain_rows, shard_of

_ids = itertools.count(1)


class MemoryStore:
    """A dict behind a lock: **not durable**, not shared between processes.

    For tests, examples and single-process experiments only; a crash or restart forgets
    every receipt, so a retry after it runs the side effect again. Audit events are
    written at once (nothing is buffered).

    Args:
        clock: returns integer milliseconds since the epoch; defaults to the system clock.
            Tests pass a fake clock to move leases forward.
    """

    durable = False
    durability = "memory"  # not durable: a restart forgets everything
    blocking = False  # AsyncGuard calls it inline: every method returns at once
    chain_shards = CHAIN_SHARDS  # audit chains

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or system_clock_ms
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], Record] = {}
        self._events: list[AuditEvent] = []
        self._heads: Heads = dict.fromkeys(range(self.chain_shards), (0, GENESIS))
        self._chain: list[tuple[Any, ...]] = []
        self._anchors: list[tuple[int, int, str, str]] = []
        self._cases: dict[tuple[str, str], CaseRow] = {}
        self._signals: dict[tuple[str, str], list[tuple[Signal, str]]] = {}
        # Per case, source -> index in _signals of its live signal, in arrival order: a
        # signal costs the same whatever the case's history (a scan per signal made a long
        # history quadratic).
        self._live_at: dict[tuple[str, str], dict[str, int]] = {}
        self._seq = itertools.count(1)
        self._identity = f"memory:{next(_ids)}"

    @property
    def identity(self) -> str:
        return self._identity

    def _append(self, event: AuditEvent, now_ms: int) -> None:
        event = replace(stamped(event, now_ms), id=next(self._seq))
        self._events.append(event)
        shard = shard_of(event.namespace, event.subject, self.chain_shards)
        (row,) = chain_rows([event], self._heads, [shard])
        self._chain.append((event.id, *row[9:11], row[11], row[12], *row[:9]))

    def get(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        with self._lock:
            return self._records.get((namespace, request_id)), self._clock()

    def claim(self, request: ClaimRequest) -> ClaimResult:
        with self._lock:
            now = self._clock()
            key = (request.namespace, request.request_id)
            old = self._records.get(key)
            if old is not None and old.status is not Status.RELEASED:
                return ClaimResult(won=False, record=old, now_ms=now)
            record = Record(
                namespace=request.namespace,
                request_id=request.request_id,
                action=request.action,
                fingerprint=request.fingerprint,
                status=Status.PENDING,
                payload_json=request.payload_json,
                result_json=None,
                error=None,
                execution_id=request.execution_id,
                attempt=1 if old is None else old.attempt + 1,
                fencing_token=1 if old is None else old.fencing_token + 1,
                lease_owner=request.owner,
                lease_expires_at_ms=now + request.lease_ms,
                downstream_key=request.downstream_key,
                created_at_ms=now if old is None else old.created_at_ms,
                claimed_at_ms=now,
                updated_at_ms=now,
                completed_at_ms=None,
            )
            self._records[key] = record
            self._append(claimed_event(request, record, now), now)
            return ClaimResult(won=True, record=record, now_ms=now)

    def complete(self, completion: Completion) -> WriteResult:
        with self._lock:
            now = self._clock()
            key = (completion.namespace, completion.request_id)
            old = self._records.get(key)
            after: Record | None = None
            if (
                old is not None
                and old.status is Status.PENDING
                and old.fencing_token == completion.fencing_token
            ):
                terminal = completion.status in (Status.SUCCEEDED, Status.FAILED)
                after = replace(
                    old,
                    status=completion.status,
                    result_json=completion.result_json,
                    error=completion.error,
                    updated_at_ms=now,
                    completed_at_ms=now if terminal else None,
                )
                self._records[key] = after
                if terminal and completion.settle_case is not None:
                    self._settle(after, completion.settle_case, completion.actor, now)
            for event in completion_events(completion, old, after, now):
                self._append(event, now)
            if after is None:
                return WriteResult(accepted=False, record=old)
            late = (
                old is not None
                and old.lease_expires_at_ms is not None
                and (now >= old.lease_expires_at_ms)
            )
            return WriteResult(accepted=True, record=after, late=late)

    def resolve(self, resolution: Resolution) -> WriteResult:
        with self._lock:
            now = self._clock()
            key = (resolution.namespace, resolution.request_id)
            old = self._records.get(key)
            expected = Status.FAILED if resolution.rerun else Status.IN_DOUBT
            if (
                old is None
                or old.fencing_token != resolution.expected_token
                or old.effective_status(now) is not expected
            ):
                return WriteResult(accepted=False, record=old)
            terminal = resolution.status in (Status.SUCCEEDED, Status.FAILED)
            if resolution.rerun:
                after = replace(  # a tombstone re-opened is no tombstone after
                    old,
                    status=Status.RELEASED,
                    fencing_token=old.fencing_token + 1,
                    updated_at_ms=now,
                    purged_at_ms=None,
                )
            else:
                after = replace(
                    old,
                    status=resolution.status,
                    result_json=resolution.result_json,
                    error=resolution.error,
                    fencing_token=old.fencing_token + 1,
                    updated_at_ms=now,
                    completed_at_ms=now if terminal else None,
                )
            self._records[key] = after
            self._append(resolved_event(resolution, after, now), now)
            if terminal and resolution.settle_case is not None:
                self._settle(after, resolution.settle_case, resolution.actor, now)
            return WriteResult(accepted=True, record=after)

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        with self._lock:
            now = self._clock()
            return [self._renew(lease, now) for lease in leases]

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        with self._lock:
            return self._renew((namespace, request_id, fencing_token, lease_ms), self._clock())

    def _renew(self, lease: Lease, now: int) -> bool:
        namespace, request_id, fencing_token, lease_ms = lease
        key = (namespace, request_id)
        old = self._records.get(key)
        if old is None or old.status is not Status.PENDING or old.fencing_token != fencing_token:
            return False
        self._records[key] = replace(old, lease_expires_at_ms=now + lease_ms, updated_at_ms=now)
        return True

    def take_over(
        self, namespace: str, request_id: str, expected_token: int, owner: str, lease_ms: int
    ) -> WriteResult:
        with self._lock:
            now = self._clock()
            key = (namespace, request_id)
            old = self._records.get(key)
            if (
                old is None
                or old.fencing_token != expected_token
                or old.effective_status(now) is not Status.IN_DOUBT
            ):
                return WriteResult(accepted=False, record=old)
            attempt_owner, ended_at = old.attempt_facts()  # recorded once per attempt
            after = replace(
                old,
                status=Status.PENDING,
                fencing_token=old.fencing_token + 1,
                lease_owner=owner,
                lease_expires_at_ms=now + lease_ms,
                updated_at_ms=now,
                attempt_owner=attempt_owner,
                attempt_ended_at_ms=ended_at,
                ended_attempt=old.attempt,
            )
            self._records[key] = after
            self._append(take_over_event(after, owner, now), now)
            return WriteResult(accepted=True, record=after)

    def _settle(self, record: Record, case_id: str, actor: str, now: int) -> None:
        key = (record.namespace, case_id)
        case = self._cases.get(key)
        if case is not None and case.state is CaseState.FINAL:
            case = replace(
                case, state=CaseState.SETTLED, version=case.version + 1, updated_at_ms=now
            )
            self._cases[key] = case
            self._append(settled_event(case, record.execution_id, actor, now), now)

    def record_event(self, event: AuditEvent, *, buffered: bool = False) -> None:
        with self._lock:
            self._append(event, self._clock())

    def flush_events(self) -> None:
        """Nothing to do: the memory store writes events at once."""

    def events(
        self,
        *,
        namespace: str | None = None,
        subject: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        with self._lock:
            out = [
                e
                for e in self._events
                if (e.id or 0) > after_id
                and (namespace is None or e.namespace == namespace)
                and (subject is None or e.subject == subject)
            ]
        return out if limit is None else out[:limit]

    def records(
        self,
        *,
        namespace: str | None = None,
        statuses: Sequence[Status] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Record], int]:
        with self._lock:
            out = [
                r
                for r in self._records.values()
                if (namespace is None or r.namespace == namespace)
                and (statuses is None or r.status in statuses)
            ]
            now = self._clock()
        out.sort(key=lambda r: (r.created_at_ms, r.namespace, r.request_id))
        return (out if limit is None else out[:limit]), now

    # -- cases -----------------------------------------------------------------------------

    def _live(self, key: tuple[str, str]) -> list[Signal]:
        history = self._signals.get(key, [])
        return [history[i][0] for i in self._live_at.get(key, {}).values()]

    def get_case(self, namespace: str, case_id: str) -> tuple[CaseRow | None, list[Signal]]:
        with self._lock:
            key = (namespace, case_id)
            return self._cases.get(key), self._live(key)

    def _open_case(
        self, namespace: str, case_id: str, policy: tuple[float, int], now: int
    ) -> CaseRow:
        case = self._cases.get((namespace, case_id))
        if case is None:
            case = _new_case(namespace, case_id, policy, now)
            self._store_new_case(case, now)
        return case

    def _store_new_case(self, case: CaseRow, now: int) -> None:
        """Keep a new case and append its audited opening."""
        self._cases[(case.namespace, case.case_id)] = case
        self._append(
            state_change_event(case, None, CaseState.OPEN, None, "safeagent", {}, now), now
        )

    def open_case(self, namespace: str, case_id: str, threshold: float, quorum: int) -> CaseRow:
        with self._lock:
            return self._open_case(namespace, case_id, (threshold, quorum), self._clock())

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
        with self._lock:
            now = self._clock()
            key = (namespace, case_id)
            case = self._cases.get(key)
            opening = case is None
            if case is None:
                if open_with is None:
                    raise InvalidTransitionError(
                        f"no case {case_id!r} in namespace {namespace!r}", case_id=case_id
                    )
                case = _new_case(namespace, case_id, open_with, now)
            live = self._live(key)
            # Asked before anything is written: a mutation that raises (any exception, a
            # KeyboardInterrupt too) leaves no case, no event and no link in the audit
            # chain, as a rolled-back transaction leaves nothing.
            change = mutate(case, live)
            if opening:
                self._store_new_case(case, now)
            history = self._signals.setdefault(key, [])
            if signal is not None:
                signal = replace(signal, at_ms=now)
                if not change.late:
                    live_at = self._live_at.setdefault(key, {})
                    before = live_at.pop(signal.source, None)
                    if before is not None:
                        history[before] = (history[before][0], "replaced")
                    live_at[signal.source] = len(history)
                    live = [sig for sig in live if sig.source != signal.source] + [signal]
                history.append((signal, "late" if change.late else "live"))
            after = case
            if change.path or (signal is not None and not change.late):
                after = replace(
                    case,
                    state=change.path[-1] if change.path else case.state,
                    provisional_outcome=change.stored_provisional(
                        change.path[-1] if change.path else case.state
                    ),
                    outcome=change.outcome,
                    version=case.version + 1,
                    updated_at_ms=now,
                    resolved_by=detail.get("by") or case.resolved_by,
                )
                self._cases[key] = after
            for event in case_events(case, change, signal, actor, detail, now):
                self._append(event, now)
            return CaseUpdate(case=after, live=live, change=change)

    def cases(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[CaseRow]:
        with self._lock:
            out = [
                c
                for c in self._cases.values()
                if (namespace is None or c.namespace == namespace)
                and (states is None or c.state in states)
            ]
        return sorted(out, key=lambda c: (c.created_at_ms, c.namespace, c.case_id))

    def cases_with_live(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[tuple[CaseRow, list[Signal]]]:
        """:meth:`cases`, each with its live signals (oldest first), all read at one
        moment."""
        with self._lock:
            out = [
                (c, self._live(key))
                for key, c in self._cases.items()
                if (namespace is None or c.namespace == namespace)
                and (states is None or c.state in states)
            ]
        return sorted(out, key=lambda p: (p[0].created_at_ms, p[0].namespace, p[0].case_id))

    def case_signals(self, namespace: str, case_id: str) -> list[tuple[Signal, str]]:
        with self._lock:
            return list(self._signals.get((namespace, case_id), []))

    # -- tamper evidence and retention ---------------------------------------------------

    def audit_chain(self) -> tuple[list[tuple[Any, ...]], Heads]:
        """Every chained event row (by shard and seq) and the chain heads."""
        with self._lock:
            rows = sorted(self._chain, key=lambda r: (r[1], r[2], r[0]))
            return rows, dict(self._heads)

    def chain_heads(self) -> Heads:
        with self._lock:
            return dict(self._heads)

    def add_anchor(self, heads_json: str, mac: str) -> tuple[int, int]:
        with self._lock:
            now = self._clock()
            self._anchors.append((len(self._anchors) + 1, now, heads_json, mac))
            return len(self._anchors), now

    def anchors(self, *, last: int | None = None) -> list[tuple[int, int, str, str]]:
        with self._lock:
            if last is None:
                return list(self._anchors)
            return self._anchors[max(0, len(self._anchors) - last) :]

    def purge(self, cutoff_ms: int, actor: str) -> dict[str, int]:
        """Retention; see :meth:`SQLiteStore.purge` (an expired PENDING lease counts as
        in doubt, at the store's clock)."""
        with self._lock:
            now = self._clock()
            cutoff_ms = purge_cutoff(cutoff_ms, now)
            counts = {"tombstoned": 0, "released": 0, "kept_pending": 0, "kept_in_doubt": 0}
            for key, record in list(self._records.items()):
                finished = record.completed_at_ms or record.updated_at_ms
                if (
                    record.status is Status.RELEASED
                    and record.purged_at_ms is None
                    and record.updated_at_ms < cutoff_ms
                ):  # the row stays: the next claim goes on from its fencing token
                    self._records[key] = _purged(record, now)
                    counts["released"] += 1
                elif (
                    record.status in (Status.SUCCEEDED, Status.FAILED)
                    and record.purged_at_ms is None
                    and finished < cutoff_ms
                ):
                    self._records[key] = _purged(record, now)
                    counts["tombstoned"] += 1
                elif record.status in (Status.PENDING, Status.IN_DOUBT):
                    # as read at now: an expired PENDING lease is in doubt
                    if record.effective_status(now) is Status.PENDING:
                        counts["kept_pending"] += 1
                    else:
                        counts["kept_in_doubt"] += 1
            self._append(purged_event(now, cutoff_ms, actor, counts), now)
            return counts

    def close(self) -> None:
        """Nothing to release."""


def _new_case(namespace: str, case_id: str, policy: tuple[float, int], now: int) -> CaseRow:
    """A case as it is opened: OPEN, version 1, with ``policy`` (threshold, quorum)."""
    return CaseRow(
        namespace, case_id, CaseState.OPEN, None, None, policy[0], policy[1], 1, now, now
    )


def _purged(record: Record, now: int) -> Record:
    """``record`` as retention leaves it: no payload, result or error message."""
    error = record.error
    return replace(
        record,
        payload_json="",
        result_json=None,
        purged_at_ms=now,
        error=None if error is None else replace(error, message=""),
    )
