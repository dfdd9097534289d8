"""How :func:`safeagent.audit.verify` checks the execution records against the trail: each
record must hold what the last chained event that changed it says (status, outcome digest,
the facts of an attempt in doubt; a tombstone, the retention pass that made it), read
again before a mismatch is reported, so writers racing with verification raise no alarm."""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from safeagent._audit import EventKind
from safeagent._keys import downstream_key
from safeagent._receipt import TERMINAL, Record, Status
from safeagent._verify import (
    _ACTION,
    _ACTOR,
    _AT,
    _DETAIL,
    _EXECUTION_ID,
    _ID,
    _KIND,
    _NAMESPACE,
    _SEQ,
    _SHARD,
    _STATE_EVENTS,
    _SUBJECT,
    Problem,
    _Trail,
    shard_named,
)
from safeagent.stores._as_stored import Unreadable, record_rows
from safeagent.stores._base import CLOCK_STEP_MS, OUTCOME_DIGEST, outcome_digest

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
    attempt: int | None = None
    """The attempt number its last claim that started an attempt recorded, or, when that
    claim recorded none (an older release), the last take-over that did (a take-over
    records the attempt it took over, which must be the claim's: _History checks it);
    None when none did."""
    action: Any = None
    """The action of its last claim that started an attempt (not a take-over, which
    changes no action); None if no chained event records one."""
    fingerprint: str | None = None
    """The fingerprint that claim recorded (None if it recorded none)."""
    claim_id: Any = None
    """The id of that claim's event."""
    claimed_at: Any = None
    """When that claim was written (store clock): the attempt's ``claimed_at_ms``."""


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


class _History:
    """What a request's events, fed in chain order, say its record holds: the last
    state-changing event (:class:`_Expected`), with the claim and take-over facts in force
    after it; and the events that contradict the ones before them (:attr:`edits`: a
    take-over or claim that copied an edit of the record into the chain)."""

    __slots__ = (
        "action",
        "attempt",
        "claim_id",
        "claim_owner",
        "claimed_at",
        "edits",
        "expected",
        "facts",
        "fingerprint",
        "first_claim",
        "owner",
        "started",
        "taken",
    )

    def __init__(self) -> None:
        self.expected: _Expected | None = None
        self.facts: Any = None
        self.owner: Any = None
        self.attempt: int | None = None
        self.action: Any = None
        self.fingerprint: str | None = None
        self.claim_id: Any = None
        self.claimed_at: Any = None
        self.started: int | None = None
        """The attempt number the last claim that started an attempt recorded (None:
        none recorded one, or none is in the chains)."""
        self.claim_owner: Any = None
        """That claim's actor: the lease owner of the attempt it started."""
        self.taken = False
        """Whether a take-over of that attempt came after it."""
        self.first_claim: tuple[tuple[int, Any, Any], int] | None = None
        """(where, attempt) of the first claim in the chains, if it recorded an attempt
        number other than 1 (a new record's is 1): wrong only if the request has no event
        from before the chains (:func:`_last_states` decides)."""
        self.edits: list[tuple[tuple[int, Any, Any], str]] = []
        """(where, what): events that contradict the ones before them, which only an edit
        of the record between them explains (the later event copied what it read)."""

    def feed(
        self,
        kind: Any,
        detail: Any,
        actor: Any,
        action: Any,
        where: tuple[int, Any, Any],
        at_ms: Any,
        execution_id: Any,
    ) -> None:
        """One event: ``where`` is (shard, seq or None, event id)."""
        if kind not in _STATE_EVENTS:
            return
        self.facts = _facts_after(kind, detail, self.facts)
        if kind == EventKind.CLAIMED.value:
            self.owner = actor
            fields = detail if isinstance(detail, dict) else {}
            attempt = fields.get("attempt")
            attempt = attempt if type(attempt) is int else None
            if fields.get("reconcile"):
                # A take-over: same attempt, same action (one by an older release may
                # record no attempt number: the one before still holds).
                self._check_take_over(fields, attempt, where)
                self.taken = True
                if self.started is None:
                    self.attempt = attempt if attempt is not None else self.attempt
            else:
                self._check_claim(attempt, where)
                fingerprint = fields.get("fingerprint")
                self.attempt, self.action, self.claim_id = attempt, action, where[2]
                self.started, self.claim_owner, self.taken = attempt, actor, False
                self.claimed_at = at_ms
                self.fingerprint = fingerprint if isinstance(fingerprint, str) else None
        found = _expectation(kind, detail, *where, at_ms, execution_id)
        if found is not None:
            self.expected = found

    def _check_claim(self, attempt: int | None, where: tuple[int, Any, Any]) -> None:
        """A claim that starts an attempt: the store numbers it one more than the attempt
        before (it claims only a RELEASED record), or 1 for a new record (one an earlier
        release's retention deleted when released, too). Another number means the record's
        attempt was edited while it was released, and the claim counted on from the edit."""
        if attempt is None or attempt == 1:
            return
        if self.expected is None:
            self.first_claim = (where, attempt)
            return
        if self.started is not None and attempt != self.started + 1:
            self.edits.append(
                (
                    where,
                    f"its claim (event {where[2]}) recorded attempt {attempt}, though the "
                    f"attempt before it (claim event {self.claim_id}) was {self.started}: a "
                    "claim numbers the next attempt, so the record's attempt was edited in "
                    "between",
                )
            )

    def _check_take_over(
        self, fields: Mapping[str, Any], attempt: int | None, where: tuple[int, Any, Any]
    ) -> None:
        """A reconcile take-over records the attempt it took over, read from the record,
        which a take-over never changes: it must be the one the claim that started the
        attempt recorded. The first take-over of an attempt also records, read from the
        record, that attempt's owner (its claim's actor) and end (for a record stored
        IN_DOUBT, the instant of the event that left it so; for a PENDING one whose lease
        expired, its lease expiry, which no event records). A take-over that recorded
        other values copied an edit of the record into the chain (and told the hook it)."""
        if self.started is not None and attempt is not None and attempt != self.started:
            self.edits.append(
                (
                    where,
                    f"its reconcile take-over (event {where[2]}) recorded attempt {attempt}, "
                    f"though the claim that started the attempt (event {self.claim_id}) "
                    f"recorded attempt {self.started}: a take-over never changes the attempt, "
                    "so the record's attempt was edited before it",
                )
            )
        if self.taken or self.claim_owner is None or "attempt_owner" not in fields:
            return  # a later take-over keeps the facts; none recorded by an older release
        before = self.expected
        wrong = []
        owner = fields.get("attempt_owner")
        if owner != self.claim_owner:
            wrong.append(f"owner {owner!r}, though its claim was {self.claim_owner!r}")
        ended_at = fields.get("attempt_ended_at_ms")
        if (
            before is not None
            and before.status == Status.IN_DOUBT.value
            and type(before.at_ms) is int
            and (type(ended_at) is not int or abs(ended_at - before.at_ms) > _CLOCK_STEP_MS)
        ):
            wrong.append(
                f"end {ended_at!r}, though the event that left it IN_DOUBT (event "
                f"{before.event_id}) is at {before.at_ms}"
            )
        if wrong:
            self.edits.append(
                (
                    where,
                    f"its first reconcile take-over (event {where[2]}) recorded the attempt "
                    "in doubt's " + " and ".join(wrong) + ": it read them from the record, "
                    "so they were edited before it",
                )
            )

    def result(self) -> _Expected | None:
        if self.expected is None:
            return None
        return replace(
            self.expected,
            facts=self.facts,
            owner=self.owner,
            attempt=self.attempt,
            action=self.action,
            fingerprint=self.fingerprint,
            claim_id=self.claim_id,
            claimed_at=self.claimed_at,
        )


def _parsed(detail: Any) -> Any:
    try:
        return json.loads(detail)
    except (ValueError, TypeError, RecursionError):
        return None


_Edit = tuple[tuple[str, str], tuple[int, Any, Any], str]
"""(namespace, request id), (shard, seq, event id) and what an event contradicts."""


def _last_states(
    rows: list[tuple[Any, ...]], legacy_keys: Any = frozenset()
) -> tuple[dict[tuple[str, str], _Expected], list[_Edit]]:
    """(namespace, request id) -> what its last state-changing event says, and the events
    that contradict the ones before them (:attr:`_History.edits`; the first claim of a
    request with no event from before the chains must be its first attempt). A request's
    events are all in one chain, read in seq order."""
    found: dict[tuple[str, str], _History] = {}
    for row in rows:
        kind = row[_KIND]
        if kind not in _STATE_EVENTS:
            continue
        key = (row[_NAMESPACE], row[_SUBJECT])
        history = found.get(key)
        if history is None:
            history = found[key] = _History()
        history.feed(
            kind,
            _parsed(row[_DETAIL]),
            row[_ACTOR],
            row[_ACTION],
            (row[_SHARD], row[_SEQ], row[_ID]),
            row[_AT],
            row[_EXECUTION_ID],
        )
    edits: list[_Edit] = []
    for key, history in found.items():
        if history.first_claim is not None and key not in legacy_keys:
            where, attempt = history.first_claim
            edits.append(
                (
                    key,
                    where,
                    f"its first claim (event {where[2]}) recorded attempt {attempt}, though "
                    "no event precedes it and a new record's first attempt is 1",
                )
            )
        edits.extend((key, where, what) for where, what in history.edits)
    states = {key: e for key, history in found.items() if (e := history.result()) is not None}
    return states, edits


_CLOCK_STEP_MS = CLOCK_STEP_MS


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
        """(at_ms, reach, deleted released records) of a retention pass's event, or None
        for any other event. The reach is the pass's cutoff, but never later than the pass
        itself (plus the clock-step allowance): a pass purges only what finished before it
        ran, so a cutoff in the future (``purge(before_ms=...)`` accepts one) must not
        cover a record that finished after the pass and was made a tombstone by hand."""
        if kind != EventKind.PURGED.value or (namespace, subject) != _RETENTION:
            return None
        if isinstance(detail, str):
            try:
                detail = json.loads(detail)
            except (ValueError, RecursionError):
                return None
        if not isinstance(detail, Mapping):
            return None
        cutoff = detail.get("cutoff_ms")
        if type(at_ms) is not int or type(cutoff) is not int:
            return None
        deleted = detail.get("deleted")
        return at_ms, min(cutoff, at_ms + _CLOCK_STEP_MS), type(deleted) is int and deleted > 0

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


def _stored_digest(record: Record) -> str | None:
    """The outcome digest of the record as stored, or None where a field holds what no
    writer stores (a BLOB: an edit by hand), which then matches no recorded digest."""
    error = record.error
    try:
        return outcome_digest(
            record.execution_id,
            record.status.value,
            record.result_json,
            None if error is None else error.type,
            None if error is None else error.message,
        )
    except (TypeError, ValueError, RecursionError):
        return None


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
            # written before them was last changed before the first chained event, except
            # by retention, whose chained pass (on its own subject) must then cover it.
            changed = _last_change(record)
            if type(chains_began) is not int:
                return "unverified"
            if changed is not None and changed >= chains_began:
                return (
                    f"its only events are from before the chains, but the record was changed "
                    f"at {changed}, after the chains began (at {chains_began}): a "
                    f"{record.status.value} record written behind the guard's back"
                )
            purged = record.purged_at_ms
            if purged is not None and not (type(purged) is int and purged < chains_began):
                tombstone = _judge_tombstone(record, None, changed, purges)
                return "unverified" if tombstone == "ok" else tombstone
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
    identity = _judge_identity(record, expected)
    if identity is not None:
        return identity
    facts = _judge_facts(record, expected)
    if facts is not None:
        return facts
    if record.purged_at_ms is not None:
        return _judge_tombstone(record, expected.execution_id, expected.at_ms, purges)
    if record.status.value not in _FINISHED:
        return "ok"
    if expected.digest is None:
        return "unverified"  # finished by a release that wrote no outcome digests
    if expected.digest != _stored_digest(record):
        return f"the stored {record.status.value} outcome differs from the one its event recorded"
    return "ok"


def _judge_identity(record: Record, expected: _Expected) -> str | None:
    """What is wrong with what the record says it is (None: nothing): the attempt number,
    action and fingerprint its last claim event recorded, when that claim was written
    (within a second, as the store's clock may be read twice), and the downstream key,
    which is always derived from (namespace, action, request id). A reconcile hook looks the
    effect up by that key, and is picked by that action: edited, a hook finds nothing, or
    another action's hook answers, and the request runs again."""
    wrong = []
    if expected.attempt is not None and record.attempt != expected.attempt:
        wrong.append(
            f"attempt {record.attempt!r}, though its claim and take-over events put it at "
            f"attempt {expected.attempt}"
        )
    if expected.action is not None and record.action != expected.action:
        wrong.append(
            f"action {record.action!r}, though its claim (event {expected.claim_id}) was for "
            f"{expected.action!r}"
        )
    if expected.fingerprint is not None and record.fingerprint != expected.fingerprint:
        wrong.append(
            f"fingerprint {record.fingerprint!r}, though its claim (event {expected.claim_id}) "
            f"recorded {expected.fingerprint!r}"
        )
    if type(expected.claimed_at) is int and (
        type(record.claimed_at_ms) is not int  # no writer stores another type
        or abs(record.claimed_at_ms - expected.claimed_at) > _CLOCK_STEP_MS
    ):
        wrong.append(
            f"claimed_at_ms {record.claimed_at_ms}, though its claim (event "
            f"{expected.claim_id}) was written at {expected.claimed_at}"
        )
    action = record.action if expected.action is None else expected.action
    try:
        derived: str | None = downstream_key(record.namespace, action, record.request_id)
    except (TypeError, ValueError, RecursionError):  # fields of other types: an edit by hand
        derived = None
    if record.downstream_key != derived:
        wrong.append(
            f"downstream key {record.downstream_key!r}, though its namespace, action "
            f"{action!r} and request id give {derived!r}"
        )
    return "it holds " + " and ".join(wrong) if wrong else None


def _judge_tombstone(record: Record, execution_id: Any, changed_at_ms: Any, purges: _Purges) -> str:
    """A record marked purged (its status already matches its last event, if it has a
    chained one): retention keeps identity, action, fingerprint, final status and
    execution id (``execution_id``: the one its last event names, None if none does),
    clears payload, result and error message, and writes a chained ``purged`` event in
    the same transaction, whose cutoff is after the record's last change
    (``changed_at_ms``)."""
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
    if execution_id is not None and record.execution_id != execution_id:
        return "its execution id is not the one its last event names"
    if not purges.cover(record.purged_at_ms, changed_at_ms):
        return (
            f"it is marked purged (at {record.purged_at_ms}), but no retention pass in the "
            "chains covers it: none written since then had a cutoff after its last change "
            f"(at {changed_at_ms})"
        )
    return "ok"


def _last_change(record: Record) -> int | None:
    """The latest instant the record says it changed, retention's tombstone aside (its
    pass is audited on its own subject, and judged by :func:`_judge_tombstone`)."""
    stamps = [
        t
        for t in (
            record.created_at_ms,
            record.claimed_at_ms,
            record.updated_at_ms,
            record.completed_at_ms,
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
        if expected.attempt is None:
            return None  # the last claim, by an older release, says no attempt number
        return (
            f"it holds facts of attempt {record.attempt} in doubt that no take-over of that "
            "attempt recorded"
        )
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
    request says: its stored status, attempt, action, fingerprint and downstream key, and
    for a finished one the outcome digest (for a tombstone, the retention pass that covers
    it); and report the take-overs and claims whose events contradict the events before
    them (:attr:`_History.edits`). Returns (checked, unverified). Records and events are
    read apart, so a request that looks wrong is read again, record and events together
    (:func:`_read_again`), before it is reported."""
    states, edits = _last_states(trail.trusted, trail.legacy_keys)
    # Events of the chains that contradict each other: the chains are append-only and
    # hashed, so unlike a record they need no second read.
    problems.extend(
        Problem("receipt_edited", shard, seq, event_id, f"request {key[1]!r} ({key[0]}): {what}")
        for key, (shard, seq, event_id), what in edits
    )
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
    try:  # row by row: a row no release writes is reported, and the others still checked
        records, _ = record_rows(store)
    except (ValueError, RecursionError) as exc:  # a store that cannot be read row by row
        problems.append(
            Problem("receipt_edited", -1, None, None, f"an execution record cannot be read: {exc}")
        )
        return 0, 0
    by_key: dict[tuple[Any, Any], Record] = {}
    checked = unverified = 0
    unreadable: set[tuple[Any, Any]] = set()
    for r in records:
        if isinstance(r, Unreadable):
            key = (r.key[0], r.key[1])  # as stored: a described value could be a real id
            unreadable.add(key)
            checked += 1
            problems.append(
                _edited(key, states, trail.chains, f"its record cannot be read: {r.problem}")
            )
        else:
            by_key[(r.namespace, r.request_id)] = r
    began = trail.chains_began
    for key in (by_key.keys() | states.keys()) - unreadable:
        legacy = key in trail.legacy_keys
        verdict = _judge(by_key.get(key), states.get(key), legacy, purges, began)
        if verdict is None:
            continue
        if verdict not in ("ok", "unverified"):
            settled: bool | None = None
            try:
                settled, record, expected = _read_again(
                    store, key[0], key[1], trail.untrusted, trail.chains
                )
            # a status or an event kind no release writes, a detail past the recursion limit
            except (ValueError, RecursionError) as exc:
                verdict = f"its record or events cannot be read: {exc}"
            if settled is False:
                problems.append(_busy("request", key, _TRIES, trail.chains))
                continue
            if settled:
                # The retention passes are read after the record: a tombstone (or a
                # deletion) read again was written by a pass that committed before that
                # read, so it is in them. They are read again whenever the last read
                # may predate it.
                if fresh is None or (
                    _judge(record, expected, legacy, fresh, began) not in (None, "ok", "unverified")
                    and (record is None or record.purged_at_ms is not None)
                ):
                    fresh = _read_purges(store, trail.untrusted, purges)
                verdict = _judge(record, expected, legacy, fresh, began)
            if verdict is None:
                continue
        if verdict == "unverified":
            unverified += 1
            continue
        checked += 1
        if verdict != "ok":
            problems.append(_edited(key, states, trail.chains, verdict))
    return checked, unverified


def _edited(
    key: tuple[Any, Any], states: Mapping[Any, _Expected], chains: int, what: str
) -> Problem:
    """The ``receipt_edited`` of request ``key`` (namespace, request id): at its last
    state-changing event, or on its chain when it has none."""
    shard = shard_named(key[0], key[1], chains)
    where = states.get(key) or _Expected(None, None, shard, None, None)
    return Problem(
        "receipt_edited",
        where.shard,
        where.seq,
        where.event_id,
        f"request {key[1]!r} ({key[0]}): {what}",
    )


_TRIES = 5
"""How many times a store without :func:`_snapshot_reader` is read again."""


def _snapshot_reader(store: Any) -> Any:
    """The store's ``subject_snapshot`` (one subject's record, case, signals and events
    in one snapshot), if its class has one (SQLite and PostgreSQL): None for a store
    without one, and for an object that only forwards attributes to a store (whose own
    read methods then are what is read)."""
    read = getattr(type(store), "subject_snapshot", None)
    return store.subject_snapshot if callable(read) else None


def _busy(what: str, key: tuple[Any, Any], tries: int, chains: int) -> Problem:
    return Problem(
        "busy",
        shard_named(*key, chains),
        None,
        None,
        f"{what} {key[1]!r} ({key[0]}) changed during each of {tries} reads of it and its "
        "events, so it was not judged: no sign of tampering, verify again when it is quieter",
    )


def _read_purges(store: Any, untrusted: set[Any], first: _Purges) -> _Purges:
    """The retention passes read again (``first``, the trail's, if an edited event makes
    them unreadable: its kind or detail no release writes, which the chains report)."""
    try:
        events = store.events(namespace=_RETENTION[0], subject=_RETENTION[1])
    except (ValueError, RecursionError):  # EventKind refuses the kind, or the detail is not JSON
        return first
    return _Purges(
        [
            mark
            for e in events
            if e.id not in untrusted
            and (mark := _Purges.mark(e.kind.value, e.namespace, e.subject, e.at_ms, e.detail))
        ]
    )


def _read_again(
    store: Any, namespace: str, request_id: str, untrusted: set[Any], chains: int
) -> tuple[bool, Record | None, _Expected | None]:
    """(settled, the record, what its request's last state-changing event says), read
    together. A store with a snapshot read (:func:`_snapshot_reader`) reads them in one;
    any other is read record, events, record, until the record is the same before and
    after the events (a request finishing or re-run meanwhile), at most :data:`_TRIES`
    times: ``settled`` is False if it never was. Events the first read found outside the
    chains (``untrusted``) are left out."""
    shard = shard_named(namespace, request_id, chains)
    snapshot = _snapshot_reader(store)
    if snapshot is not None:
        record, _, _, rows = snapshot(namespace, request_id)
        history = _History()
        for row in rows:  # EVENT_COLUMNS order
            event_id, at_ms, kind, _, _, action, actor, execution_id, _, detail = row
            if event_id not in untrusted:
                where = (shard, None, event_id)
                history.feed(kind, _parsed(detail), actor, action, where, at_ms, execution_id)
        return True, record, history.result()
    record, _ = store.get(namespace, request_id)
    expected: _Expected | None = None
    for _ in range(_TRIES):
        history = _History()
        for event in store.events(namespace=namespace, subject=request_id):
            if event.id in untrusted:
                continue
            history.feed(
                event.kind.value,
                event.detail,
                event.actor,
                event.action,
                (shard, None, event.id),
                event.at_ms,
                event.execution_id,
            )
        expected = history.result()
        after, _ = store.get(namespace, request_id)
        if after == record:
            return True, record, expected
        record = after
    return False, record, expected
