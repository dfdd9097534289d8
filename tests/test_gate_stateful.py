"""A hypothesis state machine over one case of the finality gate, on both stores.

Rules: signals (a few sources, two outcomes, confidences including 0 and 1), operator
resolutions, settlement attempts (succeeding, NotExecuted, failing, outcome unknown), an
operator reconciling an in-doubt settlement, and bursts of concurrent settle calls. A
reference model written from DESIGN section 4 predicts every state; invariants check the
effect ledger (separate from the guard's database), the settled receipt, the audited
transitions and the final outcome.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from safeagent import (
    CaseState,
    ConsensusPolicy,
    EventKind,
    FinalityGate,
    Guard,
    InvalidTransitionError,
    MemoryStore,
    NotExecuted,
    NotFinalError,
    OutcomeUnknownError,
    Receipt,
    ReplayedFailureError,
    SQLiteStore,
    Status,
)
from safeagent._cases import TRANSITIONS
from tests.conftest import Ledger

CASE = "case-1"
RID = "case:" + CASE
SOURCES = ("s1", "s2", "s3")
OUTCOMES = ("approve", "reject")
CONFIDENCES = (0.0, 0.3, 0.5, 0.8, 1.0)
BEFORE_FINAL = (CaseState.OPEN, CaseState.RESOLVED_PROVISIONAL, CaseState.IN_RECONCILIATION)


class SettleFailedError(Exception):
    """The side effect failed for good (stored as FAILED)."""


def reference_winner(
    live: dict[str, tuple[str, float]], threshold: float, quorum: int
) -> str | None:
    """DESIGN section 4's formula with exact arithmetic, written independently."""
    if not live:
        return None
    n = len(live)
    sums: dict[str, Fraction] = {}
    voters: Counter[str] = Counter()
    for outcome, conf in live.values():
        sums[outcome] = sums.get(outcome, Fraction(0)) + Fraction(conf)
        if conf > 0:
            voters[outcome] += 1
    for outcome, total in sums.items():
        rivals = [t for o, t in sums.items() if o != outcome]
        if (
            total / n >= Fraction(threshold)
            and voters[outcome] >= quorum
            and all(total > t for t in rivals)
        ):
            return outcome
    return None


class GateMachine(RuleBasedStateMachine):
    """One case driven at random; a reference model predicts its state."""

    store_kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gate-sm-"))
        self.ledger = Ledger(self.dir / "ledger.db")
        self.store: Any = (
            MemoryStore() if self.store_kind == "memory" else SQLiteStore(self.dir / "guard.db")
        )
        self.guard = Guard(self.store, wait=10.0, lease=60.0)
        self.gate = FinalityGate(self.guard)
        # The reference model.
        self.state = CaseState.OPEN
        self.provisional: str | None = None
        self.outcome: str | None = None
        self.live: dict[str, tuple[str, float]] = {}
        self.threshold = 0.8
        self.quorum = 1
        self.record: Status | None = None  # the settlement record's status as we expect it
        self.terminal: tuple[Any, ...] | None = None  # the settled receipt, once set
        self.succeeded = False  # a settle ran fn to success (the effect happened)

    def teardown(self) -> None:
        self.guard.close()
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------

    def _effect(self, mode: str, calls: list[str]) -> Any:
        def fn(outcome: str, ctx: Any) -> dict[str, Any]:
            calls.append(outcome)
            if mode == "not_executed":
                raise NotExecuted("declined before anything happened")
            if mode == "fail":
                raise SettleFailedError("declined for good")
            time.sleep(0.005 if mode == "slow" else 0)
            self.ledger.append(ctx.request_id, outcome)
            if mode == "unknown":
                raise TimeoutError("sent, no answer")
            return {"outcome": outcome, "by": threading.current_thread().name}

        return fn

    def _remember_terminal(self, receipt: Receipt) -> None:
        key = (
            receipt.execution_id,
            receipt.status,
            receipt.result,
            None if receipt.error is None else receipt.error.to_dict(),
        )
        if self.terminal is None:
            self.terminal = key
        assert key == self.terminal

    def _stored(self) -> Receipt:
        receipt = self.guard.get(RID)
        assert receipt is not None
        return receipt

    # -- rules --------------------------------------------------------------------------

    @initialize(threshold=st.sampled_from([0.5, 0.6, 0.8, 1.0]), quorum=st.sampled_from([1, 2]))
    def open_case(self, threshold: float, quorum: int) -> None:
        self.threshold, self.quorum = threshold, quorum
        case = self.gate.open(CASE, policy=ConsensusPolicy(threshold=threshold, quorum=quorum))
        assert case.state is CaseState.OPEN

    @rule(
        source=st.sampled_from(SOURCES),
        outcome=st.sampled_from(OUTCOMES),
        confidence=st.sampled_from(CONFIDENCES),
    )
    def signal(self, source: str, outcome: str, confidence: float) -> None:
        history = len(self.gate.history(CASE))
        case = self.gate.signal(CASE, source, outcome, confidence)
        last_status = self.gate.history(CASE)[-1][1]
        assert len(self.gate.history(CASE)) == history + 1
        if self.state not in BEFORE_FINAL:
            assert last_status == "late"
        else:
            assert last_status == "live"
            self.live[source] = (outcome, confidence)
            agreed = {o for o, _ in self.live.values()}
            single = next(iter(agreed)) if len(agreed) == 1 else None
            if self.state is CaseState.OPEN:
                self.state = (
                    CaseState.RESOLVED_PROVISIONAL if single else CaseState.IN_RECONCILIATION
                )
                self.provisional = single
            elif self.state is CaseState.RESOLVED_PROVISIONAL and single != self.provisional:
                self.state = CaseState.IN_RECONCILIATION
                self.provisional = None
            winner = reference_winner(self.live, self.threshold, self.quorum)
            if winner is not None:
                self.state, self.outcome = CaseState.FINAL, winner
        assert case.state is self.state
        assert case.outcome == self.outcome
        assert {s.source: (s.outcome, s.confidence) for s in case.signals} == self.live

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), confidence=st.sampled_from(CONFIDENCES))
    def change_mind(self, data: st.DataObject, confidence: float) -> None:
        """A source with a live signal sends the other outcome (DESIGN: RP -> IR)."""
        source = data.draw(st.sampled_from(sorted(self.live)))
        other = OUTCOMES[1 - OUTCOMES.index(self.live[source][0])]
        self.signal(source, other, confidence)

    @rule(outcome=st.sampled_from(OUTCOMES))
    def resolve(self, outcome: str) -> None:
        if self.state in (CaseState.RESOLVED_PROVISIONAL, CaseState.IN_RECONCILIATION):
            case = self.gate.resolve(CASE, outcome, by="op", reason="human approval")
            self.state, self.outcome = CaseState.FINAL, outcome
            assert (case.state, case.outcome, case.resolved_by) == (self.state, outcome, "op")
            return
        before = self.gate.get(CASE)
        with pytest.raises(InvalidTransitionError):
            self.gate.resolve(CASE, outcome, by="op", reason="human approval")
        assert self.gate.get(CASE) == before

    @rule(mode=st.sampled_from(["ok", "not_executed", "fail", "unknown"]))
    def settle(self, mode: str) -> None:
        calls: list[str] = []
        fn = self._effect(mode, calls)
        unknown = (TimeoutError,)
        if self.state in BEFORE_FINAL:
            with pytest.raises(NotFinalError) as info:
                self.gate.settle(CASE, "pay_out", fn, outcome_unknown=unknown)
            assert info.value.state is self.state
            assert calls == []
            return
        if self.record is Status.IN_DOUBT:
            with pytest.raises(OutcomeUnknownError):
                self.gate.settle(CASE, "pay_out", fn, outcome_unknown=unknown)
            assert calls == []
            return
        if self.terminal is not None:
            self._expect_replay(fn, calls)
            return
        # FINAL, no outcome recorded yet: this call runs fn.
        if mode == "ok":
            receipt = self.gate.settle(CASE, "pay_out", fn, outcome_unknown=unknown)
            assert (receipt.status, receipt.replay) == (Status.SUCCEEDED, False)
            self._settled(receipt, succeeded=True)
        elif mode == "not_executed":
            with pytest.raises(NotExecuted):
                self.gate.settle(CASE, "pay_out", fn, outcome_unknown=unknown)
            self.record = Status.RELEASED
        elif mode == "fail":
            with pytest.raises(SettleFailedError):
                self.gate.settle(CASE, "pay_out", fn, outcome_unknown=unknown)
            self._settled(self._stored(), succeeded=False)
        else:
            with pytest.raises(TimeoutError):
                self.gate.settle(CASE, "pay_out", fn, outcome_unknown=unknown)
            self.record = Status.IN_DOUBT
        assert calls == [self.outcome]

    def _expect_replay(self, fn: Any, calls: list[str]) -> None:
        assert self.terminal is not None
        if self.terminal[1] is Status.SUCCEEDED:
            receipt = self.gate.settle(CASE, "pay_out", fn)
            assert receipt.replay
        else:
            with pytest.raises(ReplayedFailureError) as info:
                self.gate.settle(CASE, "pay_out", fn)
            receipt = info.value.receipt
        self._remember_terminal(receipt)
        assert calls == []

    def _settled(self, receipt: Receipt, *, succeeded: bool) -> None:
        self.state = CaseState.SETTLED
        self.record = receipt.status
        self.succeeded = self.succeeded or succeeded
        self._remember_terminal(receipt)

    @precondition(lambda self: self.record is Status.IN_DOUBT)
    @rule(status=st.sampled_from(["succeeded", "failed"]))
    def reconcile(self, status: str) -> None:
        receipt = self.guard.resolve(
            RID, status, result={"reconciled": True}, by="op", reason="asked the bank"
        )
        self._settled(receipt, succeeded=False)

    @rule(n=st.integers(min_value=2, max_value=5))
    def settle_burst(self, n: int) -> None:
        barrier = threading.Barrier(n, timeout=30)
        calls: list[str] = []
        fn = self._effect("slow", calls)
        results: list[Any] = [None] * n

        def worker(i: int) -> None:
            try:
                barrier.wait()
                results[i] = self.gate.settle(CASE, "pay_out", fn)
            except BaseException as exc:
                results[i] = exc

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)

        if self.state in BEFORE_FINAL:
            assert all(isinstance(r, NotFinalError) for r in results), results
            assert calls == []
        elif self.record is Status.IN_DOUBT:
            assert all(isinstance(r, OutcomeUnknownError) for r in results), results
            assert calls == []
        elif self.terminal is not None and self.terminal[1] is Status.FAILED:
            assert all(isinstance(r, ReplayedFailureError) for r in results), results
            assert {r.receipt.execution_id for r in results} == {self.terminal[0]}
            assert calls == []
        else:
            assert all(isinstance(r, Receipt) for r in results), results
            assert len({r.execution_id for r in results}) == 1
            fresh = [r for r in results if not r.replay]
            if self.terminal is None:
                assert len(fresh) == 1
                assert calls == [self.outcome]
                self._settled(fresh[0], succeeded=True)
            else:
                assert fresh == []
                assert calls == []
            for r in results:
                self._remember_terminal(r)

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def ledger_counts_effects_only_after_final(self) -> None:
        count = self.ledger.count()
        assert count <= 1
        if self.state in BEFORE_FINAL:
            assert count == 0
        if self.succeeded:
            assert count == 1

    @invariant()
    def settled_receipt_never_changes(self) -> None:
        if self.terminal is not None:
            self._remember_terminal(self._stored())

    @invariant()
    def case_matches_the_model(self) -> None:
        case = self.gate.get(CASE)
        if case is None:  # before initialize
            return
        assert case.state is self.state
        assert case.outcome == self.outcome  # a FINAL outcome never changes afterwards

    @invariant()
    def audited_transitions_are_in_the_table(self) -> None:
        for event in self.guard.audit_trail(CASE):
            if event.kind is not EventKind.STATE_CHANGE:
                continue
            frm, to = event.detail["from"], CaseState(event.detail["to"])
            if frm is None:
                assert to is CaseState.OPEN
            else:
                assert to in TRANSITIONS[CaseState(frm)], (frm, to)


class MemoryGateMachine(GateMachine):
    store_kind = "memory"


class SQLiteGateMachine(GateMachine):
    store_kind = "sqlite"


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize(
    "machine", [MemoryGateMachine, SQLiteGateMachine], ids=["memory", "sqlite"]
)
def test_gate_state_machine(machine: type[GateMachine]) -> None:
    """Random signals, resolutions and settlements never break the gate's invariants."""
    run_state_machine_as_test(machine, settings=SETTINGS)
