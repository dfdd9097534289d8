"""AsyncFinalityGate: the same gate through the async driver, on every store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from safeagent import (
    AsyncFinalityGate,
    AsyncGuard,
    CaseState,
    ConsensusPolicy,
    InvalidTransitionError,
    NotFinalError,
)
from tests.conftest import Ledger


def test_async_gate_signals_resolves_and_settles_once(store: Any, ledger: Ledger) -> None:
    """Signals finalize, settle runs once from FINAL (async fn), then replays; SETTLED."""

    async def scenario() -> None:
        guard = AsyncGuard(store, lease=30, wait=5)
        gate = AsyncFinalityGate(guard, policy=ConsensusPolicy(threshold=0.7, quorum=2))

        async def pay(outcome: str, ctx: Any) -> dict[str, str]:
            await asyncio.sleep(0.05)
            ledger.append(ctx.request_id, outcome)
            return {"paid": outcome}

        case = await gate.signal("c-1", "A", "approve", 0.9)
        assert case.state is CaseState.RESOLVED_PROVISIONAL
        with pytest.raises(NotFinalError) as info:
            await gate.settle("c-1", "pay", pay)
        assert info.value.state is CaseState.RESOLVED_PROVISIONAL
        case = await gate.signal("c-1", "B", "approve", 0.8)
        assert (case.state, case.outcome) == (CaseState.FINAL, "approve")
        receipts = await asyncio.gather(*(gate.settle("c-1", "pay", pay) for _ in range(10)))
        assert ledger.count() == 1
        assert {r.execution_id for r in receipts} == {receipts[0].execution_id}
        assert sum(not r.replay for r in receipts) == 1
        assert (await gate.get("c-1")).state is CaseState.SETTLED  # type: ignore[union-attr]
        late = await gate.signal("c-1", "C", "reject", 1.0)
        assert late.state is CaseState.SETTLED
        assert [status for _, status in await gate.history("c-1")] == ["live", "live", "late"]

        await gate.signal("c-2", "A", "approve", 0.9)
        await gate.signal("c-2", "B", "reject", 0.9)
        resolved = await gate.resolve("c-2", "reject", by="ops", reason="manual review")
        assert (resolved.state, resolved.outcome, resolved.resolved_by) == (
            CaseState.FINAL,
            "reject",
            "ops",
        )
        with pytest.raises(InvalidTransitionError):
            await gate.resolve("c-2", "approve", by="ops", reason="again")
        assert [c.case_id for c in await gate.cases(states=[CaseState.FINAL])] == ["c-2"]
        await guard.aclose()

    asyncio.run(scenario())


def test_async_gate_signals_from_many_tasks_are_all_recorded(store: Any) -> None:
    """50 concurrent signals from distinct sources: none lost, one live signal each."""

    async def scenario() -> None:
        guard = AsyncGuard(store)
        gate = AsyncFinalityGate(guard, policy=ConsensusPolicy(threshold=1.0, quorum=60))
        await asyncio.gather(
            *(gate.signal("c-many", f"agent-{i}", "approve", 0.5) for i in range(50))
        )
        case = await gate.get("c-many")
        assert case is not None
        assert len(case.signals) == 50
        assert len(await gate.history("c-many")) == 50
        await guard.aclose()

    asyncio.run(scenario())
