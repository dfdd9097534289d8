"""The audit trail as evidence: hash chains, HMAC anchors, verification, export, stats.

Every audit event is chained (docs/design.md section 5): its hash covers the previous hash of its
chain, its place in the chain and every stored field. Events are chained per *shard* of
``(namespace, subject)`` (16 chains), so writers on different shards never wait for each
other, on one host or many. A chain alone proves nothing against someone who can rewrite
the whole database, so :func:`anchor` signs the heads of all chains with an HMAC key that
the database's writers do not hold (an environment variable or a file on the operator's
machine); :func:`verify` then finds an edited, deleted or reordered event, or a chain
rewritten after an anchor, and says which.

Typical use: ``safeagent audit anchor`` from a cron job with the key, and
``safeagent audit verify`` when evidence matters.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from safeagent._audit import EventKind, Redactor, default_redactor
from safeagent._receipt import TERMINAL, Record, Status
from safeagent.errors import ConfigurationError
from safeagent.stores._base import OUTCOME_DIGEST, outcome_digest
from safeagent.stores._rows import GENESIS, Heads, chain_hash, shard_of

KEY_ENV = "SAFEAGENT_AUDIT_KEY"
MIN_KEY_BYTES = 16

__all__ = [
    "Anchor",
    "Problem",
    "Stats",
    "VerifyReport",
    "anchor",
    "export",
    "load_key",
    "stats",
    "verify",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of :func:`verify`.

    ``kind`` is one of ``"edited"`` (an event's fields no longer match its hash),
    ``"deleted"`` (a gap in a chain, or events missing after an anchored head),
    ``"reordered"`` (an event no longer follows the one it was chained to),
    ``"rewritten"`` (a chain is consistent but differs from what an anchor signed),
    ``"bad_anchor"`` (an anchor's HMAC does not match: forged, or another key),
    ``"head_mismatch"`` (the stored chain head is not the last event's hash), or
    ``"receipt_edited"`` (a stored outcome no longer matches the digest its event recorded;
    ``seq`` and ``event_id`` name that event).
    """

    kind: str
    shard: int
    seq: int | None
    event_id: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify` found: ``ok`` when there are no problems."""

    events_checked: int
    anchors_checked: int
    anchors_unverified: int
    problems: list[Problem] = field(default_factory=list)
    receipts_checked: int = 0
    """Finished records whose stored outcome was compared with its event's digest."""
    receipts_unverified: int = 0
    """Finished records with no digest to compare with (written before digests existed)."""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class Anchor:
    """A signed snapshot of every chain's head: ``heads`` maps shard -> (seq, hash)."""

    id: int
    at_ms: int
    heads: Mapping[int, tuple[int, str]]
    mac: str


def load_key(*, path: str | None = None, env: str = KEY_ENV) -> bytes:
    """The anchoring key: the file at ``path``, else the environment variable ``env``.

    Keep it away from the database's writers: whoever holds it can sign a rewritten trail.

    Raises:
        ConfigurationError: no key, or one shorter than 16 bytes.
    """
    if path is not None:
        try:
            with open(path, "rb") as fh:
                key = fh.read().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the audit key file {path}: {exc}") from exc
    else:
        key = os.environ.get(env, "").encode()
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"an audit key of at least {MIN_KEY_BYTES} bytes is needed "
            f"(${env} or a key file); got {len(key)}"
        )
    return key


def anchor(store: Any, *, key: bytes) -> Anchor:
    """Sign the current head of every chain with ``key`` and store the anchor.

    Raises:
        ConfigurationError: a key shorter than 16 bytes.
        StoreError: the store failed.
    """
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(f"an audit key of at least {MIN_KEY_BYTES} bytes is needed")
    heads: Heads = store.chain_heads()
    signed = {
        "signed_at_ms": time.time_ns() // 1_000_000,
        "heads": {str(shard): [seq, digest] for shard, (seq, digest) in sorted(heads.items())},
    }
    heads_json = json.dumps(signed, separators=(",", ":"), sort_keys=True)
    mac = hmac.new(key, heads_json.encode(), hashlib.sha256).hexdigest()
    anchor_id, at_ms = store.add_anchor(heads_json, mac)
    return Anchor(anchor_id, at_ms, heads, mac)


def verify(store: Any, *, key: bytes | None = None) -> VerifyReport:
    """Check every chain, and every anchor (its HMAC with ``key``, and that the chain still
    passes through the head it signed).

    Without ``key`` the anchors' signatures are not checked (``anchors_unverified``), but
    chains are still compared with the heads the anchors recorded.

    Every finished record (SUCCEEDED or FAILED, not purged) is also compared with the
    outcome digest of the last event that stored its outcome, so an edit of a stored
    result or error is found too (``receipts_checked``; records older than digests count
    as ``receipts_unverified``).
    """
    rows, heads = store.audit_chain()
    problems: list[Problem] = []
    by_shard: dict[int, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_shard.setdefault(int(row[1]), []).append(row)
    hash_at: dict[tuple[int, int], str] = {}
    for shard, chain in by_shard.items():
        expected_prev, expected_seq = GENESIS, 1
        for row in chain:
            event_id, seq, prev, digest = row[0], int(row[2]), row[3], row[4]
            fields = row[5:]
            if seq != expected_seq:
                problems.append(
                    Problem(
                        "deleted",
                        shard,
                        expected_seq,
                        event_id,
                        f"chain {shard} jumps from seq {expected_seq - 1} to {seq}",
                    )
                )
            if chain_hash(prev, shard, seq, fields) != digest:
                problems.append(
                    Problem(
                        "edited",
                        shard,
                        seq,
                        event_id,
                        f"event {event_id} no longer matches its hash",
                    )
                )
            elif prev != expected_prev and seq == expected_seq:
                problems.append(
                    Problem(
                        "reordered",
                        shard,
                        seq,
                        event_id,
                        f"event {event_id} is chained to another predecessor than the event "
                        "before it",
                    )
                )
            hash_at[(shard, seq)] = digest
            expected_prev, expected_seq = digest, seq + 1
    for shard, (seq, digest) in heads.items():
        last = hash_at.get((shard, seq)) if seq else GENESIS
        if seq and last is None:
            problems.append(
                Problem(
                    "deleted",
                    shard,
                    seq,
                    None,
                    f"chain {shard}'s head is seq {seq}, but that event is missing",
                )
            )
        elif last != digest:
            problems.append(
                Problem(
                    "head_mismatch",
                    shard,
                    seq,
                    None,
                    f"chain {shard}'s stored head does not match its last event",
                )
            )
    checked = unverified = 0
    for anchor_id, _at_ms, heads_json, mac in store.anchors():
        checked += 1
        if key is None:
            unverified += 1
        elif not hmac.compare_digest(
            hmac.new(key, heads_json.encode(), hashlib.sha256).hexdigest(), mac
        ):
            problems.append(
                Problem(
                    "bad_anchor",
                    -1,
                    None,
                    None,
                    f"anchor {anchor_id}'s signature does not match (forged, or another key)",
                )
            )
            continue
        for shard_text, (seq, digest) in json.loads(heads_json)["heads"].items():
            shard = int(shard_text)
            if seq == 0:
                continue
            found = hash_at.get((shard, int(seq)))
            if found is None:
                problems.append(
                    Problem(
                        "deleted",
                        shard,
                        int(seq),
                        None,
                        f"anchor {anchor_id} signed chain {shard} up to seq {seq}, now missing",
                    )
                )
            elif found != digest:
                problems.append(
                    Problem(
                        "rewritten",
                        shard,
                        int(seq),
                        None,
                        f"chain {shard} at seq {seq} differs from what anchor {anchor_id} signed",
                    )
                )
    receipts = _check_receipts(store, rows, problems)
    return VerifyReport(len(rows), checked, unverified, problems, *receipts)


# CHAIN_COLUMNS positions: id, shard, seq, ..., namespace, subject, ..., detail
_ID, _SHARD, _SEQ, _NAMESPACE, _SUBJECT, _DETAIL = 0, 1, 2, 7, 8, 13


def _outcome_digests(rows: list[tuple[Any, ...]]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """(namespace, request id) -> (digest, shard, seq, event id) of the last event that
    stored its outcome. A subject's events are all in one chain, read in seq order."""
    found: dict[tuple[str, str], tuple[Any, ...]] = {}
    for row in rows:
        text = row[_DETAIL]
        if OUTCOME_DIGEST not in text:  # cheap test before parsing
            continue
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            digest = json.loads(text).get(OUTCOME_DIGEST)
            if isinstance(digest, str):
                key = (row[_NAMESPACE], row[_SUBJECT])
                found[key] = (digest, int(row[_SHARD]), int(row[_SEQ]), row[_ID])
    return found


def _stored_digest(record: Record) -> str:
    error = record.error
    return outcome_digest(
        record.execution_id,
        record.status.value,
        record.result_json,
        None if error is None else error.type,
        None if error is None else error.message,
    )


def _check_receipts(
    store: Any, rows: list[tuple[Any, ...]], problems: list[Problem]
) -> tuple[int, int]:
    """Compare every finished record with its event's outcome digest; returns (checked,
    unverified). Records and events are read apart, so a record that finished or was
    resolved between the two reads is read again with its latest events before it is
    reported."""
    digests = _outcome_digests(rows)
    records, _ = store.records(statuses=(Status.SUCCEEDED, Status.FAILED))
    checked = unverified = 0
    for record in records:
        if record.purged_at_ms is not None:
            continue  # a tombstone: retention removed what the digest covered
        key = (record.namespace, record.request_id)
        expected = digests.get(key)
        if expected is not None and expected[0] == _stored_digest(record):
            checked += 1
            continue
        current, expected = _read_again(store, record)
        if current is None or current.status not in TERMINAL or current.purged_at_ms:
            continue  # changed meanwhile into something with nothing to compare
        if expected is None:
            unverified += 1
            continue
        checked += 1
        if expected[0] != _stored_digest(current):
            problems.append(
                Problem(
                    "receipt_edited",
                    expected[1],
                    expected[2],
                    expected[3],
                    f"request {record.request_id!r} ({record.namespace}): the stored "
                    f"{current.status.value} outcome differs from the one event "
                    f"{expected[3]} recorded",
                )
            )
    return checked, unverified


def _read_again(store: Any, record: Record) -> tuple[Record | None, tuple[Any, ...] | None]:
    current, _ = store.get(record.namespace, record.request_id)
    expected = None
    for event in store.events(namespace=record.namespace, subject=record.request_id):
        digest = event.detail.get(OUTCOME_DIGEST) if isinstance(event.detail, dict) else None
        if isinstance(digest, str):
            expected = (digest, shard_of(record.namespace, record.request_id), None, event.id)
    return current, expected


def export(
    store: Any,
    out: TextIO,
    *,
    fmt: str = "jsonl",
    namespace: str | None = None,
    redact: Redactor = default_redactor,
) -> int:
    """Write the audit trail to ``out`` as JSON lines or CSV, details redacted with
    ``redact``; returns the number of events written.

    Raises:
        ConfigurationError: an unknown format.
    """
    if fmt not in ("jsonl", "csv"):
        raise ConfigurationError(f"format must be 'jsonl' or 'csv', got {fmt!r}")
    events = store.events(namespace=namespace)
    columns = [
        "id",
        "at_ms",
        "kind",
        "namespace",
        "subject",
        "action",
        "actor",
        "execution_id",
        "fencing_token",
        "detail",
    ]
    writer = csv.DictWriter(out, fieldnames=columns) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    for event in events:
        row = event.to_dict()
        row["detail"] = redact(row["detail"])
        if writer is None:
            out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        else:
            row["detail"] = json.dumps(row["detail"], ensure_ascii=False)
            writer.writerow(row)
    return len(events)


@dataclass(frozen=True, slots=True)
class Stats:
    """Counts from the audit trail over a time window: ``executions`` (claims that ran
    ``fn``), ``replays`` (duplicates blocked), ``conflicts``, ``in_doubt`` (records that went
    or were seen in doubt), and the same per action."""

    executions: int = 0
    replays: int = 0
    conflicts: int = 0
    in_doubt: int = 0
    per_action: dict[str, dict[str, int]] = field(default_factory=dict)


_STAT_OF = {
    EventKind.CLAIMED: "executions",
    EventKind.REPLAYED: "replays",
    EventKind.CONFLICT: "conflicts",
    EventKind.IN_DOUBT: "in_doubt",
}


def stats(
    store: Any,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    namespace: str | None = None,
) -> Stats:
    """Count executions, replays, conflicts and in-doubt events between ``since_ms`` and
    ``until_ms`` (store-clock ms; ``None``: unbounded)."""
    totals = dict.fromkeys(("executions", "replays", "conflicts", "in_doubt"), 0)
    per_action: dict[str, dict[str, int]] = {}
    for event in store.events(namespace=namespace):
        name = _STAT_OF.get(event.kind)
        if name is None or (event.kind is EventKind.CLAIMED and event.detail.get("reconcile")):
            continue
        if (since_ms is not None and event.at_ms < since_ms) or (
            until_ms is not None and event.at_ms >= until_ms
        ):
            continue
        totals[name] += 1
        action = per_action.setdefault(event.action or "-", dict.fromkeys(totals, 0))
        action[name] += 1
    return Stats(per_action=per_action, **totals)
