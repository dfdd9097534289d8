"""PostgreSQL, 16 workers over distinct ids: the floor, a least guard, and SafeAgent with 16
audit chains and with 256.

A schema made by SafeAgent's schema version 4 or later has 256 audit chains; an older one
keeps its 16 (docs/design.md section 5). Each execution locks its subject's chain head
from its claim to its commit, WAL flush included, so with 16 chains two of 16 concurrent
workers often want the same head and one waits. This runs ``bench/run.py``'s 16-thread
figure on fresh schemas of each kind, on the psycopg floor and on a least guard
(:class:`LeastPostgres`: the floor with its claim first and one hash-chained audit event in
each of its two statements, the least a guard keeping docs/design.md section 5 writes;
a lower bound, not a design), alternating the order each round, and prints per variant
the median executions/s, client and server CPU per execution, WAL bytes per execution
(pg_stat_wal, the whole server: run it on a quiet one) and the share of sampled active
backends waiting on a lock; then the ratios. With
``--replays N`` each first execution is followed by N retries of it on average (a mixed
load: they replay; 0.2 retries every fifth id once); rates and CPU are then per first
execution, the retries' included.

    .venv/bin/python bench/pg_chains.py [--rounds 5] [--per-thread 40] [--mode durable]
        [--replays 0] [--variants floor,least,chains16,chains256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import threading
import uuid
import zlib
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import (
    ACTION,
    DEFAULT_PG,
    FloorPostgres,
    InFlight,
    fresh_spec,
    make_impl,
    payload,
    pg_reachable,
    threads_distinct,
)

VARIANTS = ("floor", "least", "chains16", "chains256")
LEAST_SHARDS = 256
GENESIS = "0" * 64


class LeastPostgres(FloorPostgres):
    """The floor plus what any guard keeping docs/design.md section 5 must add, and no more:
    each of its two writes carries one audit event, hash-chained to its chain's head (256
    chains, the head locked, read and moved by the same statement, the hash computed by the
    database), in the same autocommit statement as the write; the claim comes first (no
    read before it: two round trips per first execution, where the floor takes three); the
    Python is the request id check, canonical JSON and SHA-256 fingerprint of the payload
    (``json.dumps`` sorted, standing in for RFC 8785), an execution id and each event's
    detail as JSON. No lease, no fencing token, no record fields beyond the floor's and the
    fingerprint, no index on the trail, no redaction, no replay event: a lower bound on
    PostgreSQL, not a design."""

    _EVENT = """
h AS (SELECT shard, seq, head FROM {s}.audit_chain
      WHERE shard = %s AND EXISTS (SELECT FROM won) FOR UPDATE),
ev AS (
    INSERT INTO {s}.audit_events (at_ms, kind, subject, detail, shard, seq, prev_hash, hash)
    SELECT n.now, %s, won.request_id, %s, h.shard, h.seq + 1, h.head,
           encode(sha256(convert_to(h.head || '|' || (h.seq + 1) || '|' || n.now || '|'
               || %s || '|' || won.request_id || '|' || %s, 'UTF8')), 'hex')
    FROM won, h, n
    RETURNING shard, seq, hash
),
mv AS (UPDATE {s}.audit_chain AS a SET seq = ev.seq, head = ev.hash FROM ev
       WHERE a.shard = ev.shard)
SELECT won.request_id FROM won"""
    _NOW = "n AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now)"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        s = spec["schema"]
        conn, _ = self._conns()
        conn.execute(f"ALTER TABLE {s}.receipts ADD COLUMN fingerprint TEXT")
        conn.execute(
            f"CREATE TABLE {s}.audit_events (id BIGSERIAL PRIMARY KEY, at_ms BIGINT NOT NULL,"
            " kind TEXT NOT NULL, subject TEXT NOT NULL, detail TEXT NOT NULL,"
            " shard INTEGER NOT NULL, seq BIGINT NOT NULL, prev_hash TEXT NOT NULL,"
            " hash TEXT NOT NULL)"
        )
        conn.execute(
            f"CREATE TABLE {s}.audit_chain (shard INTEGER PRIMARY KEY, seq BIGINT NOT NULL,"
            " head TEXT NOT NULL)"
        )
        conn.execute(
            f"INSERT INTO {s}.audit_chain SELECT g, 0, '{GENESIS}'"
            f" FROM generate_series(0, {LEAST_SHARDS - 1}) AS g"
        )
        event = self._EVENT.replace("{s}", s)
        self.claim = (
            f"WITH {self._NOW}, won AS (INSERT INTO {s}.receipts"
            " (request_id, status, result, fingerprint) VALUES (%s, 'PENDING', NULL, %s)"
            f" ON CONFLICT (request_id) DO NOTHING RETURNING request_id),{event}"
        )
        self.complete = (
            f"WITH {self._NOW}, won AS (UPDATE {s}.receipts SET status = 'COMMITTED',"
            " result = %s WHERE request_id = %s AND status = 'PENDING'"
            f" RETURNING request_id),{event}"
        )
        self.replay = f"SELECT status, result, fingerprint FROM {s}.receipts WHERE request_id = %s"

    def execute(self, request_id: str, fn: Callable[[], Any]) -> Any:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 255:
            raise ValueError(request_id)
        conn, done = self._conns()
        body = payload(request_id)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(f"{ACTION}|{canonical}".encode()).hexdigest()
        shard = zlib.crc32(request_id.encode()) % LEAST_SHARDS
        execution_id = uuid.uuid4().hex
        claimed = json.dumps(
            {"payload": body, "fingerprint": digest, "id": execution_id}, separators=(",", ":")
        )
        if conn.execute(
            self.claim, (request_id, digest, shard, "claimed", claimed, "claimed", claimed)
        ).fetchone():
            result = fn()
            text = json.dumps(result, separators=(",", ":"))
            detail = json.dumps({"status": "COMMITTED", "id": execution_id}, separators=(",", ":"))
            done.execute(
                self.complete, (text, request_id, shard, "succeeded", detail, "succeeded", detail)
            ).fetchone()
            return result
        row = conn.execute(self.replay, (request_id,)).fetchone()
        if row[0] == "COMMITTED" and row[2] == digest:
            return json.loads(row[1])
        raise InFlight(request_id)


def _make(spec: dict[str, Any]) -> Any:
    return LeastPostgres(spec) if spec["impl"] == "least" else make_impl(spec)


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
    impl = variant if variant in ("floor", "least") else "safeagent"
    with fresh_spec(base, impl, tag) as spec:
        if variant == "chains16":
            _sixteen_chains(spec)
        wal0 = _wal_bytes(base["url"])
        with LockSampler(base["url"]) as sampler:
            row = threads_distinct(spec, 16, per_thread, replays, make=_make)
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
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, from " + ", ".join(VARIANTS) + " (floor always runs)",
    )
    args = parser.parse_args()
    chosen = ["floor", *(v for v in VARIANTS if v != "floor" and v in args.variants.split(","))]
    problem = pg_reachable(args.postgres)
    if problem:
        print(f"PostgreSQL unreachable: {problem}", file=sys.stderr)
        return 1
    base = {"backend": "postgres", "mode": args.mode, "url": args.postgres}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in chosen}
    for r in range(args.rounds):
        order = chosen if r % 2 == 0 else chosen[::-1]
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
    for variant in chosen:
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
    for variant in chosen[1:]:
        print(f"{variant} / floor: {rate[variant] / rate['floor']:.2f}x")
    for a, b in (("chains256", "chains16"), ("chains256", "least")):
        if a in rate and b in rate:
            print(f"{a} / {b}: {rate[a] / rate[b]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
