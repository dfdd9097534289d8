"""Listings, tamper evidence and retention of the PostgreSQL store.

``_PgTrail``: reading the execution records and the audit trail (``records``,
``events``, ``_rows_as_stored``), what verification reads (``audit_chain``,
``subject_snapshot``, ``chain_heads``), anchors of the chain heads (``add_anchor``,
``anchors``), and retention (``purge``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from safeagent._audit import AuditEvent
from safeagent._cases import CaseRow, Signal
from safeagent._receipt import Record, Status
from safeagent.stores._base import purge_cutoff, purged_event
from safeagent.stores._pg_conn import _found
from safeagent.stores._pg_events import _PgEvents
from safeagent.stores._rows import Heads, row_to_case, row_to_event, row_to_record, row_to_signal


class _PgTrail(_PgEvents):
    """Listings, verification's reads, anchors and retention (module docstring)."""

    def _rows_as_stored(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of the read-only ``sql`` as stored, unparsed: for reading rows one by
        one when a parser refuses one of them (``safeagent.stores._as_stored``). Tables
        are written ``{t}executions`` (this store's schema is put in); parameters ``?``.

        Raises:
            StoreError: the read failed.
        """
        text = sql.format(t=self.schema + ".").replace("?", "%s")

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(text, list(args))
            return [tuple(row) for row in cur.fetchall()]

        return self._read(read)

    def events(
        self,
        *,
        namespace: str | None = None,
        subject: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        self._flush_for_read()
        sql = self._sql["EVENTS"]
        params: dict[str, Any] = {"after": after_id}
        if namespace is not None:
            sql += " AND namespace = %(ns)s"
            params["ns"] = namespace
        if subject is not None:
            sql += " AND subject = %(subject)s"
            params["subject"] = subject
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT %(limit)s"
            params["limit"] = limit

        def read(cur: psycopg.Cursor[Any]) -> list[AuditEvent]:
            cur.execute(sql, params)
            return [row_to_event(r) for r in cur.fetchall()]

        return self._read(read)

    def records(
        self,
        *,
        namespace: str | None = None,
        statuses: Sequence[Status] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Record], int]:
        sql = self._sql["RECORDS"]
        params: dict[str, Any] = {}
        if namespace is not None:
            sql += " AND namespace = %(ns)s"
            params["ns"] = namespace
        if statuses is not None:
            sql += " AND status = ANY(%(statuses)s)"
            params["statuses"] = [s.value for s in statuses]
        sql += " ORDER BY created_at_ms, namespace, request_id"
        if limit is not None:
            sql += " LIMIT %(limit)s"
            params["limit"] = limit

        def read(cur: psycopg.Cursor[Any]) -> list[Record]:
            cur.execute(sql, params)
            return [row_to_record(r) for r in cur.fetchall()]

        records = self._read(read)
        return records, self._now()

    def audit_chain(self) -> tuple[list[tuple[Any, ...]], Heads]:
        """Every event row (by shard and seq; rows outside the chains, with a NULL shard,
        come too, so verification can report them) and the chain heads as stored. No
        index serves the order: the server sorts the events, which an offline
        verification can afford."""
        self._flush_for_read()

        def read() -> tuple[list[tuple[Any, ...]], Heads]:
            with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur.execute(self._sql["CHAIN"])
                rows = [tuple(r) for r in cur.fetchall()]
                cur.execute(self._sql["HEADS"])
                heads = {r[0]: (int(r[1]), r[2]) for r in cur.fetchall()}
            return rows, heads

        return self._again(read)

    def subject_snapshot(
        self, namespace: str, subject: str
    ) -> tuple[Record | None, CaseRow | None, list[tuple[Signal, str]], list[tuple[Any, ...]]]:
        """One subject as one snapshot, for verification to read again what looked wrong:
        the execution record with request id ``subject``, the case with case id ``subject``
        and its signals (as :meth:`case_signals`), and the subject's event rows by id
        (``EVENT_COLUMNS`` order, unparsed), all in one REPEATABLE READ transaction."""
        self._flush_for_read()
        named = {"ns": namespace, "cid": subject, "subject": subject, "after": 0}

        def read() -> tuple[Any, ...]:
            with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                record = cur.execute(self._sql["GET"], (self._at(), namespace, subject)).fetchone()
                case = cur.execute(self._sql["GET_CASE"], named).fetchone()
                signals = cur.execute(self._sql["CASE_SIGNALS"], named).fetchall()
                events = cur.execute(
                    self._sql["EVENTS"]
                    + " AND namespace = %(ns)s AND subject = %(subject)s ORDER BY id",
                    named,
                ).fetchall()
            return record, case, signals, events

        record, case, signals, events = self._again(read)
        return (
            _found(record)[0],
            None if case is None else row_to_case(case),
            [(row_to_signal(r), r[5]) for r in signals],
            [tuple(r) for r in events],
        )

    def chain_heads(self) -> Heads:
        """The current head of every chain: shard -> (seq, hash)."""
        self._flush_for_read()

        def read(cur: psycopg.Cursor[Any]) -> Heads:
            cur.execute(self._sql["HEADS"])
            return {r[0]: (int(r[1]), r[2]) for r in cur.fetchall()}

        return self._read(read)

    def add_anchor(self, heads_json: str, mac: str) -> tuple[int, int]:
        """Store an anchor of the chain heads; returns ``(id, at_ms)``."""
        with self._write() as cur:
            cur.execute(self._sql["ADD_ANCHOR"], self._p(heads=heads_json, mac=mac))
            row = cur.fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

    def anchors(self, *, last: int | None = None) -> list[tuple[int, int, str, str]]:
        """Every anchor ``(id, at_ms, heads_json, mac)``, oldest first; with ``last``,
        only the newest ``last`` of them."""

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[int, int, str, str]]:
            if last is None:
                cur.execute(self._sql["ANCHORS"])
            else:
                cur.execute(self._sql["ANCHORS_LAST"], {"last": last})
            return [(int(r[0]), int(r[1]), r[2], r[3]) for r in cur.fetchall()]

        return self._read(read)

    def purge(self, cutoff_ms: int, actor: str) -> dict[str, int]:
        """Retention; see :meth:`SQLiteStore.purge` (an expired PENDING lease counts as
        in doubt, at the store's clock)."""
        with self._write() as cur:
            # One clock reading for the tombstones, the cutoff's bound and the event.
            now = self._clock() if self._clock is not None else self._db_now(cur)
            params = {"now": now, "cutoff": purge_cutoff(cutoff_ms, now)}
            cur.execute(self._sql["PURGE_RELEASED"], params)
            released = cur.rowcount
            cur.execute(self._sql["PURGE_FINISHED"], params)
            tombstoned = cur.rowcount
            cur.execute(self._sql["KEPT"], {"now": now})
            kept = {r[0]: int(r[1]) for r in cur.fetchall()}
            counts = {
                "tombstoned": tombstoned,
                "released": released,
                "kept_pending": kept.get("PENDING", 0),
                "kept_in_doubt": kept.get("IN_DOUBT", 0),
            }
            self._emit([purged_event(now, params["cutoff"], actor, counts)])
        return counts
