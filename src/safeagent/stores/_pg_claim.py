"""Reads and claims of the PostgreSQL store: the hot path's first step.

``_PgClaims``: ``get``, ``look``, ``claim_first`` and ``claim_new`` (claim before
reading), and ``claim``: one statement when it can (``_claim_fast``, carrying buffered
audit events: ``_claim_carrying``), else the general path (``_claim_general``), whose
second try after a lost connection recognises the claim's own committed row
(``_claimed_by``).
"""

from __future__ import annotations

from typing import Any

import psycopg

from safeagent._audit import AuditEvent
from safeagent._receipt import Record, Status
from safeagent.errors import StoreError
from safeagent.stores._base import ClaimRequest, ClaimResult, claimed_event
from safeagent.stores._pg_conn import _found, _lost
from safeagent.stores._pg_events import _claim_witness, _PgEvents
from safeagent.stores._pg_fast import _claim_fragments
from safeagent.stores._rows import N_COLUMNS, row_to_record

# The failures of CLAIM_NEW_FAST after which claim_new reads instead (the statement
# failed whole: nothing was written): a read-only transaction (a database turned
# read-only, a standby), the statement's lock_timeout (CLAIM_NEW_LOCK_TIMEOUT, or the
# session's when shorter), and a cancel (the session's own statement_timeout, shorter).
_READ_INSTEAD = (
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,
)


CLAIM_FIRST_FOUND_SHARE = 0.25
"""A store claims first (PostgresStore.claim_first) while less than this share of the
recent first steps of calls (claim_new's answers, and look's when a call read first)
found a record."""
_LOOK_WEIGHT = 1 / 16  # each answer's weight in that share (an exponential average)


def _claimed_by(record: Record, request: ClaimRequest, now: int) -> bool:
    """``record`` is the claim ``request`` made, untouched since, its lease live at ``now``:
    what a second try of a claim finds when its lost first try did commit.

    No other claim writes this execution id (a fresh one per request). Nothing changed the
    row since: every statement that changes a PENDING row sets updated_at_ms to its clock
    (the completion, renew, resolve, take-over) or leaves it PENDING no more, and a
    take-over needs the lease expired, so its clock is past claimed_at_ms + lease_ms > the
    claim's. The fencing token and the attempt are then the ones the claim set. A lease
    expired meanwhile is not won: anyone may take the record over (it reads as in doubt),
    so it is reported as found."""
    return (
        record.status is Status.PENDING
        and record.execution_id == request.execution_id
        and record.lease_owner == request.owner
        and request.lease_ms > 0
        and record.updated_at_ms == record.claimed_at_ms
        and record.lease_expires_at_ms == record.claimed_at_ms + request.lease_ms
        and now < record.lease_expires_at_ms
    )


class _PgClaims(_PgEvents):
    """Reads and claims (module docstring)."""

    def get(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        if self._buffer:
            self._maybe_flush()
        params = (self._at(), namespace, request_id)
        try:
            return _found(self._one(self._sql["GET"], params))
        except StoreError as err:
            if not _lost(err):
                raise
        return _found(self._one(self._sql["GET"], params))  # _again, inline (the hot path)

    def claim(self, request: ClaimRequest) -> ClaimResult:
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        try:
            if self._fast_path:
                fragments = _claim_fragments(request, self.chain_shards)
                if fragments is not None:
                    if not self._buffer:
                        return self._claim_fast(request, fragments)
                    done = self._claim_carrying(request, fragments)
                    if done is not None:
                        return done
            return self._claim_general(request)
        except StoreError as err:
            if not _lost(err):
                raise
        # The connection was lost, perhaps after the claim was committed: once more, on a
        # connection the pool has just opened (_failed), which recognises the claim's own
        # row (_claimed_by) and writes the events the first try carried only if it did not
        return self._claim_general(request, self._held())

    def look(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        """:meth:`get`, as a guard's first step for a call (it read first): whether it
        found a record counts in :attr:`claim_first`'s share, as claim_new's answers do.
        Other reads (a caller's receipt look-ups, a waiting call's polls) do not."""
        found = self.get(namespace, request_id)
        self._found += ((found[0] is not None) - self._found) * _LOOK_WEIGHT
        return found

    @property
    def claim_first(self) -> bool:
        """Whether a guard's next call should begin with :meth:`claim_new` (its one
        statement) rather than :meth:`get`; read once per call. Not while
        ``CLAIM_FIRST_FOUND_SHARE`` or more of the recent first steps (claim_new's
        answers and :meth:`look`'s, weighted over about the last 16) found a record, since
        a replay through claim_new costs about twice a read's CPU on both sides
        (BENCHMARKS.md, round 12)."""
        return (
            self._found < CLAIM_FIRST_FOUND_SHARE and self._fast_path and self._unwritable is None
        )

    def claim_new(self, request: ClaimRequest) -> ClaimResult:
        """Claim ``request``'s id only if it has no record; when it has one, change
        nothing and return it, not won (a RELEASED record too: the caller decides, then
        claims it with :meth:`claim`). The guard's first step here (``claim_first``): a
        first execution needs no read before its claim, one round trip fewer, while a
        replay's read is this statement, which on a conflict neither locks nor writes.
        It reads instead, as :meth:`get` does, where its one statement cannot serve: a
        database that turned read-only after the store opened, a wait longer than
        ``CLAIM_NEW_LOCK_TIMEOUT`` (100 ms, or the session's shorter ``lock_timeout``) on a
        transaction still changing the row, a statement cancelled (the session's
        ``statement_timeout``), buffered audit events it cannot carry (see
        :meth:`claim`), an event the statement cannot encode. Buffered events it can carry
        are written with the claim when it wins, and wait for the next write when it does
        not.

        Raises:
            StoreError: as :meth:`claim`; nothing was claimed, or a lost connection's
                second try could not tell.
        """
        if self._unwritable is not None or not self._fast_path:
            return self._read_then_claim(request)
        fragments = _claim_fragments(request, self.chain_shards)
        if fragments is None:
            return self._read_then_claim(request)
        try:
            if not self._buffer:
                return self._claim_new_fast(request, fragments)
            done = self._claim_new_carrying(request, fragments)
        except StoreError as err:
            if not _lost(err):
                if not isinstance(err.__cause__, _READ_INSTEAD):
                    raise
                # Nothing was written (the statement failed whole): a database that turned
                # read-only still answers replays, and a wait on a transaction changing the
                # row (CLAIM_NEW_LOCK_TIMEOUT) gives way to a read, which never waits.
                return self._read_then_claim(request)
            # Perhaps committed: the general claim's second try recognises its own row
            # (_claimed_by). It would also take over a RELEASED record, which is what the
            # caller does next with one (decide: a released record is claimed).
            return self._claim_general(request, self._held())
        return done if done is not None else self._read_then_claim(request)

    def _claim_new_fast(self, request: ClaimRequest, fragments: tuple[Any, ...]) -> ClaimResult:
        """:meth:`claim_new` in one autocommit statement (CLAIM_NEW_FAST): one round trip,
        two when the record it met was committed after the statement began."""
        params = (*self._claim_params(request), *fragments, request.namespace, request.request_id)
        return self._claim_new_answer(request, self._one(self._sql["CLAIM_NEW_FAST"], params))

    def _claim_new_carrying(
        self, request: ClaimRequest, fragments: tuple[Any, ...]
    ) -> ClaimResult | None:
        """:meth:`_claim_new_fast` that also writes the buffered audit events when the
        claim is won (CLAIM_NEW_FAST_CARRYING), as :meth:`_claim_carrying` does; None when
        it cannot carry them (_carrying). A record there: nothing is written, and the
        events go back to the buffer for the next write."""

        def run(shards: str, rows: str, count: int) -> Any:
            params = (*self._claim_params(request), shards, *fragments[1:], fragments[0])
            sql = self._sql["CLAIM_NEW_FAST_CARRYING"]
            return self._one(sql, (*params, rows, count, request.namespace, request.request_id))

        done = self._carrying(fragments[0], run, _claim_witness(request))
        if done is None:
            return None
        events, row = done
        if row is None or not row[0]:
            self._buffer.put_back(events)
        return self._claim_new_answer(request, row)

    def _claim_new_answer(self, request: ClaimRequest, row: Any) -> ClaimResult:
        """What CLAIM_NEW_FAST (or its carrying form) returned, as claim_new's answer."""
        if row is None:  # pragma: no cover - the statement always returns one row
            raise StoreError("the claim returned no row")
        self._found += ((not row[0]) - self._found) * _LOOK_WEIGHT
        if row[0] or row[1] is not None:  # won, or the record the snapshot saw
            return ClaimResult(bool(row[0]), row_to_record(row[1:]), int(row[1 + N_COLUMNS]))
        # The conflicting row was committed after the statement's snapshot: read it with a
        # statement of its own, whose snapshot sees it.
        existing, now = self.get(request.namespace, request.request_id)
        if existing is None:  # pragma: no cover - the conflicting row is committed
            raise StoreError("claim conflicted with a row that then vanished")
        return ClaimResult(False, existing, now)

    def _read_then_claim(self, request: ClaimRequest) -> ClaimResult:
        """:meth:`claim_new` in two steps, where its one statement is not used (buffered
        events it cannot carry, an unencodable event, a read-only schema, a wait too long):
        the record if there is one (read as :meth:`look`, counted in ``claim_first``'s
        share, as the statement's answer would have been), else the claim."""
        existing, now = self.look(request.namespace, request.request_id)
        if existing is not None:
            return ClaimResult(False, existing, now)
        return self.claim(request)

    def _claim_params(self, request: ClaimRequest) -> tuple[Any, ...]:
        """(now, ns, rid, action, fp, payload, exec_id, owner, lease_ms, dkey): the
        parameters the general and the fast claim statements begin with."""
        return (
            self._at(),
            request.namespace,
            request.request_id,
            request.action,
            request.fingerprint,
            request.payload_json,
            request.execution_id,
            request.owner,
            request.lease_ms,
            request.downstream_key,
        )

    def _claim_fast(self, request: ClaimRequest, fragments: tuple[Any, ...]) -> ClaimResult:
        """The claim and its claimed event in one autocommit statement: one round trip (two
        when the claim is lost: the winner's row is read by a statement of its own, whose
        snapshot sees it even when it was committed after the claim began)."""
        row = self._one(self._sql["CLAIM_FAST"], (*self._claim_params(request), *fragments))
        if row is None:
            return self._lost_to(request)
        return ClaimResult(True, row_to_record(row), int(row[N_COLUMNS]))

    def _lost_to(self, request: ClaimRequest) -> ClaimResult:
        """A fast claim that was lost: the winner's row, read by a statement of its own,
        whose snapshot sees it even when it was committed after the claim began."""
        existing, now = _found(
            self._one(self._sql["GET"], (self._at(), request.namespace, request.request_id))
        )
        if existing is None:  # pragma: no cover - the conflicting row is committed
            raise StoreError("claim conflicted with a row that then vanished")
        return ClaimResult(False, existing, now)

    def _claim_carrying(
        self, request: ClaimRequest, fragments: tuple[Any, ...]
    ) -> ClaimResult | None:
        """:meth:`_claim_fast` that also writes the buffered audit events (they go with the
        process's next write, docs/design.md section 5) in its one statement
        (CLAIM_FAST_CARRYING), where the general path takes two round trips; None when it
        cannot (_carrying). A lost claim writes none of them: they go back to the buffer."""

        def run(shards: str, rows: str, count: int) -> Any:
            sql = self._sql["CLAIM_FAST_CARRYING"]
            params = (*self._claim_params(request), shards, *fragments[1:], fragments[0])
            return self._one(sql, (*params, rows, count))

        done = self._carrying(fragments[0], run, _claim_witness(request))
        if done is None:
            return None
        events, row = done
        if row is None:  # lost: nothing was written; the events wait for the next write
            self._buffer.put_back(events)
            return self._lost_to(request)
        return ClaimResult(True, row_to_record(row), int(row[N_COLUMNS]))

    def _claim_general(
        self, request: ClaimRequest, carried: list[AuditEvent] | None = None
    ) -> ClaimResult:
        """``carried``: this is the second try of a claim whose connection was lost, with
        the buffered events its first try carried (claim). A claim carries buffered events
        only if it is won: its claimed event then tells a later write whether they were
        committed (_write)."""
        # BEGIN + the claim, its chain heads locked | the events, the heads moved + COMMIT:
        # two round trips
        witness = _claim_witness(request)
        first = carried is None
        with self._write(pipelined=True, hold=first, carry=carried, witness=witness) as cur:
            shards, literal = self._lock_for(request.namespace, request.request_id)
            cur.execute(self._sql["CLAIM"], (*self._claim_params(request), literal))
            rows = cur.fetchall()
            if not rows:
                # Lost: read the winner's row in a statement of its own, whose snapshot sees
                # the conflicting row even when it was committed after this statement began.
                existing, now = self._record_at(cur, request.namespace, request.request_id)
                if existing is None:  # pragma: no cover - the conflicting row is committed
                    raise StoreError("claim conflicted with a row that then vanished")
                if not first and existing.execution_id == request.execution_id:
                    # The first try committed (no other claim writes this execution id),
                    # and with it the events it carried: they are not written again.
                    self._tx.buffered.clear()
                    return ClaimResult(_claimed_by(existing, request, now), existing, now)
                self._unclaimed(cur, None if first else witness)
                return ClaimResult(False, existing, now)
            self._locked(shards, rows)
            record, now = row_to_record(rows[0]), int(rows[0][N_COLUMNS])
            self._emit([claimed_event(request, record, now)])
        return ClaimResult(True, record, now)
