"""The finality gate's input checks: every text it stores or looks up is refused with a
typed error before the store is touched, on every store (memory, SQLite, PostgreSQL).

A case id is accepted only if ``case:<case_id>`` is a valid request id, so a case that can
go FINAL can always be settled. Sources, outcomes, operators, reasons, actions and
namespaces must be non-empty text of valid UTF-8 without NUL. "Nothing written" is
checked on the store itself: no case row, no signal, no audit event, no execution record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from safeagent import (
    AsyncFinalityGate,
    AsyncGuard,
    CaseState,
    ConfigurationError,
    ConsensusPolicy,
    FinalityGate,
    Guard,
    InvalidInputError,
    InvalidPayloadError,
    Status,
)
from safeagent._gate import MAX_CASE_ID_LENGTH
from safeagent._keys import check_request_id
from safeagent._policy import CASE_PREFIX
from tests.conftest import Ledger

CID = "refund-17"
APPROVE = "approve"
NUL = "\x00"
LONE = "\udc80"  # what a non-UTF-8 byte becomes through surrogateescape
HIGH = "\ud800"  # a high surrogate with no low one

BAD_TEXT = [
    pytest.param(f"refund{NUL}-17", id="nul"),
    pytest.param(f"c{LONE}", id="lone-low-surrogate"),
    pytest.param(HIGH, id="lone-high-surrogate"),
]
BAD_CASE_IDS = [
    *BAD_TEXT,
    pytest.param("c" * (MAX_CASE_ID_LENGTH + 1), id="251-chars"),
    pytest.param("", id="empty"),
    pytest.param(7, id="int"),
    pytest.param(None, id="none"),
]


@pytest.fixture
def guard(store: Any) -> Iterator[Guard]:
    g = Guard(store, lease=30.0, wait=0, owner="owner-1")
    yield g
    g.close()


@pytest.fixture
def gate(guard: Guard) -> FinalityGate:
    return FinalityGate(guard, policy=ConsensusPolicy(threshold=0.5, quorum=1))


def written(store: Any) -> dict[str, Any]:
    """Everything the store holds: cases (with their signals), events and records."""
    store.flush_events()
    gate = FinalityGate(Guard(store))
    cases = gate.cases(all_namespaces=True)
    return {
        "cases": [(c.namespace, c.case_id, c.state, c.version, c.signals) for c in cases],
        "signals": [gate.history(c.case_id, namespace=c.namespace) for c in cases],
        "events": [(e.kind, e.subject, dict(e.detail)) for e in store.events()],
        "records": [(r.request_id, r.status) for r in store.records()[0]],
    }


def nothing_written(store: Any) -> bool:
    return written(store) == {"cases": [], "signals": [], "events": [], "records": []}


def finalize(gate: FinalityGate, case_id: str = CID) -> None:
    case = gate.signal(case_id, "fraud-model", APPROVE, 0.9)
    assert (case.state, case.outcome) == (CaseState.FINAL, APPROVE)


def never(outcome: str, ctx: Any) -> None:
    raise AssertionError("the side effect must not run")


# -- case ids ----------------------------------------------------------------------------


ENTRY_POINTS: dict[str, Callable[[FinalityGate, Any], Any]] = {
    "open": lambda g, cid: g.open(cid),
    "signal": lambda g, cid: g.signal(cid, "fraud-model", APPROVE, 0.9),
    "resolve": lambda g, cid: g.resolve(cid, APPROVE, by="alice", reason="checked"),
    "settle": lambda g, cid: g.settle(cid, "issue_refund", never),
    "get": lambda g, cid: g.get(cid),
    "history": lambda g, cid: g.history(cid),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case_id", BAD_CASE_IDS)
def test_a_bad_case_id_is_refused_on_every_entry_point_before_the_store(
    store: Any, gate: FinalityGate, entry: str, case_id: Any
) -> None:
    """NUL, lone surrogates, 251 characters, empty or not a str: InvalidInputError from
    open, signal, resolve, settle, get and history, and the store holds nothing."""
    with pytest.raises(InvalidInputError, match="case id must be"):
        ENTRY_POINTS[entry](gate, case_id)
    assert nothing_written(store)


def test_the_reviewers_case_is_refused_instead_of_going_final_unsettleable(
    store: Any, gate: FinalityGate
) -> None:
    """``refund\\x00-17`` used to go FINAL and then fail every settle: it is now refused
    by signal, and no case exists."""
    with pytest.raises(InvalidInputError) as info:
        gate.signal(f"refund{NUL}-17", "fraud-model", APPROVE, 0.9)
    assert "case:<case id>" in str(info.value)
    assert nothing_written(store)
    assert gate.cases() == []


@pytest.mark.parametrize(
    "case_id",
    [
        pytest.param("c" * MAX_CASE_ID_LENGTH, id="250-ascii"),
        pytest.param("ü" * MAX_CASE_ID_LENGTH, id="250-non-ascii"),
        pytest.param("退款-17 🧾", id="cjk-emoji"),
    ],
)
def test_every_case_id_that_can_go_final_can_be_settled(
    gate: FinalityGate, ledger: Ledger, case_id: str
) -> None:
    """The longest and non-ASCII case ids accepted go FINAL and settle once under
    ``case:<case_id>``, a valid request id; the case ends SETTLED."""
    assert check_request_id(CASE_PREFIX + case_id)
    finalize(gate, case_id)
    receipt = gate.settle(case_id, "issue_refund", lambda o, ctx: ledger.append(ctx.request_id))
    assert receipt.status is Status.SUCCEEDED
    assert receipt.request_id == CASE_PREFIX + case_id
    assert ledger.count() == 1
    case = gate.get(case_id)
    assert case is not None
    assert case.state is CaseState.SETTLED


def test_max_case_id_length_leaves_room_for_the_prefix() -> None:
    """250 + len("case:") is the request id limit, 255."""
    assert MAX_CASE_ID_LENGTH == 255 - len(CASE_PREFIX) == 250


# -- signals -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["source", "outcome"])
@pytest.mark.parametrize("text", BAD_TEXT)
def test_a_source_or_outcome_with_nul_or_a_lone_surrogate_records_nothing(
    store: Any, gate: FinalityGate, field: str, text: str
) -> None:
    """A bad source or outcome raises InvalidInputError (not UnicodeEncodeError or
    StoreError) and records no case, signal or event."""
    args = {"source": "fraud-model", "outcome": APPROVE, field: text}
    with pytest.raises(InvalidInputError, match=f"{field} must be"):
        gate.signal(CID, args["source"], args["outcome"], 0.9)
    assert nothing_written(store)


@pytest.mark.parametrize("field", ["source", "outcome"])
@pytest.mark.parametrize("text", BAD_TEXT)
def test_a_bad_signal_on_an_existing_case_changes_nothing(
    store: Any, gate: FinalityGate, field: str, text: str
) -> None:
    """On a provisional case, the refused signal leaves version, signals and audit as they were."""
    gate.signal(CID, "policy-agent", APPROVE, 0.4)
    before = written(store)
    args = {"source": "fraud-model", "outcome": APPROVE, field: text}
    with pytest.raises(InvalidInputError):
        gate.signal(CID, args["source"], args["outcome"], 0.9)
    assert written(store) == before


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"k": f"v{LONE}"}, id="surrogate-value"),
        pytest.param({f"k{HIGH}": 1}, id="surrogate-key"),
        pytest.param([("k", 1)], id="pairs-not-a-mapping"),
        pytest.param("k=1", id="str"),
    ],
)
def test_metadata_that_is_not_a_json_object_records_nothing(
    store: Any, gate: FinalityGate, metadata: Any
) -> None:
    """Metadata with lone surrogates, or not a mapping: InvalidPayloadError, nothing recorded."""
    with pytest.raises(InvalidPayloadError):
        gate.signal(CID, "fraud-model", APPROVE, 0.9, metadata=metadata)
    assert nothing_written(store)


def test_a_nul_inside_metadata_is_json_and_round_trips(store: Any, gate: FinalityGate) -> None:
    """Metadata is a JSON value: a NUL in one of its strings is escaped (``\\u0000``) and
    comes back as written, on every store."""
    gate.signal(CID, "fraud-model", APPROVE, 0.4, metadata={f"k{NUL}": f"v{NUL}"})
    case = gate.get(CID)
    assert case is not None
    assert dict(case.signals[0].metadata) == {f"k{NUL}": f"v{NUL}"}


# -- operator resolution -----------------------------------------------------------------


@pytest.mark.parametrize("field", ["outcome", "by", "reason"])
@pytest.mark.parametrize("text", BAD_TEXT)
def test_a_resolution_with_bad_text_changes_nothing(
    store: Any, gate: FinalityGate, field: str, text: str
) -> None:
    """An outcome, operator (resolved_by) or reason with NUL or a lone surrogate raises
    InvalidInputError and leaves the case in reconciliation, unaudited."""
    gate.signal(CID, "fraud-model", APPROVE, 0.4)
    gate.signal(CID, "policy-agent", "reject", 0.4)
    before = written(store)
    args = {"outcome": APPROVE, "by": "alice", "reason": "checked the ledger", field: text}
    with pytest.raises(InvalidInputError, match=field):
        gate.resolve(CID, args["outcome"], by=args["by"], reason=args["reason"])
    assert written(store) == before
    case = gate.get(CID)
    assert case is not None
    assert (case.state, case.resolved_by) == (CaseState.IN_RECONCILIATION, None)


# -- settlement --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action", [*BAD_TEXT, pytest.param("", id="empty"), pytest.param("a" * 256, id="256-chars")]
)
def test_settle_with_a_bad_action_runs_nothing_and_writes_no_record(
    store: Any, gate: FinalityGate, action: str
) -> None:
    """A bad action raises InvalidInputError before anything runs: no record, case FINAL."""
    finalize(gate)
    before = written(store)
    with pytest.raises(InvalidInputError, match="action must be"):
        gate.settle(CID, action, never)
    assert written(store) == before
    assert store.records()[0] == []
    case = gate.get(CID)
    assert case is not None
    assert case.state is CaseState.FINAL


def _forgot_the_context(outcome: str) -> None:
    raise AssertionError("the side effect must not run")


async def _async_refund(outcome: str, ctx: Any) -> None:
    raise AssertionError("the side effect must not run")


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        pytest.param(_forgot_the_context, "must take .outcome, context.", id="one-argument"),
        pytest.param(lambda: None, "must take .outcome, context.", id="no-argument"),
        pytest.param(None, "must be a function", id="none"),
        pytest.param(_async_refund, "AsyncFinalityGate", id="async-on-sync-gate"),
    ],
)
def test_settle_with_an_fn_that_cannot_start_settles_nothing(
    store: Any, gate: FinalityGate, ledger: Ledger, fn: Any, match: str
) -> None:
    """An ``fn`` that could never be called as ``fn(outcome, context)`` (it forgot the
    context, is not callable, or is async on the sync gate) is refused before anything is
    recorded: the case stays FINAL, and the corrected call settles it, once. (Run through
    the guard, the wrapper's TypeError looked like a failure inside ``fn``: the case was
    SETTLED as FAILED for good, the refund never ran.)"""
    finalize(gate)
    before = written(store)
    with pytest.raises(ConfigurationError, match=match):
        gate.settle(CID, "issue_refund", fn)
    assert written(store) == before
    case = gate.get(CID)
    assert case is not None
    assert case.state is CaseState.FINAL

    def refund(outcome: str, ctx: Any) -> str:
        ledger.append(ctx.request_id, outcome)
        return "refunded"

    assert gate.settle(CID, "issue_refund", refund).result == "refunded"
    assert gate.settle(CID, "issue_refund", refund).replay
    assert ledger.count() == 1


def test_the_async_gate_refuses_an_fn_that_cannot_start(store: Any, ledger: Ledger) -> None:
    """The async gate applies the same check (an ``async def`` fn is fine there)."""

    async def main() -> None:
        gate = AsyncFinalityGate(
            AsyncGuard(store, wait=0), policy=ConsensusPolicy(threshold=0.5, quorum=1)
        )
        await gate.signal(CID, "fraud-model", APPROVE, 0.9)
        with pytest.raises(ConfigurationError, match="must take"):
            await gate.settle(CID, "issue_refund", _forgot_the_context)

        async def refund(outcome: str, ctx: Any) -> str:
            ledger.append(ctx.request_id, outcome)
            return "refunded"

        assert (await gate.settle(CID, "issue_refund", refund)).result == "refunded"

    asyncio.run(main())
    assert ledger.count() == 1


def test_cases_states_take_names_and_refuse_unknown_ones(gate: FinalityGate) -> None:
    """``states=`` takes members or their names; anything else is a typed error, as is a
    policy that is not a ConsensusPolicy."""
    finalize(gate)
    assert [c.case_id for c in gate.cases(states=["FINAL"])] == [CID]
    assert [c.case_id for c in gate.cases(states=[CaseState.FINAL, "OPEN"])] == [CID]
    assert gate.cases(states=["SETTLED"]) == []
    for bad in (["final"], ["NOPE"], "FINAL", [None]):
        with pytest.raises(InvalidInputError, match="states must"):
            gate.cases(states=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="ConsensusPolicy"):
        FinalityGate(gate.guard, policy={"threshold": 0.7})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="ConsensusPolicy"):
        gate.open("other", policy=0.7)  # type: ignore[arg-type]


# -- namespaces --------------------------------------------------------------------------


NS_ENTRY_POINTS: dict[str, Callable[[FinalityGate, str], Any]] = {
    "open": lambda g, ns: g.open(CID, namespace=ns),
    "signal": lambda g, ns: g.signal(CID, "fraud-model", APPROVE, 0.9, namespace=ns),
    "resolve": lambda g, ns: g.resolve(CID, APPROVE, by="alice", reason="r", namespace=ns),
    "settle": lambda g, ns: g.settle(CID, "issue_refund", never, namespace=ns),
    "get": lambda g, ns: g.get(CID, namespace=ns),
    "history": lambda g, ns: g.history(CID, namespace=ns),
    "cases": lambda g, ns: g.cases(namespace=ns),
}


@pytest.mark.parametrize("entry", sorted(NS_ENTRY_POINTS))
@pytest.mark.parametrize("namespace", [*BAD_TEXT, pytest.param("", id="empty")])
def test_a_bad_namespace_is_refused_on_every_entry_point(
    store: Any, gate: FinalityGate, entry: str, namespace: str
) -> None:
    """Every entry point, the cases() filter included, refuses a namespace with NUL or a
    lone surrogate (InvalidInputError, not StoreError or UnicodeEncodeError)."""
    with pytest.raises(InvalidInputError, match="namespace must be"):
        NS_ENTRY_POINTS[entry](gate, namespace)
    assert nothing_written(store)


# -- the async gate ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(lambda g: g.open(f"c{NUL}"), "case id", id="open-nul"),
        pytest.param(lambda g: g.signal(f"c{LONE}", "s", APPROVE, 0.9), "case id", id="signal"),
        pytest.param(lambda g: g.signal("c", f"s{NUL}", APPROVE, 0.9), "source", id="source"),
        pytest.param(lambda g: g.signal("c", "s", HIGH, 0.9), "outcome", id="outcome"),
        pytest.param(
            lambda g: g.resolve("c", APPROVE, by="a", reason=f"r{LONE}"), "reason", id="reason"
        ),
        pytest.param(lambda g: g.settle("c" * 251, "pay", never), "case id", id="settle-long"),
        pytest.param(lambda g: g.settle("c", f"pay{NUL}", never), "action", id="settle-action"),
        pytest.param(lambda g: g.get(f"c{NUL}"), "case id", id="get"),
        pytest.param(lambda g: g.history(HIGH), "case id", id="history"),
        pytest.param(lambda g: g.cases(namespace=f"n{NUL}"), "namespace", id="cases-ns"),
    ],
)
def test_the_async_gate_refuses_the_same_inputs(store: Any, call: Any, match: str) -> None:
    """AsyncFinalityGate runs the same checks before its first await on the store."""

    async def scenario() -> None:
        guard = AsyncGuard(store, lease=30, wait=0)
        gate = AsyncFinalityGate(guard)
        with pytest.raises(InvalidInputError, match=match):
            await call(gate)
        await guard.aclose()

    asyncio.run(scenario())
    assert nothing_written(store)
