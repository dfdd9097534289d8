"""The audit trail as evidence: hash chains, HMAC anchors, verification, export, stats.

Every audit event is chained (docs/design.md section 5): its hash covers the previous hash of its
chain, its place in the chain and every stored field. Events are chained per *shard* of
``(namespace, subject)`` (16 chains; 256 in a PostgreSQL schema whose chains began under
schema version 4, where many hosts write at once), so writers on different shards never wait for
each other, on one host or many. A chain alone proves nothing against someone who can rewrite
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

import csv
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from safeagent._audit import EventKind, Redactor, default_redactor
from safeagent._verify import (
    Problem,
    _check_anchors,
    _check_chains,
    _check_heads,
    _split,
)
from safeagent._verify_cases import _check_cases
from safeagent._verify_receipts import _check_receipts
from safeagent.errors import ConfigurationError
from safeagent.retention import _store_of
from safeagent.stores._base import OUTCOME_DIGEST
from safeagent.stores._rows import Heads

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

    ``store``: a store, or a ``Guard`` / ``AsyncGuard`` whose store is used.

    Raises:
        ConfigurationError: ``store`` is neither a store nor a guard, or does not say how
            many audit chains it has (``chain_shards``); a key shorter than 16 bytes.
        StoreError: the store failed.
    """
    store = _store_of(store, "audit.anchor", ("chain_heads", "anchors", "add_anchor"))
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(f"an audit key of at least {MIN_KEY_BYTES} bytes is needed")
    chains = _chains_of(store)
    # only the store's own chains: a head row beyond them (added by hand) is not signed,
    # and verify reports it
    heads: Heads = {s: h for s, h in store.chain_heads().items() if 0 <= s < chains}
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


def _chains_of(store: Any) -> int:
    """How many audit chains ``store`` has: its ``chain_shards`` (16 on SQLite and in
    memory; 16 or 256 on PostgreSQL). Guessing would misjudge every subject's chain.

    Raises:
        ConfigurationError: the store does not say, or says something other than an int
            of at least 1 (an object forwarding only a store's methods).
    """
    chains = getattr(store, "chain_shards", None)
    if type(chains) is not int or chains < 1:
        raise ConfigurationError(
            f"the store ({type(store).__name__}) must say how many audit chains it has "
            f"(chain_shards, an int >= 1), got {chains!r}"
        )
    return chains


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

    ``store``: a store, or a ``Guard`` / ``AsyncGuard`` whose store is used.

    Raises:
        ConfigurationError: ``store`` is neither a store nor a guard, or does not say how
            many audit chains it has (``chain_shards``); ``last_anchor`` is not an anchor,
            a pair or a pin.
    """
    store = _store_of(store, "audit.verify", ("anchors", "audit_chain"))
    chains = _chains_of(store)
    pin = _pin_of(last_anchor)
    # Anchors first: chains only grow, so every anchor read signs heads the chains read
    # next still hold (one made in between would sign events the chains' read lacks).
    anchors = store.anchors()
    rows, heads = store.audit_chain()
    problems: list[Problem] = []
    trail = _split(rows, problems, chains)
    hash_at, tops = _check_chains(trail.by_shard, problems)
    _check_heads(heads, hash_at, tops, problems, chains)
    checked, unverified = _check_anchors(anchors, key, hash_at, pin, problems, chains)
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


# Detail fields SafeAgent writes itself, holding ids, digests, numbers and states, never a
# caller's data: an export keeps them as stored. Redacted, a fencing token (its name says
# "token") and one fingerprint or digest in about 25 (a run of 13 decimal digits in the
# hex looks like a card number) were lost, and the exported trail no longer matched the
# receipts it describes.
OWN_FIELDS = frozenset(
    {
        "attempt",
        "attempt_ended_at_ms",
        "current_fencing_token",
        "cutoff_ms",
        "deleted",
        "execution_id",
        "fencing_token",
        "fingerprint",
        "kept_in_doubt",
        "kept_pending",
        OUTCOME_DIGEST,
        "lease_expired_ms_ago",
        "previous_fencing_token",
        "quorum",
        "released",
        "status",
        "stored_fingerprint",
        "stored_status",
        "threshold",
        "tombstoned",
        "version",
    }
)


def _exported(detail: Any, redact: Redactor) -> Any:
    """``detail`` through ``redact``, but for :data:`OWN_FIELDS` of plain values."""
    if type(detail) is not dict:
        return redact(detail)
    own = {
        k: v
        for k, v in detail.items()
        if k in OWN_FIELDS and (v is None or type(v) in (str, int, float, bool))
    }
    if not own:
        return redact(detail)
    rest = redact({k: v for k, v in detail.items() if k not in own})
    if type(rest) is not dict:
        return rest  # a hook that replaced the whole detail: its answer stands
    merged = {k: own[k] if k in own else rest[k] for k in detail if k in own or k in rest}
    merged.update((k, v) for k, v in rest.items() if k not in merged)
    return merged


def export(
    store: Any,
    out: TextIO,
    *,
    fmt: str = "jsonl",
    namespace: str | None = None,
    redact: Redactor = default_redactor,
) -> int:
    """Write the audit trail to ``out`` as JSON lines or CSV, details redacted with
    ``redact``; returns the number of events written. ``store``: a store, or a
    ``Guard`` / ``AsyncGuard`` whose store is used. The detail fields SafeAgent writes
    itself with ids, digests, numbers and states (:data:`OWN_FIELDS`: fingerprints,
    outcome digests, fencing tokens, execution ids, statuses) are exported as stored;
    ``redact`` sees the rest.

    Raises:
        ConfigurationError: ``store`` is neither a store nor a guard; an unknown format.
    """
    store = _store_of(store, "audit.export", ("events",))
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
        row["detail"] = _exported(row["detail"], redact)
        if writer is None:
            out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        else:
            row["detail"] = json.dumps(row["detail"], ensure_ascii=False, separators=(",", ":"))
            writer.writerow(row)
    return len(events)


@dataclass(frozen=True, slots=True)
class Stats:
    """Counts from the audit trail over a time window: ``executions`` (claims won: one per
    attempt to run ``fn``, an attempt released because ``fn`` did not run included),
    ``replays`` (duplicates blocked), ``conflicts``, ``in_doubt`` (in-doubt events: a call
    that stored an "outcome unknown" exception, and each call that found a record in doubt
    with no reconcile hook for its action; a lease that runs out writes none, and a call
    with a hook writes the hook's events instead), and the same per action."""

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
    ``until_ms`` (store-clock ms; ``None``: unbounded). ``store``: a store, or a
    ``Guard`` / ``AsyncGuard`` whose store is used.

    Raises:
        ConfigurationError: ``store`` is neither a store nor a guard.
    """
    store = _store_of(store, "audit.stats", ("events",))
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
