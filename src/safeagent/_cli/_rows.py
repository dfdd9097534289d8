"""Reading the store for the CLI row by row: a row the CLI cannot read (edited by hand,
written by another tool, corrupt) is reported as :class:`Unreadable`, never a traceback,
and never hides the rows around it.

The row-by-row reading is the library's (:mod:`safeagent.stores._as_stored`, which
``audit verify`` uses too): the store is asked first, and only when it cannot turn one of
the rows into an object (an unknown status, event kind or case state, text that is not
JSON) are the same rows read as stored and converted one by one. This module adds what
the CLI shows: events and signals read the same way, and every object checked for what
the CLI does with it (an integer time, a JSON object detail, a result that decodes).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, cast

from safeagent._audit import AuditEvent, EventKind
from safeagent._case_view import Case
from safeagent._cases import CaseRow, CaseState, Signal
from safeagent._receipt import Receipt, Record, Status
from safeagent.errors import GuardError
from safeagent.stores._as_stored import (
    CASE_NAMES,
    NAMES,
    Unreadable,
    case_from_row,
    case_rows,
    from_row,
    kind_of,
    not_json,
    not_member,
    plain,
    read_rows,
    record_from_row,
    record_rows,
    rows_as_stored,
    short,
    unreadable_case,
    unreadable_record,
    where,
)
from safeagent.stores._rows import CASE_COLUMNS, COLUMNS, EVENT_COLUMNS, row_to_event, row_to_signal

SIGNAL_COLUMNS = "source, outcome, confidence, metadata, at_ms, status, id"


# -- checking an object's fields ------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _expected(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_expected(a) for a in typing.get_args(hint))
    if hint in NAMES:
        return NAMES[hint]
    if hint is Mapping or typing.get_origin(hint) in (Mapping, dict):
        return "a JSON object"
    return getattr(hint, "__name__", str(hint))


def _fits(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float, str) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if hint in (int, str):
        return isinstance(value, hint)
    if hint is Mapping or typing.get_origin(hint) in (Mapping, dict):
        return isinstance(value, Mapping)
    if isinstance(hint, type) and (issubclass(hint, enum.Enum) or dataclasses.is_dataclass(hint)):
        return isinstance(value, hint)
    return True


def field_problem(obj: Any) -> str | None:
    """The first field of dataclass ``obj`` whose value is not of its declared type
    (``created_at_ms holds text, not an integer``), or ``None``."""
    cls: Any = type(obj)
    for name, hint in _hints(cls).items():
        value = getattr(obj, name)
        if not _fits(value, hint):
            return f"{name} holds {kind_of(value)}, not {_expected(hint)}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            inner = field_problem(value)
            if inner is not None:
                return f"{name}.{inner}"
    return None


# -- execution records ----------------------------------------------------------------------------


def check_record(record: Record | Unreadable, now_ms: int) -> Record | Unreadable:
    """``record`` if the CLI can show it at ``now_ms`` (every field of its type, a result
    that decodes), else :class:`Unreadable` saying what is wrong. The payload is decoded
    only by ``receipts show`` (:func:`receipt_view`)."""
    if isinstance(record, Unreadable):
        return record
    problem = field_problem(record)
    if problem is None:
        try:  # decodes the result as the library does (deep nesting too)
            Receipt.from_record(record, replay=False, now_ms=now_ms)
        except ValueError:
            problem = "result is not JSON"
        except Exception as exc:  # noqa: BLE001 - any field the receipt cannot hold
            problem = f"cannot be read ({type(exc).__name__})"
    if problem is None:
        return record
    values = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    return unreadable_record(values, problem)


def records(
    store: Any, *, namespace: str | None = None, statuses: Sequence[Status] | None = None
) -> tuple[list[Record | Unreadable], int]:
    """``store.records(namespace=, statuses=)`` with each row a checked :class:`Record`
    or :class:`Unreadable`, and the store's clock (ms)."""
    rows, now = record_rows(store, namespace=namespace, statuses=statuses)
    if now is None:
        now = store.records(limit=0)[1]
    return [check_record(r, now) for r in rows], now


def record(store: Any, namespace: str, request_id: str) -> tuple[Record | Unreadable | None, int]:
    """``store.get(namespace, request_id)``, the record checked (or :class:`Unreadable`)."""
    clock: list[int] = []

    def call() -> list[Any]:
        found, now = store.get(namespace, request_id)
        clock.append(now)
        return [] if found is None else [found]

    sql = f"SELECT {COLUMNS} FROM {{t}}executions WHERE namespace = ? AND request_id = ?"
    rows = read_rows(store, call, sql, [namespace, request_id], record_from_row)
    now = clock[0] if clock else store.records(limit=0)[1]
    return (check_record(rows[0], now) if rows else None), now


# -- audit events ---------------------------------------------------------------------------------

_EVENT_NAMES = tuple(c.strip() for c in EVENT_COLUMNS.split(","))


def _unreadable_event(values: Mapping[str, Any], problem: str) -> Unreadable:
    fields = plain({k: v for k, v in values.items() if k != "detail"})  # redaction hides it
    return Unreadable("event", f"#{values.get('id')}", problem, fields)


def _check_event(event: AuditEvent | Unreadable) -> AuditEvent | Unreadable:
    if isinstance(event, Unreadable):
        return event
    problem = field_problem(event)
    if problem is None:
        return event
    return _unreadable_event({n: getattr(event, n) for n in _EVENT_NAMES}, problem)


def _event_problem(values: Mapping[str, Any]) -> str | None:
    found = not_member(values, "kind", EventKind, "an event kind")
    if found is None and not_json(values.get("detail")):
        return "detail is not JSON"
    return found


def _event_from_row(row: tuple[Any, ...]) -> AuditEvent | Unreadable:
    return cast(
        "AuditEvent | Unreadable",
        from_row(row, _EVENT_NAMES, row_to_event, _unreadable_event, _event_problem),
    )


def raw_event(event: Unreadable, store: Any) -> dict[str, Any]:
    """Every column of unreadable event ``event`` as stored, its detail too (for an export,
    which redacts it)."""
    rows = rows_as_stored(
        store, f"SELECT {EVENT_COLUMNS} FROM {{t}}audit_events WHERE id = ?", [event.get("id")]
    )
    if not rows:  # deleted since
        return dict(event.fields)
    stored = dict(zip(_EVENT_NAMES, rows[0], strict=False))
    out = plain({k: v for k, v in stored.items() if k != "detail"})
    detail: Any = stored.get("detail")
    out["detail"] = detail if not_json(detail) else json.loads(detail)  # text, or its JSON
    if not isinstance(out["detail"], (str, int, float, list, dict, type(None))):
        out["detail"] = kind_of(out["detail"])
    return out


def events(
    store: Any, *, namespace: str | None = None, subject: str | None = None, after_id: int = 0
) -> list[AuditEvent | Unreadable]:
    """``store.events(namespace=, subject=, after_id=)``, each a checked event or
    :class:`Unreadable`, in id order."""
    sql = f"SELECT {EVENT_COLUMNS} FROM {{t}}audit_events WHERE id > ?"
    sql, args = where(sql, [after_id], "namespace", namespace)
    sql, args = where(sql, args, "subject", subject)
    sql += " ORDER BY id"

    def call() -> list[Any]:
        return list(store.events(namespace=namespace, subject=subject, after_id=after_id))

    return [_check_event(e) for e in read_rows(store, call, sql, args, _event_from_row)]


# -- cases and signals ----------------------------------------------------------------------------

_SIGNAL_NAMES = tuple(c.strip() for c in SIGNAL_COLUMNS.split(","))


def _signal_from_row(row: tuple[Any, ...]) -> tuple[Signal, str] | Unreadable:
    values = dict(zip(_SIGNAL_NAMES, row, strict=False))
    name = f"#{values.get('id')} (source {short(values.get('source'))})"
    fields = plain({k: values.get(k) for k in ("source", "outcome", "at_ms", "status")})
    if not_json(values.get("metadata")):
        return Unreadable("signal", name, "metadata is not JSON", fields)
    try:
        signal = row_to_signal(row)
    except Exception as exc:  # noqa: BLE001 - any column the signal cannot hold
        return Unreadable("signal", name, f"cannot be read ({type(exc).__name__})", fields)
    problem = field_problem(signal)
    if problem is None and not isinstance(values.get("status"), str):
        problem = f"status holds {kind_of(values.get('status'))}, not text"
    if problem is not None:
        return Unreadable("signal", name, problem, fields)
    return signal, values["status"]


def signals(store: Any, namespace: str, case_id: str) -> list[tuple[Signal, str] | Unreadable]:
    """``store.case_signals(namespace, case_id)``: every signal in arrival order with its
    status (live, replaced, late), or :class:`Unreadable`."""
    sql = (
        f"SELECT {SIGNAL_COLUMNS} FROM {{t}}signals WHERE namespace = ? AND case_id = ? ORDER BY id"
    )

    def call() -> list[Any]:
        found = list(store.case_signals(namespace, case_id))
        for signal, _status in found:
            problem = field_problem(signal)
            if problem is not None:
                raise ValueError(problem)  # read them as stored, to name the row
        return found

    return read_rows(store, call, sql, [namespace, case_id], _signal_from_row)


def _case(store: Any, row: CaseRow | Unreadable) -> Case | Unreadable:
    """The case of ``row`` with its live signals, or :class:`Unreadable` (the case's row,
    or one of its live signals, cannot be read: its tally cannot be counted)."""
    if isinstance(row, Unreadable):
        return row
    values = {n: getattr(row, n) for n in CASE_NAMES}
    problem = field_problem(row)
    if problem is not None:
        return unreadable_case(values, problem)
    live: list[Signal] = []
    for item in signals(store, row.namespace, row.case_id):
        if isinstance(item, Unreadable):
            if item.get("status") in ("live", None) or not isinstance(item.get("status"), str):
                return unreadable_case(values, f"signal {item.name}: {item.problem}")
            continue
        if item[1] == "live":
            live.append(item[0])
    try:
        return Case._from(row, live)
    except Exception as exc:  # noqa: BLE001 - a policy or signal the tally cannot count
        return unreadable_case(values, f"cannot be read ({type(exc).__name__})")


def _case_read_together(row: CaseRow, live: Sequence[Signal]) -> Case | Unreadable:
    """The case of ``row`` and its live signals ``live``, read in one snapshot, or
    :class:`Unreadable` (a field of the row or of a signal is not of its type, or the
    tally cannot be counted)."""
    values = {n: getattr(row, n) for n in CASE_NAMES}
    problem = field_problem(row)
    for signal in live:
        if problem is None and (found := field_problem(signal)) is not None:
            problem = f"a live signal's {found}"
    if problem is not None:
        return unreadable_case(values, problem)
    try:
        return Case._from(row, live)
    except Exception as exc:  # noqa: BLE001 - a policy or signal the tally cannot count
        return unreadable_case(values, f"cannot be read ({type(exc).__name__})")


def cases(
    store: Any, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
) -> list[Case | Unreadable]:
    """The cases ``FinalityGate.cases(namespace=, states=)`` lists (``namespace`` None:
    every namespace), oldest first, each a :class:`Case` or :class:`Unreadable`. A store
    that reads each case with its live signals in one snapshot (``cases_with_live``) is
    read so, as the gate reads it; when that read refuses a row, and on any other store,
    rows are read one by one, each case's signals after its row."""
    if getattr(type(store), "cases_with_live", None) is not None:
        try:
            pairs = store.cases_with_live(namespace=namespace, states=states)
        except GuardError:  # StoreError: the store failed, not a row
            raise
        except Exception:  # noqa: BLE001, S110 - a row its parser refused: read one by one
            pass
        else:
            return [_case_read_together(row, live) for row, live in pairs]
    return [_case(store, r) for r in case_rows(store, namespace=namespace, states=states)]


def case(store: Any, namespace: str, case_id: str) -> Case | Unreadable | None:
    """The case, as ``FinalityGate.get``, or :class:`Unreadable`, or ``None``."""
    sql = f"SELECT {CASE_COLUMNS} FROM {{t}}cases WHERE namespace = ? AND case_id = ?"

    def call() -> list[Any]:
        row, _live = store.get_case(namespace, case_id)
        return [] if row is None else [row]

    rows = read_rows(store, call, sql, [namespace, case_id], case_from_row)
    return _case(store, rows[0]) if rows else None
