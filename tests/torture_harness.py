"""SIGKILL torture harness: an effect service, a killable worker, a chaos driver, and the
invariant checks. Imported by ``tests/test_torture.py`` (CI size) and ``bench/torture.py``
(long runs); children run ``main(["serve"|"worker", <args.json>])``.

Ground truth is the **effect service's own SQLite ledger**: a small HTTP server on
127.0.0.1 (its own process) that records one row per effect it makes. Two variants:

- ``honours_key=True``: a POST whose ``Idempotency-Key`` it has seen returns the existing
  effect instead of making a new one (like Stripe);
- ``honours_key=False``: every POST makes a new effect.

Both answer ``GET /effects?key=...`` (look-up by key), which the reconcile hook uses.

Workers (``subprocess`` children running :func:`worker_main`) drive request ids through
``Guard(SQLiteStore(db))``; ``fn`` POSTs with ``ctx.downstream_key``. A worker prints a line
at each *kill point*; the driver hands each worker a plan ("halt at the n-th time you reach
point P") and SIGKILLs it when it halts there (``random``: kill after a short random delay,
wherever it is). Points:

- ``before_claim``: about to call ``guard.execute``;
- ``after_claim``: inside ``fn``, claim durable, nothing sent;
- ``during_effect``: inside ``fn``, the request sent, the answer not read (the service
  delays before making the effect, so the effect is usually made after the client died);
- ``after_effect``: inside ``fn``, the answer read, the completion not recorded;
- ``after_complete``: ``execute`` returned, before the worker reports it;
- ``random``: anywhere (including in the middle of SQLite commits).

The driver restarts killed workers until every id is settled (SUCCEEDED/FAILED) or in
doubt, runs a reconcile pass (hook: ask the service by downstream key), then a final drive
for the released ids, and checks the invariants against the service's ledger.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import http.client
import json
import os
import queue
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from safeagent import (
    ActionPolicy,
    Guard,
    InProgressError,
    LeaseLostError,
    NotExecuted,
    OutcomeUnknownError,
    ReconcileRequest,
    Reconciliation,
    ReplayedFailureError,
    SQLiteStore,
    StoreError,
)

ROOT = Path(__file__).resolve().parent.parent
"""The folder that holds the ``tests`` package: children run with it as cwd and path."""

ACTION = "effect"
HALT_POINTS = ("before_claim", "after_claim", "during_effect", "after_effect", "after_complete")
POINTS = (*HALT_POINTS, "random")
RECONCILE_POINT = "in_reconcile"
"""Inside the reconcile hook of a worker (only with ``hook_in_workers``): the reconcile
lease is taken, the service not yet asked."""
FN_POINTS = frozenset({"after_claim", "during_effect", "after_effect"})
SETTLED = frozenset({"SUCCEEDED", "FAILED"})


# -- what fn raises ------------------------------------------------------------------------


class DeclinedError(Exception):
    """The service declined the request (HTTP 402): a definite failure, stored as FAILED."""


class ServiceUnreachableError(NotExecuted):
    """The connection was refused: nothing was sent, the claim is released."""


class OutcomeUnsureError(Exception):
    """The request may have reached the service, but no answer came: declared
    ``outcome_unknown``, so the record goes IN_DOUBT."""


DECLINED_TYPE = "tests.torture_harness.DeclinedError"
"""How the guard names the failure it stores (children load this module by that name)."""


def is_declined(request_id: str, decline_mod: int) -> bool:
    """The service's fixed rule: which request ids it declines (about 1 in ``decline_mod``)."""
    if decline_mod <= 0:
        return False
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) % decline_mod == 0


def request_ids(n: int) -> list[str]:
    return [f"r{i:05d}" for i in range(n)]


# -- child-process plumbing ----------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _orphan_watchdog(deadline_s: float) -> None:
    """Exit this child when its parent is gone or after ``deadline_s``: never a leftover."""
    parent = os.getppid()
    until = time.monotonic() + deadline_s

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent or time.monotonic() > until:
                os._exit(4)

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


CHILD_MAIN = "import sys; from tests.torture_harness import main; sys.exit(main(sys.argv[1:]))"
"""What a child runs (not ``-m``, so the module loads once, under its package name)."""


def _spawn(command: str, args: dict[str, Any], args_path: Path, **popen: Any) -> Any:
    args_path.write_text(json.dumps(args))
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_MAIN, command, str(args_path)],
        cwd=ROOT,
        env=child_env(),
        **popen,
    )


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, grace: float = 5.0) -> None:
    """Send ``sig`` (if still running) and reap; SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# -- the effect service --------------------------------------------------------------------

LEDGER_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS effects (
        effect_id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL, rid TEXT NOT NULL, status TEXT NOT NULL,
        attempt INTEGER, token INTEGER, pid INTEGER, at_ms INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS effects_key ON effects (key)",
    """CREATE TABLE IF NOT EXISTS posts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT, rid TEXT, outcome TEXT NOT NULL, effect_id INTEGER, at_ms INTEGER NOT NULL)""",
)
EFFECT_COLUMNS = "effect_id, key, rid, status, attempt, token, pid, at_ms"


def _effect_dict(row: Iterable[Any]) -> dict[str, Any]:
    return dict(zip(EFFECT_COLUMNS.split(", "), row, strict=True))


class _Ledger:
    """The service's ground truth: one connection, one lock (check-then-insert is atomic)."""

    def __init__(self, path: str, honours_key: bool) -> None:
        self.honours_key = honours_key
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        for sql in LEDGER_SCHEMA:
            self.conn.execute(sql)

    def post(self, key: str | None, body: dict[str, Any], declined: bool) -> tuple[str, dict]:
        """Make the effect (or, honouring the key, return the one already made)."""
        now = time.time_ns() // 1_000_000
        rid = str(body.get("id"))
        with self.lock:
            if self.honours_key and key:
                row = self.conn.execute(
                    f"SELECT {EFFECT_COLUMNS} FROM effects WHERE key = ? ORDER BY effect_id",
                    (key,),
                ).fetchone()
                if row is not None:
                    effect = _effect_dict(row)
                    self.conn.execute(
                        "INSERT INTO posts (key, rid, outcome, effect_id, at_ms)"
                        " VALUES (?, ?, 'replayed', ?, ?)",
                        (key, rid, effect["effect_id"], now),
                    )
                    return "replayed", effect
            status = "declined" if declined else "ok"
            cur = self.conn.execute(
                "INSERT INTO effects (key, rid, status, attempt, token, pid, at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key or "",
                    rid,
                    status,
                    body.get("attempt"),
                    body.get("token"),
                    body.get("pid"),
                    now,
                ),
            )
            effect_id = cur.lastrowid
            self.conn.execute(
                "INSERT INTO posts (key, rid, outcome, effect_id, at_ms) VALUES (?, ?, ?, ?, ?)",
                (key, rid, "created", effect_id, now),
            )
            row = self.conn.execute(
                f"SELECT {EFFECT_COLUMNS} FROM effects WHERE effect_id = ?", (effect_id,)
            ).fetchone()
            return "created", _effect_dict(row)

    def reject(self, key: str | None, raw: bytes) -> None:
        with self.lock:
            self.conn.execute(
                "INSERT INTO posts (key, rid, outcome, effect_id, at_ms)"
                " VALUES (?, ?, 'rejected', NULL, ?)",
                (key, raw[:100].decode(errors="replace"), time.time_ns() // 1_000_000),
            )

    def by_key(self, key: str) -> list[dict[str, Any]]:
        with self.lock:
            rows = self.conn.execute(
                f"SELECT {EFFECT_COLUMNS} FROM effects WHERE key = ? ORDER BY effect_id", (key,)
            ).fetchall()
        return [_effect_dict(r) for r in rows]


def _handler(ledger: _Ledger, pre_delay: float, post_delay: float, decline_mod: int) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, code: int, doc: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(doc).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client died (SIGKILLed mid-request): the effect stands
                pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/health":
                self._answer(200, {"ok": True})
                return
            if url.path != "/effects":
                self._answer(404, {"error": "not found"})
                return
            key = urllib.parse.parse_qs(url.query).get("key", [""])[0]
            self._answer(200, {"effects": ledger.by_key(key)})

        def do_POST(self) -> None:
            if urllib.parse.urlsplit(self.path).path != "/effects":
                self._answer(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            key = self.headers.get("Idempotency-Key")
            try:
                body = json.loads(raw) if len(raw) == length else None
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                # A truncated request (http.client sends the headers and the body in two
                # writes: a client killed in between leaves the headers only): no effect.
                ledger.reject(key, raw)
                self._answer(400, {"error": "incomplete or invalid request body"})
                return
            if pre_delay:
                time.sleep(pre_delay)  # a slow downstream: the client may die meanwhile
            declined = is_declined(str(body.get("id")), decline_mod)
            outcome, effect = ledger.post(key, body, declined)
            if post_delay:
                time.sleep(post_delay)
            code = 402 if effect["status"] == "declined" else (201 if outcome == "created" else 200)
            headers = {"Idempotent-Replayed": "true"} if outcome == "replayed" else None
            self._answer(code, effect, headers)

    return Handler


def serve_main(args: dict[str, Any]) -> int:
    """The effect service's process: print ``PORT <n>`` once listening, serve until SIGTERM."""
    _orphan_watchdog(float(args.get("max_lifetime", 7200)))
    ledger = _Ledger(args["db"], bool(args["honours_key"]))
    handler = _handler(
        ledger, float(args["pre_delay"]), float(args["post_delay"]), int(args["decline_mod"])
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.request_queue_size = 128

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
        with ledger.lock:
            ledger.conn.close()
    return 0


class EffectService:
    """Starts and stops the effect service process; reads its ledger."""

    def __init__(
        self,
        workdir: Path,
        *,
        honours_key: bool,
        pre_delay: float = 0.003,
        post_delay: float = 0.003,
        decline_mod: int = 0,
        max_lifetime: float = 7200,
    ) -> None:
        self.db = workdir / ("service-keyed.db" if honours_key else "service-plain.db")
        self.workdir = workdir
        self.honours_key = honours_key
        self.args = {
            "db": str(self.db),
            "honours_key": honours_key,
            "pre_delay": pre_delay,
            "post_delay": post_delay,
            "decline_mod": decline_mod,
            "max_lifetime": max_lifetime,
        }
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> None:
        with open(self.workdir / "service.err", "ab") as err:
            self.proc = _spawn(
                "serve",
                self.args,
                self.workdir / "service-args.json",
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.stop()
                raise RuntimeError("the effect service did not start in time")
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the effect service failed: {self._err_tail()}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def _err_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "service.err").read_text()[-2000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> EffectService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ledger(self) -> tuple[list[dict[str, Any]], Counter[str]]:
        """Every effect the service made (its own SQLite file) and POST outcomes by kind."""
        conn = sqlite3.connect(self.db)
        try:
            rows = conn.execute(f"SELECT {EFFECT_COLUMNS} FROM effects ORDER BY effect_id")
            effects = [_effect_dict(r) for r in rows.fetchall()]
            posts: Counter[str] = Counter(
                dict(conn.execute("SELECT outcome, count(*) FROM posts GROUP BY 1").fetchall())
            )
        finally:
            conn.close()
        return effects, posts


def lookup(url: str, key: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The service's effects made under ``key`` (``GET /effects?key=...``)."""
    q = urllib.parse.urlencode({"key": key})
    with urllib.request.urlopen(f"{url}/effects?{q}", timeout=timeout) as resp:
        return list(json.loads(resp.read())["effects"])


def effect_result(effect: dict[str, Any]) -> dict[str, Any]:
    """What ``fn`` returns (and the hook stores) for an effect: the same shape both ways."""
    return {"effect_id": effect["effect_id"], "status": "ok"}


def make_hook(url: str) -> Callable[[ReconcileRequest], Reconciliation]:
    """The reconcile hook: ask the service by downstream key. Found -> happened (or failed
    if declined); not found -> not happened. An unreachable service raises: unknown."""

    def hook(req: ReconcileRequest) -> Reconciliation:
        found = lookup(url, req.downstream_key)
        if not found:
            return Reconciliation.not_happened(note="no effect under this key")
        first = found[0]
        if first["status"] == "declined":
            return Reconciliation.failed(
                DECLINED_TYPE, f"effect {first['effect_id']} declined", note="looked up"
            )
        return Reconciliation.happened(effect_result(first), note=f"{len(found)} effect(s)")

    return hook


# -- the worker ----------------------------------------------------------------------------


def _block_shuffle(ids: list[str], rng: random.Random, block: int = 16) -> list[str]:
    """Shuffle within consecutive blocks: workers stay close to each other and race."""
    out: list[str] = []
    for i in range(0, len(ids), block):
        chunk = ids[i : i + block]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out


class _NoGuard:
    """The negative control: runs ``fn`` on every call and records nothing, so kills and
    races make duplicates that the invariant checks must catch."""

    def execute(self, rid: str, action: str, payload: Any, fn: Callable[[Any], Any]) -> Any:
        ctx = SimpleNamespace(
            request_id=rid, attempt=1, fencing_token=0, downstream_key=f"nokey-{rid}"
        )
        fn(ctx)
        return SimpleNamespace(status=SimpleNamespace(value="SUCCEEDED"), replay=False)

    def close(self) -> None:
        pass


def worker_main(args: dict[str, Any]) -> int:
    """Drive ``args["ids"]`` through a guard; print kill points, settlements and a summary.

    Lines on stdout: ``P <point> <id>`` (a kill point reached), ``H <point> <id>`` (halted
    there as planned: kill me), ``R <id>`` (random-kill trigger), ``S <id> <status>`` (this
    id is settled or in doubt), ``D <json>`` (done).
    """
    _orphan_watchdog(float(args.get("max_lifetime", 3600)))
    plan = args.get("plan") or {}
    plan_point, plan_nth = plan.get("point"), int(plan.get("nth", 0))
    fallback_nth = int(plan.get("fallback", 0))  # a reconcile plan's halt if it never meets one
    halt_max = float(args.get("halt_max", 60))
    where = urllib.parse.urlsplit(args["url"])
    host, port = where.hostname or "127.0.0.1", where.port
    http_timeout = float(args.get("http_timeout", 10))
    pid = os.getpid()
    seen: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    out = sys.stdout

    def emit(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    def point(name: str, rid: str) -> None:
        seen[name] += 1
        emit(f"P {name} {rid}")
        if name == plan_point and seen[name] == plan_nth:
            emit(f"H {name} {rid}")
            time.sleep(halt_max)  # the driver SIGKILLs us here
            os._exit(3)
        if plan_point == "random" and name == "before_claim" and seen[name] == plan_nth:
            emit(f"R {rid}")
        if fallback_nth and name == "before_claim" and seen[name] == fallback_nth:
            emit(f"H {name} {rid}")
            time.sleep(halt_max)
            os._exit(3)

    def fn(ctx: Any) -> dict[str, Any]:
        rid = ctx.request_id
        stats["fn_runs"] += 1
        point("after_claim", rid)
        body = json.dumps(
            {"id": rid, "attempt": ctx.attempt, "token": ctx.fencing_token, "pid": pid}
        )
        conn = http.client.HTTPConnection(host, port, timeout=http_timeout)
        try:
            try:
                conn.request(
                    "POST",
                    "/effects",
                    body,
                    headers={
                        "Idempotency-Key": ctx.downstream_key,
                        "Content-Type": "application/json",
                    },
                )
            except ConnectionRefusedError as exc:
                raise ServiceUnreachableError(str(exc)) from exc
            except OSError as exc:  # part of the request may have left
                raise OutcomeUnsureError(f"sending: {exc!r}") from exc
            point("during_effect", rid)
            try:
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise OutcomeUnsureError(f"no answer: {exc!r}") from exc
        finally:
            conn.close()
        if resp.status == 402:
            raise DeclinedError(f"declined: {data.decode()}")
        if resp.status not in (200, 201):
            raise OutcomeUnsureError(f"HTTP {resp.status}: {data[:200]!r}")
        effect = json.loads(data)
        point("after_effect", rid)
        return effect_result(effect)

    lookup_hook = make_hook(args["url"])

    def hook(req: ReconcileRequest) -> Reconciliation:
        point("in_reconcile", req.request_id)
        return lookup_hook(req)

    actions = {ACTION: ActionPolicy(reconcile=hook)} if args.get("hook") else None
    store = SQLiteStore(args["db"])
    guard: Any = Guard(
        store,
        lease=float(args["lease"]),
        wait=float(args["wait"]),
        outcome_unknown=(OutcomeUnsureError,),
        actions=actions,
    )
    if args.get("unguarded"):
        guard = _NoGuard()
    rng = random.Random(args["seed"])
    todo = deque(_block_shuffle(list(args["ids"]), rng))
    later: list[tuple[float, int, str]] = []
    backoff: dict[str, float] = {}
    seq = 0

    def defer(rid: str, why: str, hint: float = 0.0) -> None:
        nonlocal seq
        stats[why] += 1
        b = min(backoff.get(rid, 0.025) * 2, 0.8)
        backoff[rid] = b
        delay = min(max(hint, b), 1.0) * rng.uniform(0.5, 1.0)
        seq += 1
        heapq.heappush(later, (time.monotonic() + delay, seq, rid))

    try:
        while todo or later:
            now = time.monotonic()
            if later and (later[0][0] <= now or not todo):
                ready, _, rid = later[0]
                if ready > now:
                    time.sleep(ready - now)
                heapq.heappop(later)
            else:
                rid = todo.popleft()
            point("before_claim", rid)
            try:
                receipt = guard.execute(rid, ACTION, {"id": rid}, fn)
            except InProgressError as exc:
                defer(rid, "in_progress", 0.0 if exc.retry_after is None else exc.retry_after / 4)
                continue
            except (ServiceUnreachableError, StoreError, LeaseLostError) as exc:
                stats[type(exc).__name__] += 1
                emit(f"E {rid} {type(exc).__name__}: {str(exc)[:300]}")
                defer(rid, "retried")
                continue
            except (OutcomeUnknownError, OutcomeUnsureError):
                status = "IN_DOUBT"
            except (DeclinedError, ReplayedFailureError):
                status = "FAILED"
            else:
                status = receipt.status.value
                stats["replays" if receipt.replay else "ran"] += 1
            stats[status] += 1
            point("after_complete", rid)
            emit(f"S {rid} {status}")
    finally:
        guard.close()
        store.close()
    emit("D " + json.dumps(dict(stats)))
    return 0


# -- the chaos driver ----------------------------------------------------------------------


@dataclass
class TortureConfig:
    """One torture run. Times in seconds."""

    ids: int = 500
    kills: int = 60
    workers: int = 4
    seed: int = 1
    honours_key: bool = True
    lease: float = 1.0
    wait: float = 0.05
    pre_delay: float = 0.01
    post_delay: float = 0.002
    decline_mod: int = 25
    random_window: float = 0.03
    stall_timeout: float = 60.0
    """Give up when no id was settled for this long (at least 20 leases)."""
    timeout: float = 600.0
    hook_in_workers: bool = False
    """Chaos-phase workers have the reconcile hook too (and can be killed inside it), so
    in-doubt records are reconciled by the next caller, under fire."""
    unguarded: bool = False
    """Negative control: workers call ``fn`` without the guard (duplicates expected)."""
    workdir: str | None = None
    keep_workdir: bool = False


@dataclass
class TortureReport:
    """The figures of one run, and every violated invariant (empty: all held)."""

    variant: str
    ids: int
    workers: int
    seed: int
    lease: float
    kills: int = 0
    kills_by_point: dict[str, int] = field(default_factory=dict)
    random_kills_landed_after: dict[str, int] = field(default_factory=dict)
    effect_made_after_client_killed: int = 0
    worker_launches: int = 0
    worker_errors: list[str] = field(default_factory=list)
    fn_runs: int = 0
    worker_events: dict[str, int] = field(default_factory=dict)
    posts: dict[str, int] = field(default_factory=dict)
    effects: int = 0
    duplicate_ids: int = 0
    duplicate_keys: int = 0
    key_replays_at_service: int = 0
    in_doubt_before_reconcile: int = 0
    status_after_main: dict[str, int] = field(default_factory=dict)
    reconcile: dict[str, int] = field(default_factory=dict)
    in_doubt_after_reconcile: int = 0
    final_status: dict[str, int] = field(default_factory=dict)
    in_doubt_ids: list[str] = field(default_factory=list)
    max_attempt: int = 0
    claims: int = 0
    reconcile_leases: int = 0
    wall_main_s: float = 0.0
    wall_reconcile_s: float = 0.0
    wall_final_s: float = 0.0
    wall_total_s: float = 0.0
    violations: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations and not self.worker_errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class TortureError(RuntimeError):
    """The run could not finish (time bound, or workers failing repeatedly)."""


@dataclass
class _Worker:
    gen: int
    proc: subprocess.Popen[str]
    reader: threading.Thread
    plan: dict[str, Any] | None
    slot: int | None
    err_path: Path
    last_point: str = "start"
    last_rid: str = ""
    killed: bool = False


class ChaosDriver:
    """Runs K workers over shared ids, SIGKILLs them as planned and restarts them."""

    def __init__(self, cfg: TortureConfig, db: Path, url: str, workdir: Path) -> None:
        self.cfg = cfg
        self.db = db
        self.url = url
        self.workdir = workdir
        self.rng = random.Random(cfg.seed)
        self.q: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.live: dict[int, _Worker] = {}
        self.gen = 0
        self.kills_by_point: Counter[str] = Counter()
        self.random_landed: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.fn_runs = 0
        self.launches = 0
        self.errors: list[str] = []
        self.settled: dict[str, str] = {}
        self.kill_log: list[tuple[str, str, int]] = []  # (point, request id, wall ms)
        self.last_errors: deque[str] = deque(maxlen=3)
        self._points: list[str] = []
        # A kill in the reconcile hook needs an in-doubt record met first, and one planned
        # often finds none: it is drawn three times as often as the other points.
        self.points = (*POINTS, *[RECONCILE_POINT] * 3) if cfg.hook_in_workers else POINTS

    # -- plans --------------------------------------------------------------------------

    def _next_point(self) -> str:
        if not self._points:
            self._points = list(self.points)
            self.rng.shuffle(self._points)
        return self._points.pop()

    def _plan(self, remaining: int, kills_left: int, planned: int) -> dict[str, Any] | None:
        """Halt at the n-th occurrence of a point, n drawn so that the kills spread over the
        run: K workers in near lockstep, each killed after ``L`` ids of global progress,
        make a kill every ``L / K`` ids; iteration points occur about once per id of
        progress, ``fn`` points once per ``K``. ``n`` is capped by what the worker will see."""
        if kills_left - planned <= 0:
            return None
        point = self._next_point()
        k = self.cfg.workers
        per_kill = max(1.0, remaining / kills_left)
        mean, cap = (per_kill, remaining / k) if point in FN_POINTS else (per_kill * k, remaining)
        if point == RECONCILE_POINT:  # rare: once per in-doubt record met
            # A worker that meets no in-doubt record would otherwise run to the end without
            # being killed: past ``fallback`` ids it halts before its next claim instead.
            fallback = self.rng.randint(1, max(1, min(round(2 * per_kill * k) - 1, remaining)))
            return {"point": point, "nth": 1, "fallback": fallback}
        nth = self.rng.randint(1, max(1, min(round(2 * mean) - 1, int(cap))))
        return {"point": point, "nth": nth}

    # -- processes ----------------------------------------------------------------------

    def _launch(self, slot: int, ids: list[str], plan: dict[str, Any] | None, hook: bool) -> None:
        self.gen += 1
        gen = self.gen
        args = {
            "db": str(self.db),
            "url": self.url,
            "ids": ids,
            "seed": self.rng.randrange(2**32),
            "plan": plan,
            "lease": self.cfg.lease,
            "wait": self.cfg.wait,
            "hook": hook,
            "unguarded": self.cfg.unguarded,
            "max_lifetime": self.cfg.timeout + 60,
        }
        err_path = self.workdir / "logs" / f"worker-{gen}.err"
        with open(err_path, "wb") as err:
            proc = _spawn(
                "worker",
                args,
                self.workdir / "logs" / f"args-{gen}.json",
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
            )
        reader = threading.Thread(target=self._read, args=(gen, proc), daemon=True)
        self.live[gen] = _Worker(gen, proc, reader, plan, slot, err_path)
        self.launches += 1
        reader.start()

    def _read(self, gen: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self.q.put((gen, line.rstrip("\n")))
        except (OSError, ValueError):  # the pipe was closed under us
            pass
        finally:
            self.q.put((gen, None))

    def _kill(self, w: _Worker, point: str) -> None:
        if w.killed or w.proc.poll() is not None:
            return
        os.kill(w.proc.pid, signal.SIGKILL)
        self.kill_log.append((point, w.last_rid, time.time_ns() // 1_000_000))
        w.proc.wait(timeout=30)
        w.killed = True
        w.slot = None
        self.kills_by_point[point] += 1
        if point == "random":
            self.random_landed[w.last_point] += 1

    def _reap(self, w: _Worker) -> None:
        w.proc.wait(timeout=30)
        w.reader.join(timeout=10)
        if w.proc.stdout is not None:
            w.proc.stdout.close()
        code = w.proc.returncode
        if code != 0 and not (w.killed and code == -signal.SIGKILL):
            tail = ""
            with contextlib.suppress(OSError):
                tail = w.err_path.read_text()[-3000:]
            self.errors.append(f"worker gen {w.gen} exited {code}: {tail}")
        else:
            with contextlib.suppress(OSError):
                if w.err_path.stat().st_size == 0:
                    w.err_path.unlink()
        del self.live[w.gen]

    def kill_all(self) -> None:
        for w in list(self.live.values()):
            _stop(w.proc)
            w.reader.join(timeout=10)
            if w.proc.stdout is not None:
                w.proc.stdout.close()
        self.live.clear()

    # -- the loop -----------------------------------------------------------------------

    def drive(self, ids: list[str], *, kills: int, hook: bool, deadline: float) -> int:
        """Run workers until every id in ``ids`` was reported settled or in doubt; perform
        up to ``kills`` kills on the way. Returns the kills performed."""
        (self.workdir / "logs").mkdir(exist_ok=True)
        order = {rid: i for i, rid in enumerate(ids)}
        remaining = set(ids)
        done_kills = 0
        timers: list[tuple[float, int]] = []  # (when, gen): random kills
        slots: list[int | None] = [None] * self.cfg.workers
        stall = max(self.cfg.stall_timeout, 20 * self.cfg.lease)
        progress_at = time.monotonic()
        while remaining or any(s is not None for s in slots):
            now = time.monotonic()
            if now > deadline or (remaining and now - progress_at > stall):
                why = "time bound hit" if now > deadline else f"no id settled for {stall:.0f} s"
                raise TortureError(
                    f"{why} with {len(remaining)} ids unsettled, {done_kills} kills done; "
                    "last errors met by workers: " + " | ".join(self.last_errors)
                )
            if len(self.errors) > 5:
                raise TortureError("workers keep failing:\n" + "\n".join(self.errors[:3]))
            for i, gen in enumerate(slots):
                if gen is not None and (gen not in self.live or self.live[gen].slot is None):
                    slots[i] = None
            for i, gen in enumerate(slots):
                if gen is None and remaining:
                    planned = sum(1 for w in self.live.values() if w.plan and not w.killed)
                    plan = self._plan(len(remaining), kills - done_kills, planned)
                    todo = sorted(remaining, key=order.__getitem__)
                    self._launch(i, todo, plan, hook)
                    slots[i] = self.gen
            while timers and timers[0][0] <= now:
                _, gen = heapq.heappop(timers)
                w = self.live.get(gen)
                if w is not None and not w.killed:
                    self._kill(w, "random")
                    done_kills += 1
            wait = 0.05 if not timers else max(0.0, min(0.05, timers[0][0] - now))
            try:
                gen, line = self.q.get(timeout=wait)
            except queue.Empty:
                continue
            w = self.live.get(gen)
            if line is None:
                if w is not None:
                    self._reap(w)
                continue
            kind, _, rest = line.partition(" ")
            if kind == "S":
                rid, _, status = rest.partition(" ")
                progress_at = time.monotonic()
                remaining.discard(rid)
                self.settled[rid] = status
                self.events["settled_" + status] += 1
            elif kind == "P":
                name, _, rid = rest.partition(" ")
                self.events[name] += 1
                if name == "after_claim":
                    self.fn_runs += 1
                if w is not None:
                    w.last_point, w.last_rid = name, rid
            elif kind == "H" and w is not None:
                self._kill(w, rest.split(" ", 1)[0])
                done_kills += 1
            elif kind == "R" and w is not None:
                delay = self.rng.uniform(0, self.cfg.random_window)
                heapq.heappush(timers, (time.monotonic() + delay, gen))
            elif kind == "E":
                self.events["error_" + rest.split(" ", 2)[1].rstrip(":")] += 1
                self.last_errors.append(rest)
            elif kind == "D":
                for name, n in json.loads(rest).items():
                    self.events["done_" + name] += n
        return done_kills


# -- invariants ----------------------------------------------------------------------------


def check_invariants(
    ids: list[str],
    receipts: dict[str, Any],
    effects: list[dict[str, Any]],
    posts: Counter[str],
    *,
    honours_key: bool,
    decline_mod: int,
    expect_resolved: bool,
    claims: dict[str, list[Claim]] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Check the run against the service's ledger (and, given ``claims``, the guard's audit
    trail of claims: every effect was made under a claim that was durable before it).
    Returns ``(violations, figures)``."""
    violations: list[str] = []
    by_rid: dict[str, list[dict[str, Any]]] = {}
    by_key: dict[str, list[dict[str, Any]]] = {}
    for e in effects:
        by_rid.setdefault(e["rid"], []).append(e)
        by_key.setdefault(e["key"], []).append(e)
    known = set(ids)

    def bad(kind: str, items: list[str]) -> None:
        if items:
            shown = ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
            violations.append(f"{kind} ({len(items)}): {shown}")

    dup_ids = sorted(rid for rid, es in by_rid.items() if len(es) > 1)
    dup_keys = sorted(k for k, es in by_key.items() if len(es) > 1)
    bad(
        "DUPLICATE EFFECT: request id with more than one effect",
        [f"{rid} effects={[e['effect_id'] for e in by_rid[rid]]}" for rid in dup_ids],
    )
    bad("DUPLICATE EFFECT: key with more than one effect", dup_keys)
    bad("effects for unknown request ids", sorted(set(by_rid) - known))
    key_replays = posts.get("replayed", 0) if honours_key else 0
    if key_replays:
        violations.append(
            f"AT-MOST-ONCE broken: {key_replays} POST(s) reused a key the service had already "
            "seen (fn ran twice; the key-honouring service masked the duplicate)"
        )

    lost, unsettled, wrong = [], [], []
    status_count: Counter[str] = Counter()
    in_doubt: list[str] = []
    max_attempt = 0
    for rid in ids:
        r = receipts.get(rid)
        if r is None:
            lost.append(rid)
            continue
        max_attempt = max(max_attempt, r.attempt)
        status = r.status.value
        status_count[status] += 1
        es = by_rid.get(rid, [])
        if status == "IN_DOUBT":
            in_doubt.append(rid)
            if len(es) > 1:
                wrong.append(f"{rid}: in doubt with {len(es)} effects")
            continue
        if status not in SETTLED:
            unsettled.append(f"{rid}={status}")
            continue
        if len(es) != 1:
            wrong.append(f"{rid}: {status} but the service has {len(es)} effects")
            continue
        e = es[0]
        if e["key"] != r.downstream_key:
            wrong.append(f"{rid}: effect key {e['key']} != receipt key {r.downstream_key}")
        declined = is_declined(rid, decline_mod)
        if status == "SUCCEEDED":
            if declined or e["status"] != "ok" or r.result != effect_result(e):
                wrong.append(f"{rid}: SUCCEEDED with result {r.result} but effect {e}")
        elif (
            not declined
            or e["status"] != "declined"
            or r.error is None
            or (r.error.type != DECLINED_TYPE)
        ):
            wrong.append(f"{rid}: FAILED ({r.error}) but effect {e}")
    bad("LOST: request id without a record", lost)
    bad("not settled and not in doubt", unsettled)
    bad("receipt disagrees with the service's ledger", wrong)
    if claims is not None:
        claims_n, leases_n = _check_claims(ids, receipts, effects, claims, bad)
    else:
        claims_n = leases_n = 0
    if expect_resolved:
        bad("still in doubt after reconcile", in_doubt)
        bad("without exactly one effect", [rid for rid in ids if len(by_rid.get(rid, [])) != 1])
    figures = {
        "effects": len(effects),
        "duplicate_ids": len(dup_ids),
        "duplicate_keys": len(dup_keys),
        "key_replays_at_service": key_replays,
        "final_status": dict(status_count),
        "in_doubt_ids": in_doubt,
        "max_attempt": max_attempt,
        "claims": claims_n,
        "reconcile_leases": leases_n,
    }
    return violations, figures


@dataclass(frozen=True)
class Claim:
    """A ``claimed`` audit event: a claim (``reconcile=False``) or a reconcile lease."""

    token: int
    attempt: int
    reconcile: bool
    at_ms: int


def read_claims(db: Path) -> dict[str, list[Claim]]:
    """The ``claimed`` audit events of the guard's database, per request id, in order."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT subject, fencing_token, detail, at_ms FROM audit_events"
            " WHERE kind = 'claimed' ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, list[Claim]] = {}
    for subject, token, detail, at_ms in rows:
        d = json.loads(detail)
        out.setdefault(subject, []).append(
            Claim(int(token), int(d.get("attempt", 0)), bool(d.get("reconcile")), int(at_ms))
        )
    return out


def _check_claims(
    ids: list[str],
    receipts: dict[str, Any],
    effects: list[dict[str, Any]],
    claims: dict[str, list[Claim]],
    bad: Callable[[str, list[str]], None],
) -> tuple[int, int]:
    """Claims against effects: the claim is durable before ``fn`` starts (DESIGN 2), one
    claim per attempt, fencing tokens only grow. Returns ``(claims, reconcile leases)``."""
    unclaimed, numbering = [], []
    for e in effects:
        under = [
            c
            for c in claims.get(e["rid"], [])
            if not c.reconcile and c.token == e["token"] and c.attempt == e["attempt"]
        ]
        if len(under) != 1 or under[0].at_ms > e["at_ms"]:
            unclaimed.append(f"effect {e['effect_id']} of {e['rid']} (token {e['token']})")
    n_claims = n_leases = 0
    for rid in ids:
        cs = claims.get(rid, [])
        own = [c.attempt for c in cs if not c.reconcile]
        n_claims += len(own)
        n_leases += len(cs) - len(own)
        tokens = [c.token for c in cs]
        r = receipts.get(rid)
        final = 0 if r is None else r.attempt
        if own != list(range(1, final + 1)) or tokens != sorted(set(tokens)):
            numbering.append(f"{rid}: attempts {own}, tokens {tokens}, final attempt {final}")
    bad("effect without a durable claim made before it", unclaimed)
    bad("claims out of order (attempts not 1..n, or a fencing token reused)", numbering)
    return n_claims, n_leases


def _statuses(db: Path, ids: list[str]) -> dict[str, Any]:
    store = SQLiteStore(db)
    try:
        with Guard(store) as guard:
            return {rid: guard.get(rid) for rid in ids}
    finally:
        store.close()


@contextlib.contextmanager
def _workdir(cfg: TortureConfig) -> Iterator[Path]:
    if cfg.workdir or cfg.keep_workdir:
        path = Path(cfg.workdir or tempfile.mkdtemp(prefix="sa-torture-"))
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sa-torture-", ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)


def run_torture(cfg: TortureConfig) -> TortureReport:
    """One full run: chaos phase, reconcile pass, final drive, invariant checks."""
    report = TortureReport(
        variant=("honours-key" if cfg.honours_key else "ignores-key")
        + ("+hook" if cfg.hook_in_workers else "")
        + ("+UNGUARDED" if cfg.unguarded else ""),
        ids=cfg.ids,
        workers=cfg.workers,
        seed=cfg.seed,
        lease=cfg.lease,
    )
    ids = request_ids(cfg.ids)
    t0 = time.monotonic()
    deadline = t0 + cfg.timeout
    with _workdir(cfg) as workdir:
        report.workdir = str(workdir)
        db = workdir / "guard.db"
        SQLiteStore(db).close()  # the schema exists before any worker can be killed
        service = EffectService(
            workdir,
            honours_key=cfg.honours_key,
            pre_delay=cfg.pre_delay,
            post_delay=cfg.post_delay,
            decline_mod=cfg.decline_mod,
            max_lifetime=cfg.timeout + 120,
        )
        driver: ChaosDriver | None = None
        try:
            service.start()
            driver = ChaosDriver(cfg, db, service.url, workdir)
            report.kills = driver.drive(
                ids, kills=cfg.kills, hook=cfg.hook_in_workers, deadline=deadline
            )
            t1 = time.monotonic()
            after_main = _statuses(db, ids)
            report.status_after_main = dict(
                Counter("ABSENT" if r is None else r.status.value for r in after_main.values())
            )
            report.in_doubt_before_reconcile = report.status_after_main.get("IN_DOUBT", 0)

            store = SQLiteStore(db)
            try:
                with Guard(
                    store,
                    lease=cfg.lease,
                    actions={ACTION: ActionPolicy(reconcile=make_hook(service.url))},
                ) as guard:
                    rec = guard.reconcile()
                    report.in_doubt_after_reconcile = len(guard.in_doubt())
            finally:
                store.close()
            report.reconcile = {
                k: getattr(rec, k)
                for k in ("checked", "happened", "failed", "not_happened", "unknown", "skipped")
            }
            t2 = time.monotonic()
            after_rec = _statuses(db, ids)
            todo = [
                rid for rid, r in after_rec.items() if r is None or r.status.value not in SETTLED
            ]
            if todo:
                driver.drive(todo, kills=0, hook=True, deadline=deadline)
            t3 = time.monotonic()
            receipts = _statuses(db, ids)
        finally:
            if driver is not None:
                driver.kill_all()
            service.stop()
        effects, posts = service.ledger()
        claims = read_claims(db)
        violations, figures = check_invariants(
            ids,
            receipts,
            effects,
            posts,
            honours_key=cfg.honours_key,
            decline_mod=cfg.decline_mod,
            expect_resolved=True,
            claims=claims,
        )
        report.violations = violations
        for name, value in figures.items():
            setattr(report, name, value)
        report.posts = dict(posts)
        report.kills_by_point = {p: driver.kills_by_point.get(p, 0) for p in driver.points}
        report.random_kills_landed_after = dict(driver.random_landed)
        first_effect_ms: dict[str, int] = {}
        for e in effects:
            first_effect_ms.setdefault(e["rid"], e["at_ms"])
        report.effect_made_after_client_killed = sum(
            1
            for point, rid, ms in driver.kill_log
            if point == "during_effect" and first_effect_ms.get(rid, 0) > ms
        )
        report.worker_launches = driver.launches
        report.worker_errors = driver.errors
        report.fn_runs = driver.fn_runs
        report.worker_events = dict(sorted(driver.events.items()))
        report.wall_main_s = round(t1 - t0, 2)
        report.wall_reconcile_s = round(t2 - t1, 2)
        report.wall_final_s = round(t3 - t2, 2)
        report.wall_total_s = round(time.monotonic() - t0, 2)
    return report


def _pair(*values: Any) -> str:
    return " / ".join(str(v) for v in values)


def format_report(reports: list[TortureReport]) -> str:
    """The figures as a plain table, one column per run."""
    rows: list[tuple[str, Callable[[TortureReport], Any]]] = [
        ("service", lambda r: r.variant),
        ("ids", lambda r: r.ids),
        ("workers / lease s", lambda r: _pair(r.workers, r.lease)),
        ("seed", lambda r: r.seed),
        ("kills", lambda r: r.kills),
        *[
            (f"  at {p}", lambda r, p=p: r.kills_by_point.get(p, "-"))
            for p in (*POINTS, RECONCILE_POINT)
        ],
        ("  effect landed after death", lambda r: r.effect_made_after_client_killed),
        ("worker launches", lambda r: r.worker_launches),
        ("fn runs", lambda r: r.fn_runs),
        (
            "POSTs created / replayed / rejected",
            lambda r: _pair(*(r.posts.get(k, 0) for k in ("created", "replayed", "rejected"))),
        ),
        ("effects", lambda r: r.effects),
        ("DUPLICATES ids / keys", lambda r: _pair(r.duplicate_ids, r.duplicate_keys)),
        ("key replays at service", lambda r: r.key_replays_at_service),
        ("in doubt before reconcile", lambda r: r.in_doubt_before_reconcile),
        (
            "reconcile happened / failed / not / unknown",
            lambda r: _pair(
                *(r.reconcile.get(k, 0) for k in ("happened", "failed", "not_happened", "unknown"))
            ),
        ),
        ("in doubt after reconcile", lambda r: r.in_doubt_after_reconcile),
        (
            "final SUCCEEDED / FAILED / IN_DOUBT",
            lambda r: _pair(
                *(r.final_status.get(s, 0) for s in ("SUCCEEDED", "FAILED", "IN_DOUBT"))
            ),
        ),
        ("claims / reconcile leases", lambda r: _pair(r.claims, r.reconcile_leases)),
        ("max attempt", lambda r: r.max_attempt),
        (
            "wall main / reconcile / final s",
            lambda r: _pair(r.wall_main_s, r.wall_reconcile_s, r.wall_final_s),
        ),
        ("wall total s", lambda r: r.wall_total_s),
        (
            "errors met by workers (retried)",
            lambda r: (
                ", ".join(
                    f"{k[6:]} {n}" for k, n in r.worker_events.items() if k.startswith("error_")
                )
                or "none"
            ),
        ),
        ("worker crashes", lambda r: len(r.worker_errors)),
        ("violations", lambda r: len(r.violations)),
        ("RESULT", lambda r: "OK" if r.ok else "FAIL"),
    ]
    cells = [[label, *(str(get(r)) for r in reports)] for label, get in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    for r in reports:
        lines.extend(f"[{r.variant}] violation: {v}" for v in r.violations)
        lines.extend(f"[{r.variant}] worker error: {e[:500]}" for e in r.worker_errors)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    command, args_path = argv
    args = json.loads(Path(args_path).read_text())
    if command == "serve":
        return serve_main(args)
    if command == "worker":
        Path(args_path).unlink()  # one per launch: thousands in a long run
        return worker_main(args)
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    # Re-import under the package name, so exception types are named
    # ``tests.torture_harness.*`` (not ``__main__.*``) in stored receipts.
    from tests.torture_harness import main as _main

    sys.exit(_main(sys.argv[1:]))
