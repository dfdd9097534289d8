"""Leases under load: many calls running at once in one process, each lease renewed by the
heartbeat, with the store's batched renewal next to one transaction per lease, in one run.

    python bench/leases.py [--calls 1500] [--lease 1.0] [--work 3.0] [--rounds 2]
                           [--json out.json]

Each row starts ``--calls`` async calls on an ``AsyncGuard`` over a fresh SQLite file
(durable), each ``fn`` sleeping ``--work`` seconds on a ``--lease``-second lease. Another
guard polls ``in_doubt()`` every 50 ms meanwhile: a call seen in doubt while its ``fn``
still runs is a live call whose lease ran out, which a reconcile sweep could take over
(its caller then gets ``LeaseLostError``, and a hook that judges by the lease's expiry
could run the side effect again). Rows:

- ``batched``: the store's ``renew_many`` (one transaction, one fsync, renews every due
  lease: what SafeAgent does);
- ``one per lease``: the same store with ``renew`` overridden alone, so the heartbeat
  renews each lease in its own transaction (SafeAgent before this was measured, and any store
  without ``renew_many``).

Printed per row and round: calls seen in doubt while running, renewal transactions, and
their median and p99 duration in milliseconds. The rows alternate round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from safeagent import AsyncGuard, Guard, SQLiteStore


class TimedStore(SQLiteStore):
    """SQLiteStore timing each renewal transaction."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.times: list[float] = []

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        start = time.perf_counter()
        try:
            return super().renew(namespace, request_id, fencing_token, lease_ms)
        finally:
            self.times.append(time.perf_counter() - start)

    def renew_many(self, leases: Any) -> list[bool]:
        start = time.perf_counter()
        try:
            return super().renew_many(leases)
        finally:
            self.times.append(time.perf_counter() - start)


class OnePerLease(TimedStore):
    """The same store, changing ``renew`` alone: the heartbeat then renews one lease per
    transaction (a subclass's own ``renew`` is always the one called)."""

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        return super().renew(namespace, request_id, fencing_token, lease_ms)


async def _row(store: TimedStore, calls: int, lease: float, work: float) -> dict[str, Any]:
    guard = AsyncGuard(store, lease=lease, wait=0)
    observer = Guard(store.path, wait=0, owner="observer")
    running: set[str] = set()
    seen: set[str] = set()

    async def fn(ctx: Any) -> int:
        running.add(ctx.request_id)
        await asyncio.sleep(work)
        running.discard(ctx.request_id)
        return 1

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(guard.execute(f"r{i}", "a", {}, fn)) for i in range(calls)]
    while not all(t.done() for t in tasks):
        doubt = await asyncio.to_thread(observer.in_doubt)
        seen |= {r.request_id for r in doubt} & running
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - started
    errors = sum(1 for t in tasks if t.exception() is not None)
    observer.close()
    await guard.aclose()
    times = sorted(store.times)
    return {
        "in_doubt_while_running": len(seen),
        "errors": errors,
        "renewal_transactions": len(times),
        "renewal_median_ms": statistics.median(times) * 1000 if times else 0.0,
        "renewal_p99_ms": times[int(len(times) * 0.99)] * 1000 if times else 0.0,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--work", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows: dict[str, list[dict[str, Any]]] = {"batched": [], "one per lease": []}
    with tempfile.TemporaryDirectory(prefix="sa-leases-") as folder:
        for n in range(args.rounds):
            for name, kind in (("batched", TimedStore), ("one per lease", OnePerLease)):
                store = kind(os.path.join(folder, f"{name.replace(' ', '-')}-{n}.db"))
                rows[name].append(asyncio.run(_row(store, args.calls, args.lease, args.work)))
                store.close()
    print(f"{args.calls} calls at once, lease {args.lease} s, fn {args.work} s, SQLite durable")
    print(f"{'row':<15} {'round':>5} {'in doubt':>9} {'errors':>7} {'renewals':>9} "
          f"{'median ms':>10} {'p99 ms':>8} {'wall s':>7}")  # fmt: skip
    for name, results in rows.items():
        for n, r in enumerate(results):
            print(
                f"{name:<15} {n + 1:>5} {r['in_doubt_while_running']:>9} {r['errors']:>7} "
                f"{r['renewal_transactions']:>9} {r['renewal_median_ms']:>10.2f} "
                f"{r['renewal_p99_ms']:>8.2f} {r['wall_s']:>7.2f}"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "rows": rows}, out, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
