"""The SQLite store: default path, schema version, fail-closed claims, buffered events."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from safeagent import ConfigurationError, Guard, MemoryStore, SQLiteStore, StoreError
from safeagent.errors import SchemaVersionError


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
    with sqlite3.connect(path) as conn:
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


def test_durability_is_checked(tmp_path: Path) -> None:
    """An unknown durability mode, or one that contradicts the store's, is rejected."""
    with pytest.raises(ConfigurationError):
        SQLiteStore(tmp_path / "g.db", durability="eventually")
    with pytest.raises(ConfigurationError):
        Guard(SQLiteStore(tmp_path / "g.db"), durability="claim-durable")
    with pytest.raises(ConfigurationError):
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
