"""Where a first execution's time goes on SQLite: the floor, SafeAgent's own SQL, and the
whole guarded call, side by side in one run.

    python bench/decompose.py [--n 2000] [--dir DIR] [--mode durable|claim-durable]

Three rows per id, interleaved in blocks so all three see the same machine noise:

- ``floor``: the raw sqlite3 floor of ``bench/quick.py`` (SELECT; BEGIN IMMEDIATE; INSERT
  PENDING; COMMIT; fn(); UPDATE);
- ``audited floor``: the floor plus one plain audit row (no index, no hash chain) in each
  of its two transactions: the least SQL that writes a claim and a completion together
  with their audit events, as docs/design.md section 5 requires;
- ``statements``: SafeAgent's SQLite statements for one first execution, replayed through
  raw sqlite3 on a SafeAgent database with no Python of SafeAgent's around them: the GET,
  the claim and its audit event in one transaction, the completion and its audit event in
  another (the event statements call the chain-hash function SafeAgent registers, and the
  chain-head trigger runs, as in the store);
- ``guard``: ``Guard.execute`` on a fresh id.

``audited floor / floor`` is what the same-transaction audit rule costs by itself;
``statements / floor`` is the cost of the record SafeAgent keeps (a 20-column row, an audit
event with one index entry and its chain head, in each of the two transactions);
``guard - statements`` is SafeAgent's Python. On tmpfs (``--dir /dev/shm``) fsync is
nearly free, which leaves the CPU; on a disk, the extra pages of each commit add to it.
Medians in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quick import Floor

from safeagent import Guard, SQLiteStore
from safeagent.stores._rows import shard_of
from safeagent.stores.sqlite import SQL_CLAIM, SQL_COMPLETE, SQL_EVENT, SQL_GET

PAYLOAD = {"amount": 1234, "currency": "usd", "customer": "cus_123", "memo": "x" * 40}
RESULT = {"ok": True}


class AuditedFloor(Floor):
    """The floor with one plain audit row written in each of its two transactions."""

    def __init__(self, path: str, claim_sync: str, complete_sync: str) -> None:
        super().__init__(path, claim_sync, complete_sync)
        self.conn.execute(
            "CREATE TABLE audit (id INTEGER PRIMARY KEY, kind TEXT, subject TEXT, detail TEXT)"
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
        conn.execute(AUDIT_ROW, ("claimed", request_id, "{}"))
        conn.execute("COMMIT")
        result = fn()
        if self.complete_sync != self.claim_sync:
            conn.execute(f"PRAGMA synchronous={self.complete_sync}")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE receipts SET status = 'SUCCEEDED', result = ? WHERE request_id = ?",
            (json.dumps(result), request_id),
        )
        conn.execute(AUDIT_ROW, ("succeeded", request_id, "{}"))
        conn.execute("COMMIT")
        if self.complete_sync != self.claim_sync:
            conn.execute(f"PRAGMA synchronous={self.claim_sync}")
        return result


AUDIT_ROW = "INSERT INTO audit (kind, subject, detail) VALUES (?, ?, ?)"


class Statements:
    """SafeAgent's statements for one first execution, through raw sqlite3."""

    def __init__(self, path: str, complete_sync: str) -> None:
        self.store = SQLiteStore(path)  # creates the schema; its connection has the hash UDF
        self.conn = self.store._conn()
        self.complete_sync = complete_sync
        self.payload = json.dumps(PAYLOAD, separators=(",", ":"), sort_keys=True)
        self.claim_detail = json.dumps(
            {"payload": PAYLOAD, "fingerprint": "f" * 64, "attempt": 1}, separators=(",", ":")
        )
        self.done_detail = json.dumps({"error": None, "status": "SUCCEEDED"}, separators=(",", ":"))

    def execute(self, rid: str, fn: Callable[[], Any]) -> None:
        conn, now = self.conn, time.time_ns() // 1_000_000
        conn.execute(SQL_GET, ("default", rid)).fetchone()
        shard, eid = shard_of("default", rid), uuid.uuid4().hex
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            SQL_CLAIM,
            (
                "default",
                rid,
                "charge",
                "f" * 64,
                self.payload,
                eid,
                "host:1:main",
                now + 60_000,
                "sa1-" + "d" * 64,
                now,
                now,
                now,
            ),
        ).fetchone()
        conn.execute(
            SQL_EVENT,
            (
                now,
                "claimed",
                "default",
                rid,
                "charge",
                "host:1:main",
                eid,
                1,
                self.claim_detail,
                shard,
            ),
        )
        conn.execute("COMMIT")
        result = json.dumps(fn(), separators=(",", ":"))
        switch = self.complete_sync != "FULL"
        if switch:
            conn.execute(f"PRAGMA synchronous = {self.complete_sync}")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            SQL_COMPLETE, ("SUCCEEDED", result, None, None, now, now, "default", rid, 1)
        ).fetchone()
        conn.execute(
            SQL_EVENT,
            (
                now,
                "succeeded",
                "default",
                rid,
                "charge",
                "host:1:main",
                eid,
                1,
                self.done_detail,
                shard,
            ),
        )
        conn.execute("COMMIT")
        if switch:
            conn.execute("PRAGMA synchronous = FULL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="first executions per row")
    parser.add_argument("--dir", default=None, help="where the files go (default: temp dir)")
    parser.add_argument("--mode", choices=("durable", "claim-durable"), default="durable")
    args = parser.parse_args()
    complete_sync = "NORMAL" if args.mode == "claim-durable" else "FULL"
    with tempfile.TemporaryDirectory(prefix="sa-decompose-", dir=args.dir) as tmp:
        floor = Floor(os.path.join(tmp, "floor.db"), "FULL", complete_sync)
        audited = AuditedFloor(os.path.join(tmp, "audited.db"), "FULL", complete_sync)
        statements = Statements(os.path.join(tmp, "statements.db"), complete_sync)
        guard = Guard(SQLiteStore(os.path.join(tmp, "guard.db"), durability=args.mode))
        rows: dict[str, Callable[[str], Any]] = {
            "floor": lambda rid: floor.execute(rid, lambda: RESULT),
            "audited floor": lambda rid: audited.execute(rid, lambda: RESULT),
            "statements": lambda rid: statements.execute(rid, lambda: RESULT),
            "guard": lambda rid: guard.execute(rid, "charge", PAYLOAD, lambda _ctx: RESULT),
        }
        for name, run in rows.items():  # warm up: connections, statement caches
            for i in range(50):
                run(f"warm-{name}-{i}")
        samples: dict[str, list[float]] = {name: [] for name in rows}
        block, order = 50, list(rows)
        for start in range(0, args.n, block):
            order = order[1:] + order[:1]  # rotate who goes first
            for name in order:
                run = rows[name]
                for i in range(start, min(start + block, args.n)):
                    t0 = time.perf_counter_ns()
                    run(f"{name}-{i}")
                    samples[name].append((time.perf_counter_ns() - t0) / 1000)
        guard.close()
        statements.store.close()
    med = {name: statistics.median(v) for name, v in samples.items()}
    print(
        f"SQLite {args.mode}, first execution, n={args.n}, dir={args.dir or tempfile.gettempdir()}"
    )
    for name in rows:
        print(f"{name:14s} {med[name]:8.1f} us  ({med[name] / med['floor']:.2f}x floor)")
    print(f"SafeAgent's Python (guard - statements): {med['guard'] - med['statements']:.1f} us")
    print(
        f"its record and audit SQL (statements - floor): {med['statements'] - med['floor']:.1f} us"
    )


if __name__ == "__main__":
    main()
