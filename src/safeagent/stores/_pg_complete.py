"""Completions and the other writes on a claimed record, in the PostgreSQL store.

``_PgCompletions``: ``complete`` (one statement when it can: ``_complete_fast``,
``_complete_carrying``; else ``_complete_general``, whose refusal by the fencing check
is reported by ``_refused``, and whose second try after a lost connection recognises
its own committed write: ``_carries``, ``_released_then_claimed``), then ``resolve``
(settling a case: ``_settle``), ``renew``, ``renew_many`` and ``take_over``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from safeagent._audit import AuditEvent
from safeagent._receipt import Record, Status
from safeagent.errors import StoreError
from safeagent.stores._base import (
    Completion,
    Lease,
    Resolution,
    WriteResult,
    completion_events,
    resolved_event,
    settled_event,
    take_over_event,
)
from safeagent.stores._pg_conn import _lost
from safeagent.stores._pg_events import Witness, _completion_witness, _PgEvents
from safeagent.stores._pg_fast import _completion_fragments
from safeagent.stores._rows import N_COLUMNS, row_to_case, row_to_record


def _carries(record: Record, completion: Completion) -> bool:
    """``record`` holds exactly what ``completion`` writes: its status, result and error
    under its fencing token (and the action and execution id it names). Only a completion
    holding that token writes under it, and fencing accepts only the first one: this is
    ``completion``'s own write, committed by a try whose reply was lost."""
    return (
        record.fencing_token == completion.fencing_token
        and record.status is completion.status
        and record.result_json == completion.result_json
        and record.error == completion.error
        and completion.action in (None, record.action)
        and completion.execution_id in (None, record.execution_id)
    )


def _released_then_claimed(record: Record, completion: Completion) -> bool:
    """``record`` proves that ``completion``, a release (RELEASED), committed, although
    another claim has since replaced it: the record holds another execution id under the
    very next fencing token.

    The execution id changes only when a claim takes a RELEASED record over, raising the
    token by one; nothing else raises it without keeping the execution id (a take-over)
    or leaving the record RELEASED (a resolution, a re-run: no). So the one claim that
    raised ``completion``'s token found the record RELEASED under that token, still this
    attempt's (still its execution id), and only a completion holding the token, this
    attempt's own, releases it: this completion. A token further on proves nothing (a
    take-over, then a release by the new holder, then a claim looks the same); an
    in-doubt completion taken over since is not told from a lease that expired."""
    return (
        completion.status is Status.RELEASED
        and completion.execution_id is not None
        and record.execution_id != completion.execution_id
        and record.fencing_token == completion.fencing_token + 1
    )


class _PgCompletions(_PgEvents):
    """Completions, resolutions, renewals and take-overs (module docstring)."""

    def complete(self, completion: Completion) -> WriteResult:
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        terminal = completion.status in (Status.SUCCEEDED, Status.FAILED)
        settle = completion.settle_case if terminal else None
        action, execution_id = completion.action, completion.execution_id
        known = None if action is None or execution_id is None else (action, execution_id)
        try:
            if known is not None and settle is None and self._fast_path:
                fragments = _completion_fragments(completion, *known, self.chain_shards)
                if fragments is not None:
                    if not self._buffer:
                        done = self._complete_fast(completion, terminal, known, fragments)
                    else:
                        done = self._complete_carrying(completion, terminal, known, fragments)
                    if done is not None:
                        return done
            return self._complete_general(completion, terminal, settle)
        except StoreError as err:
            if not _lost(err):
                raise
        # The connection was lost, perhaps after the completion was committed: once more, on
        # a connection the pool has just opened (_failed). Fencing refuses a second write;
        # the refusal then finds this very completion stored (_carries) and reports it.
        return self._complete_general(completion, terminal, settle, self._held())

    def _completion_params(self, completion: Completion, terminal: bool) -> tuple[Any, ...]:
        """(now, status, result, etype, emsg, terminal, ns, rid, token): the parameters the
        general and the fast completion statements begin with."""
        error = completion.error
        return (
            self._at(),
            completion.status.value,
            completion.result_json,
            None if error is None else error.type,
            None if error is None else error.message,
            terminal,
            completion.namespace,
            completion.request_id,
            completion.fencing_token,
        )

    def _complete_fast(
        self,
        completion: Completion,
        terminal: bool,
        known: tuple[str, str],
        fragments: tuple[Any, ...],
    ) -> WriteResult | None:
        """The completion of the attempt it names, and its one event, in one autocommit
        statement: one round trip. None (nothing changed) unless it was accepted in time:
        the general path then writes what it must (a rejection, a late completion)."""
        row = self._one(
            self._complete_fast_sql,
            (*self._completion_params(completion, terminal), *known, *fragments),
        )
        if row is None:
            return None
        return WriteResult(accepted=True, record=row_to_record(row))

    def _complete_carrying(
        self,
        completion: Completion,
        terminal: bool,
        known: tuple[str, str],
        fragments: tuple[Any, ...],
    ) -> WriteResult | None:
        """:meth:`_complete_fast` that also writes the buffered audit events in its one
        statement (COMPLETE_FAST_CARRYING); None when it cannot (_carrying), or when the
        completion was not accepted in time: nothing was written, the events go back to
        the buffer, and the general path follows, carrying them."""

        def run(shards: str, rows: str, count: int) -> Any:
            params = (*self._completion_params(completion, terminal), *known, shards)
            return self._one(
                self._complete_carrying_sql,
                (*params, *fragments[1:], fragments[0], rows, count),
            )

        done = self._carrying(fragments[0], run, _completion_witness(completion))
        if done is None:
            return None
        events, row = done
        if row is None:
            self._buffer.put_back(events)
            return None
        return WriteResult(accepted=True, record=row_to_record(row))

    def _complete_general(
        self,
        completion: Completion,
        terminal: bool,
        settle: str | None,
        carried: list[AuditEvent] | None = None,
    ) -> WriteResult:
        """``carried``: this is the second try of a completion whose connection was lost,
        with the buffered events its first try carried (complete). A completion carries
        buffered events only if it is accepted: its outcome event then tells a later write
        whether they were committed (_write)."""
        witness = _completion_witness(completion)
        first = carried is None
        with self._write(pipelined=True, hold=first, carry=carried, witness=witness) as cur:
            # A completion that settles a case locks the case row after its own: its chain
            # heads are then taken at the end (after the case), not by this statement.
            shards, literal = (
                (set(), "{}")
                if settle is not None
                else self._lock_for(completion.namespace, completion.request_id)
            )
            cur.execute(
                self._complete_sql, (*self._completion_params(completion, terminal), literal)
            )
            rows = cur.fetchall()
            if rows[0][0] is None:  # refused by the fencing check: report what is there
                return self._refused(cur, completion, first, witness)
            self._locked(shards, rows)
            after, now = row_to_record(rows[0]), int(rows[0][N_COLUMNS])
            events = completion_events(completion, after, after, now)
            if settle is not None:
                events += self._settle(cur, after, settle, completion.actor, now)
            self._emit(events)
        late = after.lease_expires_at_ms is not None and now >= after.lease_expires_at_ms
        return WriteResult(accepted=True, record=after, late=late)

    def _refused(
        self, cur: psycopg.Cursor[Any], completion: Completion, first: bool, witness: Witness
    ) -> WriteResult:
        """A completion the fencing check refused: the record there, and a rejection
        audited, with none of the buffered events (_unclaimed). A second try (not
        ``first``) first looks for what its lost first try committed: the completion
        itself (accepted: nothing written again), or its rejection (audited once)."""
        ns, rid = completion.namespace, completion.request_id
        before, now = self._record_at(cur, ns, rid)
        if not first:
            if before is not None and _carries(before, completion):
                # The first try committed, and with it its events and those it carried:
                # accepted, nothing written again, no rejection audited.
                self._tx.buffered.clear()
                expiry = before.lease_expires_at_ms
                late = expiry is not None and before.updated_at_ms >= expiry
                return WriteResult(accepted=True, record=before, late=late)
            if (before is not None and _released_then_claimed(before, completion)) or (
                self._witnessed(witness)(cur)
            ):
                # The first try committed (its own event is in the trail), and the record
                # moved on since: a release claimed again, an in-doubt outcome taken over by
                # a reconcile round. Accepted, as it was, nothing written again; the record
                # is the one there now.
                self._tx.buffered.clear()
                return WriteResult(accepted=True, record=before)
        self._unclaimed(cur, None)
        rejected = (ns, rid, "completion_rejected", None, completion.fencing_token)
        if not first and self._witnessed(rejected)(cur):
            return WriteResult(accepted=False, record=before)  # the first try's, committed
        if before is None:
            now = 0  # no record: the rejection is stamped 0, as this store always has
        self._emit(completion_events(completion, before, None, now))
        return WriteResult(accepted=False, record=before)

    def resolve(self, resolution: Resolution) -> WriteResult:
        # Not tried again on a lost connection (StoreError): a resolution writes nothing
        # unique to itself (the token goes up by one, whoever resolved), so a second try
        # could not tell a first that committed from an identical resolution by another
        # operator, and a re-run's RELEASED record may be claimed again meanwhile.
        terminal = resolution.status in (Status.SUCCEEDED, Status.FAILED)
        error = resolution.error
        with self._write() as cur:
            if resolution.rerun:
                cur.execute(
                    self._sql["RERUN"],
                    self._p(
                        ns=resolution.namespace,
                        rid=resolution.request_id,
                        token=resolution.expected_token,
                    ),
                )
            else:
                cur.execute(
                    self._sql["RESOLVE"],
                    self._p(
                        status=resolution.status.value,
                        result=resolution.result_json,
                        etype=None if error is None else error.type,
                        emsg=None if error is None else error.message,
                        terminal=terminal,
                        ns=resolution.namespace,
                        rid=resolution.request_id,
                        token=resolution.expected_token,
                    ),
                )
            row = cur.fetchone()
            if row is None:
                return WriteResult(accepted=False, record=self._current(cur, resolution))
            record, now = row_to_record(row), int(row[-1])
            events = [resolved_event(resolution, record, now)]
            if terminal and resolution.settle_case is not None:
                events += self._settle(cur, record, resolution.settle_case, resolution.actor, now)
            self._emit(events)
        return WriteResult(accepted=True, record=record)

    def _current(self, cur: psycopg.Cursor[Any], resolution: Resolution) -> Record | None:
        return self._record_at(cur, resolution.namespace, resolution.request_id)[0]

    def _settle(
        self, cur: psycopg.Cursor[Any], record: Record, case_id: str, actor: str, now: int
    ) -> list[AuditEvent]:
        cur.execute(self._sql["SETTLE_CASE"], {"at": now, "ns": record.namespace, "cid": case_id})
        row = cur.fetchone()
        if row is None:
            return []
        return [settled_event(row_to_case(row), record.execution_id, actor, now)]

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        # Not tried again on a lost connection (StoreError): the heartbeat tries a failed
        # renewal again itself within 50 ms, on a connection opened after the drain.
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        params = (self._at(), lease_ms, namespace, request_id, fencing_token)
        if self._buffer:  # buffered events go with the next write, so this one is a transaction
            with self._write() as cur:
                cur.execute(self._sql["RENEW"], params)
                return cur.rowcount == 1
        # otherwise the renewal is a single statement: its own transaction, one round trip
        with self._connection() as conn:
            return conn.execute(self._sql["RENEW"], params).rowcount == 1

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        # As renew: not tried again on a lost connection; the heartbeat tries again soon.
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        params = (
            self._at(),
            [lease[0] for lease in leases],
            [lease[1] for lease in leases],
            [lease[2] for lease in leases],
            [lease[3] for lease in leases],
        )
        if self._buffer:  # buffered events go with the next write, so this one is a transaction
            with self._write() as cur:
                cur.execute(self._sql["RENEW_MANY"], params)
                renewed = set(cur.fetchall())
        else:  # one statement: its own transaction, one round trip
            with self._connection() as conn:
                renewed = set(conn.execute(self._sql["RENEW_MANY"], params).fetchall())
        return [(ns, rid, token) in renewed for ns, rid, token, _ in leases]

    def take_over(
        self, namespace: str, request_id: str, expected_token: int, owner: str, lease_ms: int
    ) -> WriteResult:
        # Not tried again on a lost connection (StoreError): a take-over keeps the execution
        # id and writes nothing unique to itself, so a second try could not tell its own
        # committed take-over from that of another caller with the same owner name (threads
        # of one guard), and both would then run the reconcile hook, or fn.
        with self._write() as cur:
            cur.execute(
                self._sql["TAKE_OVER"],
                self._p(
                    ns=namespace,
                    rid=request_id,
                    token=expected_token,
                    owner=owner,
                    lease_ms=lease_ms,
                ),
            )
            row = cur.fetchone()
            if row is None:
                return WriteResult(
                    accepted=False, record=self._record_at(cur, namespace, request_id)[0]
                )
            record, now = row_to_record(row), int(row[-1])
            self._emit([take_over_event(record, owner, now)])
        return WriteResult(accepted=True, record=record)
