"""The audit trail as evidence: hash chains, HMAC anchors, verification, export, stats.

Every audit event is chained (docs/design.md section 5): its hash covers the previous hash of its
chain, its place in the chain and every stored field. Events are chained per *shard* of
``(namespace, subject)`` (16 chains), so writers on different shards never wait for each
other, on one host or many. A chain alone proves nothing against someone who can rewrite
the whole database, so :func:`anchor` signs the heads of all chains with an HMAC key that
the database's writers do not hold (an environment variable or a file on the operator's
machine); :func:`verify` then finds an edited, deleted or reordered event, or a chain
rewritten after an anchor, and says which.

Anchors live in the database too, so someone who can write it can delete the newest ones
and rewrite what only they signed. Keep the last anchor's pin (:attr:`Anchor.pin`, its id
and MAC) outside the database and give it to :func:`verify` (``last_anchor=``): a deleted
or replaced anchor is then found, and only events written after that anchor stay
unbounded.

Typical use: ``safeagent audit anchor --pin-file PATH`` from a cron job with the key, and
``safeagent audit verify --pin-file PATH`` when evidence matters.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import hmac
import json
import os
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from safeagent._audit import EventKind, Redactor, default_redactor
from safeagent._cases import CaseRow, CaseState, ConsensusPolicy, Signal, apply_signal
from safeagent._receipt import TERMINAL, Record, Status
from safeagent.errors import ConfigurationError
from safeagent.stores._base import OUTCOME_DIGEST, outcome_digest
from safeagent.stores._rows import CHAIN_SHARDS, GENESIS, Heads, chain_hash, shard_of

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
    "parse_pin",
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
    ``"unchained_event"`` (an event row outside the hash chains: no shard, seq or hash, a
    shard outside 0-15, or a chain other than its subject's; it is shown by the trail's
    readers but never trusted by verification),
    ``"bad_anchor"`` (an anchor's HMAC does not match: forged, or another key),
    ``"missing_anchor"`` (an anchor was deleted: a gap in the anchors' ids, an anchor a
    later one was signed after is gone or replaced, or the anchor given as
    ``last_anchor`` is gone or differs),
    ``"no_anchor"`` (a key was given and the trail has events, but no anchor signs it),
    ``"head_mismatch"`` (the stored chain head is not the last event's hash: another
    hash, moved back to an earlier event, or missing),
    ``"receipt_edited"`` (an execution record no longer holds what the last event that
    changed it says: another status, a missing record (a released one only when no
    retention pass of a release that deleted released records covers it), an outcome
    that no longer matches the digest that event recorded, facts of the attempt in doubt
    other than its last reconcile take-over recorded (or, before one, an owner or end of
    an in-doubt record other than its claim and its in-doubt event), a tombstone no
    retention pass covers or that holds what retention clears, or a record no chained
    event names at all (with only legacy events, one changed after the chains began);
    ``seq`` and ``event_id`` name the event, when there is one), or
    ``"case_edited"`` (a finality-gate case or its signals no longer hold what the case's
    chained ``signal`` and ``state_change`` events say: another state, outcome,
    provisional outcome, version, resolver or timestamp than its events left; a case row
    or signal row no chained event records (forged); a case or signal deleted though its
    events remain; a signal's source, outcome, confidence, instant or status edited; or
    events that contradict each other because the case was edited between two changes: a
    transition from a state its events did not leave it in, a settlement of another
    outcome than the one it went FINAL with, a signal that replaced another live signal
    than its events recorded, or transitions other than its stored policy gives over the
    signals its events record; ``seq`` and ``event_id`` name the event, when there is
    one).
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
    before digests), and records whose only events were written before the chains (and
    that were last changed before the first chained event)."""
    events_legacy: int = 0
    """Event rows written before the audit trail was chained (a database created by a
    pre-chain schema and migrated): every chain column NULL, and an id below every
    chained event's. Kept and shown, but neither verified nor trusted."""
    cases_checked: int = 0
    """Finality-gate cases (a row, chained events, or both) compared with their events."""
    cases_unverified: int = 0
    """Cases with events from before the chains: nothing trusted to compare them with."""
    signals_checked: int = 0
    """Signal rows of the cases checked, compared with their ``signal`` events."""

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

    @property
    def pin(self) -> str:
        """``"<id>:<mac>"``: what to keep outside the database and give to
        :func:`verify` as ``last_anchor`` (``safeagent audit verify --last-anchor``)."""
        return f"{self.id}:{self.mac}"


_PIN = re.compile(r"([1-9][0-9]{0,18}):([0-9a-fA-F]{64})")


def parse_pin(text: str) -> tuple[int, str]:
    """``(id, mac)`` from an anchor's pin, ``"<id>:<mac>"`` (:attr:`Anchor.pin`; surrounding
    whitespace ignored).

    Raises:
        ConfigurationError: not a pin.
    """
    match = _PIN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ConfigurationError(
            "an anchor pin is '<id>:<mac>' (what `safeagent audit anchor` prints: a positive "
            "id, a colon and 64 hex digits)"
        )
    return int(match.group(1)), match.group(2).lower()


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


def _latest_anchor(store: Any) -> tuple[int, int, str, str] | None:
    try:
        found = store.anchors(last=1)
    except TypeError:  # a store whose anchors() takes no arguments
        found = store.anchors()[-1:]
    if not found:
        return None
    anchor_id, at_ms, heads_json, mac = found[-1]
    return anchor_id, at_ms, heads_json, mac


def anchor(store: Any, *, key: bytes) -> Anchor:
    """Sign the current head of every chain with ``key`` and store the anchor.

    The signed text also names the newest anchor already stored (its id and MAC), so
    :func:`verify` finds an anchor deleted from between two others even when the ids
    were renumbered. Keep the returned anchor's :attr:`~Anchor.pin` outside the database:
    nothing in the database can show that the newest anchors were deleted.

    Raises:
        ConfigurationError: a key shorter than 16 bytes.
        StoreError: the store failed.
    """
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(f"an audit key of at least {MIN_KEY_BYTES} bytes is needed")
    heads: Heads = store.chain_heads()
    latest = _latest_anchor(store)
    signed = {
        "signed_at_ms": time.time_ns() // 1_000_000,
        "heads": {str(shard): [seq, digest] for shard, (seq, digest) in sorted(heads.items())},
        "prev": None if latest is None else [latest[0], latest[3]],
    }
    heads_json = json.dumps(signed, separators=(",", ":"), sort_keys=True)
    mac = hmac.new(key, heads_json.encode(), hashlib.sha256).hexdigest()
    anchor_id, at_ms = store.add_anchor(heads_json, mac)
    return Anchor(anchor_id, at_ms, heads, mac)


def _pin_of(last_anchor: Any) -> tuple[int, str] | None:
    if last_anchor is None:
        return None
    if isinstance(last_anchor, Anchor):
        return last_anchor.id, last_anchor.mac
    if isinstance(last_anchor, str):
        return parse_pin(last_anchor)
    if (
        isinstance(last_anchor, tuple)
        and len(last_anchor) == 2
        and type(last_anchor[0]) is int
        and isinstance(last_anchor[1], str)
    ):
        return parse_pin(f"{last_anchor[0]}:{last_anchor[1]}")
    raise ConfigurationError(
        "last_anchor must be an Anchor, an (id, mac) pair or a '<id>:<mac>' pin, "
        f"got {type(last_anchor).__name__}"
    )


def verify(
    store: Any,
    *,
    key: bytes | None = None,
    last_anchor: Anchor | tuple[int, str] | str | None = None,
    allow_unanchored: bool = False,
) -> VerifyReport:
    """Check every chain, and every anchor (its HMAC with ``key``, and that the chain still
    passes through the head it signed).

    Without ``key`` the anchors' signatures are not checked (``anchors_unverified``), but
    chains are still compared with the heads the anchors recorded. With ``key``, a trail
    that has events but no anchor at all is a ``no_anchor`` problem (every anchor deleted
    looks the same), unless ``allow_unanchored``.

    ``last_anchor``: the newest anchor recorded outside the database (an :class:`Anchor`
    as :func:`anchor` returned it, its ``(id, mac)``, or its pin ``"<id>:<mac>"``). If
    it is gone, or another anchor has its id, that is a ``missing_anchor`` problem; with
    anchors naming the one before them, so is any older anchor deleted. Without it the
    newest anchors can be deleted unseen, and the events only they signed rewritten.

    Every event row outside the chains is reported (``unchained_event``) and never
    trusted, except rows written before the trail was chained (``events_legacy``),
    which never excuse a request or a case opened in the chains: those are judged on
    their chained events.

    Every execution record is also compared with the last chained event that changed
    its request: the status that event left, and for a finished record the outcome
    digest it recorded; a retention tombstone keeps its status and must be covered by a
    chained retention pass. So a stored result or error edited, a status changed (a
    charge turned back into a released claim, which would run again), a record deleted
    or forged without events, or a tombstone faked is found too (``receipts_checked``;
    finished records with no digest to compare count as ``receipts_unverified``).

    Every finality-gate case, and every signal of it, is compared with the case's chained
    events, replayed in order: state, outcome, provisional outcome, version, resolver and
    timestamps of the case; source, outcome, confidence, instant and status (live,
    replaced, late) of each signal; and each transition against the one before it, the
    settled outcome against the final one, and the transitions a signal caused against
    what the case's stored policy gives over the signals the events record. So a case
    edited to FINAL (which ``settle`` would then carry out), turned back from SETTLED, a
    signal edited, a case or signal deleted or forged is found (``case_edited``,
    ``cases_checked``, ``signals_checked``). A case's policy (threshold, quorum) is
    compared with the one its opening event records (an opening written by an earlier
    release holds none: then an edit is found only when it contradicts a recorded
    transition); a signal's metadata is not compared (its event holds it redacted).
    Someone who can write the database can still append a consistent event after the
    last anchor; anchor often (module docstring).

    Raises:
        ConfigurationError: ``last_anchor`` is not an anchor, a pair or a pin.
    """
    pin = _pin_of(last_anchor)
    # Anchors first: chains only grow, so every anchor read signs heads the chains read
    # next still hold (one made in between would sign events the chains' read lacks).
    anchors = store.anchors()
    rows, heads = store.audit_chain()
    problems: list[Problem] = []
    trail = _split(rows, problems)
    hash_at, tops = _check_chains(trail.by_shard, problems)
    _check_heads(heads, hash_at, tops, problems)
    checked, unverified = _check_anchors(anchors, key, hash_at, pin, problems)
    if key is not None and not anchors and trail.chained and not allow_unanchored:
        problems.append(
            Problem(
                "no_anchor",
                -1,
                None,
                None,
                f"no anchor signs this trail of {trail.chained} events: every anchor was "
                "deleted, or none was ever made (anchor it; allow_unanchored / "
                "--allow-unanchored accepts a trail never anchored)",
            )
        )
    receipts = _check_receipts(store, trail, problems)
    cases, cases_unverified, signals = _check_cases(store, trail, problems)
    return VerifyReport(
        trail.chained,
        checked,
        unverified,
        problems,
        *receipts,
        events_legacy=trail.legacy,
        cases_checked=cases,
        cases_unverified=cases_unverified,
        signals_checked=signals,
    )


# CHAIN_COLUMNS positions: id, shard, seq, prev_hash, hash, at_ms, kind, namespace, subject,
# action, actor, execution_id, fencing_token, detail
_ID, _SHARD, _SEQ, _PREV, _HASH, _AT = 0, 1, 2, 3, 4, 5
_KIND, _NAMESPACE, _SUBJECT, _ACTOR, _EXECUTION_ID, _DETAIL = 6, 7, 8, 10, 11, 13


@dataclass(slots=True)
class _Trail:
    """The event rows of one read, sorted out (:func:`_split`)."""

    by_shard: dict[int, list[tuple[Any, ...]]] = field(default_factory=dict)
    """Rows in chain form, per shard, in the store's (shard, seq, id) order."""
    trusted: list[tuple[Any, ...]] = field(default_factory=list)
    """Rows in chain form and in their own subject's chain: the only ones whose content
    verification relies on."""
    untrusted: set[Any] = field(default_factory=set)
    """Ids of every other row (unchained, legacy, in another subject's chain)."""
    legacy_keys: set[tuple[Any, Any]] = field(default_factory=set)
    """(namespace, subject) of legacy rows."""
    chained: int = 0
    legacy: int = 0
    chains_began: int | None = None
    """The earliest instant (at_ms) of a trusted chained event: every legacy row, and every
    record only legacy rows name, was written before it."""


def _in_chain_form(row: tuple[Any, ...]) -> bool:
    shard = row[_SHARD]
    return (
        type(shard) is int
        and 0 <= shard < CHAIN_SHARDS
        and type(row[_SEQ]) is int
        and isinstance(row[_PREV], str)
        and isinstance(row[_HASH], str)
    )


def _split(rows: list[tuple[Any, ...]], problems: list[Problem]) -> _Trail:
    """Sort the rows into chain members, legacy rows and rows outside the chains; report
    the last (``unchained_event``).

    Every writer since the chains exist appends each event to its subject's chain, in the
    transaction of the change it describes (the PostgreSQL fast path too: its one
    statement inserts the event with its shard, seq and hash, or nothing). Rows without
    them can only predate the chains: a database created by a pre-chain schema (SQLite
    before version 3, PostgreSQL before version 2) and migrated kept its old events,
    with every chain column NULL and ids below every chained event's, since ids only
    grow. Those are legacy rows; any other row outside the chains was put there by hand.
    """
    trail = _Trail()
    first_chained = min((row[_ID] for row in rows if _in_chain_form(row)), default=None)
    for row in rows:
        event_id = row[_ID]
        if _in_chain_form(row):
            shard = row[_SHARD]
            trail.chained += 1
            trail.by_shard.setdefault(shard, []).append(row)
            namespace, subject = row[_NAMESPACE], row[_SUBJECT]
            own = (
                shard_of(namespace, subject)
                if isinstance(namespace, str) and isinstance(subject, str)
                else None
            )
            if own == shard:
                trail.trusted.append(row)
                at = row[_AT]
                if type(at) is int and (trail.chains_began is None or at < trail.chains_began):
                    trail.chains_began = at
                continue
            trail.untrusted.add(event_id)
            problems.append(
                Problem(
                    "unchained_event",
                    shard,
                    row[_SEQ],
                    event_id,
                    f"event {event_id} ({row[_KIND]} of {namespace}/{subject}) is chained in "
                    f"chain {shard}, but its subject's events belong to chain {own}: "
                    "not trusted",
                )
            )
            continue
        trail.untrusted.add(event_id)
        if (
            all(row[i] is None for i in (_SHARD, _SEQ, _PREV, _HASH))
            and type(event_id) is int
            and event_id >= 1
            and (first_chained is None or event_id < first_chained)
        ):
            trail.legacy += 1
            trail.legacy_keys.add((row[_NAMESPACE], row[_SUBJECT]))
            continue
        shard, seq = row[_SHARD], row[_SEQ]
        problems.append(
            Problem(
                "unchained_event",
                shard if type(shard) is int else -1,
                seq if type(seq) is int else None,
                event_id,
                f"event {event_id} ({row[_KIND]} of {row[_NAMESPACE]}/{row[_SUBJECT]}) is "
                f"outside the hash chains (shard {shard}, seq {seq}, "
                f"hash {'missing' if row[_HASH] is None else 'present'}): not verified, "
                "not trusted",
            )
        )
    return trail


def _check_chains(
    by_shard: dict[int, list[tuple[Any, ...]]], problems: list[Problem]
) -> tuple[dict[tuple[int, int], str], dict[int, int]]:
    """Check each chain link by link; returns the hash at every (shard, seq) and each
    chain's highest seq."""
    hash_at: dict[tuple[int, int], str] = {}
    tops: dict[int, int] = {}
    for shard, chain in by_shard.items():
        expected_prev, expected_seq = GENESIS, 1
        last_id: int | None = None
        for row in chain:
            event_id, seq, prev, digest = row[_ID], row[_SEQ], row[_PREV], row[_HASH]
            fields = row[_AT:]
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
            tops[shard] = max(tops.get(shard, 0), seq)
            expected_prev, expected_seq = digest, seq + 1
    return hash_at, tops


def _check_heads(
    heads: Heads,
    hash_at: dict[tuple[int, int], str],
    tops: dict[int, int],
    problems: list[Problem],
) -> None:
    """Each of the 16 chains has a stored head, and it is the chain's last event: that
    event's seq and hash."""
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
        elif seq < tops.get(shard, 0):
            problems.append(
                Problem(
                    "head_mismatch",
                    shard,
                    seq,
                    None,
                    f"chain {shard}'s stored head is seq {seq}, but the chain goes on to seq "
                    f"{tops[shard]}: the head was moved back",
                )
            )
    for shard in range(CHAIN_SHARDS):  # every store keeps all 16 (a writer needs its head)
        if shard not in heads:
            top = tops.get(shard, 0)
            problems.append(
                Problem(
                    "head_mismatch",
                    shard,
                    top,
                    None,
                    f"chain {shard} has no stored head"
                    + (f", though it has events up to seq {top}" if top else ""),
                )
            )


_NO_LINK = object()


def _signed_text(heads_json: Any) -> dict[str, Any] | None:
    try:
        signed = json.loads(heads_json)
    except (TypeError, ValueError):
        return None
    return signed if isinstance(signed, dict) and isinstance(signed.get("heads"), dict) else None


def _check_anchors(
    anchors: list[tuple[int, int, str, str]],
    key: bytes | None,
    hash_at: dict[tuple[int, int], str],
    pin: tuple[int, str] | None,
    problems: list[Problem],
) -> tuple[int, int]:
    """Check every anchor: its HMAC (with ``key``), the heads it signed, that none before
    it is gone (ids, and the anchor it names as its predecessor), and the pinned one.
    Returns (checked, unverified)."""
    checked = unverified = 0
    macs: dict[Any, Any] = {}
    previous: tuple[Any, Any] | None = None
    for anchor_id, _at_ms, heads_json, mac in anchors:
        checked += 1
        signed = _signed_text(heads_json)
        authentic = True
        if key is None:
            unverified += 1
        elif not hmac.compare_digest(
            hmac.new(key, str(heads_json).encode(), hashlib.sha256).hexdigest().encode(),
            str(mac).encode(),
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
            authentic = False
        if authentic and signed is None:
            problems.append(
                Problem("bad_anchor", -1, None, None, f"anchor {anchor_id} is unreadable")
            )
            authentic = False
        link = signed.get("prev", _NO_LINK) if authentic and signed is not None else _NO_LINK
        _check_link(anchor_id, link, previous, macs, problems)
        macs[anchor_id] = mac
        previous = (anchor_id, mac)
        if not authentic or signed is None:
            continue
        for shard_text, (seq, digest) in signed["heads"].items():
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
    if pin is not None:
        pinned_id, pinned_mac = pin
        stored = macs.get(pinned_id)
        if stored is None:
            problems.append(
                Problem(
                    "missing_anchor",
                    -1,
                    None,
                    None,
                    f"anchor {pinned_id}, the last one recorded outside the database, is "
                    "missing: deleted, with the events only it signed open to a rewrite",
                )
            )
        elif not hmac.compare_digest(str(stored).encode(), pinned_mac.encode()):
            problems.append(
                Problem(
                    "missing_anchor",
                    -1,
                    None,
                    None,
                    f"anchor {pinned_id} is not the one recorded outside the database (its "
                    "MAC differs): that anchor was deleted and its id used again",
                )
            )
    return checked, unverified


def _check_link(
    anchor_id: Any,
    link: Any,
    previous: tuple[Any, Any] | None,
    macs: dict[Any, Any],
    problems: list[Problem],
) -> None:
    """An anchor's place among the others: ids rise by one from 1, except where the
    anchor signed that it came right after the one before it (the database skipped ids:
    a failed or lost write, a PostgreSQL crash); an anchor it names as its predecessor
    must still be there, with the same MAC."""
    expected_id = 1 if previous is None else previous[0] + 1
    if isinstance(link, list) and len(link) == 2:
        named, named_mac = link
        stored = macs.get(named)
        if stored is None or stored != named_mac:
            problems.append(
                Problem(
                    "missing_anchor",
                    -1,
                    None,
                    None,
                    f"anchor {anchor_id} was signed right after anchor {named}, which is "
                    + ("missing: deleted" if stored is None else "now another anchor: replaced"),
                )
            )
            return
        if previous is not None and [previous[0], previous[1]] == [named, named_mac]:
            return  # ids skipped between them were never anchors
    elif link is None and previous is None:
        return  # the first anchor ever: ids before it were never anchors
    if anchor_id != expected_id:
        problems.append(
            Problem(
                "missing_anchor",
                -1,
                None,
                None,
                f"anchor {anchor_id} follows "
                + ("no anchor" if previous is None else f"anchor {previous[0]}")
                + f": anchor ids from {expected_id} to {anchor_id - 1} are missing (deleted)",
            )
        )


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
# What retention purges (retention.purge): finished records, and released ones.
_PURGEABLE = _FINISHED | {Status.RELEASED.value}
# The subject of a retention pass's event (stores._base.purged_event).
_RETENTION = ("*", "*retention*")


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
    at_ms: Any = None
    """When the event was written (store clock): when the record last changed."""
    execution_id: Any = None
    """The attempt the event names."""
    owner: Any = None
    """Who made the request's last claim (its event's actor): the owner of the attempt
    that ran fn, or of the last take-over."""


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


def _expectation(
    kind: str,
    detail: Any,
    shard: int,
    seq: int | None,
    event_id: Any,
    at_ms: Any = None,
    execution_id: Any = None,
) -> Any:
    """The _Expected of one event, or None if the event does not change the status."""
    if kind not in _STATE_EVENTS:
        return None
    if not isinstance(detail, dict):
        return _Expected(None, None, shard, seq, event_id, None, at_ms, execution_id)
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
        None,
        at_ms,
        execution_id,
    )


def _last_states(rows: list[tuple[Any, ...]]) -> dict[tuple[str, str], _Expected]:
    """(namespace, request id) -> what its last state-changing event says. A request's
    events are all in one chain, read in seq order."""
    found: dict[tuple[str, str], _Expected] = {}
    facts: dict[tuple[str, str], Any] = {}
    owners: dict[tuple[str, str], Any] = {}
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
        if kind == EventKind.CLAIMED.value:
            owners[key] = row[_ACTOR]
        expected = _expectation(
            kind, detail, row[_SHARD], row[_SEQ], row[_ID], row[_AT], row[_EXECUTION_ID]
        )
        if expected is not None:
            found[key] = expected
    return {
        key: replace(expected, facts=facts.get(key), owner=owners.get(key))
        for key, expected in found.items()
    }


_CLOCK_STEP_MS = 1000


class _Purges:
    """The retention passes in the chains: answers whether one of them covers a tombstone,
    or a released record deleted by a release that deleted them."""

    def __init__(self, marks: list[tuple[int, int, bool]]) -> None:
        marks.sort()
        self._at = [at for at, _, _ in marks]
        # _reach[i]: the latest cutoff of any pass written at or after self._at[i]
        self._reach = [0] * len(marks)
        reach = -(2**63)
        for i in range(len(marks) - 1, -1, -1):
            reach = max(reach, marks[i][1])
            self._reach[i] = reach
        # The latest cutoff of a pass that deleted released records (only the releases
        # before retention kept them did: their passes count them as "deleted").
        self._deleting = max((cutoff for _, cutoff, deleted in marks if deleted), default=None)

    @staticmethod
    def mark(kind: Any, namespace: Any, subject: Any, at_ms: Any, detail: Any) -> Any:
        """(at_ms, cutoff_ms, deleted released records) of a retention pass's event, or
        None for any other event."""
        if kind != EventKind.PURGED.value or (namespace, subject) != _RETENTION:
            return None
        if isinstance(detail, str):
            try:
                detail = json.loads(detail)
            except ValueError:
                return None
        if not isinstance(detail, Mapping):
            return None
        cutoff = detail.get("cutoff_ms")
        if type(at_ms) is not int or type(cutoff) is not int:
            return None
        deleted = detail.get("deleted")
        return at_ms, cutoff, type(deleted) is int and deleted > 0

    def cover(self, purged_at_ms: Any, changed_at_ms: Any) -> bool:
        """Whether a pass written at or after ``purged_at_ms`` (retention stamps its
        tombstones before it writes its event, in the same transaction) had a cutoff
        after ``changed_at_ms`` (the record's last change): that pass purged it."""
        if type(purged_at_ms) is not int or type(changed_at_ms) is not int:
            return False
        # On PostgreSQL the tombstones and the event read the server's clock a moment
        # apart: a step back of that clock in between must not look like tampering.
        i = bisect.bisect_left(self._at, purged_at_ms - _CLOCK_STEP_MS)
        return i < len(self._at) and self._reach[i] > changed_at_ms

    def cover_deletion(self, changed_at_ms: Any) -> bool:
        """Whether a pass of a release that deleted released records (its event counts
        them as ``deleted``, none of this release's does) had a cutoff after
        ``changed_at_ms`` (the record's release): that pass may have deleted it."""
        return (
            type(changed_at_ms) is int
            and self._deleting is not None
            and self._deleting > changed_at_ms
        )


def _stored_digest(record: Record) -> str:
    error = record.error
    return outcome_digest(
        record.execution_id,
        record.status.value,
        record.result_json,
        None if error is None else error.type,
        None if error is None else error.message,
    )


def _judge(
    record: Record | None,
    expected: _Expected | None,
    legacy: bool,
    purges: _Purges,
    chains_began: Any = None,
) -> str | None:
    """ "ok", "unverified", or what is wrong, for one request (None: nothing to check).
    ``legacy``: the request has events from before the chains; ``chains_began``: the
    earliest instant of a chained event (None: no chained event)."""
    if expected is None:
        if record is None:
            return None
        if legacy:
            # Its events predate the chains: nothing trusted to compare, but a record
            # written before them was last changed before the first chained event.
            changed = _last_change(record)
            if type(chains_began) is int and changed is not None and changed >= chains_began:
                return (
                    f"its only events are from before the chains, but the record was changed "
                    f"at {changed}, after the chains began (at {chains_began}): a "
                    f"{record.status.value} record written behind the guard's back"
                )
            return "unverified"
        # Every writer appends a claim's event in the claim's own transaction (the
        # original package's API and the finality gate write through the guard).
        return (
            f"no chained event records its claim or any change to it, though every "
            f"writer appends one in the same transaction: a {record.status.value} record "
            "written behind the guard's back"
        )
    if expected.status is None:
        return None  # its last event's detail is unreadable: reported as edited
    if record is None:
        if expected.status == Status.RELEASED.value:
            if purges.cover_deletion(expected.at_ms):
                return None  # a pass of a release that deleted released records did it
            return (
                "the record is gone, though its last event left it RELEASED and no "
                "retention pass that deleted released records (written by a release before "
                "retention kept them) covers it: its fencing tokens would start again"
            )
        return f"the record is gone, though its last event left it {expected.status}"
    if record.status.value != expected.status:
        return (
            f"the record is {record.status.value}, though its last event left it {expected.status}"
            + (" (and it is marked purged)" if record.purged_at_ms is not None else "")
        )
    facts = _judge_facts(record, expected)
    if facts is not None:
        return facts
    if record.purged_at_ms is not None:
        return _judge_tombstone(record, expected, purges)
    if record.status.value not in _FINISHED:
        return "ok"
    if expected.digest is None:
        return "unverified"  # finished by a release that wrote no outcome digests
    if expected.digest != _stored_digest(record):
        return f"the stored {record.status.value} outcome differs from the one its event recorded"
    return "ok"


def _judge_tombstone(record: Record, expected: _Expected, purges: _Purges) -> str:
    """A record marked purged (its status already matches its last event): retention
    keeps identity, action, fingerprint, final status and execution id, clears payload,
    result and error message, and writes a chained ``purged`` event in the same
    transaction, whose cutoff is after the record's last change."""
    status = record.status.value
    if status not in _PURGEABLE:
        return f"it is marked purged, but retention never purges a {status} record"
    if (
        record.payload_json
        or record.result_json is not None
        or (record.error and record.error.message)
    ):
        return (
            "it is marked purged, but still holds a payload, result or error message, "
            "which retention clears"
        )
    if expected.execution_id is not None and record.execution_id != expected.execution_id:
        return "its execution id is not the one its last event names"
    if not purges.cover(record.purged_at_ms, expected.at_ms):
        return (
            f"it is marked purged (at {record.purged_at_ms}), but no retention pass in the "
            "chains covers it: none written since then had a cutoff after its last change "
            f"(at {expected.at_ms})"
        )
    return "ok"


def _last_change(record: Record) -> int | None:
    stamps = [
        t
        for t in (
            record.created_at_ms,
            record.claimed_at_ms,
            record.updated_at_ms,
            record.completed_at_ms,
            record.purged_at_ms,
        )
        if type(t) is int
    ]
    return max(stamps, default=None)


_WAITING = frozenset({Status.IN_DOUBT.value, Status.PENDING.value})


def _judge_facts(record: Record, expected: _Expected) -> str | None:
    """What is wrong with the facts of the attempt in doubt a reconcile hook is told
    (Record.attempt_facts: the owner and end that decide when it may answer "did not
    happen"), against the events; None if nothing is, or nothing can be told.

    After a take-over that recorded them for the current attempt, the record must hold
    them (ended_attempt, owner and end). Before any, a record stored IN_DOUBT is told its
    lease owner and its last change: the owner of its last claim, and the instant of the
    event that left it IN_DOUBT (the same write)."""
    recorded = record.ended_attempt is not None and record.ended_attempt == record.attempt
    taken = expected.facts is not None and expected.facts[2] == record.attempt
    if recorded and expected.facts is None:
        return "it holds facts of the attempt in doubt that no take-over event recorded"
    if taken and expected.facts is not None:
        if record.status.value not in _WAITING and not recorded:
            return None  # finished or released since: the facts no longer count
        owner, ended_at, _ = expected.facts
        if not recorded or (record.attempt_owner, record.attempt_ended_at_ms) != (
            owner,
            ended_at,
        ):
            told = record.attempt_facts()
            return (
                "the owner or end of the attempt in doubt differs from what its take-over "
                f"event recorded (a reconcile hook is told {told[0]!r} ended at {told[1]}, "
                f"the event recorded {owner!r} at {ended_at})"
            )
        return None
    if recorded:
        return None  # the event describes another attempt (a claim by an older release)
    if (
        record.status.value == Status.IN_DOUBT.value
        and expected.status == Status.IN_DOUBT.value
        and expected.facts is None
    ):
        wrong = []
        if expected.owner is not None and record.lease_owner != expected.owner:
            wrong.append(f"owner {record.lease_owner!r}, though its claim was {expected.owner!r}")
        if (
            type(expected.at_ms) is int
            and type(record.updated_at_ms) is int
            and abs(record.updated_at_ms - expected.at_ms) > _CLOCK_STEP_MS
        ):
            wrong.append(
                f"end {record.updated_at_ms}, though the event that left it IN_DOUBT is at "
                f"{expected.at_ms}"
            )
        if wrong:
            return "the attempt in doubt a reconcile hook would be told of has " + " and ".join(
                wrong
            )
    return None


def _check_receipts(store: Any, trail: _Trail, problems: list[Problem]) -> tuple[int, int]:
    """Compare every record with what the last trusted state-changing event of its
    request says: its stored status, and for a finished one the outcome digest (for a
    tombstone, the retention pass that covers it). Returns (checked, unverified). Records
    and events are read apart, so a request that looks wrong is read again, record and
    events together, before it is reported."""
    states = _last_states(trail.trusted)
    purges = _Purges(
        [
            mark
            for row in trail.trusted
            if (
                mark := _Purges.mark(
                    row[_KIND], row[_NAMESPACE], row[_SUBJECT], row[_AT], row[_DETAIL]
                )
            )
        ]
    )
    fresh: _Purges | None = None
    records, _ = store.records()
    by_key = {(r.namespace, r.request_id): r for r in records}
    checked = unverified = 0
    began = trail.chains_began
    for key in by_key.keys() | states.keys():
        legacy = key in trail.legacy_keys
        verdict = _judge(by_key.get(key), states.get(key), legacy, purges, began)
        if verdict is None:
            continue
        if verdict not in ("ok", "unverified"):
            record, expected = _read_again(store, key[0], key[1], trail.untrusted)
            # The retention passes are read after the record: a tombstone (or a deletion)
            # read again was written by a pass that committed before that read, so it is
            # in them. They are read again whenever the last read may predate it.
            if fresh is None or (
                _judge(record, expected, legacy, fresh, began) not in (None, "ok", "unverified")
                and (record is None or record.purged_at_ms is not None)
            ):
                fresh = _read_purges(store, trail.untrusted)
            verdict = _judge(record, expected, legacy, fresh, began)
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


def _read_purges(store: Any, untrusted: set[Any]) -> _Purges:
    events = store.events(namespace=_RETENTION[0], subject=_RETENTION[1])
    return _Purges(
        [
            mark
            for e in events
            if e.id not in untrusted
            and (mark := _Purges.mark(e.kind.value, e.namespace, e.subject, e.at_ms, e.detail))
        ]
    )


def _read_again(
    store: Any, namespace: str, request_id: str, untrusted: set[Any]
) -> tuple[Record | None, _Expected | None]:
    """The record and its request's last state-changing event, read until the record is
    the same before and after the events (a request finishing or re-run meanwhile).
    Events the first read found outside the chains (``untrusted``) are left out."""
    record, _ = store.get(namespace, request_id)
    expected: _Expected | None = None
    for _ in range(5):
        expected = None
        facts = owner = None
        shard = shard_of(namespace, request_id)
        for event in store.events(namespace=namespace, subject=request_id):
            if event.id in untrusted:
                continue
            facts = _facts_after(event.kind.value, event.detail, facts)
            if event.kind is EventKind.CLAIMED:
                owner = event.actor
            found = _expectation(
                event.kind.value,
                event.detail,
                shard,
                None,
                event.id,
                event.at_ms,
                event.execution_id,
            )
            if found is not None:
                expected = found
        if expected is not None:
            expected = replace(expected, facts=facts, owner=owner)
        after, _ = store.get(namespace, request_id)
        if after == record:
            break
        record = after
    return record, expected


# -- cases and signals (the finality gate) --------------------------------------------------

_CASE_KINDS = frozenset({EventKind.SIGNAL.value, EventKind.STATE_CHANGE.value})
_OPEN = CaseState.OPEN.value
_PROVISIONAL = CaseState.RESOLVED_PROVISIONAL.value
_RECONCILIATION = CaseState.IN_RECONCILIATION.value
_FINAL = CaseState.FINAL.value
_SETTLED = CaseState.SETTLED.value
_RESOLVABLE = frozenset({_PROVISIONAL, _RECONCILIATION})
_BEFORE_FINAL = _RESOLVABLE | {_OPEN}
_AUTOMATIC = _RESOLVABLE | {_FINAL}
_MAX_FINDINGS = 4

_CaseEvent = tuple[Any, Any, Any, Any, Any, Any]
"""A case event as verification reads it: (kind, actor, at_ms, detail (parsed; None if
unreadable), seq (None when read again by subject), event id)."""

_SignalRow = tuple[Any, Any, Any, Any, Any]
"""(source, outcome, confidence, at_ms, status) of a signal row, or what its event says."""


@dataclass(slots=True)
class _CaseHistory:
    """What the chained events of one case say its row and its signal rows hold, replayed
    in order (stores._base.case_events, state_change_event and settled_event write them):

    - a ``state_change`` from nothing to OPEN opens the case: version 1, created then;
    - a ``signal`` not late is one change of the row (version + 1, updated then), with
      the automatic transitions right after it in the same transaction (``state_change``
      events without ``by``, to RESOLVED_PROVISIONAL, IN_RECONCILIATION or FINAL); it
      makes its source's earlier live signal ``replaced``; a late one (after FINAL)
      changes nothing but its own row;
    - a ``state_change`` with ``by`` is an operator's resolution, one to SETTLED a
      settlement: each one change of the row.

    The case keeps a provisional outcome only while RESOLVED_PROVISIONAL, and an outcome
    only from FINAL on. ``broken`` is the first event that contradicts the history before
    it: the writer then read a case or signals other than its events left, so they were
    edited in between."""

    policy: ConsensusPolicy | None
    """The case's stored policy, to replay the consensus with (None: no row, or an
    invalid policy)."""
    state: str | None = None
    provisional: Any = None
    outcome: Any = None
    resolved_by: Any = None
    version: int = 0
    created_at: Any = None
    updated_at: Any = None
    signals: list[list[Any]] = field(default_factory=list)
    """[source, outcome, confidence, at_ms, status, seq, event id] per signal event."""
    live: dict[Any, int] = field(default_factory=dict)
    """source -> index in ``signals`` of its live signal."""
    broken: str | None = None
    broken_at: tuple[Any, Any] = (None, None)
    last_at: tuple[Any, Any] = (None, None)
    opened_with: tuple[Any, Any] | None = None
    """(threshold, quorum) its opening event recorded (None: an opening written before
    openings recorded the policy)."""
    unreadable: bool = False
    """An event holds what no gate writes (unreadable detail, fields of other types):
    ``broken`` says which, and the rest is not replayed."""
    _tx: list[Any] | None = None
    """The signal transaction being read: [where, transitions expected (None: not
    replayed), transitions seen]."""

    def feed(self, event: _CaseEvent) -> None:
        kind, actor, at_ms, detail, seq, event_id = event
        self.last_at = (seq, event_id)
        if kind == EventKind.SIGNAL.value:
            if isinstance(detail, dict) and _written_by_a_gate(detail):
                self._signal(actor, at_ms, detail)
                return
        elif isinstance(detail, dict):
            self._state_change(at_ms, detail)
            return
        self.unreadable = True
        self._contradiction(
            f"event {event_id} ({kind}) holds a detail no gate writes (unreadable, or "
            "fields of other types)"
        )

    def _state_change(self, at_ms: Any, detail: dict[str, Any]) -> None:
        frm, to, outcome = detail.get("from"), detail.get("to"), detail.get("outcome")
        if frm is None:
            self._close()
            if to != _OPEN or self.state is not None:
                self._contradiction(
                    f"it was opened ({to}) again, though its events left it {self.state}: "
                    "it was deleted before"
                )
            self.state, self.version, self.created_at, self.updated_at = to, 1, at_ms, at_ms
            self.provisional = self.outcome = self.resolved_by = None
            if "threshold" in detail and "quorum" in detail:  # written since policies are
                self.opened_with = (detail["threshold"], detail["quorum"])
            return
        if "by" not in detail and to in _AUTOMATIC and self._tx is not None:
            self._tx[2].append((to, outcome))
            if frm != self.state:
                self._contradiction(
                    f"a signal moved it from {frm}, though its events left it {self.state}: "
                    "it was edited before that signal"
                )
            self._move(to, outcome)
            return
        self._close()
        if "by" in detail:  # an operator's resolution (apply_resolution)
            if to != _FINAL or frm != self.state or frm not in _RESOLVABLE:
                self._contradiction(
                    f"an operator resolved it from {frm} to {to}, though its events left it "
                    f"{self.state}: it was edited before that resolution"
                )
            self.resolved_by = detail["by"]
        elif to == _SETTLED:
            if frm != _FINAL or self.state != _FINAL:
                self._contradiction(
                    f"it was settled from {frm}, though its events left it {self.state}: it "
                    "was edited before the settlement (which then ran)"
                )
            elif outcome != self.outcome:
                self._contradiction(
                    f"it was settled with outcome {outcome!r}, though it went FINAL with "
                    f"{self.outcome!r}: its outcome was edited before the settlement"
                )
        else:
            self._contradiction(f"a transition {frm} -> {to} that no signal caused")
        self._move(to, outcome)
        self.version += 1
        self.updated_at = at_ms

    def _signal(self, source: Any, at_ms: Any, detail: dict[str, Any]) -> None:
        self._close()
        outcome, confidence, late = detail["outcome"], detail["confidence"], detail["late"]
        where = self.last_at
        index = len(self.signals)
        self.signals.append(
            [source, outcome, confidence, at_ms, "late" if late else "live", *where]
        )
        if self.state is None:
            self._contradiction(f"a signal of {source!r} came before the case was opened")
            return
        after_final = self.state in (_FINAL, _SETTLED)
        if bool(late) != after_final:
            self._contradiction(
                f"the signal of {source!r} was taken as {'late' if late else 'live'}, "
                f"though its events left the case {self.state}: it was edited before that "
                "signal"
            )
        if late:
            return
        before = self.live.get(source)
        seen = None if before is None else tuple(self.signals[before][1:3])
        replaced = detail.get("replaced")
        recorded = (
            (replaced.get("outcome"), replaced.get("confidence"))
            if isinstance(replaced, dict)
            else replaced
        )
        if recorded != seen:
            self._contradiction(
                f"the signal of {source!r} replaced a live one holding {recorded}, though "
                f"its events left {seen}: the signals were edited"
            )
        self._tx = [where, self._consensus(source, outcome, confidence), []]
        if before is not None:
            self.signals[before][4] = "replaced"
        self.live[source] = index
        self.version += 1
        self.updated_at = at_ms

    def _consensus(self, source: Any, outcome: Any, confidence: Any) -> Any:
        """The transitions the case's policy gives for this signal, over the live signals
        the events record (apply_signal), or None when that cannot be replayed."""
        if self.policy is None or self.broken is not None or self.state not in _BEFORE_FINAL:
            return None
        try:
            live = [
                Signal(self.signals[i][0], self.signals[i][1], float(self.signals[i][2]))
                for i in self.live.values()
            ]
            case = CaseRow(
                "", "", CaseState(self.state), self.provisional, None,
                self.policy.threshold, self.policy.quorum, self.version, 0, 0,
            )  # fmt: skip
            change = apply_signal(case, live, Signal(source, outcome, float(confidence)))
        except (TypeError, ValueError):
            return None  # a state or confidence no gate writes: nothing to replay
        return [
            (to.value, change.outcome if to is CaseState.FINAL else change.provisional_outcome)
            for to in change.path
        ]

    def _close(self) -> None:
        """The end of a signal's transaction: its transitions must be the policy's."""
        tx, self._tx = self._tx, None
        if tx is None or tx[1] is None or tx[1] == tx[2]:
            return
        saved, self.last_at = self.last_at, tx[0]
        self._contradiction(
            f"a signal led to {_path(tx[2])}, but its stored policy (threshold "
            f"{self.policy.threshold if self.policy else None}, quorum "
            f"{self.policy.quorum if self.policy else None}) over the signals its events "
            f"record gives {_path(tx[1])}: the policy or the live signals were edited"
        )
        self.last_at = saved

    def _move(self, to: Any, outcome: Any) -> None:
        """Where the events say the case went (after a contradiction too, so the row is
        compared with its last events)."""
        self.state = to
        self.provisional = outcome if to == _PROVISIONAL else None
        self.outcome = outcome if to in (_FINAL, _SETTLED) else None

    def _contradiction(self, what: str) -> None:
        if self.broken is None:
            self.broken, self.broken_at = what, self.last_at

    def finish(self) -> None:
        self._close()


def _written_by_a_gate(detail: dict[str, Any]) -> bool:
    """A signal event's fields of the types the gate writes (stores._base.case_events)."""
    confidence, replaced = detail.get("confidence"), detail.get("replaced")
    return (
        isinstance(detail.get("outcome"), str)
        and isinstance(confidence, (int, float))
        and not isinstance(confidence, bool)
        and isinstance(detail.get("late"), bool)
        and (replaced is None or isinstance(replaced, dict))
    )


def _path(transitions: list[tuple[Any, Any]]) -> str:
    if not transitions:
        return "no transition"
    return ", ".join(f"{to}" + (f" {outcome!r}" if outcome else "") for to, outcome in transitions)


def _history(events: list[_CaseEvent], row: CaseRow | None) -> _CaseHistory:
    """The replayed history of one case's events, up to one no gate writes."""
    policy = None
    if row is not None:
        try:
            policy = row.policy
        except ConfigurationError:
            policy = None
    history = _CaseHistory(policy)
    for event in events:
        history.feed(event)
        if history.unreadable:
            return history
    history.finish()
    return history


def _judge_case(
    row: CaseRow | None,
    signals: list[tuple[Signal, str]],
    events: list[_CaseEvent],
    legacy: bool,
) -> tuple[str, list[str], tuple[Any, Any]] | None:
    """("ok" | "unverified" | "wrong", findings, (seq, event id) to name) for one case,
    or None when there is nothing to check."""
    if legacy:
        return "unverified", [], (None, None)
    if row is None and not events and not signals:
        return None
    history = _history(events, row)
    findings: list[str] = []
    where = history.last_at
    if history.broken is not None:
        findings.append(history.broken)
        where = history.broken_at
    if history.unreadable:
        return "wrong", findings, where
    if row is not None:
        try:
            row.policy  # noqa: B018 - raises for a policy no gate accepts
        except ConfigurationError:
            findings.append(
                f"its policy (threshold {row.threshold!r}, quorum {row.quorum!r}) is not one "
                "any gate opens a case with"
            )
        opened = history.opened_with
        if opened is not None and (row.threshold, row.quorum) != opened:
            findings.append(
                f"its policy is threshold {row.threshold!r}, quorum {row.quorum!r}, though it "
                f"was opened with threshold {opened[0]!r}, quorum {opened[1]!r}"
            )
    if history.state is None:
        if row is not None:
            findings.append(
                f"no chained event records its opening or any change to it, though every "
                f"gate write appends them in the same transaction: a {row.state.value} case "
                "written behind the gate's back"
            )
    elif row is None:
        findings.append(f"the case is gone, though its events left it {history.state}")
    else:
        findings += _case_differences(row, history)
    findings += _signal_differences(signals, history)
    return ("wrong" if findings else "ok"), findings, where


def _case_differences(row: CaseRow, history: _CaseHistory) -> list[str]:
    expected = {
        "state": history.state,
        "outcome": history.outcome if history.state in (_FINAL, _SETTLED) else None,
        "provisional outcome": history.provisional if history.state == _PROVISIONAL else None,
        "resolver": history.resolved_by,
        "version": history.version,
        "created_at_ms": history.created_at,
        "updated_at_ms": history.updated_at,
    }
    stored = {
        "state": row.state.value,
        "outcome": row.outcome,
        "provisional outcome": row.provisional_outcome,
        "resolver": row.resolved_by,
        "version": row.version,
        "created_at_ms": row.created_at_ms,
        "updated_at_ms": row.updated_at_ms,
    }
    return [
        f"its {name} is {stored[name]!r}, though its events left {expected[name]!r}"
        for name in expected
        if stored[name] != expected[name]
    ]


def _signal_differences(signals: list[tuple[Signal, str]], history: _CaseHistory) -> list[str]:
    """The signal rows (in id order) against the signal events (in chain order): equal, or
    what is forged, gone or edited."""
    stored: list[_SignalRow] = [
        (s.source, s.outcome, s.confidence, s.at_ms, status) for s, status in signals
    ]
    expected: list[_SignalRow] = [(e[0], e[1], e[2], e[3], e[4]) for e in history.signals]
    if stored == expected:
        return []
    extra = Counter(stored) - Counter(expected)
    missing = Counter(expected) - Counter(stored)
    if not extra and not missing:
        return ["its signal rows are in another order than their events"]
    found: list[str] = []
    by_place: dict[tuple[Any, Any], list[_SignalRow]] = {}
    for signal in missing.elements():
        by_place.setdefault((signal[0], signal[3]), []).append(signal)
    for signal in extra.elements():
        same = by_place.get((signal[0], signal[3]))
        if same:
            was = same.pop()
            found.append(
                f"the signal of {signal[0]!r} at {signal[3]} holds {_shown(signal)}, though "
                f"its event recorded {_shown(was)}"
            )
        else:
            found.append(
                f"a signal row of {signal[0]!r} ({_shown(signal)}, at {signal[3]}) that no "
                "chained event records: forged"
            )
    for rest in by_place.values():
        found += [
            f"the signal of {s[0]!r} at {s[3]} ({_shown(s)}) is gone, though its event remains"
            for s in rest
        ]
    return found


def _shown(signal: _SignalRow) -> str:
    return f"{signal[1]!r} at confidence {signal[2]!r}, {signal[4]}"


def _case_events(rows: list[tuple[Any, ...]]) -> dict[tuple[Any, Any], list[_CaseEvent]]:
    """(namespace, case id) -> its trusted case events, in chain order."""
    found: dict[tuple[Any, Any], list[_CaseEvent]] = {}
    for row in rows:
        if row[_KIND] not in _CASE_KINDS:
            continue
        try:
            detail = json.loads(row[_DETAIL])
        except (ValueError, TypeError):
            detail = None
        found.setdefault((row[_NAMESPACE], row[_SUBJECT]), []).append(
            (row[_KIND], row[_ACTOR], row[_AT], detail, row[_SEQ], row[_ID])
        )
    return found


def _check_cases(store: Any, trail: _Trail, problems: list[Problem]) -> tuple[int, int, int]:
    """Compare every case row and its signal rows with what the case's trusted events
    say (:class:`_CaseHistory`). Returns (cases checked, cases unverified, signals
    checked). Rows and events are read apart, so a case that looks wrong is read again,
    rows and events together, before it is reported."""
    if not hasattr(store, "cases"):
        return 0, 0, 0
    by_case = _case_events(trail.trusted)
    try:
        rows = {(r.namespace, r.case_id): r for r in store.cases()}
    except ValueError as exc:  # a state no release writes (CaseState refuses it)
        problems.append(Problem("case_edited", -1, None, None, f"a case row cannot be read: {exc}"))
        return 0, 0, 0
    checked = unverified = signals_checked = 0
    for key in rows.keys() | by_case.keys():
        namespace, case_id = key
        # A case opened in the chains is judged on its chained events, whatever rows
        # outside them claim to be its history from before the chains.
        legacy = key in trail.legacy_keys and not _opened_in_chains(by_case.get(key, []))
        try:
            signals = [] if legacy else store.case_signals(namespace, case_id)
            verdict = _judge_case(rows.get(key), signals, by_case.get(key, []), legacy)
            if verdict is not None and verdict[0] == "wrong":
                seqs = {e[5]: e[4] for e in by_case.get(key, [])}
                row, signals, events = _read_case_again(
                    store, namespace, case_id, trail.untrusted, seqs
                )
                verdict = _judge_case(row, signals, events, legacy)
        except ValueError as exc:  # metadata that is not JSON, a state no release writes
            verdict = "wrong", [f"its rows cannot be read: {exc}"], (None, None)
        if verdict is None:
            continue
        status, findings, (seq, event_id) = verdict
        if status == "unverified":
            unverified += 1
            continue
        checked += 1
        signals_checked += len(signals)
        if findings:
            shown = findings[:_MAX_FINDINGS]
            if len(findings) > _MAX_FINDINGS:
                shown.append(f"and {len(findings) - _MAX_FINDINGS} more")
            problems.append(
                Problem(
                    "case_edited",
                    shard_of(namespace, case_id),
                    seq,
                    event_id,
                    f"case {case_id!r} ({namespace}): " + "; ".join(shown),
                )
            )
    return checked, unverified, signals_checked


def _opened_in_chains(events: list[_CaseEvent]) -> bool:
    """Whether a chained event opened the case (a ``state_change`` from nothing)."""
    return any(
        e[0] == EventKind.STATE_CHANGE.value
        and isinstance(e[3], dict)
        and "from" in e[3]
        and e[3]["from"] is None
        for e in events
    )


def _read_case_again(
    store: Any, namespace: str, case_id: str, untrusted: set[Any], seqs: dict[Any, Any]
) -> tuple[CaseRow | None, list[tuple[Signal, str]], list[_CaseEvent]]:
    """The case, its signals and its events, read until the case and its signals are the
    same before and after the events: every write to a case raises its version or adds a
    signal row, so nothing changed it in between (a signal or settlement meanwhile).
    Events the first read found outside the chains (``untrusted``) are left out; ``seqs``
    gives the seq of those it found in the chains."""
    row = store.get_case(namespace, case_id)[0]
    signals = store.case_signals(namespace, case_id)
    events: list[_CaseEvent] = []
    for _ in range(5):
        events = [
            (e.kind.value, e.actor, e.at_ms, e.detail, seqs.get(e.id), e.id)
            for e in store.events(namespace=namespace, subject=case_id)
            if e.id not in untrusted and e.kind.value in _CASE_KINDS
        ]
        after = store.get_case(namespace, case_id)[0]
        after_signals = store.case_signals(namespace, case_id)
        if (after, after_signals) == (row, signals):
            break
        row, signals = after, after_signals
    return row, signals, events


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
