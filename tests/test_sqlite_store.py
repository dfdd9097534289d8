"""The SQLite store: default path, schema version, fail-closed claims, buffered events."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from safeagent import ConfigurationError, Guard, MemoryStore, SQLiteStore, Status, StoreError
from safeagent._audit import AuditEvent, EventKind
from safeagent._keys import downstream_key, fingerprint
from safeagent.audit import verify
from safeagent.errors import SchemaVersionError
from safeagent.stores import sqlite as sqlite_module
from safeagent.stores._base import ClaimRequest
from safeagent.stores._rows import CHAIN_SHARDS, chain_hash, event_row, shard_of


def test_default_path_is_safeagent_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no path and no SAFEAGENT_DB, the store is ./safeagent.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAFEAGENT_DB", raising=False)
    with Guard() as guard:
        guard.execute("r", "a", {}, lambda _ctx: 1)
    assert (tmp_path / "safeagent.db").is_file()


def test_safeagent_db_overrides_the_default_and_an_argument_overrides_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAFEAGENT_DB moves the default file; an explicit path wins over it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEAGENT_DB", str(tmp_path / "env.db"))
    with Guard() as guard:
        guard.execute("r", "a", {}, lambda _ctx: 1)
    with Guard(tmp_path / "arg.db") as guard:
        guard.execute("r", "a", {}, lambda _ctx: 1)
    assert (tmp_path / "env.db").is_file()
    assert (tmp_path / "arg.db").is_file()
    assert not (tmp_path / "safeagent.db").exists()


def test_a_newer_schema_stops_older_code(tmp_path: Path) -> None:
    """A database whose schema version is newer than the code raises SchemaVersionError."""
    path = tmp_path / "g.db"
    SQLiteStore(path).close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE safeagent_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        SQLiteStore(path)


def test_reopening_keeps_records_and_does_not_migrate_twice(tmp_path: Path) -> None:
    """Opening an existing file keeps its records (migrations run once)."""
    path = tmp_path / "g.db"
    with Guard(path) as guard:
        first = guard.execute("r", "a", {"x": 1}, lambda _ctx: {"n": 1})
    with Guard(path) as guard:
        again = guard.execute("r", "a", {"x": 1}, lambda _ctx: {"n": 2})
    assert again.replay
    assert again.execution_id == first.execution_id
    assert again.result == {"n": 1}


def test_a_claim_that_cannot_be_recorded_does_not_run_fn(tmp_path: Path) -> None:
    """A write lock held past the busy timeout fails closed: StoreError, fn not called."""
    path = tmp_path / "g.db"
    guard = Guard(SQLiteStore(path, busy_timeout=0.2))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    calls: list[int] = []
    try:
        with pytest.raises(StoreError) as info:
            guard.execute("r", "a", {}, lambda _ctx: calls.append(1))
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert calls == []
    assert guard.get("r") is None
    assert guard.execute("r", "a", {}, lambda _ctx: calls.append(1) or 7).result == 7
    assert calls == [1]


def test_a_query_only_connection_fails_closed(tmp_path: Path) -> None:
    """A store that cannot write (query_only) raises StoreError and never calls fn."""
    path = tmp_path / "g.db"
    store = SQLiteStore(path)
    store._conn().execute("PRAGMA query_only = ON")
    calls: list[int] = []
    with pytest.raises(StoreError):
        Guard(store).execute("r", "a", {}, lambda _ctx: calls.append(1))
    assert calls == []


def test_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    """A database path in a folder that does not exist raises StoreError at open."""
    with pytest.raises(StoreError):
        SQLiteStore(tmp_path / "no" / "such" / "dir" / "g.db")


def test_claim_durable_mode_records_and_replays(tmp_path: Path) -> None:
    """claim-durable runs once and replays like durable mode."""
    guard = Guard(tmp_path / "g.db", durability="claim-durable")
    assert guard.store.durability == "claim-durable"  # type: ignore[attr-defined]
    calls: list[int] = []
    guard.execute("r", "a", {}, lambda _ctx: calls.append(1) or "ok")
    assert guard.execute("r", "a", {}, lambda _ctx: calls.append(1) or "ok").replay
    assert calls == [1]


@pytest.mark.parametrize("mode", ["durable", "claim-durable"])
def test_each_commit_of_a_first_execution_runs_under_its_modes_synchronous_setting(
    tmp_path: Path, mode: str
) -> None:
    """What the durability modes promise (README, docs/guide.md): in durable mode both the
    claim's and the completion's COMMIT run with ``synchronous=FULL`` (fsynced before
    ``execute`` returns); in claim-durable mode the claim's does and the completion's runs
    with ``NORMAL``, the connection then set back to FULL. Read from the store's own
    connection (SQLite's statement trace); a replay commits nothing."""
    store = SQLiteStore(tmp_path / "sync.db", durability=mode)
    guard = Guard(store)
    guard.execute("warm", "a", {}, lambda _ctx: 1)  # this thread's connection exists
    conn = store._conn()
    seen: list[str] = []

    def trace(statement: str) -> None:
        # The COMMITs and every switch of the connection's synchronous setting, in order
        # (the connection starts at FULL, asserted below).
        if statement.strip().upper() == "COMMIT":
            seen.append("COMMIT")
        elif statement.upper().startswith("PRAGMA SYNCHRONOUS"):
            seen.append(statement.split("=")[1].strip().upper())

    conn.set_trace_callback(trace)
    try:
        guard.execute("r1", "a", {}, lambda _ctx: 2)
        first = list(seen)
        seen.clear()
        assert guard.execute("r1", "a", {}, lambda _ctx: 3).replay
        replay = list(seen)
    finally:
        conn.set_trace_callback(None)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, set at connect
    if mode == "durable":
        assert first == ["COMMIT", "COMMIT"]  # both under the connection's FULL
    else:
        assert first == ["COMMIT", "NORMAL", "COMMIT", "FULL"]
    assert replay == []
    guard.close()


def test_durability_is_checked(tmp_path: Path) -> None:
    """An unknown durability mode, or one that contradicts the store's, is rejected."""
    with pytest.raises(ConfigurationError):
        SQLiteStore(tmp_path / "g.db", durability="eventually")
    with pytest.raises(ConfigurationError, match="set it on the store"):
        Guard(SQLiteStore(tmp_path / "g.db"), durability="claim-durable")
    with pytest.raises(ConfigurationError, match="MemoryStore has no durability mode"):
        Guard(MemoryStore(), durability="durable")


def test_buffered_replay_events_are_written_at_exit(tmp_path: Path) -> None:
    """A process that only replays and exits still leaves its replayed events on disk."""
    path = tmp_path / "g.db"
    with Guard(path) as guard:
        guard.execute("r", "a", {}, lambda _ctx: 1)
    code = textwrap.dedent(
        f"""
        from safeagent import Guard
        guard = Guard({str(path)!r})
        for _ in range(3):
            assert guard.execute("r", "a", {{}}, lambda _ctx: 2).replay
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with Guard(path) as guard:
        kinds = [e.kind.value for e in guard.audit_trail("r")]
    assert kinds == ["claimed", "succeeded", "replayed", "replayed", "replayed"]


# -- group commit and the one-statement audit append (schema v4) ----------------------------


def _claim_request(request_id: str, payload_json: object = "{}") -> ClaimRequest:
    body = b"{}"
    return ClaimRequest(
        namespace="default",
        request_id=request_id,
        action="charge",
        fingerprint=fingerprint("charge", body),
        payload_json=payload_json,  # type: ignore[arg-type]  # a bad one on purpose below
        execution_id="e-" + request_id,
        owner="test",
        lease_ms=30_000,
        downstream_key=downstream_key("default", "charge", request_id),
    )


@pytest.mark.parametrize("durability", ["durable", "claim-durable"])
def test_concurrent_first_executions_commit_together_and_each_runs_once(
    tmp_path: Path, durability: str
) -> None:
    """16 threads over 40 ids each (distinct and shared): claims and completions are
    group-committed, yet every id runs once, every caller gets the stored result, the
    records survive a reopen and the audit chains verify."""
    path = tmp_path / "g.db"
    guard = Guard(SQLiteStore(path, durability=durability))
    runs: list[str] = []
    lock = threading.Lock()

    def effect(ctx: Any) -> dict[str, str]:
        with lock:
            runs.append(ctx.request_id)
        return {"id": ctx.request_id}

    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        barrier.wait()
        try:
            for i in range(40):
                rid = f"shared-{i}" if i % 2 else f"own-{n}-{i}"
                receipt = guard.execute(rid, "charge", {"i": i}, effect)
                assert receipt.result == {"id": rid}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    guard.close()
    assert errors == []
    assert sorted(runs) == sorted(set(runs))  # no id ran twice
    assert len(runs) == 16 * 20 + 20
    with Guard(SQLiteStore(path, durability=durability)) as again:
        for rid in set(runs):
            stored = again.get(rid)
            assert stored is not None
            assert stored.status is Status.SUCCEEDED
        report = verify(again.store)
        assert report.ok, report


def test_one_failing_write_in_a_group_does_not_fail_the_others(tmp_path: Path) -> None:
    """A claim SQLite refuses (a value it cannot bind) fails alone: the claims committed
    in the same group (or retried one by one after it) all succeed."""
    store = SQLiteStore(tmp_path / "g.db")
    requests = [_claim_request(f"r-{i}") for i in range(24)]
    requests[11] = _claim_request("r-bad", payload_json={"not": "text"})
    results: dict[str, object] = {}
    barrier = threading.Barrier(len(requests))

    def claim(request: ClaimRequest) -> None:
        barrier.wait()
        try:
            results[request.request_id] = store.claim(request).won
        except StoreError as exc:
            results[request.request_id] = exc

    threads = [threading.Thread(target=claim, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results.pop("r-bad"), StoreError)
    assert results == {f"r-{i}": True for i in range(24) if i != 11}
    record, _ = store.get("default", "r-bad")
    assert record is None  # nothing of the refused claim was written
    assert verify(store).ok
    store.close()


def test_a_version_3_file_is_migrated_and_its_chains_extend(tmp_path: Path) -> None:
    """A file written at schema version 3 (head kept by the writer, no trigger) opens at
    version 4; new events extend the old chains and the whole trail verifies."""
    path = tmp_path / "v3.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn, conn:
        conn.execute("CREATE TABLE safeagent_meta (key TEXT PRIMARY KEY, value TEXT)")
        for statements in sqlite_module.MIGRATIONS[:3]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("INSERT INTO safeagent_meta VALUES ('schema_version', '3')")
        # One event appended the version 3 way: read the head, hash, insert, move the head.
        event = AuditEvent(  # (a conflict: it implies no execution record)
            kind=EventKind.CONFLICT, at_ms=1, namespace="default", subject="old", detail={}
        )
        shard = shard_of("default", "old", CHAIN_SHARDS)
        seq, head = conn.execute(
            "SELECT seq, head FROM audit_chain WHERE shard = ?", (shard,)
        ).fetchone()
        row = event_row(event)
        digest = chain_hash(head, shard, seq + 1, row)
        conn.execute(
            "INSERT INTO audit_events (at_ms, kind, namespace, subject, action, actor,"
            " execution_id, fencing_token, detail, shard, seq, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row, shard, seq + 1, head, digest),
        )
        conn.execute(
            "UPDATE audit_chain SET seq = ?, head = ? WHERE shard = ?", (seq + 1, digest, shard)
        )
    with Guard(path) as guard:
        for i in range(40):
            guard.execute(f"new-{i}", "charge", {"i": i}, lambda _ctx: 1)
        assert verify(guard.store).ok
        assert [e.subject for e in guard.audit_trail("old")] == ["old"]
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute(
            "SELECT value FROM safeagent_meta WHERE key = 'schema_version'"
        ).fetchone() == (str(sqlite_module.SCHEMA_VERSION),)
    assert "audit_events_chain" not in _indexes(path)  # made by migration 3, then dropped


def _indexes(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as conn, conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    return {name for (name,) in rows}


def _schema_version(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn, conn:
        (value,) = conn.execute(
            "SELECT value FROM safeagent_meta WHERE key = 'schema_version'"
        ).fetchone()
    return str(value)


def test_a_new_file_has_no_chain_index(tmp_path: Path) -> None:
    """A file made by this release has the per-request audit index but not
    audit_events_chain: no event pays for an index entry only verification used."""
    path = tmp_path / "g.db"
    with Guard(path) as guard:
        guard.execute("r", "charge", {}, lambda _ctx: 1)
        assert verify(guard.store).ok
    assert "audit_events_subject" in _indexes(path)
    assert "audit_events_chain" not in _indexes(path)


def test_opening_drops_the_previous_releases_chain_index_and_keeps_the_version(
    tmp_path: Path,
) -> None:
    """A file of the previous release (this schema version, plus audit_events_chain) loses
    the index when opened, its chain still verifies and grows, and its schema version is
    unchanged, so the previous release's processes sharing it still open it."""
    path = tmp_path / "g.db"
    with Guard(path) as guard:
        for i in range(20):
            guard.execute(f"old-{i}", "charge", {"i": i}, lambda _ctx: 1)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE INDEX audit_events_chain ON audit_events (shard, seq)")
    version = _schema_version(path)
    with Guard(path) as guard:
        assert "audit_events_chain" not in _indexes(path)
        assert verify(guard.store).ok
        for i in range(20):
            guard.execute(f"new-{i}", "charge", {"i": i}, lambda _ctx: 1)
        report = verify(guard.store)
        assert report.ok, report.problems
        assert report.events_checked == 2 * 40  # claimed and succeeded
    assert _schema_version(path) == version == str(sqlite_module.SCHEMA_VERSION)


def test_a_store_already_open_keeps_writing_when_another_drops_the_chain_index(
    tmp_path: Path,
) -> None:
    """A process that opened the file while it had the index (its statements prepared
    with it, as the previous release's are) goes on writing after another process's open
    drops it, and the whole trail verifies."""
    path = tmp_path / "g.db"
    with Guard(path) as old:
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("CREATE INDEX audit_events_chain ON audit_events (shard, seq)")
        for i in range(10):
            old.execute(f"before-{i}", "charge", {"i": i}, lambda _ctx: 1)
        SQLiteStore(path).close()
        assert "audit_events_chain" not in _indexes(path)
        for i in range(10):
            old.execute(f"after-{i}", "charge", {"i": i}, lambda _ctx: 1)
        report = verify(old.store)
        assert report.ok, report.problems
        assert report.events_checked == 2 * 20


def _slow_clock_for(thread_name: str, delay: float, inside: threading.Event | None = None) -> Any:
    """A store clock that stalls ``thread_name``'s first commit: it then leads a group
    commit for ``delay`` seconds while other writers queue up (``inside`` is set then)."""
    stalled: list[bool] = []

    def clock() -> int:
        if threading.current_thread().name == thread_name and not stalled:
            stalled.append(True)
            if inside is not None:
                inside.set()
            time.sleep(delay)
        return int(time.time() * 1000)

    return clock


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")
def test_a_writer_interrupted_while_queued_leaves_no_one_waiting(tmp_path: Path) -> None:
    """Ctrl-C on a thread queued behind a commit withdraws its write; the next writers are
    not left waiting for a leader that will never come."""
    inside = threading.Event()
    store = SQLiteStore(tmp_path / "g.db", clock=_slow_clock_for("leader", 1.5, inside))
    leader = threading.Thread(target=store.claim, args=(_claim_request("a"),), name="leader")
    leader.start()
    assert inside.wait(10)  # the leader is inside its commit, for 1.5 s more
    main = threading.main_thread().ident
    assert main is not None
    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        store.claim(_claim_request("b"))  # queued behind the leader, then interrupted
    leader.join()
    done: list[bool] = []
    later = threading.Thread(target=lambda: done.append(store.claim(_claim_request("c")).won))
    later.start()
    later.join(timeout=10)
    assert done == [True]
    record, _ = store.get("default", "b")
    assert record is None  # withdrawn before any commit held it
    store.close()


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_write_from_a_signal_handler_during_a_commit_fails_fast(tmp_path: Path) -> None:
    """A signal handler that writes while its own thread leads a commit gets a StoreError at
    once (it cannot wait for itself); the interrupted commit still completes."""
    store = SQLiteStore(tmp_path / "g.db", clock=_slow_clock_for("MainThread", 1.5))
    seen: list[BaseException] = []

    def handler(_sig: int, _frame: object) -> None:
        try:
            store.claim(_claim_request("from-handler"))
        except StoreError as exc:
            seen.append(exc)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        started = time.monotonic()
        assert store.claim(_claim_request("main")).won
        assert time.monotonic() - started < 5
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert len(seen) == 1
    assert "already" in str(seen[0])
    store.close()


@pytest.mark.parametrize(
    "store", ["mysql://db/payments", "sqlite:///x.db", "redis://127.0.0.1:6379/0"]
)
def test_a_url_of_another_database_is_a_configuration_error(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL SafeAgent has no store for raises ConfigurationError at once; it is never
    taken for the name of an SQLite file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="URL"):
        Guard(store)
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("name", ["a=b.db", "ledger.db", "hosts=1.db", "with space.db"])
def test_file_names_that_are_not_connection_strings_stay_sqlite_files(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only strings that begin with a libpq keyword and '=' are read as PostgreSQL."""
    monkeypatch.chdir(tmp_path)
    with Guard(name) as guard:
        assert isinstance(guard.store, SQLiteStore)
        assert guard.execute("r", "a", {}, lambda _ctx: 1).result == 1
    assert (tmp_path / name).exists()


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        (":memory:", "MemoryStore"),
        ("file::memory:?cache=shared", "MemoryStore"),
        ("file:receipts.db?mode=rwc", "file: URI"),
        ("file:receipts.db", "file: URI"),
        ("", "path of a database file"),
    ],
)
def test_a_path_each_thread_would_open_differently_is_refused(
    path: str, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every thread opens its own connection: ":memory:" would give each thread an empty
    database of its own (a claim made on one thread invisible to the next), and a relative
    "file:" URI follows the cwd at the moment a thread connects (a thread started after
    os.chdir would claim in another file and run the side effect again). Both are refused
    before any file is made, through the store, the Guard and $SAFEAGENT_DB alike."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=hint):
        SQLiteStore(path)
    if path:
        with pytest.raises(ConfigurationError, match=hint):
            Guard(path)
        monkeypatch.setenv("SAFEAGENT_DB", path)
        with pytest.raises(ConfigurationError, match=hint):
            Guard()
    assert list(tmp_path.rglob("*")) == []


def test_a_relative_path_stays_the_same_file_for_threads_started_after_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path is made absolute when the store is built: a thread that connects after
    os.chdir replays from the same file instead of running the side effect again."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    runs: list[str] = []
    with Guard("receipts.db") as guard:
        guard.execute("r", "charge", {}, lambda _ctx: runs.append(os.getcwd()))
        monkeypatch.chdir(second)
        answers: list[bool] = []
        worker = threading.Thread(
            target=lambda: answers.append(
                guard.execute("r", "charge", {}, lambda _ctx: runs.append(os.getcwd())).replay
            )
        )
        worker.start()
        worker.join()
    assert answers == [True]
    assert runs == [str(first)]
    assert not (second / "receipts.db").exists()
