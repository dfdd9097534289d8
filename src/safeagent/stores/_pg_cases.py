"""Cases of the PostgreSQL store: opening, updating (signals, state changes) and reading.

``_PgCases``: ``open_case``, ``update_case``, ``get_case``, ``cases``,
``cases_with_live`` and ``case_signals``; a completion or resolution settles a case
with ``_PgCompletions._settle``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from safeagent._audit import AuditEvent
from safeagent._cases import CaseRow, CaseState, Signal
from safeagent.errors import InvalidTransitionError, StoreError
from safeagent.stores._base import CaseMutation, CaseUpdate, case_events, state_change_event
from safeagent.stores._pg_events import _PgEvents
from safeagent.stores._rows import CASE_COLUMNS, dumps, row_to_case, row_to_signal

_N_CASE_COLUMNS = CASE_COLUMNS.count(",") + 1


def _with_live(rows: Sequence[Sequence[Any]]) -> list[tuple[CaseRow, list[Signal]]]:
    """CASES_LIVE's rows (a case's columns, then one live signal's or NULLs; a case's
    rows together) -> each case with its live signals, in order."""
    out: list[tuple[CaseRow, list[Signal]]] = []
    for row in rows:
        if not out or (out[-1][0].namespace, out[-1][0].case_id) != (row[0], row[1]):
            out.append((row_to_case(row), []))
        if row[_N_CASE_COLUMNS] is not None:  # a live signal (source is NOT NULL)
            out[-1][1].append(row_to_signal(row[_N_CASE_COLUMNS:]))
    return out


class _PgCases(_PgEvents):
    """Cases and their signals (module docstring)."""

    def get_case(self, namespace: str, case_id: str) -> tuple[CaseRow | None, list[Signal]]:
        """The case and its live signals, read in one statement: one snapshot (two
        statements, even in one transaction, each see their own at READ COMMITTED: a
        signal committed between them came with the row before it)."""

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(self._sql["GET_CASE_LIVE"], {"ns": namespace, "cid": case_id})
            return cur.fetchall()

        found = _with_live(self._read(read))
        return (None, []) if not found else found[0]

    def _open_case(
        self,
        cur: psycopg.Cursor[Any],
        namespace: str,
        case_id: str,
        policy: tuple[float, int],
        events: list[AuditEvent],
    ) -> CaseRow:
        cur.execute(
            self._sql["OPEN_CASE"],
            self._p(ns=namespace, cid=case_id, threshold=policy[0], quorum=policy[1]),
        )
        row = cur.fetchone()
        if row is not None:
            case = row_to_case(row)
            events.append(
                state_change_event(case, None, CaseState.OPEN, None, "safeagent", {}, int(row[-1]))
            )
        cur.execute(self._sql["LOCK_CASE"], {"ns": namespace, "cid": case_id})
        locked = cur.fetchone()
        if locked is None:  # pragma: no cover - inserted or present just above
            raise StoreError(f"case {case_id!r} vanished while opening it")
        return row_to_case(locked)

    def open_case(self, namespace: str, case_id: str, threshold: float, quorum: int) -> CaseRow:
        def once() -> CaseRow:
            events: list[AuditEvent] = []
            with self._write() as cur:
                case = self._open_case(cur, namespace, case_id, (threshold, quorum), events)
                self._emit(events)
            return case

        # Once more if the connection was lost: the case is inserted only if absent, and
        # audited only by the statement that inserted it, so a second try adds nothing to a
        # first that committed; either way it returns the case as stored.
        return self._again(once)

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
        # Not tried again on a lost connection (StoreError): a second try after a first that
        # committed would store the signal again (replacing the first) and ask ``mutate``
        # about a case that has already changed.
        events: list[AuditEvent] = []
        with self._write() as cur:
            if open_with is not None:
                case = self._open_case(cur, namespace, case_id, open_with, events)
            else:
                cur.execute(self._sql["LOCK_CASE"], {"ns": namespace, "cid": case_id})
                row = cur.fetchone()
                if row is None:
                    raise InvalidTransitionError(
                        f"no case {case_id!r} in namespace {namespace!r}", case_id=case_id
                    )
                case = row_to_case(row)
            cur.execute(self._sql["LIVE_SIGNALS"], {"ns": namespace, "cid": case_id})
            live = [row_to_signal(r) for r in cur.fetchall()]
            change = mutate(case, live)
            now = self._clock() if self._clock is not None else self._db_now(cur)
            if signal is not None:
                signal = Signal(
                    signal.source, signal.outcome, signal.confidence, signal.metadata, now
                )
                if not change.late:
                    cur.execute(
                        self._sql["REPLACE_SIGNAL"],
                        {"ns": namespace, "cid": case_id, "source": signal.source},
                    )
                    live = [s for s in live if s.source != signal.source] + [signal]
                cur.execute(
                    self._sql["INSERT_SIGNAL"],
                    {
                        "ns": namespace,
                        "cid": case_id,
                        "source": signal.source,
                        "outcome": signal.outcome,
                        "confidence": signal.confidence,
                        "metadata": dumps(dict(signal.metadata)),
                        "at": now,
                        "status": "late" if change.late else "live",
                    },
                )
            after = case
            if change.path or (signal is not None and not change.late):
                state = change.path[-1] if change.path else case.state
                cur.execute(
                    self._sql["UPDATE_CASE"],
                    {
                        "state": state.value,
                        "provisional": change.stored_provisional(state),
                        "outcome": change.outcome,
                        "at": now,
                        "by": detail.get("by"),
                        "ns": namespace,
                        "cid": case_id,
                    },
                )
                updated = cur.fetchone()
                if updated is not None:
                    after = row_to_case(updated)
            events += case_events(case, change, signal, actor, detail, now)
            self._emit(events)
        return CaseUpdate(case=after, live=live, change=change)

    def cases(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[CaseRow]:
        sql = self._sql["CASES"]
        params: dict[str, Any] = {}
        if namespace is not None:
            sql += " AND namespace = %(ns)s"
            params["ns"] = namespace
        if states is not None:
            sql += " AND state = ANY(%(states)s)"
            params["states"] = [s.value for s in states]
        sql += " ORDER BY created_at_ms, namespace, case_id"

        def read(cur: psycopg.Cursor[Any]) -> list[CaseRow]:
            cur.execute(sql, params)
            return [row_to_case(r) for r in cur.fetchall()]

        return self._read(read)

    def cases_with_live(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[tuple[CaseRow, list[Signal]]]:
        """:meth:`cases`, each with its live signals (oldest first), read in one statement:
        one snapshot, so no case's row is of one moment and its signals of another."""
        sql = self._sql["CASES_LIVE"]
        params: dict[str, Any] = {}
        if namespace is not None:
            sql += " AND c.namespace = %(ns)s"
            params["ns"] = namespace
        if states is not None:
            sql += " AND c.state = ANY(%(states)s)"
            params["states"] = [s.value for s in states]
        sql += " ORDER BY c.created_at_ms, c.namespace, c.case_id, s.id"

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(sql, params)
            return cur.fetchall()

        return _with_live(self._read(read))

    def case_signals(self, namespace: str, case_id: str) -> list[tuple[Signal, str]]:
        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Signal, str]]:
            cur.execute(self._sql["CASE_SIGNALS"], {"ns": namespace, "cid": case_id})
            return [(row_to_signal(r), r[5]) for r in cur.fetchall()]

        return self._read(read)
