"""Faults a review found in the round-8 hot-path speed-ups, and what it checked held.

Each fast construction must fail as the plain one did: a signal handler's guarded call
inside the heartbeat lock, a redact hook's cyclic detail under a raised recursion limit,
a corrupt or missing chain head (StoreError, nothing written, fn not run), Ctrl-C
inside the hash, receipts of a Receipt subclass. The last test runs the release before
those speed-ups (a4039f0, taken from git) and this one on one database file at once: the
trail they write together must verify.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from safeagent import Guard, SQLiteStore, StoreError
from safeagent._audit import AuditEvent, EventKind
from safeagent._receipt import ErrorInfo, Receipt, Record, Status
from safeagent.audit import verify
from safeagent.stores import sqlite as sqlite_module
from safeagent.stores._rows import _chain_body, _dumps, chain_hash, event_row, shard_of

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
BASE = "a4039f0"  # the release before the round-8 speed-ups


def _run_child(script: str, *args: str, pythonpath: Path = SRC, timeout: float = 60) -> Any:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT),
        check=False,
    )


# -- faults --------------------------------------------------------------------------------


_SIGNAL_IN_HEARTBEAT_LOCK = """
import signal, sys, linecache
from safeagent import Guard, SQLiteStore

guard = Guard(SQLiteStore(sys.argv[1]))
seen = []

def handler(_sig, _frame):
    # A signal handler that runs a guarded call of its own (a graceful-shutdown hook
    # recording a cancellation, say), on the same store and so the same heartbeat thread.
    seen.append(guard.execute("from-handler", "act", {}, lambda _ctx: 2).result)

signal.signal(signal.SIGUSR1, handler)
fired = []

def local(frame, event, _arg):
    # The signal arrives while the main thread is inside the heartbeat's critical section
    # (adding or discarding its beat): the handler then runs on top of it.
    if event == "line" and not fired and frame.f_code.co_name != "_loop":
        if sys.argv[2] in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
            fired.append(1)
            signal.raise_signal(signal.SIGUSR1)
    return local

sys.settrace(lambda f, e, a: local if f.f_code.co_filename.endswith("_runtime.py") else None)
result = guard.execute("main", "act", {}, lambda _ctx: 1).result
sys.settrace(None)
print("main", result, "handler", seen, "fired", len(fired))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("window", ["beats.add(", "beats.discard("])
def test_a_guarded_call_from_a_signal_handler_inside_the_heartbeat_lock_does_not_deadlock(
    window: str, tmp_path: Path
) -> None:
    """659d2bc made the heartbeat's lock a plain Lock (it was the RLock under a default
    Condition), and _Beating.__enter__/__exit__ take it directly. A signal handler that runs
    a guarded call while the main thread holds it (inside ``with beater.lock:``) now blocks
    forever on a lock its own thread holds: the process hangs, and the store's heartbeat
    thread, which needs the same lock, stops renewing every lease of that store, so other
    threads' live claims expire and read as in doubt. The release before ran the handler's
    call to completion (the store itself refuses a re-entrant write with a StoreError
    rather than hang: tests/test_sqlite_store.py)."""
    out = None
    with contextlib.suppress(subprocess.TimeoutExpired):
        out = _run_child(_SIGNAL_IN_HEARTBEAT_LOCK, str(tmp_path / "sig.db"), window, timeout=15)
    assert out is not None, (
        "deadlock: the signal handler's guarded call waits forever for the heartbeat "
        "lock its own thread holds (threading.Lock is not re-entrant)"
    )
    assert out.returncode == 0, out.stderr
    assert "main 1 handler [2] fired 1" in out.stdout, out.stdout + out.stderr


_CYCLIC_DETAIL = """
import sys
sys.setrecursionlimit(100_000)  # many applications raise it; the default is 1000
from safeagent import Guard

def redact(value):
    out = {"value": value}
    out["self"] = out  # a buggy redaction hook: a cyclic value
    return out

guard = Guard(sys.argv[1], redact=redact)
ran = []
try:
    guard.execute("r1", "charge", {"amount": 5}, lambda _ctx: ran.append(1))
except Exception as exc:
    print("raised", type(exc).__name__, exc)
print("ran", ran)
"""


def test_a_cyclic_audit_detail_fails_cleanly_under_a_raised_recursion_limit(
    tmp_path: Path,
) -> None:
    """d5a4272 encodes event details with a C encoder built with markers=None (no
    circular-reference check) and relies on a cycle ending in RecursionError. That holds
    only while the recursion limit fits the C stack: with sys.setrecursionlimit(100_000)
    (or the default limit in a thread with a small stack, e.g. threading.stack_size(64 KiB))
    the C encoder recurses until the process dies with SIGSEGV. The release before raised
    ValueError("Circular reference detected") and the claim was not written (fn did not
    run); now the whole process crashes."""
    out = _run_child(_CYCLIC_DETAIL, str(tmp_path / "cyc.db"))
    assert out.returncode == 0, f"the process crashed (returncode {out.returncode})"
    assert "raised ValueError Circular reference detected" in out.stdout
    assert "ran []" in out.stdout


def _corrupt_head(path: Path, request_id: str, sql: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql, (shard_of("default", request_id),))
    finally:
        conn.close()


def test_a_corrupt_chain_head_fails_the_claim_with_store_error(tmp_path: Path) -> None:
    """2e8992b reads the chain head into Python and hashes there, so a head that is not
    text (here a BLOB) raises TypeError out of Guard.execute instead of the documented
    StoreError ("the store failed; before fn started, fn did not run"), which callers
    catch to back off. Before, the hash ran inside the INSERT and any error there became
    a StoreError. (A head whose seq is non-numeric text now raises TypeError too; the
    release before wrote on through SQLite's own arithmetic, so that one is no regression.)"""
    path = tmp_path / "corrupt.db"
    store = SQLiteStore(path)
    guard = Guard(store)
    _corrupt_head(path, "r1", "UPDATE audit_chain SET head = X'00ff' WHERE shard = ?")
    ran: list[int] = []
    with pytest.raises(StoreError):
        guard.execute("r1", "a", {}, lambda _ctx: ran.append(1))
    assert ran == []
    assert store.get("default", "r1")[0] is None
    store.close()


def test_ctrl_c_in_fn_is_re_raised_when_a_corrupt_chain_head_fails_the_completion(
    tmp_path: Path,
) -> None:
    """store_completion re-raises the KeyboardInterrupt fn raised when the completion
    write fails with StoreError ("never swallow KeyboardInterrupt / SystemExit"). With the
    hash computed in Python (2e8992b), a corrupt head makes that write raise TypeError,
    which is not caught there: the caller's Ctrl-C turns into a TypeError. The release
    before re-raised the KeyboardInterrupt."""
    path = tmp_path / "ctrl-c.db"
    store = SQLiteStore(path)
    guard = Guard(store)

    def fn(_ctx: Any) -> None:
        _corrupt_head(path, "r1", "UPDATE audit_chain SET head = X'00ff' WHERE shard = ?")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guard.execute("r1", "a", {}, fn)
    record, _ = store.get("default", "r1")
    assert record is not None
    assert record.status is Status.PENDING
    store.close()


def _record(result_json: str | None = '{"ok":true}') -> Record:
    return Record(
        "default", "r-1", "charge", "f" * 64, Status.SUCCEEDED, '{"a":1}', result_json,
        None, "e" * 32, 1, 1, "host:1:main", 10, "sa1-x", 1, 1, 2, 2,
    )  # fmt: skip


def test_from_record_on_a_dataclass_subclass_builds_a_whole_receipt() -> None:
    """Receipt.from_record is a public classmethod that built ``cls(...)``; 659d2bc builds
    ``object.__new__(cls)`` and sets Receipt's own 21 slots only. On a subclass that adds
    a field (with a default), the field is never set and __post_init__ never runs: the
    object it returns fails on repr, ==, and on reading the field (AttributeError)."""

    @dataclasses.dataclass(frozen=True, slots=True)
    class TaggedReceipt(Receipt):
        tag: str = "none"

    receipt = TaggedReceipt.from_record(_record(), replay=True)
    assert isinstance(receipt, TaggedReceipt)
    assert receipt.tag == "none"
    assert receipt.result == {"ok": True}
    assert receipt == dataclasses.replace(receipt)


# -- properties that held ------------------------------------------------------------------


def test_a_missing_chain_head_fails_closed_single_and_batched(tmp_path: Path) -> None:
    """The single-event path (read the head, hash, insert) writes nothing when the head
    row is gone: the claim fails with StoreError and fn does not run; other shards go on.
    A batch of buffered events meeting a missing head is kept, not written."""
    path = tmp_path / "nohead.db"
    store = SQLiteStore(path)
    guard = Guard(store)
    _corrupt_head(path, "r1", "DELETE FROM audit_chain WHERE shard = ?")
    ran: list[str] = []
    with pytest.raises(StoreError, match="chain head missing"):
        guard.execute("r1", "a", {}, lambda _ctx: ran.append("r1"))
    other = next(
        f"o{n}" for n in range(100) if shard_of("default", f"o{n}") != shard_of("default", "r1")
    )
    assert guard.execute(other, "a", {}, lambda _ctx: ran.append(other) or 1).result == 1  # type: ignore[func-returns-value]
    assert ran == [other]
    assert store.get("default", "r1")[0] is None
    conn = sqlite3.connect(path)
    kinds = [row[0] for row in conn.execute("SELECT subject FROM audit_events")]
    conn.close()
    assert kinds == [other, other]
    store.close()


@pytest.mark.parametrize("which", [1, 2])
def test_ctrl_c_inside_the_hash_writes_nothing_and_leaves_the_store_usable(
    which: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt raised while hashing the claim's event (1): nothing written, fn
    not run; while hashing the completion's (2): the claim stays PENDING. Either way the
    interrupt reaches the caller as is, the next call works and the trail verifies."""
    store = SQLiteStore(tmp_path / "ki.db")
    guard = Guard(store)
    real = sqlite_module.chain_hash  # type: ignore[attr-defined]
    calls = [0]

    def interrupted(*args: Any) -> str:
        calls[0] += 1
        if calls[0] == which:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sqlite_module, "chain_hash", interrupted)
    ran: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        guard.execute("r1", "a", {}, lambda _ctx: ran.append(1))
    monkeypatch.setattr(sqlite_module, "chain_hash", real)
    record, _ = store.get("default", "r1")
    if which == 1:
        assert ran == []
        assert record is None
    else:
        assert ran == [1]
        assert record is not None
        assert record.status is Status.PENDING
    assert guard.execute("r2", "a", {}, lambda _ctx: 2).result == 2
    assert verify(store).ok
    store.close()


def test_receipts_from_records_copy_pickle_and_compare_as_constructed_ones() -> None:
    record = _record('[1,{"b":2.5},"\\u00e9"]')
    receipt = Receipt.from_record(record, replay=True)
    built = Receipt(**{f.name: getattr(receipt, f.name) for f in dataclasses.fields(Receipt)})
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(receipt, protocol)) == built
    assert copy.copy(receipt) == built
    deep = copy.deepcopy(receipt)
    assert deep == built
    assert deep.result is not receipt.result
    assert dataclasses.asdict(receipt) == dataclasses.asdict(built)
    assert dataclasses.replace(receipt, replay=False) == dataclasses.replace(built, replay=False)
    hashable = Receipt.from_record(_record('"x"'), replay=False)
    assert hash(hashable) == hash(dataclasses.replace(hashable))
    in_doubt = dataclasses.replace(record, status=Status.IN_DOUBT, error=ErrorInfo("T", "m"))
    assert Receipt.from_record(in_doubt, replay=False).attempt_owner == "host:1:main"


def test_the_prebuilt_encoders_are_safe_across_threads() -> None:
    """Sixteen threads encode details (with values only str() writes, whose __str__ lets
    other threads run) while the interpreter switches threads as often as it can: each
    row and hash equals what the plain encoders give."""

    class Slow:
        def __init__(self, n: int) -> None:
            self.n = n

        def __str__(self) -> str:
            os.sched_yield() if hasattr(os, "sched_yield") else None
            return f"slow{self.n}\u00e9\ud800"

    bad: list[Any] = []

    def work(t: int) -> None:
        for i in range(300):
            detail = {"t": t, "x": [Slow(i), {"k": Slow(t), "f": i / 7}], str(t): (1, (2, Slow(0)))}
            row = event_row(AuditEvent(EventKind.SIGNAL, i + 1, f"n{t}", "s", detail=detail))
            body = _chain_body(["p" * 64, t % 16, i, *row]).encode("ascii")
            if row[8] != _dumps(detail) or chain_hash("p" * 64, t % 16, i, row) != (
                hashlib.sha256(body).hexdigest()
            ):
                bad.append((t, i))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert bad == []


_MIXED_WORKER = """
import sys, threading
from safeagent import Guard, NotExecuted, SQLiteStore
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = SQLiteStore(path, busy_timeout=30)
guard = Guard(store)

def work(t):
    for i in range(n):
        def fn(_ctx, i=i):
            if i % 7 == 3:
                raise NotExecuted("later")
            if i % 11 == 5:
                raise ValueError("boom \\u00e9")
            return {"tag": tag, "i": i, "card": "4242 4242 4242 4242", "f": 1.5}
        try:  # shared ids: claims, replays (buffered, batched), conflicts, releases
            guard.execute(f"r{i % 30}", "act", {"x": i % 30, "email": "a@b.cc"}, fn, wait=5)
        except Exception:
            pass

threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
store.close()
print(tag, "done")
"""


@pytest.mark.slow
def test_old_and_new_releases_interleave_on_one_file_and_the_trail_verifies(
    tmp_path: Path,
) -> None:
    """Processes of the release before (which hash a single event inside its INSERT
    through their own SQL function) and of this one (which hash in Python after reading
    the head) append to the same chains at once: verify, by either release, reports ok."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is needed to extract the previous release")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(
        [git, "-C", str(ROOT), "archive", BASE, "src"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BASE} is not available")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    db = tmp_path / "mixed.db"
    SQLiteStore(db).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIXED_WORKER, str(db), f"{which}{n}", "120"],
            env={**os.environ, "PYTHONPATH": str(old / "src" if which == "old" else SRC)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for which in ("old", "new")
        for n in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "done" in out
    store = SQLiteStore(db)
    report = verify(store)
    assert report.ok, report.problems
    assert report.events_checked > 100
    store.close()
    check = (
        "import sys; from safeagent import SQLiteStore; from safeagent.audit import verify;"
        " r = verify(SQLiteStore(sys.argv[1])); print('ok', r.ok)"
    )
    out = _run_child(check, str(db), pythonpath=old / "src")
    assert "ok True" in out.stdout, out.stderr
