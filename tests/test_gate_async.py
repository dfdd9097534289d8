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
    FinalityGate,
    Guard,
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


def test_a_signal_that_may_not_open_a_case_refuses_an_absent_one(store: Any) -> None:
    """``open_absent=False`` (what SafeAgent's MCP server sends a model's signals with):
    an absent case is refused with nothing recorded (no case, no signal, no audit
    event), so a signal cannot fix a case's policy before the application opens it; an
    open case takes the signal as usual. Both gates, every store."""
    guard = Guard(store)
    gate = FinalityGate(guard)
    with pytest.raises(InvalidTransitionError, match="no case 'c-1'"):
        gate.signal("c-1", "model", "approve", 1.0, open_absent=False)
    assert gate.get("c-1") is None
    assert guard.audit_trail("c-1") == []
    gate.open("c-1", policy=ConsensusPolicy(0.7, 2))
    case = gate.signal("c-1", "model", "approve", 1.0, open_absent=False)
    assert (case.state, case.policy.quorum) == (CaseState.RESOLVED_PROVISIONAL, 2)

    async def scenario() -> None:
        agate = AsyncFinalityGate(AsyncGuard(store))
        with pytest.raises(InvalidTransitionError, match="no case 'c-2'"):
            await agate.signal("c-2", "model", "approve", 1.0, open_absent=False)
        assert await agate.get("c-2") is None
        await agate.open("c-2")
        case = await agate.signal("c-2", "model", "approve", 1.0, open_absent=False)
        assert case.state is CaseState.FINAL  # the default policy: 0.8, quorum 1

    asyncio.run(scenario())
