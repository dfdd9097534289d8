"""The audit trail, listings and retention of the SQLite store.

``_SQLiteTrail``: appending audit events to their hash chains (``_insert_events``),
recording them and writing the buffered ones (``record_event``, ``flush_events``,
``_maybe_flush``), reading the execution records and the trail (``records``, ``events``,
``_rows_as_stored``), what verification reads (``audit_chain``, ``subject_snapshot``,
``chain_heads``), anchors of the chain heads (``add_anchor``, ``anchors``), and retention
(``purge``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from safeagent._audit import AuditEvent
from safeagent._cases import CaseRow, Signal
from safeagent._receipt import Record, Status
from safeagent.errors import StoreError
from safeagent.stores._base import Clock, EventBuffer, purge_cutoff, purged_event, stamped
from safeagent.stores._rows import (
    CHAIN_COLUMNS,
    CHAIN_SHARDS,
    COLUMNS,
    EVENT_COLUMNS,
    Heads,
    chain_rows,
    row_to_case,
    row_to_event,
    row_to_record,
    row_to_signal,
    shard_of,
)
from safeagent.stores._sqlite_group import _TxnState
from safeagent.stores._sqlite_sql import (
    SQL_APPEND,
    SQL_GET,
    SQL_GET_CASE,
    SQL_HEAD,
    SQL_HEADS,
    _check_head,
)

T = TypeVar("T")


class _SQLiteTrail:
    """The audit trail of :class:`~safeagent.stores.sqlite.SQLiteStore` (module
    docstring). The state it reads and the transactions it uses are SQLiteStore's,
    declared here (and used by :class:`~safeagent.stores._sqlite_cases._SQLiteCases`
    too)."""

    _clock: Clock
    _buffer: EventBuffer
    _closed: bool

    if TYPE_CHECKING:  # SQLiteStore's (sqlite.py)

        def _write(
            self, *, synchronous: str = "FULL", state: _TxnState | None = None
        ) -> AbstractContextManager[sqlite3.Connection]: ...

        def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

        def _snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    @staticmethod
    def _insert_events(conn: sqlite3.Connection, events: Sequence[AuditEvent]) -> None:
        """Append events to their hash chains, in order (the write lock is held: no one
        interleaves): the heads they extend are read (one row when they share a chain, the
        table otherwise), checked, the events hashed in Python and inserted; the trigger
        moves each head. A missing or unusable head (the table was altered) writes
        nothing."""
        if not events:
            return
        each = [shard_of(e.namespace, e.subject, CHAIN_SHARDS) for e in events]
        shards = set(each)
        if len(shards) == 1:  # one head to read (every claim and completion)
            (shard,) = shards
            row = conn.execute(SQL_HEAD, (shard,)).fetchone()
            heads: Heads = {} if row is None else {shard: (row[0], row[1])}
        else:
            heads = {shard: (seq, head) for shard, seq, head in conn.execute(SQL_HEADS)}
        for shard in shards:
            if shard not in heads:
                raise sqlite3.DatabaseError("audit chain head missing; events not written")
            _check_head(shard, *heads[shard])
        conn.executemany(SQL_APPEND, chain_rows(events, heads, each))

    def _maybe_flush(self) -> None:
        """Write the buffer if it is due; a failure keeps the events for the next write
        rather than failing the read or replay that triggered it."""
        if self._buffer.due():
            with suppress(StoreError):
                self.flush_events()

    def record_event(self, event: AuditEvent, *, buffered: bool = False) -> None:
        if buffered:
            self._buffer.add(stamped(event, self._clock()))
            self._maybe_flush()
            return
        with self._write() as conn:
            self._insert_events(conn, [stamped(event, self._clock())])

    def flush_events(self) -> None:
        if self._buffer and not self._closed:
            with self._write():
                pass  # _write writes the buffer inside its transaction

    def _rows_as_stored(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of the read-only ``sql`` as stored, unparsed: for reading rows one by
        one when a parser refuses one of them (``safeagent.stores._as_stored``). Tables
        are written ``{t}executions``; parameters ``?``.

        Raises:
            StoreError: the read failed.
        """
        text = sql.format(t="")
        return self._read(lambda conn: conn.execute(text, list(args)).fetchall())

    def events(
        self,
        *,
        namespace: str | None = None,
        subject: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        self.flush_events()
        sql = f"SELECT {EVENT_COLUMNS} FROM audit_events WHERE id > ?"
        args: list[Any] = [after_id]
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if subject is not None:
            sql += " AND subject = ?"
            args.append(subject)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._read(lambda c: c.execute(sql, args).fetchall())
        return [row_to_event(r) for r in rows]

    def records(
        self,
        *,
        namespace: str | None = None,
        statuses: Sequence[Status] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Record], int]:
        sql = f"SELECT {COLUMNS} FROM executions WHERE 1 = 1"
        args: list[Any] = []
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if statuses is not None:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args.extend(s.value for s in statuses)
        sql += " ORDER BY created_at_ms, namespace, request_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._read(lambda c: c.execute(sql, args).fetchall())
        return [row_to_record(r) for r in rows], self._clock()

    # -- tamper evidence and retention -------------------------------------------------

    def audit_chain(self) -> tuple[list[tuple[Any, ...]], Heads]:
        """Every event row (``CHAIN_COLUMNS`` order, by shard and seq; rows outside the
        chains, with a NULL shard, come too, so verification can report them) and the
        chain heads as stored (shard -> (seq, hash)). No index serves the order: SQLite
        sorts the events, which an offline verification can afford."""
        self.flush_events()

        def read(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[Any, ...]], dict[int, tuple[int, str]]]:
            rows = conn.execute(
                f"SELECT {CHAIN_COLUMNS} FROM audit_events ORDER BY shard, seq, id"
            ).fetchall()
            heads = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT * FROM audit_chain")}
            return [tuple(r) for r in rows], heads

        return self._snapshot(read)

    def subject_snapshot(
        self, namespace: str, subject: str
    ) -> tuple[Record | None, CaseRow | None, list[tuple[Signal, str]], list[tuple[Any, ...]]]:
        """One subject as one snapshot, for verification to read again what looked wrong:
        the execution record with request id ``subject``, the case with case id ``subject``
        and its signals (as :meth:`case_signals`), and the subject's event rows by id
        (``EVENT_COLUMNS`` order, unparsed), all in one read transaction."""
        self.flush_events()

        def read(conn: sqlite3.Connection) -> tuple[Any, ...]:
            key = (namespace, subject)
            return (
                conn.execute(SQL_GET, key).fetchone(),
                conn.execute(SQL_GET_CASE, key).fetchone(),
                conn.execute(
                    "SELECT source, outcome, confidence, metadata, at_ms, status FROM signals"
                    " WHERE namespace = ? AND case_id = ? ORDER BY id",
                    key,
                ).fetchall(),
                conn.execute(
                    f"SELECT {EVENT_COLUMNS} FROM audit_events"
                    " WHERE namespace = ? AND subject = ? ORDER BY id",
                    key,
                ).fetchall(),
            )

        record, case, signals, events = self._snapshot(read)
        return (
            None if record is None else row_to_record(record),
            None if case is None else row_to_case(case),
            [(row_to_signal(r), r[5]) for r in signals],
            [tuple(r) for r in events],
        )

    def add_anchor(self, heads_json: str, mac: str) -> tuple[int, int]:
        """Store an anchor of the chain heads; returns ``(id, at_ms)``."""
        with self._write() as conn:
            now = self._clock()
            cur = conn.execute(
                "INSERT INTO audit_anchors (at_ms, heads, mac) VALUES (?, ?, ?)",
                (now, heads_json, mac),
            )
            return int(cur.lastrowid or 0), now

    def anchors(self, *, last: int | None = None) -> list[tuple[int, int, str, str]]:
        """Every anchor ``(id, at_ms, heads_json, mac)``, oldest first; with ``last``,
        only the newest ``last`` of them."""
        sql = "SELECT id, at_ms, heads, mac FROM audit_anchors ORDER BY id"
        args: tuple[Any, ...] = ()
        if last is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT ?) ORDER BY id"
            args = (last,)
        rows = self._read(lambda c: c.execute(sql, args).fetchall())
        return [tuple(r) for r in rows]

    def chain_heads(self) -> dict[int, tuple[int, str]]:
        """The current head of every chain: shard -> (seq, hash)."""
        self.flush_events()
        return self._read(
            lambda c: {
                r[0]: (r[1], r[2]) for r in c.execute("SELECT shard, seq, head FROM audit_chain")
            }
        )

    def purge(self, cutoff_ms: int, actor: str) -> dict[str, int]:
        """Retention: records finished before ``cutoff_ms`` lose payload and result and
        keep a tombstone (identity, action, fingerprint, final status); released records
        lose their payload too but keep their row, so the next claim of the id goes on
        from their fencing token (it never goes back); pending and in-doubt records are
        never touched, and counted as read at the store's clock: a PENDING record whose
        lease has expired counts as in doubt (``kept_in_doubt``), as it reads. Audited."""
        with self._write() as conn:
            now = self._clock()
            cutoff_ms = purge_cutoff(cutoff_ms, now)
            released = conn.execute(
                "UPDATE executions SET payload = '', result = NULL, error_message = NULL,"
                " purged_at_ms = ? WHERE status = 'RELEASED' AND purged_at_ms IS NULL"
                " AND updated_at_ms < ?",
                (now, cutoff_ms),
            ).rowcount
            tombstoned = conn.execute(
                "UPDATE executions SET payload = '', result = NULL, error_message = NULL,"
                " purged_at_ms = ? WHERE status IN ('SUCCEEDED', 'FAILED')"
                " AND purged_at_ms IS NULL AND COALESCE(completed_at_ms, updated_at_ms) < ?",
                (now, cutoff_ms),
            ).rowcount
            kept = dict(  # as read at now: an expired PENDING lease is in doubt
                conn.execute(
                    "SELECT CASE WHEN status = 'PENDING' AND (lease_expires_at_ms IS NULL"
                    " OR lease_expires_at_ms > ?) THEN 'PENDING' ELSE 'IN_DOUBT' END AS seen,"
                    " count(*) FROM executions WHERE status IN ('PENDING', 'IN_DOUBT')"
                    " GROUP BY seen",
                    (now,),
                ).fetchall()
            )
            counts = {
                "tombstoned": tombstoned,
                "released": released,
                "kept_pending": int(kept.get("PENDING", 0)),
                "kept_in_doubt": int(kept.get("IN_DOUBT", 0)),
            }
            self._insert_events(conn, [purged_event(now, cutoff_ms, actor, counts)])
        return counts
