"""Attempts to break AsyncGuard with real asyncio programs over real stores (a SQLite file
and a throwaway PostgreSQL schema): cancellation at each await point, timeouts, many tasks
on the same ids, event loop shutdown, BaseExceptions out of ``fn``.

Each test asserts the behaviour docs/design.md section 2 (cancellation), the README and the
docstrings promise; where a review found it broken, the docstring says how it failed.
Side effects write to an effect ledger (a separate SQLite file), never counted from the
guard's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safeagent import (
    AsyncGuard,
    ExecutionContext,
    InProgressError,
    Receipt,
    SQLiteStore,
    Status,
    audit,
)
from tests.conftest import PG_URL, FakeClock, Ledger, pg_schema, require_postgres

LEASE = 30.0


class Env:
    """One real store kind: builds stores on the same database, and can hold the database's
    write lock from another connection, so a store call waits inside its worker thread."""

    def __init__(self, kind: str, tmp_path: Path, clock: FakeClock) -> None:
        self.kind = kind
        self.clock = clock
        self.db = tmp_path / "guard.db"
        self.schema = pg_schema()
        self.made: list[Any] = []

    def store(self) -> Any:
        if self.kind == "sqlite":
            store: Any = SQLiteStore(self.db, busy_timeout=30.0, clock=self.clock)
        else:
            from safeagent.stores.postgres import PostgresStore

            store = PostgresStore(PG_URL, schema=self.schema, clock=self.clock, max_size=24)
        self.made.append(store)
        return store

    def owned_spec(self) -> str:
        """What to pass to ``AsyncGuard(...)`` so that the guard opens (owns) the store."""
        assert self.kind == "sqlite"
        return str(self.db)

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[Callable[[], None]]:
        """Hold the write lock; yields ``release()``, callable from any thread, once."""
        if self.kind == "sqlite":
            conn: Any = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN IMMEDIATE")
        else:
            import psycopg

            conn = psycopg.connect(PG_URL)
            conn.execute(f"LOCK TABLE {self.schema}.executions IN EXCLUSIVE MODE")
        done = threading.Lock()

        def release() -> None:
            if done.acquire(blocking=False):
                conn.rollback() if self.kind == "postgres" else conn.execute("ROLLBACK")
                conn.close()

        try:
            yield release
        finally:
            release()

    def close(self) -> None:
        if self.kind == "postgres" and self.made:
            with contextlib.suppress(Exception):
                self.made[0].drop_schema()
        for store in self.made:
            with contextlib.suppress(Exception):
                store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Env]:
    if request.param == "postgres":
        require_postgres()
    e = Env(str(request.param), tmp_path, clock)
    yield e
    e.close()


def assert_audit_clean(store: Any) -> None:
    report = audit.verify(store)
    assert report.problems == [], report.problems


async def status_of(store: Any, rid: str) -> Status | None:
    receipt = await AsyncGuard(store, lease=LEASE, wait=0).get(rid)
    return None if receipt is None else receipt.status


# -- event loop shutdown while a claim is in flight ----------------------------------------


def test_loop_shutdown_while_claiming_leaves_no_claim(env: Env, ledger: Ledger) -> None:
    """Fixed (a review found it broken). Before the fix:
    a task cancelled while its claim is in flight, in a program whose event loop
    then ends (``asyncio.run`` returning, the usual shape of a script, CLI or job), leaves
    its claim PENDING for good: the background task that should release the claim
    (``_undo_claim``) is itself cancelled by ``asyncio.run``'s teardown, while the claim
    still lands from its worker thread. Once the lease runs out the record reads as IN
    DOUBT, so every retry gets OutcomeUnknownError and needs an operator, although ``fn``
    never ran.

    What holds (DESIGN.md section 2, README "Async"): "A task cancelled while still waiting to
    claim leaves no claim": the record is absent or RELEASED, and a retry runs ``fn`` once.
    """
    store = env.store()

    async def tool(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        return "ok"

    async def program() -> None:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        await aguard.get("warm-up")  # the schema exists before the lock is taken
        with env.write_lock() as release:
            task = asyncio.create_task(aguard.execute("sd-claim", "charge", {"n": 1}, tool))
            await asyncio.sleep(0.3)  # its claim now waits for the lock, in a thread
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The lock goes away a moment later; the program ends meanwhile.
            threading.Timer(0.3, release).start()

    asyncio.run(program())  # returns once the worker thread (the claim) has finished
    time.sleep(0.2)

    async def retry() -> Receipt:
        status = await status_of(store, "sd-claim")
        assert status in (None, Status.RELEASED), f"the cancelled claim was left {status}"
        env.clock.advance(LEASE + 1)
        return await AsyncGuard(store, lease=LEASE, wait=0).execute(
            "sd-claim", "charge", {"n": 1}, tool
        )

    receipt = asyncio.run(retry())
    assert receipt.replay is False
    assert ledger.count() == 1
    assert_audit_clean(store)


# -- aclose() while a handed-off fn still runs ---------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_aclose_of_an_owning_guard_does_not_lose_a_handed_off_outcome(
    kind: str, tmp_path: Path, ledger: Ledger
) -> None:
    """Fixed (a review found it broken). Before the fix:
    ``async with AsyncGuard(path) as guard`` (the guard opens, so owns, the store)
    with a timeout that fires while ``fn`` runs: ``fn`` goes on shielded, as promised, but
    leaving the ``async with`` block closes the store under it, so its outcome can never
    be recorded: ``fn`` finishes (the effect happened), the record stays PENDING and
    reads as in doubt after the lease; a retry gets OutcomeUnknownError, not the receipt.

    What holds (DESIGN.md section 2): "the outcome is recorded when fn ends, and retries wait
    for it and replay it". ``aclose()`` must wait for work it handed off (shielded fns,
    completion writes, claim releases) before it closes the store.
    """
    db = tmp_path / "owned.db"

    async def afn(ctx: ExecutionContext) -> str:
        await asyncio.sleep(0.4)
        ledger.append(ctx.request_id)
        return "paid"

    def sfn(ctx: ExecutionContext) -> str:
        time.sleep(0.4)
        ledger.append(ctx.request_id)
        return "paid"

    async def program() -> None:
        async with AsyncGuard(str(db), lease=LEASE, wait=0) as aguard:
            await aguard.get("warm-up")  # the file and schema exist: the timeout hits fn
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    aguard.execute("own-1", "pay", {}, afn if kind == "async" else sfn), 0.1
                )
        await asyncio.sleep(0.8)  # the loop lives on: fn finishes meanwhile

    asyncio.run(program())
    assert ledger.count() == 1
    store = SQLiteStore(db)
    try:

        async def retry() -> Receipt:
            return await AsyncGuard(store, lease=LEASE, wait=0).execute(
                "own-1", "pay", {}, afn if kind == "async" else sfn
            )

        assert asyncio.run(status_of(store, "own-1")) is Status.SUCCEEDED
        receipt = asyncio.run(retry())
        assert receipt.replay is True
        assert receipt.result == "paid"
        assert ledger.count() == 1
        assert_audit_clean(store)
    finally:
        store.close()


def test_aclose_waits_for_a_handed_off_fn_before_returning(env: Env, ledger: Ledger) -> None:
    """Fixed (a review found it broken). Before the fix:
    ``aclose()`` (or leaving ``async with AsyncGuard(...)``) returns while a ``fn``
    whose caller was cancelled still runs in the background; when the program then ends
    (``asyncio.run`` returns), the event loop's teardown cancels ``fn`` midway, and the
    record is IN_DOUBT although nothing went wrong but the timing of ``aclose``.

    What holds (DESIGN.md section 2: ``fn`` "runs to completion shielded from the caller's
    cancellation"; docs/guide.md: call ``aclose()`` "when a service shuts down"): once
    ``aclose()`` returns, every handed-off ``fn`` has ended and its outcome is recorded.
    """
    store = env.store()

    async def tool(ctx: ExecutionContext) -> str:
        await asyncio.sleep(1.5)
        ledger.append(ctx.request_id)
        return "sent"

    async def program() -> None:
        async with AsyncGuard(store, lease=LEASE, wait=0) as aguard:
            await aguard.get("warm-up")  # the schema exists: the timeout hits fn
            with pytest.raises(asyncio.TimeoutError):
                # 1 s: long after the claim's commit even on a loaded CI machine (a timeout
                # landing before fn starts releases the claim instead: another test's case)
                await asyncio.wait_for(aguard.execute("drain-1", "send", {}, tool), 1.0)
        assert await status_of(store, "drain-1") is Status.SUCCEEDED

    asyncio.run(program())
    assert ledger.count() == 1
    assert_audit_clean(store)


# -- a plain fn in a worker thread at loop shutdown ----------------------------------------


def test_plain_fn_that_finishes_during_loop_shutdown_is_recorded_as_it_ended(
    env: Env, ledger: Ledger
) -> None:
    """Fixed (a review found it broken). Before the fix:
    a plain (sync) ``fn`` runs in a worker thread, which nothing can cancel. If the
    event loop ends while it runs (its caller was cancelled, then ``asyncio.run``
    returned), the loop's teardown cancels the task awaiting the thread, and
    ``_outcome`` takes that CancelledError for what ``fn`` did: the record is stored
    IN_DOUBT "ended with asyncio.exceptions.CancelledError", while ``fn`` in fact returned
    normally moments later (``asyncio.run`` even waits for that thread). The receipt is
    lost and an operator must resolve a call that succeeded.

    What holds (DESIGN.md section 2): the outcome recorded is what ``fn`` did, "recorded when fn
    ends": SUCCEEDED with its result, replayed on retry.
    """
    store = env.store()

    def export(ctx: ExecutionContext) -> str:
        time.sleep(0.5)
        ledger.append(ctx.request_id)
        return "exported"

    async def program() -> None:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        task = asyncio.create_task(aguard.execute("thr-1", "export", {}, export))
        await asyncio.sleep(0.2)  # export is running in its thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the program ends here, export still running

    asyncio.run(program())
    assert ledger.count() == 1

    async def retry() -> Receipt:
        assert await status_of(store, "thr-1") is Status.SUCCEEDED
        return await AsyncGuard(store, lease=LEASE, wait=0).execute("thr-1", "export", {}, export)

    receipt = asyncio.run(retry())
    assert receipt.replay is True
    assert receipt.result == "exported"
    assert ledger.count() == 1
    assert_audit_clean(store)


# -- cancellation while the completion is being written ------------------------------------


@pytest.mark.parametrize("loop_ends", [False, True], ids=["loop-lives", "loop-ends"])
def test_cancelled_while_the_completion_waits_for_the_lock_the_receipt_still_lands(
    loop_ends: bool, env: Env, ledger: Ledger
) -> None:
    """A caller cancelled while its completion waits for the database's write lock gets
    CancelledError at once; the completion lands when the lock frees (also when the
    program ends meanwhile), a waiter on the same id gets the replay, and fn ran once."""
    store = env.store()
    locks: list[Callable[[], None]] = []
    held: list[Any] = []
    completing = threading.Event()

    async def tool(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        lock = env.write_lock()  # kept referenced: a collected generator would release it
        locks.append(lock.__enter__())  # held until the test releases it
        held.append(lock)
        completing.set()
        return "done"

    async def program() -> None:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        task = asyncio.create_task(aguard.execute("cmp-1", "ship", {}, tool))
        assert await asyncio.to_thread(completing.wait, 5)
        await asyncio.sleep(0.2)  # the completion now waits for the lock
        waiter = asyncio.create_task(aguard.execute("cmp-1", "ship", {}, tool, wait=10))
        await asyncio.sleep(0.05)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # at once: the lock it waits for is only freed below (a generous bound for a
        # loaded machine; waiting for the lock would never return)
        assert time.monotonic() - cancelled_at < 2.0
        threading.Timer(0.3, locks[0]).start()
        if loop_ends:
            waiter.cancel()
            return
        replay = await asyncio.wait_for(waiter, 10)
        assert replay.replay is True
        assert replay.result == "done"

    asyncio.run(program())
    time.sleep(0.1)
    assert asyncio.run(status_of(store, "cmp-1")) is Status.SUCCEEDED
    assert ledger.count() == 1
    assert_audit_clean(store)


# -- many tasks, random cancellations and timeouts -------------------------------------------


def test_many_tasks_on_few_ids_with_random_cancellations_run_each_fn_at_most_once(
    env: Env, ledger: Ledger
) -> None:
    """Sixty tasks over five ids, a third cancelled or timed out at random moments (while
    waiting, claiming, running fn or writing its outcome), fns both async and plain: each
    id's fn runs at most once, no task hangs, the errors are the typed ones
    (InProgressError, or the caller's own CancelledError / TimeoutError), every record
    ends SUCCEEDED or RELEASED (nothing crashed, so nothing is in doubt), a retry of every
    id replays or runs once, and the audit trail verifies."""
    store = env.store()
    rng = random.Random(20240607)
    ids = [f"fz-{i}" for i in range(5)]

    async def afn(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        await asyncio.sleep(rng.uniform(0, 0.05))
        return "r-" + ctx.request_id

    def sfn(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        time.sleep(rng.uniform(0, 0.03))
        return "r-" + ctx.request_id

    async def program() -> list[Any]:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)

        async def one(i: int) -> Any:
            rid = ids[i % len(ids)]
            fn = afn if i % 2 else sfn
            call = aguard.execute(rid, "op", {"rid": rid}, fn, wait=rng.choice([0, 0.05, 5]))
            if i % 3 == 0:
                return await asyncio.wait_for(call, rng.uniform(0, 0.04))
            return await call

        tasks = [asyncio.create_task(one(i)) for i in range(60)]
        for t in rng.sample(tasks, 10):
            await asyncio.sleep(rng.uniform(0, 0.01))
            t.cancel()
        out = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        # let handed-off work finish, then retry every id
        for _ in range(100):
            statuses = [await status_of(store, rid) for rid in ids]
            if all(s is not Status.PENDING for s in statuses):
                break
            await asyncio.sleep(0.05)
        for rid in ids:
            out.append(await aguard.execute(rid, "op", {"rid": rid}, afn, wait=5))
        await aguard.aclose()
        return out

    outcomes = asyncio.run(program())
    for o in outcomes:
        assert isinstance(
            o, (Receipt, InProgressError, asyncio.CancelledError, asyncio.TimeoutError)
        ), repr(o)
    for rid in ids:
        assert ledger.count(rid) == 1, rid
        assert asyncio.run(status_of(store, rid)) is Status.SUCCEEDED
    assert_audit_clean(store)


# -- AsyncFinalityGate.settle with a plain fn ------------------------------------------------


def test_async_gate_settle_runs_a_plain_fn_off_the_event_loop(env: Env, ledger: Ledger) -> None:
    """Fixed (a review found it broken). Before the fix:
    ``AsyncFinalityGate.settle`` wraps ``fn`` in an ``async def`` (``run`` in
    src/safeagent/_gate.py) that calls it directly, so a plain (blocking) ``fn`` runs on the
    event loop's thread and freezes every other task while it runs, unlike
    ``AsyncGuard.execute``, which runs a plain ``fn`` in a worker thread.

    What holds (AsyncGuard docstring, docs/guide.md "Async": "a plain fn runs in a worker
    thread, and store calls never block the event loop"; AsyncFinalityGate takes "the same
    arguments and behaviour"): the plain ``fn`` runs off the loop; the loop keeps ticking.
    """
    from safeagent import AsyncFinalityGate, ConsensusPolicy

    store = env.store()
    seen: dict[str, int] = {}

    def pay(outcome: str, ctx: ExecutionContext) -> str:
        seen["fn"] = threading.get_ident()
        time.sleep(0.3)
        ledger.append(ctx.request_id, outcome)
        return "paid"

    async def program() -> tuple[int, Receipt]:
        guard = AsyncGuard(store, lease=LEASE, wait=0)
        gate = AsyncFinalityGate(guard, policy=ConsensusPolicy(threshold=0.5, quorum=1))
        await gate.signal("gc-1", "A", "approve", 1.0)
        seen["loop"] = threading.get_ident()
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        receipt = await gate.settle("gc-1", "pay", pay)
        stop.set()
        await ticking
        await guard.aclose()
        return ticks, receipt

    ticks, receipt = asyncio.run(program())
    assert receipt.result == "paid"
    assert ledger.count() == 1
    assert seen["fn"] != seen["loop"], "the plain fn ran on the event loop's thread"
    assert ticks >= 10  # ~30 expected; a blocked loop gives 1 or 2
    assert_audit_clean(store)


# -- reconcile: cancelled while taking the in-doubt record over ------------------------------


def test_cancelled_while_taking_over_an_in_doubt_record_leaves_no_lease(
    env: Env, ledger: Ledger
) -> None:
    """Fixed (a review found it broken). Before the fix:
    a caller cancelled while its reconcile take-over (the new
    lease, token+1, on an in-doubt record) waits in its worker thread leaves that lease
    behind when it lands: the record reads PENDING "claimed ... under a live lease: it is
    running" for a whole lease (60 s by default) although nothing runs, and every retry
    meanwhile gets InProgressError instead of asking the hook. ``_drive`` undoes a
    cancelled Claim (``_undo_claim``) but has no such undo for a TakeOver (it goes
    through ``_perform``, whose cancellation is simply re-raised).

    What holds (DESIGN.md section 2: "A task cancelled while still waiting to claim leaves no
    claim"; a take-over is the reconciler's claim): once the take-over lands, it is
    handed back at once (the record reads IN_DOUBT again), so the next call runs the hook.
    """
    from safeagent import ActionPolicy, Reconciliation

    store = env.store()
    hooks: list[str] = []

    async def charge_times_out(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        raise TimeoutError("sent; no answer")

    async def find_charge(req: Any) -> Reconciliation:
        hooks.append(req.request_id)
        return Reconciliation.happened({"charge": "ch-1"})

    async def program() -> None:
        first = AsyncGuard(store, lease=LEASE, wait=0, outcome_unknown=[TimeoutError])
        with pytest.raises(TimeoutError):
            await first.execute("to-1", "charge", {}, charge_times_out)
        assert await status_of(store, "to-1") is Status.IN_DOUBT
        aguard = AsyncGuard(
            store, lease=LEASE, wait=0, actions={"charge": ActionPolicy(reconcile=find_charge)}
        )
        with env.write_lock():
            task = asyncio.create_task(aguard.execute("to-1", "charge", {}, charge_times_out))
            await asyncio.sleep(0.3)  # its take-over now waits for the lock
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # the lock is free: the take-over lands now
        await asyncio.sleep(0.5)
        assert await status_of(store, "to-1") is Status.IN_DOUBT
        receipt = await aguard.execute("to-1", "charge", {}, charge_times_out)
        assert receipt.result == {"charge": "ch-1"}
        await aguard.aclose()

    asyncio.run(program())
    assert ledger.count() == 1
    assert hooks == ["to-1"]
    assert_audit_clean(store)


# -- waiting on a claim held by another task of this process --------------------------------


def test_waiters_polling_a_long_claim_do_not_pile_up_wakeup_registrations(
    tmp_path: Path, ledger: Ledger
) -> None:
    """Fixed (a review found it broken). Before the fix:
    every poll of a task waiting on a claim held in this process
    (``Wakeups.await_``, src/safeagent/_runtime.py) appends a fresh ``(loop, Event)`` to
    the holder's slot and never removes it when its ``wait_for`` times out; polls come
    every 0.1 s, so N waiters on a claim held T seconds leave about N*10*T entries, all
    kept (with their Events) until the holder ends, then each woken with its own
    ``call_soon_threadsafe``. 20 waiters over 2 s leave ~400.

    What holds: one registration per live waiter (an entry is removed when its wait ends).
    """
    from safeagent._runtime import wakeups

    store = SQLiteStore(tmp_path / "w.db")

    async def slow(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        await asyncio.sleep(2.0)
        return "done"

    async def program() -> int:
        aguard = AsyncGuard(store, lease=LEASE, wait=10)
        holder = asyncio.create_task(aguard.execute("wk-1", "op", {}, slow))
        await asyncio.sleep(0.1)
        waiters = [asyncio.create_task(aguard.execute("wk-1", "op", {}, slow)) for _ in range(20)]
        await asyncio.sleep(1.5)
        slot = wakeups._slots[(store.identity, "default", "wk-1")]
        registered = len(slot.async_waiters)
        receipts = await asyncio.gather(holder, *waiters)
        assert all(r.result == "done" for r in receipts)
        await aguard.aclose()
        return registered

    try:
        registered = asyncio.run(program())
    finally:
        store.close()
    assert ledger.count() == 1
    assert registered <= 20, f"{registered} wake-up registrations for 20 waiters"


# -- a cancellation that arrives just as the claim is handed over ---------------------------


def _cancel_after_claim(base: type) -> type:
    class CancelAfterClaim(base):  # type: ignore[misc, valid-type]
        """The store as it is, but the claim, from its worker thread, asks the event loop
        to cancel the caller just before returning (the request reaches the loop ahead of
        the claim's result): the caller is cancelled after its claim landed and was handed
        over, before ``fn`` could start."""

        cancel: Callable[[], None] | None = None

        def claim(self, *args: Any, **kwargs: Any) -> Any:
            return self._cancelling(super().claim(*args, **kwargs))

        def claim_new(self, *args: Any, **kwargs: Any) -> Any:  # PostgreSQL's first step
            return self._cancelling(super().claim_new(*args, **kwargs))

        def _cancelling(self, answer: Any) -> Any:
            cancel, self.cancel = self.cancel, None
            if cancel is not None:
                cancel()
            return answer

    return CancelAfterClaim


def test_a_caller_cancelled_as_its_claim_is_handed_over_leaves_it_released(
    env: Env, ledger: Ledger
) -> None:
    """The claim's result is already on its way to the caller when the cancellation
    arrives: the caller's side undoes it (the worker thread had handed it over), so the
    record is RELEASED at once, ``fn`` never ran, and a retry runs ``fn`` once."""
    if env.kind == "sqlite":
        store = _cancel_after_claim(SQLiteStore)(env.db, busy_timeout=30.0, clock=env.clock)
    else:
        from safeagent.stores.postgres import PostgresStore

        store = _cancel_after_claim(PostgresStore)(
            PG_URL, schema=env.schema, clock=env.clock, max_size=8
        )
    env.made.append(store)

    async def tool(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        return "ok"

    async def program() -> Receipt:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        task = asyncio.create_task(aguard.execute("handover", "charge", {}, tool))
        loop = asyncio.get_running_loop()
        store.cancel = lambda: loop.call_soon_threadsafe(task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        await aguard.drain()
        assert await status_of(store, "handover") is Status.RELEASED
        assert ledger.count() == 0
        return await aguard.execute("handover", "charge", {}, tool)

    receipt = asyncio.run(program())
    assert receipt.replay is False
    assert ledger.count() == 1
    assert_audit_clean(store)
