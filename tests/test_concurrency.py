"""Concurrent callers on one SQLite file: threads and processes, one execution per id.

Ground truth is an effect ledger (a file each execution appends one line to), never the
guard's own records.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from safeagent import Guard, Receipt, SQLiteStore, Status, errors
from tests import _workers
from tests._workers import append_line, read_lines

N_IDS = 200
N_THREADS = 16
N_PROCS = 4
BIG_WAIT = 30.0  # long enough that no caller ever gets InProgressError


def _ids() -> list[str]:
    return [f"req-{i:03d}" for i in range(N_IDS)]


def _run_threads(n: int, target: Any) -> None:
    threads = [threading.Thread(target=target, args=(i,), name=f"w{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"


def _hammer(tmp_path: Path, *, shared: bool, durability: str) -> None:
    """16 threads x 200 shared ids, each thread in its own order; check ledger and receipts."""
    db = tmp_path / "guard.db"
    ledger = tmp_path / "ledger.txt"
    ids = _ids()
    shared_guard = Guard(SQLiteStore(db, durability=durability), wait=BIG_WAIT, lease=120.0)
    barrier = threading.Barrier(N_THREADS, timeout=60)
    seen: dict[str, list[Receipt]] = defaultdict(list)
    failures: list[tuple[str, BaseException]] = []
    lock = threading.Lock()

    def fn(ctx: Any) -> dict[str, str]:
        append_line(ledger, ctx.request_id)
        return {"id": ctx.request_id, "by": threading.current_thread().name}

    def worker(i: int) -> None:
        guard = (
            shared_guard
            if shared
            else Guard(SQLiteStore(db, durability=durability), wait=BIG_WAIT, lease=120.0)
        )
        try:
            order = list(ids)
            random.Random(i).shuffle(order)
            barrier.wait()
            for rid in order:
                try:
                    r = guard.execute(rid, "append", {"id": rid}, fn)
                except BaseException as exc:
                    with lock:
                        failures.append((rid, exc))
                else:
                    with lock:
                        seen[rid].append(r)
        except BaseException as exc:
            with lock:
                failures.append(("worker", exc))
        finally:
            if not shared:
                guard.close()

    try:
        _run_threads(N_THREADS, worker)
    finally:
        shared_guard.close()

    raw = [(rid, exc) for rid, exc in failures if isinstance(exc, sqlite3.Error)]
    assert raw == [], "a raw sqlite3 error reached a caller"
    assert failures == []
    lines = read_lines(ledger)
    assert len(lines) == N_IDS
    assert sorted(lines) == sorted(ids)
    for rid in ids:
        receipts = seen[rid]
        assert len(receipts) == N_THREADS
        assert len({r.execution_id for r in receipts}) == 1, rid
        assert len({json.dumps(r.result, sort_keys=True) for r in receipts}) == 1, rid
        assert receipts[0].result["id"] == rid
        assert sum(not r.replay for r in receipts) == 1, rid
        assert all(r.status is Status.SUCCEEDED for r in receipts)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-guard", "guard-per-thread"])
def test_threads_run_each_shared_id_exactly_once(tmp_path: Path, shared: bool) -> None:
    """16 threads calling the same 200 ids run each side effect once and agree on every receipt."""
    _hammer(tmp_path, shared=shared, durability="durable")


@pytest.mark.parametrize("shared", [True, False], ids=["shared-guard", "guard-per-thread"])
def test_threads_run_each_shared_id_exactly_once_claim_durable(
    tmp_path: Path, shared: bool
) -> None:
    """The claim-durable mode also runs each of 200 ids once under 16 concurrent threads."""
    _hammer(tmp_path, shared=shared, durability="claim-durable")


@pytest.mark.slow
def test_processes_run_each_shared_id_exactly_once(tmp_path: Path) -> None:
    """4 spawned processes with their own guards on one file run each of 200 ids once."""
    db = str(tmp_path / "guard.db")
    ledger = str(tmp_path / "ledger.txt")
    ids = _ids()
    Guard(db).close()  # create the schema before the race (the race is about executions)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_PROCS)
    outs = [str(tmp_path / f"out-{i}.json") for i in range(N_PROCS)]
    # Processes 2k and 2k+1 share a shuffled order, so every id is raced head to head.
    procs = [
        ctx.Process(
            target=_workers.append_ids_worker, args=(db, ledger, ids, i // 2, barrier, outs[i])
        )
        for i in range(N_PROCS)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=180)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * N_PROCS
    reports = [json.loads(Path(o).read_text()) for o in outs]
    assert [r["errors"] for r in reports] == [[]] * N_PROCS
    lines = read_lines(ledger)
    assert len(lines) == N_IDS
    assert sorted(lines) == sorted(ids)
    for rid in ids:
        views = [r["seen"][rid] for r in reports]
        assert len({v[0] for v in views}) == 1, f"{rid}: processes saw different executions"
        assert len({json.dumps(v[1], sort_keys=True) for v in views}) == 1, rid
        assert sum(not v[2] for v in views) == 1, rid


# -- P9: twenty simultaneous callers, one execution, no storage errors -------------------

TRANSFER = {"src": "ACC-1", "dst": "ACC-2", "amount_cents": 100}
REFUND = {"order_id": "ORD-1"}


def _race(n: int, call: Any) -> list[tuple[str, Any]]:
    """Run ``call(i)`` in ``n`` threads released together; return (kind, value) per thread."""
    barrier = threading.Barrier(n, timeout=60)
    outcomes: list[tuple[str, Any]] = [("missing", None)] * n

    def worker(i: int) -> None:
        try:
            barrier.wait()
            outcomes[i] = ("ok", call(i))
        except BaseException as exc:
            outcomes[i] = ("error", exc)

    _run_threads(n, worker)
    return outcomes


def _transfer_fn(ledger: Path, delay: float = 0.2) -> Any:
    def transfer(ctx: Any) -> dict[str, Any]:
        time.sleep(delay)
        append_line(ledger, f"{ctx.action}:{ctx.request_id}")
        return {"transfer_id": "tr-" + ctx.execution_id[:8], "amount_cents": 100}

    return transfer


def test_p9_twenty_blocking_callers_share_one_execution(tmp_path: Path) -> None:
    """20 threads on one key: the transfer runs once, 19 callers replay its receipt."""
    ledger = tmp_path / "ledger.txt"
    with Guard(tmp_path / "guard.db", wait=BIG_WAIT) as guard:
        fn = _transfer_fn(ledger)
        outcomes = _race(20, lambda _i: guard.execute("k-1", "transfer", TRANSFER, fn))

    errs = [v for kind, v in outcomes if kind != "ok"]
    assert not any(isinstance(e, sqlite3.Error) for e in errs), "raw database error"
    assert errs == []
    receipts: list[Receipt] = [v for _, v in outcomes]
    assert read_lines(ledger) == ["transfer:k-1"]
    fresh = [r for r in receipts if not r.replay]
    assert len(fresh) == 1
    replays = [r for r in receipts if r.replay]
    assert len(replays) == 19
    assert {r.execution_id for r in receipts} == {fresh[0].execution_id}
    assert all(r.result == fresh[0].result for r in replays)
    assert all(r.status is Status.SUCCEEDED for r in receipts)


def test_p9_twenty_non_blocking_callers_get_in_progress_or_the_receipt(tmp_path: Path) -> None:
    """With wait=0, callers racing a running transfer get InProgressError or the receipt."""
    ledger = tmp_path / "ledger.txt"
    lease = 60.0
    with Guard(tmp_path / "guard.db", wait=0, lease=lease) as guard:
        fn = _transfer_fn(ledger)
        outcomes = _race(20, lambda _i: guard.execute("k-1", "transfer", TRANSFER, fn))
        later = guard.execute("k-1", "transfer", TRANSFER, fn)

    assert read_lines(ledger) == ["transfer:k-1"]
    receipts = [v for kind, v in outcomes if kind == "ok"]
    errs = [v for kind, v in outcomes if kind == "error"]
    assert not any(isinstance(e, sqlite3.Error) for e in errs), "raw database error"
    unexpected = [e for e in errs if not isinstance(e, errors.InProgressError)]
    assert unexpected == []
    assert all(0 < e.retry_after <= lease for e in errs)
    fresh = [r for r in receipts if not r.replay]
    assert len(fresh) == 1
    assert {r.execution_id for r in receipts} == {fresh[0].execution_id}
    assert later.replay
    assert later.execution_id == fresh[0].execution_id
    assert later.result == fresh[0].result


def test_p9_two_actions_on_one_key_one_runs_other_conflicts(tmp_path: Path) -> None:
    """transfer and refund racing on key k-2: one runs, the other conflicts, the receipt stays."""
    ledger = tmp_path / "ledger.txt"
    with Guard(tmp_path / "guard.db", wait=BIG_WAIT) as guard:
        transfer = _transfer_fn(ledger)

        def refund(ctx: Any) -> dict[str, Any]:
            time.sleep(0.2)
            append_line(ledger, f"{ctx.action}:{ctx.request_id}")
            return {"refund_id": "rf-" + ctx.execution_id[:8]}

        calls = [("transfer", TRANSFER, transfer), ("refund", REFUND, refund)]
        outcomes = _race(2, lambda i: guard.execute("k-2", *calls[i]))

        wins = [(i, v) for i, (kind, v) in enumerate(outcomes) if kind == "ok"]
        losses = [(i, v) for i, (kind, v) in enumerate(outcomes) if kind == "error"]
        assert len(wins) == 1, outcomes
        assert len(losses) == 1, outcomes
        (win_i, winner), (lose_i, err) = wins[0], losses[0]
        assert isinstance(err, errors.ActionMismatchError), repr(err)
        assert isinstance(err, errors.ConflictError)
        assert err.receipt.action == calls[win_i][0]
        assert read_lines(ledger) == [f"{calls[win_i][0]}:k-2"]
        assert not winner.replay

        stored = guard.get("k-2")
        assert stored is not None
        assert stored.action == calls[win_i][0]
        assert stored.execution_id == winner.execution_id
        assert stored.result == winner.result
        assert stored.status is Status.SUCCEEDED

        with pytest.raises(errors.ActionMismatchError):
            guard.execute("k-2", *calls[lose_i])
        again = guard.execute("k-2", *calls[win_i])
        assert again.replay
        assert again.execution_id == winner.execution_id
        assert read_lines(ledger) == [f"{calls[win_i][0]}:k-2"]
