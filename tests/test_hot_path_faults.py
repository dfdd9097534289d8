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
from safeagent.stores import _rows as rows_module
from safeagent.stores._rows import (
    CHAIN_SHARDS,
    _chain_body,
    _dumps,
    chain_hash,
    event_row,
    shard_of,
)

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
        conn.execute(sql, (shard_of("default", request_id, CHAIN_SHARDS),))
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
        f"o{n}"
        for n in range(100)
        if shard_of("default", f"o{n}", CHAIN_SHARDS) != shard_of("default", "r1", CHAIN_SHARDS)
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
    real = rows_module.chain_hash  # what the store's chain_rows calls
    calls = [0]

    def interrupted(*args: Any) -> str:
        calls[0] += 1
        if calls[0] == which:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(rows_module, "chain_hash", interrupted)
    ran: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        guard.execute("r1", "a", {}, lambda _ctx: ran.append(1))
    monkeypatch.setattr(rows_module, "chain_hash", real)
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


def _skip_or_fail_in_ci(reason: str) -> None:
    """Outside CI a checkout without history may skip this test; CI must run it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


@pytest.mark.slow
def test_old_and_new_releases_interleave_on_one_file_and_the_trail_verifies(
    tmp_path: Path,
) -> None:
    """Processes of the release before (which hash a single event inside its INSERT
    through their own SQL function) and of this one (which hash in Python after reading
    the head) append to the same chains at once: verify, by either release, reports ok."""
    git = shutil.which("git")
    if git is None:
        _skip_or_fail_in_ci("git is needed to extract the previous release")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(
        [git, "-C", str(ROOT), "archive", BASE, "src"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        _skip_or_fail_in_ci(f"commit {BASE} is not available (a shallow clone?)")
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


# -- a second review of b8dea3d ------------------------------------------------------------
# Faults first (each names whether the release before, a4039f0, had it), then what held.


def _head_of(path: Path, request_id: str) -> tuple[Any, Any]:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT seq, head FROM audit_chain WHERE shard = ?",
            (shard_of("default", request_id, CHAIN_SHARDS),),
        ).fetchone()
    finally:
        conn.close()
    return row[0], row[1]


def _events_on_shard(path: Path, request_id: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT id, kind, subject, seq FROM audit_events WHERE shard = ? ORDER BY id",
            (shard_of("default", request_id, CHAIN_SHARDS),),
        ).fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("seq", ["9223372036854775807", "2.5"], ids=["int64-max", "real"])
@pytest.mark.parametrize("path_kind", ["claim", "replay-flush"])
def test_a_chain_head_seq_out_of_range_or_fractional_is_a_store_error(
    seq: str, path_kind: str, tmp_path: Path
) -> None:
    """_corrupt_head catches TypeError/ValueError around ``head[0] + 1`` and chain_hash
    only. A head seq SQLite stores as INTEGER 2**63-1 passes both, and the INSERT then
    raises OverflowError ("Python int too large to convert to SQLite INTEGER"), which is
    no sqlite3.Error: it leaves Guard.execute as is (a claim), and out of a replay, since
    _maybe_flush suppresses only StoreError (the buffer is put back, so every later write
    of the store, on any shard, raises it again). a4039f0 computed ``c.seq + 1`` in SQL,
    which overflows to REAL: it wrote (the claim path is a regression; the batched path
    raised OverflowError before too). A REAL seq (2.5) is a head of the wrong type as well,
    but it is extended silently, old release and new: events with seq 3.5, 4.5 ... that
    verify can only report as unchained. Either way the head is unusable: StoreError,
    nothing written, fn not run, the replay still answered."""
    path = tmp_path / "seq.db"
    store = SQLiteStore(path)
    guard = Guard(store)
    if path_kind == "replay-flush":
        assert guard.execute("r1", "a", {}, lambda _ctx: 1).result == 1
    before = _events_on_shard(path, "r1")
    _corrupt_head(path, "r1", f"UPDATE audit_chain SET seq = {seq} WHERE shard = ?")
    ran: list[int] = []
    if path_kind == "claim":
        with pytest.raises(StoreError):
            guard.execute("r1", "a", {}, lambda _ctx: ran.append(1))
        assert ran == []
        assert store.get("default", "r1")[0] is None
    else:
        store._buffer.max_events = 2  # the second replay flushes both: the batched path
        for _ in range(2):
            receipt = guard.execute("r1", "a", {}, lambda _ctx: ran.append(1))
            assert receipt.replay
            assert receipt.result == 1
        assert ran == []
        assert len(store._buffer._events) == 2  # kept for a later write, not lost
    assert _events_on_shard(path, "r1") == before
    store._buffer.take()  # nothing left for close() to try
    store.close()


def test_a_replay_of_a_result_stored_as_a_blob_returns_it_as_before(tmp_path: Path) -> None:
    """d5a4272 decodes a stored result with ``json.JSONDecoder().decode`` ("json.loads
    without its checks"). One of those checks is the type: json.loads takes bytes, decode
    does not. A result column holding a BLOB (a row written by another tool, or cast by
    hand) now fails the replay with a bare TypeError from the decoder's regex ("cannot
    use a string pattern on a bytes-like object") out of Guard.execute; a4039f0 returned
    the stored result. Fix: ``_decode(text) if type(text) is str else json.loads(text)``."""
    path = tmp_path / "blob.db"
    store = SQLiteStore(path)
    guard = Guard(store)
    assert guard.execute("r1", "a", {}, lambda _ctx: {"x": 1}).result == {"x": 1}
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE executions SET result = CAST(result AS BLOB)")
    conn.close()
    receipt = guard.execute("r1", "a", {}, lambda _ctx: {"x": 2})
    assert receipt.replay
    assert receipt.result == {"x": 1}
    store.close()


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_events SET at_ms = CAST(at_ms AS BLOB) WHERE id = 1",
        "UPDATE audit_events SET detail = CAST(detail AS BLOB) WHERE id = 2",
        "UPDATE audit_events SET actor = X'ff' WHERE id = 1",
        "UPDATE executions SET result = CAST(result AS BLOB)",
    ],
    ids=["event-at_ms", "event-detail", "event-actor", "record-result"],
)
def test_verify_reports_a_blob_written_into_the_trail_instead_of_raising(
    sql: str, tmp_path: Path
) -> None:
    """verify re-hashes each chained row with chain_hash: a BLOB in any hashed column (a
    hand edit in the sqlite3 shell, CAST(... AS BLOB)) is not one of the flat types, goes
    to the checked encoder and raises TypeError ("Object of type bytes is not JSON
    serializable") out of verify, whose only documented error is ConfigurationError; a
    BLOB result raises from outcome_digest the same way. Whoever can edit the file thus
    turns verification into a crash that reports none of the other problems. The same on
    PostgreSQL after ALTER COLUMN ... TYPE numeric / bytea / jsonb (Decimal, bytes,
    dict). Not a regression: a4039f0 raised the same. Fix: in _check_chains, a row whose
    hashed fields are not all str/int/float/None is "edited" (catch TypeError/ValueError
    around chain_hash), and the receipt check compares only str outcomes."""
    path = tmp_path / "blobtrail.db"
    store = SQLiteStore(path)
    guard = Guard(store)
    guard.execute("r1", "a", {}, lambda _ctx: {"x": 1})
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(sql)
    conn.close()
    report = verify(store)
    assert not report.ok
    assert report.problems
    store.close()


def test_a_str_enum_namespace_writes_a_trail_that_verifies(tmp_path: Path) -> None:
    """Names are checked with isinstance(value, str), so a ``class Tenant(str, Enum)``
    member is accepted as a namespace (and a request id), and stored as its value. But
    shard_of builds its key with an f-string, which formats the member as "Tenant.ACME"
    on Python 3.11+ (as str() does, not the value), while verify recomputes the shard from the
    stored value: the events land in another chain than verify expects, and a clean trail
    reports ``unchained_event`` for each and ``receipt_edited`` for the record. The
    chain text itself is right (the checked encoder writes the value, as SQLite stores it).
    Not a regression (shard_of is unchanged since a4039f0). Fix: shard_of concatenates
    (``namespace + "\\x00" + subject``, which uses the characters, not __str__/__format__),
    or check_name / check_request_id return ``str.__str__(value)`` for a subclass."""
    import enum

    class Tenant(str, enum.Enum):
        ACME = "acme"

    store = SQLiteStore(tmp_path / "enum.db")
    guard = Guard(store)
    assert guard.execute("r1", "a", {}, lambda _ctx: 1, namespace=Tenant.ACME).result == 1
    assert guard.execute("r1", "a", {}, lambda _ctx: 2, namespace="acme").replay
    report = verify(store)
    assert report.ok, [p.kind for p in report.problems]
    store.close()


class _Spelled(str):
    """A str subclass whose __str__ and __format__ say something other than its
    characters, as a ``(str, Enum)`` member's do ("Tenant.ACME" for "acme")."""

    def __str__(self) -> str:
        return "NOT-" + str.__str__(self)

    def __format__(self, spec: str) -> str:
        return "NOT-" + str.__str__(self)


def test_every_name_of_a_str_subclass_is_kept_as_its_characters(store: Any) -> None:
    """The whole class of the str-Enum fault above: a request id, action and namespace
    given as str subclasses reach the store, the keys, the chain text and the receipt as
    plain str of their characters, on every store, so a retry spelled with plain str
    replays, the trail verifies and no "NOT-" spelling is stored anywhere."""
    guard = Guard(store)
    first = guard.execute(
        _Spelled("r1"), _Spelled("charge"), {"n": 1}, lambda _ctx: 1, namespace=_Spelled("t1")
    )
    assert (first.request_id, first.action, first.namespace) == ("r1", "charge", "t1")
    assert all(type(v) is str for v in (first.request_id, first.action, first.namespace))
    again = guard.execute("r1", "charge", {"n": 1}, lambda _ctx: 2, namespace="t1")
    assert again.replay
    assert again.result == 1
    assert again.downstream_key == first.downstream_key
    assert again.fingerprint == first.fingerprint
    report = verify(store)
    assert report.ok, [p.kind for p in report.problems]
    trail = guard.audit_trail("r1", namespace="t1")
    assert [e.kind for e in trail][:2] == ["claimed", "succeeded"]
    assert all("NOT-" not in repr(e) for e in trail)


_SIGNAL_IN_A_HOT_PATH_LOCK = """
import signal, sys, linecache
from safeagent import Guard, SQLiteStore

guard = Guard(SQLiteStore(sys.argv[1]))
seen = []

def handler(_sig, _frame):
    try:
        seen.append(guard.execute("from-handler", "act", {}, lambda _ctx: 2).result)
    except Exception as exc:  # a StoreError ("re-entrant call") would be acceptable
        seen.append(type(exc).__name__)

signal.signal(signal.SIGUSR1, handler)
fired = []
module, window = sys.argv[2], sys.argv[3]

def local(frame, event, _arg):
    if event == "line" and not fired:
        if window in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
            fired.append(1)
            signal.raise_signal(signal.SIGUSR1)
    return local

sys.settrace(lambda f, e, a: local if f.f_code.co_filename.endswith(module) else None)
result = guard.execute("main", "act", {}, lambda _ctx: 1).result
sys.settrace(None)
print("main", result, "handler", seen, "fired", len(fired))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize(
    ("module", "window"),
    [
        ("_runtime.py", "return beater"),  # Heartbeats._lock, in Heartbeats._beater
        ("_runtime.py", "self._slots[key] = slot"),  # Wakeups._lock, in register
        ("_runtime.py", "slot.done = True"),  # Wakeups._lock, in done
        # The write lock, taken but not yet marked as this thread's (_writer): the
        # handler's write takes it again (an RLock) and goes first. (The main thread
        # never takes the group commit's lock: it writes alone.)
        ("sqlite.py", "self._writer = me"),
    ],
    ids=["heartbeats-lock", "wakeups-register", "wakeups-done", "sqlite-write-lock"],
)
def test_a_guarded_call_from_a_signal_handler_inside_another_hot_path_lock_does_not_deadlock(
    module: str, window: str, tmp_path: Path
) -> None:
    """b8dea3d made _Beater.lock an RLock so a signal handler's guarded call cannot
    deadlock on it, but every guarded call takes other plain threading.Locks in short
    critical sections: Heartbeats._lock (in beating(), the same module), Wakeups._lock
    (register, done) and the SQLite store's _GroupCommit.lock (whose re-entrancy check,
    meant for exactly this case, runs only after taking that lock). A signal arriving in
    any of them hangs the process just as the fixed one did. Not a regression: a4039f0
    hangs at the same places. Fix: RLocks there too (and for the group commit, check for
    the re-entrant leader before taking group.lock), or keep signal handlers out by
    design and say so."""
    out = None
    with contextlib.suppress(subprocess.TimeoutExpired):
        out = _run_child(
            _SIGNAL_IN_A_HOT_PATH_LOCK, str(tmp_path / "sig.db"), module, window, timeout=10
        )
    assert out is not None, (
        f"deadlock: the handler's guarded call waits on a lock held at {window!r}"
    )
    assert out.returncode == 0, out.stderr
    assert "main 1" in out.stdout
    assert "fired 1" in out.stdout


_HANDLER_LEASE_UNDER_THE_BEATER_LOCK = """
import signal, sys, linecache, time
from safeagent import Guard, SQLiteStore

store = SQLiteStore(sys.argv[1])
guard = Guard(store)
seen = []

def handler(_sig, _frame):
    def fn(_ctx):
        expired = []
        for _ in range(10):
            time.sleep(0.2)
            record, now = store.get("default", "from-handler")
            expired.append(record.lease_expires_at_ms < now)
        return expired
    seen.append(guard.execute("from-handler", "act", {}, fn, lease=0.6).result)

signal.signal(signal.SIGUSR1, handler)
fired = []

def local(frame, event, _arg):
    if event == "line" and not fired and frame.f_code.co_name != "_loop":
        if "beats.add(" in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
            fired.append(1)
            signal.raise_signal(signal.SIGUSR1)
    return local

sys.settrace(lambda f, e, a: local if f.f_code.co_filename.endswith("_runtime.py") else None)
guard.execute("main", "act", {}, lambda _ctx: 1)
sys.settrace(None)
print("expired", seen[0].count(True), "of", len(seen[0]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_signal_handlers_guarded_call_inside_the_beater_lock_keeps_its_lease(
    tmp_path: Path,
) -> None:
    """The RLock ends the deadlock, not the stall b8dea3d's comment also rules out ("nor
    stall every lease of the store"): while the handler's guarded call runs, its thread
    still holds the outer level of beater.lock (the interrupted ``with`` in
    _Beating.__enter__), so the heartbeat thread cannot take it and renews no lease of
    the store, the handler's own included. Here a 0.6 s lease runs out while the
    handler's fn is still running 2 s: the claim reads as in doubt, and a reconcile or
    another worker may take it over and run the side effect a second time. a4039f0 did
    the same (the Condition's RLock, held by the generator's ``with``). Fix: no lock the
    renewal thread needs held around code a signal can interrupt; e.g. add/discard the
    beat without the lock (set operations are atomic under the GIL; the loop iterates
    over ``tuple(self.beats)``) and wake the loop through a queue.SimpleQueue, whose
    put() is documented as re-entrant (safe from signal handlers)."""
    out = _run_child(_HANDLER_LEASE_UNDER_THE_BEATER_LOCK, str(tmp_path / "lease.db"), timeout=30)
    assert out.returncode == 0, out.stderr
    assert "expired 0 of 10" in out.stdout, out.stdout


# -- properties that held (second review) --------------------------------------------------


def test_only_exact_str_int_and_none_reach_the_unchecked_encoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_chain_text gates the prebuilt encoder (no circular-reference check) on type(), so
    bool, IntEnum, IntFlag, str-Enum, str/int/float subclasses and any container go to the
    checked encoder; either way the text is byte for byte the plain encoder's."""
    import enum
    import json

    from safeagent.stores import _rows

    class Color(enum.IntEnum):
        RED = 1

    class Perm(enum.IntFlag):
        R = 4

    class Word(str, enum.Enum):
        A = "a\u00e9"

    class Loud(str):
        def __str__(self) -> str:
            return "LOUD"

    class Big(int):
        def __repr__(self) -> str:
            return "BIG"

    class Half(float):
        def __repr__(self) -> str:
            return "HALF"

    loop: list[Any] = []
    loop.append(loop)
    reference = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
    fast = _rows._chain_body_fast
    given: list[list[Any]] = []

    def spy(fields: list[Any], level: int) -> Any:
        given.append(list(fields))
        return fast(fields, level)

    monkeypatch.setattr(_rows, "_chain_body_fast", spy)
    values: list[Any] = [
        True, False, Color.RED, Perm.R, Word.A, Loud("x\ud800"), Big(7), Half(0.5), 1.5,
        2**70, "\U0001f600", None, [1], {"k": 1},
    ]  # fmt: skip
    for value in values:
        row = (1, "claimed", "ns", value, None, "o", "e", 3, '{"a":1}')
        expected = reference(["p" * 64, 2, 5, *row])
        assert _rows._chain_text("p" * 64, 2, 5, row) == expected, value
        assert chain_hash("p" * 64, 2, 5, row) == hashlib.sha256(expected.encode()).hexdigest()
    with pytest.raises(ValueError, match="Circular reference"):
        _rows._chain_text("p" * 64, 2, 5, (1, "k", "ns", loop, None, "o", "e", 3, "{}"))
    assert {type(v) for fields in given for v in fields} <= {str, int, type(None)}
    assert {repr(fields[6]) for fields in given} == {repr(2**70), repr("\U0001f600"), "None"}


def test_a_failed_batched_flush_keeps_the_replay_events_and_writes_them_once(
    tmp_path: Path,
) -> None:
    """A batched flush of replay events meeting a corrupt head (a BLOB, non-numeric text
    seq): the replays are still answered, nothing reaches the caller, the events are put
    back (ahead of newer ones), and once the head is repaired the next write stores each
    exactly once; the trail verifies."""
    path = tmp_path / "flush.db"
    store = SQLiteStore(path)
    guard = Guard(store)
    guard.execute("r1", "a", {}, lambda _ctx: 1)
    seq, head = _head_of(path, "r1")
    store._buffer.max_events = 2
    for corrupt in ("head = X'00ff'", "seq = 'abc'"):
        _corrupt_head(path, "r1", f"UPDATE audit_chain SET {corrupt} WHERE shard = ?")
        for _ in range(2):
            assert guard.execute("r1", "a", {}, lambda _ctx: 2).result == 1
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(
            "UPDATE audit_chain SET seq = ?, head = ? WHERE shard = ?",
            (seq, head, shard_of("default", "r1", CHAIN_SHARDS)),
        )
        conn.close()
    assert len(store._buffer._events) == 4
    assert guard.execute("r2", "a", {}, lambda _ctx: 3).result == 3  # writes the buffer
    assert not store._buffer
    kinds = [row[1] for row in _events_on_shard(path, "r1") if row[2] == "r1"]
    assert kinds == ["claimed", "succeeded", "replayed", "replayed", "replayed", "replayed"]
    assert verify(store).ok
    store.close()


@pytest.mark.slow
def test_leases_are_renewed_while_many_threads_enter_and_leave_heartbeat_blocks(
    tmp_path: Path,
) -> None:
    """Four threads run fn for 1.5 s under a 1 s lease (renewed every third) while eight
    others enter and leave heartbeat blocks as fast as they can, most of them due at once
    (so the beater's Condition.wait, the notify from __enter__ and the RLock interleave
    all the time): no long call ever finds its lease expired, each was renewed, and no
    beat is left in the set."""
    from safeagent._runtime import heartbeats

    store = SQLiteStore(tmp_path / "hb.db", busy_timeout=30)
    guard = Guard(store)
    stop = threading.Event()
    expired: list[str] = []
    errors: list[BaseException] = []

    def long_call(t: int) -> None:
        rid = f"long-{t}"
        leases: list[int] = []

        def fn(_ctx: Any) -> int:
            for _ in range(6):
                stop.wait(0.25)
                record, now = store.get("default", rid)
                assert record is not None
                assert record.lease_expires_at_ms is not None
                leases.append(record.lease_expires_at_ms)
                if record.lease_expires_at_ms < now:
                    expired.append(rid)
            return 1

        try:
            assert guard.execute(rid, "a", {}, fn, lease=1.0).result == 1
            assert leases[-1] > leases[0], "never renewed"
        except BaseException as exc:
            errors.append(exc)

    def churn(t: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            if t < 1:  # real guarded calls
                try:
                    guard.execute(f"c-{t}-{n}", "a", {}, lambda _ctx: 0, lease=0.1)
                except BaseException as exc:
                    errors.append(exc)
            else:  # bare blocks due in 10 ms: each one wakes the beater's wait
                with heartbeats.beating(store, "default", f"c-{t}-{n}", 1, 30):
                    pass

    longs = [threading.Thread(target=long_call, args=(t,)) for t in range(4)]
    churners = [threading.Thread(target=churn, args=(t,)) for t in range(8)]
    for thread in longs + churners:
        thread.start()
    for thread in longs:
        thread.join()
    stop.set()
    for thread in churners:
        thread.join()
    assert errors == []
    assert expired == []
    assert heartbeats._beater(store.identity).beats == set()
    store.close()
