"""Where a first execution's and a replay's time goes on SQLite: the floor, a least
guard, SafeAgent's own SQL, and the whole guarded call, side by side in one run.

    python bench/decompose.py [--n 2000] [--dir DIR] [--mode durable|claim-durable]

Rows, interleaved in blocks so all of them see the same machine noise:

- ``floor``: the raw sqlite3 floor of ``bench/quick.py`` (SELECT; BEGIN IMMEDIATE; INSERT
  PENDING; COMMIT; fn(); UPDATE);
- ``audited floor``: the floor plus one plain audit row (no index, no hash chain) in each
  of its two transactions: the least SQL that writes a claim and a completion together
  with their audit events, as docs/design.md section 5 requires;
- ``least guard``: the audited floor plus the least Python any guard keeping that
  contract runs (request id check, canonical JSON and fingerprint, execution id, event
  details as JSON, each event hashed into one chain whose head stays in memory, the
  result as JSON; replays checked against the fingerprint and their events buffered, 64
  to a write): a lower bound for a CPython guard, not a design;
- ``statements``: SafeAgent's SQLite statements for one first execution, replayed through
  raw sqlite3 on a SafeAgent database with no Python of SafeAgent's around them: the GET,
  the claim and its audit event in one transaction, the completion and its audit event in
  another (each event reads its chain head and is inserted, and the chain-head trigger
  runs, as in the store; the hash itself is SafeAgent's Python, left to the guard row);
- ``guard``: ``Guard.execute`` on a fresh id.

Then the floor, the least guard and the guard replay the same ids, next to the cost of
one fingerprint alone. ``audited floor / floor`` is what the same-transaction audit rule
costs by itself; ``least guard / floor`` is the least any CPython guard can reach here;
``statements / floor`` is the cost of the record SafeAgent keeps; ``guard - statements``
is SafeAgent's Python. On tmpfs (``--dir /dev/shm``) fsync is nearly free, which leaves
the CPU. Medians of wall time in microseconds; CPU is the thread's mean per call (exact),
and its user part is sampled at the timer tick by the kernel (a rough split). Last, the
WAL pages each row writes per first execution (100 more, the log emptied first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
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
from safeagent._keys import canonical_json, fingerprint
from safeagent.stores._rows import CHAIN_SHARDS, shard_of
from safeagent.stores.sqlite import SQL_APPEND, SQL_CLAIM, SQL_COMPLETE, SQL_GET, SQL_HEAD

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
CHAINED_ROW = "INSERT INTO audit (kind, subject, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?)"


class LeastGuard(Floor):
    """The audited floor plus the least Python a guard keeping docs/design.md's contract
    must run per first execution: check the request id, canonical JSON of the payload and
    its SHA-256 fingerprint, an execution id, each audit event's detail as JSON and its
    hash chained to the previous event's (one chain, its head kept in memory), the result
    as JSON. No record fields beyond the floor's, no index, no redaction, no lease: a lower
    bound for any CPython guard, not a design."""

    def __init__(self, path: str, claim_sync: str, complete_sync: str) -> None:
        super().__init__(path, claim_sync, complete_sync)
        self.conn.execute(
            "CREATE TABLE audit (id INTEGER PRIMARY KEY, kind TEXT, subject TEXT, detail TEXT,"
            " prev_hash TEXT, hash TEXT)"
        )
        self.conn.execute("ALTER TABLE receipts ADD COLUMN fingerprint TEXT")
        self.head = "0" * 64
        self.buffered: list[tuple[str, str, str]] = []  # replay events, written in batches

    def _flush(self) -> None:
        rows = []
        for kind, request_id, text in self.buffered:
            prev = self.head
            self.head = hashlib.sha256(f"{prev}|{kind}|{request_id}|{text}".encode()).hexdigest()
            rows.append((kind, request_id, text, prev, self.head))
        self.buffered.clear()
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(CHAINED_ROW, rows)
        self.conn.execute("COMMIT")

    def _event(self, kind: str, request_id: str, detail: dict[str, Any]) -> None:
        text = json.dumps(detail, separators=(",", ":"))
        prev = self.head
        self.head = hashlib.sha256(f"{prev}|{kind}|{request_id}|{text}".encode()).hexdigest()
        self.conn.execute(CHAINED_ROW, (kind, request_id, text, prev, self.head))

    def execute(self, request_id: str, fn: Callable[[], Any], payload: Any = PAYLOAD) -> Any:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 255:
            raise ValueError(request_id)
        conn = self.conn
        digest = fingerprint("charge", canonical_json(payload))
        row = conn.execute(
            "SELECT status, result, fingerprint FROM receipts WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        if row is not None:  # a replay: its event is buffered, written 64 at a time
            if row[0] != "SUCCEEDED" or row[2] != digest:
                raise ValueError(request_id)
            self.buffered.append(("replayed", request_id, json.dumps({"fingerprint": digest})))
            if len(self.buffered) >= 64:
                self._flush()
            return json.loads(row[1])
        execution_id = uuid.uuid4().hex
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO receipts VALUES (?, 'PENDING', NULL, ?)", (request_id, digest))
        self._event(
            "claimed", request_id, {"payload": payload, "fingerprint": digest, "id": execution_id}
        )
        conn.execute("COMMIT")
        result = fn()
        text = json.dumps(result, separators=(",", ":"))
        if self.complete_sync != self.claim_sync:
            conn.execute(f"PRAGMA synchronous={self.complete_sync}")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE receipts SET status = 'SUCCEEDED', result = ? WHERE request_id = ?",
            (text, request_id),
        )
        self._event("succeeded", request_id, {"status": "SUCCEEDED", "id": execution_id})
        conn.execute("COMMIT")
        if self.complete_sync != self.claim_sync:
            conn.execute(f"PRAGMA synchronous={self.claim_sync}")
        return result


class Statements:
    """SafeAgent's statements for one first execution, through raw sqlite3."""

    def __init__(self, path: str, complete_sync: str) -> None:
        self.store = SQLiteStore(path)  # creates the schema and the chain-head trigger
        self.conn = self.store._conn()
        self.complete_sync = complete_sync
        self.payload = json.dumps(PAYLOAD, separators=(",", ":"), sort_keys=True)
        self.claim_detail = json.dumps(
            {"payload": PAYLOAD, "fingerprint": "f" * 64, "attempt": 1}, separators=(",", ":")
        )
        self.done_detail = json.dumps({"error": None, "status": "SUCCEEDED"}, separators=(",", ":"))

    @staticmethod
    def _append(conn: Any, row: tuple[Any, ...], shard: int) -> None:
        """The store's single-event append: read the shard's head, insert the event (a
        fixed hash stands for chain_hash, which is SafeAgent's Python); the trigger
        moves the head."""
        seq, head = conn.execute(SQL_HEAD, (shard,)).fetchone()
        conn.execute(SQL_APPEND, (*row, shard, seq + 1, head, "h" * 64))

    def execute(self, rid: str, fn: Callable[[], Any]) -> None:
        conn, now = self.conn, time.time_ns() // 1_000_000
        conn.execute(SQL_GET, ("default", rid)).fetchone()
        shard, eid = shard_of("default", rid, CHAIN_SHARDS), uuid.uuid4().hex
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
        self._append(
            conn,
            (now, "claimed", "default", rid, "charge", "host:1:main", eid, 1, self.claim_detail),
            shard,
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
        self._append(
            conn,
            (now, "succeeded", "default", rid, "charge", "host:1:main", eid, 1, self.done_detail),
            shard,
        )
        conn.execute("COMMIT")
        if switch:
            conn.execute("PRAGMA synchronous = FULL")


def _thread_cpu() -> tuple[float, float]:
    """The calling thread's CPU seconds: the total, exact (``CLOCK_THREAD_CPUTIME_ID``),
    and the user part, which Linux samples at the timer tick (``getrusage``; the process's
    figure where the per-thread one is missing: the benchmark runs one thread)."""
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return time.thread_time(), resource.getrusage(who).ru_utime


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
        least = LeastGuard(os.path.join(tmp, "least.db"), "FULL", complete_sync)
        rows: dict[str, Callable[[str], Any]] = {
            "floor": lambda rid: floor.execute(rid, lambda: RESULT),
            "audited floor": lambda rid: audited.execute(rid, lambda: RESULT),
            "least guard": lambda rid: least.execute(rid, lambda: RESULT, PAYLOAD),
            "statements": lambda rid: statements.execute(rid, lambda: RESULT),
            "guard": lambda rid: guard.execute(rid, "charge", PAYLOAD, lambda _ctx: RESULT),
        }
        for name, run in rows.items():  # warm up: connections, statement caches
            for i in range(50):
                run(f"warm-{name}-{i}")
        first = _measure(rows, args.n)
        replays = {  # the same ids again: each a replay of its stored receipt
            name: rows[name] for name in ("floor", "least guard", "guard")
        }
        replays["fingerprint"] = lambda _rid: fingerprint("charge", canonical_json(PAYLOAD))
        again = _measure(replays, args.n)
        connections = {
            "floor": floor.conn,
            "audited floor": audited.conn,
            "least guard": least.conn,
            "statements": statements.conn,
            "guard": guard.store._conn(),  # type: ignore[attr-defined]
        }
        pages = {name: _wal_pages(connections[name], rows[name]) for name in connections}
        guard.close()
        statements.store.close()
    print(
        f"SQLite {args.mode}, first execution, n={args.n}, dir={args.dir or tempfile.gettempdir()}"
    )
    _table(first, "floor", args.n)
    med = {name: statistics.median(v) for name, (v, _) in first.items()}
    print(f"SafeAgent's Python (guard - statements): {med['guard'] - med['statements']:.1f} us")
    print(
        f"its record and audit SQL (statements - floor): {med['statements'] - med['floor']:.1f} us"
    )
    print(
        "WAL pages written per first execution: "
        + ", ".join(f"{name} {count:.1f}" for name, count in pages.items())
    )
    print("\nreplay of the same ids (fingerprint: computing one, alone)")
    _table(again, "floor", args.n)
    bound = sum(statistics.median(again[name][0]) for name in ("floor", "fingerprint"))
    for name in ("least guard", "guard"):
        print(
            f"{name} / (floor replay + one fingerprint): "
            f"{statistics.median(again[name][0]) / bound:.2f}x"
        )


def _wal_pages(conn: Any, run: Callable[[str], Any], k: int = 100) -> float:
    """WAL frames (pages) that ``k`` fresh first executions append, per execution: the
    log is emptied first and not checkpointed meanwhile, so its length counts them all."""
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path = conn.execute("PRAGMA database_list").fetchone()[2] + "-wal"
    for i in range(k):
        run(f"wal-{i}-{uuid.uuid4().hex}")
    frame = 24 + conn.execute("PRAGMA page_size").fetchone()[0]
    return os.path.getsize(path) / frame / k


def _measure(
    rows: dict[str, Callable[[str], Any]], n: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Per row: each call's wall time and the thread's CPU and user CPU per call, all in
    microseconds, timed in blocks of 50 whose order rotates so every row sees the same
    noise. Row ``name`` calls ids ``f"{name}-{i}"``."""
    samples: dict[str, list[float]] = {name: [] for name in rows}
    cpu = {name: [0.0, 0.0] for name in rows}
    block, order = 50, list(rows)
    for start in range(0, n, block):
        order = order[1:] + order[:1]  # rotate who goes first
        for name in order:
            run = rows[name]
            before = _thread_cpu()
            for i in range(start, min(start + block, n)):
                t0 = time.perf_counter_ns()
                run(f"{name}-{i}")
                samples[name].append((time.perf_counter_ns() - t0) / 1000)
            after = _thread_cpu()
            cpu[name][0] += (after[0] - before[0]) * 1e6 / n
            cpu[name][1] += (after[1] - before[1]) * 1e6 / n
    return {name: (samples[name], cpu[name]) for name in rows}


def _table(measured: dict[str, tuple[list[float], list[float]]], base: str, n: int) -> None:
    print(f"{'':14s} {'median':>8s}     {'/ floor':>7s}  {'CPU':>9s}  {'user (sampled)':>14s}")
    floor = statistics.median(measured[base][0])
    for name, (walls, (total, user)) in measured.items():
        med = statistics.median(walls)
        print(f"{name:14s} {med:8.1f} us  {med / floor:6.2f}x  {total:6.1f} us  {user:11.1f} us")


if __name__ == "__main__":
    main()
