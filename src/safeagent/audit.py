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

import csv
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
    ``"reordered"`` (an event no longer follows the one it was chained to, or events of
    one chain were renumbered so the trail shows them in another order),
    ``"rewritten"`` (a chain is consistent but differs from what an anchor signed),
    ``"bad_anchor"`` (an anchor's HMAC does not match: forged, or another key),
    ``"head_mismatch"`` (the stored chain head is not the last event's hash), or
    ``"receipt_edited"`` (an execution record no longer holds what the last event that
    changed it says: another status, a missing record, an outcome that no longer matches
    the digest that event recorded, or facts of the attempt in doubt other than its last
    reconcile take-over recorded; ``seq`` and ``event_id`` name the event).
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
    """Requests whose record was compared with the last event that changed it."""
    receipts_unverified: int = 0
    """Finished records with no outcome digest to compare with (written by a release
    before digests, or before the audit trail)."""

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
    """The anchoring key: the bytes of the file at ``path``, else of the environment
    variable ``env`` (as the process received them, which need not be UTF-8), with
    surrounding ASCII whitespace stripped from both, so ``SAFEAGENT_AUDIT_KEY=$(cat
    keyfile)`` (which drops trailing newlines and keeps a ``\r``) and ``--key-file
    keyfile`` are the same key. A shell cannot carry a NUL byte: keep a key of random
    bytes in a file, or hex-encode it.

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
        # os.fsencode gives back the bytes a non-UTF-8 value was decoded from (lone
        # surrogates, surrogateescape); str.encode would refuse them.
        key = os.fsencode(os.environ.get(env, "")).strip()
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

    Every execution record is also compared with the last event that changed its request:
    the status that event left, and for a finished record the outcome digest it recorded.
    So a stored result or error edited, a status changed (a charge turned back into a
    released claim, which would run again) or a record deleted is found too
    (``receipts_checked``; finished records with no digest to compare count as
    ``receipts_unverified``). Someone who can write the database can still append a
    consistent event after the last anchor; anchor often (module docstring).
    """
    rows, heads = store.audit_chain()
    problems: list[Problem] = []
    by_shard: dict[int, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_shard.setdefault(int(row[1]), []).append(row)
    hash_at: dict[tuple[int, int], str] = {}
    for shard, chain in by_shard.items():
        expected_prev, expected_seq = GENESIS, 1
        last_id: int | None = None
        for row in chain:
            event_id, seq, prev, digest = row[0], int(row[2]), row[3], row[4]
            fields = row[5:]
            if last_id is not None and event_id <= last_id:
                # Ids give the trail's display order and are not hashed: within a chain
                # they must rise with seq, or events were renumbered to show another order.
                problems.append(
                    Problem(
                        "reordered",
                        shard,
                        seq,
                        event_id,
                        f"event {event_id} (seq {seq}) has a lower id than event {last_id} "
                        "chained before it: the trail's order was changed",
                    )
                )
            last_id = event_id
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


# CHAIN_COLUMNS positions: id, shard, seq, ..., kind, namespace, subject, ..., detail
_ID, _SHARD, _SEQ, _KIND, _NAMESPACE, _SUBJECT, _DETAIL = 0, 1, 2, 6, 7, 8, 13
# The events that change a record's stored status, and the status each leaves; the others
# (replays, conflicts, late or rejected completions, in-doubt observations, case events)
# leave it as it was. None: the status is the event's detail["status"].
_STATE_EVENTS: dict[str, str | None] = {
    EventKind.CLAIMED.value: Status.PENDING.value,
    EventKind.SUCCEEDED.value: None,
    EventKind.FAILED.value: None,
    EventKind.RELEASED.value: None,
    EventKind.IN_DOUBT.value: None,
    EventKind.RECONCILED.value: None,
    EventKind.RESOLVED.value: None,
}
_FINISHED = frozenset(status.value for status in TERMINAL)


@dataclass(frozen=True, slots=True)
class _Expected:
    """What the last state-changing event of a request says its record holds."""

    status: str | None  # None: unreadable detail (reported by the chain check, if edited)
    digest: str | None
    shard: int
    seq: int | None
    event_id: int | None
    facts: tuple[Any, Any, Any] | None = None
    """(attempt_owner, attempt_ended_at_ms, attempt) the last reconcile take-over of the
    current attempt recorded, if one did (Record.attempt_facts)."""


def _facts_after(kind: str, detail: Any, facts: tuple[Any, Any, Any] | None) -> Any:
    """The take-over facts in force after one event: a reconcile take-over that recorded
    them sets them; another claim (a new attempt) clears them; other events keep them."""
    if kind != EventKind.CLAIMED.value:
        return facts
    if isinstance(detail, dict) and detail.get("reconcile"):
        if "attempt_owner" in detail:
            return (
                detail["attempt_owner"],
                detail.get("attempt_ended_at_ms"),
                detail.get("attempt"),
            )
        return facts  # a take-over by a release that recorded none
    return None


def _expectation(kind: str, detail: Any, shard: int, seq: int | None, event_id: Any) -> Any:
    """The _Expected of one event, or None if the event does not change the status."""
    if kind not in _STATE_EVENTS:
        return None
    if not isinstance(detail, dict):
        return _Expected(None, None, shard, seq, event_id)
    if kind == EventKind.IN_DOUBT.value and detail.get("observed"):
        return None  # a caller saw an expired lease: nothing changed
    status = _STATE_EVENTS[kind] or detail.get("status")
    digest = detail.get(OUTCOME_DIGEST)
    return _Expected(
        status if isinstance(status, str) else None,
        digest if isinstance(digest, str) else None,
        shard,
        seq,
        event_id,
    )


def _last_states(rows: list[tuple[Any, ...]]) -> dict[tuple[str, str], _Expected]:
    """(namespace, request id) -> what its last state-changing event says. A request's
    events are all in one chain, read in seq order."""
    found: dict[tuple[str, str], _Expected] = {}
    facts: dict[tuple[str, str], Any] = {}
    for row in rows:
        kind = row[_KIND]
        if kind not in _STATE_EVENTS:
            continue
        try:
            detail = json.loads(row[_DETAIL])
        except (ValueError, TypeError):
            detail = None
        key = (row[_NAMESPACE], row[_SUBJECT])
        facts[key] = _facts_after(kind, detail, facts.get(key))
        expected = _expectation(kind, detail, int(row[_SHARD]), int(row[_SEQ]), row[_ID])
        if expected is not None:
            found[key] = expected
    return {
        key: expected if facts.get(key) is None else replace(expected, facts=facts[key])
        for key, expected in found.items()
    }


def _stored_digest(record: Record) -> str:
    error = record.error
    return outcome_digest(
        record.execution_id,
        record.status.value,
        record.result_json,
        None if error is None else error.type,
        None if error is None else error.message,
    )


def _judge(record: Record | None, expected: _Expected | None) -> str | None:
    """ "ok", "unverified", or what is wrong, for one request (None: nothing to check)."""
    if record is not None and record.purged_at_ms is not None:
        return None  # a tombstone: retention removed what the digest covered
    if expected is None or expected.status is None:
        if record is not None and record.status.value in _FINISHED:
            return "unverified"  # no event says what it holds (written before the trail)
        return None
    if record is None:
        if expected.status == Status.RELEASED.value:
            return None  # earlier versions purged released records by deleting them
        return f"the record is gone, though its last event left it {expected.status}"
    if record.status.value != expected.status:
        return (
            f"the record is {record.status.value}, though its last event left it {expected.status}"
        )
    facts = _judge_facts(record, expected)
    if facts is not None:
        return facts
    if record.status.value not in _FINISHED:
        return "ok"
    if expected.digest is None:
        return "unverified"  # finished by a release that wrote no outcome digests
    if expected.digest != _stored_digest(record):
        return f"the stored {record.status.value} outcome differs from the one its event recorded"
    return "ok"


def _judge_facts(record: Record, expected: _Expected) -> str | None:
    """What is wrong with the record's facts of the attempt in doubt (the owner and end a
    reconcile hook is told, which decide when it may answer "did not happen"), against
    the take-over event that recorded them; None if nothing is, or nothing can be told."""
    if record.ended_attempt is None or record.ended_attempt != record.attempt:
        return None  # none recorded for this attempt
    if expected.facts is None:
        return "it holds facts of the attempt in doubt that no take-over event recorded"
    owner, ended_at, attempt = expected.facts
    if attempt != record.attempt:
        return None  # the event describes another attempt (a claim by an older release)
    if (record.attempt_owner, record.attempt_ended_at_ms) != (owner, ended_at):
        return (
            "the owner or end of the attempt in doubt differs from what its take-over "
            "event recorded"
        )
    return None


def _check_receipts(
    store: Any, rows: list[tuple[Any, ...]], problems: list[Problem]
) -> tuple[int, int]:
    """Compare every record with what the last state-changing event of its request says:
    its stored status, and for a finished one the outcome digest. Returns (checked,
    unverified). Records and events are read apart, so a request that looks wrong is
    read again, record and events together, before it is reported."""
    states = _last_states(rows)
    records, _ = store.records()
    by_key = {(r.namespace, r.request_id): r for r in records}
    checked = unverified = 0
    for key in by_key.keys() | states.keys():
        verdict = _judge(by_key.get(key), states.get(key))
        if verdict is None:
            continue
        if verdict not in ("ok", "unverified"):
            record, expected = _read_again(store, *key)
            verdict = _judge(record, expected)
            if verdict is None:
                continue
        if verdict == "unverified":
            unverified += 1
            continue
        checked += 1
        if verdict != "ok":
            where = states.get(key) or _Expected(None, None, shard_of(*key), None, None)
            problems.append(
                Problem(
                    "receipt_edited",
                    where.shard,
                    where.seq,
                    where.event_id,
                    f"request {key[1]!r} ({key[0]}): {verdict}",
                )
            )
    return checked, unverified


def _read_again(
    store: Any, namespace: str, request_id: str
) -> tuple[Record | None, _Expected | None]:
    """The record and its request's last state-changing event, read until the record is
    the same before and after the events (a request finishing or re-run meanwhile)."""
    record, _ = store.get(namespace, request_id)
    expected: _Expected | None = None
    for _ in range(5):
        expected = None
        facts = None
        shard = shard_of(namespace, request_id)
        for event in store.events(namespace=namespace, subject=request_id):
            facts = _facts_after(event.kind.value, event.detail, facts)
            found = _expectation(event.kind.value, event.detail, shard, None, event.id)
            if found is not None:
                expected = found
        if expected is not None and facts is not None:
            expected = replace(expected, facts=facts)
        after, _ = store.get(namespace, request_id)
        if after == record:
            break
        record = after
    return record, expected


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
