"""Reading the store for the CLI row by row: a row the CLI cannot read (edited by hand,
written by another tool, corrupt) is reported as :class:`Unreadable`, never a traceback,
and never hides the rows around it.

Each reader asks the store first, as the library does. When the store cannot turn one of
the rows into an object (an unknown status, event kind or case state, text that is not
JSON), it reads the same rows as stored, through the store's own connection, and turns
them into objects one by one. Every object is then checked for what the CLI does with it
(an integer time, a JSON object detail, a result that decodes).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from safeagent import SQLiteStore
from safeagent._audit import AuditEvent, EventKind
from safeagent._cases import CaseRow, CaseState, Signal
from safeagent._gate import Case
from safeagent._receipt import Receipt, Record, Status
from safeagent.errors import GuardError
from safeagent.stores._rows import (
    CASE_COLUMNS,
    COLUMNS,
    EVENT_COLUMNS,
    row_to_case,
    row_to_event,
    row_to_record,
    row_to_signal,
)

SIGNAL_COLUMNS = "source, outcome, confidence, metadata, at_ms, status, id"


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored row the CLI cannot read.

    Attributes:
        what: the kind of row: ``"receipt"``, ``"event"``, ``"case"`` or ``"signal"``.
        name: the row as the operator finds it: ``default/r-1``, ``#2``.
        problem: what cannot be read, without the stored value of a payload, result,
            detail or metadata (it may hold what redaction hides): ``created_at_ms holds
            text, not an integer``, ``result is not JSON``.
        fields: the row's identifying columns as stored (namespace, id, action, status,
            kind, times), for a listing and ``--json``.
    """

    what: str
    name: str
    problem: str
    fields: dict[str, Any]

    def describe(self) -> str:
        """``receipt default/r-1: result is not JSON``."""
        return f"{self.what} {self.name}: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        """The identifying fields and ``unreadable``: the problem."""
        return {**self.fields, "unreadable": self.problem}

    def get(self, key: str) -> Any:
        """An identifying field as stored, or ``None``."""
        return self.fields.get(key)


# -- checking an object's fields ------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_NAMES = {str: "text", int: "an integer", float: "a number", type(None): "NULL"}


def _kind(value: Any) -> str:
    """What a stored value holds, in the words of :data:`_NAMES` (never the value)."""
    if isinstance(value, bool):
        return "a boolean"
    for cls, name in _NAMES.items():
        if isinstance(value, cls):
            return name
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, Mapping):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    return type(value).__name__


def _expected(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_expected(a) for a in typing.get_args(hint))
    if hint in _NAMES:
        return _NAMES[hint]
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
            return f"{name} holds {_kind(value)}, not {_expected(hint)}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            inner = field_problem(value)
            if inner is not None:
                return f"{name}.{inner}"
    return None


def _short(value: Any) -> str:
    """A stored enum value as a message shows it: its repr, at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with every value that is not text, an integer or NULL (bytes an edit
    left, an enum member) replaced by its value or what it holds, so JSON can carry it."""
    out = {}
    for key, stored in fields.items():
        value = stored.value if isinstance(stored, enum.Enum) else stored
        out[key] = value if isinstance(value, (str, int, type(None))) else _kind(value)
    return out


def _not_json(text: Any) -> bool:
    try:
        json.loads(text)
    except Exception:  # noqa: BLE001 - ValueError, TypeError, RecursionError: not readable
        return True
    return False


# -- rows as stored -------------------------------------------------------------------------------


def _raw(store: Any, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` (tables written ``{t}executions``, parameters ``?``) as
    stored, read through the store's own connection.

    Raises:
        TypeError: a store the CLI does not know how to read row by row.
        StoreError: the store failed.
    """
    if isinstance(store, SQLiteStore):
        text = sql.format(t="")
        return store._read(lambda conn: conn.execute(text, list(args)).fetchall())
    schema = getattr(store, "schema", None)
    if type(store).__name__ == "PostgresStore" and isinstance(schema, str):
        text = sql.format(t=schema + ".").replace("?", "%s")

        def read(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(text, list(args))
            return [tuple(row) for row in cur.fetchall()]

        rows: list[tuple[Any, ...]] = store._read(read)
        return rows
    raise TypeError(f"cannot read the rows of a {type(store).__name__} one by one")


def _where(
    sql: str, args: list[Any], column: str, values: Sequence[Any] | Any | None
) -> tuple[str, list[Any]]:
    """``sql`` and ``args`` narrowed to ``column`` = a value (or IN a sequence of them)."""
    if values is None:
        return sql, args
    if isinstance(values, (list, tuple)):
        marks = ", ".join("?" for _ in values)
        return f"{sql} AND {column} IN ({marks})", [*args, *values]
    return f"{sql} AND {column} = ?", [*args, values]


def _read_rows(
    store: Any,
    call: Callable[[], list[Any]],
    sql: str,
    args: list[Any],
    convert: Callable[[tuple[Any, ...]], Any],
) -> list[Any]:
    """``call()`` (the library's read), or, when the store cannot turn a row into an
    object, ``sql``'s rows as stored, each through ``convert`` (an object or
    :class:`Unreadable`)."""
    try:
        return call()
    except GuardError:  # StoreError: the store failed, not a row
        raise
    except Exception as exc:  # noqa: BLE001 - a row the store's parser refused
        try:
            rows = _raw(store, sql, args)
        except TypeError:
            raise exc from None
        return [convert(row) for row in rows]


# -- execution records ----------------------------------------------------------------------------

_RECORD_NAMES = ("namespace", "request_id", "action", "status", "created_at_ms")


def _record_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The identifying fields of a record row as --json shows them (status as stored)."""
    out = _plain({k: values.get(k) for k in _RECORD_NAMES})
    out["stored_status"] = out.pop("status")
    return out


def _unreadable_record(values: Mapping[str, Any], problem: str) -> Unreadable:
    name = f"{values.get('namespace')}/{values.get('request_id')}"
    return Unreadable("receipt", name, problem, _record_fields(values))


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
    return _unreadable_record(values, problem)


def _from_row(
    row: tuple[Any, ...],
    names: Sequence[str],
    convert: Callable[[tuple[Any, ...]], Any],
    unreadable: Callable[[Mapping[str, Any], str], Unreadable],
    problem: Callable[[Mapping[str, Any]], str | None],
) -> Any:
    """``convert(row)``, or ``unreadable(values, what)`` when ``problem(values)`` names
    what is wrong with the row (``values``: its columns by ``names``) or ``convert``
    refuses it."""
    values = dict(zip(names, row, strict=False))
    found = problem(values)
    if found is not None:
        return unreadable(values, found)
    try:
        return convert(row)
    except Exception as exc:  # noqa: BLE001 - any column the object cannot hold
        return unreadable(values, f"cannot be read ({type(exc).__name__})")


def _not_member(
    values: Mapping[str, Any], column: str, kind: type[enum.Enum], what: str
) -> str | None:
    """``"<column> 'X' is not <what>"`` when ``values[column]`` is no value of ``kind``."""
    if values.get(column) in kind._value2member_map_:
        return None
    return f"{column} {_short(values.get(column))} is not {what}"


_RECORD_COLUMNS = tuple(c.strip() for c in COLUMNS.split(","))


def _record_from_row(row: tuple[Any, ...]) -> Record | Unreadable:
    return cast(
        "Record | Unreadable",
        _from_row(
            row,
            _RECORD_COLUMNS,
            row_to_record,
            _unreadable_record,
            lambda v: _not_member(v, "status", Status, "a status"),
        ),
    )


def records(
    store: Any, *, namespace: str | None = None, statuses: Sequence[Status] | None = None
) -> tuple[list[Record | Unreadable], int]:
    """``store.records(namespace=, statuses=)`` with each row a checked :class:`Record`
    or :class:`Unreadable`, and the store's clock (ms)."""
    sql, args = _where(
        f"SELECT {COLUMNS} FROM {{t}}executions WHERE 1 = 1", [], "namespace", namespace
    )
    sql, args = _where(
        sql, args, "status", None if statuses is None else [s.value for s in statuses]
    )
    sql += " ORDER BY created_at_ms, namespace, request_id"
    clock: list[int] = []

    def call() -> list[Any]:
        found, now = store.records(namespace=namespace, statuses=statuses)
        clock.append(now)
        return list(found)

    rows = _read_rows(store, call, sql, args, _record_from_row)
    now = clock[0] if clock else store.records(limit=0)[1]
    return [check_record(r, now) for r in rows], now


def record(store: Any, namespace: str, request_id: str) -> tuple[Record | Unreadable | None, int]:
    """``store.get(namespace, request_id)``, the record checked (or :class:`Unreadable`)."""
    clock: list[int] = []

    def call() -> list[Any]:
        found, now = store.get(namespace, request_id)
        clock.append(now)
        return [] if found is None else [found]

    sql = f"SELECT {COLUMNS} FROM {{t}}executions WHERE namespace = ? AND request_id = ?"
    rows = _read_rows(store, call, sql, [namespace, request_id], _record_from_row)
    now = clock[0] if clock else store.records(limit=0)[1]
    return (check_record(rows[0], now) if rows else None), now


# -- audit events ---------------------------------------------------------------------------------

_EVENT_NAMES = tuple(c.strip() for c in EVENT_COLUMNS.split(","))


def _unreadable_event(values: Mapping[str, Any], problem: str) -> Unreadable:
    fields = _plain({k: v for k, v in values.items() if k != "detail"})  # redaction hides it
    return Unreadable("event", f"#{values.get('id')}", problem, fields)


def _check_event(event: AuditEvent | Unreadable) -> AuditEvent | Unreadable:
    if isinstance(event, Unreadable):
        return event
    problem = field_problem(event)
    if problem is None:
        return event
    return _unreadable_event({n: getattr(event, n) for n in _EVENT_NAMES}, problem)


def _event_problem(values: Mapping[str, Any]) -> str | None:
    found = _not_member(values, "kind", EventKind, "an event kind")
    if found is None and _not_json(values.get("detail")):
        return "detail is not JSON"
    return found


def _event_from_row(row: tuple[Any, ...]) -> AuditEvent | Unreadable:
    return cast(
        "AuditEvent | Unreadable",
        _from_row(row, _EVENT_NAMES, row_to_event, _unreadable_event, _event_problem),
    )


def raw_event(event: Unreadable, store: Any) -> dict[str, Any]:
    """Every column of unreadable event ``event`` as stored, its detail too (for an export,
    which redacts it)."""
    rows = _raw(
        store, f"SELECT {EVENT_COLUMNS} FROM {{t}}audit_events WHERE id = ?", [event.get("id")]
    )
    if not rows:  # deleted since
        return dict(event.fields)
    stored = dict(zip(_EVENT_NAMES, rows[0], strict=False))
    out = _plain({k: v for k, v in stored.items() if k != "detail"})
    detail: Any = stored.get("detail")
    out["detail"] = detail if _not_json(detail) else json.loads(detail)  # text, or its JSON
    if not isinstance(out["detail"], (str, int, float, list, dict, type(None))):
        out["detail"] = _kind(out["detail"])
    return out


def events(
    store: Any, *, namespace: str | None = None, subject: str | None = None, after_id: int = 0
) -> list[AuditEvent | Unreadable]:
    """``store.events(namespace=, subject=, after_id=)``, each a checked event or
    :class:`Unreadable`, in id order."""
    sql = f"SELECT {EVENT_COLUMNS} FROM {{t}}audit_events WHERE id > ?"
    sql, args = _where(sql, [after_id], "namespace", namespace)
    sql, args = _where(sql, args, "subject", subject)
    sql += " ORDER BY id"

    def call() -> list[Any]:
        return list(store.events(namespace=namespace, subject=subject, after_id=after_id))

    return [_check_event(e) for e in _read_rows(store, call, sql, args, _event_from_row)]


# -- cases and signals ----------------------------------------------------------------------------

_CASE_NAMES = tuple(c.strip() for c in CASE_COLUMNS.split(","))
_SIGNAL_NAMES = tuple(c.strip() for c in SIGNAL_COLUMNS.split(","))


def _unreadable_case(values: Mapping[str, Any], problem: str) -> Unreadable:
    keep = ("namespace", "case_id", "state", "created_at_ms", "updated_at_ms")
    fields = _plain({k: values.get(k) for k in keep})
    return Unreadable("case", f"{values.get('namespace')}/{values.get('case_id')}", problem, fields)


def _case_from_row(row: tuple[Any, ...]) -> CaseRow | Unreadable:
    return cast(
        "CaseRow | Unreadable",
        _from_row(
            row,
            _CASE_NAMES,
            row_to_case,
            _unreadable_case,
            lambda v: _not_member(v, "state", CaseState, "a case state"),
        ),
    )


def _signal_from_row(row: tuple[Any, ...]) -> tuple[Signal, str] | Unreadable:
    values = dict(zip(_SIGNAL_NAMES, row, strict=False))
    name = f"#{values.get('id')} (source {_short(values.get('source'))})"
    fields = _plain({k: values.get(k) for k in ("source", "outcome", "at_ms", "status")})
    if _not_json(values.get("metadata")):
        return Unreadable("signal", name, "metadata is not JSON", fields)
    try:
        signal = row_to_signal(row)
    except Exception as exc:  # noqa: BLE001 - any column the signal cannot hold
        return Unreadable("signal", name, f"cannot be read ({type(exc).__name__})", fields)
    problem = field_problem(signal)
    if problem is None and not isinstance(values.get("status"), str):
        problem = f"status holds {_kind(values.get('status'))}, not text"
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

    return _read_rows(store, call, sql, [namespace, case_id], _signal_from_row)


def _case(store: Any, row: CaseRow | Unreadable) -> Case | Unreadable:
    """The case of ``row`` with its live signals, or :class:`Unreadable` (the case's row,
    or one of its live signals, cannot be read: its tally cannot be counted)."""
    if isinstance(row, Unreadable):
        return row
    values = {n: getattr(row, n) for n in _CASE_NAMES}
    problem = field_problem(row)
    if problem is not None:
        return _unreadable_case(values, problem)
    live: list[Signal] = []
    for item in signals(store, row.namespace, row.case_id):
        if isinstance(item, Unreadable):
            if item.get("status") in ("live", None) or not isinstance(item.get("status"), str):
                return _unreadable_case(values, f"signal {item.name}: {item.problem}")
            continue
        if item[1] == "live":
            live.append(item[0])
    try:
        return Case._from(row, live)
    except Exception as exc:  # noqa: BLE001 - a policy or signal the tally cannot count
        return _unreadable_case(values, f"cannot be read ({type(exc).__name__})")


def cases(
    store: Any, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
) -> list[Case | Unreadable]:
    """The cases ``FinalityGate.cases(namespace=, states=)`` lists, oldest first, each a
    :class:`Case` or :class:`Unreadable`."""
    sql, args = _where(
        f"SELECT {CASE_COLUMNS} FROM {{t}}cases WHERE 1 = 1", [], "namespace", namespace
    )
    sql, args = _where(sql, args, "state", None if states is None else [s.value for s in states])
    sql += " ORDER BY created_at_ms, namespace, case_id"

    def call() -> list[Any]:
        return list(store.cases(namespace=namespace, states=states))

    return [_case(store, r) for r in _read_rows(store, call, sql, args, _case_from_row)]


def case(store: Any, namespace: str, case_id: str) -> Case | Unreadable | None:
    """The case, as ``FinalityGate.get``, or :class:`Unreadable`, or ``None``."""
    sql = f"SELECT {CASE_COLUMNS} FROM {{t}}cases WHERE namespace = ? AND case_id = ?"

    def call() -> list[Any]:
        row, _live = store.get_case(namespace, case_id)
        return [] if row is None else [row]

    rows = _read_rows(store, call, sql, [namespace, case_id], _case_from_row)
    return _case(store, rows[0]) if rows else None
