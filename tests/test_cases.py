"""The cases of /work/shared/cases: faults of the original package (items 1-8) and peer
faults P1-P5, each asserting the right behaviour.

Ground truth is an effect ledger separate from the guard's database (a SQLite file, or
an appended text file for child processes); tests never count the guard's own records.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from safeagent import (
    ConfigurationError,
    EventKind,
    ExecutionContext,
    FingerprintMismatchError,
    Guard,
    InProgressError,
    InvalidTransitionError,
    MemoryStore,
    MissingKeyError,
    NotExecuted,
    OutcomeUnknownError,
    ReplayedFailureError,
    ResultNotSerializableError,
    SQLiteStore,
    Status,
)
from settlement.settlement_requests import SettlementRequestRegistry
from tests.conftest import FakeClock, Ledger

ROOT = Path(__file__).resolve().parent.parent
RECEIPT_KEYS = {
    "ok",
    "reason",
    "request_id",
    "execution_id",
    "action",
    "payload",
    "timestamp_utc",
    "result",
    "error",
}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh child interpreter: no store variables, no PYTHONPATH."""
    drop = ("SAFEAGENT_DB", "SAFEAGENT_DATABASE_URL", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def registry(path: Path, **kw: Any) -> Any:
    return SettlementRequestRegistry(sqlite_path=str(path), **kw)


def guard_events(db: Path, request_id: str) -> list[EventKind]:
    """The audit trail of ``request_id`` in the SQLite file ``db``, read by a new guard."""
    with Guard(SQLiteStore(db)) as g:
        return [e.kind for e in g.audit_trail(request_id)]


CLAIM_AND_DIE = """
    import json, os, signal, sys
    from safeagent import Guard, SQLiteStore

    db, rid, action, payload, lease = sys.argv[1:6]

    def fn(ctx):
        os.kill(os.getpid(), signal.SIGKILL)  # dies before the side effect

    Guard(SQLiteStore(db), lease=float(lease)).execute(rid, action, json.loads(payload), fn)
"""


def claim_and_die(db: Path, rid: str, action: str, payload: Any, lease: float) -> int:
    """A child process claims ``rid`` and is SIGKILLed inside fn; returns its pid."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CLAIM_AND_DIE),
            str(db),
            rid,
            action,
            json.dumps(payload),
            str(lease),
        ],
        env=clean_env(),
    )
    assert proc.wait(60) == -signal.SIGKILL
    return proc.pid


def booking(ledger: Ledger, result: Any = None) -> Any:
    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id, json.dumps(ctx.payload, sort_keys=True))
        return {"booked": ctx.request_id} if result is None else result

    return fn


# == original package, item 1: the quickstart import ========================================


def test_item1_quickstart_import_works_first_thing_in_a_new_process(tmp_path: Path) -> None:
    """Item 1: `from settlement.settlement_requests import SettlementRequestRegistry` works
    first thing in a fresh interpreter."""
    proc = run_python(
        """
        from settlement.settlement_requests import SettlementRequestRegistry
        print(SettlementRequestRegistry.__name__)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "SettlementRequestRegistry"


# == item 2: durable by default =============================================================

RESTART_DEMO = """
    import json, os
    from settlement.settlement_requests import SettlementRequestRegistry

    def send(payload):
        fd = os.open("ledger.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (payload["to"] + "\\n").encode())
        os.close(fd)
        return {"sent_to": payload["to"]}

    registry = SettlementRequestRegistry()
    receipt = registry.execute(request_id="restart-demo-1", action="send_email",
                               payload={"to": "a@example.com"}, execute_fn=send)
    registry.close()
    print(json.dumps(receipt))
"""


def test_item2_default_registry_is_durable_across_restarts(tmp_path: Path) -> None:
    """Item 2: `SettlementRequestRegistry()` is durable: a second process replays, no rerun."""
    first = run_python(RESTART_DEMO, tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_python(RESTART_DEMO, tmp_path)
    assert second.returncode == 0, second.stderr
    r1, r2 = json.loads(first.stdout), json.loads(second.stdout)
    assert (r1["ok"], r1["reason"]) == (True, "executed")
    assert (r2["ok"], r2["reason"]) == (True, "dedup_same_request_id")
    assert r2["result"] == r1["result"] == {"sent_to": "a@example.com"}
    assert r2["execution_id"] == r1["execution_id"]
    assert r2["timestamp_utc"] == r1["timestamp_utc"]
    assert (tmp_path / "safeagent.db").exists()
    assert (tmp_path / "ledger.txt").read_text().splitlines() == ["a@example.com"]


def test_item2_safeagent_db_env_var_sets_the_default_file(tmp_path: Path) -> None:
    """Item 2: $SAFEAGENT_DB overrides the default ./safeagent.db."""
    db = tmp_path / "elsewhere.db"
    for _ in range(2):
        proc = run_python(RESTART_DEMO, tmp_path, SAFEAGENT_DB=str(db))
        assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["reason"] == "dedup_same_request_id"
    assert db.exists()
    assert not (tmp_path / "safeagent.db").exists()
    assert (tmp_path / "ledger.txt").read_text().splitlines() == ["a@example.com"]


def test_the_database_url_variable_wins_over_the_sqlite_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_throwaway_database_url: str
) -> None:
    """$SAFEAGENT_DATABASE_URL set: Guard() opens PostgreSQL, not a per-host SQLite file
    (which would let every host run the same request once), as the CLI and the docs say."""
    from safeagent.stores.postgres import PostgresStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEAGENT_DB", str(tmp_path / "not-this.db"))
    monkeypatch.setenv("SAFEAGENT_DATABASE_URL", pg_throwaway_database_url)
    runs: list[int] = []
    with Guard() as guard:
        assert isinstance(guard.store, PostgresStore)
        rid = f"env-{uuid.uuid4().hex}"
        for _ in range(2):
            guard.execute(rid, "charge", {"n": 1}, lambda _ctx: runs.append(1))
    assert runs == [1]
    assert not (tmp_path / "not-this.db").exists()
    assert not (tmp_path / "safeagent.db").exists()


def test_a_database_url_variable_that_is_not_postgresql_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set but unusable $SAFEAGENT_DATABASE_URL is a ConfigurationError, never a silent
    fall back to SQLite."""
    monkeypatch.chdir(tmp_path)
    for bad in ("mysql://db/payments", "   ", "/var/lib/app/safeagent.db", "host='unclosed"):
        monkeypatch.setenv("SAFEAGENT_DATABASE_URL", bad)
        with pytest.raises(ConfigurationError, match="SAFEAGENT_DATABASE_URL"):
            Guard()
    assert not (tmp_path / "safeagent.db").exists()


def test_a_keyword_connection_string_in_the_variable_opens_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_throwaway_database_url: str
) -> None:
    """libpq's keyword form (host=... dbname=...) is accepted, as the CLI accepts it."""
    import psycopg

    from safeagent.stores.postgres import PostgresStore

    info = psycopg.conninfo.conninfo_to_dict(pg_throwaway_database_url)
    keywords = " ".join(f"{k}={v}" for k, v in info.items())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEAGENT_DATABASE_URL", keywords)
    with Guard() as guard:
        assert isinstance(guard.store, PostgresStore)
        rid = f"kw-{uuid.uuid4().hex}"
        assert guard.execute(rid, "charge", {"n": 1}, lambda _ctx: 7).result == 7
    assert not (tmp_path / "safeagent.db").exists()


# == item 3: same request id, other payload ==================================================


def test_item3_compat_other_payload_is_a_conflict(tmp_path: Path, ledger: Ledger) -> None:
    """Item 3 (compat): another payload under the same id -> ok=False conflict, audited."""
    db = tmp_path / "compat.db"
    reg = registry(db)

    def send(payload: Any) -> Any:
        ledger.append("r-1", payload["to"])
        return {"sent_to": payload["to"]}

    first = reg.execute("r-1", "send_email", {"to": "a@example.com"}, send)
    second = reg.execute("r-1", "send_email", {"to": "b@example.com"}, send)
    other_action = reg.execute("r-1", "send_sms", {"to": "a@example.com"}, send)
    reg.close()
    assert (first["ok"], first["reason"]) == (True, "executed")
    assert set(second) == RECEIPT_KEYS
    assert (second["ok"], second["reason"]) == (False, "conflict_payload_mismatch")
    assert second["result"] != first["result"]  # the first request's outcome is not handed out
    assert (other_action["ok"], other_action["reason"]) == (False, "conflict_action_mismatch")
    assert ledger.rows() == [("r-1", "a@example.com")]
    assert guard_events(db, "r-1").count(EventKind.CONFLICT) == 2


def test_item3_guard_other_payload_is_a_conflict(guard: Guard, ledger: Ledger) -> None:
    """Item 3 (Guard): another payload under the same id -> FingerprintMismatchError, audited."""
    guard.execute("r-1", "send_email", {"to": "a@example.com"}, booking(ledger))
    with pytest.raises(FingerprintMismatchError):
        guard.execute("r-1", "send_email", {"to": "b@example.com"}, booking(ledger))
    assert ledger.count() == 1
    conflicts = [e for e in guard.audit_trail("r-1") if e.kind is EventKind.CONFLICT]
    assert len(conflicts) == 1


# == item 4: the result is kept ================================================================


def test_item4_compat_receipt_carries_the_result(tmp_path: Path, ledger: Ledger) -> None:
    """Item 4 (compat): the receipt carries execute_fn's return value, on every replay too."""
    reg = registry(tmp_path / "compat.db")

    def charge() -> Any:  # zero-argument execute_fn: called with nothing
        ledger.append("r-1")
        return {"charge_id": "ch_1"}

    receipts = [reg.execute("r-1", "charge", {"amount": 5}, charge) for _ in range(3)]
    reg.close()
    assert [r["reason"] for r in receipts] == ["executed"] + ["dedup_same_request_id"] * 2
    assert all(r["ok"] for r in receipts)
    assert all(r["result"] == {"charge_id": "ch_1"} for r in receipts)
    assert all(set(r) == RECEIPT_KEYS for r in receipts)
    assert len({r["execution_id"] for r in receipts}) == 1
    assert len({r["timestamp_utc"] for r in receipts}) == 1
    assert all(r["error"] is None for r in receipts)
    assert receipts[0]["payload"] == {"amount": 5}
    assert ledger.count() == 1


def test_item4_compat_one_argument_fn_gets_the_payload(tmp_path: Path) -> None:
    """Item 4 (compat): a one-argument execute_fn is called with the payload."""
    reg = registry(tmp_path / "compat.db")
    receipt = reg.execute("r-1", "echo", {"x": [1, 2]}, lambda p: {"got": p})
    reg.close()
    assert receipt["result"] == {"got": {"x": [1, 2]}}


def test_item4_guard_receipt_carries_the_result(guard: Guard, ledger: Ledger) -> None:
    """Item 4 (Guard): receipt.result is fn's value, the same on every replay."""
    results = [
        guard.execute("r-1", "charge", {}, booking(ledger, {"charge_id": "ch_1"})).result
        for _ in range(3)
    ]
    assert results == [{"charge_id": "ch_1"}] * 3
    assert ledger.count() == 1


# == item 5: concurrent duplicates run once ===================================================


def _race(n: int, call: Any) -> list[Any]:
    barrier = threading.Barrier(n, timeout=30)
    out: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            out[i] = call(i)
        except BaseException as exc:  # reported by the assertions below
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return out


@pytest.mark.parametrize("shared", [True, False], ids=["one-registry", "registry-per-thread"])
def test_item5_compat_eight_threads_run_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: Ledger, shared: bool
) -> None:
    """Item 5 (compat): 8 threads, one request id, default registry: the effect runs once."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAFEAGENT_DB", raising=False)
    monkeypatch.delenv("SAFEAGENT_DATABASE_URL", raising=False)
    one = SettlementRequestRegistry()

    def send(payload: Any) -> Any:
        time.sleep(0.1)
        ledger.append("r-1")
        return {"sent": payload["n"]}

    def call(i: int) -> Any:
        reg = one if shared else SettlementRequestRegistry()
        try:
            return reg.execute("r-1", "send_email", {"n": 1}, send)
        finally:
            if not shared:
                reg.close()

    receipts = _race(8, call)
    one.close()
    assert all(isinstance(r, dict) for r in receipts), receipts
    assert Counter(r["reason"] for r in receipts) == {
        "executed": 1,
        "dedup_same_request_id": 7,
    }
    assert all(r["ok"] and r["result"] == {"sent": 1} for r in receipts)
    assert len({r["execution_id"] for r in receipts}) == 1
    assert (tmp_path / "safeagent.db").exists()
    assert ledger.count() == 1


def test_item5_guard_eight_threads_run_once(store: Any, ledger: Ledger) -> None:
    """Item 5 (Guard): 8 threads on one guard, one request id: the effect runs once."""
    g = Guard(store, wait=30)

    def fn(ctx: ExecutionContext) -> Any:
        time.sleep(0.1)
        ledger.append(ctx.request_id)
        return {"ticket": 7}

    receipts = _race(8, lambda i: g.execute("r-1", "charge", {"n": 1}, fn))
    assert all(r.result == {"ticket": 7} for r in receipts), receipts
    assert sum(not r.replay for r in receipts) == 1
    assert ledger.count() == 1


# == item 6: a concurrent duplicate waits for the receipt =====================================


def _hold(call: Any) -> tuple[threading.Thread, threading.Event, threading.Event, list[Any]]:
    """Start ``call(fn)`` in a thread with an fn that blocks until released."""
    holding, release = threading.Event(), threading.Event()
    out: list[Any] = []

    def fn(*_: Any) -> Any:
        holding.set()
        release.wait(20)
        return {"charge_id": "ch_1"}

    thread = threading.Thread(target=lambda: out.append(call(fn)), daemon=True)
    thread.start()
    assert holding.wait(10)
    return thread, holding, release, out


def test_item6_compat_duplicate_waits_and_gets_the_receipt(tmp_path: Path) -> None:
    """Item 6 (compat): a duplicate arriving mid-run waits and returns the first receipt."""
    reg = registry(tmp_path / "compat.db", wait_seconds=10)
    thread, _, release, out = _hold(lambda fn: reg.execute("r-1", "charge", {"a": 1}, fn))
    threading.Timer(0.3, release.set).start()
    second = reg.execute("r-1", "charge", {"a": 1}, lambda: {"charge_id": "WRONG"})
    thread.join(10)
    reg.close()
    assert (out[0]["ok"], out[0]["reason"]) == (True, "executed")
    assert (second["ok"], second["reason"]) == (True, "dedup_same_request_id")
    assert second["result"] == {"charge_id": "ch_1"}
    assert second["execution_id"] == out[0]["execution_id"]


def test_item6_compat_past_the_bound_says_claim_pending(tmp_path: Path) -> None:
    """Item 6 (compat): past the wait bound, ok=False with reason claim_pending."""
    reg = registry(tmp_path / "compat.db", wait_seconds=0.3)
    thread, _, release, _ = _hold(lambda fn: reg.execute("r-1", "charge", {"a": 1}, fn))
    try:
        started = time.monotonic()
        pending = reg.execute("r-1", "charge", {"a": 1}, lambda: "WRONG")
        waited = time.monotonic() - started
    finally:
        release.set()
        thread.join(10)
        reg.close()
    assert (pending["ok"], pending["reason"]) == (False, "claim_pending")
    assert pending["result"] is None
    assert 0.25 <= waited < 5


def test_item6_guard_duplicate_waits_then_in_progress(store: Any, ledger: Ledger) -> None:
    """Item 6 (Guard): a duplicate waits for the receipt; past the bound, InProgressError."""
    g = Guard(store, lease=30)
    thread, _, release, out = _hold(lambda fn: g.execute("r-1", "charge", {}, fn))
    with pytest.raises(InProgressError):
        g.execute("r-1", "charge", {}, booking(ledger), wait=0.2)
    threading.Timer(0.2, release.set).start()
    second = g.execute("r-1", "charge", {}, booking(ledger), wait=10)
    thread.join(10)
    assert second.replay is True
    assert second.result == out[0].result == {"charge_id": "ch_1"}
    assert ledger.count() == 0  # the holder's fn wrote nothing; the duplicate never ran


# == item 7: a crashed claim is reported in doubt and resolvable ===============================


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "released"])
def test_item7_crashed_claim_goes_in_doubt_and_resolves(
    tmp_path: Path, ledger: Ledger, outcome: Any
) -> None:
    """Item 7: a SIGKILLed claim reads in doubt after its lease; Guard.resolve settles it
    (succeeded, failed or released), and the resolution is audited."""
    db = tmp_path / "guard.db"
    pid = claim_and_die(db, "r-1", "charge", {"amount": 5}, lease=30)
    clock = FakeClock()
    g = Guard(SQLiteStore(db, clock=clock), wait=0)
    try:
        stored = g.get("r-1")
        assert stored is not None
        clock.now_ms = stored.claimed_at_ms + 10_000
        assert g.get("r-1").status is Status.PENDING  # type: ignore[union-attr]
        with pytest.raises(InvalidTransitionError):
            g.resolve("r-1", outcome, by="ops", reason="too early")
        clock.advance(21)  # 31 s after the claim: the 30 s lease has expired
        assert g.get("r-1").status is Status.IN_DOUBT  # type: ignore[union-attr]
        assert [r.request_id for r in g.in_doubt()] == ["r-1"]
        with pytest.raises(OutcomeUnknownError) as doubt:
            g.execute("r-1", "charge", {"amount": 5}, booking(ledger))
        assert str(pid) in (doubt.value.owner or "")
        g.resolve("r-1", outcome, by="ops", reason="checked the bank", result={"charge_id": "ch_1"})
        resolved = [e for e in g.audit_trail("r-1") if e.kind is EventKind.RESOLVED]
        assert len(resolved) == 1
        assert (resolved[0].actor, resolved[0].detail["reason"]) == ("ops", "checked the bank")
        if outcome == "succeeded":
            replay = g.execute("r-1", "charge", {"amount": 5}, booking(ledger))
            assert (replay.replay, replay.result) == (True, {"charge_id": "ch_1"})
            assert ledger.count() == 0
        elif outcome == "failed":
            with pytest.raises(ReplayedFailureError):
                g.execute("r-1", "charge", {"amount": 5}, booking(ledger))
            assert ledger.count() == 0
        else:
            ran = g.execute("r-1", "charge", {"amount": 5}, booking(ledger))
            assert (ran.replay, ran.attempt) == (False, 2)
            assert g.execute("r-1", "charge", {"amount": 5}, booking(ledger)).replay is True
            assert ledger.count() == 1
    finally:
        g.close()


COMPAT_CLAIM_AND_DIE = """
    import os, signal, sys
    from settlement.settlement_requests import SettlementRequestRegistry

    reg = SettlementRequestRegistry(sqlite_path=sys.argv[1], pending_ttl_seconds=0.3)
    reg.execute("r-1", "charge", {"amount": 5}, lambda: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_item7_compat_crashed_claim_reads_in_doubt(tmp_path: Path, ledger: Ledger) -> None:
    """Item 7 (compat): after the crashed claim's lease, the receipt says in_doubt; once an
    operator releases it, the next call executes."""
    db = tmp_path / "compat.db"
    proc = run_python(COMPAT_CLAIM_AND_DIE.replace("sys.argv[1]", repr(str(db))), tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    time.sleep(0.35)
    reg = registry(db, wait_seconds=0)

    def charge() -> Any:
        ledger.append("r-1")
        return {"charge_id": "ch_2"}

    doubt = reg.execute("r-1", "charge", {"amount": 5}, charge)
    assert (doubt["ok"], doubt["reason"]) == (False, "in_doubt")
    with Guard(SQLiteStore(db)) as g:
        g.resolve("r-1", "released", by="ops", reason="never reached the bank")
    ran = reg.execute("r-1", "charge", {"amount": 5}, charge)
    reg.close()
    assert (ran["ok"], ran["reason"], ran["result"]) == (True, "executed", {"charge_id": "ch_2"})
    assert ledger.count() == 1


# == item 8: "not executed" failures release the claim =========================================


def test_item8_compat_not_executed_releases_other_failures_replay(
    tmp_path: Path, ledger: Ledger
) -> None:
    """Item 8 (compat): declared not-executed errors release (next call runs); others replay."""
    reg = registry(tmp_path / "compat.db", not_executed=(ConnectionRefusedError,))
    attempts = {"n": 0}

    def flaky() -> Any:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise ConnectionRefusedError("connection refused")
        ledger.append("send")
        return {"sent": True}

    released = reg.execute("send", "send_email", {"to": "x"}, flaky)
    assert (released["ok"], released["reason"]) == (False, "released")
    assert released["error"]["type"] == "ConnectionRefusedError"
    ran = reg.execute("send", "send_email", {"to": "x"}, flaky)
    assert (ran["ok"], ran["reason"], ran["result"]) == (True, "executed", {"sent": True})

    def ours() -> Any:
        raise NotExecuted("nothing was sent")

    assert reg.execute("ne", "send_email", {}, ours)["reason"] == "released"

    def broken() -> Any:
        ledger.append("boom")
        raise RuntimeError("mail server said 554")

    failed = reg.execute("boom", "send_email", {}, broken)
    assert (failed["ok"], failed["reason"]) == (False, "execute_failed:RuntimeError")
    assert failed["error"] == {"type": "RuntimeError", "message": "mail server said 554"}
    replay = reg.execute("boom", "send_email", {}, broken)
    reg.close()
    assert (replay["ok"], replay["reason"]) == (False, "dedup_same_request_id")
    assert replay["error"] == failed["error"]
    assert replay["execution_id"] == failed["execution_id"]
    assert replay["timestamp_utc"] == failed["timestamp_utc"]
    assert Counter(k for k, _ in ledger.rows()) == {"send": 1, "boom": 1}


def test_item8_guard_not_executed_releases_other_failures_replay(
    store: Any, ledger: Ledger
) -> None:
    """Item 8 (Guard): declared not-executed errors release; other errors are stored, replayed."""
    g = Guard(store, wait=0, not_executed=(ConnectionRefusedError,))
    calls = {"n": 0}

    def flaky(ctx: ExecutionContext) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionRefusedError("refused")
        ledger.append(ctx.request_id)
        return "sent"

    with pytest.raises(ConnectionRefusedError):
        g.execute("send", "send_email", {}, flaky)
    assert g.execute("send", "send_email", {}, flaky).result == "sent"

    def broken(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id)
        raise RuntimeError("554")

    with pytest.raises(RuntimeError):
        g.execute("boom", "send_email", {}, broken)
    with pytest.raises(ReplayedFailureError) as info:
        g.execute("boom", "send_email", {}, broken)
    assert (info.value.error_type, info.value.error_message) == ("RuntimeError", "554")
    assert Counter(k for k, _ in ledger.rows()) == {"send": 1, "boom": 1}


def test_compat_guard_errors_raised_by_fn_are_failures_of_fn(tmp_path: Path) -> None:
    """Compat: an execute_fn that raises a SafeAgent error of its own (a nested guarded
    call's conflict, a bad payload it built) is a failure of execute_fn: never raised,
    never mistaken for this request's conflict, reported as execute_failed:<Type>."""
    inner = Guard(MemoryStore(), wait=0)
    inner.execute("inner-1", "notify", {"n": 1}, lambda ctx: "sent")

    def nested_conflict() -> Any:
        return inner.execute("inner-1", "notify", {"n": 2}, lambda ctx: "sent")

    def bad_inner_payload() -> Any:
        return inner.execute("inner-2", "notify", {"n": float("nan")}, lambda ctx: "sent")

    reg = registry(tmp_path / "compat.db")
    try:
        conflict = reg.execute("outer-1", "charge", {}, nested_conflict)
        invalid = reg.execute("outer-2", "charge", {}, bad_inner_payload)
        replay = reg.execute("outer-1", "charge", {}, nested_conflict)
    finally:
        reg.close()
    assert (conflict["ok"], conflict["reason"]) == (
        False,
        "execute_failed:FingerprintMismatchError",
    )
    assert conflict["error"]["type"] == "FingerprintMismatchError"
    assert (invalid["ok"], invalid["reason"]) == (False, "execute_failed:InvalidPayloadError")
    assert (replay["ok"], replay["reason"]) == (False, "dedup_same_request_id")
    assert replay["execution_id"] == conflict["execution_id"]


# == compat receipts: the remaining reasons ===================================================


@pytest.mark.parametrize("rid", [None, ""], ids=["None", "empty"])
def test_compat_missing_request_id(tmp_path: Path, ledger: Ledger, rid: Any) -> None:
    """Compat: a None or empty request id -> ok=False, missing_request_id; nothing runs."""
    reg = registry(tmp_path / "compat.db")
    receipt = reg.execute(rid, "charge", {}, lambda: ledger.append("x"))
    reg.close()
    assert set(receipt) == RECEIPT_KEYS
    assert (receipt["ok"], receipt["reason"]) == (False, "missing_request_id")
    assert ledger.count() == 0


def test_compat_outcome_unknown_reads_in_doubt(tmp_path: Path, ledger: Ledger) -> None:
    """Compat: a declared outcome-unknown error -> in_doubt now and on every retry."""
    reg = registry(tmp_path / "compat.db", outcome_unknown=(TimeoutError,))

    def send() -> Any:
        ledger.append("r-1")
        raise TimeoutError("no ack")

    receipts = [reg.execute("r-1", "send", {}, send) for _ in range(2)]
    reg.close()
    assert [(r["ok"], r["reason"]) for r in receipts] == [(False, "in_doubt")] * 2
    assert ledger.count() == 1


# == P1: a dead process's claim ==============================================================


def test_p1_dead_claim_in_progress_then_in_doubt_then_runs_once(
    tmp_path: Path, ledger: Ledger
) -> None:
    """P1: a SIGKILLed claim: t=10 s in progress (retry-after 20 s), t=31 s in doubt with
    owner and claim time; released by an operator, it runs once and then replays."""
    db = tmp_path / "guard.db"
    payload = {"invoice_id": "INV-1"}
    pid = claim_and_die(db, "INV-1", "send_invoice", payload, lease=30)
    assert ledger.count() == 0
    clock = FakeClock()
    g = Guard(SQLiteStore(db, clock=clock), lease=30)
    try:
        record = g.get("INV-1")
        assert record is not None
        clock.now_ms = record.claimed_at_ms + 10_000
        started = time.monotonic()
        with pytest.raises(InProgressError) as now:
            g.execute("INV-1", "send_invoice", payload, booking(ledger), wait=0)
        assert time.monotonic() - started < 1.0
        assert now.value.retry_after == pytest.approx(20.0)
        started = time.monotonic()
        with pytest.raises(InProgressError) as bounded:
            g.execute("INV-1", "send_invoice", payload, booking(ledger), wait=0.3)
        assert 0.25 <= time.monotonic() - started < 5
        assert bounded.value.retry_after == pytest.approx(20.0)
        assert ledger.count() == 0

        clock.now_ms = record.claimed_at_ms + 31_000
        with pytest.raises(OutcomeUnknownError) as doubt:
            g.execute("INV-1", "send_invoice", payload, booking(ledger), wait=0)
        assert str(pid) in (doubt.value.owner or "")
        assert doubt.value.claimed_at_ms == record.claimed_at_ms
        assert doubt.value.attempt == 1
        assert ledger.count() == 0

        # The reconcile hook's stand-in: an operator who knows it did not happen.
        g.resolve("INV-1", "released", by="ops", reason="invoice service has no INV-1")
        ran = g.execute("INV-1", "send_invoice", payload, booking(ledger), wait=0)
        assert (ran.replay, ran.attempt) == (False, 2)
        assert ledger.count() == 1
        for _ in range(2):
            assert g.execute("INV-1", "send_invoice", payload, booking(ledger)).replay is True
        assert ledger.count() == 1
    finally:
        g.close()


# == P2: keys are scoped by namespace ==========================================================


def test_p2_two_tenants_same_key_both_run_isolated(store: Any, ledger: Ledger) -> None:
    """P2: tenant-A and tenant-B both use k-1 on create_ticket: both run, isolated."""
    a = Guard(store, namespace="tenant-A", wait=0)
    b = Guard(store, namespace="tenant-B", wait=0)
    ra = a.execute("k-1", "create_ticket", {"title": "A's"}, booking(ledger, {"t": "A"}))
    rb = b.execute("k-1", "create_ticket", {"title": "B's"}, booking(ledger, {"t": "B"}))
    assert (ra.replay, rb.replay) == (False, False)
    assert ledger.count() == 2
    assert ra.downstream_key != rb.downstream_key
    assert a.get("k-1").result == {"t": "A"}  # type: ignore[union-attr]
    assert b.get("k-1").result == {"t": "B"}  # type: ignore[union-attr]
    assert Guard(store).get("k-1") is None  # nothing in the default namespace
    # Each replays its own; neither conflicts with the other's payload.
    assert a.execute("k-1", "create_ticket", {"title": "A's"}, booking(ledger)).result == {"t": "A"}
    assert b.execute("k-1", "create_ticket", {"title": "B's"}, booking(ledger)).result == {"t": "B"}
    assert ledger.count() == 2
    a_events = a.audit_trail("k-1", namespace="tenant-A")
    assert a_events
    assert {e.namespace for e in a_events} == {"tenant-A"}
    assert EventKind.CONFLICT not in {e.kind for e in a_events}


# == P3: a missing key never collapses into one shared key ====================================


def test_p3_none_and_empty_key_are_missing(guard: Guard, ledger: Ledger) -> None:
    """P3: key_arg None or "" -> MissingKeyError before anything runs; nothing recorded."""

    @guard.guarded(action="create_ticket", key_arg="request_id")
    def create_ticket(title: str, request_id: Any = None) -> Any:
        ledger.append(str(request_id), title)
        return {"ticket": title}

    for missing in (None, ""):
        with pytest.raises(MissingKeyError):
            create_ticket("printer broken", request_id=missing)
    with pytest.raises(MissingKeyError):
        create_ticket("printer broken")
    assert ledger.count() == 0
    assert guard.audit_trail() == []
    assert guard.store.records()[0] == []


def test_p3_allow_missing_key_runs_unguarded(guard: Guard, ledger: Ledger) -> None:
    """P3: allow_missing_key=True runs keyless calls unguarded, records nothing, and two
    keyless calls with different titles each get their own result."""

    @guard.guarded(action="create_ticket", key_arg="request_id", allow_missing_key=True)
    def create_ticket(title: str, request_id: Any = None) -> Any:
        ledger.append(str(request_id), title)
        return {"ticket": title}

    assert create_ticket("printer broken") == {"ticket": "printer broken"}
    assert create_ticket("vpn down", request_id="") == {"ticket": "vpn down"}
    assert ledger.count() == 2
    assert guard.audit_trail() == []
    assert guard.store.records()[0] == []


def test_p3_zero_false_and_string_zero_are_three_stable_keys(guard: Guard, ledger: Ledger) -> None:
    """P3: 0, False and "0" are three distinct, stable request ids."""

    @guard.guarded(action="create_ticket", key_arg="request_id")
    def create_ticket(title: str, request_id: Any = None) -> Any:
        ledger.append(repr(request_id), title)
        return {"ticket": title, "key": request_id}

    firsts = [create_ticket("t", request_id=k) for k in (0, False, "0")]
    assert firsts == [
        {"ticket": "t", "key": 0},
        {"ticket": "t", "key": False},
        {"ticket": "t", "key": "0"},
    ]
    again = [create_ticket("t", request_id=k) for k in (0, False, "0")]
    assert again == firsts
    assert ledger.count() == 3
    ids = {rid for rid in ("0", "false", '"0"') if guard.get(rid) is not None}
    assert ids == {"0", "false", '"0"'}


def test_p3_keyless_calls_never_share_a_receipt(guard: Guard, ledger: Ledger) -> None:
    """P3: two keyless calls with different titles never get each other's receipt."""

    @guard.guarded(action="create_ticket", key_arg="request_id")
    def create_ticket(title: str, request_id: Any = None) -> Any:
        ledger.append(str(request_id), title)
        return {"ticket": title}

    for title in ("printer broken", "vpn down"):
        with pytest.raises(MissingKeyError):
            create_ticket(title)
    assert create_ticket("printer broken", request_id="k-1") == {"ticket": "printer broken"}
    assert create_ticket("vpn down", request_id="k-2") == {"ticket": "vpn down"}
    assert ledger.count() == 2


def test_decorator_exclude_is_checked_and_reaches_into_kwargs(guard: Guard, ledger: Ledger) -> None:
    """A misspelt ``exclude`` name is a ConfigurationError when decorating (it would stay in
    the fingerprint, and every retry with a new timestamp would be refused as another
    request); for a function taking ``**kwargs``, an excluded name passed in them is left
    out of the fingerprint too, so the retry replays."""
    with pytest.raises(ConfigurationError, match=r"\['requsted_at'\]"):

        @guard.guarded(action="book", key_arg="request_id", exclude=["requsted_at"])
        def book(title: str, request_id: str, requested_at: str = "") -> Any: ...

    @guard.guarded(action="book", key_arg="request_id", exclude=["requested_at"])
    def book_kw(title: str, request_id: str, **extra: Any) -> Any:
        ledger.append(request_id, extra["requested_at"])
        return {"booked": title}

    assert book_kw("room", request_id="k-1", requested_at="10:00:01") == {"booked": "room"}
    assert book_kw("room", request_id="k-1", requested_at="10:00:07") == {"booked": "room"}
    assert ledger.rows() == [("k-1", "10:00:01")]
    with pytest.raises(FingerprintMismatchError):  # the rest of **kwargs still counts
        book_kw("room", request_id="k-1", requested_at="x", floor=3)
    assert ledger.count() == 1
    with pytest.raises(ConfigurationError, match="the \\*\\*kwargs parameter"):

        @guard.guarded(action="book", key_arg="request_id", exclude=["extra"])
        def book_all(title: str, request_id: str, **extra: Any) -> Any: ...


# == P4: same key, other payload: a conflict on every path =====================================


def test_p4_other_amount_conflicts_first_receipt_unchanged(guard: Guard, ledger: Ledger) -> None:
    """P4: k-9 with 500 then 700 -> FingerprintMismatchError, ledger 1, receipt unchanged;
    the same arguments in another key order replay."""
    first = guard.execute(
        "k-9", "charge", {"customer": "CUST-1", "amount_cents": 500}, booking(ledger)
    )
    with pytest.raises(FingerprintMismatchError):
        guard.execute("k-9", "charge", {"customer": "CUST-1", "amount_cents": 700}, booking(ledger))
    assert ledger.count() == 1
    after = guard.get("k-9")
    assert after is not None
    assert (after.execution_id, after.result, after.fingerprint) == (
        first.execution_id,
        first.result,
        first.fingerprint,
    )
    replay = guard.execute(
        "k-9", "charge", {"amount_cents": 500, "customer": "CUST-1"}, booking(ledger)
    )
    assert replay.replay is True
    assert replay.result == first.result
    assert ledger.count() == 1


def test_p4_decorated_charge_conflicts_and_replays(guard: Guard, ledger: Ledger) -> None:
    """P4 (decorator): charge(..., request_id="k-9") with another amount conflicts; the same
    keyword arguments in another order replay."""

    @guard.guarded(action="charge", key_arg="request_id")
    def charge(customer: str, amount_cents: int, request_id: str) -> Any:
        ledger.append(request_id, str(amount_cents))
        return {"charged": amount_cents}

    assert charge(customer="CUST-1", amount_cents=500, request_id="k-9") == {"charged": 500}
    with pytest.raises(FingerprintMismatchError):
        charge(customer="CUST-1", amount_cents=700, request_id="k-9")
    assert charge(request_id="k-9", amount_cents=500, customer="CUST-1") == {"charged": 500}
    assert ledger.count() == 1


def test_p4_conflict_while_the_first_call_is_running(guard: Guard, ledger: Ledger) -> None:
    """P4: the conflict is reported at once while the first call is still running."""
    holding, release = threading.Event(), threading.Event()

    def slow(ctx: ExecutionContext) -> Any:
        holding.set()
        release.wait(20)
        ledger.append(ctx.request_id)
        return {"charged": 500}

    out: list[Any] = []
    thread = threading.Thread(
        target=lambda: out.append(
            guard.execute("k-9", "charge", {"customer": "CUST-1", "amount_cents": 500}, slow)
        ),
        daemon=True,
    )
    thread.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(FingerprintMismatchError):
            guard.execute(
                "k-9",
                "charge",
                {"customer": "CUST-1", "amount_cents": 700},
                booking(ledger),
                wait=10,
            )
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
        thread.join(10)
    assert out[0].result == {"charged": 500}
    assert ledger.count() == 1


def test_p4_conflict_after_a_restart(tmp_path: Path, ledger: Ledger, clock: FakeClock) -> None:
    """P4: after a restart (a new Guard and SQLiteStore on the same file) it still conflicts."""
    db = tmp_path / "guard.db"
    with Guard(SQLiteStore(db, clock=clock)) as g1:
        first = g1.execute(
            "k-9", "charge", {"customer": "CUST-1", "amount_cents": 500}, booking(ledger)
        )
        g1.store.close()
    store2 = SQLiteStore(db, clock=clock)
    with Guard(store2) as g2:
        with pytest.raises(FingerprintMismatchError) as info:
            g2.execute(
                "k-9", "charge", {"customer": "CUST-1", "amount_cents": 700}, booking(ledger)
            )
        assert info.value.receipt.execution_id == first.execution_id
        replay = g2.execute(
            "k-9", "charge", {"amount_cents": 500, "customer": "CUST-1"}, booking(ledger)
        )
        assert (replay.replay, replay.result) == (True, first.result)
    store2.close()
    assert ledger.count() == 1


# == P5: a result that cannot be stored never reopens the door =================================


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone.utc), "2024-05-01T12:30:00+00:00"),
        (decimal.Decimal("12.30"), "12.30"),
    ],
    ids=["datetime", "Decimal"],
)
def test_p5_documented_encodings_store_the_result(
    guard: Guard, ledger: Ledger, value: Any, stored: str
) -> None:
    """P5: a datetime / Decimal result is stored as ISO string / str; the first call already
    returns the stored form; retries replay it; ledger 1."""
    first = guard.execute("r-1", "book", {}, booking(ledger, {"at": value}))
    assert first.result == {"at": stored}
    for _ in range(2):
        replay = guard.execute("r-1", "book", {}, booking(ledger, {"at": value}))
        assert (replay.replay, replay.result) == (True, {"at": stored})
    assert ledger.count() == 1


def test_p5_unserializable_result_is_a_clear_error_never_a_second_booking(
    guard: Guard, ledger: Ledger
) -> None:
    """P5: an arbitrary object result -> ResultNotSerializableError on the first call and
    every retry; the record is SUCCEEDED and the side effect never runs again."""
    for _ in range(3):
        with pytest.raises(ResultNotSerializableError) as info:
            guard.execute("r-1", "book", {}, booking(ledger, object()))
        assert info.value.receipt.status is Status.SUCCEEDED
    record = guard.get("r-1")
    assert record is not None
    assert record.status is Status.SUCCEEDED
    assert ledger.count() == 1


def test_the_readme_decorator_lookup_finds_the_record_by_its_quoted_id(tmp_path: Path) -> None:
    """docs/guide.md ("Request ids from the decorator"): a str key is stored with its JSON
    quotes; request_id_for gives that id, and guard.get finds the record with it (the bare
    string does not)."""
    runs: list[str] = []
    with Guard(SQLiteStore(tmp_path / "d.db")) as guard:

        @guard.guarded(action="create_ticket", key_arg="request_id")
        def create_ticket(title: str, request_id: str | None = None) -> str:
            runs.append(title)
            return f"T-{len(runs)}"

        assert create_ticket("Printer on fire", request_id="conv-7:ticket-1") == "T-1"
        assert create_ticket.call("conv-7:ticket-1", "Printer on fire") == "T-1"
        stored = create_ticket.request_id_for("conv-7:ticket-1")
        assert stored == '"conv-7:ticket-1"'
        receipt = guard.get(stored)
        assert receipt is not None
        assert receipt.result == "T-1"
        assert guard.get("conv-7:ticket-1") is None
    assert runs == ["Printer on fire"]


def test_the_readme_async_close_forms_write_buffered_events(tmp_path: Path) -> None:
    """README: `async with AsyncGuard() as guard` and `await guard.aclose()` write the
    buffered replay events before the process goes."""
    import asyncio

    from safeagent import AsyncGuard

    async def main() -> None:
        async with AsyncGuard(SQLiteStore(tmp_path / "a.db")) as guard:
            for _ in range(2):
                await guard.execute("r-1", "charge", {"n": 1}, lambda _ctx: 1)
        guard2 = AsyncGuard(SQLiteStore(tmp_path / "b.db"))
        for _ in range(2):
            await guard2.execute("r-1", "charge", {"n": 1}, lambda _ctx: 1)
        await guard2.aclose()

    asyncio.run(main())
    for name in ("a.db", "b.db"):
        kinds = [e.kind for e in SQLiteStore(tmp_path / name).events(namespace=None)]
        assert kinds == [EventKind.CLAIMED, EventKind.SUCCEEDED, EventKind.REPLAYED], name


def test_case_prefixed_request_ids_are_reserved_on_the_original_api_too(tmp_path: Path) -> None:
    """``case:`` request ids belong to the finality gate's settlements (README): the
    original package's API refuses one with a typed error before anything runs."""
    from safeagent import InvalidRequestIdError

    original = registry(tmp_path / "r.db")
    ran: list[int] = []
    with pytest.raises(InvalidRequestIdError, match="reserved"):
        original.execute(
            request_id="case:123", action="refund", payload={}, execute_fn=lambda: ran.append(1)
        )
    assert ran == []
