"""The main thread's share of an SQLite store's writes beside busy worker threads.

    python bench/main_thread.py [--seconds 4] [--rounds 3] [--workers 8] [--guarded]
                                [--json out.json]

The main thread, where Python runs signal handlers, writes alone (never in another thread's
group commit), taking the write lock between the workers' batches. Each row runs
``--workers`` threads claiming distinct ids in a loop for ``--seconds``, on a fresh file
(claim-durable); with ``--guarded`` each write is a whole ``Guard.execute`` instead of a raw
claim. Rows, alternated round by round:

- ``workers alone``: the main thread idle (the baseline for the workers' latency);
- ``with main``: the main thread claiming too, as SafeAgent runs it (it yields the GIL
  before taking the write lock while a batch of the workers is queued);
- ``with main, no yield``: the same with that yield patched out (the code before it).

Printed per row: the main thread's share of the writes (its fair share is one in
``workers + 1``), the workers' writes per second, and their median and p99 latency in
milliseconds (medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from safeagent import Guard, SQLiteStore
from safeagent._keys import downstream_key, fingerprint
from safeagent.stores import _sqlite_group
from safeagent.stores._base import ClaimRequest

ROWS = ("workers alone", "with main", "with main, no yield")


def _claim(request_id: str) -> ClaimRequest:
    return ClaimRequest(
        namespace="default",
        request_id=request_id,
        action="charge",
        fingerprint=fingerprint("charge", b"{}"),
        payload_json="{}",
        execution_id="e-" + request_id,
        owner="bench",
        lease_ms=30_000,
        downstream_key=downstream_key("default", "charge", request_id),
    )


def _writer(store: SQLiteStore, guarded: bool) -> Callable[[str], object]:
    if not guarded:
        return lambda request_id: store.claim(_claim(request_id))
    guard = Guard(store, wait=0)
    return lambda request_id: guard.execute(request_id, "charge", {}, lambda ctx: 1)


def _row(row: str, folder: str, seconds: float, workers: int, guarded: bool) -> dict[str, Any]:
    store = SQLiteStore(
        os.path.join(folder, f"{row.replace(' ', '-').replace(',', '')}-{time.time_ns()}.db"),
        durability="claim-durable",
    )
    write = _writer(store, guarded)
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(workers)]

    def work(i: int) -> None:
        n, own = 0, latencies[i]
        while not stop.is_set():
            n += 1
            start = time.perf_counter()
            write(f"w{i}-{n}")
            own.append(time.perf_counter() - start)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    patched = row == "with main, no yield"
    if patched:  # the code before the yield: the main thread takes the lock back at once
        _sqlite_group.time = types.SimpleNamespace(sleep=lambda _s: None)  # type: ignore[assignment]
    try:
        for thread in threads:
            thread.start()
        main = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if row == "workers alone":
                time.sleep(0.05)
                continue
            main += 1
            write(f"m-{main}")
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        _sqlite_group.time = time  # type: ignore[assignment]
        store.close()
    flat = sorted(x for own in latencies for x in own)
    return {
        "main share": main / (main + len(flat)),
        "worker writes/s": len(flat) / seconds,
        "worker p50 ms": statistics.median(flat) * 1000,
        "worker p99 ms": flat[int(len(flat) * 0.99)] * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--guarded", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory(prefix="sa-main-thread-") as folder:
        for r in range(args.rounds):
            order = ROWS if r % 2 == 0 else ROWS[::-1]
            for row in order:
                results[row].append(_row(row, folder, args.seconds, args.workers, args.guarded))
    fair = 1 / (args.workers + 1)
    print(
        f"{args.workers} workers, {'guarded calls' if args.guarded else 'raw claims'}, "
        f"{args.rounds} rounds of {args.seconds:g} s; fair main share {fair:.1%}"
    )
    print(f"{'row':22} {'main share':>10} {'worker w/s':>10} {'p50 ms':>7} {'p99 ms':>7}")
    medians: dict[str, dict[str, float]] = {}
    for row in ROWS:
        m = {k: statistics.median(x[k] for x in results[row]) for k in results[row][0]}
        medians[row] = m
        print(
            f"{row:22} {m['main share']:>10.1%} {m['worker writes/s']:>10.0f} "
            f"{m['worker p50 ms']:>7.2f} {m['worker p99 ms']:>7.2f}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "rounds": results, "medians": medians}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
