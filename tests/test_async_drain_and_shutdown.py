"""AsyncGuard's hand-off at its edges: drain()/aclose() cancelled or timed out, called from
inside a handed-off fn, a caller cancelled as the program ends, an executor already shut
down. Found by a review of the cancellation rework; each docstring says how it failed.

Each test asserts the behaviour DESIGN.md section 2 (cancellation) and docs/guide.md
"Async" promise. Side effects are counted
in the effect ledger (tests/conftest.py), never from the guard's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safeagent import AsyncGuard, ExecutionContext, MemoryStore, Receipt, Status
from tests.conftest import FakeClock, Ledger, require_postgres
from tests.test_async_cancellation import LEASE, Env, assert_audit_clean, status_of

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Env]:
    """The same stores as tests/test_async_cancellation.py: a SQLite file, a throwaway
    PostgreSQL schema."""
    if request.param == "postgres":
        require_postgres()
    made = Env(str(request.param), tmp_path, clock)
    yield made
    made.close()


# -- drain()/aclose() cancelled ----------------------------------------------------------


def test_cancelling_drain_does_not_cancel_a_queued_completion_write(
    env: Env, ledger: Ledger
) -> None:
    """Fixed (a review found it broken). Before the fix:
    ``AsyncGuard.drain()`` waits with ``asyncio.gather(*handed_off)``, and a
    cancelled ``gather`` cancels every awaitable it was given. Those are the very writes
    that must happen after a cancellation (executor futures made by ``_submit``: the
    completion of a handed-off ``fn``, the release of an unstarted claim). An executor
    future whose work item has not started yet is really cancelled (the
    ``concurrent.futures`` item is dropped from the queue), and ``_through`` then gives up
    on it. So ``await asyncio.wait_for(guard.aclose(), t)`` at shutdown, or a Ctrl-C
    while in ``aclose()``, can drop a completion: ``fn`` ran (the ledger has it), the
    record stays PENDING, and it reads as IN DOUBT once its lease runs out.

    Queued work items are ordinary: the default executor has min(32, cpus + 4) threads and
    every plain ``fn`` holds one for as long as it runs. The test makes it deterministic
    with a one-thread executor.

    DESIGN.md section 2: once ``fn`` has started, "the outcome is recorded when fn ends,
    and retries wait for it and replay it". Cancelling a wait for that work must not
    cancel the work.
    """
    store = env.store()

    async def quick(ctx: ExecutionContext) -> str:
        await asyncio.sleep(0.2)
        ledger.append(ctx.request_id)
        return "quick"

    def blocker(ctx: ExecutionContext) -> str:
        time.sleep(1.0)  # holds the only executor thread
        ledger.append(ctx.request_id)
        return "slow"

    async def program() -> None:
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        await aguard.get("warm-up")
        first = asyncio.create_task(aguard.execute("q-1", "op", {}, quick))
        await asyncio.sleep(0.1)  # quick is running
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        slow = asyncio.create_task(aguard.execute("q-2", "op", {}, blocker))
        await asyncio.sleep(0.35)  # blocker holds the thread; quick's completion is queued
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aguard.drain(), 0.1)
        await slow
        await aguard.drain()

    asyncio.run(program())
    assert ledger.count("q-1") == 1
    assert asyncio.run(status_of(store, "q-1")) is Status.SUCCEEDED, (
        "fn ran, but cancelling drain() cancelled the write of its outcome"
    )
    assert_audit_clean(store)


def test_a_timeout_on_aclose_is_honoured_and_the_handed_off_fn_still_recorded(
    env: Env, ledger: Ledger
) -> None:
    """Fixed (a review found it broken). Before the fix:
    a cancelled ``gather``
    completes only once every child has ended, and a handed-off ``_finish`` task swallows
    cancellations (``_through``) until ``fn`` ends. So ``await asyncio.wait_for(
    guard.aclose(), 0.2)`` while a handed-off ``fn`` needs 3 s more returns after ~3 s, not
    0.2 s: a service cannot bound its shutdown wait, and a Ctrl-C during ``aclose()`` does
    not stop the wait either.

    What should hold (docs/guide.md "Async": ``aclose()`` waits for handed-off work;
    asyncio's rule that a cancelled wait ends at once): the timeout ends the wait
    promptly, and the handed-off ``fn`` still runs to its end and its outcome is recorded
    (DESIGN.md section 2).
    """
    store = env.store()

    async def long_tool(ctx: ExecutionContext) -> str:
        await asyncio.sleep(2.0)
        ledger.append(ctx.request_id)
        return "done"

    async def program() -> float:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        await aguard.get("warm-up")
        task = asyncio.create_task(aguard.execute("to-close", "op", {}, long_tool))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        began = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(aguard.aclose(), 0.2)
        waited = time.monotonic() - began
        await asyncio.sleep(2.5)  # the loop lives on: long_tool ends and is recorded
        return waited

    waited = asyncio.run(program())
    assert ledger.count("to-close") == 1
    assert asyncio.run(status_of(store, "to-close")) is Status.SUCCEEDED
    assert waited < 1.0, f"wait_for(aclose(), 0.2) returned after {waited:.2f} s"


# -- a caller cancelled just before the event loop ends -----------------------------------


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_caller_cancelled_as_the_program_ends_still_has_its_outcome_recorded(
    kind: str, env: Env, ledger: Ledger
) -> None:
    """Fixed (a review found it broken). Before the fix:
    the rest of a handed-off flow runs in a *task* (``_finish``, made by
    ``asyncio.ensure_future`` in ``_drive``'s Run branch), and it carries on through a
    cancellation only once it has started (``_through``). A program that cancels its
    tool-call task and returns without awaiting it (a common clean-up shape: ``for t in
    tasks: t.cancel()``, then return) makes ``_finish`` in the loop's very last iteration;
    ``asyncio.run``'s teardown then cancels it before its first step, so none of its code
    runs (not even its ``finally``). The outcome is never written: a plain ``fn`` that
    returned normally, and an ``async def fn`` that the teardown cancelled, both leave the
    record PENDING (IN DOUBT after the lease; the wake-up slot leaks too).

    What holds per docs/guide.md "Async" ("the rest of a handed-off flow carries on through
    the shutdown's cancellation until its outcome is recorded ... A plain fn is recorded with
    what it returned ...; an async def fn still running at that moment is cancelled with the
    loop and recorded in doubt") and DESIGN.md section 2: SUCCEEDED for the plain ``fn``
    (replayed on retry), IN_DOUBT for the ``async def`` one; never left PENDING.
    """
    store = env.store()
    running = threading.Event()

    def plain(ctx: ExecutionContext) -> str:
        running.set()
        time.sleep(0.3)
        ledger.append(ctx.request_id)
        return "exported"

    async def coro(ctx: ExecutionContext) -> str:
        running.set()
        await asyncio.sleep(0.3)
        ledger.append(ctx.request_id)
        return "exported"

    fn: Any = plain if kind == "plain" else coro

    async def program() -> None:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        await aguard.get("warm-up")
        task = asyncio.create_task(aguard.execute("end-1", "export", {}, fn))
        assert await asyncio.to_thread(running.wait, 5)
        task.cancel()
        # the program ends here, without awaiting the cancelled task

    asyncio.run(program())
    time.sleep(0.5)
    status = asyncio.run(status_of(store, "end-1"))
    if kind == "plain":
        assert ledger.count("end-1") == 1
        assert status is Status.SUCCEEDED, f"the outcome was never written: {status}"

        async def retry() -> Receipt:
            return await AsyncGuard(store, lease=LEASE, wait=0).execute("end-1", "export", {}, fn)

        receipt = asyncio.run(retry())
        assert receipt.replay is True
        assert receipt.result == "exported"
        assert ledger.count("end-1") == 1
    else:
        assert status is Status.IN_DOUBT, f"the outcome was never written: {status}"
    assert_audit_clean(store)


# -- drain() from inside a handed-off fn ----------------------------------------------------


def test_drain_from_inside_a_handed_off_fn_neither_hangs_nor_loses_its_outcome(
    tmp_path: Any, ledger: Ledger
) -> None:
    """Fixed (a review found it broken). Before the fix:
    a ``fn`` whose caller was cancelled runs on in the background, watched by a
    ``_finish`` task that waits for it. If ``fn`` (or anything it calls: a shutdown hook, a
    helper that tidies up) awaits ``guard.drain()`` or ``guard.aclose()``, drain waits for
    that ``_finish``, which waits for ``fn``, which waits for drain: a deadlock. And since
    ``_finish`` swallows cancellations (``_through``), a timeout or Ctrl-C cannot break
    it: ``asyncio.run`` never returns, and the outcome is never recorded.

    What should hold: drain() does not wait for the ``fn`` it is called from (or says so
    with a typed error), so ``fn`` ends, its outcome is recorded (DESIGN.md section 2:
    "runs to completion ... the outcome is recorded when fn ends"), and the program ends.
    """
    from safeagent import SQLiteStore

    store = SQLiteStore(tmp_path / "d.db")
    ended: list[Status | None] = []

    async def program() -> None:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        await aguard.get("warm-up")

        async def tidy(ctx: ExecutionContext) -> str:
            await asyncio.sleep(0.1)  # the caller is cancelled meanwhile
            with contextlib.suppress(Exception):
                await aguard.drain()
            ledger.append(ctx.request_id)
            return "tidy"

        task = asyncio.create_task(aguard.execute("self-drain", "op", {}, tidy))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(aguard.drain(), 2)
        ended.append(await status_of(store, "self-drain"))

    runner = threading.Thread(target=asyncio.run, args=(program(),), daemon=True)
    runner.start()
    runner.join(8)
    try:
        assert not runner.is_alive(), "the program hangs: drain() inside fn waits for itself"
        assert ledger.count("self-drain") == 1
        assert ended == [Status.SUCCEEDED]
    finally:
        if not runner.is_alive():
            store.close()


# -- a plain fn that could not be handed to a worker thread (pre-existing) ------------------


def test_a_plain_fn_that_never_ran_is_not_stored_as_a_failure() -> None:
    """Fixed (a review found it broken). Before the fix:
    ``_outcome`` hands a plain
    ``fn`` to the loop's default executor (``_submit``); when the executor is already shut
    down (``loop.shutdown_default_executor()`` ran, as in an application's own shutdown
    sequence, or a custom executor was closed) ``run_in_executor`` raises RuntimeError
    before ``fn`` could start, and the flow stores that as ``fn``'s own terminal failure:
    a FAILED receipt that every retry replays forever, for a side effect that never ran.

    DESIGN.md section 2: FAILED is for "fn raised, terminal"; a call whose ``fn`` never
    started releases its claim (``unstarted``) so that the next call runs it.
    """
    ran: list[str] = []
    store = MemoryStore()

    def export(ctx: ExecutionContext) -> str:
        ran.append(ctx.request_id)
        return "ok"

    async def program() -> None:
        aguard = AsyncGuard(store, lease=LEASE, wait=0)
        await asyncio.get_running_loop().shutdown_default_executor()
        with pytest.raises(RuntimeError):
            await aguard.execute("no-thread", "export", {}, export)

    asyncio.run(program())
    assert ran == []
    status = asyncio.run(status_of(store, "no-thread"))
    assert status in (None, Status.RELEASED), f"fn never ran, yet the record is {status}"
