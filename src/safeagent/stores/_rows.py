"""Row <-> object mapping shared by the SQL stores (column orders are the same in both)."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Sequence
from typing import Any, cast

from safeagent._audit import AuditEvent, EventKind
from safeagent._cases import CaseRow, CaseState, Signal
from safeagent._receipt import ErrorInfo, Record, Status

COLUMNS = (
    "namespace, request_id, action, fingerprint, status, payload, result, error_type, "
    "error_message, execution_id, attempt, fencing_token, lease_owner, lease_expires_at_ms, "
    "downstream_key, created_at_ms, claimed_at_ms, updated_at_ms, completed_at_ms, purged_at_ms, "
    "attempt_owner, attempt_ended_at_ms, ended_attempt"
)
N_COLUMNS = COLUMNS.count(",") + 1
"""How many columns ``COLUMNS`` names: a statement that returns them and more (the clock,
chain heads) has its extra columns from this index on."""
CASE_COLUMNS = (
    "namespace, case_id, state, provisional_outcome, outcome, threshold, quorum, version, "
    "created_at_ms, updated_at_ms, resolved_by"
)
EVENT_COLUMNS = (
    "id, at_ms, kind, namespace, subject, action, actor, execution_id, fencing_token, detail"
)


_STATUS = {status.value: status for status in Status}


def row_to_record(row: Sequence[Any]) -> Record:
    """A :class:`Record` from a row in ``COLUMNS`` order (positional: it runs on every
    read and write of the hot path)."""
    status = _STATUS.get(row[4]) or Status(row[4])  # Status() raises on a foreign value
    return Record(
        row[0],  # namespace
        row[1],  # request_id
        row[2],  # action
        row[3],  # fingerprint
        status,
        row[5],  # payload_json
        row[6],  # result_json
        None if row[7] is None else ErrorInfo(row[7], row[8] or ""),
        row[9],  # execution_id
        row[10],  # attempt
        row[11],  # fencing_token
        row[12],  # lease_owner
        row[13],  # lease_expires_at_ms
        row[14],  # downstream_key
        row[15],  # created_at_ms
        row[16],  # claimed_at_ms
        row[17],  # updated_at_ms
        row[18],  # completed_at_ms
        row[19],  # purged_at_ms
        row[20],  # attempt_owner
        row[21],  # attempt_ended_at_ms
        row[22],  # ended_attempt
    )


def row_to_case(row: Sequence[Any]) -> CaseRow:
    return CaseRow(
        namespace=row[0],
        case_id=row[1],
        state=CaseState(row[2]),
        provisional_outcome=row[3],
        outcome=row[4],
        threshold=row[5],
        quorum=row[6],
        version=row[7],
        created_at_ms=row[8],
        updated_at_ms=row[9],
        resolved_by=row[10],
    )


def row_to_signal(row: Sequence[Any]) -> Signal:
    return Signal(
        source=row[0],
        outcome=row[1],
        confidence=row[2],
        metadata=json.loads(row[3]),
        at_ms=row[4],
    )


# Built once: json.dumps with options builds a new encoder on every call.
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=str)
_CHAIN_BODY = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
_dumps = _DUMPS.encode
_chain_body = _CHAIN_BODY.encode
_join = "".join
_sha256 = hashlib.sha256

# Every JSON type, escapes, a lone surrogate and an astral character, nested.
_PROBE: list[Any] = [
    None,
    True,
    False,
    0,
    -(2**70),
    1.5,
    -0.0,
    1e300,
    '\u00e9"\\\n\x7f\ud800\U0001f600',
]
_PROBE.append({"k": [1, {}, ()], "\u00e9": {"x": None}, "": list(_PROBE)})


def _prebuilt(encoder: json.JSONEncoder) -> Callable[[Any, int], Sequence[str]]:
    """``encoder.encode`` without its set-up, which costs a quarter of encoding a small
    event: the C encoder that ``encode`` builds on every call, built once, for the hot
    path (called as ``"".join(encode(value, 0))``). Unlike ``encode`` it has no
    circular-reference check (a table that would be per call), so it is only given flat
    lists and dicts of scalars, which cannot loop or nest (:func:`_chain_text`,
    :func:`event_row`). Where the C encoder
    is missing or differs (another interpreter, another version), ``encoder.encode``
    itself."""
    encode = encoder.encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is not None and encoder.ensure_ascii and encoder.indent is None:
        try:
            built = make(
                None,  # markers: no circular-reference check
                encoder.default,
                json.encoder.encode_basestring_ascii,
                None,  # indent
                encoder.key_separator,
                encoder.item_separator,
                encoder.sort_keys,
                encoder.skipkeys,
                encoder.allow_nan,
            )
            if _join(built(_PROBE, 0)) == encode(_PROBE):
                return cast(Callable[[Any, int], Sequence[str]], built)
        except Exception:  # noqa: BLE001, S110 - any surprise: keep encoder.encode
            pass
    return lambda value, _level: (encode(value),)


_chain_body_fast = _prebuilt(_CHAIN_BODY)
_dumps_fast = _prebuilt(_DUMPS)
_FLAT = frozenset({str, int, type(None)})


def dumps(value: Any) -> str:
    return _dumps(value)


def event_row(event: AuditEvent) -> tuple[Any, ...]:
    kind = event.kind._value_  # what .value returns, without the enum property's Python code
    detail = event.detail
    # A private copy: what is checked below is what is encoded.
    detail = detail.copy() if type(detail) is dict else dict(detail)
    if _FLAT.issuperset(map(type, detail.values())):
        # Flat (every value a str, an int or None: a replay's, a completion's): nothing
        # nests, so nothing can loop, and the encoder built once writes it as _dumps does.
        text = _join(_dumps_fast(detail, 0))
    else:
        # The checked encoder: a detail holds what a redact hook returned, which may nest
        # deeply or loop, and only the circular-reference check stops a loop before it
        # runs the C stack out (a segfault under a raised recursion limit or in a small
        # thread).
        text = _dumps(detail)
    return (
        event.at_ms,
        kind,
        event.namespace,
        event.subject,
        event.action,
        event.actor,
        event.execution_id,
        event.fencing_token,
        text,
    )


def row_to_event(r: Sequence[Any]) -> AuditEvent:
    return AuditEvent(
        id=r[0],
        at_ms=r[1],
        kind=EventKind(r[2]),
        namespace=r[3],
        subject=r[4],
        action=r[5],
        actor=r[6],
        execution_id=r[7],
        fencing_token=r[8],
        detail=json.loads(r[9]),
    )


# -- the hash chains of the audit trail (docs/design.md section 5) ---------------------------------

CHAIN_SHARDS = 16
"""Events are chained per shard of ``(namespace, subject)``: writers on different shards
never wait for each other, and every shard's head can be anchored. A store has this many
chains unless it says otherwise (its ``chain_shards``): the SQLite and memory stores, and
PostgreSQL schemas whose chains began before version 4 (see ``_pg_sql.NEW_CHAIN_SHARDS``)."""
GENESIS = "0" * 64
Heads = dict[int, tuple[int, str]]
"""Chain heads: shard -> (seq, hash of the last event)."""
CHAIN_COLUMNS = (
    "id, shard, seq, prev_hash, hash, at_ms, kind, namespace, subject, action, actor, "
    "execution_id, fencing_token, detail"
)


def shard_of(namespace: str, subject: str, chains: int) -> int:
    """The chain an event of ``(namespace, subject)`` belongs to, in a store of ``chains``
    chains: CRC-32 of the UTF-8 text, modulo ``chains``."""
    # Concatenated, not formatted: a str subclass (a str-valued Enum) counts by its
    # characters, as the database stores it, not by its __format__ ("Tenant.ACME").
    key = (namespace + "\x00" + subject).encode("utf-8", "surrogatepass")
    return zlib.crc32(key) % chains


def chain_hash(prev_hash: str, shard: int, seq: int, row: Sequence[Any]) -> str:
    """SHA-256 over the previous hash, the event's place in its chain and every stored
    field of the event (``row`` as made by :func:`event_row`, the detail as stored text)."""
    # The text is ASCII (the encoder escapes the rest): encode() gives its ASCII bytes.
    return _sha256(_chain_text(prev_hash, shard, seq, row).encode()).hexdigest()


def _chain_text(prev_hash: str, shard: int, seq: int, row: Sequence[Any]) -> str:
    """``_chain_body([prev_hash, shard, seq, *row])``, byte for byte, from the C encoder
    built once (tests/test_audit_evidence.py compares them)."""
    fields = [prev_hash, shard, seq, *row]
    if _FLAT.issuperset(map(type, fields)):  # as stored: nothing nests, nothing can loop
        return _join(_chain_body_fast(fields, 0))
    return _chain_body(fields)


def chain_rows(
    events: Sequence[AuditEvent], heads: Heads, shards: Sequence[int]
) -> list[tuple[Any, ...]]:
    """Rows for ``events`` with ``(shard, seq, prev_hash, hash)`` appended, extending the
    chain ``heads`` (shard -> (seq, hash)), which is updated in place. ``shards``: each
    event's :func:`shard_of` in the store's number of chains."""
    rows = []
    for event, shard in zip(events, shards, strict=True):
        seq, prev = heads.get(shard, (0, GENESIS))
        seq += 1
        row = event_row(event)
        digest = chain_hash(prev, shard, seq, row)
        rows.append((*row, shard, seq, prev, digest))
        heads[shard] = (seq, digest)
    return rows
