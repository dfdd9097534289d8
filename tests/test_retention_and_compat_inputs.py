"""What the library's retention and audit functions accept, and the original package's
API after a retention purge.

``safeagent.retention.purge`` and ``safeagent.audit``'s ``anchor``, ``verify``,
``export`` and ``stats`` take a store, or a ``Guard`` / ``AsyncGuard`` (or a finality
gate), whose store they use; anything else (a path, a URL, ``None``) is a
``ConfigurationError`` naming what was expected, with nothing done, never an
``AttributeError``.

``SettlementRequestRegistry.execute`` on a purged request returns a receipt dict, as for
every other stored outcome (docs/design.md section 7): ``ok`` False, reason
``receipt_purged``, the tombstone's execution id and timestamp, no result, and the
side effect is not run again.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safeagent import (
    AsyncFinalityGate,
    AsyncGuard,
    ConfigurationError,
    EventKind,
    FinalityGate,
    Guard,
    ReceiptPurgedError,
    SQLiteStore,
    audit,
    retention,
)
from safeagent._keys import canonical_json, downstream_key, fingerprint
from safeagent.retention import PurgeReport
from safeagent.stores import ClaimRequest
from settlement.settlement_requests import SettlementRequestRegistry
from tests.conftest import PG_URL, START_MS, FakeClock, pg_schema, require_postgres

KEY = b"k" * 32
SECRET = "Hunter2Secret"


def later() -> None:
    """Let the store's clock pass the last completion: ``purge(older_than=0)`` takes
    records that finished *before* now, and one finished in this millisecond is not."""
    time.sleep(0.01)


def records(store: Any) -> list[tuple[str, str, Any]]:
    return [(r.request_id, r.status.value, r.purged_at_ms) for r in store.records()[0]]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """An SQLite file with one SUCCEEDED record, ``r-1``."""
    path = tmp_path / "guard.db"
    guard = Guard(path)
    guard.execute("r-1", "charge", {"amount": 5}, lambda ctx: {"charge_id": "ch_1"})
    guard.close()
    later()
    return path


@pytest.fixture
def pg_guard() -> Iterator[Guard]:
    """A guard on a fresh PostgreSQL schema, with one SUCCEEDED record, ``r-1``."""
    require_postgres()
    from safeagent.stores.postgres import PostgresStore

    store = PostgresStore(PG_URL, schema=pg_schema())
    guard = Guard(store)
    guard.execute("r-1", "charge", {"amount": 5}, lambda ctx: {"charge_id": "ch_1"})
    later()
    try:
        yield guard
    finally:
        store.drop_schema()
        store.close()


# -- retention.purge takes a guard -----------------------------------------------------------


def test_purge_takes_a_guard_and_uses_its_store(db: Path) -> None:
    """The reviewer's case: ``retention.purge(guard, ...)`` raised AttributeError."""
    guard = Guard(db)
    try:
        report = retention.purge(guard, older_than=0)
        assert report == PurgeReport(tombstoned=1, released=0, kept_pending=0, kept_in_doubt=0)
        with pytest.raises(ReceiptPurgedError):
            guard.execute("r-1", "charge", {"amount": 5}, lambda ctx: pytest.fail("ran again"))
    finally:
        guard.close()
    store = SQLiteStore(db)
    try:
        [(request_id, status, purged_at)] = records(store)
        assert (request_id, status) == ("r-1", "SUCCEEDED")
        assert purged_at is not None
    finally:
        store.close()


def test_purge_takes_an_async_guard_and_gates(db: Path) -> None:
    store = SQLiteStore(db)
    try:
        aguard = AsyncGuard(store)
        assert retention.purge(aguard, older_than=0).tombstoned == 1
        assert retention.purge(AsyncFinalityGate(aguard), older_than=0).tombstoned == 0
        assert retention.purge(FinalityGate(Guard(store)), older_than=0).tombstoned == 0
        asyncio.run(aguard.aclose())
    finally:
        store.close()


def test_purge_on_postgresql_takes_a_guard(pg_guard: Guard) -> None:
    assert retention.purge(pg_guard, older_than=0).tombstoned == 1
    [(_, status, purged_at)] = records(pg_guard.store)
    assert status == "SUCCEEDED"
    assert purged_at is not None


NOT_STORES = [
    pytest.param(None, id="none"),
    pytest.param("guard.db", id="a-path"),
    pytest.param(Path("guard.db"), id="a-pathlib-path"),
    pytest.param(f"postgresql://ops:{SECRET}@db/x", id="a-url"),
    pytest.param(42, id="an-int"),
    pytest.param(object(), id="an-object"),
    pytest.param({"records": 1}, id="a-dict"),
]


@pytest.mark.parametrize("target", NOT_STORES)
def test_purge_refuses_what_is_not_a_store_or_guard(db: Path, target: Any) -> None:
    """A ConfigurationError naming what it takes and what it got (only its type: a URL
    given by mistake may hold a password), and nothing purged."""
    type_name = type(target).__name__
    with pytest.raises(ConfigurationError) as caught:
        retention.purge(target, older_than=0)
    message = str(caught.value)
    assert "retention.purge takes a store" in message
    assert "Guard / AsyncGuard" in message
    assert f"got {type_name}" in message
    assert SECRET not in message
    store = SQLiteStore(db)
    try:
        assert [purged for _, _, purged in records(store)] == [None]
    finally:
        store.close()


def test_a_bad_target_is_reported_before_a_bad_age(db: Path) -> None:
    """Both wrong: the target is named (it is the first argument)."""
    with pytest.raises(ConfigurationError, match="takes a store"):
        retention.purge("guard.db", older_than=-1)


# -- safeagent.audit takes a guard ------------------------------------------------------------


def test_audit_functions_take_a_guard(db: Path) -> None:
    guard = Guard(db)
    try:
        anchor = audit.anchor(guard, key=KEY)
        report = audit.verify(guard, key=KEY, last_anchor=anchor.pin)
        assert report.ok, report.problems
        out = io.StringIO()
        assert audit.export(guard, out) == len(guard.store.events())
        assert '"kind":"claimed"' in out.getvalue()
        assert audit.stats(guard).executions == 1
        gate = FinalityGate(guard)
        assert audit.stats(gate).executions == 1
        assert audit.verify(gate, key=KEY, last_anchor=anchor.pin).ok
    finally:
        guard.close()


def test_audit_functions_take_an_async_guard(db: Path) -> None:
    store = SQLiteStore(db)
    try:
        aguard = AsyncGuard(store)
        anchor = audit.anchor(aguard, key=KEY)
        assert audit.verify(aguard, key=KEY, last_anchor=anchor).ok
        assert audit.stats(aguard).executions == 1
        asyncio.run(aguard.aclose())
    finally:
        store.close()


def test_audit_functions_on_postgresql_take_a_guard(pg_guard: Guard) -> None:
    anchor = audit.anchor(pg_guard, key=KEY)
    assert audit.verify(pg_guard, key=KEY, last_anchor=anchor.pin).ok
    assert audit.stats(pg_guard).executions == 1
    out = io.StringIO()
    assert audit.export(pg_guard, out, fmt="csv") == len(pg_guard.store.events())


AUDIT_CALLS = [
    pytest.param("audit.anchor", lambda t: audit.anchor(t, key=KEY), id="anchor"),
    pytest.param("audit.verify", audit.verify, id="verify"),
    pytest.param("audit.export", lambda t: audit.export(t, io.StringIO()), id="export"),
    pytest.param("audit.stats", audit.stats, id="stats"),
]


@pytest.mark.parametrize(("name", "call"), AUDIT_CALLS)
@pytest.mark.parametrize("target", NOT_STORES)
def test_audit_functions_refuse_what_is_not_a_store_or_guard(
    db: Path, name: str, call: Any, target: Any
) -> None:
    store = SQLiteStore(db)
    try:
        before = (len(store.events()), len(store.anchors()))
    finally:
        store.close()
    with pytest.raises(ConfigurationError) as caught:
        call(target)
    message = str(caught.value)
    assert f"{name} takes a store" in message
    assert f"got {type(target).__name__}" in message
    assert "Guard / AsyncGuard" in message
    assert SECRET not in message
    store = SQLiteStore(db)
    try:
        assert (len(store.events()), len(store.anchors())) == before
    finally:
        store.close()


# -- the original package's API after a purge -------------------------------------------------


def registry_on(tmp_path: Path) -> SettlementRequestRegistry:
    return SettlementRequestRegistry(sqlite_path=str(tmp_path / "compat.db"), wait_seconds=0)


def test_a_purged_success_is_a_receipt_dict_and_does_not_run_again(tmp_path: Path) -> None:
    """The reviewer's case: ``execute`` raised ReceiptPurgedError."""
    calls: list[int] = []
    reg = registry_on(tmp_path)
    try:
        first = reg.execute("r1", "charge", {"x": 1}, lambda: calls.append(1) or 2)
        assert (first["ok"], first["reason"], first["result"]) == (True, "executed", 2)
        later()
        assert retention.purge(reg.guard, older_than=0).tombstoned == 1
        again = reg.execute("r1", "charge", {"x": 1}, lambda: calls.append(1) or 3)
    finally:
        reg.close()
    assert calls == [1]
    assert again == {
        "ok": True,  # it succeeded: ok=False would read as "try again under a new id"
        "reason": "receipt_purged",
        "request_id": "r1",
        "execution_id": first["execution_id"],
        "action": "charge",
        "payload": {"x": 1},
        "timestamp_utc": first["timestamp_utc"],
        "result": None,
        "error": None,
    }


def test_a_purged_failure_keeps_its_error_type(tmp_path: Path) -> None:
    def declined(payload: Any) -> None:
        raise ValueError(f"declined {payload['card']}")

    reg = registry_on(tmp_path)
    try:
        first = reg.execute("r2", "charge", {"card": "4242"}, declined)
        assert first["reason"] == "execute_failed:ValueError"
        later()
        retention.purge(reg.guard.store, older_than=0)
        again = reg.execute("r2", "charge", {"card": "4242"}, lambda: pytest.fail("ran"))
    finally:
        reg.close()
    assert (again["ok"], again["reason"]) == (False, "receipt_purged")
    assert again["error"] == {"type": "ValueError", "message": ""}  # the message was purged
    assert again["execution_id"] == first["execution_id"]
    assert again["result"] is None


def test_a_purged_request_with_another_payload_or_action_is_still_a_conflict(
    tmp_path: Path,
) -> None:
    reg = registry_on(tmp_path)
    try:
        reg.execute("r1", "charge", {"x": 1}, lambda: 2)
        later()
        retention.purge(reg.guard, older_than=0)
        payload = reg.execute("r1", "charge", {"x": 2}, lambda: pytest.fail("ran"))
        action = reg.execute("r1", "refund", {"x": 1}, lambda: pytest.fail("ran"))
    finally:
        reg.close()
    assert (payload["ok"], payload["reason"]) == (False, "conflict_payload_mismatch")
    assert (action["ok"], action["reason"]) == (False, "conflict_action_mismatch")


def test_a_released_then_purged_request_runs_again(tmp_path: Path) -> None:
    """A released record has no outcome: a purge removes its payload, and the next call
    runs (``executed``), as without the purge."""

    class Declined(Exception):
        pass

    def refused() -> None:
        raise Declined("not sent")

    reg = SettlementRequestRegistry(
        sqlite_path=str(tmp_path / "compat.db"), wait_seconds=0, not_executed=(Declined,)
    )
    try:
        assert reg.execute("r3", "email", {"to": "a"}, refused)["reason"] == "released"
        later()
        assert retention.purge(reg.guard, older_than=0).released == 1
        again = reg.execute("r3", "email", {"to": "a"}, lambda: "sent")
    finally:
        reg.close()
    assert (again["ok"], again["reason"], again["result"]) == (True, "executed", "sent")


def test_a_purged_request_on_postgresql(pg_throwaway_database_url: str) -> None:
    """The same through ``postgres_dsn`` (a database made for this test)."""
    calls: list[int] = []
    reg = SettlementRequestRegistry(postgres_dsn=pg_throwaway_database_url, wait_seconds=0)
    try:
        first = reg.execute("r1", "charge", {"x": 1}, lambda: calls.append(1) or 2)
        later()
        assert retention.purge(reg.guard, older_than=0).tombstoned == 1
        again = reg.execute("r1", "charge", {"x": 1}, lambda: calls.append(1) or 3)
    finally:
        reg.close()
    assert calls == [1]
    assert (again["ok"], again["reason"], again["result"]) == (True, "receipt_purged", None)
    assert again["execution_id"] == first["execution_id"]


# -- retention.purge(before_ms=...): an absolute cutoff ---------------------------------------


def _seed_at(store: Any, clock: FakeClock) -> tuple[int, int]:
    """``early`` finished at START_MS, ``late`` one second later; returns both instants."""
    guard = Guard(store, wait=0)
    guard.execute("early", "charge", {"n": 1}, lambda ctx: "e")
    clock.advance(1.0)
    guard.execute("late", "charge", {"n": 2}, lambda ctx: "l")
    clock.advance(60.0)
    return START_MS, START_MS + 1000


def test_purge_before_ms_purges_only_what_finished_before_that_instant(
    store_factory: Any, clock: FakeClock
) -> None:
    """``before_ms`` is the cutoff itself (store clock, ms): a record that finished before
    it is tombstoned, one that finished at it or later is kept, whatever the clock reads
    at purge time; the ``purged`` event records that cutoff."""
    store = store_factory()
    _, late = _seed_at(store, clock)
    report = retention.purge(store, before_ms=late, actor="ops")
    assert report == PurgeReport(tombstoned=1, released=0, kept_pending=0, kept_in_doubt=0)
    purged = {r.request_id: r.purged_at_ms is not None for r in store.records()[0]}
    assert purged == {"early": True, "late": False}
    [event] = [e for e in store.events() if e.kind is EventKind.PURGED]
    assert event.detail["cutoff_ms"] == late
    assert retention.purge(store, before_ms=late + 1, actor="ops").tombstoned == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "exactly one of older_than"),
        ({"older_than": 0, "before_ms": START_MS}, "exactly one of older_than"),
        ({"before_ms": True}, "before_ms must be an int"),
        ({"before_ms": 1.5e12}, "before_ms must be an int"),
        ({"before_ms": "1700000000000"}, "before_ms must be an int"),
        ({"before_ms": 2**63}, "before_ms must be an int"),
        ({"before_ms": -(2**63) - 1}, "before_ms must be an int"),
    ],
    ids=["neither", "both", "bool", "float", "str", "above-bigint", "below-bigint"],
)
def test_purge_refuses_a_bad_cutoff_and_purges_nothing(
    db: Path, arguments: dict[str, Any], message: str
) -> None:
    """Both or neither of ``older_than`` and ``before_ms``, or a ``before_ms`` that is not
    an int a store column holds, is ConfigurationError, and nothing is purged."""
    store = SQLiteStore(db)
    try:
        with pytest.raises(ConfigurationError, match=message):
            retention.purge(store, **arguments)
        assert [purged for _, _, purged in records(store)] == [None]
        assert not [e for e in store.events() if e.kind is EventKind.PURGED]
    finally:
        store.close()


def test_purge_counts_an_expired_pending_lease_as_kept_in_doubt(
    store_factory: Any, clock: FakeClock
) -> None:
    """A PENDING record whose lease has expired reads IN_DOUBT (docs/design.md), so purge
    counts it in ``kept_in_doubt``; one whose lease is live stays ``kept_pending``; every
    store alike, at the store's clock."""
    store = store_factory()
    for request_id, lease_ms in (("dead", 1_000), ("alive", 3_600_000)):
        body = canonical_json({"id": request_id})
        claim = store.claim(
            ClaimRequest(
                namespace="default",
                request_id=request_id,
                action="charge",
                fingerprint=fingerprint("charge", body),
                payload_json=body.decode(),
                execution_id=f"x-{request_id}",
                owner="worker:1:MainThread",
                lease_ms=lease_ms,
                downstream_key=downstream_key("default", "charge", request_id),
            )
        )
        assert claim.won
    clock.advance(60.0)  # "dead"'s lease expired, "alive"'s runs for an hour
    report = retention.purge(store, older_than=0)
    assert report == PurgeReport(tombstoned=0, released=0, kept_pending=1, kept_in_doubt=1)
    [event] = [e for e in store.events() if e.kind is EventKind.PURGED]
    assert (event.detail["kept_pending"], event.detail["kept_in_doubt"]) == (1, 1)
