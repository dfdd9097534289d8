"""PostgresStore's fast path: a claim or a completion and its audit event in ONE statement,
the event's chain hash computed by the database.

The proofs: the rows it writes verify and carry exactly the hash chain_hash() computes in
Python, for hostile strings of every kind; a twin store that only takes the general path,
fed the same calls on the same fake clock, writes a byte-identical trail (events, chain,
heads), fast path or fallback; and under concurrency every id runs once, every chain
verifies, and nothing deadlocks.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from safeagent import ExecutionContext, Guard
from safeagent._audit import AuditEvent, EventKind
from safeagent._cases import Signal, apply_signal
from safeagent._flow import CLAIM_FIRST_MAX_PAYLOAD
from safeagent._keys import downstream_key
from safeagent._receipt import ErrorInfo, Status
from safeagent.audit import verify
from safeagent.errors import StoreError
from safeagent.stores._base import (
    ClaimRequest,
    ClaimResult,
    Completion,
    WriteResult,
    claimed_event,
    completion_events,
)
from safeagent.stores._pg_fast import _ATTEMPT, _TOKEN, _claim_fragments
from safeagent.stores._pg_sql import MAX_CARRIED
from safeagent.stores._rows import GENESIS, chain_hash, chain_rows, shard_of
from safeagent.stores.postgres import CLAIM_FIRST_FOUND_SHARE, PostgresStore
from tests.conftest import PG_URL, FakeClock, pg_schema

pytestmark = pytest.mark.usefixtures("postgres_available")


class Counted(PostgresStore):
    """A PostgresStore counting the path each claim and completion took (in ``paths``; a
    ``_complete_fast_missed`` changed nothing, and the general path followed)."""

    def __init__(self, *args: Any, fast: bool, **kwargs: Any) -> None:
        self.paths: Counter[str] = Counter()
        super().__init__(*args, **kwargs)
        self._fast_path = fast

    def _claim_fast(self, request: ClaimRequest, fragments: tuple[Any, ...]) -> ClaimResult:
        self.paths["_claim_fast"] += 1
        return super()._claim_fast(request, fragments)

    def _claim_new_fast(self, request: ClaimRequest, fragments: tuple[Any, ...]) -> ClaimResult:
        self.paths["_claim_new_fast"] += 1
        return super()._claim_new_fast(request, fragments)

    def _claim_carrying(
        self, request: ClaimRequest, fragments: tuple[Any, ...]
    ) -> ClaimResult | None:
        out = super()._claim_carrying(request, fragments)
        self.paths["_claim_carrying" if out is not None else "_claim_carrying_missed"] += 1
        return out

    def _claim_new_carrying(
        self, request: ClaimRequest, fragments: tuple[Any, ...]
    ) -> ClaimResult | None:
        out = super()._claim_new_carrying(request, fragments)
        self.paths["_claim_new_carrying" if out is not None else "_claim_new_carrying_missed"] += 1
        return out

    def _claim_general(
        self, request: ClaimRequest, carried: list[AuditEvent] | None = None
    ) -> ClaimResult:
        self.paths["_claim_general"] += 1
        return super()._claim_general(request, carried)

    def _complete_fast(
        self,
        completion: Completion,
        terminal: bool,
        known: tuple[str, str],
        fragments: tuple[Any, ...],
    ) -> WriteResult | None:
        out = super()._complete_fast(completion, terminal, known, fragments)
        self.paths["_complete_fast" if out is not None else "_complete_fast_missed"] += 1
        return out

    def _complete_carrying(
        self,
        completion: Completion,
        terminal: bool,
        known: tuple[str, str],
        fragments: tuple[Any, ...],
    ) -> WriteResult | None:
        out = super()._complete_carrying(completion, terminal, known, fragments)
        self.paths["_complete_carrying" if out is not None else "_complete_carrying_missed"] += 1
        return out

    def _complete_general(
        self,
        completion: Completion,
        terminal: bool,
        settle: str | None,
        carried: list[AuditEvent] | None = None,
    ) -> WriteResult:
        self.paths["_complete_general"] += 1
        return super()._complete_general(completion, terminal, settle, carried)


Made = Callable[..., Counted]


@pytest.fixture
def make() -> Iterator[Made]:
    """``make(fast=True, clock=None, durability="durable", schema=<fresh>)``: a Counted
    store; every one is closed and its schema dropped at teardown."""
    made: list[Counted] = []

    def build(
        *, fast: bool = True, clock: Any = None, durability: str = "durable", schema: str = ""
    ) -> Counted:
        store = Counted(
            PG_URL,
            schema=schema or pg_schema(),
            clock=clock,
            durability=durability,
            max_size=24,
            fast=fast,
        )
        made.append(store)
        return store

    yield build
    schemas = {s.schema for s in made}
    for store in made:
        store.close()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _checked_chain(store: PostgresStore) -> list[tuple[Any, ...]]:
    """Every chained row, after asserting that it verifies and that each stored hash is
    chain_hash() recomputed in Python from the stored fields."""
    report = verify(store)
    assert report.ok, report.problems
    rows, heads = store.audit_chain()
    expected: dict[int, tuple[int, str]] = {}
    for row in rows:
        shard, seq, prev, digest = int(row[1]), int(row[2]), row[3], row[4]
        assert digest == chain_hash(prev, shard, seq, row[5:])
        assert shard == shard_of(row[7], row[8], store.chain_shards)
        assert (seq - 1, prev) == expected.get(shard, (0, GENESIS))
        expected[shard] = (seq, digest)
    assert {s: h for s, h in heads.items() if h[0]} == expected
    return rows


def _trail(store: PostgresStore) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]], Any]:
    """What two stores fed the same calls must agree on: events (without ids), the chain
    rows (without ids) and the heads."""
    events = [{**e.to_dict(), "id": None} for e in store.events()]
    rows = [row[1:] for row in _checked_chain(store)]
    return events, rows, store.chain_heads()


def _twins(make: Made, **kwargs: Any) -> tuple[Counted, Counted]:
    return make(fast=True, clock=FakeClock(), **kwargs), make(
        fast=False, clock=FakeClock(), **kwargs
    )


def _request(rid: str, **kw: Any) -> ClaimRequest:
    fields: dict[str, Any] = {
        "namespace": "ns",
        "request_id": rid,
        "action": "charge",
        "fingerprint": "f" * 64,
        "payload_json": '{"amount":1}',
        "execution_id": uuid.uuid5(uuid.NAMESPACE_OID, rid).hex,
        "owner": "owner-1",
        "lease_ms": 30_000,
        "detail": {"payload": {"amount": 1}, "fingerprint": "f" * 64},
    }
    fields.update(kw)
    if "downstream_key" not in fields:  # the key the guard derives, which verify expects
        try:
            fields["downstream_key"] = downstream_key(fields["namespace"], fields["action"], rid)
        except ValueError:  # text no column can hold: the claim is refused anyway
            fields["downstream_key"] = "dk-" + rid
    return ClaimRequest(**fields)


def _completion(req: ClaimRequest, token: int = 1, **kw: Any) -> Completion:
    fields: dict[str, Any] = {
        "namespace": req.namespace,
        "request_id": req.request_id,
        "fencing_token": token,
        "status": Status.SUCCEEDED,
        "result_json": '{"ok":true}',
        "error": None,
        "actor": req.owner,
        "detail": {"error": None},
        "action": req.action,
        "execution_id": req.execution_id,
    }
    fields.update(kw)
    return Completion(**fields)


# -- hostile strings: the hash computed in SQL is chain_hash() ---------------------------------

# Text PostgreSQL stores as a column (no NUL, no lone surrogate: both are refused, on either
# path, before anything is written).
COLUMN_TEXT = [
    "",
    "plain",
    '"',
    "\\",
    '\\"',
    '"\\',
    "\\\\\\",
    "\\u0000",
    "\x01\x02\x1f\x7f\x80\x9f",
    "\n\r\t\b\f\v",
    "\u2028\u2029\ufeff\ufffe\uffff",
    "é ß ñ",
    "日本語のテキスト",
    "\U0001f600\U0001f4a9",
    "\U0010ffff\U00010000",
    "{}",
    "[]",
    '"]',
    '",null,"',
    "'; DROP TABLE executions; --",
    "%s %(now)s %% {s} {} $1",
    "' || '",
    "0" * 64,
    "x" * 100_000,
    "\u00e9" * 20_000 + '"\\' * 10_000,
]
# JSON-encoded text (the audit detail): anything a Python str can hold.
DETAIL_TEXT = [*COLUMN_TEXT, "\x00", "a\x00b", "\ud800", "\udfff", "a\udbff\udc00b", "\ud800\x00"]


@pytest.mark.parametrize("claim", ["claim", "claim_new"])
def test_hostile_strings_hash_in_sql_as_chain_hash_does_in_python(make: Made, claim: str) -> None:
    """Every hostile string as every field of a fast claim (CLAIM_FAST, or CLAIM_NEW_FAST:
    the guard's first step here) and completion: each row verifies, its hash is
    chain_hash() of its stored fields, and a general-path twin writes a byte-identical
    trail."""
    fast, slow = _twins(make)
    calls: list[tuple[ClaimRequest, Completion]] = []
    for i, text in enumerate(COLUMN_TEXT):
        detail_text = DETAIL_TEXT[i % len(DETAIL_TEXT)]
        req = _request(
            f"rid-{i}-{text}",
            namespace=f"ns-{text}",
            action=text,
            owner=f"{text}-owner",
            execution_id=text + str(i),
            fingerprint=text,
            detail={"payload": {text: detail_text, detail_text: [text]}, "fingerprint": text},
        )
        status = [Status.SUCCEEDED, Status.FAILED, Status.RELEASED, Status.IN_DOUBT][i % 4]
        done = _completion(
            req,
            status=status,
            result_json=None if status is not Status.SUCCEEDED else '"' + text[:50] + '"',
            error=None if status is Status.SUCCEEDED else ErrorInfo(text, text),
            actor=f"actor-{text}",
            detail={"error": {"type": text, "message": detail_text}, text: detail_text},
            event_kind=EventKind.RECONCILED if i % 5 == 0 else None,
        )
        calls.append((req, done))
    for text in DETAIL_TEXT:  # detail only, in both the claim and the completion
        req = _request(f"d-{len(calls)}", detail={"payload": text, text: text})
        calls.append((req, _completion(req, detail={"error": None, text: [text, {text: 1}]})))
    for store in (fast, slow):
        for req, done in calls:
            claimed = getattr(store, claim)(req)
            assert claimed.won
            assert claimed.record.attempt == 1
            written = store.complete(done)
            assert written.accepted
            assert not written.late
    fast_claims = "_claim_fast" if claim == "claim" else "_claim_new_fast"
    assert fast.paths == Counter({fast_claims: len(calls), "_complete_fast": len(calls)})
    assert slow.paths == Counter(_claim_general=len(calls), _complete_general=len(calls))
    assert _trail(fast) == _trail(slow)
    assert len(fast.events()) == 2 * len(calls)


def test_text_no_column_can_hold_fails_on_either_path_and_writes_nothing(make: Made) -> None:
    """NUL and lone surrogates in a stored column: both paths raise the same error before
    anything is written (a StoreError for NUL: fn would not run)."""
    fast, slow = _twins(make)
    for bad in ("a\x00b", "a\ud800b"):
        for field in ("request_id", "action", "owner"):
            errors = []
            for store in (fast, slow):
                with pytest.raises((StoreError, UnicodeEncodeError)) as info:
                    store.claim(_request("r", **{field: bad}))
                errors.append(info.type)
            assert errors[0] is errors[1]
    assert fast.events() == slow.events() == []
    assert fast.records()[0] == slow.records()[0] == []


def test_a_stand_in_met_in_the_strings_takes_the_general_path(make: Made) -> None:
    """The detail happens to hold the integer standing for the token or the attempt while
    the fragments are cut: the claim goes the general path, with the same trail."""
    fast, slow = _twins(make)
    for store in (fast, slow):
        for i, odd in enumerate((_TOKEN, _ATTEMPT, str(_ATTEMPT), f"x{_TOKEN}y")):
            req = _request(f"odd-{i}", detail={"payload": odd})
            assert store.claim(req).won
            assert store.complete(_completion(req)).accepted
    assert fast.paths["_claim_general"] == 4
    assert fast.paths["_complete_fast"] == 4  # the completion's detail holds no stand-in
    assert _trail(fast) == _trail(slow)


def test_an_attempt_key_in_the_claim_detail_is_handled(make: Made) -> None:
    """claimed_event puts the attempt where {**detail, "attempt": n} puts it: first, when
    the caller's detail already had that key. The fast path writes the same."""
    fast, slow = _twins(make)
    for store in (fast, slow):
        req = _request("a", detail={"attempt": "theirs", "x": 1})
        assert store.claim(req).won
        assert store.complete(_completion(req)).accepted
    assert fast.paths["_claim_fast"] == 1
    assert _trail(fast) == _trail(slow)
    assert fast.events()[0].detail == {"attempt": 1, "x": 1}


def test_fast_events_are_what_the_event_functions_build(make: Made) -> None:
    """The fast path's events equal claimed_event's and completion_events' (read back)."""
    clock = FakeClock()
    store = make(clock=clock)
    req = _request("r", detail={"payload": {"k": "v"}, "fingerprint": "f"})
    claimed = store.claim(req)
    clock.advance(1.5)
    done = _completion(req, detail={"error": None, "note": "é"})
    written = store.complete(done)
    assert written.record is not None
    claim_event, done_event = store.events()
    assert claim_event.to_dict() == {
        **claimed_event(req, claimed.record, claimed.now_ms).to_dict(),
        "id": claim_event.id,
    }
    expected = completion_events(done, written.record, written.record, clock())
    assert [done_event.to_dict()] == [{**e.to_dict(), "id": done_event.id} for e in expected]
    assert claim_event.at_ms == claimed.now_ms == 1_700_000_000_000  # the test clock
    assert done_event.at_ms == clock() == written.record.updated_at_ms


# -- fallbacks: the general path, writing what it always wrote ---------------------------------


def _both(make: Made, scenario: Callable[[Counted, FakeClock], None], **kw: Any) -> Counted:
    """Run ``scenario`` on a fast store and on a general-path twin, each with its own fake
    clock; their trails must be identical. Returns the fast store."""
    stores = []
    for fast in (True, False):
        clock = FakeClock()
        store = make(fast=fast, clock=clock, **kw)
        scenario(store, clock)
        stores.append(store)
    assert _trail(stores[0]) == _trail(stores[1])
    assert stores[0].records() == stores[1].records()
    return stores[0]


def test_a_late_completion_falls_back_and_writes_its_second_event(make: Made) -> None:
    def scenario(store: Counted, clock: FakeClock) -> None:
        req = _request("late", lease_ms=1_000)
        store.claim(req)
        clock.advance(2)
        written = store.complete(_completion(req))
        assert (written.accepted, written.late) == (True, True)
        clock.advance(1)
        req2 = _request("edge", lease_ms=1_000)
        store.claim(req2)
        clock.advance(1)  # now == lease expiry: late, as the general path judges it
        assert store.complete(_completion(req2)).late

    fast = _both(make, scenario)
    assert fast.paths["_complete_fast_missed"] == 2
    assert fast.paths["_complete_general"] == 2
    kinds = [e.kind for e in fast.events(subject="late")]
    assert kinds == [EventKind.CLAIMED, EventKind.SUCCEEDED, EventKind.LATE_COMPLETION]


def test_a_stale_token_falls_back_to_the_rejection(make: Made) -> None:
    def scenario(store: Counted, clock: FakeClock) -> None:
        req = _request("stale")
        store.claim(req)
        clock.advance(0.1)
        assert not store.complete(_completion(req, token=7)).accepted  # never claimed
        assert not store.complete(_completion(_request("absent"))).accepted  # no record
        assert store.complete(_completion(req)).accepted
        clock.advance(0.1)
        assert not store.complete(_completion(req)).accepted  # twice: no longer PENDING

    fast = _both(make, scenario)
    assert fast.paths["_complete_fast"] == 1
    assert fast.paths["_complete_general"] == 3
    kinds = [e.kind for e in fast.events(subject="stale")]
    assert kinds == [
        EventKind.CLAIMED,
        EventKind.COMPLETION_REJECTED,
        EventKind.SUCCEEDED,
        EventKind.COMPLETION_REJECTED,
    ]


def test_a_released_record_is_claimed_again_as_attempt_two(make: Made) -> None:
    def scenario(store: Counted, clock: FakeClock) -> None:
        first = _request("again")
        assert store.claim(first).won
        assert store.complete(_completion(first, status=Status.RELEASED)).accepted
        clock.advance(0.5)
        second = _request("again", execution_id="e2", owner="owner-2", action="charge")
        claimed = store.claim(second)
        assert claimed.won
        assert (claimed.record.attempt, claimed.record.fencing_token) == (2, 2)
        lost = store.claim(_request("again", execution_id="e3"))
        assert not lost.won
        assert lost.record.execution_id == "e2"
        assert store.complete(_completion(second, token=2)).accepted

    fast = _both(make, scenario)
    assert fast.paths == Counter(_claim_fast=3, _complete_fast=2)
    claims = [e for e in fast.events() if e.kind is EventKind.CLAIMED]
    assert [(e.fencing_token, e.detail["attempt"]) for e in claims] == [(1, 1), (2, 2)]


def test_buffered_events_go_with_the_next_claim_or_completion(make: Made) -> None:
    """A completion and a claim carry buffered events in their one statement
    (COMPLETE_FAST_CARRYING, CLAIM_FAST_CARRYING): the trail is the general path's, byte
    for byte, ids in the same order (the buffered event first)."""
    assert shard_of("ns", "other", 256) not in {
        shard_of("ns", "buf", 256),
        shard_of("ns", "buf2", 256),
    }

    def scenario(store: Counted, clock: FakeClock) -> None:
        req = _request("buf")
        store.claim(req)
        replay = AuditEvent(EventKind.REPLAYED, clock(), "ns", "other", detail={"x": 1})
        store.record_event(replay, buffered=True)
        assert store.complete(_completion(req)).accepted  # takes the buffered event along
        store.record_event(replay, buffered=True)
        req2 = _request("buf2")
        assert store.claim(req2).won  # carries it
        assert not store._buffer
        assert store.complete(_completion(req2)).accepted

    fast = _both(make, scenario)
    assert fast.paths == Counter(
        _claim_fast=1, _complete_carrying=1, _claim_carrying=1, _complete_fast=1
    )
    kinds = [e.kind.value for e in fast.events()]
    assert kinds == ["claimed", "replayed", "succeeded", "replayed", "claimed", "succeeded"]


def _on_shards(chains: int, avoid: set[int], count: int, prefix: str) -> list[str]:
    """``count`` subjects on distinct chains, none of them in ``avoid``."""
    found: list[str] = []
    seen = set(avoid)
    for subject in (f"{prefix}{i}" for i in itertools.count()):
        shard = shard_of("ns", subject, chains)
        if shard not in seen:
            seen.add(shard)
            found.append(subject)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


@pytest.mark.parametrize("carried", [1, 3, MAX_CARRIED])
def test_a_claim_carries_buffered_events_on_chains_of_their_own(make: Made, carried: int) -> None:
    """Up to MAX_CARRIED buffered events, each on a chain of its own and none on the
    claim's, go with the claim in its one statement; the hashes the database computes are
    chain_hash()'s, and the trail is the general path's."""
    chains = 256

    def scenario(store: Counted, clock: FakeClock) -> None:
        claim_shard = shard_of("ns", "carrier", chains)
        for subject in _on_shards(chains, {claim_shard}, carried, "s-"):
            detail = {"status": "SUCCEEDED", "odd": '"\\\u2028\U0001f600'}
            event = AuditEvent(EventKind.REPLAYED, clock(), "ns", subject, "charge", "o", "e", 3)
            store.record_event(replace(event, detail=detail), buffered=True)
            clock.advance(0.001)
        assert store.claim(_request("carrier")).won
        assert not store._buffer

    fast = _both(make, scenario)
    assert fast.paths == Counter(_claim_carrying=1)
    assert [e.kind.value for e in fast.events()] == ["replayed"] * carried + ["claimed"]


def test_a_claim_carries_nothing_it_cannot_chain_alone(make: Made) -> None:
    """Two buffered events on one chain, one on the claim's chain, or more than
    MAX_CARRIED: the claim takes the general path, which carries them all."""
    chains = 256

    def scenario(store: Counted, clock: FakeClock) -> None:
        def buffer(subject: str) -> None:
            event = AuditEvent(EventKind.REPLAYED, clock(), "ns", subject, detail={})
            store.record_event(event, buffered=True)

        buffer("twice")
        buffer("twice")
        assert store.claim(_request("c1")).won
        same = next(
            s
            for s in (f"same-{i}" for i in itertools.count())
            if shard_of("ns", s, chains) == shard_of("ns", "c2", chains)
        )
        buffer(same)
        assert store.claim(_request("c2")).won
        for subject in _on_shards(chains, {shard_of("ns", "c3", chains)}, MAX_CARRIED + 1, "m-"):
            buffer(subject)
        assert store.claim(_request("c3")).won
        assert not store._buffer

    fast = _both(make, scenario)
    assert fast.paths == Counter(_claim_carrying_missed=3, _claim_general=3)


def test_a_late_completion_carries_nothing_and_the_general_path_writes_it_all(
    make: Made,
) -> None:
    """A completion past its lease with buffered events: the carrying statement changes
    nothing, and the general path writes the late completion's two events and carries the
    buffered ones; the trail is the general path's."""

    def scenario(store: Counted, clock: FakeClock) -> None:
        req = _request("late-carry", lease_ms=1_000)
        assert store.claim(req).won
        store.record_event(
            AuditEvent(EventKind.REPLAYED, clock(), "ns", "other", detail={}), buffered=True
        )
        clock.advance(2)
        written = store.complete(_completion(req))
        assert (written.accepted, written.late) == (True, True)
        assert not store._buffer

    fast = _both(make, scenario)
    assert fast.paths == Counter(_claim_fast=1, _complete_carrying_missed=1, _complete_general=1)


class _NoText:
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    "bad",
    [
        AuditEvent(EventKind.REPLAYED, 5, "ns", None, detail={}),  # type: ignore[arg-type]
        AuditEvent("replayed", 5, "ns", "str-kind", detail={}),  # type: ignore[arg-type]
        AuditEvent(EventKind.REPLAYED, 5, "ns", "no-text", detail={"x": _NoText()}),
    ],
    ids=["no-subject", "str-kind", "detail-without-text"],
)
def test_an_event_no_write_can_encode_stays_buffered_with_the_rest(
    make: Made, bad: AuditEvent
) -> None:
    """A buffered event that cannot be encoded at all: the claim fails as on the general
    path, and no event is lost, the good ones included (the carrying statement gives the
    buffer back whatever it meets)."""
    for fast in (True, False):
        store = make(fast=fast)
        good = AuditEvent(EventKind.REPLAYED, 5, "ns", "good", detail={})
        store.record_event(good, buffered=True)
        store.record_event(bad, buffered=True)
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the encoder raises
            store.claim(_request("c1"))
        assert store._buffer.take() == [good, bad]


def test_a_lost_claim_writes_none_of_the_events_it_carried(make: Made) -> None:
    """The id is someone else's: the carrying claim is lost, writes nothing, and its
    events stay buffered, in order, for the next write, which writes them once."""
    store = make()
    theirs = _request("taken", execution_id="a" * 32, owner="someone")
    assert store.claim(theirs).won
    subjects = _on_shards(256, {shard_of("ns", "taken", 256)}, 2, "lost-")
    events = [
        AuditEvent(EventKind.REPLAYED, 5, "ns", s, detail={"n": n}) for n, s in enumerate(subjects)
    ]
    for event in events:
        store.record_event(event, buffered=True)
    lost = store.claim(_request("taken"))
    assert not lost.won
    assert lost.record.execution_id == "a" * 32
    assert store.paths["_claim_carrying"] == 1
    assert store._buffer.take() == events  # nothing written, nothing lost, same order
    assert [e.kind.value for e in store.events()] == ["claimed"]
    for event in events:
        store.record_event(event, buffered=True)
    assert store.claim(_request("next")).won  # the next write carries them
    assert [e.subject for e in store.events()] == ["taken", *subjects, "next"]
    _checked_chain(store)


def test_sixteen_threads_carry_each_others_buffered_events(make: Made) -> None:
    """Sixteen threads, each execution followed by a replay whose event is buffered: most
    claims carry events in their one statement while other writers move the same heads
    (PostgreSQL rechecks what such a statement read when a head it locks moved after its
    snapshot). Every event is written once and the chains verify."""
    store = make()
    guard = Guard(store, wait=10)
    runs: Counter[str] = Counter()
    lock = threading.Lock()

    def fn(ctx: ExecutionContext) -> str:
        with lock:
            runs[ctx.request_id] += 1
        return ctx.request_id

    def work(k: int) -> None:
        for i in range(40):
            rid = f"t{k}-{i}"
            assert not guard.execute(rid, "charge", {"i": i}, fn).replay
            assert guard.execute(rid, "charge", {"i": i}, fn).replay

    _threads(16, work)
    guard.close()
    assert len(runs) == 640
    assert set(runs.values()) == {1}
    assert store.paths["_claim_carrying"] > 0
    assert store.paths["_complete_carrying"] > 0
    kinds = Counter(e.kind.value for e in store.events())
    assert kinds == Counter(claimed=640, succeeded=640, replayed=640)
    _checked_chain(store)


def test_a_completion_that_settles_a_case_takes_the_general_path(make: Made) -> None:
    def scenario(store: Counted, clock: FakeClock) -> None:
        store.open_case("ns", "case-1", 0.9, 1)
        vote = Signal("model", "yes", 1.0)
        store.update_case(  # FINAL "yes", as a gate's signal makes it (audited)
            "ns",
            "case-1",
            lambda case, live: apply_signal(case, live, vote),
            signal=vote,
            actor="model",
            detail={"metadata": {}},
        )
        req = _request("case:case-1")
        store.claim(req)
        assert store.complete(_completion(req, settle_case="case-1")).accepted
        req2 = _request("not-final")
        store.claim(req2)  # settle_case on a non-terminal outcome: nothing to settle
        assert store.complete(
            _completion(req2, status=Status.RELEASED, settle_case="case-1")
        ).accepted

    fast = _both(make, scenario)
    assert fast.paths == Counter(_claim_fast=2, _complete_general=1, _complete_fast=1)
    settled = [e for e in fast.events() if e.kind is EventKind.STATE_CHANGE]
    assert settled[-1].detail == {"from": "FINAL", "to": "SETTLED", "outcome": "yes"}


def test_a_completion_that_does_not_name_its_attempt_completes_the_general_way(
    make: Made,
) -> None:
    """A completion claimed by another store (another host) takes the fast statement as
    well when it names its attempt; one that names none, or another attempt, does not: the
    fast statement's WHERE (action and execution id) refuses the second, and the general
    path writes both, with the record's own execution id in the events."""

    def scenario(store: Counted, clock: FakeClock) -> None:
        other = make(fast=store._fast_path, clock=clock, schema=store.schema)
        req = _request("elsewhere")
        other.claim(req)
        assert store.complete(_completion(req)).accepted  # named: fast, from any store
        req1 = _request("anonymous")
        store.claim(req1)
        assert store.complete(_completion(req1, action=None, execution_id=None)).accepted
        req2 = _request("forged")
        store.claim(req2)
        assert store.complete(_completion(req2, execution_id="someone-else")).accepted

    fast = _both(make, scenario)
    assert fast.paths["_complete_general"] == 2
    assert fast.paths["_complete_fast_missed"] == 1
    for subject in ("elsewhere", "anonymous", "forged"):
        assert [e.execution_id for e in fast.events(subject=subject)] == [
            _request(subject).execution_id
        ] * 2


def test_claim_durable_takes_the_fast_path_too(make: Made) -> None:
    def scenario(store: Counted, clock: FakeClock) -> None:
        for i in range(5):
            req = _request(f"cd-{i}")
            assert store.claim(req).won
            clock.advance(0.01)
            assert store.complete(_completion(req)).accepted

    fast = _both(make, scenario, durability="claim-durable")
    assert fast.paths == Counter(_claim_fast=5, _complete_fast=5)
    assert "synchronous_commit" in fast._complete_fast_sql


def test_a_failed_fast_claim_is_tried_once_more_and_fn_runs_once(make: Made) -> None:
    """The connection dies: the call goes through on a new connection; fn runs once."""
    store = make()
    guard = Guard(store, wait=0)
    guard.execute("warm", "a", {}, lambda _ctx: 1)
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"safeagent-{store.schema}",),
        )
    ran: list[int] = []
    outcomes = []
    for _ in range(3):
        try:
            guard.execute("r", "a", {}, lambda _ctx: ran.append(1))
            outcomes.append("ok")
            break
        except StoreError:
            outcomes.append("error")
    assert outcomes == ["ok"]
    assert ran == [1]
    guard.close()
    _checked_chain(store)


def _kill_connections(store: PostgresStore) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (f"safeagent-{store.schema}",),
        ).fetchone()
    assert killed is not None
    assert killed[0] == 1


def test_fast_statements_on_a_dead_connection_are_tried_once_more(make: Made) -> None:
    """The fast claim's and the fast completion's connection is dead: each is tried once
    more, on the general path and a new connection, and is written once
    (tests/test_pg_lost_connection.py has the rest)."""
    store = make()
    store.close()
    store = Counted(PG_URL, schema=store.schema, max_size=1, fast=True)
    try:
        req = _request("dead")
        _kill_connections(store)
        claimed = store.claim(req)
        assert claimed.won
        assert (claimed.record.attempt, claimed.record.fencing_token) == (1, 1)
        _kill_connections(store)
        done = store.complete(_completion(req))
        assert done.accepted
        assert not done.late
        assert done.record is not None
        assert done.record.status is Status.SUCCEEDED
        # the second tries took the general path (Counted counts a fast completion only
        # once it returned)
        assert store.paths == Counter(_claim_fast=1, _claim_general=1, _complete_general=1)
        assert [e.kind for e in store.events()] == [EventKind.CLAIMED, EventKind.SUCCEEDED]
        _checked_chain(store)
        # a first try that finds the same completion stored is refused, as ever: only a
        # second try after a lost connection recognises its own write
        assert store.complete(_completion(req)).accepted is False
        assert store.events()[-1].kind is EventKind.COMPLETION_REJECTED
    finally:
        store.drop_schema()
        store.close()


# -- the claim before the read (claim_new, the guard's first step here) -----------------------


def _until_waiting_on_a_lock(store: PostgresStore, failure: str) -> None:
    """Return once one of ``store``'s backends waits on a lock (about 5 s at most)."""
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        for _ in range(500):
            waiting = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event_type = 'Lock'",
                (f"safeagent-{store.schema}",),
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.01)
    raise AssertionError(failure)


def _trail_state(store: PostgresStore) -> tuple[Any, ...]:
    """How many audit events the database holds and its chain heads, read beside the store
    (its own reads of the trail write the buffered events first)."""
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        count = conn.execute(f"SELECT count(*) FROM {store.schema}.audit_events").fetchone()
        heads = conn.execute(f"SELECT * FROM {store.schema}.audit_chain ORDER BY shard")
        return count, heads.fetchall()


def _row_state(store: PostgresStore, rid: str) -> tuple[Any, ...]:
    """The row's system columns and values: xmin and xmax change when a statement writes
    or locks it (a lock by ON CONFLICT DO UPDATE, or FOR UPDATE, sets xmax)."""
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT xmin::text, xmax::text, e.* FROM {store.schema}.executions AS e"
            " WHERE namespace = 'ns' AND request_id = %s",
            (rid,),
        ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize(
    "status", [Status.SUCCEEDED, Status.FAILED, Status.RELEASED, Status.IN_DOUBT, None]
)
def test_claim_new_returns_the_record_there_and_changes_nothing(
    make: Made, status: Status | None
) -> None:
    """A request id with a record (PENDING when status is None): claim_new does not win,
    answers the record as get() reads it, and neither writes nor locks the row (xmin and
    xmax unchanged), writes no event and moves no chain head. A RELEASED record is
    answered too, not taken over: the guard decides, then claims it with claim()."""
    store = make()
    first = _request("r")
    assert store.claim(first).won
    if status is not None:
        assert store.complete(_completion(first, status=status, result_json=None)).accepted
    before, heads, events = _row_state(store, "r"), store.chain_heads(), store.events()
    other = _request("r", execution_id="e" * 32, owner="owner-2")
    found = store.claim_new(other)
    assert not found.won
    assert found.record == store.get("ns", "r")[0]
    assert found.record.execution_id == first.execution_id
    assert found.now_ms > 0
    assert _row_state(store, "r") == before
    assert before[1] == "0"  # never locked
    assert (store.chain_heads(), store.events()) == (heads, events)
    assert store.paths["_claim_new_fast"] == 1
    if status is Status.RELEASED:
        taken = store.claim(other)  # what the guard does next
        assert taken.won
        assert (taken.record.attempt, taken.record.fencing_token) == (2, 2)
    _checked_chain(store)


def test_claim_new_meets_a_row_committed_after_its_statement_began(make: Made) -> None:
    """Another transaction inserts the row and commits while claim_new's statement waits on
    it: the statement's snapshot cannot see the row it conflicted with, so the record is
    read by a statement of its own, and answered, not won."""
    store = make()
    reads: list[str] = []
    get = store.get

    def counting_get(namespace: str, request_id: str) -> Any:
        reads.append(request_id)
        return get(namespace, request_id)

    store.get = counting_get  # type: ignore[method-assign]
    theirs, mine = _request("race"), _request("race", execution_id="e" * 32, owner="owner-2")
    fragments = _claim_fragments(theirs, store.chain_shards)
    assert fragments is not None
    holder = psycopg.connect(PG_URL)  # a transaction: its claim is not committed yet
    try:
        row = holder.execute(
            store._sql["CLAIM_FAST"], (*store._claim_params(theirs), *fragments)
        ).fetchone()
        assert row is not None
        result: list[ClaimResult] = []
        waiter = threading.Thread(target=lambda: result.append(store.claim_new(mine)))
        waiter.start()
        _until_waiting_on_a_lock(store, "claim_new never waited for the other insert")
        holder.commit()
        waiter.join(30)
    finally:
        holder.close()
    assert len(result) == 1
    assert not result[0].won
    assert result[0].record.execution_id == theirs.execution_id
    assert reads == ["race"]  # the read of its own
    assert [e.execution_id for e in store.events()] == [theirs.execution_id]
    _checked_chain(store)


def test_claim_new_carries_buffered_events_only_when_it_wins(make: Made) -> None:
    """Buffered events wait: claim_new carries them in its one statement
    (CLAIM_NEW_FAST_CARRYING) when it wins, the trail the general path's, byte for byte;
    when the id has a record it writes nothing, locks nothing, and the events stay
    buffered, in order, for the next write."""
    chains = 256
    assert shard_of("ns", "x", chains) not in {shard_of("ns", r, chains) for r in ("a", "b")}

    def scenario(store: Counted, clock: FakeClock) -> None:
        replay = AuditEvent(EventKind.REPLAYED, clock(), "ns", "x", detail={"n": 1})
        store.record_event(replay, buffered=True)
        claimed = store.claim_new(_request("a"))
        assert claimed.won
        assert not store._buffer  # written with the claim
        clock.advance(0.001)
        again = replace(replay, at_ms=clock(), detail={"n": 2})
        store.record_event(again, buffered=True)
        before = _row_state(store, "a"), _trail_state(store)
        found = store.claim_new(_request("a", execution_id="e" * 32))
        assert not found.won
        assert found.record.execution_id == claimed.record.execution_id
        # nothing written, nothing locked, the event still buffered
        assert (_row_state(store, "a"), _trail_state(store)) == before
        assert store._buffer.take() == [again]
        store.record_event(again, buffered=True)
        assert store.claim_new(_request("b")).won  # the next write carries it

    fast = _both(make, scenario)
    assert fast.paths == Counter(_claim_new_carrying=3)
    subjects = [(e.kind.value, e.subject) for e in fast.events()]
    assert subjects == [
        ("replayed", "x"),
        ("claimed", "a"),
        ("replayed", "x"),
        ("claimed", "b"),
    ]
    _checked_chain(fast)


def test_claim_new_where_its_one_statement_is_not_used(make: Made) -> None:
    """Buffered events it cannot carry (two on one chain), or the general path only:
    claim_new reads, then claims when there is no record (carrying the buffered events),
    and answers the record when there is one."""
    store = make()
    for _ in range(2):
        store.record_event(AuditEvent(EventKind.REPLAYED, 1, "ns", "x", detail={}), buffered=True)
    claimed = store.claim_new(_request("a"))
    assert claimed.won
    assert store.paths == Counter(
        _claim_new_carrying_missed=1, _claim_carrying_missed=1, _claim_general=1
    )
    assert not store._buffer  # written with the claim
    found = store.claim_new(_request("a", execution_id="e" * 32))
    assert not found.won
    assert found.record.execution_id == claimed.record.execution_id
    assert store.paths["_claim_new_fast"] == 1
    slow = make(fast=False)
    assert slow.claim_new(_request("b")).won
    assert not slow.claim_new(_request("b", execution_id="e" * 32)).won
    assert slow.paths == Counter(_claim_general=1)
    assert [e.kind for e in store.events()] == [EventKind.REPLAYED] * 2 + [EventKind.CLAIMED]
    _checked_chain(store)
    _checked_chain(slow)


def test_a_replay_waits_no_longer_than_the_lock_timeout_on_a_row_being_changed(
    make: Made,
) -> None:
    """A transaction is changing the record's row and stays open (as a long purge does):
    ON CONFLICT DO NOTHING would wait for it to end, a read never does. The replay gives
    up waiting after CLAIM_NEW_LOCK_TIMEOUT, reads the committed record and replays it;
    a first execution on another id is not held up."""
    store = make()
    guard = Guard(store, wait=0)
    runs: Counter[str] = Counter()
    fn = _counting(runs)
    guard.execute("busy", "a", {"k": 1}, fn)
    store.flush_events()
    holder = psycopg.connect(PG_URL)
    try:
        holder.execute(
            f"UPDATE {store.schema}.executions SET updated_at_ms = updated_at_ms + 1"
            " WHERE request_id = 'busy'"
        )
        answers: list[Any] = []
        caller = threading.Thread(
            target=lambda: answers.extend(
                [guard.execute("busy", "a", {"k": 1}, fn), guard.execute("other", "a", {}, fn)]
            )
        )
        caller.start()
        caller.join(10)  # the timeout (0.1 s) and a read, not the holder's whole transaction
        assert not caller.is_alive(), "the replay waited for the transaction holding its row"
    finally:
        holder.rollback()
        holder.close()
    replay, fresh = answers
    assert (replay.replay, replay.result) == (True, "busy")
    assert fresh.replay is False
    assert runs == Counter(busy=1, other=1)
    # the first execution's and the replay's, which timed out; the replay then read, and
    # its buffered event sent the next call the general way (_read_then_claim)
    assert store.paths["_claim_new_fast"] == 2
    _checked_chain(store)


def test_a_database_turned_read_only_still_replays(pg_throwaway_database_url: str) -> None:
    """The database turns read-only after the store opened (a full disk, a failover onto
    a standby): claim_new's statement is refused, so it reads instead; a replay answers,
    and a new call fails closed before fn runs."""
    url = pg_throwaway_database_url
    name = url.rsplit("/", 1)[1]
    store = Counted(url, schema="ro", fast=True, max_size=2)
    try:
        guard = Guard(store, wait=0)
        runs: Counter[str] = Counter()
        fn = _counting(runs)
        guard.execute("paid", "a", {"amount": 5}, fn)
        store.flush_events()
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        replay = None
        for _ in range(3):  # the first call after the kill may meet a dead connection
            try:
                replay = guard.execute("paid", "a", {"amount": 5}, fn)
                break
            except StoreError:
                continue
        assert replay is not None
        assert (replay.replay, replay.result) == (True, "paid")
        assert store.paths["_claim_new_fast"] >= 2  # refused on the read-only database
        with pytest.raises(StoreError):
            guard.execute("new", "a", {"amount": 6}, fn)
        assert runs == Counter(paid=1)
    finally:
        store._buffer.take()  # the replayed events cannot be written to this database
        store.close()


def test_a_payload_over_the_limit_is_read_first(make: Made) -> None:
    """Over CLAIM_FIRST_MAX_PAYLOAD characters of payload the guard reads first, so a
    replay does not send the payload again: the first execution is the read, CLAIM_FAST
    and the completion, the replay a read alone; under the limit, claim_new."""
    store = make()
    guard = Guard(store, wait=0)
    big = {"memo": "x" * (CLAIM_FIRST_MAX_PAYLOAD + 1)}
    assert not guard.execute("big", "a", big, lambda _ctx: 1).replay
    assert guard.execute("big", "a", big, lambda _ctx: 1).replay
    assert store.paths == Counter(_claim_fast=1, _complete_fast=1)
    store.flush_events()
    accented = {"memo": "\u00e9" * (CLAIM_FIRST_MAX_PAYLOAD // 6)}  # each counts six
    assert not guard.execute("accented", "a", accented, lambda _ctx: 1).replay
    assert guard.execute("accented", "a", accented, lambda _ctx: 1).replay
    assert store.paths == Counter(_claim_fast=2, _complete_fast=2)
    store.flush_events()
    small = {"memo": "x" * 100, "name": "\u00e9" * 100}
    assert not guard.execute("small", "a", small, lambda _ctx: 1).replay
    assert guard.execute("small", "a", small, lambda _ctx: 1).replay
    assert store.paths == Counter(_claim_fast=2, _claim_new_fast=2, _complete_fast=3)
    guard.close()


@pytest.mark.parametrize(
    ("session", "statement"), [("0", "100ms"), ("5s", "100ms"), ("50ms", "50ms"), ("1ms", "1ms")]
)
def test_claim_new_waits_no_longer_than_the_sessions_lock_timeout(
    make: Made, session: str, statement: str
) -> None:
    """CLAIM_NEW_FAST's lock_timeout is CLAIM_NEW_LOCK_TIMEOUT, or the session's own when
    that is shorter (0 means none), for its own transaction only."""
    store = make()
    wait = store._sql["CLAIM_NEW_FAST"].split("won AS", 1)[0].rstrip().rstrip(",")  # n alone
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"SET lock_timeout = '{session}'")
        row = conn.execute(wait + "SELECT current_setting('lock_timeout') FROM n", (None,))
        assert row.fetchone() == (statement,)
        assert conn.execute("SHOW lock_timeout").fetchone() == (session,)


def test_a_replay_under_a_short_statement_timeout_reads_instead(make: Made) -> None:
    """The session's statement_timeout (50 ms) cancels claim_new's statement while it
    waits on a transaction changing the row: nothing was written, so it reads instead,
    and the replay answers. The timeout is set on the pool's connections once the store
    is open: opening under 50 ms could itself be cancelled on a loaded machine."""
    store = make()
    guard = Guard(store, wait=0)
    runs: Counter[str] = Counter()
    guard.execute("busy", "a", {"k": 1}, _counting(runs))
    guard.close()
    short = Counted(PG_URL, schema=store.schema, fast=True, min_size=2, max_size=2)
    pool = short._get_pool()
    pool.wait()
    with pool.connection() as first, pool.connection() as second:
        for conn in (first, second):
            conn.execute("SET statement_timeout = 50")
            assert conn.execute("SHOW statement_timeout").fetchone() == ("50ms",)
    holder = psycopg.connect(PG_URL)
    try:
        holder.execute(
            f"UPDATE {store.schema}.executions SET updated_at_ms = updated_at_ms + 1"
            " WHERE request_id = 'busy'"
        )
        replay = Guard(short, wait=0).execute("busy", "a", {"k": 1}, _counting(runs))
    finally:
        holder.rollback()
        holder.close()
        short._buffer.take()
        short.close()
    assert (replay.replay, replay.result) == (True, "busy")
    assert short.paths == Counter(_claim_new_fast=1)
    assert runs == Counter(busy=1)


def test_the_guard_reads_first_while_first_steps_mostly_find_a_record(make: Made) -> None:
    """claim_first follows the share of the recent calls' first steps (claim_new's
    answers, and look's when a call read first) that found a record: after a run of
    replays the guard reads first (a replay through claim_new costs about twice a read's
    CPU), and after a run of first executions it claims first again. Other reads (receipt
    look-ups, a waiting caller's polls) do not count."""
    store = make()
    guard = Guard(store, wait=0)
    guard.execute("a", "x", {}, lambda _ctx: 1)
    for _ in range(50):
        assert guard.get("a") is not None  # reads: not counted
    assert store.claim_first
    for _ in range(40):
        assert guard.execute("a", "x", {}, lambda _ctx: 1).replay
        store.flush_events()  # (buffered events alone also send the guard the read's way)
    assert store._found >= CLAIM_FIRST_FOUND_SHARE
    assert not store.claim_first
    before = store.paths.copy()
    guard.execute("b", "x", {}, lambda _ctx: 1)
    assert store.paths - before == Counter(_claim_fast=1, _complete_fast=1)  # read, claim
    for i in range(60):
        guard.execute(f"n{i}", "x", {}, lambda _ctx: 1)  # each read first misses
    assert store.claim_first
    before = store.paths.copy()
    guard.execute("c", "x", {}, lambda _ctx: 1)
    assert store.paths - before == Counter(_claim_new_fast=1, _complete_fast=1)
    guard.close()


def test_claim_new_from_sixteen_threads_on_shared_ids(make: Made) -> None:
    """Sixteen threads call claim_new on the same 60 ids in their own orders: one wins
    each id, every other call answers the winner's record, one claimed event per id."""
    store = make()
    ids = [f"s-{i}" for i in range(60)]
    won: Counter[str] = Counter()
    winners: dict[str, str] = {}
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        order = ids[:]
        random.Random(k).shuffle(order)
        for rid in order:
            req = _request(rid, execution_id=f"{k:02d}" + "0" * 30, owner=f"owner-{k}")
            result = store.claim_new(req)
            with lock:
                if result.won:
                    won[rid] += 1
                    winners[rid] = result.record.execution_id
                else:
                    seen.append((rid, result.record.execution_id))

    _threads(16, work)
    assert won == Counter(dict.fromkeys(ids, 1))
    assert all(winners[rid] == execution_id for rid, execution_id in seen)
    assert len(seen) == 15 * len(ids)
    claimed = Counter(e.subject for e in store.events() if e.kind is EventKind.CLAIMED)
    assert claimed == Counter(dict.fromkeys(ids, 1))
    _checked_chain(store)


# -- concurrency ------------------------------------------------------------------------------


def _threads(n: int, work: Callable[[int], None], timeout: float = 120) -> None:
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker is stuck (deadlock?)"
    assert errors == []


def _trail_per_id(store: PostgresStore, ids: list[str]) -> None:
    kinds: dict[str, Counter[EventKind]] = {rid: Counter() for rid in ids}
    for event in store.events():
        if event.subject in kinds:
            kinds[event.subject][event.kind] += 1
    for rid in ids:
        assert kinds[rid][EventKind.CLAIMED] == 1, rid
        assert kinds[rid][EventKind.SUCCEEDED] == 1, rid


def _counting(runs: Counter[str]) -> Callable[[ExecutionContext], str]:
    """A side effect that counts its runs per request id (thread-safe)."""
    lock = threading.Lock()

    def fn(ctx: ExecutionContext) -> str:
        with lock:
            runs[ctx.request_id] += 1
        return ctx.request_id

    return fn


def test_sixteen_threads_on_distinct_ids(make: Made) -> None:
    store = make()
    guard = Guard(store, wait=0)
    runs: Counter[str] = Counter()
    fn = _counting(runs)

    def work(k: int) -> None:
        for i in range(40):
            guard.execute(f"d-{k}-{i}", "a", {"k": k, "i": i}, fn)

    _threads(16, work)
    ids = [f"d-{k}-{i}" for k in range(16) for i in range(40)]
    assert runs == Counter(dict.fromkeys(ids, 1))
    assert store.paths == Counter(_claim_new_fast=len(ids), _complete_fast=len(ids))
    _trail_per_id(store, ids)
    assert len(_checked_chain(store)) == 2 * len(ids)
    guard.close()


def test_eight_threads_on_shared_ids_across_two_stores(make: Made) -> None:
    """Eight threads, half on each of two stores (two pools: two hosts), all race over the
    same ids in their own orders: one run per id, waiting callers get the receipt."""
    first = make()
    second = make(schema=first.schema)
    guards = [Guard(first, wait=60), Guard(second, wait=60)]
    ids = [f"s-{i}" for i in range(120)]
    runs: Counter[str] = Counter()
    fn = _counting(runs)

    def work(k: int) -> None:
        order = ids[:]
        random.Random(k).shuffle(order)
        for rid in order:
            assert guards[k % 2].execute(rid, "a", {"rid": rid}, fn).result == rid

    _threads(8, work)
    assert runs == Counter(dict.fromkeys(ids, 1))
    _trail_per_id(first, ids)
    _checked_chain(first)
    for g in guards:
        g.close()


def test_many_writers_on_one_chain_head(make: Made) -> None:
    """Every id on one shard: sixteen threads contend for one chain head, each fast
    statement locking it after its row and moving it in the same statement (a head moved
    by a transaction that committed after the statement's snapshot included), mixed with
    general-path writers (buffered events) locking the same head: the chain stays whole."""
    store = make()
    chains = store.chain_shards
    on_3 = (
        rid for rid in (f"h-{i}" for i in itertools.count()) if shard_of("ns", rid, chains) == 3
    )
    ids = list(itertools.islice(on_3, 320))

    def work(k: int) -> None:
        for i, rid in enumerate(ids[k::16]):
            if i % 5 == 4:
                event = AuditEvent(EventKind.REPLAYED, 1, "ns", rid, detail={"k": k})
                store.record_event(event, buffered=True)
            req = _request(rid)
            assert store.claim(req).won
            assert store.complete(_completion(req)).accepted

    _threads(16, work)
    store.flush_events()
    rows = _checked_chain(store)
    assert {int(r[1]) for r in rows} == {3}
    assert len(rows) == 2 * len(ids) + sum(len(ids[k::16]) // 5 for k in range(16))
    assert store.paths["_claim_fast"] > len(ids) // 2
    assert store.paths["_claim_general"] + store.paths["_complete_general"] > 0


@pytest.mark.parametrize("op", ["claim", "claim_new", "complete"])
def test_a_head_moved_after_the_statement_began_is_chained_onto(make: Made, op: str) -> None:
    """A general-path writer holds a chain head and moves it; a fast claim (or completion)
    on that chain waits for the head in its statement, whose snapshot predates the move.
    When the writer commits, the fast statement chains onto the NEW head and moves it in
    turn (its UPDATE follows the row to the version its lock returned)."""
    store = make()
    rids = [
        r for r in (f"w-{i}" for i in range(5000)) if shard_of("ns", r, store.chain_shards) == 5
    ][:2]
    store.claim(_request(rids[0]))  # seq 1 on chain 5
    if op == "complete":
        store.claim(_request(rids[1]))  # seq 2

    def fast() -> bool:
        if op != "complete":
            return bool(getattr(store, op)(_request(rids[1])).won)
        return store.complete(_completion(_request(rids[1]))).accepted

    base = 1 if op != "complete" else 2
    holder = psycopg.connect(PG_URL)  # a transaction, as the general path's
    try:
        heads = {
            r[0]: (r[1], r[2])
            for r in holder.execute(
                store._sql["LOCK_HEADS"].replace("%s::int[]", "'{5}'::int[]")
            ).fetchall()
        }
        assert heads[5][0] == base
        event = AuditEvent(EventKind.REPLAYED, 42, "ns", rids[0], detail={"held": True})
        (row,) = chain_rows([event], heads, [5])
        holder.execute(store._sql["EVENT"], row)  # not committed yet
        result: list[Any] = []
        waiter = threading.Thread(target=lambda: result.append(fast()))
        waiter.start()
        _until_waiting_on_a_lock(store, "the fast claim never waited for the head")
        holder.commit()
        waiter.join(30)
        assert result == [True]
    finally:
        holder.close()
    assert store.paths["_claim_general"] + store.paths["_complete_general"] == 0
    assert store.paths["_claim_new_fast"] == (op == "claim_new")
    rows = _checked_chain(store)
    kinds = (
        ["claimed", "replayed", "claimed"]
        if op != "complete"
        else ["claimed"] * 2
        + [
            "replayed",
            "succeeded",
        ]
    )
    assert [(int(r[2]), r[6]) for r in rows] == list(enumerate(kinds, 1))
    assert store.chain_heads()[5][0] == len(kinds)
