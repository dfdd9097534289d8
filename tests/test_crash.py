"""Crashes and late completions: receipts survive restarts, dead claims become in doubt.

Ground truth is an effect ledger (a file the side effect appends one line to), never the
guard's own records. Child interpreters run ``python -m tests._workers``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safeagent import EventKind, Guard, MemoryStore, SQLiteStore, Status, errors
from tests._workers import ROOT, append_line, child_env, read_lines, wait_until

CHARGE = {"customer": "CUST-1", "amount_cents": 500}


def _run_child(command: str, args: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests._workers", command, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start_hanging_child(
    tmp_path: Path, request_id: str, *, lease: float, write_ledger: bool
) -> tuple[subprocess.Popen[str], dict[str, Any], int]:
    """Start a child that claims ``request_id`` and hangs inside fn; return it once the
    marker says fn is running, with the marker's content and the ms before it started."""
    marker = tmp_path / "marker.json"
    args = {
        "db": str(tmp_path / "guard.db"),
        "ledger": str(tmp_path / "ledger.txt"),
        "request_id": request_id,
        "action": "charge",
        "payload": CHARGE,
        "lease": lease,
        "write_ledger": write_ledger,
        "marker": str(marker),
    }
    started_ms = time.time_ns() // 1_000_000
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests._workers", "claim_and_hang", json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=ROOT,
    )
    try:
        if not wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60):
            pytest.fail("the child never reached fn")
        if not marker.exists():
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the child exited before fn ran: {err}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, json.loads(marker.read_text()), started_ms


def _sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _ledger_fn(ledger: Path) -> Any:
    def charge(ctx: Any) -> dict[str, str]:
        append_line(ledger, ctx.request_id)
        return {"charge_id": "ch_" + ctx.execution_id[:8]}

    return charge


def _kinds(guard: Guard, request_id: str, *, skip_in_doubt: bool = False) -> list[EventKind]:
    return [
        e.kind
        for e in guard.audit_trail(request_id)
        if not (skip_in_doubt and e.kind is EventKind.IN_DOUBT)
    ]


@pytest.mark.slow
def test_receipt_from_one_process_is_replayed_by_a_new_process(tmp_path: Path) -> None:
    """A receipt stored by one process is replayed by the next one, and fn does not run again."""
    args = {
        "db": str(tmp_path / "guard.db"),
        "ledger": str(tmp_path / "ledger.txt"),
        "request_id": "X",
        "action": "charge",
        "payload": CHARGE,
    }
    first = _run_child("execute", args)
    assert "error" not in first, first
    assert first["replay"] is False
    assert read_lines(args["ledger"]) == ["X"]

    second = _run_child("execute", args)
    assert "error" not in second, second
    assert second["pid"] != first["pid"]
    assert second["replay"] is True
    assert second["execution_id"] == first["execution_id"]
    assert second["result"] == first["result"]
    assert read_lines(args["ledger"]) == ["X"]


@pytest.mark.slow
def test_claim_of_a_killed_process_is_in_doubt_until_an_operator_releases_it(
    tmp_path: Path,
) -> None:
    """A claim whose process was SIGKILLed before the effect is in progress, then in doubt;
    it never runs again until an operator releases it, then runs once and replays."""
    lease = 3.0  # long enough for the "before expiry" call on a loaded machine
    ledger = tmp_path / "ledger.txt"
    proc, marker, started_ms = _start_hanging_child(tmp_path, "Y", lease=lease, write_ledger=False)
    _sigkill(proc)
    assert read_lines(ledger) == []

    charge = _ledger_fn(ledger)
    with Guard(tmp_path / "guard.db", wait=0) as guard:
        # Before the lease expires: a typed "in progress" answer at once, nothing runs.
        with pytest.raises(errors.InProgressError) as busy:
            guard.execute("Y", "charge", CHARGE, charge)
        assert 0 < busy.value.retry_after <= lease
        assert read_lines(ledger) == []

        # After the lease expires: in doubt, with the dead attempt's facts; never re-run.
        assert wait_until(lambda: guard.get("Y").status is Status.IN_DOUBT, timeout=30)
        stored = guard.get("Y")
        assert stored.execution_id == marker["execution_id"]
        for _ in range(3):
            with pytest.raises(errors.OutcomeUnknownError) as doubt:
                guard.execute("Y", "charge", CHARGE, charge, wait=5.0)
            assert str(proc.pid) in doubt.value.owner
            assert doubt.value.attempt == 1
            assert doubt.value.claimed_at_ms == stored.claimed_at_ms
            assert started_ms <= doubt.value.claimed_at_ms <= time.time_ns() // 1_000_000
        assert read_lines(ledger) == []
        assert [r.request_id for r in guard.in_doubt()] == ["Y"]

        # An operator who checked the downstream system releases it: runs once, then replays.
        released = guard.resolve("Y", "released", by="ops", reason="payments API shows no charge")
        assert released.status is Status.RELEASED
        ran = guard.execute("Y", "charge", CHARGE, charge)
        assert not ran.replay
        assert ran.attempt == 2
        assert read_lines(ledger) == ["Y"]
        for _ in range(2):
            again = guard.execute("Y", "charge", CHARGE, charge)
            assert again.replay
            assert again.execution_id == ran.execution_id
            assert again.result == ran.result
        assert read_lines(ledger) == ["Y"]
        assert guard.in_doubt() == []

        trail = [e for e in guard.audit_trail("Y") if e.kind is not EventKind.IN_DOUBT]
        assert [e.kind for e in trail] == [
            EventKind.CLAIMED,
            EventKind.RESOLVED,
            EventKind.CLAIMED,
            EventKind.SUCCEEDED,
            EventKind.REPLAYED,
            EventKind.REPLAYED,
        ]
        assert str(proc.pid) in trail[0].actor
        assert trail[0].detail["attempt"] == 1
        assert trail[1].actor == "ops"
        assert trail[1].detail["reason"] == "payments API shows no charge"
        assert trail[2].detail["attempt"] == 2


@pytest.mark.slow
def test_process_killed_after_the_effect_is_never_run_again(tmp_path: Path) -> None:
    """A process killed after its effect but before its receipt leaves an in-doubt record that
    never runs again; resolving it as succeeded makes later calls replay that result."""
    ledger = tmp_path / "ledger.txt"
    proc, _, _ = _start_hanging_child(tmp_path, "Z", lease=1.0, write_ledger=True)
    _sigkill(proc)
    assert read_lines(ledger) == ["Z"]

    charge = _ledger_fn(ledger)
    with Guard(tmp_path / "guard.db", wait=0) as guard:
        assert wait_until(lambda: guard.get("Z").status is Status.IN_DOUBT, timeout=30)
        for _ in range(3):
            with pytest.raises(errors.OutcomeUnknownError) as doubt:
                guard.execute("Z", "charge", CHARGE, charge)
            assert str(proc.pid) in doubt.value.owner
        assert read_lines(ledger) == ["Z"]

        resolved = guard.resolve(
            "Z",
            "succeeded",
            by="ops",
            reason="payments API shows ch_1",
            result={"charge_id": "ch_1"},
        )
        assert resolved.status is Status.SUCCEEDED
        for _ in range(2):
            r = guard.execute("Z", "charge", CHARGE, charge)
            assert r.replay
            assert r.status is Status.SUCCEEDED
            assert r.result == {"charge_id": "ch_1"}
        assert read_lines(ledger) == ["Z"]
        assert guard.in_doubt() == []


class FakeClock:
    """Integer milliseconds that only move when told to."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += int(seconds * 1000)


@pytest.fixture(params=["memory", "sqlite"])
def clocked_guard(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    clock = FakeClock()
    store = (
        MemoryStore(clock=clock)
        if request.param == "memory"
        else SQLiteStore(tmp_path / "guard.db", clock=clock)
    )
    guard = Guard(store, lease=5.0, wait=0)
    try:
        yield guard, clock
    finally:
        guard.close()
        store.close()


def test_late_completion_nobody_took_over_is_accepted(clocked_guard: Any, tmp_path: Path) -> None:
    """fn that outlives its lease with nobody taking over completes normally, audited as late."""
    guard, clock = clocked_guard
    ledger = tmp_path / "ledger.txt"

    def slow_charge(ctx: Any) -> dict[str, str]:
        clock.advance(10.0)  # twice the lease
        append_line(ledger, ctx.request_id)
        return {"charge_id": "ch_late"}

    r = guard.execute("L", "charge", CHARGE, slow_charge)
    assert not r.replay
    assert r.status is Status.SUCCEEDED
    assert r.result == {"charge_id": "ch_late"}
    kinds = _kinds(guard, "L")
    assert EventKind.LATE_COMPLETION in kinds
    assert EventKind.SUCCEEDED in kinds
    assert EventKind.COMPLETION_REJECTED not in kinds

    again = guard.execute("L", "charge", CHARGE, slow_charge)
    assert again.replay
    assert again.result == {"charge_id": "ch_late"}
    assert read_lines(ledger) == ["L"]


def test_late_completion_after_operator_resolution_is_rejected(
    clocked_guard: Any,
    tmp_path: Path,
) -> None:
    """fn finishing after an operator resolved its expired claim gets LeaseLostError, and the
    operator's outcome stays."""
    guard, clock = clocked_guard
    ledger = tmp_path / "ledger.txt"
    in_fn = threading.Event()
    proceed = threading.Event()
    outcome: dict[str, Any] = {}

    def slow_charge(ctx: Any) -> dict[str, str]:
        append_line(ledger, ctx.request_id)
        clock.advance(10.0)  # past the lease: the record now reads as in doubt
        in_fn.set()
        assert proceed.wait(timeout=60)
        return {"charge_id": "ch_from_fn"}

    def caller() -> None:
        try:
            outcome["receipt"] = guard.execute("R", "charge", CHARGE, slow_charge)
        except BaseException as exc:
            outcome["error"] = exc

    t = threading.Thread(target=caller)
    t.start()
    try:
        assert in_fn.wait(timeout=60)
        assert guard.get("R").status is Status.IN_DOUBT
        guard.resolve(
            "R", "succeeded", by="ops", reason="bank shows ch_ops", result={"charge_id": "ch_ops"}
        )
    finally:
        proceed.set()
        t.join(timeout=60)
    assert not t.is_alive()

    assert "receipt" not in outcome
    assert isinstance(outcome.get("error"), errors.LeaseLostError), outcome
    stored = guard.get("R")
    assert stored.status is Status.SUCCEEDED
    assert stored.result == {"charge_id": "ch_ops"}
    kinds = _kinds(guard, "R")
    assert EventKind.COMPLETION_REJECTED in kinds
    assert kinds.index(EventKind.RESOLVED) < kinds.index(EventKind.COMPLETION_REJECTED)
    assert EventKind.LATE_COMPLETION not in kinds

    replayed = guard.execute("R", "charge", CHARGE, slow_charge)
    assert replayed.replay
    assert replayed.result == {"charge_id": "ch_ops"}
    assert read_lines(ledger) == ["R"]


def test_keyboard_interrupt_in_fn_leaves_the_record_in_doubt(tmp_path: Path) -> None:
    """KeyboardInterrupt inside fn propagates and leaves the record in doubt; a retry gets
    OutcomeUnknownError without running fn."""
    ledger = tmp_path / "ledger.txt"
    runs = []

    def interrupted(ctx: Any) -> None:
        runs.append(ctx.attempt)
        append_line(ledger, ctx.request_id)
        raise KeyboardInterrupt

    with Guard(tmp_path / "guard.db", wait=0) as guard:
        with pytest.raises(KeyboardInterrupt):
            guard.execute("K", "charge", CHARGE, interrupted)
        assert guard.get("K").status is Status.IN_DOUBT
        for _ in range(2):
            with pytest.raises(errors.OutcomeUnknownError) as doubt:
                guard.execute("K", "charge", CHARGE, interrupted)
            assert doubt.value.attempt == 1
        assert runs == [1]
        assert read_lines(ledger) == ["K"]
        assert [r.request_id for r in guard.in_doubt()] == ["K"]


def _wal_commit_ends(wal: bytes) -> list[int]:
    """The byte offset just past each commit frame of a SQLite WAL file: a frame's header
    (24 bytes, after the file's 32-byte header) holds, at bytes 4-7, the database size in
    pages after a commit, and 0 in the other frames of a transaction (sqlite.org/walformat)."""
    page_size = int.from_bytes(wal[8:12], "big")
    frame = 24 + page_size
    ends = []
    offset = 32
    while offset + frame <= len(wal):
        if int.from_bytes(wal[offset + 4 : offset + 8], "big"):
            ends.append(offset + frame)
        offset += frame
    return ends


@pytest.mark.parametrize("mode", ["durable", "claim-durable"])
def test_a_lost_completion_leaves_an_in_doubt_claim_never_a_second_run(
    tmp_path: Path, mode: str, clock: Any
) -> None:
    """What a power loss can do (README, "Durability"): lose the last transactions not yet
    on disk. In claim-durable mode that may be a completion (not fsynced); in durable mode
    only one whose commit had not returned. Emulated on a copy of the database whose WAL
    is cut after the claim's commit frame, so the completion transaction, and its audit
    event, never happened: SQLite replays the WAL up to the last whole commit on open.
    The receipt is then a PENDING claim, in doubt once its lease runs out; a retry gets
    OutcomeUnknownError and does not run ``fn``; the trail verifies."""
    from safeagent.audit import verify

    db = tmp_path / "live.db"
    ledger = tmp_path / "ledger.txt"
    store = SQLiteStore(db, durability=mode, clock=clock)
    guard = Guard(store, lease=30)
    guard.execute("warm", "charge", CHARGE, lambda _ctx: 0)  # schema and first commits
    before = len(_wal_commit_ends((tmp_path / "live.db-wal").read_bytes()))

    def charge(ctx: Any) -> str:
        append_line(ledger, ctx.request_id)
        return "ch_1"

    assert guard.execute("r1", "charge", CHARGE, charge).result == "ch_1"
    wal = (tmp_path / "live.db-wal").read_bytes()  # read while open: closing checkpoints
    ends = _wal_commit_ends(wal)
    assert len(ends) == before + 2  # the claim's transaction, then the completion's
    copy = tmp_path / "after-power-loss"
    copy.mkdir()
    (copy / "g.db").write_bytes(db.read_bytes())
    (copy / "g.db-wal").write_bytes(wal[: ends[-2]])  # the completion is lost
    guard.close()

    survivor = SQLiteStore(copy / "g.db", durability=mode, clock=clock)
    again = Guard(survivor, lease=30)
    record = again.get("r1")
    assert record is not None
    assert record.status is Status.PENDING  # the claim survived, its outcome did not
    clock.advance(31)
    assert again.get("r1").status is Status.IN_DOUBT  # type: ignore[union-attr]
    with pytest.raises(errors.OutcomeUnknownError):
        again.execute("r1", "charge", CHARGE, charge)
    assert read_lines(ledger) == ["r1"]  # the charge ran once, and not again
    report = verify(survivor)
    assert report.ok, [p.kind for p in report.problems]
    assert [e.kind for e in again.audit_trail("r1")][:1] == [EventKind.CLAIMED]
    again.close()
