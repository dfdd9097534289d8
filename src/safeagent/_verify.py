"""What :func:`safeagent.audit.verify` checks first: the events' hash chains, the stored
chain heads and the HMAC anchors (docs/design.md section 5), and what every check shares:
:class:`Problem`, the positions of an event row, and the trail split into the rows to
trust and the rest. The records are checked in ``_verify_receipts``, the finality gate's
cases and signals in ``_verify_cases``."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from safeagent._audit import EventKind
from safeagent._receipt import Status
from safeagent.stores._rows import CHAIN_SHARDS, GENESIS, Heads, chain_hash, shard_of


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of :func:`verify`.

    ``kind`` is one of ``"edited"`` (an event's fields no longer match its hash),
    ``"deleted"`` (a gap in a chain, or events missing after an anchored head),
    ``"reordered"`` (an event no longer follows the one it was chained to, or events of
    one chain were renumbered so the trail shows them in another order),
    ``"rewritten"`` (a chain is consistent but differs from what an anchor signed),
    ``"unchained_event"`` (an event row outside the hash chains: no shard, seq or hash, a
    shard outside the store's chains, or a chain other than its subject's; it is shown by
    the trail's readers but never trusted by verification),
    ``"bad_anchor"`` (an anchor's HMAC does not match: forged, or another key; or, with
    or without the key, its heads or the predecessor it names are in a form no anchor is
    written in),
    ``"missing_anchor"`` (an anchor was deleted: a gap in the anchors' ids, an anchor a
    later one was signed after is gone or replaced, or the anchor given as
    ``last_anchor`` is gone or differs),
    ``"no_anchor"`` (a key was given and the trail has events, but no anchor signs it),
    ``"head_mismatch"`` (the stored chain head is not the last event's hash: another
    hash, moved back to an earlier event, or missing),
    ``"receipt_edited"`` (an execution record no longer holds what the last event that
    changed it says: another status (or one no release writes), an attempt number other
    than its last claim or take-over recorded, an action, fingerprint or claim instant
    other than its claim recorded, a downstream key other than (namespace, action, request
    id) give, a missing record (a released one only when no
    retention pass of a release that deleted released records covers it), an outcome
    that no longer matches the digest that event recorded, facts of the attempt in doubt
    other than its last reconcile take-over recorded (or, before one, an owner or end of
    an in-doubt record other than its claim and its in-doubt event), a tombstone no
    retention pass covers or that holds what retention clears, or a record no chained
    event names at all (with only legacy events, one changed after the chains began);
    ``seq`` and ``event_id`` name the event, when there is one),
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
    one), or
    ``"busy"`` (not tampering: a request or case changed under each of the bounded reads
    again of a store without a snapshot read, so it was not judged; SQLite and PostgreSQL
    read it again in one snapshot and never report it; verify again).
    """

    kind: str
    shard: int
    seq: int | None
    event_id: int | None
    detail: str


# CHAIN_COLUMNS positions: id, shard, seq, prev_hash, hash, at_ms, kind, namespace, subject,
# action, actor, execution_id, fencing_token, detail
_ID, _SHARD, _SEQ, _PREV, _HASH, _AT = 0, 1, 2, 3, 4, 5
_KIND, _NAMESPACE, _SUBJECT, _ACTION, _ACTOR, _EXECUTION_ID, _DETAIL = 6, 7, 8, 9, 10, 11, 13


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
    chains: int = CHAIN_SHARDS
    """How many chains the store has (its ``chain_shards``)."""
    chained: int = 0
    legacy: int = 0
    chains_began: int | None = None
    """The earliest instant (at_ms) of a trusted chained event: every legacy row, and every
    record only legacy rows name, was written before it."""


def shard_named(namespace: Any, subject: Any, chains: int) -> int:
    """The chain a report names for ``(namespace, subject)`` as read: its :func:`shard_of`,
    or -1 when an edit left either not text (SQLite keeps any type)."""
    if isinstance(namespace, str) and isinstance(subject, str):
        return shard_of(namespace, subject, chains)
    return -1


def _in_chain_form(row: tuple[Any, ...], chains: int) -> bool:
    shard = row[_SHARD]
    return (
        type(shard) is int
        and 0 <= shard < chains
        and type(row[_SEQ]) is int
        and isinstance(row[_PREV], str)
        and isinstance(row[_HASH], str)
    )


def _split(rows: list[tuple[Any, ...]], problems: list[Problem], chains: int) -> _Trail:
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
    trail = _Trail(chains=chains)
    first_chained = min((row[_ID] for row in rows if _in_chain_form(row, chains)), default=None)
    for row in rows:
        event_id = row[_ID]
        if _in_chain_form(row, chains):
            shard = row[_SHARD]
            trail.chained += 1
            trail.by_shard.setdefault(shard, []).append(row)
            namespace, subject = row[_NAMESPACE], row[_SUBJECT]
            own = (
                shard_of(namespace, subject, chains)
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
            if _rehash(prev, shard, seq, fields) != digest:
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


def _rehash(prev: Any, shard: int, seq: int, fields: tuple[Any, ...]) -> str | None:
    """The chain hash of a stored row, or None where a field holds what no writer stores
    (a BLOB, a number of another type: an edit by hand), which then matches no hash."""
    try:
        return chain_hash(prev, shard, seq, fields)
    except (TypeError, ValueError, RecursionError):
        return None


def _check_heads(
    heads: Heads,
    hash_at: dict[tuple[int, int], str],
    tops: dict[int, int],
    problems: list[Problem],
    chains: int,
) -> None:
    """Each of the store's ``chains`` chains has a stored head, and it is the chain's last
    event: that event's seq and hash. There is no other head."""
    for shard, (seq, digest) in heads.items():
        if type(shard) is not int or type(seq) is not int or not isinstance(digest, str):
            problems.append(  # no writer stores one (SQLite would keep any type)
                Problem(
                    "head_mismatch",
                    shard if type(shard) is int else -1,
                    None,
                    None,
                    f"chain {shard!r}'s stored head is not a (seq, hash) pair: "
                    f"({seq!r}, {digest!r})"[:300],
                )
            )
            continue
        if not 0 <= shard < chains:
            problems.append(
                Problem(
                    "head_mismatch",
                    shard,
                    seq,
                    None,
                    f"a head is stored for chain {shard}, but the store has chains 0 to "
                    f"{chains - 1} only (its number of chains was edited, or the head added)",
                )
            )
            continue
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
    for shard in range(chains):  # every store keeps all its heads (a writer needs its head)
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
    except (TypeError, ValueError, RecursionError):
        return None
    return signed if isinstance(signed, dict) and isinstance(signed.get("heads"), dict) else None


def _signed_heads(
    heads: dict[Any, Any], chains: int
) -> list[tuple[int, int, str]] | tuple[str, bool]:
    """The (shard, seq, hash) an anchor signed, each as :func:`safeagent.audit.anchor`
    writes it (``{"<shard, 0 to chains - 1>": [seq >= 0, "<hash>"]}``), or what is wrong
    with the first one that is not, and whether that is only its shard being beyond the
    store's chains: a hand-made anchor (only checked for its MAC with the key)."""
    found: list[tuple[int, int, str]] = []
    for shard_text, value in heads.items():
        shard = (
            int(shard_text)
            if isinstance(shard_text, str)
            and shard_text.isascii()
            and shard_text.isdigit()
            and len(shard_text) <= 9  # int() refuses over 4,300 digits
            else None
        )
        if (
            shard is None
            or not isinstance(value, list)
            or len(value) != 2
            or type(value[0]) is not int
            or value[0] < 0
            or not isinstance(value[1], str)
        ):
            return f"chain {shard_text!r}: {value!r}"[:200], False
        if not 0 <= shard < chains:
            return f"chain {shard}"[:200], True
        found.append((shard, value[0], value[1]))
    return found


def _check_anchors(
    anchors: list[tuple[int, int, str, str]],
    key: bytes | None,
    hash_at: dict[tuple[int, int], str],
    pin: tuple[int, str] | None,
    problems: list[Problem],
    chains: int,
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
        heads = _signed_heads(signed["heads"], chains)
        if isinstance(heads, tuple):
            # anchor() signs only the store's own chains, in this shape. A chain beyond
            # them in an anchor the key signed: the store had more chains then (its number
            # was lowered since); without the key, it may as well be forged.
            what, beyond = heads
            why = "the store's number of chains was lowered since" if key and beyond else "forged"
            problems.append(
                Problem(
                    "bad_anchor",
                    -1,
                    None,
                    None,
                    f"anchor {anchor_id} holds heads no anchor writes for this store's "
                    f"{chains} chains ({what}): {why}",
                )
            )
            continue
        for shard, seq, digest in heads:
            if seq == 0:
                continue
            found = hash_at.get((shard, seq))
            if found is None:
                problems.append(
                    Problem(
                        "deleted",
                        shard,
                        seq,
                        None,
                        f"anchor {anchor_id} signed chain {shard} up to seq {seq}, now missing",
                    )
                )
            elif found != digest:
                problems.append(
                    Problem(
                        "rewritten",
                        shard,
                        seq,
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
    if (
        link is not _NO_LINK
        and link is not None
        and not (
            isinstance(link, list)
            and len(link) == 2
            and type(link[0]) is int
            and isinstance(link[1], str)
        )
    ):
        problems.append(
            Problem(
                "bad_anchor",
                -1,
                None,
                None,
                f"anchor {anchor_id} names its predecessor as {link!r}"[:200]
                + ", which no anchor writes (its id and MAC): forged",
            )
        )
        return
    if isinstance(link, list):
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
