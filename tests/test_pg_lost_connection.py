"""PostgreSQL store: a call whose connection turns out dead goes through on a new one.

After a server restart, a failover, a terminated backend or a proxy that drops idle
connections, every pooled connection is dead. A call that meets one drains the pool and,
where a second try is provably safe (reads, claims, completions, opening a case), tries
once more on a connection the pool has just opened; a claim or a completion whose commit
landed but whose reply was lost recognises its own write. Everything else, and a second
loss, fails closed with StoreError.

Connections die for real here: backends are terminated with pg_terminate_backend, and a
TCP proxy between the store and the server (tests/_pg_proxy.py) drops a request before the
server sees it, or drops the reply after the server has committed. The server is never
restarted (other work shares it) and nothing in the store is mocked or hooked.
"""

from __future__ import annotations

import _thread
import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from safeagent import (
    AsyncGuard,
    EventKind,
    FingerprintMismatchError,
    Guard,
    NotExecuted,
    OutcomeUnknownError,
    StoreError,
)
from safeagent._audit import AuditEvent
from safeagent._keys import downstream_key
from safeagent._receipt import ErrorInfo, Record, Status
from safeagent.audit import verify
from safeagent.stores._base import ClaimRequest, Completion, Resolution
from safeagent.stores._pg_claim import _claimed_by
from safeagent.stores._pg_complete import _carries, _released_then_claimed
from safeagent.stores._pg_conn import _PIPELINE
from safeagent.stores._pg_events import _completion_witness
from safeagent.stores._rows import shard_of
from safeagent.stores.postgres import PostgresStore
from tests._pg_proxy import PgProxy
from tests.conftest import PG_URL, START_MS, FakeClock, Ledger, pg_schema

pytestmark = [pytest.mark.usefixtures("postgres_available"), pytest.mark.timeout(120)]

POOL = 4


@pytest.fixture
def schema() -> Iterator[str]:
    name = pg_schema()
    yield name
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    p = PgProxy(PG_URL)
    yield p
    p.close()


@pytest.fixture
def stores() -> Iterator[list[PostgresStore]]:
    """Stores to close at teardown (their schema is dropped by ``schema``)."""
    made: list[PostgresStore] = []
    yield made
    for store in made:
        store.close()


def _backends(schema: str) -> set[int]:
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"safeagent-{schema}",),
        ).fetchall()
    return {int(r[0]) for r in rows}


def _terminate_all(schema: str) -> set[int]:
    """Terminate every backend of the store on ``schema`` (waiting until each is gone)."""
    pids = _backends(schema)
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    return pids


def _full_pool(store: PostgresStore) -> set[int]:
    """Fill the pool (POOL connections) and return their backend pids."""
    store._get_pool().wait(timeout=10)
    pids = _backends(store.schema)
    assert len(pids) == POOL
    return pids


def _stat(store: PostgresStore, name: str) -> int:
    return int(store._get_pool().get_stats().get(name, 0))


def _marker(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex}"


def _kinds(store: PostgresStore, rid: str) -> list[EventKind]:
    return [e.kind for e in store.events(subject=rid)]


def _effect(ledger: Ledger, key: str, value: Any = "done") -> Any:
    def fn(_ctx: Any) -> Any:
        ledger.append(key)
        return value

    return fn


# -- every pooled connection dead --------------------------------------------------------------


@pytest.mark.parametrize("drain", ["drain", "check"])
def test_every_pooled_connection_dead_the_next_calls_all_succeed_once(
    schema: str, stores: list[PostgresStore], ledger: Ledger, drain: str
) -> None:
    """All POOL backends terminated: the next 2 x POOL guarded calls (new ids and replays)
    all succeed, each side effect ran exactly once, and the dead connections were met and
    replaced. ``check``: psycopg_pool before 3.3 (no drain()), where the pool's check()
    discards the dead connections instead."""
    store = PostgresStore(PG_URL, schema=schema, min_size=POOL, max_size=POOL)
    stores.append(store)
    if drain == "check":
        store._get_pool().drain = None  # type: ignore[assignment, method-assign]
    guard = Guard(store, wait=0, owner="owner-1")
    for k in range(POOL):
        guard.execute(f"warm-{k}", "charge", {"k": k}, _effect(ledger, f"warm-{k}"))
    before = _full_pool(store)
    assert _terminate_all(schema) == before

    receipts = []
    for k in range(2 * POOL):
        if k % 2:  # a replay: a read only
            key = f"warm-{k // 2}"
            receipts.append(guard.execute(key, "charge", {"k": k // 2}, _effect(ledger, key)))
        else:
            receipts.append(guard.execute(f"r-{k}", "charge", {"k": k}, _effect(ledger, f"r-{k}")))

    assert [r.result for r in receipts] == ["done"] * (2 * POOL)
    assert [r.replay for r in receipts] == [k % 2 == 1 for k in range(2 * POOL)]
    for k in range(2 * POOL):
        key = f"warm-{k // 2}" if k % 2 else f"r-{k}"
        assert ledger.count(key) == 1, key
    assert _stat(store, "returns_bad") + _stat(store, "connections_lost") >= 1  # met one
    assert not (_backends(schema) & before)  # every connection now is a new one
    guard.close()
    assert verify(store).ok


def test_concurrent_callers_on_a_dead_pool_each_run_once(
    schema: str, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """2 x POOL threads start together on a pool whose every backend was terminated, three
    new ids each: every call succeeds and every side effect ran exactly once."""
    store = PostgresStore(PG_URL, schema=schema, min_size=POOL, max_size=POOL, timeout=10)
    stores.append(store)
    guard = Guard(store, wait=5, owner="owner-1")
    guard.execute("warm", "charge", {}, _effect(ledger, "warm"))
    before = _full_pool(store)
    _terminate_all(schema)
    start = threading.Barrier(2 * POOL)
    errors: list[BaseException] = []
    results: list[Any] = []

    def work(t: int) -> None:
        try:
            start.wait()
            for k in range(3):
                key = f"t{t}-{k}"
                results.append(guard.execute(key, "charge", {}, _effect(ledger, key)).result)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2 * POOL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert results == ["done"] * (2 * POOL * 3)
    assert ledger.count() == 1 + 2 * POOL * 3
    assert sorted(k for k, _ in ledger.rows()) == sorted(
        ["warm"] + [f"t{t}-{k}" for t in range(2 * POOL) for k in range(3)]
    )
    assert not (_backends(schema) & before)
    guard.close()
    assert verify(store).ok


def test_async_callers_on_a_dead_pool_each_run_once(
    schema: str, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """AsyncGuard (store calls in worker threads): 2 x POOL calls gathered at once on a pool
    whose every backend was terminated all succeed, each side effect once."""
    store = PostgresStore(PG_URL, schema=schema, min_size=POOL, max_size=POOL, timeout=10)
    stores.append(store)

    async def main() -> list[Any]:
        guard = AsyncGuard(store, wait=5, owner="owner-1")
        await guard.execute("warm", "charge", {}, _effect(ledger, "warm"))
        _full_pool(store)
        _terminate_all(schema)
        calls = [
            guard.execute(f"a-{k}", "charge", {}, _effect(ledger, f"a-{k}"))
            for k in range(2 * POOL)
        ]
        out = [r.result for r in await asyncio.gather(*calls)]
        await guard.aclose()
        return out

    assert asyncio.run(main()) == ["done"] * (2 * POOL)
    for k in range(2 * POOL):
        assert ledger.count(f"a-{k}") == 1


# -- a claim or a completion committed, its reply lost -----------------------------------------


def _via_proxy(proxy: PgProxy, schema: str, **kwargs: Any) -> PostgresStore:
    return PostgresStore(proxy.url, schema=schema, **{"max_size": 2, "timeout": 3.0, **kwargs})


def _prepare(store: PostgresStore, guard: Guard, ledger: Ledger, path: str) -> None:
    """``general``: the store takes only the general path; ``buffered``: a replay's audit
    event waits in the buffer, so the next claim carries it in its one statement
    (CLAIM_NEW_FAST_CARRYING; ``buffered_read_first``: after a read, CLAIM_FAST_CARRYING),
    and ``buffered_general`` in the general path's transaction (it must be written exactly
    once either way)."""
    guard.execute("warm", "charge", {}, _effect(ledger, "warm"))
    if path in ("general", "buffered_general"):
        store._fast_path = False
    if path.startswith("buffered"):
        _replay_warm(store, guard, ledger)
        # the carrying statement takes events on chains other than the claim's ("r")
        assert shard_of("default", "warm", store.chain_shards) != shard_of(
            "default", "r", store.chain_shards
        )
    if path == "buffered_read_first":
        store._found = 1.0  # as if most first steps found a record: the guard reads first


def _replay_warm(store: PostgresStore, guard: Guard, ledger: Ledger) -> None:
    assert guard.execute("warm", "charge", {}, _effect(ledger, "warm")).replay
    assert store._buffer  # the replayed event is buffered


def _check_buffered(store: PostgresStore, path: str) -> None:
    store.flush_events()
    replayed = [e.kind for e in store.events(subject="warm")].count(EventKind.REPLAYED)
    assert replayed == (1 if path.startswith("buffered") else 0)


# How the reply of a committed write is lost: the connection dies before it arrives, or
# the server answers FATAL 57P01 (as pg_terminate_backend does) instead of ReadyForQuery,
# which on the pipelined path surfaces on a connection not yet marked broken.
LOSSES = pytest.mark.parametrize("loss", ["lose_reply", "fatal_reply"])


@LOSSES
@pytest.mark.parametrize(
    "path", ["fast", "general", "buffered", "buffered_read_first", "buffered_general"]
)
def test_a_claim_committed_whose_reply_was_lost_is_won(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger, path: str, loss: str
) -> None:
    """The claim commits and its reply is lost (see LOSSES): the loss is recognised, the
    second try finds the record PENDING under its own execution id and owner, reports the
    claim won, fn runs exactly once, and the trail has one claimed event (and the buffered
    events the lost try carried, once)."""
    assert _PIPELINE  # the general path is pipelined
    store = _via_proxy(proxy, schema)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")
    _prepare(store, guard, ledger, path)
    marker = _marker("lose-claim-reply")
    getattr(proxy, loss)(marker)  # the payload travels in the claim statement only

    receipt = guard.execute("r", "charge", {"m": marker}, _effect(ledger, "r"))

    assert proxy.lost == 1
    assert proxy.attempts(marker) >= 2  # the claim was sent again
    assert (receipt.result, receipt.replay) == ("done", False)
    assert ledger.count("r") == 1
    record = store.get("default", "r")[0]
    assert record is not None
    assert (record.status, record.attempt, record.fencing_token) == (Status.SUCCEEDED, 1, 1)
    assert record.execution_id == receipt.execution_id
    assert _kinds(store, "r") == [EventKind.CLAIMED, EventKind.SUCCEEDED]
    _check_buffered(store, path)
    guard.close()
    assert verify(store).ok


@LOSSES
@pytest.mark.parametrize("path", ["fast", "general", "buffered", "buffered_general"])
def test_a_completion_committed_whose_reply_was_lost_is_accepted(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger, path: str, loss: str
) -> None:
    """The completion commits and its reply is lost (see LOSSES): fencing refuses the
    second try, which finds exactly its own write stored and reports it accepted; no
    rejection is audited, the outcome is stored once, fn ran once. (``buffered``: fn
    replays another id, so the completion carries its buffered event in its one
    statement; ``buffered_general``: in the general path's transaction.)"""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")
    _prepare(
        store, guard, ledger, {"buffered": "fast", "buffered_general": "general"}.get(path, path)
    )
    marker = _marker("lose-completion-reply")
    getattr(proxy, loss)(marker)  # the result travels in the completion statement only

    def fn(_ctx: Any) -> Any:
        ledger.append("r")
        if path.startswith("buffered"):
            _replay_warm(store, guard, ledger)
        return {"m": marker}

    receipt = guard.execute("r", "charge", {}, fn)

    assert proxy.lost == 1
    assert proxy.attempts(marker) >= 2
    assert (receipt.result, receipt.replay) == ({"m": marker}, False)
    assert ledger.count("r") == 1
    record = store.get("default", "r")[0]
    assert record is not None
    assert (record.status, record.fencing_token) == (Status.SUCCEEDED, 1)
    assert _kinds(store, "r") == [EventKind.CLAIMED, EventKind.SUCCEEDED]
    assert guard.execute("r", "charge", {}, _effect(ledger, "r")).result == {"m": marker}
    assert ledger.count("r") == 1
    _check_buffered(store, path)
    guard.close()
    assert verify(store).ok


def test_a_late_completion_committed_whose_reply_was_lost_is_accepted_as_late(
    schema: str, proxy: PgProxy, stores: list[PostgresStore]
) -> None:
    """A completion after its lease expired (nobody took over) commits with its late
    event, and its reply is lost: the second try reports it accepted and late, as the
    first would have, and writes nothing again."""
    clock = FakeClock()
    store = _via_proxy(proxy, schema, clock=clock)
    stores.append(store)
    request = ClaimRequest(
        namespace="ns",
        request_id="late",
        action="charge",
        fingerprint="f" * 64,
        payload_json="{}",
        execution_id=uuid.uuid4().hex,
        owner="owner-1",
        lease_ms=30_000,
        downstream_key=downstream_key("ns", "charge", "late"),
    )
    claimed = store.claim(request)
    assert claimed.won
    clock.advance(31)
    marker = _marker("lose-late-reply")
    proxy.lose_reply(marker)
    written = store.complete(
        Completion(
            namespace="ns",
            request_id="late",
            fencing_token=1,
            status=Status.SUCCEEDED,
            result_json=f'"{marker}"',
            error=None,
            actor="owner-1",
            action="charge",
            execution_id=request.execution_id,
        )
    )
    assert proxy.lost == 1
    assert (written.accepted, written.late) == (True, True)
    assert written.record is not None
    assert written.record.result_json == f'"{marker}"'
    kinds = _kinds(store, "late")
    assert kinds.count(EventKind.LATE_COMPLETION) == 1
    assert kinds.count(EventKind.SUCCEEDED) == 1
    assert EventKind.COMPLETION_REJECTED not in kinds
    assert verify(store).ok


@pytest.mark.parametrize("what", ["claim", "completion"])
def test_a_request_lost_before_the_server_saw_it_is_sent_again(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger, what: str
) -> None:
    """The connection dies before the claim or the completion reached the server: the
    second try makes it, once."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")
    marker = _marker(f"lose-{what}-request")
    proxy.lose_request(marker)
    payload = {"m": marker} if what == "claim" else {}
    result = {"m": marker} if what == "completion" else "done"

    receipt = guard.execute("r", "charge", payload, _effect(ledger, "r", result))

    assert proxy.lost == 1
    assert proxy.attempts(marker) >= 2  # (the second try's claim event carries it too)
    assert receipt.result == result
    assert ledger.count("r") == 1
    assert _kinds(store, "r") == [EventKind.CLAIMED, EventKind.SUCCEEDED]
    assert verify(store).ok


def test_a_claim_whose_lease_expired_before_the_second_try_is_not_won(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """The claim commits, its reply is lost, and by the second try its lease has expired
    (the store's clock jumps past it): anyone may take the record over now, so it is not
    reported won. fn does not run; the call ends as for any claim in doubt."""
    lease_ms = 30_000

    def clock() -> int:  # jumps past the lease once the reply is lost
        return START_MS + (lease_ms + 1 if proxy.lost else 0)

    store = _via_proxy(proxy, schema, clock=clock)
    stores.append(store)
    guard = Guard(store, lease=lease_ms / 1000, wait=0, owner="owner-1")
    marker = _marker("lose-claim-reply")
    proxy.lose_reply(marker)
    with pytest.raises(OutcomeUnknownError):
        guard.execute("r", "charge", {"m": marker}, _effect(ledger, "r"))
    assert proxy.lost == 1
    assert ledger.count("r") == 0
    record = store.get("default", "r")[0]
    assert record is not None
    assert (record.status, record.attempt, record.fencing_token) == (Status.PENDING, 1, 1)
    assert _kinds(store, "r").count(EventKind.CLAIMED) == 1


# -- what is not tried again ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("lock_timeout", psycopg.errors.LockNotAvailable),
        ("statement_timeout", psycopg.errors.QueryCanceled),
    ],
)
def test_a_read_that_times_out_is_not_tried_again(
    schema: str,
    proxy: PgProxy,
    stores: list[PostgresStore],
    setting: str,
    error: type[Exception],
) -> None:
    """A lock or statement timeout is an OperationalError that leaves the connection open:
    the read fails with StoreError after ONE try, and the connection stays in the pool."""
    url = proxy.url + f"&options=-c%20{setting}%3D300"
    store = PostgresStore(url, schema=schema, max_size=1)
    stores.append(store)
    rid = _marker("read-timeout")
    proxy.watch(rid)
    with psycopg.connect(PG_URL) as admin:
        admin.execute(f"LOCK TABLE {schema}.executions IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreError) as info:
            store.get("default", rid)
        admin.rollback()
    assert isinstance(info.value.__cause__, error)
    assert getattr(info.value, "connection_lost", False) is False
    assert proxy.attempts(rid) == 1
    assert _stat(store, "returns_bad") == 0
    assert store.get("default", rid)[0] is None  # same connection, fine


def test_a_claim_that_times_out_on_a_lock_is_not_tried_again(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """A claim waiting on a row another transaction holds past lock_timeout: StoreError
    after one try, fn not run; once the lock is gone, the next call runs fn once."""
    store = PostgresStore(proxy.url + "&options=-c%20lock_timeout%3D300", schema=schema, max_size=1)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")

    def not_now(_ctx: Any) -> None:
        raise NotExecuted

    with pytest.raises(NotExecuted):
        guard.execute("r", "charge", {}, not_now)  # RELEASED: the next call claims it again
    marker = _marker("claim-lock-timeout")
    proxy.watch(marker)
    with psycopg.connect(PG_URL) as admin:
        admin.execute(
            f"SELECT 1 FROM {schema}.executions WHERE request_id = 'r' FOR UPDATE"
        ).fetchone()
        with pytest.raises(StoreError) as info:
            guard.execute("r", "charge", {"m": marker}, _effect(ledger, "r"))
        admin.rollback()
    assert isinstance(info.value.__cause__, psycopg.errors.LockNotAvailable)
    assert getattr(info.value, "connection_lost", False) is False
    # the first look (claim_new, which neither locks nor waits for an existing row: it
    # found the record RELEASED), then the claim itself, once
    assert proxy.attempts(marker) == 2
    assert ledger.count("r") == 0
    assert guard.execute("r", "charge", {"m": marker}, _effect(ledger, "r")).result == "done"
    assert ledger.count("r") == 1


def test_a_lock_timeout_on_a_connection_the_pool_will_close_is_not_a_lost_connection(
    schema: str, stores: list[PostgresStore]
) -> None:
    """The pool closes a connection it takes back when it is past ``max_lifetime`` or was
    opened before a drain: a lock timeout on such a (healthy) connection is judged while
    the connection is still ours, so it is not taken for a lost one (no drain, no retry)."""
    store = PostgresStore(PG_URL + "?options=-c%20lock_timeout%3D200", schema=schema, max_size=2)
    stores.append(store)
    guard = Guard(store, wait=0)
    guard.execute("warm", "charge", {}, lambda _ctx: 1)
    pool = store._get_pool()
    with psycopg.connect(PG_URL) as admin:
        admin.execute(f"LOCK TABLE {schema}.executions IN ACCESS EXCLUSIVE MODE")

        def read_on_a_drained_connection() -> None:
            with store._connection() as conn:
                pool.drain()  # this connection is closed when handed back
                conn.execute(f"SELECT 1 FROM {schema}.executions")

        with pytest.raises(StoreError) as info:
            read_on_a_drained_connection()
        admin.rollback()
    assert isinstance(info.value.__cause__, psycopg.errors.LockNotAvailable)
    assert info.value.connection_lost is False
    assert guard.execute("warm", "charge", {}, lambda _ctx: 2).replay is True


@pytest.mark.parametrize("what", ["claim", "read"])
def test_a_second_lost_connection_fails_closed(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger, what: str
) -> None:
    """The second try loses its connection too: StoreError (connection_lost), after
    exactly two tries; a claim that was never recorded never runs fn."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")
    marker = _marker(f"lose-{what}-twice")
    proxy.lose_request(marker)
    proxy.lose_request(marker)

    def call() -> Any:
        if what == "claim":
            return guard.execute("r", "charge", {"m": marker}, _effect(ledger, "r"))
        return store.get("default", marker)

    with pytest.raises(StoreError) as info:
        call()
    assert info.value.connection_lost is True  # type: ignore[attr-defined]
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert (proxy.lost, proxy.attempts(marker)) == (2, 2)
    assert ledger.count("r") == 0
    assert store.get("default", "r")[0] is None  # nothing claimed
    assert guard.execute("r", "charge", {}, _effect(ledger, "r")).result == "done"


def test_a_second_try_that_cannot_connect_fails_closed(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """The claim commits, its reply is lost, and no new connection can be opened: the
    call fails with StoreError and fn does not run (the claim reads as in doubt after its
    lease, never run twice)."""
    store = _via_proxy(proxy, schema, timeout=1.0)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")
    marker = _marker("lose-claim-reply")
    proxy.lose_reply(marker)
    proxy.refuse()
    with pytest.raises(StoreError):
        guard.execute("r", "charge", {"m": marker}, _effect(ledger, "r"))
    assert ledger.count("r") == 0
    with psycopg.connect(PG_URL) as admin:  # the pool may be backing off its reconnects
        row = admin.execute(
            f"SELECT status, attempt FROM {schema}.executions WHERE request_id = 'r'"
        ).fetchone()
    assert row == ("PENDING", 1)  # committed, never run: in doubt once its lease expires


def _in_doubt(store: PostgresStore, rid: str) -> None:
    request = ClaimRequest(
        namespace="ns",
        request_id=rid,
        action="charge",
        fingerprint="f" * 64,
        payload_json="{}",
        execution_id=uuid.uuid4().hex,
        owner="owner-1",
        lease_ms=1,
        downstream_key=downstream_key("ns", "charge", rid),
    )
    assert store.claim(request).won
    time.sleep(0.01)  # the 1 ms lease expires on the database's clock


@pytest.mark.parametrize("write", ["take_over", "resolve"])
def test_writes_that_cannot_be_proved_safe_are_not_tried_again(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], write: str
) -> None:
    """A take-over or a resolution whose connection is lost: StoreError (connection_lost)
    after ONE try, nothing changed; the next call goes through."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    _in_doubt(store, "r")
    marker = _marker(write)  # travels as the owner, the actor, the subject

    def call() -> Any:
        if write == "take_over":
            return store.take_over("ns", "r", 1, marker, 30_000)
        return store.resolve(
            Resolution(
                namespace="ns",
                request_id="r",
                expected_token=1,
                status=Status.FAILED,
                result_json=None,
                error=ErrorInfo("Declined", "no"),
                actor=marker,
                reason="checked with the bank",
            )
        )

    proxy.lose_request(marker)
    with pytest.raises(StoreError) as info:
        call()
    assert info.value.connection_lost is True  # type: ignore[attr-defined]
    assert (proxy.lost, proxy.attempts(marker)) == (1, 1)
    record = store.get("ns", "r")[0]
    assert record is not None
    assert (record.status, record.fencing_token) == (Status.PENDING, 1)
    assert store.events(subject=marker) == []
    out = call()  # a new connection: it goes through
    assert out.accepted
    assert store.get("ns", "r")[0].fencing_token == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("loss", ["lose_request", "fatal_reply", "lose_reply"])
def test_an_audit_append_whose_connection_is_lost_is_kept_and_written_once(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], loss: str
) -> None:
    """An audit append sent with a COMMIT whose answer never comes (the request dropped
    before the server saw it, or the reply lost after it committed: the client cannot tell)
    is not tried again and raises nothing: the event is kept, and the next write looks it
    up by its chain hash and writes it only if it is missing. Once either way."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    marker = _marker("append-lost")
    getattr(proxy, loss)(marker)
    store.record_event(AuditEvent(kind=EventKind.CONFLICT, at_ms=0, namespace="ns", subject=marker))
    assert (proxy.lost, proxy.attempts(marker)) == (1, 1)
    assert store._uncertain
    assert [e.kind for e in store.events(subject=marker)] == [EventKind.CONFLICT]
    assert not store._uncertain
    assert verify(store).ok


def test_open_case_is_tried_again(schema: str, proxy: PgProxy, stores: list[PostgresStore]) -> None:
    """Opening a case whose reply is lost after it committed: the second try finds the case
    and returns it; it is opened (and audited) once."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    case_id = _marker("case")
    proxy.lose_reply(case_id)
    case = store.open_case("ns", case_id, 0.5, 1)
    assert proxy.lost == 1
    assert (case.case_id, case.state.value) == (case_id, "OPEN")
    assert [e.kind for e in store.events(subject=case_id)] == [EventKind.STATE_CHANGE]
    assert verify(store).ok


# -- what a second try recognises as its own ---------------------------------------------------


def test_only_the_claim_itself_untouched_and_live_is_recognised(
    schema: str, stores: list[PostgresStore]
) -> None:
    """_claimed_by accepts the row the claim wrote, and not that row once renewed, taken
    over (even by the same owner), or under another execution id; _carries accepts only
    the completion's exact write."""
    clock = FakeClock()
    store = PostgresStore(PG_URL, schema=schema, clock=clock)
    stores.append(store)
    request = ClaimRequest(
        namespace="ns",
        request_id="r",
        action="charge",
        fingerprint="f" * 64,
        payload_json="{}",
        execution_id=uuid.uuid4().hex,
        owner="owner-1",
        lease_ms=30_000,
        downstream_key=downstream_key("ns", "charge", "r"),
    )
    claimed = store.claim(request)
    assert _claimed_by(claimed.record, request, claimed.now_ms)
    other = ClaimRequest(**{**_fields(request), "execution_id": uuid.uuid4().hex})
    assert not _claimed_by(claimed.record, other, claimed.now_ms)
    assert not _claimed_by(claimed.record, request, claimed.now_ms + 30_000)  # expired
    clock.advance(1)
    assert store.renew("ns", "r", 1, 30_000)
    renewed, now = store.get("ns", "r")
    assert renewed is not None
    assert not _claimed_by(renewed, request, now)
    clock.advance(40)
    taken = store.take_over("ns", "r", 1, "owner-1", 30_000)  # the same owner name
    assert taken.accepted
    assert taken.record is not None
    assert not _claimed_by(taken.record, request, clock())

    done = Completion(
        namespace="ns",
        request_id="r",
        fencing_token=2,
        status=Status.SUCCEEDED,
        result_json='{"ok":true}',
        error=None,
        actor="owner-1",
        action="charge",
        execution_id=request.execution_id,
    )
    stored = store.complete(done).record
    assert stored is not None
    assert _carries(stored, done)
    for change in (
        {"result_json": '{"ok":false}'},
        {"status": Status.FAILED},
        {"fencing_token": 1},
        {"error": ErrorInfo("E", "m")},
        {"execution_id": uuid.uuid4().hex},
    ):
        assert not _carries(stored, Completion(**{**_fields(done), **change}))


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in type(obj).__slots__}


# -- the backend ended after the commit: FATAL 57P01 -------------------------------------------
# What pg_terminate_backend (or a server shutting down) sends: an ErrorResponse FATAL, then
# the socket closes. In pipeline mode (the general path) psycopg then raises "cannot exit
# pipeline mode while busy" on a connection it never marks broken, though libpq reports it
# closed: the store must judge the loss by the connection's state, not by psycopg's flag.


def test_a_release_committed_then_claimed_by_another_is_accepted(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """fn raises NotExecuted; the release commits, and before its caller learns of it
    (FATAL) another caller claims the record and runs. The second try of the release is
    refused by fencing, but the record proves it committed (another execution id under
    the very next token): the first caller gets its NotExecuted, not LeaseLostError, and
    no rejection is audited."""
    store_a = _via_proxy(proxy, schema)
    store_b = PostgresStore(PG_URL, schema=schema, max_size=2)
    stores.extend((store_a, store_b))
    guard_a = Guard(store_a, wait=0, owner="owner-a")
    guard_b = Guard(store_b, wait=0, owner="owner-b")
    marker = _marker("fatal-release")
    ran_b: list[Any] = []

    def b_claims() -> None:  # between the release's commit and its caller's FATAL
        ran_b.append(guard_b.execute("r", "charge", {}, _effect(ledger, "r-b", "b")))

    proxy.fatal_reply(marker, b_claims)  # the error message travels with the release only

    def not_run(_ctx: Any) -> Any:
        raise NotExecuted(marker)

    with pytest.raises(NotExecuted):
        guard_a.execute("r", "charge", {}, not_run)

    assert proxy.errors == []
    assert proxy.lost == 1
    assert proxy.attempts(marker) >= 2  # the release was sent again
    assert [r.result for r in ran_b] == ["b"]
    assert ledger.count("r-b") == 1
    record = store_b.get("default", "r")[0]
    assert record is not None
    assert (record.status, record.attempt, record.fencing_token) == (Status.SUCCEEDED, 2, 2)
    assert _kinds(store_b, "r") == [
        EventKind.CLAIMED,
        EventKind.RELEASED,
        EventKind.CLAIMED,
        EventKind.SUCCEEDED,
    ]
    guard_a.close()
    guard_b.close()
    assert verify(store_b).ok


def test_only_a_release_followed_by_one_claim_is_recognised() -> None:
    """_released_then_claimed: a RELEASED completion naming its execution id, and a record
    under another execution id at the very next token; nothing else."""
    release = Completion(
        namespace="ns",
        request_id="r",
        fencing_token=3,
        status=Status.RELEASED,
        result_json=None,
        error=ErrorInfo("safeagent.errors.NotExecuted", "no"),
        actor="a",
        action="charge",
        execution_id="x-ours",
    )
    now = START_MS
    record = Record(
        namespace="ns",
        request_id="r",
        action="charge",
        fingerprint="f" * 64,
        status=Status.PENDING,
        payload_json="{}",
        result_json=None,
        error=None,
        execution_id="x-theirs",
        attempt=2,
        fencing_token=4,
        lease_owner="b",
        lease_expires_at_ms=now + 30_000,
        downstream_key="dk",
        created_at_ms=now,
        claimed_at_ms=now,
        updated_at_ms=now,
        completed_at_ms=None,
    )
    assert _released_then_claimed(record, release)
    for change in (
        {"status": Status.IN_DOUBT},
        {"status": Status.SUCCEEDED},
        {"execution_id": None},
        {"execution_id": "x-theirs"},
        {"fencing_token": 2},
    ):
        assert not _released_then_claimed(record, Completion(**{**_fields(release), **change}))
    for moved in ({"fencing_token": 5}, {"execution_id": "x-ours"}):  # two steps; a take-over
        assert not _released_then_claimed(Record(**{**_fields(record), **moved}), release)


def test_backends_terminated_at_random_never_hide_a_committed_write(
    schema: str, stores: list[PostgresStore]
) -> None:
    """Claims and completions on the general (pipelined) path while every backend of the
    store is terminated with pg_terminate_backend every few ms: each failure is reported
    as a lost connection (after its second try was lost too); none is a plain StoreError
    hiding a claim or completion that committed, as "cannot exit pipeline mode while busy"
    on a connection psycopg had not marked broken used to be."""
    store = PostgresStore(PG_URL, schema=schema, max_size=2, timeout=5.0)
    stores.append(store)
    store._fast_path = False
    stop = threading.Event()
    hidden: list[tuple[str, str]] = []
    failures = 0

    def killer() -> None:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            while not stop.wait(0.002 + 0.008 * (time.monotonic() % 1)):
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    (f"safeagent-{schema}",),
                )

    def committed(rid: str, check: Any) -> bool:
        for _ in range(50):
            try:
                return bool(check(store.get("default", rid)[0]))
            except StoreError:
                time.sleep(0.01)
        raise AssertionError("the store never came back")

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        for i in range(150):
            rid, execution_id = f"r{i}", uuid.uuid4().hex
            request = ClaimRequest(
                namespace="default",
                request_id=rid,
                action="charge",
                fingerprint="f" * 64,
                payload_json="{}",
                execution_id=execution_id,
                owner="owner-1",
                lease_ms=60_000,
                downstream_key=downstream_key("default", "charge", rid),
            )
            try:
                claimed = store.claim(request)
            except StoreError as err:
                failures += 1
                mine = committed(
                    rid, lambda r, x=execution_id: r is not None and r.execution_id == x
                )
                if mine and not getattr(err, "connection_lost", False):
                    hidden.append(("claim", str(err)))
                continue
            if not claimed.won:
                continue
            done = Completion(
                namespace="default",
                request_id=rid,
                fencing_token=claimed.record.fencing_token,
                status=Status.SUCCEEDED,
                result_json="1",
                error=None,
                actor="owner-1",
                action="charge",
                execution_id=execution_id,
            )
            try:
                assert store.complete(done).accepted
            except StoreError as err:
                failures += 1
                mine = committed(rid, lambda r: r is not None and r.status is Status.SUCCEEDED)
                if mine and not getattr(err, "connection_lost", False):
                    hidden.append(("completion", str(err)))
    finally:
        stop.set()
        thread.join()
    assert hidden == []
    assert failures > 0  # the backends were terminated under the calls
    assert verify(store).ok


@pytest.mark.parametrize("loss", ["after_commit", "before_the_server"])
def test_buffered_events_carried_by_a_lost_write_are_written_once(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger, loss: str
) -> None:
    """A write that is not tried again (an operator's resolve) carries a buffered replay
    event and loses its connection: after its COMMIT landed (the server's FATAL follows),
    or before the server saw it. The caller gets StoreError (fail closed) either way; the
    event, whose fate was unknown, is looked up by the next write: found, it is not written
    again; missing, it is written then. Exactly once in both cases."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")

    def timeout(_ctx: Any) -> None:
        raise TimeoutError("no answer")

    with pytest.raises(TimeoutError):
        guard.execute("doubt", "charge", {}, timeout, outcome_unknown=(TimeoutError,))
    guard.execute("warm", "charge", {}, _effect(ledger, "warm"))
    _replay_warm(store, guard, ledger)
    marker = _marker("resolve-lost")
    if loss == "after_commit":
        proxy.fatal_reply(marker)
    else:
        proxy.lose_request(marker)
    with pytest.raises(StoreError) as info:
        guard.resolve("doubt", "succeeded", result={"ok": 1}, by="op", reason=marker)
    assert info.value.connection_lost is True
    committed = loss == "after_commit"
    assert guard.get("doubt").status is (Status.SUCCEEDED if committed else Status.IN_DOUBT)
    guard.execute("other", "charge", {}, _effect(ledger, "other"))  # the next write
    store.flush_events()
    replayed = [e.kind for e in store.events(subject="warm")].count(EventKind.REPLAYED)
    assert replayed == 1
    assert verify(store).ok


def _lose_twice(proxy: PgProxy, marker: str, tries: str) -> None:
    """Both tries of a claim or completion carrying ``marker`` lose their connection:
    ``committed_then_unsent``: the first commits and its reply is lost (FATAL), the second
    never reaches the server; ``committed_twice``: each commits, each reply lost;
    ``unsent_twice``: neither reaches the server."""
    if tries == "committed_then_unsent":
        proxy.fatal_reply(marker, meanwhile=lambda: proxy.lose_request(marker))
    elif tries == "committed_twice":
        proxy.fatal_reply(marker, meanwhile=lambda: proxy.fatal_reply(marker))
    else:
        proxy.lose_request(marker)
        proxy.lose_request(marker)


TWICE = pytest.mark.parametrize(
    "tries", ["committed_then_unsent", "committed_twice", "unsent_twice"]
)


@TWICE
@pytest.mark.parametrize("op", ["claim", "completion"])
@pytest.mark.parametrize("path", ["buffered", "buffered_read_first", "buffered_general"])
def test_buffered_events_of_a_write_lost_twice_are_written_once(
    schema: str,
    proxy: PgProxy,
    stores: list[PostgresStore],
    ledger: Ledger,
    op: str,
    path: str,
    tries: str,
) -> None:
    """A claim or a completion carries a buffered replay event, and both its tries lose
    their connection (see _lose_twice): the call fails closed with StoreError, and the
    event, committed by one of the tries or by neither, is in the trail exactly once after
    the next write (which looks up the write's own event first)."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")
    unbuffered = "general" if path == "buffered_general" else "fast"  # fn buffers the event
    _prepare(store, guard, ledger, path if op == "claim" else unbuffered)
    marker = _marker(f"{op}-lost-twice")
    _lose_twice(proxy, marker, tries)

    def fn(_ctx: Any) -> Any:
        ledger.append("r")
        if op == "completion":
            _replay_warm(store, guard, ledger)
        return {"m": marker}

    with pytest.raises(StoreError):
        guard.execute("r", "charge", {"m": marker} if op == "claim" else {}, fn)

    assert proxy.lost == 2
    committed = tries != "unsent_twice"
    record = store.get("default", "r")[0]
    if op == "claim":
        assert ledger.count("r") == 0
        assert (record is not None) is committed
        assert record is None or record.status is Status.PENDING
    else:
        assert ledger.count("r") == 1
        assert record is not None
        assert record.status is (Status.SUCCEEDED if committed else Status.PENDING)
    guard.execute("next", "charge", {}, _effect(ledger, "next"))  # the next write
    _check_buffered(store, "buffered")
    assert verify(store).ok


@TWICE
@pytest.mark.parametrize(
    ("path", "op"),
    [
        ("fast", "claim"),
        ("fast", "claim_new"),
        ("fast", "completion"),
        ("general", "claim"),
        ("general", "completion"),
    ],
)
def test_a_lost_claim_or_refused_completion_carries_no_buffered_event(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], op: str, path: str, tries: str
) -> None:
    """A claim that loses to another's, or a completion that fencing refuses, writes no
    event of its own to prove it committed, so it carries none of the buffered events
    either: with both its tries lost, each buffered event is still in the trail once
    after the next write."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    store._fast_path = path == "fast"
    marker = _marker(f"{op}-refused-lost")

    held = store.claim(_request("taken"))
    assert held.won
    chains = store.chain_shards
    subject = next(
        f"w-{i}"
        for i in range(1000)
        if shard_of("ns", f"w-{i}", chains) != shard_of("ns", "taken", chains)
    )
    store.record_event(AuditEvent(EventKind.REPLAYED, 5, "ns", subject), buffered=True)
    _lose_twice(proxy, marker, tries)

    def write() -> Any:
        if op == "claim":
            return store.claim(_request("taken", payload=json.dumps({"m": marker})))
        if op == "claim_new":  # the record is there: the statement writes nothing
            return store.claim_new(_request("taken", payload=json.dumps({"m": marker})))
        return store.complete(
            Completion(
                namespace="ns",
                request_id="taken",
                fencing_token=held.record.fencing_token + 1,  # not current: refused
                status=Status.SUCCEEDED,
                result_json=json.dumps({"m": marker}),
                error=None,
                actor="owner-3",
            )
        )

    with pytest.raises(StoreError):
        write()
    assert proxy.lost == 2
    assert store.claim(_request("next")).won  # the next write
    store.flush_events()
    assert [e.kind for e in store.events(subject=subject)] == [EventKind.REPLAYED]
    assert verify(store).ok


def test_a_completion_whose_record_moved_on_before_its_second_try_is_accepted_once(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """An in-doubt completion commits with a buffered replay event, its reply is lost, and
    before its second try a reconciler takes the record over: the second try is refused
    and finds the record no longer as it left it, but finds its own in-doubt event in the
    trail. It is accepted (the guard raises fn's outcome-unknown error, not LeaseLostError),
    no rejection is audited, and the replay event is not written again."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    other = PostgresStore(PG_URL, schema=schema, max_size=1)
    stores.append(other)
    guard = Guard(store, wait=0, owner="owner-1")
    _prepare(store, guard, ledger, "general")
    marker = _marker("moved-on")
    proxy.fatal_reply(marker, meanwhile=lambda: _take_over(other, "r"))

    def fn(_ctx: Any) -> Any:
        _replay_warm(store, guard, ledger)
        raise TimeoutError(marker)  # the error's message travels in the completion

    with pytest.raises(TimeoutError):  # accepted: fn's error, as if the reply had come
        guard.execute("r", "charge", {}, fn, outcome_unknown=(TimeoutError,))
    assert proxy.lost == 1
    record = store.get("default", "r")[0]
    assert record is not None
    assert (record.status, record.fencing_token) == (Status.PENDING, 2)  # taken over
    assert _kinds(store, "r") == [EventKind.CLAIMED, EventKind.IN_DOUBT, EventKind.CLAIMED]
    _check_buffered(store, "buffered")
    assert verify(store).ok


def test_a_refused_completion_whose_reply_was_lost_is_audited_once(
    schema: str, proxy: PgProxy, stores: list[PostgresStore]
) -> None:
    """A completion under a token that is not current commits its rejection, and the reply
    is lost: the second try, refused again, finds that rejection and does not audit
    another."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    held = store.claim(_request("taken"))
    assert held.won
    marker = _marker("refused-lost")
    proxy.fatal_reply(marker)
    written = store.complete(
        Completion(
            namespace="ns",
            request_id="taken",
            fencing_token=held.record.fencing_token + 1,  # not current: refused
            status=Status.SUCCEEDED,
            result_json=json.dumps({"m": marker}),
            error=None,
            actor="owner-3",
        )
    )
    assert proxy.lost == 1
    assert proxy.attempts(marker) == 2
    assert not written.accepted
    assert _kinds(store, "taken") == [EventKind.CLAIMED, EventKind.COMPLETION_REJECTED]
    assert verify(store).ok


def test_a_conflict_event_whose_reply_was_lost_is_written_once(
    schema: str, proxy: PgProxy, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """A request id reused with another payload: the conflict event is written at once,
    its COMMIT lands and the reply is lost. The guard still answers the conflict, and the
    event, kept for the next write to look up, is in the trail once."""
    store = _via_proxy(proxy, schema)
    stores.append(store)
    guard = Guard(store, wait=0, owner="owner-1")
    guard.execute("r", "charge", {"a": 1}, _effect(ledger, "r"))
    store._found = 1.0  # the guard reads first: the payload travels in the event only
    # letters only: the event's payload is redacted, and a run of 13 digits in a uuid's hex
    # would read as a card number
    marker = _marker("conflict-lost").translate(str.maketrans("0123456789", "ghijklmnop"))
    proxy.fatal_reply(marker)
    with pytest.raises(FingerprintMismatchError):
        guard.execute("r", "charge", {"m": marker}, _effect(ledger, "r"))
    assert proxy.lost == 1
    assert ledger.count("r") == 1
    guard.execute("next", "charge", {}, _effect(ledger, "next"))  # the next write
    assert _kinds(store, "r") == [EventKind.CLAIMED, EventKind.SUCCEEDED, EventKind.CONFLICT]
    assert verify(store).ok


def _interrupted_while_locked(schema: str, table: str, call: Callable[[], Any]) -> None:
    """``call`` while another connection holds ``table`` locked; Ctrl-C (as SIGINT would
    raise it) arrives while it waits; then the lock is released."""
    with psycopg.connect(PG_URL) as admin:
        admin.execute(f"LOCK TABLE {schema}.{table} IN ACCESS EXCLUSIVE MODE")
        timer = threading.Timer(0.5, _thread.interrupt_main)
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                call()
        finally:
            timer.cancel()
            admin.rollback()


def test_interrupts_while_buffered_events_are_settled_lose_none(
    schema: str, stores: list[PostgresStore]
) -> None:
    """Ctrl-C while a claim carrying a buffered event waits: the event goes back marked by
    the claim's own event. Ctrl-C again while the next write looks that event up: the
    buffered event goes back again, still marked. The write after writes it, once."""
    store = PostgresStore(PG_URL, schema=schema, max_size=2)
    stores.append(store)
    chains = store.chain_shards
    subject = next(
        s
        for s in (f"w-{i}" for i in range(1000))
        if shard_of("ns", s, chains) != shard_of("ns", "r", chains)
    )
    store.record_event(AuditEvent(EventKind.REPLAYED, 5, "ns", subject), buffered=True)
    _interrupted_while_locked(schema, "executions", lambda: store.claim(_request("r")))
    assert store._uncertain
    assert store._buffer
    _interrupted_while_locked(schema, "audit_events", store.flush_events)
    assert store._uncertain
    assert store._buffer
    store.flush_events()
    assert not store._uncertain
    assert [e.kind for e in store.events(subject=subject)] == [EventKind.REPLAYED]
    assert verify(store).ok


def _request(rid: str, owner: str = "owner-2", payload: str = "{}") -> ClaimRequest:
    return ClaimRequest(
        namespace="ns",
        request_id=rid,
        action="charge",
        fingerprint="f" * 64,
        payload_json=payload,
        execution_id=uuid.uuid4().hex,
        owner=owner,
        lease_ms=30_000,
        downstream_key=downstream_key("ns", "charge", rid),
    )


def _take_over(store: PostgresStore, rid: str) -> None:
    assert store.take_over("default", rid, 1, "reconciler", 30_000).accepted


def test_an_observed_lease_expiry_is_not_an_in_doubt_completion(
    schema: str, stores: list[PostgresStore]
) -> None:
    """An in-doubt completion's own event proves it committed; an observation of the
    expired lease (the same kind, execution id and token, detail ``observed``) does not."""
    store = PostgresStore(PG_URL, schema=schema, max_size=1)
    stores.append(store)
    completion = Completion(
        namespace="ns",
        request_id="r",
        fencing_token=3,
        status=Status.IN_DOUBT,
        result_json=None,
        error=ErrorInfo("TimeoutError", "no answer"),
        actor="owner-1",
        execution_id="e" * 32,
    )
    witness = _completion_witness(completion)
    assert witness == ("ns", "r", "in_doubt", "e" * 32, 3)

    def event(detail: dict[str, Any], token: int = 3) -> AuditEvent:
        return AuditEvent(
            EventKind.IN_DOUBT, 5, "ns", "r", "charge", "owner-1", "e" * 32, token, detail
        )

    store.record_event(event({"observed": True, "stored_status": "PENDING"}))
    store.record_event(event({"status": "IN_DOUBT"}, token=2))  # an earlier attempt's
    assert store._read(store._witnessed(witness)) is False
    store.record_event(event({"status": "IN_DOUBT"}))
    assert store._read(store._witnessed(witness)) is True


def test_a_batch_marked_uncertain_while_a_claim_takes_the_buffer_is_written_once(
    schema: str, proxy: PgProxy, stores: list[PostgresStore]
) -> None:
    """Another thread's flush loses its COMMIT reply and puts its batch back, marked
    uncertain, just before a claim takes the buffer (the interleaving forced by running
    that flush inside the take): the claim does not carry the marked batch in its one
    statement but takes the general path, which looks it up first. Each event is in the
    trail once."""
    store = _via_proxy(proxy, schema, max_size=4)
    stores.append(store)
    chains = store.chain_shards
    marker = _marker("uncertain-race")
    taken = {shard_of("ns", "carrier", chains)}
    subjects: list[str] = []
    for subject in (f"u-{i}" for i in range(1000)):  # two events on chains of their own
        if len(subjects) < 2 and shard_of("ns", subject, chains) not in taken:
            taken.add(shard_of("ns", subject, chains))
            subjects.append(subject)
    for subject in subjects:
        event = AuditEvent(EventKind.REPLAYED, 5, "ns", subject, detail={"tag": marker})
        store.record_event(event, buffered=True)
    proxy.lose_reply(marker)
    take = store._buffer.take
    flushed: list[BaseException] = []

    claimer = threading.get_ident()
    fired: list[bool] = []

    def take_after_another_flush() -> list[AuditEvent]:
        if threading.get_ident() == claimer and not fired:
            fired.append(True)

            def flush() -> None:
                try:
                    store.flush_events()
                except StoreError as err:
                    flushed.append(err)

            other = threading.Thread(target=flush)
            other.start()
            other.join()
            assert store._uncertain  # its reply was lost: the batch is back, marked
        return take()

    store._buffer.take = take_after_another_flush  # type: ignore[method-assign]
    request = ClaimRequest(
        namespace="ns",
        request_id="carrier",
        action="charge",
        fingerprint="f" * 64,
        payload_json="{}",
        execution_id=uuid.uuid4().hex,
        owner="owner-1",
        lease_ms=30_000,
        downstream_key=downstream_key("ns", "charge", "carrier"),
    )
    assert store.claim(request).won
    store._buffer.take = take  # type: ignore[method-assign]
    assert len(flushed) == 1
    assert getattr(flushed[0], "connection_lost", False) is True
    store.flush_events()
    tagged = [e.subject for e in store.events() if e.detail.get("tag") == marker]
    assert sorted(tagged) == sorted(subjects)
    assert verify(store).ok


def test_reading_the_trail_after_a_failover_flushes_once_and_succeeds(
    schema: str, stores: list[PostgresStore], ledger: Ledger
) -> None:
    """Reading the trail writes the buffered events first. On a dead pool that write is
    tried once more on a new connection, and the buffered replay event is there once."""
    store = PostgresStore(PG_URL, schema=schema, max_size=2)
    stores.append(store)
    guard = Guard(store, wait=0)
    guard.execute("warm", "charge", {}, _effect(ledger, "warm"))
    _replay_warm(store, guard, ledger)
    _terminate_all(schema)
    kinds = [e.kind for e in store.events(subject="warm")]
    assert kinds.count(EventKind.REPLAYED) == 1
    assert verify(store).ok
