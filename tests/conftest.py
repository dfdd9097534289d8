"""Shared fixtures: both stores, a fake clock, and an effect ledger.

The ledger is the ground truth of how often a side effect ran: a SQLite file separate
from the guard's database. Tests count the ledger, never the guard's own bookkeeping.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safeagent import Guard, MemoryStore, SQLiteStore

START_MS = 1_700_000_000_000


class FakeClock:
    """Integer milliseconds that move only when told to; pass it as ``clock=`` to a store."""

    def __init__(self, now_ms: int = START_MS) -> None:
        self.now_ms = now_ms
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return self.now_ms

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now_ms += round(seconds * 1000)


class Ledger:
    """The effect ledger: one row per side effect, in its own SQLite file.

    Thread- and process-safe: every call opens its own connection.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with self._connect() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS effects"
                " (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, detail TEXT)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def append(self, key: str, detail: str | None = None) -> int:
        """Write one effect row; returns its row id."""
        conn = self._connect()
        try:
            cur = conn.execute("INSERT INTO effects (key, detail) VALUES (?, ?)", (key, detail))
            return int(cur.lastrowid or 0)
        finally:
            conn.close()

    def rows(self, key: str | None = None) -> list[tuple[str, str | None]]:
        conn = self._connect()
        try:
            sql, args = "SELECT key, detail FROM effects", ()
            if key is not None:
                sql, args = sql + " WHERE key = ?", (key,)
            return [tuple(r) for r in conn.execute(sql + " ORDER BY id", args).fetchall()]
        finally:
            conn.close()

    def count(self, key: str | None = None) -> int:
        return len(self.rows(key))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(
    store_kind: str, tmp_path: Path, clock: FakeClock
) -> Iterator[Callable[..., Any]]:
    """``make(clock=<the fake clock>)`` builds a store of the parametrized kind.

    SQLite stores all open ``tmp_path / "guard.db"`` (a second one is a "restart");
    every memory store is a fresh, empty one. All are closed at teardown.
    """
    made: list[Any] = []

    def make(clock: Callable[[], int] | None = clock) -> Any:
        store: Any = (
            MemoryStore(clock=clock)
            if store_kind == "memory"
            else SQLiteStore(tmp_path / "guard.db", clock=clock)
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(store_factory: Callable[..., Any]) -> Any:
    return store_factory()


@pytest.fixture
def guard(store: Any) -> Iterator[Guard]:
    """A guard on the parametrized store with the fake clock: lease 30 s, ``wait=0``."""
    g = Guard(store, lease=30.0, wait=0, owner="owner-1")
    yield g
    g.close()
