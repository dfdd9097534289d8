"""PostgreSQL, 16 workers over distinct ids: 16 audit chains against 256, beside the floor.

A schema made by SafeAgent's schema version 4 or later has 256 audit chains; an older one
keeps its 16 (docs/design.md section 5). Each execution locks its subject's chain head
from its claim to its commit, WAL flush included, so with 16 chains two of 16 concurrent
workers often want the same head and one waits. This runs ``bench/run.py``'s 16-thread
figure on fresh schemas of each kind and on the psycopg floor, alternating the order each
round, and prints per variant the median executions/s, client and server CPU per
execution, WAL bytes per execution (pg_stat_wal, the whole server: run it on a quiet one)
and the share of sampled active backends waiting on a lock; then the ratios. With
``--replays N`` each first execution is followed by N retries of it on average (a mixed
load: they replay; 0.2 retries every fifth id once); rates and CPU are then per first
execution, the retries' included.

    .venv/bin/python bench/pg_chains.py [--rounds 5] [--per-thread 40] [--mode durable]
        [--replays 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import DEFAULT_PG, fresh_spec, pg_reachable, threads_distinct

VARIANTS = ("floor", "chains16", "chains256")


def _sixteen_chains(spec: dict[str, Any]) -> None:
    """Shape a fresh schema as a version 3 schema is after opening: 16 chain heads and the
    number 16 stored (no event is written yet, so no subject changes chain)."""
    import psycopg  # noqa: PLC0415 - optional extra

    from safeagent.stores.postgres import PostgresStore  # noqa: PLC0415 - optional extra

    PostgresStore(spec["url"], schema=spec["schema"]).close()  # creates the schema
    schema = spec["schema"]
    with psycopg.connect(spec["url"], autocommit=True) as conn:
        conn.execute(f"DELETE FROM {schema}.audit_chain WHERE shard >= 16")
        conn.execute(f"UPDATE {schema}.safeagent_meta SET value = '16' WHERE key = 'chain_shards'")
    check = PostgresStore(spec["url"], schema=schema)
    try:
        assert check.chain_shards == 16, check.chain_shards
    finally:
        check.close()


class LockSampler:
    """Every ``every`` seconds, how many of the database's other active backends wait on
    a lock (pg_stat_activity): the share of samples that were lock waits."""

    def __init__(self, url: str, every: float = 0.02) -> None:
        import psycopg  # noqa: PLC0415 - optional extra

        self.conn = psycopg.connect(url, autocommit=True)
        self.every = every
        self.waiting = self.active = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sql = (
            "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), count(*)"
            " FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND pid <> pg_backend_pid()"
        )
        while not self.stop.wait(self.every):
            waiting, active = self.conn.execute(sql).fetchone()
            self.waiting += waiting
            self.active += active

    def __enter__(self) -> LockSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.close()

    @property
    def share(self) -> float:
        return self.waiting / self.active if self.active else 0.0


def _wal_bytes(url: str) -> int:
    import psycopg  # noqa: PLC0415 - optional extra

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT wal_bytes FROM pg_stat_wal").fetchone()
    return int(row[0])


def one(
    base: dict[str, Any], variant: str, tag: str, per_thread: int, replays: float = 0
) -> dict[str, Any]:
    impl = "floor" if variant == "floor" else "safeagent"
    with fresh_spec(base, impl, tag) as spec:
        if variant == "chains16":
            _sixteen_chains(spec)
        wal0 = _wal_bytes(base["url"])
        with LockSampler(base["url"]) as sampler:
            row = threads_distinct(spec, 16, per_thread, replays)
        row["wal_bytes"] = (_wal_bytes(base["url"]) - wal0) / max(row["executions"], 1)
        row["lock_wait_share"] = round(sampler.share, 3)
        assert not row["errors"], row["errors"]
        assert row["executions"] == 16 * per_thread, row
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-thread", type=int, default=40)
    parser.add_argument("--mode", choices=("durable", "claim-durable"), default="durable")
    parser.add_argument(
        "--replays",
        type=float,
        default=0,
        help="retries (replays) per first execution: 1 retries each once, 0.2 every fifth",
    )
    parser.add_argument("--postgres", default=DEFAULT_PG)
    args = parser.parse_args()
    problem = pg_reachable(args.postgres)
    if problem:
        print(f"PostgreSQL unreachable: {problem}", file=sys.stderr)
        return 1
    base = {"backend": "postgres", "mode": args.mode, "url": args.postgres}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            runs[variant].append(one(base, variant, f"ch{r}", args.per_thread, args.replays))
    retried = f", {args.replays:g} retries (replays) per id" if args.replays else ""
    print(
        f"PostgreSQL {args.mode}, 16 threads x {args.per_thread} distinct ids{retried}, "
        f"{args.rounds} rounds (medians; rates and CPU per first execution)"
    )
    header = f"{'variant':<10} {'exec/s':>9} {'client us':>10} {'server us':>10}"
    print(f"{header} {'WAL bytes':>10} {'lock waits':>11}")
    rate: dict[str, float] = {}
    for variant in VARIANTS:
        rows = runs[variant]
        rate[variant] = statistics.median(row["exec_per_s"] for row in rows)
        client = statistics.median(row["client_cpu_us"] for row in rows)
        servers = [row["server_cpu_us"] for row in rows if row["server_cpu_us"] is not None]
        server = f"{statistics.median(servers):.0f}" if servers else "-"
        waits = statistics.median(row["lock_wait_share"] for row in rows)
        wal = statistics.median(row["wal_bytes"] for row in rows)
        print(
            f"{variant:<10} {rate[variant]:>9.0f} {client:>10.0f} {server:>10} {wal:>10.0f}"
            f" {waits:>10.1%}"
        )
    print(f"chains16 / floor: {rate['chains16'] / rate['floor']:.2f}x")
    print(f"chains256 / floor: {rate['chains256'] / rate['floor']:.2f}x")
    print(f"chains256 / chains16: {rate['chains256'] / rate['chains16']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
