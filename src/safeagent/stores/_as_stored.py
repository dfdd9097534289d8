"""Reading a store's rows one by one, as stored: a row that cannot be turned into an
object (edited by hand, written by another tool, corrupt: a status, event kind or case
state no release writes, text that is not JSON) comes back as :class:`Unreadable`, and
never hides the rows around it. ``safeagent.audit.verify`` reports each such row and
checks the others; the CLI shows them marked.

Each reader asks the store first, as the library does. Only when the store's parser
refuses one of the rows does it read the same rows as stored (the SQL stores'
``_rows_as_stored``) and convert them one by one. A store without that method (the
memory store, whose rows are objects) is read as usual, and its error raised.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from safeagent._cases import CaseRow, CaseState
from safeagent._receipt import Record, Status
from safeagent.errors import GuardError
from safeagent.stores._rows import CASE_COLUMNS, COLUMNS, row_to_case, row_to_record


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored row that cannot be read.

    Attributes:
        what: the kind of row: ``"receipt"``, ``"event"``, ``"case"`` or ``"signal"``.
        name: the row as the operator finds it: ``default/r-1``, ``#2``.
        problem: what cannot be read, without the stored value of a payload, result,
            detail or metadata (it may hold what redaction hides): ``created_at_ms holds
            text, not an integer``, ``result is not JSON``.
        fields: the row's identifying columns as stored (namespace, id, action, status,
            kind, times), for a listing and ``--json``; a value that is not text, an
            integer or NULL is described (``"bytes"``), not given.
        key: the row's identity as stored, raw: ``(namespace, request_id)`` of a record,
            ``(namespace, case_id)`` of a case (``()`` for other rows). Compare rows by
            this, never by ``fields``, where a described value could equal a real id.
    """

    what: str
    name: str
    problem: str
    fields: dict[str, Any]
    key: tuple[Any, ...] = ()

    def describe(self) -> str:
        """``receipt default/r-1: result is not JSON``."""
        return f"{self.what} {self.name}: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        """The identifying fields and ``unreadable``: the problem."""
        return {**self.fields, "unreadable": self.problem}

    def get(self, key: str) -> Any:
        """An identifying field as stored, or ``None``."""
        return self.fields.get(key)


# -- describing stored values, never showing them -------------------------------------------------

NAMES: dict[type, str] = {str: "text", int: "an integer", float: "a number", type(None): "NULL"}


def kind_of(value: Any) -> str:
    """What a stored value holds, in the words of :data:`NAMES` (never the value)."""
    if isinstance(value, bool):
        return "a boolean"
    for cls, name in NAMES.items():
        if isinstance(value, cls):
            return name
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, Mapping):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    return type(value).__name__


def short(value: Any) -> str:
    """A stored enum value as a message shows it: its repr, at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def plain(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with every value that is not text, an integer or NULL (bytes an edit
    left, an enum member) replaced by its value or what it holds, so JSON can carry it."""
    out = {}
    for key, stored in fields.items():
        value = stored.value if isinstance(stored, enum.Enum) else stored
        out[key] = value if isinstance(value, (str, int, type(None))) else kind_of(value)
    return out


def not_json(text: Any) -> bool:
    """True if ``text`` does not decode as JSON (not text, not JSON, nested too deep)."""
    try:
        json.loads(text)
    except Exception:  # noqa: BLE001 - ValueError, TypeError, RecursionError: not readable
        return True
    return False


def not_member(
    values: Mapping[str, Any], column: str, kind: type[enum.Enum], what: str
) -> str | None:
    """``"<column> 'X' is not <what>"`` when ``values[column]`` is no value of ``kind``."""
    try:
        if values.get(column) in kind._value2member_map_:
            return None
    except TypeError:  # unhashable: not a member
        pass
    return f"{column} {short(values.get(column))} is not {what}"


# -- rows as stored -------------------------------------------------------------------------------


def rows_as_stored(store: Any, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` (tables written ``{t}executions``, parameters ``?``) as
    stored, read through the store's own connection.

    Raises:
        TypeError: a store that cannot be read row by row (no ``_rows_as_stored``).
        StoreError: the store failed.
    """
    read = getattr(type(store), "_rows_as_stored", None)
    if read is None:
        raise TypeError(f"cannot read the rows of a {type(store).__name__} one by one")
    return cast("list[tuple[Any, ...]]", read(store, sql, args))


def where(
    sql: str, args: list[Any], column: str, values: Sequence[Any] | Any | None
) -> tuple[str, list[Any]]:
    """``sql`` and ``args`` narrowed to ``column`` = a value (or IN a sequence of them)."""
    if values is None:
        return sql, args
    if isinstance(values, (list, tuple)):
        marks = ", ".join("?" for _ in values)
        return f"{sql} AND {column} IN ({marks})", [*args, *values]
    return f"{sql} AND {column} = ?", [*args, values]


def read_rows(
    store: Any,
    call: Callable[[], list[Any]],
    sql: str,
    args: list[Any],
    convert: Callable[[tuple[Any, ...]], Any],
) -> list[Any]:
    """``call()`` (the library's read), or, when the store cannot turn a row into an
    object, ``sql``'s rows as stored, each through ``convert`` (an object or
    :class:`Unreadable`).

    Raises:
        StoreError: the store failed (not a row).
        Exception: the library's read's error, for a store that cannot be read row by row.
    """
    try:
        return call()
    except GuardError:  # StoreError: the store failed, not a row
        raise
    except Exception as exc:  # noqa: BLE001 - a row the store's parser refused
        try:
            rows = rows_as_stored(store, sql, args)
        except TypeError:
            raise exc from None
        return [convert(row) for row in rows]


def from_row(
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


# -- execution records ----------------------------------------------------------------------------

_RECORD_NAMES = ("namespace", "request_id", "action", "status", "created_at_ms")
RECORD_COLUMNS = tuple(c.strip() for c in COLUMNS.split(","))


def unreadable_record(values: Mapping[str, Any], problem: str) -> Unreadable:
    """The :class:`Unreadable` of a record row (``values``: its columns by name)."""
    fields = plain({k: values.get(k) for k in _RECORD_NAMES})
    fields["stored_status"] = fields.pop("status")
    name = f"{values.get('namespace')}/{values.get('request_id')}"
    key = _raw_key(values.get("namespace"), values.get("request_id"))
    return Unreadable("receipt", name, problem, fields, key)


def record_from_row(row: tuple[Any, ...]) -> Record | Unreadable:
    """A record row (:data:`COLUMNS` order) as a :class:`Record` or :class:`Unreadable`."""
    return cast(
        "Record | Unreadable",
        from_row(
            row,
            RECORD_COLUMNS,
            row_to_record,
            unreadable_record,
            lambda v: not_member(v, "status", Status, "a status"),
        ),
    )


def record_rows(
    store: Any, *, namespace: str | None = None, statuses: Sequence[Status] | None = None
) -> tuple[list[Record | Unreadable], int | None]:
    """``store.records(namespace=, statuses=)`` row by row: each a :class:`Record` or
    :class:`Unreadable`, oldest first, and the store's clock (ms; ``None`` when the rows
    were read as stored, which reads no clock).

    Raises:
        StoreError: the store failed.
    """
    sql, args = where(
        f"SELECT {COLUMNS} FROM {{t}}executions WHERE 1 = 1", [], "namespace", namespace
    )
    sql, args = where(
        sql, args, "status", None if statuses is None else [s.value for s in statuses]
    )
    sql += " ORDER BY created_at_ms, namespace, request_id"
    clock: list[int] = []

    def call() -> list[Any]:
        found, now = store.records(namespace=namespace, statuses=statuses)
        clock.append(now)
        return list(found)

    rows = read_rows(store, call, sql, args, record_from_row)
    return rows, (clock[0] if clock else None)


# -- cases ----------------------------------------------------------------------------------------

CASE_NAMES = tuple(c.strip() for c in CASE_COLUMNS.split(","))


def unreadable_case(values: Mapping[str, Any], problem: str) -> Unreadable:
    """The :class:`Unreadable` of a case row (``values``: its columns by name)."""
    keep = ("namespace", "case_id", "state", "created_at_ms", "updated_at_ms")
    fields = plain({k: values.get(k) for k in keep})
    name = f"{values.get('namespace')}/{values.get('case_id')}"
    key = _raw_key(values.get("namespace"), values.get("case_id"))
    return Unreadable("case", name, problem, fields, key)


def _raw_key(*values: Any) -> tuple[Any, ...]:
    """``values`` as stored, made hashable (a ``memoryview`` or ``bytearray`` as bytes;
    anything else unhashable as its repr)."""
    out = []
    for stored in values:
        value = bytes(stored) if isinstance(stored, (memoryview, bytearray)) else stored
        try:
            hash(value)
        except TypeError:
            value = repr(value)
        out.append(value)
    return tuple(out)


def case_from_row(row: tuple[Any, ...]) -> CaseRow | Unreadable:
    """A case row (:data:`CASE_COLUMNS` order) as a :class:`CaseRow` or :class:`Unreadable`."""
    return cast(
        "CaseRow | Unreadable",
        from_row(
            row,
            CASE_NAMES,
            row_to_case,
            unreadable_case,
            lambda v: not_member(v, "state", CaseState, "a case state"),
        ),
    )


def case_rows(
    store: Any, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
) -> list[CaseRow | Unreadable]:
    """``store.cases(namespace=, states=)`` row by row: each a :class:`CaseRow` or
    :class:`Unreadable`, oldest first.

    Raises:
        StoreError: the store failed.
    """
    sql, args = where(
        f"SELECT {CASE_COLUMNS} FROM {{t}}cases WHERE 1 = 1", [], "namespace", namespace
    )
    sql, args = where(sql, args, "state", None if states is None else [s.value for s in states])
    sql += " ORDER BY created_at_ms, namespace, case_id"

    def call() -> list[Any]:
        return list(store.cases(namespace=namespace, states=states))

    return read_rows(store, call, sql, args, case_from_row)
