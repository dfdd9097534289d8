"""The finality gate (DESIGN section 4): a case's side effect runs only once it is FINAL.

Covers the transition table pair by pair, the consensus formula's edges, settlement,
operator resolution, concurrency (threads and spawned processes) and restarts. Ground
truth for side effects is an effect ledger separate from the guard's database (the
``ledger`` fixture, or an appended text file for child processes); tests never count the
guard's own records. Most tests run over both stores (the ``guard`` fixture).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from safeagent import (
    ActionMismatchError,
    AuditEvent,
    Case,
    CaseState,
    ConfigurationError,
    ConsensusPolicy,
    EventKind,
    FinalityGate,
    Guard,
    InvalidInputError,
    InvalidRequestIdError,
    InvalidTransitionError,
    NotExecuted,
    NotFinalError,
    OutcomeUnknownError,
    Receipt,
    ReplayedFailureError,
    Signal,
    SQLiteStore,
    Status,
    Tally,
)
from safeagent._cases import MAX_QUORUM, TRANSITIONS, CaseRow, apply_signal, check_transition
from tests import _gate_workers
from tests._workers import ROOT, append_line, child_env, read_lines, wait_until
from tests.conftest import FakeClock, Ledger

OPEN = CaseState.OPEN
RP = CaseState.RESOLVED_PROVISIONAL
IR = CaseState.IN_RECONCILIATION
FINAL = CaseState.FINAL
SETTLED = CaseState.SETTLED
APPROVE, REJECT = "approve", "reject"
CID = "refund-17"

# DESIGN section 4's table, written out again here (not imported) so the library's own
# TRANSITIONS table is checked against the contract.
DESIGN_TABLE: dict[CaseState, set[CaseState]] = {
    OPEN: {RP, IR},
    RP: {IR, FINAL},
    IR: {FINAL},
    FINAL: {SETTLED},
    SETTLED: set(),
}
ALL_PAIRS = [(frm, to) for frm in CaseState for to in CaseState]
ALLOWED_PAIRS = [(frm, to) for frm, to in ALL_PAIRS if to in DESIGN_TABLE[frm]]
DISALLOWED_PAIRS = [(frm, to) for frm, to in ALL_PAIRS if to not in DESIGN_TABLE[frm]]


def _pair_id(pair: tuple[CaseState, CaseState]) -> str:
    short = {OPEN: "OPEN", RP: "RP", IR: "IR", FINAL: "FINAL", SETTLED: "SETTLED"}
    return f"{short[pair[0]]}->{short[pair[1]]}"


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def guard(sync_guard: Guard) -> Guard:
    """The gate drives a sync Guard; AsyncFinalityGate has its own tests (test_gate_async)."""
    return sync_guard


@pytest.fixture
def gate(guard: Guard) -> FinalityGate:
    """A gate on the parametrized guard with the default policy (threshold 0.8, quorum 1)."""
    return FinalityGate(guard)


def effect(ledger: Ledger, seen: list[str] | None = None) -> Any:
    """A settlement side effect: one ledger row per run; returns the outcome it was given."""

    def fn(outcome: str, ctx: Any) -> dict[str, Any]:
        if seen is not None:
            seen.append(outcome)
        row = ledger.append(ctx.request_id, outcome)
        return {"outcome": outcome, "row": row}

    return fn


def case_events(guard: Guard, case_id: str = CID) -> list[AuditEvent]:
    """The audit events written about the case itself (signals and state changes)."""
    return guard.audit_trail(case_id)


def transitions(guard: Guard, case_id: str = CID) -> list[tuple[str | None, str]]:
    """Every audited state change of the case, in order, as (from, to)."""
    return [
        (e.detail["from"], e.detail["to"])
        for e in case_events(guard, case_id)
        if e.kind is EventKind.STATE_CHANGE
    ]


def snapshot(gate: FinalityGate, case_id: str = CID) -> dict[str, Any]:
    """Everything a refused or ignored request must leave unchanged."""
    case = gate.get(case_id)
    assert case is not None
    return {
        "state": case.state,
        "outcome": case.outcome,
        "provisional_outcome": case.provisional_outcome,
        "version": case.version,
        "signals": case.signals,
        "tally": case.tally,
        "policy": case.policy,
        "resolved_by": case.resolved_by,
        "updated_at_ms": case.updated_at_ms,
        "history": gate.history(case_id),
        "events": case_events(gate.guard, case_id),
    }


def drive(gate: FinalityGate, ledger: Ledger, state: CaseState, case_id: str = CID) -> Case:
    """Bring a fresh case into ``state`` through the public API only (default policy)."""
    if state is OPEN:
        case = gate.open(case_id)
    elif state is RP:
        case = gate.signal(case_id, "a", APPROVE, 0.5)  # 0.5 < 0.8: provisional
    elif state is IR:
        gate.signal(case_id, "a", APPROVE, 0.7)
        case = gate.signal(case_id, "b", REJECT, 0.6)  # conflict: 0.35 vs 0.3
    elif state is FINAL:
        case = gate.signal(case_id, "a", APPROVE, 0.9)  # 0.9 >= 0.8, one voter
    else:
        gate.signal(case_id, "a", APPROVE, 0.9)
        gate.settle(case_id, "pay_out", effect(ledger))
        case = gate.get(case_id)  # type: ignore[assignment]
    assert case is not None
    assert case.state is state
    assert ledger.count() == (1 if state is SETTLED else 0)
    return case


def assert_late_and_ignored(
    gate: FinalityGate, before: dict[str, Any], case: Case, source: str, outcome: str
) -> None:
    """The signal just sent was recorded as late (history and audit) and changed nothing."""
    after = snapshot(gate)
    assert case.state is before["state"]
    assert case.version == before["version"]
    assert {k: v for k, v in after.items() if k not in ("history", "events")} == {
        k: v for k, v in before.items() if k not in ("history", "events")
    }
    assert after["history"][:-1] == before["history"]
    late_signal, status = after["history"][-1]
    assert (late_signal.source, late_signal.outcome, status) == (source, outcome, "late")
    assert after["events"][:-1] == before["events"]
    event = after["events"][-1]
    assert event.kind is EventKind.SIGNAL
    assert event.actor == source
    assert event.detail["late"] is True
    assert event.detail["outcome"] == outcome


# -- 1. the transition table, pair by pair ------------------------------------------------


def test_transitions_table_is_the_design_table() -> None:
    """The library's TRANSITIONS table is exactly DESIGN section 4's table."""
    assert {frm: set(to) for frm, to in TRANSITIONS.items()} == DESIGN_TABLE


@pytest.mark.parametrize(("frm", "to"), ALL_PAIRS, ids=[_pair_id(p) for p in ALL_PAIRS])
def test_check_transition_allows_exactly_the_table(frm: CaseState, to: CaseState) -> None:
    """check_transition passes the table's pairs and raises InvalidTransitionError for the rest."""
    if to in DESIGN_TABLE[frm]:
        check_transition("c", frm, to)
        return
    with pytest.raises(InvalidTransitionError) as info:
        check_transition("c", frm, to)
    assert (info.value.case_id, info.value.from_state, info.value.to_state) == ("c", frm, to)


ROUTES = [
    (OPEN, RP, "all live signals agree"),
    (OPEN, IR, "live signals conflict"),
    (RP, IR, "a conflicting signal"),
    (RP, IR, "a source changes its mind"),
    (RP, FINAL, "consensus"),
    (RP, FINAL, "operator"),
    (IR, FINAL, "consensus"),
    (IR, FINAL, "operator"),
    (FINAL, SETTLED, "terminal receipt"),
]


def test_routes_cover_every_allowed_pair() -> None:
    """Every allowed pair of the table has at least one route tested below."""
    assert {(frm, to) for frm, to, _ in ROUTES} == set(ALLOWED_PAIRS)


@pytest.mark.parametrize(
    ("frm", "to", "route"), ROUTES, ids=[f"{_pair_id((f, t))}:{r}" for f, t, r in ROUTES]
)
def test_allowed_transition_happens_by_its_documented_route(
    gate: FinalityGate, guard: Guard, ledger: Ledger, frm: CaseState, to: CaseState, route: str
) -> None:
    """Each allowed (from, to) pair happens by its documented route and is audited once."""
    before = drive(gate, ledger, frm)
    seen_before = transitions(guard)
    if route == "live signals conflict":
        # Through the public API a case leaves OPEN on its first signal, and one signal
        # always agrees with itself, so OPEN never holds two live signals. The rule and
        # the store's audit of it are shown with the store applying the pure rule to an
        # OPEN case that has a conflicting live signal.
        row = CaseRow("default", CID, OPEN, None, None, 0.8, 1, 1, 0, 0)
        pure = apply_signal(row, [Signal("a", APPROVE, 0.5)], Signal("b", REJECT, 0.5))
        assert pure.path == (IR,)
        assert pure.provisional_outcome is None
        sig = Signal("b", REJECT, 0.5)
        update = guard.store.update_case(
            "default",
            CID,
            lambda case, _live: apply_signal(case, [Signal("a", APPROVE, 0.5)], sig),
            signal=sig,
            actor="b",
            detail={},
        )
        case = gate.get(CID)
        assert update.case.state is IR
    elif route == "all live signals agree":
        case = gate.signal(CID, "a", APPROVE, 0.5)
        assert case.provisional_outcome == APPROVE
    elif route == "a conflicting signal":
        case = gate.signal(CID, "b", REJECT, 0.3)
        assert case.provisional_outcome is None
    elif route == "a source changes its mind":
        case = gate.signal(CID, "a", REJECT, 0.5)
    elif route == "consensus":
        # RP: a approve 0.5 -> 0.9 ; IR: b reject 0.6 -> approve 1.0 gives (0.7 + 1) / 2.
        case = gate.signal(CID, *(("a", APPROVE, 0.9) if frm is RP else ("b", APPROVE, 1.0)))
        assert case.outcome == APPROVE
        assert case.tally.winner == APPROVE
        assert case.resolved_by is None
    elif route == "operator":
        case = gate.resolve(CID, REJECT, by="alice", reason="manual review")
        assert case.outcome == REJECT
        assert case.resolved_by == "alice"
    else:
        receipt = gate.settle(CID, "pay_out", effect(ledger))
        assert receipt.status is Status.SUCCEEDED
        assert ledger.count() == 1
        case = gate.get(CID)
    assert case is not None
    assert case.state is to
    assert case.version == before.version + 1
    assert transitions(guard) == [*seen_before, (frm.value, to.value)]


ATTEMPTS: dict[tuple[CaseState, CaseState], str] = {
    (OPEN, OPEN): "reopen",
    (OPEN, FINAL): "resolve",
    (OPEN, SETTLED): "settle before final",
    (RP, OPEN): "reopen",
    (RP, RP): "agreeing signal",
    (RP, SETTLED): "settle before final",
    (IR, OPEN): "reopen",
    (IR, RP): "signal after which all agree",
    (IR, IR): "conflicting signal",
    (IR, SETTLED): "settle before final",
    (FINAL, OPEN): "reopen",
    (FINAL, RP): "late agreeing signal",
    (FINAL, IR): "late conflicting signal",
    (FINAL, FINAL): "resolve",
    (SETTLED, OPEN): "reopen",
    (SETTLED, RP): "late agreeing signal",
    (SETTLED, IR): "late conflicting signal",
    (SETTLED, FINAL): "resolve",
    (SETTLED, SETTLED): "settle again",
}


def test_attempts_cover_every_disallowed_pair() -> None:
    """Every disallowed pair of the table has an attempt through the public API below."""
    assert set(ATTEMPTS) == set(DISALLOWED_PAIRS)


@pytest.mark.parametrize(
    ("frm", "to"), DISALLOWED_PAIRS, ids=[_pair_id(p) for p in DISALLOWED_PAIRS]
)
def test_disallowed_transition_is_refused_or_ignored_and_changes_nothing(
    gate: FinalityGate, guard: Guard, ledger: Ledger, frm: CaseState, to: CaseState
) -> None:
    """A disallowed (from, to) pair raises a typed error or is ignored; the case stays as it was."""
    with pytest.raises(InvalidTransitionError):
        check_transition(CID, frm, to)
    drive(gate, ledger, frm)
    effects = ledger.count()
    before = snapshot(gate)
    attempt = ATTEMPTS[(frm, to)]

    if attempt == "reopen":
        # Another policy is refused (a case's policy never changes); the same policy, or
        # none, returns the case as it is.
        with pytest.raises(ConfigurationError, match="policy never changes"):
            gate.open(CID, policy=ConsensusPolicy(threshold=0.1, quorum=1))
        assert snapshot(gate) == before
        for again in (gate.open(CID), gate.open(CID, policy=ConsensusPolicy())):
            assert again.state is frm
        assert snapshot(gate) == before
    elif attempt == "resolve":
        with pytest.raises(InvalidTransitionError) as info:
            gate.resolve(CID, REJECT, by="alice", reason="try to re-decide")
        assert (info.value.from_state, info.value.to_state) == (frm, FINAL)
        assert snapshot(gate) == before
    elif attempt == "settle before final":
        ran: list[str] = []
        with pytest.raises(NotFinalError) as nf:
            gate.settle(CID, "pay_out", effect(ledger, ran))
        assert (nf.value.case_id, nf.value.state) == (CID, frm)
        assert nf.value.tally == before["tally"]
        assert ran == []
        assert guard.get("case:" + CID) is None
        assert snapshot(gate) == before
    elif attempt == "settle again":
        first = guard.get("case:" + CID)
        again = gate.settle(CID, "pay_out", effect(ledger))
        assert first is not None
        assert again.replay
        assert (again.execution_id, again.result) == (first.execution_id, first.result)
        assert snapshot(gate) == before
    elif attempt in ("agreeing signal", "signal after which all agree", "conflicting signal"):
        # Not a transition: the signal is taken (the version moves) but no state change
        # happens and none is audited; RP keeps its provisional outcome, IR stays IR.
        source, outcome, conf = {
            "agreeing signal": ("c", APPROVE, 0.2),
            "signal after which all agree": ("b", APPROVE, 0.6),
            "conflicting signal": ("c", REJECT, 0.1),
        }[attempt]
        case = gate.signal(CID, source, outcome, conf)
        assert case.state is frm
        assert case.outcome is None
        assert case.provisional_outcome == before["provisional_outcome"]
        if attempt == "signal after which all agree":
            assert {s.outcome for s in case.signals} == {APPROVE}
        assert transitions(guard) == [
            (e.detail["from"], e.detail["to"])
            for e in before["events"]
            if e.kind is EventKind.STATE_CHANGE
        ]
    else:
        source, outcome = ("c", APPROVE) if attempt == "late agreeing signal" else ("b", REJECT)
        case = gate.signal(CID, source, outcome, 1.0)
        assert_late_and_ignored(gate, before, case, source, outcome)
    assert ledger.count() == effects


# -- 2. the consensus formula -------------------------------------------------------------


def test_tie_never_finalizes_even_with_threshold_and_quorum_met(
    guard: Guard, ledger: Ledger
) -> None:
    """Two outcomes with equal scores never finalize, though one meets threshold and quorum."""
    gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=0.25, quorum=2))
    gate.signal(CID, "a", APPROVE, 0.5)
    gate.signal(CID, "c", REJECT, 1.0)
    gate.signal(CID, "b", APPROVE, 0.0)
    case = gate.signal(CID, "b", APPROVE, 0.5)  # approve 1.0/3 (2 voters) = reject 1.0/3
    assert case.tally.scores == {APPROVE: 1 / 3, REJECT: 1 / 3}
    assert case.tally.voters == {APPROVE: 2, REJECT: 1}
    assert case.tally.winner is None
    assert case.state is IR
    assert case.outcome is None
    with pytest.raises(NotFinalError):
        gate.settle(CID, "pay_out", effect(ledger))
    assert ledger.count() == 0


CONFIDENCE = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-17, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 1 / 3, 1.0]),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
)


@given(
    threshold=CONFIDENCE.filter(lambda t: t > 0),
    quorum=st.integers(min_value=1, max_value=4),
    votes=st.lists(st.tuples(st.sampled_from("abc"), CONFIDENCE), min_size=1, max_size=40),
)
@settings(max_examples=400, deadline=None)
def test_tally_is_the_exact_decimal_formula(
    threshold: float, quorum: int, votes: list[tuple[str, float]]
) -> None:
    """The policy's tally against DESIGN section 4's formula written with fractions of the
    numbers as written (``repr``): the same winner and scores, at the edges of the float
    range too (subnormals beside 1.0, where any rounding would show)."""
    policy = ConsensusPolicy(threshold=threshold, quorum=quorum)
    tally = policy.tally([Signal(f"s{i}", o, c) for i, (o, c) in enumerate(votes)])
    n = len(votes)
    sums: dict[str, Fraction] = {}
    for o, c in votes:
        sums[o] = sums.get(o, Fraction(0)) + Fraction(repr(c))
    voters = {o: sum(1 for v, c in votes if v == o and c > 0) for o in sums}
    winners = [
        o
        for o, total in sums.items()
        if total / n >= Fraction(repr(threshold))
        and voters[o] >= quorum
        and all(total > t for v, t in sums.items() if v != o)
    ]
    assert tally.winner == (winners[0] if winners else None)
    assert dict(tally.scores) == {o: float(t / n) for o, t in sums.items()}


def test_tally_of_thousands_of_signals_is_exact() -> None:
    """Sums far apart in magnitude stay exact: 3,000 signals of 1e-300 beside one of 1.0
    outscore one lone 1.0 by exactly their sum (floats would lose them entirely)."""
    policy = ConsensusPolicy(threshold=0.5, quorum=1)
    signals = [Signal("x", APPROVE, 1.0), Signal("y", REJECT, 1.0)]
    signals += [Signal(f"t{i}", APPROVE, 1e-300) for i in range(3000)]
    assert policy.tally(signals).winner is None  # 1.0 + 3000e-300 over 3002 is < 0.5
    assert ConsensusPolicy(threshold=1e-300, quorum=1).tally(signals).winner == APPROVE


def test_tie_in_the_policy_tally_has_no_winner() -> None:
    """A 2-2 tie at full confidence has no winner even at a threshold it meets."""
    policy = ConsensusPolicy(threshold=0.5, quorum=1)
    tally = policy.tally(
        [
            Signal("a", APPROVE, 1.0),
            Signal("b", REJECT, 1.0),
            Signal("c", APPROVE, 1.0),
            Signal("d", REJECT, 1.0),
        ]
    )
    assert tally.scores == {APPROVE: 0.5, REJECT: 0.5}
    assert tally.winner is None


def test_low_confidence_agreement_does_not_finalize(gate: FinalityGate) -> None:
    """Two sources agreeing at confidence 0.01 stay provisional at threshold 0.8."""
    gate.signal(CID, "a", APPROVE, 0.01)
    case = gate.signal(CID, "b", APPROVE, 0.01)
    assert case.state is RP
    assert case.provisional_outcome == APPROVE
    assert case.tally == Tally(scores={APPROVE: 0.01}, voters={APPROVE: 2}, winner=None)


def test_one_full_confidence_source_is_below_quorum_two(guard: Guard) -> None:
    """One source at confidence 1.0 does not finalize under quorum 2; a second one does."""
    gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=0.8, quorum=2))
    case = gate.signal(CID, "a", APPROVE, 1.0)
    assert case.state is RP
    assert case.tally == Tally(scores={APPROVE: 1.0}, voters={APPROVE: 1}, winner=None)
    case = gate.signal(CID, "b", APPROVE, 1.0)
    assert (case.state, case.outcome) == (FINAL, APPROVE)


def test_zero_confidence_never_finalizes(gate: FinalityGate) -> None:
    """Every source at confidence 0: never final, and no source counts as a voter."""
    for source in ("a", "b", "c"):
        case = gate.signal(CID, source, APPROVE, 0.0)
        assert case.state is RP
    assert case.tally == Tally(scores={APPROVE: 0.0}, voters={}, winner=None)


def test_quorum_counts_only_positive_confidence(guard: Guard) -> None:
    """A confidence-0 vote does not count toward the quorum; the same source at 0.01 does."""
    gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=0.5, quorum=2))
    gate.signal(CID, "a", APPROVE, 1.0)
    case = gate.signal(CID, "b", APPROVE, 0.0)
    assert case.tally.scores == {APPROVE: 0.5}  # meets the threshold...
    assert case.tally.voters == {APPROVE: 1}  # ...but one voter only
    assert case.state is RP
    case = gate.signal(CID, "b", APPROVE, 0.01)
    assert case.tally.voters == {APPROVE: 2}
    assert (case.state, case.outcome) == (FINAL, APPROVE)


def test_source_changing_its_mind_moves_provisional_case_to_reconciliation(
    gate: FinalityGate, guard: Guard
) -> None:
    """A source replacing its signal with another outcome makes RP -> IR though all agree."""
    gate.signal(CID, "a", APPROVE, 0.5)
    case = gate.signal(CID, "a", REJECT, 0.4)
    assert {s.outcome for s in case.signals} == {REJECT}  # every live signal agrees...
    assert case.state is IR  # ...but the provisional outcome changed
    assert case.provisional_outcome is None
    assert case.signals == (case.signals[0],)
    assert (case.signals[0].source, case.signals[0].outcome) == ("a", REJECT)
    assert case.tally == Tally(scores={REJECT: 0.4}, voters={REJECT: 1}, winner=None)
    assert [(s.outcome, status) for s, status in gate.history(CID)] == [
        (APPROVE, "replaced"),
        (REJECT, "live"),
    ]
    signals = [e for e in case_events(guard) if e.kind is EventKind.SIGNAL]
    assert signals[-1].detail["replaced"] == {"outcome": APPROVE, "confidence": 0.5}
    assert signals[-1].detail["late"] is False
    assert signals[0].detail["replaced"] is None
    assert transitions(guard)[-1] == (RP.value, IR.value)


def test_replacing_a_signal_with_the_same_outcome_keeps_it_provisional(
    gate: FinalityGate, guard: Guard
) -> None:
    """A source restating the provisional outcome at another confidence stays RP (audited)."""
    gate.signal(CID, "a", APPROVE, 0.5)
    case = gate.signal(CID, "a", APPROVE, 0.6)
    assert (case.state, case.provisional_outcome) == (RP, APPROVE)
    assert case.tally.scores == {APPROVE: 0.6}
    assert case_events(guard)[-1].detail["replaced"] == {"outcome": APPROVE, "confidence": 0.5}


def test_late_signal_after_final_is_recorded_and_ignored(gate: FinalityGate) -> None:
    """A signal after FINAL is recorded as late in history and audit; nothing else changes."""
    gate.signal(CID, "a", APPROVE, 0.9)
    before = snapshot(gate)
    case = gate.signal(CID, "b", REJECT, 1.0, metadata={"note": "too late"})
    assert_late_and_ignored(gate, before, case, "b", REJECT)
    assert case.outcome == APPROVE
    assert case.tally.winner == APPROVE
    # The late source has no live signal: a second late one is late too, not "replaced".
    gate.signal(CID, "b", APPROVE, 1.0)
    assert [status for _, status in gate.history(CID)] == ["live", "late", "late"]


def test_a_source_replaced_before_final_is_late_after(gate: FinalityGate) -> None:
    """A source that finalized the case and signals again is late, its live signal kept."""
    gate.signal(CID, "a", APPROVE, 0.9)
    case = gate.signal(CID, "a", REJECT, 1.0)
    assert case.signals[0].outcome == APPROVE
    assert [status for _, status in gate.history(CID)] == ["live", "late"]


@pytest.mark.parametrize("conf", [0.8, 0.7, 0.1, 0.3])
def test_exact_arithmetic_three_equal_votes_at_threshold_finalize(
    guard: Guard, conf: float
) -> None:
    """Three sources at confidence c with threshold c (quorum 3) finalize exactly."""
    gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=conf, quorum=3))
    gate.signal(CID, "a", APPROVE, conf)
    case = gate.signal(CID, "b", APPROVE, conf)
    assert case.state is RP
    case = gate.signal(CID, "c", APPROVE, conf)
    assert (case.state, case.outcome) == (FINAL, APPROVE)


def test_exact_arithmetic_case_would_fail_in_floats() -> None:
    """The 0.7 case above is a real test: float summing puts 3 x 0.7 / 3 below 0.7."""
    assert (0.7 + 0.7 + 0.7) / 3 < 0.7
    assert ConsensusPolicy(0.7, 3).tally([Signal(s, APPROVE, 0.7) for s in "abc"]).winner


def test_worked_example_numbers_in_the_policy_docstring() -> None:
    """ConsensusPolicy's worked example: 1.7/3 = 0.567 not final; 2.2/3 = 0.733 final."""
    doc = ConsensusPolicy.__doc__ or ""
    assert "threshold 0.7 and quorum 2" in doc
    assert "1.7 / 3 = 0.567" in doc
    assert "2.2 / 3 = 0.733" in doc
    policy = ConsensusPolicy(threshold=0.7, quorum=2)
    a, b = Signal("A", APPROVE, 0.9), Signal("B", APPROVE, 0.8)
    first = policy.tally([a, b, Signal("C", REJECT, 0.6)])
    assert round(first.scores[APPROVE], 3) == 0.567
    assert math.isclose(first.scores[APPROVE], 1.7 / 3)
    assert math.isclose(first.scores[REJECT], 0.2)
    assert first.winner is None
    second = policy.tally([a, b, Signal("C", APPROVE, 0.5)])
    assert round(second.scores[APPROVE], 3) == 0.733
    assert second.voters == {APPROVE: 3}
    assert second.winner == APPROVE


def test_worked_example_through_the_gate_when_c_dissents_before_b(guard: Guard) -> None:
    """The worked example's story holds in the order A, C, B, then C switches: FINAL approve."""
    gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=0.7, quorum=2))
    assert gate.signal(CID, "A", APPROVE, 0.9).state is RP  # 0.9 but one voter
    assert gate.signal(CID, "C", REJECT, 0.6).state is IR
    case = gate.signal(CID, "B", APPROVE, 0.8)
    assert case.state is IR
    assert round(case.tally.scores[APPROVE], 3) == 0.567
    case = gate.signal(CID, "C", APPROVE, 0.5)
    assert (case.state, case.outcome) == (FINAL, APPROVE)
    assert round(case.tally.scores[APPROVE], 3) == 0.733


def test_worked_example_in_its_stated_order_finalizes_at_b(guard: Guard) -> None:
    """In the order the example states (A, B, C), the case is FINAL at B; C's dissent is late."""
    gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=0.7, quorum=2))
    gate.signal(CID, "A", APPROVE, 0.9)
    case = gate.signal(CID, "B", APPROVE, 0.8)  # (0.9 + 0.8) / 2 = 0.85, two voters
    assert (case.state, case.outcome) == (FINAL, APPROVE)
    case = gate.signal(CID, "C", REJECT, 0.6)
    assert (case.state, case.outcome) == (FINAL, APPROVE)
    assert gate.history(CID)[-1][1] == "late"


@pytest.mark.parametrize(
    ("threshold", "quorum"),
    [
        (0, 1),
        (0.0, 1),
        (-0.5, 1),
        (1.0000001, 1),
        (2, 1),
        (float("nan"), 1),
        (float("inf"), 1),
        (True, 1),
        ("0.8", 1),
        (None, 1),
        (0.8, 0),
        (0.8, -1),
        (0.8, True),
        (0.8, 1.5),
        (0.8, 2.0),
        (0.8, "2"),
        (0.8, None),
        (0.8, MAX_QUORUM + 1),
        (0.8, 2**63),
    ],
)
def test_invalid_policy_is_a_configuration_error(threshold: Any, quorum: Any) -> None:
    """A threshold outside (0, 1], or a quorum that is not an int in [1, MAX_QUORUM],
    raises ConfigurationError."""
    with pytest.raises(ConfigurationError):
        ConsensusPolicy(threshold=threshold, quorum=quorum)


@pytest.mark.parametrize(("threshold", "quorum"), [(1, 1), (1.0, 5), (1e-9, 1), (0.5, 100)])
def test_boundary_policies_are_valid(threshold: float, quorum: int) -> None:
    """Threshold 1 and tiny positive thresholds, and any int quorum >= 1, are accepted."""
    assert ConsensusPolicy(threshold=threshold, quorum=quorum).quorum == quorum


def test_the_largest_quorum_is_kept_by_every_store(gate: FinalityGate) -> None:
    """A case opened with quorum MAX_QUORUM (PostgreSQL's integer) is stored and read back
    as it was given, on every store: the range a policy accepts is the stores' range."""
    policy = ConsensusPolicy(threshold=0.5, quorum=MAX_QUORUM)
    gate.open("big", policy=policy)

    case = gate.get("big")

    assert case is not None
    assert case.policy == policy


BAD_SIGNALS = [
    ("a", APPROVE, -0.1),
    ("a", APPROVE, 1.1),
    ("a", APPROVE, float("nan")),
    ("a", APPROVE, float("inf")),
    ("a", APPROVE, True),
    ("a", APPROVE, False),
    ("a", APPROVE, "0.5"),
    ("a", APPROVE, None),
    ("", APPROVE, 0.5),
    ("a", "", 0.5),
    (None, APPROVE, 0.5),
    ("a", None, 0.5),
    (7, APPROVE, 0.5),
    ("a", "x" * 256, 0.5),
]


@pytest.mark.parametrize(("source", "outcome", "confidence"), BAD_SIGNALS)
def test_invalid_signal_raises_and_records_nothing(
    gate: FinalityGate, guard: Guard, source: Any, outcome: Any, confidence: Any
) -> None:
    """A bad signal raises InvalidInputError and records nothing, not even the case."""
    with pytest.raises(InvalidInputError):
        gate.signal(CID, source, outcome, confidence)
    assert gate.get(CID) is None
    assert gate.history(CID) == []
    assert guard.audit_trail(CID) == []
    assert gate.cases() == []


@pytest.mark.parametrize(("source", "outcome", "confidence"), BAD_SIGNALS[:6])
def test_invalid_signal_on_an_existing_case_changes_nothing(
    gate: FinalityGate, source: Any, outcome: Any, confidence: Any
) -> None:
    """A bad signal to a provisional case leaves its version, signals and audit unchanged."""
    gate.signal(CID, "z", APPROVE, 0.5)
    before = snapshot(gate)
    with pytest.raises(InvalidInputError):
        gate.signal(CID, source, outcome, confidence)
    assert snapshot(gate) == before


def test_invalid_metadata_raises_and_records_nothing(gate: FinalityGate) -> None:
    """Metadata that is not JSON raises InvalidInputError before anything is recorded."""
    with pytest.raises(InvalidInputError):
        gate.signal(CID, "a", APPROVE, 0.5, metadata={"x": float("nan")})
    assert gate.get(CID) is None


def test_auto_finalization_from_open_audits_both_transitions_in_order(
    gate: FinalityGate, guard: Guard
) -> None:
    """One decisive signal on an OPEN case audits OPEN->RP then RP->FINAL, in one step."""
    gate.open(CID)
    case = gate.signal(CID, "a", APPROVE, 0.95)
    assert (case.state, case.outcome, case.version) == (FINAL, APPROVE, 2)
    events = case_events(guard)
    assert [e.kind for e in events] == [
        EventKind.STATE_CHANGE,
        EventKind.SIGNAL,
        EventKind.STATE_CHANGE,
        EventKind.STATE_CHANGE,
    ]
    assert transitions(guard) == [(None, "OPEN"), ("OPEN", RP.value), (RP.value, "FINAL")]
    assert events[2].detail["outcome"] == APPROVE  # the provisional outcome
    assert events[3].detail["outcome"] == APPROVE  # the final outcome
    assert events[2].at_ms == events[3].at_ms
    assert {e.actor for e in events[1:]} == {"a"}


def test_auto_finalization_through_reconciliation_audits_both_transitions(
    gate: FinalityGate, guard: Guard
) -> None:
    """A source switching to a decisive other outcome audits RP->IR then IR->FINAL."""
    gate.signal(CID, "a", APPROVE, 0.1)
    case = gate.signal(CID, "a", REJECT, 0.9)
    assert (case.state, case.outcome) == (FINAL, REJECT)
    assert transitions(guard)[-2:] == [(RP.value, IR.value), (IR.value, "FINAL")]


# -- 3. settlement ------------------------------------------------------------------------


@pytest.mark.parametrize("state", [OPEN, RP, IR])
def test_settle_before_final_raises_with_state_and_tally(
    gate: FinalityGate, guard: Guard, ledger: Ledger, state: CaseState
) -> None:
    """Settling before FINAL raises NotFinalError with the state and tally; nothing runs."""
    case = drive(gate, ledger, state)
    with pytest.raises(NotFinalError) as info:
        gate.settle(CID, "pay_out", effect(ledger))
    err = info.value
    assert (err.case_id, err.namespace, err.state) == (CID, "default", state)
    assert err.tally == case.tally
    assert isinstance(err.tally, Tally)
    assert ledger.count() == 0
    assert guard.get("case:" + CID) is None


def test_settle_an_absent_case_raises_not_final(gate: FinalityGate, ledger: Ledger) -> None:
    """Settling a case that does not exist raises NotFinalError (state None) and opens nothing."""
    with pytest.raises(NotFinalError) as info:
        gate.settle("nope", "pay_out", effect(ledger))
    assert (info.value.state, info.value.tally) == (None, None)
    assert gate.get("nope") is None
    assert ledger.count() == 0


def test_settle_from_final_runs_once_with_the_outcome(
    gate: FinalityGate, guard: Guard, ledger: Ledger
) -> None:
    """From FINAL, settle runs fn once with the outcome and moves the case to SETTLED."""
    gate.signal(CID, "a", REJECT, 0.9)
    seen: list[str] = []
    contexts: list[Any] = []

    def fn(outcome: str, ctx: Any) -> dict[str, Any]:
        contexts.append(ctx)
        return effect(ledger, seen)(outcome, ctx)

    receipt = gate.settle(CID, "pay_out", fn)
    assert seen == [REJECT]
    assert ledger.rows() == [("case:" + CID, REJECT)]
    assert (receipt.status, receipt.replay) == (Status.SUCCEEDED, False)
    assert receipt.result == {"outcome": REJECT, "row": 1}
    assert (receipt.request_id, receipt.action) == ("case:" + CID, "pay_out")
    ctx = contexts[0]
    assert ctx.request_id == "case:" + CID
    assert ctx.payload == {"case_id": CID, "outcome": REJECT}
    expected = hashlib.sha256(
        rfc8785.dumps({"v": 1, "action": "pay_out", "payload": {"case_id": CID, "outcome": REJECT}})
    ).hexdigest()
    assert receipt.fingerprint == expected
    case = gate.get(CID)
    assert case is not None
    assert (case.state, case.outcome) == (SETTLED, REJECT)
    settled = case_events(guard)[-1]
    assert settled.kind is EventKind.STATE_CHANGE
    assert (settled.detail["from"], settled.detail["to"]) == ("FINAL", "SETTLED")
    assert settled.execution_id == receipt.execution_id


def test_settle_again_replays_the_same_receipt(gate: FinalityGate, ledger: Ledger) -> None:
    """Settling a SETTLED case again returns the stored receipt and runs nothing."""
    gate.signal(CID, "a", APPROVE, 0.9)
    first = gate.settle(CID, "pay_out", effect(ledger))
    version = gate.get(CID).version  # type: ignore[union-attr]
    for _ in range(3):
        again = gate.settle(CID, "pay_out", effect(ledger))
        assert again.replay
        assert (again.execution_id, again.result, again.status) == (
            first.execution_id,
            first.result,
            first.status,
        )
    assert ledger.count() == 1
    assert gate.get(CID).version == version  # type: ignore[union-attr]


def test_not_executed_keeps_the_case_final_and_the_next_settle_runs(
    gate: FinalityGate, guard: Guard, ledger: Ledger
) -> None:
    """fn raising NotExecuted keeps the case FINAL; the next settle runs fn (attempt 2)."""
    gate.signal(CID, "a", APPROVE, 0.9)

    def refused(outcome: str, ctx: Any) -> None:
        raise NotExecuted("bank said no, nothing booked")

    with pytest.raises(NotExecuted):
        gate.settle(CID, "pay_out", refused)
    assert gate.get(CID).state is FINAL  # type: ignore[union-attr]
    assert guard.get("case:" + CID).status is Status.RELEASED  # type: ignore[union-attr]
    assert ledger.count() == 0
    receipt = gate.settle(CID, "pay_out", effect(ledger))
    assert (receipt.status, receipt.attempt, receipt.replay) == (Status.SUCCEEDED, 2, False)
    assert gate.get(CID).state is SETTLED  # type: ignore[union-attr]
    assert ledger.count() == 1


def test_failure_is_stored_settles_the_case_and_replays(
    gate: FinalityGate, guard: Guard, ledger: Ledger
) -> None:
    """fn raising a plain exception stores FAILED, the case is SETTLED, later settles replay it."""
    gate.signal(CID, "a", APPROVE, 0.9)

    def declined(outcome: str, ctx: Any) -> None:
        ledger.append(ctx.request_id, "attempted")
        raise ValueError("card declined")

    with pytest.raises(ValueError, match="card declined"):
        gate.settle(CID, "pay_out", declined)
    assert gate.get(CID).state is SETTLED  # type: ignore[union-attr]
    assert guard.get("case:" + CID).status is Status.FAILED  # type: ignore[union-attr]
    with pytest.raises(ReplayedFailureError) as info:
        gate.settle(CID, "pay_out", effect(ledger))
    assert (info.value.error_type, info.value.error_message) == ("ValueError", "card declined")
    assert ledger.count() == 1
    with pytest.raises(InvalidTransitionError):
        gate.resolve(CID, REJECT, by="alice", reason="retry it")


def test_outcome_unknown_leaves_the_case_final_and_resolving_settles_it(
    gate: FinalityGate, guard: Guard, ledger: Ledger
) -> None:
    """An outcome-unknown error keeps the case FINAL in doubt; resolving it settles the case."""
    gate.signal(CID, "a", APPROVE, 0.9)

    def timed_out(outcome: str, ctx: Any) -> None:
        ledger.append(ctx.request_id, outcome)
        raise TimeoutError("bank did not answer")

    with pytest.raises(TimeoutError):
        gate.settle(CID, "pay_out", timed_out, outcome_unknown=(TimeoutError,))
    assert gate.get(CID).state is FINAL  # type: ignore[union-attr]
    assert [r.request_id for r in guard.in_doubt()] == ["case:" + CID]
    with pytest.raises(OutcomeUnknownError):
        gate.settle(CID, "pay_out", effect(ledger))
    assert ledger.count() == 1

    resolved = guard.resolve(
        "case:" + CID, "succeeded", result={"payout": "po_1"}, by="bob", reason="bank confirmed"
    )
    assert resolved.status is Status.SUCCEEDED
    case = gate.get(CID)
    assert case is not None
    assert case.state is SETTLED
    settled = case_events(guard)[-1]
    assert (settled.detail["from"], settled.detail["to"], settled.actor) == (
        "FINAL",
        "SETTLED",
        "bob",
    )
    again = gate.settle(CID, "pay_out", effect(ledger))
    assert again.replay
    assert again.result == {"payout": "po_1"}
    assert ledger.count() == 1


def test_resolving_an_in_doubt_settlement_as_failed_settles_the_case(
    gate: FinalityGate, guard: Guard, ledger: Ledger
) -> None:
    """Resolving an in-doubt settlement as failed also settles the case; settle replays it."""
    gate.signal(CID, "a", APPROVE, 0.9)

    def timed_out(outcome: str, ctx: Any) -> None:
        raise TimeoutError("bank did not answer")

    with pytest.raises(TimeoutError):
        gate.settle(CID, "pay_out", timed_out, outcome_unknown=(TimeoutError,))
    guard.resolve("case:" + CID, "failed", by="bob", reason="bank has no such payout")
    assert gate.get(CID).state is SETTLED  # type: ignore[union-attr]
    with pytest.raises(ReplayedFailureError):
        gate.settle(CID, "pay_out", effect(ledger))
    assert ledger.count() == 0


def test_an_operator_cannot_release_an_in_doubt_settlement_to_re_run_it(
    gate: FinalityGate, guard: Guard, ledger: Ledger
) -> None:
    """A case: record is never re-run by an operator: releasing it is refused, nothing changes."""
    gate.signal(CID, "a", APPROVE, 0.9)

    def timed_out(outcome: str, ctx: Any) -> None:
        ledger.append(ctx.request_id, outcome)
        raise TimeoutError("bank did not answer")

    with pytest.raises(TimeoutError):
        gate.settle(CID, "pay_out", timed_out, outcome_unknown=(TimeoutError,))
    with pytest.raises(InvalidTransitionError, match="cannot be released"):
        guard.resolve("case:" + CID, "released", by="bob", reason="try it again")
    assert guard.get("case:" + CID).status is Status.IN_DOUBT  # type: ignore[union-attr]
    assert gate.get(CID).state is FINAL  # type: ignore[union-attr]
    with pytest.raises(OutcomeUnknownError):
        gate.settle(CID, "pay_out", effect(ledger))
    assert ledger.count() == 1


def test_settling_with_another_action_is_a_conflict_and_runs_nothing(
    gate: FinalityGate, ledger: Ledger
) -> None:
    """After settlement, settling the case under another action raises ActionMismatchError."""
    gate.signal(CID, "a", APPROVE, 0.9)
    first = gate.settle(CID, "pay_out", effect(ledger))
    ran: list[str] = []
    with pytest.raises(ActionMismatchError) as info:
        gate.settle(CID, "send_email", effect(ledger, ran))
    assert ran == []
    assert info.value.receipt.execution_id == first.execution_id
    assert info.value.receipt.action == "pay_out"
    assert ledger.count() == 1
    assert gate.settle(CID, "pay_out", effect(ledger)).execution_id == first.execution_id


def test_settlement_outliving_its_lease_is_not_re_run_and_settles_late(
    gate: FinalityGate, guard: Guard, ledger: Ledger, clock: FakeClock
) -> None:
    """A settle whose lease expires mid-run is never re-run; its late success settles the case."""
    gate.signal(CID, "a", APPROVE, 0.9)
    meanwhile: list[BaseException] = []

    def slow(outcome: str, ctx: Any) -> dict[str, Any]:
        clock.advance(31)  # the guard fixture's lease is 30 s

        def other() -> None:
            try:
                gate.settle(CID, "pay_out", effect(ledger))
            except BaseException as exc:
                meanwhile.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(timeout=30)
        return effect(ledger)(outcome, ctx)

    receipt = gate.settle(CID, "pay_out", slow)
    assert [type(e) for e in meanwhile] == [OutcomeUnknownError]
    assert receipt.status is Status.SUCCEEDED
    assert ledger.count() == 1
    assert gate.get(CID).state is SETTLED  # type: ignore[union-attr]
    kinds = [e.kind for e in guard.audit_trail("case:" + CID)]
    assert EventKind.LATE_COMPLETION in kinds


def test_keyboard_interrupt_during_settlement_leaves_it_in_doubt(
    gate: FinalityGate, guard: Guard, ledger: Ledger
) -> None:
    """KeyboardInterrupt inside the side effect re-raises; the record is in doubt, case FINAL."""
    gate.signal(CID, "a", APPROVE, 0.9)

    def interrupted(outcome: str, ctx: Any) -> None:
        ledger.append(ctx.request_id, outcome)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gate.settle(CID, "pay_out", interrupted)
    assert gate.get(CID).state is FINAL  # type: ignore[union-attr]
    assert guard.get("case:" + CID).status is Status.IN_DOUBT  # type: ignore[union-attr]
    with pytest.raises(OutcomeUnknownError):
        gate.settle(CID, "pay_out", effect(ledger))
    assert ledger.count() == 1


def test_same_case_id_in_two_namespaces_is_two_cases(
    gate: FinalityGate, guard: Guard, ledger: Ledger
) -> None:
    """One case id in two namespaces: separate states, settlements and downstream keys."""
    gate.signal(CID, "a", APPROVE, 0.9, namespace="tenant-1")
    case = gate.signal(CID, "a", REJECT, 0.5, namespace="tenant-2")
    assert case.state is RP
    with pytest.raises(NotFinalError):
        gate.settle(CID, "pay_out", effect(ledger), namespace="tenant-2")
    first = gate.settle(CID, "pay_out", effect(ledger), namespace="tenant-1")
    gate.resolve(CID, REJECT, by="alice", reason="review", namespace="tenant-2")
    second = gate.settle(CID, "pay_out", effect(ledger), namespace="tenant-2")
    assert [row[1] for row in ledger.rows()] == [APPROVE, REJECT]
    assert first.downstream_key != second.downstream_key
    assert gate.get(CID) is None  # the guard's own namespace has no such case
    assert gate.cases() == []  # the guard's namespace, as get()
    states = {c.namespace: c.state for c in gate.cases(all_namespaces=True)}
    assert states == {"tenant-1": SETTLED, "tenant-2": SETTLED}
    assert [c.namespace for c in gate.cases(namespace="tenant-2")] == ["tenant-2"]


@pytest.mark.parametrize("rid", ["case:x", "case:" + CID, "case:"])
def test_execute_refuses_reserved_case_request_ids(
    gate: FinalityGate, guard: Guard, ledger: Ledger, rid: str
) -> None:
    """guard.execute with a case: request id raises InvalidRequestIdError and records nothing."""
    gate.signal(CID, "a", APPROVE, 0.9)

    def fn(ctx: Any) -> None:
        ledger.append(ctx.request_id)

    with pytest.raises(InvalidRequestIdError):
        guard.execute(rid, "pay_out", {"case_id": CID, "outcome": APPROVE}, fn)
    assert ledger.count() == 0
    if rid != "case:":
        assert guard.get(rid) is None
    assert gate.get(CID).state is FINAL  # type: ignore[union-attr]


# -- 4. operator resolution ---------------------------------------------------------------


@pytest.mark.parametrize("state", [RP, IR])
def test_operator_resolution_finalizes_and_is_audited(
    gate: FinalityGate, guard: Guard, ledger: Ledger, state: CaseState
) -> None:
    """An operator resolves a RP or IR case to FINAL, audited with by and reason."""
    drive(gate, ledger, state)
    case = gate.resolve(CID, REJECT, by="alice", reason="manual review")
    assert (case.state, case.outcome, case.resolved_by) == (FINAL, REJECT, "alice")
    event = case_events(guard)[-1]
    assert event.kind is EventKind.STATE_CHANGE
    assert event.actor == "alice"
    assert event.detail == {
        "from": state.value,
        "to": "FINAL",
        "outcome": REJECT,
        "by": "alice",
        "reason": "manual review",
    }
    seen: list[str] = []
    gate.settle(CID, "pay_out", effect(ledger, seen))
    assert seen == [REJECT]
    assert gate.get(CID).resolved_by == "alice"  # type: ignore[union-attr]


@pytest.mark.parametrize("state", [OPEN, FINAL, SETTLED])
def test_operator_resolution_is_refused_outside_rp_and_ir(
    gate: FinalityGate, ledger: Ledger, state: CaseState
) -> None:
    """Resolving an OPEN, FINAL or SETTLED case raises InvalidTransitionError, changes nothing."""
    drive(gate, ledger, state)
    before = snapshot(gate)
    with pytest.raises(InvalidTransitionError):
        gate.resolve(CID, REJECT, by="alice", reason="manual review")
    assert snapshot(gate) == before


def test_operator_resolution_of_an_absent_case_is_refused(gate: FinalityGate, guard: Guard) -> None:
    """Resolving a case that does not exist raises InvalidTransitionError and opens nothing."""
    with pytest.raises(InvalidTransitionError):
        gate.resolve("refund-18", REJECT, by="alice", reason="manual review")
    assert gate.get("refund-18") is None
    assert guard.audit_trail("refund-18") == []


@pytest.mark.parametrize(
    ("outcome", "by", "reason"),
    [("", "alice", "r"), (REJECT, "", "r"), (REJECT, "alice", ""), (REJECT, "alice", "  ")],
)
def test_operator_resolution_needs_outcome_by_and_reason(
    gate: FinalityGate, ledger: Ledger, outcome: str, by: str, reason: str
) -> None:
    """A resolution without an outcome, an operator or a reason raises InvalidInputError."""
    drive(gate, ledger, IR)
    before = snapshot(gate)
    with pytest.raises(InvalidInputError):
        gate.resolve(CID, outcome, by=by, reason=reason)
    assert snapshot(gate) == before


# -- 5. concurrency -----------------------------------------------------------------------


def _run_threads(n: int, target: Any) -> None:
    threads = [threading.Thread(target=target, args=(i,), name=f"t{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"


NEVER_FINAL = ConsensusPolicy(threshold=1.0, quorum=1000)


def test_threads_signalling_one_case_lose_no_signal(tmp_path: Path) -> None:
    """8 threads x 50 signals from distinct sources on SQLite: 400 in history, 1 live each."""
    db = tmp_path / "guard.db"
    with Guard(db) as guard:
        FinalityGate(guard).open(CID, policy=NEVER_FINAL)
    n_threads, rounds = 8, 50
    barrier = threading.Barrier(n_threads, timeout=60)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with Guard(SQLiteStore(db), wait=30.0) as guard:
                gate = FinalityGate(guard)
                barrier.wait()
                for seq in range(rounds):
                    outcome = APPROVE if (i + seq) % 2 else REJECT
                    gate.signal(CID, f"src-{i}", outcome, 0.5, metadata={"seq": seq})
        except BaseException as exc:
            errors.append(exc)

    _run_threads(n_threads, worker)
    assert errors == []
    with Guard(db) as guard:
        gate = FinalityGate(guard)
        history = gate.history(CID)
        case = gate.get(CID)
        signal_events = [e for e in guard.audit_trail(CID) if e.kind is EventKind.SIGNAL]
    assert case is not None
    assert len(history) == n_threads * rounds
    assert len(signal_events) == n_threads * rounds
    assert case.state is IR
    assert sorted(s.source for s in case.signals) == [f"src-{i}" for i in range(n_threads)]
    assert {s.metadata["seq"] for s in case.signals} == {rounds - 1}
    for i in range(n_threads):
        mine = [(s.metadata["seq"], status) for s, status in history if s.source == f"src-{i}"]
        assert mine == [(q, "replaced") for q in range(rounds - 1)] + [(rounds - 1, "live")]
    assert case.version == 1 + n_threads * rounds  # opened at 1, +1 per accepted signal


def _join_all(procs: list[Any]) -> None:
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


@pytest.mark.slow
def test_processes_signalling_one_case_are_all_recorded(tmp_path: Path) -> None:
    """3 spawned processes signalling one SQLite case from distinct sources: all recorded."""
    db = str(tmp_path / "guard.db")
    with Guard(db) as guard:
        FinalityGate(guard).open(CID, policy=NEVER_FINAL)
    n_procs, rounds = 3, 15
    sources = [[f"p{i}-s{j}" for j in range(3)] for i in range(n_procs)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n_procs)
    outs = [str(tmp_path / f"out-{i}.json") for i in range(n_procs)]
    procs = [
        ctx.Process(
            target=_gate_workers.signal_worker,
            args=(db, CID, sources[i], rounds, barrier, outs[i]),
        )
        for i in range(n_procs)
    ]
    for p in procs:
        p.start()
    _join_all(procs)
    assert [p.exitcode for p in procs] == [0] * n_procs
    reports = [json.loads(Path(o).read_text()) for o in outs]
    assert [r["errors"] for r in reports] == [[]] * n_procs
    with Guard(db) as guard:
        gate = FinalityGate(guard)
        history = gate.history(CID)
        case = gate.get(CID)
    all_sources = sorted(s for group in sources for s in group)
    assert case is not None
    assert len(history) == n_procs * 3 * rounds
    assert sorted((s.source, s.metadata["seq"]) for s, _ in history) == sorted(
        (src, seq) for src in all_sources for seq in range(rounds)
    )
    assert sorted(s.source for s in case.signals) == all_sources
    assert {s.metadata["seq"] for s in case.signals} == {rounds - 1}


def test_threads_settling_one_final_case_run_it_once(store: Any, ledger: Ledger) -> None:
    """16 threads settling one FINAL case at once: one effect, everyone gets the same receipt."""
    guard = Guard(store, wait=30.0, lease=60.0)
    gate = FinalityGate(guard)
    gate.signal(CID, "a", APPROVE, 0.9)
    n = 16
    barrier = threading.Barrier(n, timeout=60)
    results: list[Any] = [None] * n

    def slow_effect(outcome: str, ctx: Any) -> dict[str, Any]:
        time.sleep(0.1)
        return effect(ledger)(outcome, ctx)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = gate.settle(CID, "pay_out", slow_effect)
        except BaseException as exc:
            results[i] = exc

    _run_threads(n, worker)
    assert [r for r in results if not isinstance(r, Receipt)] == []
    assert ledger.count() == 1
    assert len({(r.execution_id, json.dumps(r.result)) for r in results}) == 1
    assert sum(not r.replay for r in results) == 1
    assert {r.status for r in results} == {Status.SUCCEEDED}
    assert gate.get(CID).state is SETTLED  # type: ignore[union-attr]
    settled = [t for t in transitions(guard) if t == ("FINAL", "SETTLED")]
    assert len(settled) == 1


@pytest.mark.slow
def test_processes_settling_one_final_case_run_it_once(tmp_path: Path) -> None:
    """3 spawned processes settling one FINAL SQLite case: the ledger has one effect."""
    db = str(tmp_path / "guard.db")
    ledger = tmp_path / "ledger.txt"
    with Guard(db) as guard:
        FinalityGate(guard).signal(CID, "a", APPROVE, 0.9)
    n_procs = 3
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n_procs)
    outs = [str(tmp_path / f"out-{i}.json") for i in range(n_procs)]
    procs = [
        ctx.Process(
            target=_gate_workers.settle_worker, args=(db, CID, str(ledger), barrier, outs[i])
        )
        for i in range(n_procs)
    ]
    for p in procs:
        p.start()
    _join_all(procs)
    assert [p.exitcode for p in procs] == [0] * n_procs
    reports = [json.loads(Path(o).read_text()) for o in outs]
    assert [r["errors"] for r in reports] == [[]] * n_procs
    assert read_lines(ledger) == [f"{CID}:{APPROVE}"]
    assert len({r["receipt"]["execution_id"] for r in reports}) == 1
    assert len({json.dumps(r["receipt"]["result"]) for r in reports}) == 1
    assert sum(not r["replay"] for r in reports) == 1
    with Guard(db) as guard:
        assert FinalityGate(guard).get(CID).state is SETTLED  # type: ignore[union-attr]


# -- 6. restart ---------------------------------------------------------------------------


def _build_settled_case(db: Path, ledger: Ledger) -> tuple[dict[str, Any], Receipt]:
    """On a fresh guard: a replaced signal, a live one, FINAL, a late signal, SETTLED."""
    with Guard(db) as guard:
        gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=0.6, quorum=2))
        gate.signal(CID, "a", REJECT, 0.3, metadata={"note": "first view"})
        gate.signal(CID, "a", APPROVE, 0.7)
        gate.signal(CID, "b", APPROVE, 0.8)  # (0.7 + 0.8) / 2 = 0.75, two voters
        gate.signal(CID, "c", REJECT, 1.0)  # late
        receipt = gate.settle(CID, "pay_out", effect(ledger))
        # Another case still open to decision, for the restart to continue.
        gate.signal("case-2", "a", APPROVE, 0.5)
        gate.signal("case-2", "b", REJECT, 0.5)
        return snapshot(gate), receipt


def test_settled_case_survives_a_restart(tmp_path: Path, ledger: Ledger) -> None:
    """Cases, live signals, history, audit and SETTLED survive closing and reopening the guard."""
    db = tmp_path / "guard.db"
    before, receipt = _build_settled_case(db, ledger)
    assert before["state"] is SETTLED
    with Guard(db, wait=0) as guard:
        gate = FinalityGate(guard)
        after = snapshot(gate)
        assert after == before
        assert [(s.source, s.outcome) for s in after["signals"]] == [("a", APPROVE), ("b", APPROVE)]
        assert [status for _, status in after["history"]] == ["replaced", "live", "live", "late"]
        assert after["history"][0][0].metadata == {"note": "first view"}
        assert after["policy"] == ConsensusPolicy(threshold=0.6, quorum=2)
        again = gate.settle(CID, "pay_out", effect(ledger))
        assert again.replay
        assert (again.execution_id, again.result) == (receipt.execution_id, receipt.result)
        # The undecided case continues after the restart under its own policy.
        case = gate.get("case-2")
        assert case is not None
        assert case.state is IR
        assert case.policy == ConsensusPolicy(threshold=0.6, quorum=2)
        case = gate.signal("case-2", "b", APPROVE, 0.9)
        assert (case.state, case.outcome) == (FINAL, APPROVE)  # (0.5 + 0.9) / 2 = 0.7
    assert ledger.count() == 1


def test_settled_case_survives_in_a_subprocess(tmp_path: Path, ledger: Ledger) -> None:
    """A fresh interpreter on the same file sees the case, signals, history and SETTLED state."""
    db = tmp_path / "guard.db"
    before, receipt = _build_settled_case(db, ledger)
    child_ledger = tmp_path / "child-ledger.txt"
    args = {
        "db": str(db),
        "case_id": CID,
        "settle": True,
        "action": "pay_out",
        "ledger": str(child_ledger),
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests._gate_workers", "inspect", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    case = report["case"]
    assert case["state"] == "SETTLED"
    assert case["outcome"] == APPROVE
    assert case["version"] == before["version"]
    assert case["signals"] == [s.to_dict() for s in before["signals"]]
    assert report["history"] == [[s.to_dict(), status] for s, status in before["history"]]
    assert report["events"] == [[e.kind.value, e.actor, dict(e.detail)] for e in before["events"]]
    assert "settle_error" not in report
    assert report["settle"]["execution_id"] == receipt.execution_id
    assert report["settle"]["result"] == receipt.result
    assert report["settle"]["replay"] is True
    assert read_lines(child_ledger) == []
    assert ledger.count() == 1


def test_signal_from_a_subprocess_finalizes_a_case_the_parent_sees(tmp_path: Path) -> None:
    """A case moved to FINAL by another interpreter reads FINAL here, with its history."""
    db = tmp_path / "guard.db"
    with Guard(db) as guard:
        gate = FinalityGate(guard)
        gate.signal(CID, "a", APPROVE, 0.7)
        gate.signal(CID, "b", REJECT, 0.6)
    args = {"db": str(db), "case_id": CID, "source": "b", "outcome": APPROVE, "confidence": 1.0}
    out = subprocess.run(
        [sys.executable, "-m", "tests._gate_workers", "signal", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["case"]["state"] == "FINAL"
    with Guard(db) as guard:
        gate = FinalityGate(guard)
        case = gate.get(CID)
        assert case is not None
        assert (case.state, case.outcome) == (FINAL, APPROVE)
        assert [st for _, st in gate.history(CID)] == ["live", "replaced", "live"]
        assert transitions(guard, CID)[-1] == (IR.value, "FINAL")


@pytest.mark.slow
def test_settlement_killed_mid_run_is_in_doubt_and_resolving_settles_the_case(
    tmp_path: Path,
) -> None:
    """A settling process SIGKILLed inside fn leaves the case FINAL, in doubt after the lease,
    never re-run; the operator's resolution settles the case."""
    db = tmp_path / "guard.db"
    ledger = tmp_path / "ledger.txt"
    marker = tmp_path / "marker.json"
    with Guard(db) as guard:
        FinalityGate(guard).signal(CID, "a", APPROVE, 0.9)
    lease = 1.0
    args = {
        "db": str(db),
        "ledger": str(ledger),
        "marker": str(marker),
        "case_id": CID,
        "action": "pay_out",
        "lease": lease,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests._gate_workers", "settle_and_hang", json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=ROOT,
    )
    try:
        assert wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60)
        assert marker.exists(), proc.communicate(timeout=10)[1]
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    execution_id = json.loads(marker.read_text())["execution_id"]
    assert read_lines(ledger) == [f"{CID}:{APPROVE}"]

    def again(outcome: str, ctx: Any) -> None:
        append_line(ledger, f"again:{outcome}")

    with Guard(db, wait=0) as guard:
        gate = FinalityGate(guard)
        assert gate.get(CID).state is FINAL  # type: ignore[union-attr]
        assert wait_until(lambda: bool(guard.in_doubt()), timeout=lease + 10, interval=0.05)
        with pytest.raises(OutcomeUnknownError) as info:
            gate.settle(CID, "pay_out", again)
        assert info.value.receipt.execution_id == execution_id
        guard.resolve("case:" + CID, "succeeded", result={"po": 1}, by="bob", reason="bank: paid")
        assert gate.get(CID).state is SETTLED  # type: ignore[union-attr]
        replay = gate.settle(CID, "pay_out", again)
        assert (replay.replay, replay.result, replay.execution_id) == (
            True,
            {"po": 1},
            execution_id,
        )
    assert read_lines(ledger) == [f"{CID}:{APPROVE}"]
