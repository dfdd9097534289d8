"""Quick latency check: SafeAgent on SQLite next to a raw sqlite3 floor, in one run.

    python bench/quick.py [--n 2000] [--json out.json]

For each durability mode, N distinct request ids are executed once (first execution)
and then again (replay); each call is timed with ``perf_counter_ns``. The floor does the
least any durable guard on SQLite must do with the same commit settings: a first call
is SELECT (miss), BEGIN IMMEDIATE, INSERT PENDING, COMMIT, fn(), UPDATE with the JSON
result; a replay is one SELECT by primary key. Rows alternate between SafeAgent and the
floor in blocks, so both see the same machine noise. Report: medians and p99 in
microseconds, and SafeAgent / floor ratios. The full suite (concurrency, processes,
PostgreSQL, memory) is ``bench/run.py``; BENCHMARKS.md has its method and results.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from safeagent import Guard, SQLiteStore
from safeagent._keys import canonical_json, fingerprint


class Floor:
    """Raw sqlite3: the statements a durable guard cannot avoid."""

    def __init__(self, path: str, claim_sync: str, complete_sync: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.claim_sync, self.complete_sync = claim_sync, complete_sync
        self.conn.execute(f"PRAGMA synchronous={claim_sync}")
        self.conn.execute(
            "CREATE TABLE receipts (request_id TEXT PRIMARY KEY, status TEXT, result TEXT)"
        )

    def execute(self, request_id: str, fn: Callable[[], Any]) -> Any:
        conn = self.conn
        row = conn.execute(
            "SELECT status, result FROM receipts WHERE request_id = ?", (request_id,)
        ).fetchone()
        if row is not None:
            return json.loads(row[1])
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO receipts VALUES (?, 'PENDING', NULL)", (request_id,))
        conn.execute("COMMIT")
        result = fn()
        if self.complete_sync != self.claim_sync:
            conn.execute(f"PRAGMA synchronous={self.complete_sync}")
        conn.execute(
            "UPDATE receipts SET status = 'SUCCEEDED', result = ? WHERE request_id = ?",
            (json.dumps(result), request_id),
        )
        if self.complete_sync != self.claim_sync:
            conn.execute(f"PRAGMA synchronous={self.claim_sync}")
        return result


def timed(call: Callable[[str], Any], arg: str) -> float:
    start = time.perf_counter_ns()
    call(arg)
    return (time.perf_counter_ns() - start) / 1000


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered),
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


def run_mode(mode: str, n: int, tmp: str) -> dict[str, Any]:
    guard = Guard(SQLiteStore(os.path.join(tmp, f"sa-{mode}.db"), durability=mode))
    floor = Floor(
        os.path.join(tmp, f"floor-{mode}.db"),
        "FULL",
        "NORMAL" if mode == "claim-durable" else "FULL",
    )
    payload = {"customer": "CUST-1", "amount_cents": 500}

    def effect(_ctx: object = None) -> dict[str, str]:
        return {"charge_id": "ch_1"}

    for i in range(20):  # warm-up, untimed
        guard.execute(f"w{i}", "charge", payload, effect)
        floor.execute(f"w{i}", effect)

    def run_guard(rid: str) -> Any:
        return guard.execute(rid, "charge", payload, effect)

    def run_floor(rid: str) -> Any:
        return floor.execute(rid, effect)

    first: dict[str, list[float]] = {"safeagent": [], "floor": []}
    replay: dict[str, list[float]] = {"safeagent": [], "floor": []}
    block = 50
    for phase in (first, replay):
        for start in range(0, n, block):
            ids = [f"id-{i}" for i in range(start, min(n, start + block))]
            phase["safeagent"].extend(timed(run_guard, rid) for rid in ids)
            phase["floor"].extend(timed(run_floor, rid) for rid in ids)
    guard.close()
    out: dict[str, Any] = {"mode": mode}
    for name, samples in (("first", first), ("replay", replay)):
        sa, fl = summary(samples["safeagent"]), summary(samples["floor"])
        out[name] = {"safeagent": sa, "floor": fl, "ratio": sa["median_us"] / fl["median_us"]}
    return out


def fingerprint_cost(n: int) -> float:
    payload = {"customer": "CUST-1", "amount_cents": 500, "currency": "EUR"}

    def one(_: str) -> str:
        return fingerprint("charge", canonical_json(payload))

    samples = [timed(one, "") for _ in range(n)]
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="request ids per mode")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "n": args.n,
        "fingerprint_median_us": fingerprint_cost(5000),
        "modes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("durable", "claim-durable"):
            results["modes"].append(run_mode(mode, args.n, tmp))
    print(f"python {results['python']}, sqlite {results['sqlite']}, n={args.n} ids per mode")
    print(f"fingerprint (canonical JSON + sha256): {results['fingerprint_median_us']:.1f} us")
    header = f"{'mode':<14} {'call':<7} {'safeagent med/p99 us':>22} {'floor med/p99 us':>20}"
    print(header + "  ratio")
    for row in results["modes"]:
        for call in ("first", "replay"):
            sa, fl = row[call]["safeagent"], row[call]["floor"]
            print(
                f"{row['mode']:<14} {call:<7} "
                f"{sa['median_us']:>11.1f} /{sa['p99_us']:>8.1f} "
                f"{fl['median_us']:>10.1f} /{fl['p99_us']:>8.1f}  {row[call]['ratio']:.2f}x"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
