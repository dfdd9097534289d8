"""An in-process store. NOT DURABLE: everything is lost when the process exits."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import replace

from safeagent._audit import AuditEvent
from safeagent._receipt import Record, Status
from safeagent.stores._base import (
    ClaimRequest,
    ClaimResult,
    Clock,
    Completion,
    Resolution,
    WriteResult,
    claimed_event,
    completion_events,
    resolved_event,
    stamped,
    system_clock_ms,
)

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

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or system_clock_ms
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], Record] = {}
        self._events: list[AuditEvent] = []
        self._seq = itertools.count(1)
        self._identity = f"memory:{next(_ids)}"

    @property
    def identity(self) -> str:
        return self._identity

    def _append(self, event: AuditEvent, now_ms: int) -> None:
        self._events.append(replace(stamped(event, now_ms), id=next(self._seq)))

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
            if (
                old is None
                or old.fencing_token != resolution.expected_token
                or old.effective_status(now) is not Status.IN_DOUBT
            ):
                return WriteResult(accepted=False, record=old)
            terminal = resolution.status in (Status.SUCCEEDED, Status.FAILED)
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
            return WriteResult(accepted=True, record=after)

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

    def close(self) -> None:
        """Nothing to release."""
