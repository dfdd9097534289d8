"""Audit events of the PostgreSQL store's writes, and their chain heads.

``_PgEvents``: the write transaction (``_write``), which chains its audit events after
its body, locking the chain heads in shard order (or using those its claim or completion
statement locked: ``_lock_for``, ``_locked``); the buffered events, carried by the next
write (``_carrying``: in a fast statement's one round trip), put back when it fails and
marked when it may have committed, then looked up before they are written again
(``_give_back``, ``_mark``, ``_unwritten``, ``_held``); the witnesses by which a claim
or completion finds its own committed write (``Witness``); and ``record_event`` and
``flush_events``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg

from safeagent._audit import AuditEvent
from safeagent.errors import StoreError
from safeagent.stores import _pg_sql as q
from safeagent.stores._base import ClaimRequest, Completion, completion_kind, stamped
from safeagent.stores._pg_conn import _PIPELINE, _lost, _PgConnections, _pipelined_transaction
from safeagent.stores._pg_fast import _carried_rows
from safeagent.stores._rows import N_COLUMNS, Heads, chain_rows, shard_of

_ROWS_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _int_array(values: set[int]) -> str:
    """An int[] as its text literal (the statements cast it): psycopg adapts one string
    several times faster than a Python list."""
    return "{" + ",".join(map(str, values)) + "}"


# (namespace, subject, kind, execution id or None, fencing token or None): where the event a
# claim or completion writes of its own is found in the trail (EVENTS_OF_WRITE).
Witness = tuple[str, str, str, str | None, int | None]


def _claim_witness(request: ClaimRequest) -> Witness:
    """The claimed event of ``request``'s claim: its execution id is fresh (no other claim
    writes it), so an event under it proves the claim committed."""
    return (request.namespace, request.request_id, "claimed", request.execution_id, None)


def _completion_witness(completion: Completion) -> Witness:
    """The outcome event of ``completion`` accepted: fencing accepts one completion per
    token, so its kind under that token (and its execution id, when named) proves it
    committed. Observations of an expired lease share the in-doubt kind and the token; they
    are told apart by their detail (_witnessed)."""
    kind = completion_kind(completion)._value_
    return (
        completion.namespace,
        completion.request_id,
        kind,
        completion.execution_id,
        completion.fencing_token,
    )


def _observed(detail: str) -> bool:
    """An event ``detail`` (JSON text) is an observation of an expired lease. A detail that
    is not a JSON object (edited in the database: audit.verify reports it) is not."""
    try:
        value = json.loads(detail)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("observed") is True


class _PgEvents(_PgConnections):
    """The write transaction and the audit events it writes (module docstring)."""

    @contextmanager
    def _write(
        self,
        *,
        pipelined: bool = False,
        hold: bool = False,
        carry: list[AuditEvent] | None = None,
        witness: Witness | None = None,
    ) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction. Its audit events (buffered ones first, then those the body
        emits) are chained at the end, after the body's row locks, taking the chain-head
        locks in shard order: two writers never wait on each other in a cycle. (A claim or
        completion takes them at the end of its own statement instead: see _lock_for.)

        ``pipelined``: BEGIN travels with the body's first statement and COMMIT with the
        event statement (see _pipelined_transaction), for a body that only executes and
        fetches (``rowcount`` is not known before the results are).

        The buffered events go back to the buffer if the transaction fails. Where it may
        have committed (the connection was lost, or an interrupt came), they go back
        marked, and the write that takes them next looks them up first (_unwritten): by
        ``witness``, the claim's or completion's own event, which they are written with or
        not at all (_unclaimed); else by the chain hash of the last of them, once they were
        sent. With ``hold``, a lost connection leaves them in ``self._tx.held`` instead,
        for the caller's second try (_held), which passes them as ``carry`` (written
        instead of the buffer's) and learns whether its first try committed them; a second
        try that finds they were clears ``self._tx.buffered``."""
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        buffered = carry if carry is not None else self._buffer.take() if self._buffer else []
        if self._uncertain and buffered and carry is None:
            buffered = self._unwritten(buffered)
        pending: list[AuditEvent] = []
        tx = self._tx
        tx.pending, tx.buffered, tx.locked, tx.rows = pending, buffered, None, None
        try:
            with self._connection() as conn:
                if pipelined and _PIPELINE:
                    with _pipelined_transaction(conn) as cur:
                        yield cur
                        self._insert_events(cur, [*buffered, *pending] if buffered else pending)
                else:
                    with conn.transaction(), conn.cursor() as cur:
                        yield cur
                        self._insert_events(cur, [*buffered, *pending] if buffered else pending)
        except BaseException as exc:
            self._give_back(buffered, exc, hold, witness)
            raise
        finally:
            tx.pending = tx.buffered = tx.locked = None

    def _give_back(
        self,
        buffered: list[AuditEvent],
        exc: BaseException,
        hold: bool,
        witness: Witness | None,
    ) -> None:
        """Where the buffered events a failed write took go (see _write)."""
        store_error = isinstance(exc, StoreError)
        lost = isinstance(exc, StoreError) and _lost(exc)
        if hold and lost:
            self._tx.held = buffered  # committed or not: the second try tells
        elif not buffered:
            return
        elif store_error and not lost and (hold or witness is None):
            self._buffer.put_back(buffered)  # refused: the server rolled it back
        elif witness is not None:
            # a second try, however it failed (its first try may have committed them), or
            # an interrupt, perhaps after the COMMIT was sent
            self._mark(buffered, self._witnessed(witness))
        elif (rows := self._tx.rows) is not None:
            # sent, perhaps with a COMMIT whose reply was lost
            last = rows[len(buffered) - 1]
            self._mark(buffered, self._by_hash((last[2], last[3], last[-1])))
        else:
            self._buffer.put_back(buffered)  # never sent

    def _mark(self, events: list[AuditEvent], found: Callable[[psycopg.Cursor[Any]], bool]) -> None:
        """Put ``events`` back in the buffer, marked: whether they are in the trail is
        ``found``'s answer, asked by the next write that takes them (_unwritten)."""
        with self._uncertain_lock:
            self._uncertain.append((events, found))
        self._buffer.put_back(events)

    def _by_hash(self, last: tuple[str, str, str]) -> Callable[[psycopg.Cursor[Any]], bool]:
        """Whether the event with chain hash ``last`` (namespace, subject, hash) is in the
        trail: a chain hash is unique."""
        sql = self._sql["EVENT_BY_HASH"]
        return lambda cur: cur.execute(sql, last).fetchone() is not None

    def _witnessed(self, witness: Witness) -> Callable[[psycopg.Cursor[Any]], bool]:
        """Whether the claim's or completion's own event that ``witness`` names is in the
        trail, and so the buffered events it carried (EVENTS_OF_WRITE; an observation of
        an expired lease, which shares an in-doubt completion's kind and token, is not)."""
        sql = self._sql["EVENTS_OF_WRITE"]

        def found(cur: psycopg.Cursor[Any]) -> bool:
            return any(not _observed(row[0]) for row in cur.execute(sql, witness).fetchall())

        return found

    def _unclaimed(self, cur: psycopg.Cursor[Any], witness: Witness | None) -> None:
        """A claim that was lost, or a completion that was refused: no event of its own
        (its witness) is written, so no buffered event either. On a second try
        (``witness``), those its first try committed are dropped; the rest go back to the
        buffer, unmarked: nothing wrote them."""
        buffered = self._tx.buffered
        if not buffered:
            return
        if witness is None or not self._witnessed(witness)(cur):
            self._buffer.put_back(list(buffered))
        buffered.clear()

    def _unwritten(self, buffered: list[AuditEvent]) -> list[AuditEvent]:
        """``buffered`` without the batches a write that may have committed carried and
        did commit (see _write): one read per marked batch, only after a lost connection
        or an interrupt. A mark stays in ``_uncertain`` until the write holding its events
        has checked it (others see it meanwhile); a batch whose look-up fails goes back to
        the buffer, still marked, and an interrupt puts back every event not yet settled."""
        with self._uncertain_lock:
            batches = list(self._uncertain)
        taken = {id(event) for event in buffered}
        for batch in batches:
            events, found = batch
            if not all(id(event) in taken for event in events):
                continue  # another write holds them: its own check settles this mark
            try:
                written = self._read(found)
            except StoreError:
                # unknown still: keep them aside, marked, for a later write
                ids = {id(event) for event in events}
                buffered = [event for event in buffered if id(event) not in ids]
                self._buffer.put_back(events)
                continue
            except BaseException:
                self._buffer.put_back(buffered)  # this batch and the rest still marked
                raise
            with self._uncertain_lock:
                self._uncertain = [b for b in self._uncertain if b is not batch]
            if written:  # by the write that may have committed: not again
                ids = {id(event) for event in events}
                buffered = [event for event in buffered if id(event) not in ids]
        return buffered

    def _held(self) -> list[AuditEvent]:
        """The buffered events a write with ``hold`` carried when it lost its connection
        (none if it never took any), for its second try to carry."""
        tx = self._tx
        held: list[AuditEvent] | None = getattr(tx, "held", None)
        tx.held = None
        return [] if held is None else held

    def _carrying(
        self, shard: int, run: Callable[[str, str, int], Any], witness: Witness
    ) -> tuple[list[AuditEvent], Any] | None:
        """Take the buffered audit events and ``run(shards literal, ..., rows JSON, count)``
        the carrying statement of a write whose own event goes to chain ``shard``: its
        events, and the row it returned. None, having taken nothing, when the statement
        cannot carry them: over MAX_CARRIED events, two on one chain or one on ``shard``,
        a batch a lost connection left uncertain (_unwritten), an event it cannot encode.
        Its failure puts the events back, but a lost connection's, which leaves them to
        the caller's second try (_held): it carries them unless it finds its own write,
        committed with them; an interrupt, perhaps after the statement was sent, puts them
        back marked by the write's own event, its ``witness`` (_write)."""
        events = self._buffer.take()
        try:
            # Checked after the take: a write whose reply was lost marks its batch and puts
            # it back (_write), maybe just before the take, and a marked batch is looked up
            # before it is written (_unwritten), which only the general path does.
            carried = (
                _carried_rows(events, self.chain_shards)
                if 0 < len(events) <= q.MAX_CARRIED and not self._uncertain
                else None
            )
        except Exception:  # noqa: BLE001 - an event no write can encode: the general path says so
            carried = None
        except BaseException:
            self._buffer.put_back(events)
            raise
        if carried is None or shard in carried[0]:
            self._buffer.put_back(events)
            return None
        shards, rows = carried
        shards.add(shard)
        self._tx.held = None
        try:
            return events, run(_int_array(shards), _ROWS_JSON(rows), len(rows))
        except StoreError as err:
            if _lost(err):
                self._tx.held = events  # committed with the write or not: its caller tells
            else:
                self._buffer.put_back(events)
            raise
        except BaseException:
            self._mark(events, self._witnessed(witness))
            raise

    def _emit(self, events: Sequence[AuditEvent]) -> None:
        """Audit events of the current transaction, written when it commits."""
        self._tx.pending.extend(events)

    def _lock_for(self, namespace: str, subject: str) -> tuple[set[int], str]:
        """The chain heads a claim or completion on ``subject`` writes to (its own and those
        of the buffered events written with it): the shards, and the text literal its
        statement locks them by. Only for a body whose every event is on ``subject``: a
        head taken later, after these, could break the shard order."""
        chains = self.chain_shards
        shards = {shard_of(namespace, subject, chains)}
        for event in self._tx.buffered:
            shards.add(shard_of(event.namespace, event.subject, chains))
        return shards, _int_array(shards)

    def _locked(self, shards: set[int], rows: list[Any]) -> None:
        """Keep the heads a claim or completion statement locked (the three columns after
        the record's and the clock in each of its rows) for _insert_events."""
        i = N_COLUMNS + 1
        self._tx.locked = (shards, {r[i]: (r[i + 1], r[i + 2]) for r in rows if r[i] is not None})

    def _insert_events(self, cur: psycopg.Cursor[Any], events: Sequence[AuditEvent]) -> None:
        """Chain ``events`` and write them with their new chain heads: one statement, plus
        one to lock the heads unless the body's claim or completion already did."""
        if not events:
            return
        chains = self.chain_shards
        each = [shard_of(e.namespace, e.subject, chains) for e in events]
        shards = set(each)
        locked = self._tx.locked
        if locked is not None and shards <= locked[0]:
            heads: Heads = locked[1]
        else:
            cur.execute(self._sql["LOCK_HEADS"], (_int_array(shards),))
            heads = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
        rows = chain_rows(events, heads, each)
        self._tx.rows = rows
        if len(rows) == 1:
            cur.execute(self._sql["EVENT"], rows[0])
        else:  # one statement however many rows (JSON, ensure_ascii=False: text psycopg
            # would refuse as a parameter, it refuses the same way inside the JSON)
            cur.execute(self._sql["EVENT_ROWS"], (_ROWS_JSON(rows),))

    def _maybe_flush(self) -> None:
        if self._buffer.due():
            with suppress(StoreError):  # kept for the next write
                self.flush_events()

    def record_event(self, event: AuditEvent, *, buffered: bool = False) -> None:
        """:meth:`ReceiptStore.record_event`. Not tried again on a lost connection, nor
        flush_events, add_anchor and purge: an append a lost try may have committed would
        be written twice. When the connection is lost once the event's statement was built
        (sent or about to be: the client cannot tell), the event is kept, as a buffered
        one is, marked by its chain hash: the process's next write (or :meth:`close`)
        looks it up and writes it only if it is missing, and the call returns. Until then
        it lives in this process only, like the buffered events (docs/design.md
        section 5). A store opened on a read-only database keeps no buffered event (a
        replay's): the database can never hold it.

        Raises:
            StoreError: the event was not written and is not kept: the server refused it
                (rolled back), or the connection was lost before its statement was built.
        """
        if buffered:
            if self._read_only:
                return  # a read-only database can never hold it: not kept (not audited)
            self._buffer.add(event if event.at_ms else stamped(event, self._now()))
            self._maybe_flush()
            return
        event = stamped(event, event.at_ms or self._now())
        self._tx.rows = None
        try:
            with self._write(pipelined=True):
                self._emit([event])
        except StoreError as err:
            rows = self._tx.rows
            if not _lost(err) or rows is None:
                raise  # refused (rolled back), or never sent: not written
            # Sent, with a COMMIT whose reply was lost: kept, marked by its chain hash, for
            # the next write, which writes it only if it is not in the trail (_unwritten).
            # Recorded either way, once: raising would have the caller keep it a second time.
            last = rows[-1]
            self._mark([event], self._by_hash((last[2], last[3], last[-1])))

    def _flush_for_read(self) -> None:
        """Write the buffered events before a read of the trail, once more if the
        connection was lost (the pool was drained): the events that write carried were
        marked, and the second write checks them by chain hash (_unwritten), so each is
        written once either way. A store that must not write reads without them."""
        if self._unwritable is not None:
            return
        try:
            self.flush_events()
        except StoreError as err:
            if not _lost(err):
                raise
            self.flush_events()

    def flush_events(self) -> None:
        if self._buffer and not self._closed:
            # _write writes the buffer inside its transaction: BEGIN + the heads locked |
            # the events, the heads moved + COMMIT
            with self._write(pipelined=True):
                pass
