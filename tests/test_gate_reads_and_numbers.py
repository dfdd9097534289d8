"""The finality gate's reads and numeric inputs, as a review found them wanting.

- Every numeric input (confidence, threshold, quorum, durations) is converted first, then
  checked, and kept as checked: a huge int is a typed error (not OverflowError or the
  ValueError of ``repr``), and a float or int subclass cannot pass the check with one
  value and be stored with another.
- A case read back (``cases()``, ``get()``, ``open()``) is its row and live signals as
  read together, never a row of one moment with the signals of a later one.
- ``cases()`` lists the guard's namespace by default, as every other gate method reads it;
  ``all_namespaces=True`` lists them all.
- ``open(policy=...)`` refuses an existing case opened with another policy.
- A gate refuses a guard of the wrong kind when it is built.
- A case row that cannot be read makes ``cases()`` and ``get()`` raise StoreError naming it.
- The memory store's rolled-back auto-open leaves nothing in the audit chain.

Every test runs on real stores (memory, SQLite files, the PostgreSQL server) through the
fixtures of tests/conftest.py; rows are corrupted behind the store's back by raw SQL.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from safeagent import (
    AsyncFinalityGate,
    AsyncGuard,
    Case,
    CaseState,
    ConfigurationError,
    ConsensusPolicy,
    FinalityGate,
    Guard,
    InvalidInputError,
    MemoryStore,
    StoreError,
    audit,
)
from safeagent.stores._rows import GENESIS
from tests.conftest import Ledger
from tests.conftest import raw_sql as _sql

CID = "refund-9"
APPROVE = "approve"
HUGE = [10**400, -(10**400), 10**5000]


def written(store: Any) -> dict[str, Any]:
    """Everything the store holds, read through the store itself: cases (every
    namespace) with their signals, events and records."""
    store.flush_events()
    cases = store.cases()
    return {
        "cases": cases,
        "signals": [store.case_signals(c.namespace, c.case_id) for c in cases],
        "events": [(e.kind, e.subject, dict(e.detail)) for e in store.events()],
        "records": [(r.request_id, r.status) for r in store.records()[0]],
    }


def nothing_written(store: Any) -> bool:
    return written(store) == {"cases": [], "signals": [], "events": [], "records": []}


def never(outcome: str, ctx: Any) -> None:
    raise AssertionError("the side effect must not run")


# -- numbers: converted, then checked, then kept as checked --------------------------------


class Sneaky(float):
    """A float that shows 0.5 but converts (``float()``) to 5.0."""

    def __float__(self) -> float:
        return 5.0


class Shrinking(float):
    """A float that shows 0.9 but converts to 0.25."""

    def __float__(self) -> float:
        return 0.25


class Agreeable(int):
    """An int whose comparisons always say yes: every range check passes as written."""

    def __le__(self, other: object) -> bool:
        return True

    def __ge__(self, other: object) -> bool:
        return True

    def __lt__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return True


class Forever(float):
    """A duration that shows 1.0 s but converts to 1e300 s."""

    def __float__(self) -> float:
        return 1e300


@pytest.mark.parametrize("confidence", HUGE, ids=["1e400", "-1e400", "1e5000"])
def test_a_huge_int_confidence_is_invalid_input_and_records_nothing(
    store: Any, confidence: int
) -> None:
    """``signal(..., 10**400)`` was a bare OverflowError (``10**5000``: the ValueError of
    ``repr``); it is InvalidInputError on the sync and async gate, before the store."""
    with pytest.raises(InvalidInputError, match="confidence must be a number in"):
        FinalityGate(Guard(store)).signal(CID, "model", APPROVE, confidence)

    async def scenario() -> None:
        with pytest.raises(InvalidInputError, match="confidence must be a number in"):
            await AsyncFinalityGate(AsyncGuard(store)).signal(CID, "model", APPROVE, confidence)

    asyncio.run(scenario())
    assert nothing_written(store)


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param({"threshold": 10**5000}, id="threshold-1e5000"),
        pytest.param({"threshold": -(10**400)}, id="threshold--1e400"),
        pytest.param({"quorum": 10**5000}, id="quorum-1e5000"),
    ],
)
def test_a_huge_int_threshold_or_quorum_is_a_configuration_error(policy: dict[str, int]) -> None:
    """A policy of ``10**5000`` raised the ValueError of ``repr`` (more than 4300 digits)
    from inside the error message; it is ConfigurationError, the int described."""
    with pytest.raises(ConfigurationError, match="an int of more than 30 digits"):
        ConsensusPolicy(**policy)


def test_a_float_subclass_confidence_is_checked_as_converted(store: Any) -> None:
    """A float showing 0.5 whose ``float()`` is 5.0 passed the [0, 1] check and was stored
    as 5.0 (a one-source FINAL over two honest sources); it is refused, nothing recorded."""
    gate = FinalityGate(Guard(store), policy=ConsensusPolicy(0.6, 1))
    gate.signal(CID, "honest-1", "reject", 0.5)
    gate.signal(CID, "honest-2", APPROVE, 1.0)
    before = written(store)
    with pytest.raises(InvalidInputError, match=r"as a number 5\.0"):
        gate.signal(CID, "sneaky", APPROVE, Sneaky(0.5))
    assert written(store) == before
    case = gate.get(CID)
    assert case is not None
    assert case.state is CaseState.IN_RECONCILIATION
    assert [s.confidence for s in case.signals] == [0.5, 1.0]


def test_a_negative_zero_confidence_is_kept_as_zero_by_every_store(store: Any) -> None:
    """-0.0 is in [0, 1]; it is kept as 0.0, so every store holds one value (SQLite kept
    0.0 where the memory and PostgreSQL stores kept -0.0)."""
    gate = FinalityGate(Guard(store), policy=ConsensusPolicy(0.6, 1))
    case = gate.signal(CID, "model", APPROVE, -0.0)
    (signal,) = case.signals
    assert math.copysign(1.0, signal.confidence) == 1.0
    (stored,) = FinalityGate(Guard(store)).get(CID).signals  # type: ignore[union-attr]
    assert math.copysign(1.0, stored.confidence) == 1.0


def test_an_int_subclass_confidence_is_checked_as_the_int_it_holds(store: Any) -> None:
    """An int holding 7 whose comparisons always pass was stored as 7.0; it is refused."""
    with pytest.raises(InvalidInputError, match="confidence must be"):
        FinalityGate(Guard(store)).signal(CID, "model", APPROVE, Agreeable(7))
    assert nothing_written(store)


def test_a_policy_keeps_exactly_the_numbers_it_checked(store: Any) -> None:
    """ConsensusPolicy converts, checks, and keeps the converted values: a float subclass
    is kept as the plain float its ``float()`` gives (the tally, the store and ``repr``
    all see one number); one converting out of range, or an int holding 0 whose
    comparisons pass, is refused."""
    policy = ConsensusPolicy(threshold=Shrinking(0.9), quorum=Agreeable(2))
    assert (type(policy.threshold), policy.threshold) == (float, 0.25)
    assert (type(policy.quorum), policy.quorum) == (int, 2)
    case = FinalityGate(Guard(store)).open(CID, policy=policy)
    assert case.policy == ConsensusPolicy(0.25, 2)
    with pytest.raises(ConfigurationError, match="threshold"):
        ConsensusPolicy(threshold=Sneaky(0.5))
    with pytest.raises(ConfigurationError, match="quorum"):
        ConsensusPolicy(quorum=Agreeable(0))


def test_a_duration_is_checked_as_converted(store: Any, ledger: Ledger) -> None:
    """A wait showing 1.0 s whose ``float()`` is 1e300 s passed the one-year bound and was
    used as 1e300; the guard and the gate's settle refuse it before anything runs."""
    with pytest.raises(ConfigurationError, match="wait must be at most"):
        Guard(store, wait=Forever(1.0))
    gate = FinalityGate(Guard(store, wait=0))
    gate.signal(CID, "model", APPROVE, 0.9)
    with pytest.raises(ConfigurationError, match=r"wait must be at most .* 1e\+300"):
        gate.settle(CID, "pay", never, wait=Forever(1.0))
    with pytest.raises(ConfigurationError, match="lease must be at most"):
        gate.settle(CID, "pay", never, lease=10**5000)
    assert store.records()[0] == []


# -- one snapshot per case -----------------------------------------------------------------


def _consistent(case: Case) -> bool:
    """Sources A, B and C each vote once (threshold 0.5, quorum 3): every accepted signal
    bumps the version once, and only the third makes the case FINAL."""
    final = case.state is CaseState.FINAL
    return (
        case.version == 1 + len(case.signals)
        and final == (len(case.signals) == 3)
        and final == (case.tally.winner is not None)
    )


READS: dict[str, Callable[[FinalityGate, str], list[Case | None]]] = {
    "cases": lambda gate, _cid: gate.cases(states=[CaseState.RESOLVED_PROVISIONAL]),
    "get": lambda gate, cid: [gate.get(cid)],
    "open": lambda gate, cid: [gate.open(cid)],
}


@pytest.mark.parametrize("read", sorted(READS))
def test_a_case_read_during_signals_is_one_snapshot(store: Any, read: str) -> None:
    """While another thread signals cases from OPEN to FINAL, every case ``cases()``,
    ``get()`` and ``open()`` return is a state that existed: its row and live signals
    read together. (``cases()`` read each row, then its signals in a later read: a
    RESOLVED_PROVISIONAL case at version 2 came with two or three signals and a winner;
    ``open()`` did the same; PostgreSQL's ``get()`` read them in two statements of a READ
    COMMITTED transaction, each its own snapshot.)"""
    gate = FinalityGate(Guard(store, wait=0), policy=ConsensusPolicy(threshold=0.5, quorum=3))
    current = ["c0"]
    stop = threading.Event()
    failed: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                current[0] = f"c{i}"
                for source in "ABC":
                    gate.signal(f"c{i}", source, APPROVE, 1.0)
        except BaseException as exc:  # reported by the test
            failed.append(exc)

    torn: list[Case] = []
    reads = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the reads interleave with writes
    thread = threading.Thread(target=writer)
    try:
        thread.start()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and not torn:
            found = READS[read](gate, current[0])
            reads += 1
            torn += [c for c in found if c is not None and not _consistent(c)]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not failed
    assert reads > 10
    assert torn == [], f"a case that never existed: {torn[0]}"


def test_the_fallback_listing_of_a_store_without_cases_with_live_is_consistent() -> None:
    """A store with only the ReceiptStore methods is listed case by case through
    ``get_case`` (row and signals together); a case that left the asked states since the
    listing was read is left out."""

    class Plain(MemoryStore):
        cases_with_live = None  # as a store implementing only the protocol

    store = Plain()
    gate = FinalityGate(Guard(store), policy=ConsensusPolicy(threshold=0.5, quorum=2))
    gate.signal("a", "A", APPROVE, 1.0)
    gate.signal("b", "A", APPROVE, 1.0)
    gate.signal("b", "B", APPROVE, 1.0)
    listed = gate.cases(states=["RESOLVED_PROVISIONAL"])
    assert [(c.case_id, c.version, len(c.signals)) for c in listed] == [("a", 2, 1)]
    assert [c.case_id for c in gate.cases()] == ["a", "b"]


# -- namespaces ----------------------------------------------------------------------------


def test_cases_lists_the_guards_namespace_unless_asked_for_all(store: Any) -> None:
    """An operator listing through tenant A's gate saw tenant B's case and resolved tenant
    A's case of the same id by mistake; ``cases()`` now lists the guard's namespace (as
    ``get``, ``signal``, ``resolve`` and ``settle`` read it), ``all_namespaces=True``
    lists every one, and each listed case names its namespace."""
    gate_a = FinalityGate(Guard(store, namespace="tenant-a"), policy=ConsensusPolicy(0.9, 2))
    gate_b = FinalityGate(Guard(store, namespace="tenant-b"), policy=ConsensusPolicy(0.9, 2))
    gate_b.signal("refund-1", "m1", APPROVE, 0.9)
    gate_b.signal("refund-1", "m2", "reject", 0.9)
    gate_a.signal("refund-1", "m1", APPROVE, 0.5)
    assert gate_a.cases(states=["IN_RECONCILIATION"]) == []
    everywhere = gate_a.cases(states=["IN_RECONCILIATION"], all_namespaces=True)
    assert [(c.namespace, c.case_id) for c in everywhere] == [("tenant-b", "refund-1")]
    for case in everywhere:  # an operator resolving what it listed, by its namespace
        gate_a.resolve(case.case_id, "reject", by="op", reason="x", namespace=case.namespace)
    mine = gate_a.get("refund-1")
    assert mine is not None
    assert mine.state is CaseState.RESOLVED_PROVISIONAL
    theirs = gate_b.get("refund-1")
    assert theirs is not None
    assert (theirs.state, theirs.outcome) == (CaseState.FINAL, "reject")
    assert [c.namespace for c in gate_a.cases()] == ["tenant-a"]
    assert [c.namespace for c in gate_a.cases(namespace="tenant-b")] == ["tenant-b"]
    assert [c.namespace for c in gate_a.cases(all_namespaces=True)] == ["tenant-a", "tenant-b"]

    async def scenario() -> None:
        aguard = AsyncGuard(store, namespace="tenant-b")
        agate = AsyncFinalityGate(aguard)
        assert [c.namespace for c in await agate.cases()] == ["tenant-b"]
        listed = await agate.cases(all_namespaces=True)
        assert [c.namespace for c in listed] == ["tenant-a", "tenant-b"]
        await aguard.aclose()

    asyncio.run(scenario())


# -- a case's policy -----------------------------------------------------------------------


def test_open_refuses_an_existing_case_with_another_policy(store: Any, ledger: Ledger) -> None:
    """A case auto-opened by another gate's signal (default policy 0.8 / 1) was returned
    by ``open(policy=0.9 / 3)`` as it was, and settled on one source; ``open`` now raises
    ConfigurationError with both policies, and changes nothing."""
    agent_gate = FinalityGate(Guard(store))
    agent_gate.signal(CID, "rogue-agent", APPROVE, 0.9)
    strict = ConsensusPolicy(threshold=0.9, quorum=3)
    app_gate = FinalityGate(Guard(store), policy=strict)
    before = written(store)
    with pytest.raises(ConfigurationError, match="policy never changes") as info:
        app_gate.open(CID, policy=strict)
    err = info.value
    assert (err.case_id, err.namespace, err.threshold, err.quorum) == (CID, "default", 0.8, 1)
    assert err.requested == strict
    assert written(store) == before
    # Without a policy, or with the stored one, the case is returned as it is.
    assert app_gate.open(CID).policy == ConsensusPolicy(0.8, 1)
    assert app_gate.open(CID, policy=ConsensusPolicy(0.8, 1)).state is CaseState.FINAL
    # A new case opened first with the strict policy keeps it, whatever gate signals.
    app_gate.open("refund-10", policy=strict)
    case = agent_gate.signal("refund-10", "rogue-agent", APPROVE, 0.9)
    assert (case.policy, case.state) == (strict, CaseState.RESOLVED_PROVISIONAL)

    async def scenario() -> None:
        agate = AsyncFinalityGate(AsyncGuard(store))
        with pytest.raises(ConfigurationError, match="policy never changes"):
            await agate.open(CID, policy=strict)

    asyncio.run(scenario())
    assert ledger.count() == 0


# -- the guard a gate is given -------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(
            lambda: FinalityGate(AsyncGuard(MemoryStore())),  # type: ignore[arg-type]
            r"FinalityGate takes a Guard, got AsyncGuard: use AsyncFinalityGate",
            id="async-guard-on-sync-gate",
        ),
        pytest.param(
            lambda: FinalityGate(MemoryStore()),  # type: ignore[arg-type]
            r"FinalityGate takes a Guard, got MemoryStore: .*FinalityGate\(Guard\(store\)\)",
            id="store-on-sync-gate",
        ),
        pytest.param(
            lambda: AsyncFinalityGate(Guard(MemoryStore())),  # type: ignore[arg-type]
            r"AsyncFinalityGate takes an AsyncGuard, got Guard: use FinalityGate",
            id="sync-guard-on-async-gate",
        ),
        pytest.param(
            lambda: AsyncFinalityGate(MemoryStore()),  # type: ignore[arg-type]
            r"AsyncFinalityGate\(AsyncGuard\(store\)\)",
            id="store-on-async-gate",
        ),
    ],
)
def test_a_gate_refuses_the_wrong_guard_when_built(build: Callable[[], Any], match: str) -> None:
    """A gate on the wrong kind of guard (or on a store) failed later, at settle, with an
    AttributeError and a coroutine never awaited; it is a ConfigurationError naming what
    to use, when the gate is built."""
    with pytest.raises(ConfigurationError, match=match):
        build()


# -- rows that cannot be read --------------------------------------------------------------


CORRUPTIONS = {
    "state": (
        "UPDATE {s}.cases SET state = 'BOGUS' WHERE case_id = 'bad'",
        r"case default/bad: state 'BOGUS' is not a case state",
    ),
    "policy": (
        "UPDATE {s}.cases SET threshold = 5.0 WHERE case_id = 'bad'",
        r"case default/bad: its stored policy is invalid \(threshold must be in",
    ),
    "signal": (
        "UPDATE {s}.signals SET metadata = '{not json' WHERE case_id = 'bad'",
        r"case default/bad: it or one of its live signals cannot be read",
    ),
}


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_a_case_row_that_cannot_be_read_is_a_store_error_naming_it(
    db_store: Any, corrupt: str
) -> None:
    """One case row edited by hand (a state no release writes, an out-of-range policy, a
    live signal's metadata that is not JSON) made ``cases()`` raise a bare ValueError (or
    a ConfigurationError, or JSONDecodeError) for the whole listing, naming nothing; it is
    a StoreError naming the row (``unreadable``), and a listing without it still works.
    A signal or resolution of that case is the same StoreError (they raised the bare
    error too), and records nothing."""
    gate = FinalityGate(Guard(db_store, wait=0), policy=ConsensusPolicy(0.9, 2))
    gate.signal("good", "model", APPROVE, 1.0)
    gate.signal("bad", "model", APPROVE, 1.0)
    statement, named = CORRUPTIONS[corrupt]
    _sql(db_store, statement)
    for listing in (gate.cases, lambda: gate.cases(all_namespaces=True)):
        with pytest.raises(StoreError, match=named) as info:
            listing()
        (problem,) = info.value.unreadable
        assert problem.startswith("case default/bad: ")
        assert "good" not in str(info.value)
    with pytest.raises(StoreError, match=named):
        gate.get("bad")
    # a write reads the row too: a StoreError naming it, nothing recorded
    events = len(db_store.events())
    with pytest.raises(StoreError, match=named):
        gate.signal("bad", "other", APPROVE, 1.0)
    with pytest.raises(StoreError, match=named):
        gate.resolve("bad", APPROVE, by="op", reason="checked")
    assert len(db_store.events()) == events
    good = gate.get("good")
    assert good is not None
    assert good.state is CaseState.RESOLVED_PROVISIONAL
    assert gate.cases(namespace="elsewhere") == []

    async def scenario() -> None:
        agate = AsyncFinalityGate(AsyncGuard(db_store))
        with pytest.raises(StoreError, match=named):
            await agate.cases()
        with pytest.raises(StoreError, match=named):
            await agate.signal("bad", "other", APPROVE, 1.0)
        with pytest.raises(StoreError, match=named):
            await agate.resolve("bad", APPROVE, by="op", reason="checked")

    asyncio.run(scenario())


# -- the memory store's rolled-back auto-open ----------------------------------------------


def test_a_memory_auto_open_rolled_back_leaves_nothing_in_the_chain() -> None:
    """A mutation interrupted inside ``update_case`` (a KeyboardInterrupt) undid the case
    and its event in ``events()`` but left the OPEN event chained in ``audit_chain()``
    with the chain head moved; now nothing is written before the mutation succeeds."""
    store = MemoryStore()

    def interrupted(case: Any, live: Any) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.update_case(
            "default", CID, interrupted, signal=None, actor="x", detail={}, open_with=(0.8, 1)
        )
    assert store.get_case("default", CID) == (None, [])
    assert store.events() == []
    rows, heads = store.audit_chain()
    assert rows == []
    assert set(heads.values()) == {(0, GENESIS)}
    FinalityGate(Guard(store)).signal(CID, "model", APPROVE, 0.9)
    rows, _heads = store.audit_chain()
    assert sorted(r[0] for r in rows) == [e.id for e in store.events()]
    assert audit.verify(store).ok
