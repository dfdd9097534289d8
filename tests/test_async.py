"""AsyncGuard: many tasks, cancellation (P8), the async decorator, sync fns off the loop,
the current context, and twenty simultaneous tasks (P9's async half).

Runs over every store of ``conftest``. Side effects write rows into an effect ledger (a
separate SQLite file); tests count the ledger, never the guard's own records.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safeagent import (
    AsyncGuard,
    ConfigurationError,
    EventKind,
    ExecutionContext,
    FingerprintMismatchError,
    InProgressError,
    MissingKeyError,
    Receipt,
    SQLiteStore,
    Status,
    current_context,
)
from tests.conftest import FakeClock, Ledger

TICKET = {"title": "printer on fire", "priority": "high"}


async def until(predicate: Any, timeout: float = 5.0) -> bool:
    """Await ``predicate()`` (an async callable) until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(await predicate())


def test_twenty_tasks_on_one_id_run_fn_once(store: Any, ledger: Ledger) -> None:
    """Twenty tasks on one id run fn once: one fresh receipt and nineteen replays."""

    async def create_ticket(ctx: ExecutionContext) -> dict[str, str]:
        ledger.append(ctx.request_id)
        await asyncio.sleep(0.1)
        return {"ticket": "T-1"}

    async def main() -> list[Receipt]:
        aguard = AsyncGuard(store, lease=30.0, wait=10.0)
        out = await asyncio.gather(
            *(aguard.execute("t-20", "create_ticket", TICKET, create_ticket) for _ in range(20))
        )
        await aguard.aclose()
        return list(out)

    receipts = asyncio.run(main())
    assert ledger.count() == 1
    assert sum(not r.replay for r in receipts) == 1
    assert sum(r.replay for r in receipts) == 19
    assert {r.execution_id for r in receipts} == {receipts[0].execution_id}
    assert all(r.result == {"ticket": "T-1"} for r in receipts)


# -- P8: cancellation ------------------------------------------------------------------------


def test_p8_cancelled_after_the_effect_the_receipt_is_still_written_and_replayed(
    store: Any, clock: FakeClock, ledger: Ledger
) -> None:
    """P8: cancelled after the effect, the caller gets CancelledError; the receipt is still kept."""

    async def main() -> None:
        aguard = AsyncGuard(store, lease=30.0, wait=0)
        row_written = asyncio.Event()

        async def tool(ctx: ExecutionContext) -> dict[str, str]:
            ledger.append(ctx.request_id)
            row_written.set()
            await asyncio.sleep(1.0)
            return {"ticket": "T-8"}

        task = asyncio.create_task(aguard.execute("p8", "create_ticket", TICKET, tool))
        await row_written.wait()
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - cancelled_at < 0.5  # promptly, not after the tool's 1 s
        assert ledger.count() == 1

        # A retry at once waits (up to 5 s) for the shielded tool and replays its receipt.
        again = await aguard.execute("p8", "create_ticket", TICKET, tool, wait=5.0)
        assert again.replay is True
        assert again.result == {"ticket": "T-8"}
        stored = await aguard.get("p8")
        assert stored.status is Status.SUCCEEDED
        assert stored.execution_id == again.execution_id
        kinds = [e.kind for e in await aguard.audit_trail("p8")]
        assert EventKind.SUCCEEDED in kinds

        # After the lease would have expired: still the same receipt.
        clock.advance(31)
        later = await aguard.execute("p8", "create_ticket", TICKET, tool)
        assert later.replay is True
        assert later.execution_id == again.execution_id
        assert later.result == {"ticket": "T-8"}
        await aguard.aclose()

    asyncio.run(main())
    assert ledger.count() == 1


class SlowClaims:
    """A store whose claims stall until ``gate`` is set: a claim still in flight."""

    blocking = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def claim(self, request: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(10)
        return self.inner.claim(request)

    def claim_new(self, request: Any) -> Any:  # PostgreSQL's first step (claim_first)
        self.entered.set()
        assert self.gate.wait(10)
        return self.inner.claim_new(request)


def test_p8_task_cancelled_while_claiming_leaves_no_claim_and_its_retry_runs_once(
    store: Any, ledger: Ledger
) -> None:
    """P8: a task cancelled mid-claim leaves no live claim, and its retry runs fn once."""
    slow = SlowClaims(store)

    async def tool(ctx: ExecutionContext) -> dict[str, str]:
        ledger.append(ctx.request_id)
        return {"ticket": "T-9"}

    async def main() -> None:
        aguard = AsyncGuard(slow, lease=30.0, wait=0)
        task = asyncio.create_task(aguard.execute("p8-claim", "create_ticket", TICKET, tool))
        assert await asyncio.to_thread(slow.entered.wait, 5)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - cancelled_at < 1.0  # not waiting for the claim it left
        slow.gate.set()  # the claim lands now ...

        async def released() -> bool:
            record = await aguard.get("p8-claim")
            return record is not None and record.status is Status.RELEASED

        assert await until(released)  # ... and is released at once
        assert ledger.count() == 0
        ran = await aguard.execute("p8-claim", "create_ticket", TICKET, tool)
        assert ran.replay is False
        assert ledger.count() == 1
        again = await aguard.execute("p8-claim", "create_ticket", TICKET, tool)
        assert again.replay is True
        assert again.execution_id == ran.execution_id
        await aguard.aclose()

    asyncio.run(main())
    assert ledger.count() == 1


def test_p8_task_cancelled_while_its_claim_waits_for_the_sqlite_lock_leaves_no_claim(
    tmp_path: Path, ledger: Ledger
) -> None:
    """P8: a task cancelled while its claim waits for the SQLite lock leaves no live claim."""
    db = tmp_path / "guard.db"
    store = SQLiteStore(db, busy_timeout=5.0)

    async def tool(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        return "ok"

    async def main() -> None:
        aguard = AsyncGuard(store, lease=30.0, wait=0)
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(aguard.execute("p8-lock", "create_ticket", TICKET, tool))
        await asyncio.sleep(0.3)  # its claim is now waiting for the lock
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        locker.execute("ROLLBACK")
        locker.close()

        async def released() -> bool:  # the claim landed once the lock was free ...
            record = await aguard.get("p8-lock")
            return record is not None and record.status is Status.RELEASED

        assert await until(released)  # ... and was released, since nobody will run it
        await asyncio.sleep(0.2)
        assert await released()
        assert ledger.count() == 0
        ran = await aguard.execute("p8-lock", "create_ticket", TICKET, tool)
        assert ran.replay is False
        assert (await aguard.execute("p8-lock", "create_ticket", TICKET, tool)).replay is True
        await aguard.aclose()

    asyncio.run(main())
    store.close()
    assert ledger.count() == 1


# -- the async decorator, sync fns, the current context ------------------------------------------


def test_async_decorator_runs_once_per_key_and_replays(store: Any, ledger: Ledger) -> None:
    """An async def under @aguard.guarded(key_arg=...) runs once per key and replays."""

    async def main() -> None:
        aguard = AsyncGuard(store, lease=30.0, wait=0)

        @aguard.guarded(action="create_ticket", key_arg="request_id")
        async def create_ticket(
            title: str, priority: str = "normal", request_id: str | None = None
        ) -> dict[str, str]:
            ctx = current_context()
            assert ctx is not None
            ledger.append(ctx.request_id, title)
            await asyncio.sleep(0)
            return {"ticket": f"T-{ledger.count()}", "priority": priority}

        first = await create_ticket("printer on fire", request_id="k-1")
        again = await create_ticket("printer on fire", request_id="k-1")
        assert first == again == {"ticket": "T-1", "priority": "normal"}
        assert ledger.count() == 1
        explicit = await create_ticket.call("call-9", "printer on fire", priority="high")
        assert explicit == {"ticket": "T-2", "priority": "high"}
        assert await create_ticket.call("call-9", "printer on fire", priority="high") == explicit
        assert ledger.count() == 2
        with pytest.raises(FingerprintMismatchError):
            await create_ticket("another title", request_id="k-1")
        for missing in (None, ""):
            with pytest.raises(MissingKeyError):
                await create_ticket("printer on fire", request_id=missing)
        assert ledger.count() == 2
        with pytest.raises(ConfigurationError):

            @aguard.guarded(key_arg="request_id")
            def not_async(request_id: str) -> None: ...

        await aguard.aclose()

    asyncio.run(main())
    assert ledger.count() == 2


def test_sync_fn_runs_off_the_event_loop(store: Any, ledger: Ledger) -> None:
    """A sync fn under AsyncGuard runs in a worker thread while the event loop keeps ticking."""
    seen: dict[str, int] = {}

    def slow_export(ctx: ExecutionContext) -> str:
        seen["thread"] = threading.get_ident()
        ledger.append(ctx.request_id)
        time.sleep(0.3)
        return "exported"

    async def main() -> tuple[int, Receipt]:
        aguard = AsyncGuard(store, lease=30.0, wait=0)
        seen["loop"] = threading.get_ident()
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        receipt = await aguard.execute("s-1", "export", {}, slow_export)
        stop.set()
        await ticking
        await aguard.aclose()
        return ticks, receipt

    ticks, receipt = asyncio.run(main())
    assert receipt.result == "exported"
    assert seen["thread"] != seen["loop"]
    assert ticks >= 10  # ~30 expected; a blocked loop would give 1
    assert ledger.count() == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_current_context_inside_fn_is_the_calls_context(
    kind: str, store: Any, ledger: Ledger
) -> None:
    """current_context() inside a sync or async fn is the context fn was given."""
    seen: list[tuple[ExecutionContext, ExecutionContext | None]] = []

    def sync_fn(ctx: ExecutionContext) -> str:
        seen.append((ctx, current_context()))
        ledger.append(ctx.request_id)
        return "ok"

    async def async_fn(ctx: ExecutionContext) -> str:
        await asyncio.sleep(0)
        return sync_fn(ctx)

    async def main() -> Receipt:
        aguard = AsyncGuard(store, lease=30.0, wait=0)
        assert current_context() is None
        receipt = await aguard.execute(
            "ctx-1", "export", {"a": 1}, sync_fn if kind == "sync" else async_fn
        )
        assert current_context() is None
        await aguard.aclose()
        return receipt

    receipt = asyncio.run(main())
    [(given, current)] = seen
    assert current == given
    assert given.request_id == "ctx-1"
    assert given.execution_id == receipt.execution_id
    assert given.payload == {"a": 1}
    assert current_context() is None
    assert ledger.count() == 1


# -- P9, the async half -------------------------------------------------------------------------


@pytest.mark.parametrize("wait", [10.0, 0.0])
def test_p9_twenty_tasks_behind_a_start_line_run_the_transfer_once(
    wait: float, store: Any, ledger: Ledger
) -> None:
    """P9: twenty tasks released at once run the transfer once and see no raw database error."""
    transfer_args = {"src": "ACC-1", "dst": "ACC-2", "amount_cents": 100}

    async def transfer(ctx: ExecutionContext) -> dict[str, Any]:
        await asyncio.sleep(0.2)
        ledger.append(ctx.request_id, ctx.execution_id)
        return {"transfer_id": "tr-" + ctx.execution_id[:8], **ctx.payload}

    async def main() -> list[Any]:
        aguard = AsyncGuard(store, lease=30.0, wait=wait)
        start = asyncio.Event()

        async def caller() -> Receipt:
            await start.wait()
            return await aguard.execute("k-9", "transfer", transfer_args, transfer)

        tasks = [asyncio.create_task(caller()) for _ in range(20)]
        await asyncio.sleep(0.05)  # everyone at the start line
        start.set()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await aguard.aclose()
        return list(out)

    outcomes = asyncio.run(main())
    receipts = [o for o in outcomes if isinstance(o, Receipt)]
    others = [o for o in outcomes if not isinstance(o, Receipt)]
    assert all(isinstance(o, InProgressError) for o in others), others
    assert sum(not r.replay for r in receipts) == 1
    if wait:
        assert len(receipts) == 20
    else:
        assert len(receipts) == 1
        assert len(others) == 19
    assert len({r.execution_id for r in receipts}) == 1
    assert ledger.count() == 1
    [(_, execution_id)] = ledger.rows()
    assert receipts[0].execution_id == execution_id
