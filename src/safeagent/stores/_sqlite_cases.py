"""Cases of the SQLite store: opening, updating (signals, state changes) and reading.

``_SQLiteCases``: ``open_case``, ``update_case``, ``get_case``, ``cases``,
``cases_with_live`` and ``case_signals``; a completion or resolution settles a case with
``_settle``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from safeagent._audit import AuditEvent
from safeagent._cases import CaseRow, CaseState, Signal
from safeagent._receipt import Record
from safeagent.errors import InvalidTransitionError
from safeagent.stores._base import (
    CaseMutation,
    CaseUpdate,
    case_events,
    settled_event,
    state_change_event,
)
from safeagent.stores._rows import CASE_COLUMNS, dumps, row_to_case, row_to_signal
from safeagent.stores._sqlite_sql import (
    _N_CASE_COLUMNS,
    SQL_CASES_LIVE,
    SQL_GET_CASE,
    SQL_LIVE_SIGNALS,
    SQL_OPEN_CASE,
    SQL_SETTLE_CASE,
)
from safeagent.stores._sqlite_trail import _SQLiteTrail


class _SQLiteCases(_SQLiteTrail):
    """The cases of :class:`~safeagent.stores.sqlite.SQLiteStore` (module docstring)."""

    # -- cases -----------------------------------------------------------------------------

    def get_case(self, namespace: str, case_id: str) -> tuple[CaseRow | None, list[Signal]]:
        def read(conn: sqlite3.Connection) -> tuple[CaseRow | None, list[Signal]]:
            row = conn.execute(SQL_GET_CASE, (namespace, case_id)).fetchone()
            if row is None:
                return None, []
            live = conn.execute(SQL_LIVE_SIGNALS, (namespace, case_id)).fetchall()
            return row_to_case(row), [row_to_signal(r) for r in live]

        return self._snapshot(read)  # one read transaction: the case and its signals agree

    def _open_case(
        self,
        conn: sqlite3.Connection,
        namespace: str,
        case_id: str,
        policy: tuple[float, int],
        now: int,
        events: list[AuditEvent],
    ) -> CaseRow:
        row = conn.execute(
            SQL_OPEN_CASE, (namespace, case_id, policy[0], policy[1], now, now)
        ).fetchone()
        if row is not None:
            case = row_to_case(row)
            events.append(
                state_change_event(case, None, CaseState.OPEN, None, "safeagent", {}, now)
            )
            return case
        return row_to_case(conn.execute(SQL_GET_CASE, (namespace, case_id)).fetchone())

    def open_case(self, namespace: str, case_id: str, threshold: float, quorum: int) -> CaseRow:
        events: list[AuditEvent] = []
        with self._write() as conn:
            now = self._clock()
            case = self._open_case(conn, namespace, case_id, (threshold, quorum), now, events)
            self._insert_events(conn, events)
        return case

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
        events: list[AuditEvent] = []
        with self._write() as conn:
            now = self._clock()
            if open_with is not None:
                case = self._open_case(conn, namespace, case_id, open_with, now, events)
            else:
                row = conn.execute(SQL_GET_CASE, (namespace, case_id)).fetchone()
                if row is None:
                    raise InvalidTransitionError(
                        f"no case {case_id!r} in namespace {namespace!r}", case_id=case_id
                    )
                case = row_to_case(row)
            live = [
                row_to_signal(r)
                for r in conn.execute(SQL_LIVE_SIGNALS, (namespace, case_id)).fetchall()
            ]
            change = mutate(case, live)
            if signal is not None:
                signal = Signal(
                    signal.source, signal.outcome, signal.confidence, signal.metadata, now
                )
                if not change.late:
                    conn.execute(
                        "UPDATE signals SET status = 'replaced' WHERE namespace = ? AND "
                        "case_id = ? AND source = ? AND status = 'live'",
                        (namespace, case_id, signal.source),
                    )
                    live = [s for s in live if s.source != signal.source] + [signal]
                conn.execute(
                    "INSERT INTO signals (namespace, case_id, source, outcome, confidence,"
                    " metadata, at_ms, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        namespace,
                        case_id,
                        signal.source,
                        signal.outcome,
                        signal.confidence,
                        dumps(dict(signal.metadata)),
                        now,
                        "late" if change.late else "live",
                    ),
                )
            after = case
            if change.path or (signal is not None and not change.late):
                row = conn.execute(
                    f"UPDATE cases SET state = ?, provisional_outcome = ?, outcome = ?,"
                    f" version = version + 1, updated_at_ms = ?,"
                    f" resolved_by = COALESCE(?, resolved_by)"
                    f" WHERE namespace = ? AND case_id = ? RETURNING {CASE_COLUMNS}",
                    (
                        (change.path[-1] if change.path else case.state).value,
                        change.stored_provisional(change.path[-1] if change.path else case.state),
                        change.outcome,
                        now,
                        detail.get("by"),
                        namespace,
                        case_id,
                    ),
                ).fetchone()
                after = row_to_case(row)
            events += case_events(case, change, signal, actor, detail, now)
            self._insert_events(conn, events)
        return CaseUpdate(case=after, live=live, change=change)

    def cases(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[CaseRow]:
        sql = f"SELECT {CASE_COLUMNS} FROM cases WHERE 1 = 1"
        args: list[Any] = []
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if states is not None:
            sql += f" AND state IN ({', '.join('?' for _ in states)})"
            args.extend(s.value for s in states)
        sql += " ORDER BY created_at_ms, namespace, case_id"
        return [row_to_case(r) for r in self._read(lambda c: c.execute(sql, args).fetchall())]

    def cases_with_live(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[tuple[CaseRow, list[Signal]]]:
        """:meth:`cases`, each with its live signals (oldest first), read in one statement:
        one snapshot, so no case's row is of one moment and its signals of another."""
        sql = SQL_CASES_LIVE
        args: list[Any] = []
        if namespace is not None:
            sql += " AND c.namespace = ?"
            args.append(namespace)
        if states is not None:
            sql += f" AND c.state IN ({', '.join('?' for _ in states)})"
            args.extend(s.value for s in states)
        sql += " ORDER BY c.created_at_ms, c.namespace, c.case_id, s.id"
        out: list[tuple[CaseRow, list[Signal]]] = []
        for row in self._read(lambda c: c.execute(sql, args).fetchall()):
            if not out or (out[-1][0].namespace, out[-1][0].case_id) != (row[0], row[1]):
                out.append((row_to_case(row), []))
            if row[_N_CASE_COLUMNS] is not None:  # a live signal (source is NOT NULL)
                out[-1][1].append(row_to_signal(row[_N_CASE_COLUMNS:]))
        return out

    def case_signals(self, namespace: str, case_id: str) -> list[tuple[Signal, str]]:
        rows = self._read(
            lambda c: c.execute(
                "SELECT source, outcome, confidence, metadata, at_ms, status FROM signals"
                " WHERE namespace = ? AND case_id = ? ORDER BY id",
                (namespace, case_id),
            ).fetchall()
        )
        return [(row_to_signal(r), r[5]) for r in rows]

    @staticmethod
    def _settle(
        conn: sqlite3.Connection, record: Record, case_id: str, actor: str, now: int
    ) -> list[AuditEvent]:
        row = conn.execute(SQL_SETTLE_CASE, (now, record.namespace, case_id)).fetchone()
        if row is None:
            return []
        return [settled_event(row_to_case(row), record.execution_id, actor, now)]
