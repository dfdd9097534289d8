"""Shared fixtures: both stores, a fake clock, and an effect ledger.

The ledger is the ground truth of how often a side effect ran: a SQLite file separate
from the guard's database. Tests count the ledger, never the guard's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from safeagent import AsyncGuard, Guard, MemoryStore, SQLiteStore

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
        conn = self._connect()
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS effects"
                " (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, detail TEXT)"
            )
        finally:
            conn.close()  # `with conn:` only commits; Python 3.13 warns of an unclosed one

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


def raw_sql(store: Any, statement: str, *args: Any) -> None:
    """``statement`` run behind the store's back, as someone with write access to the
    database would: ``{s}.`` prefixes a table (the PostgreSQL schema), ``%s`` is a
    parameter."""
    if not hasattr(store, "dsn"):
        conn = sqlite3.connect(store.path)
        try:
            with conn:
                conn.execute(statement.replace("{s}.", "").replace("%s", "?"), args)
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(store.dsn, autocommit=True) as pg:
        pg.execute(statement.replace("{s}", store.schema), args)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


PG_URL = os.environ.get("SAFEAGENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
_pg_problem: list[str | None] = []


def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used for tests (``None``: it can). Checked once."""
    if not _pg_problem:
        try:
            import psycopg

            with psycopg.connect(PG_URL, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_problem.append(None)
        except Exception as exc:
            _pg_problem.append(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    return _pg_problem[0]


def require_postgres() -> None:
    """Skip when PostgreSQL is unreachable, except under CI=true, where that fails the run."""
    problem = postgres_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem} (CI=true: PostgreSQL tests must run, not skip)")
    pytest.skip(problem)


def pg_schema() -> str:
    """A schema name unique to one test, so runs and tests never collide."""
    return f"sa_t_{os.getpid()}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def postgres_available() -> None:
    """For ``pytestmark = pytest.mark.usefixtures("postgres_available")``: a PostgreSQL
    test module skips without a server, except under CI=true (require_postgres)."""
    require_postgres()


@pytest.fixture
def pg_throwaway_database_url() -> Iterator[str]:
    """The URL of a PostgreSQL database made for one test and dropped after it: for tests
    of defaults (``Guard()`` with no store uses the ``safeagent`` schema), which must not
    leave rows in the shared test database's default schema."""
    require_postgres()
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"sa_db_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    if PG_URL.startswith(("postgresql://", "postgres://")):  # keep the URL form: Guard(url)
        url = urlunsplit(urlsplit(PG_URL)._replace(path="/" + name))
    else:
        url = make_conninfo("", **{**conninfo_to_dict(PG_URL), "dbname": name})
    try:
        yield url
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def db_store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Any]:
    """A real SQLite file or PostgreSQL schema on the fake clock, closed (and the schema
    dropped) after the test: for tests that tamper with the rows by raw SQL."""
    if request.param == "sqlite":
        store: Any = SQLiteStore(str(tmp_path / "tamper.db"), clock=clock)
        yield store
        store.close()
        return
    require_postgres()
    from safeagent.stores.postgres import PostgresStore

    store = PostgresStore(PG_URL, schema=pg_schema(), clock=clock)
    try:
        yield store
    finally:
        store.drop_schema()
        store.close()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_postgres()
    return str(request.param)


@pytest.fixture
def store_factory(
    store_kind: str, tmp_path: Path, clock: FakeClock
) -> Iterator[Callable[..., Any]]:
    """``make(clock=<the fake clock>)`` builds a store of the parametrized kind.

    SQLite stores all open ``tmp_path / "guard.db"`` and PostgreSQL stores one schema unique
    to the test (a second one is a "restart"); every memory store is a fresh, empty one.
    All are closed at teardown, and the test's PostgreSQL schema dropped.
    """
    made: list[Any] = []
    schema = pg_schema()

    def make(clock: Callable[[], int] | None = clock) -> Any:
        store: Any
        if store_kind == "memory":
            store = MemoryStore(clock=clock)
        elif store_kind == "sqlite":
            store = SQLiteStore(tmp_path / "guard.db", clock=clock)
        else:
            from safeagent.stores.postgres import PostgresStore

            store = PostgresStore(PG_URL, schema=schema, clock=clock, max_size=24)
        made.append(store)
        return store

    yield make
    if store_kind == "postgres" and made:
        made[0].drop_schema()
    for store in made:
        store.close()


@pytest.fixture
def store(store_factory: Callable[..., Any]) -> Any:
    return store_factory()


class SyncBridge:
    """Drives an :class:`AsyncGuard` from sync test code, so that every test written
    against ``Guard`` also runs through the async driver (the conformance suite runs both
    API flavours). Coroutines run on a private event loop in its own thread."""

    def __init__(self, aguard: AsyncGuard) -> None:
        self.aguard = aguard
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:  # settings: store, namespace, lease, ...
        return getattr(self.aguard, name)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.aguard.execute(*args, **kwargs))

    def resolve(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.aguard.resolve(*args, **kwargs))

    def reconcile(self, **kwargs: Any) -> Any:
        return self._run(self.aguard.reconcile(**kwargs))

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.aguard.get(*args, **kwargs))

    def in_doubt(self, **kwargs: Any) -> Any:
        return self._run(self.aguard.in_doubt(**kwargs))

    def audit_trail(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.aguard.audit_trail(*args, **kwargs))

    def guarded(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        def decorate(func: Callable[..., Any]) -> Any:
            @functools.wraps(func)
            async def afunc(*a: Any, **kw: Any) -> Any:
                return func(*a, **kw)

            guarded = self.aguard.guarded(*args, **kwargs)(afunc)

            @functools.wraps(func)
            def call_sync(*a: Any, **kw: Any) -> Any:
                return self._run(guarded(*a, **kw))

            call_sync.call = lambda rid, *a, **kw: self._run(  # type: ignore[attr-defined]
                guarded.call(rid, *a, **kw)
            )
            call_sync.payload = guarded.payload  # type: ignore[attr-defined]
            return call_sync

        return decorate

    def close(self) -> None:
        self._run(self.aguard.aclose())

    def shutdown(self) -> None:
        """Stop the private loop (fixture teardown)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def guard(store: Any, flavour: str) -> Iterator[Any]:
    """A guard on the parametrized store with the fake clock: lease 30 s, ``wait=0``;
    a :class:`Guard`, or an :class:`AsyncGuard` driven through :class:`SyncBridge`."""
    if flavour == "sync":
        g: Any = Guard(store, lease=30.0, wait=0, owner="owner-1")
    else:
        g = SyncBridge(AsyncGuard(store, lease=30.0, wait=0, owner="owner-1"))
    yield g
    g.close()
    if isinstance(g, SyncBridge):
        g.shutdown()


@pytest.fixture
def sync_guard(store: Any) -> Iterator[Guard]:
    """A sync :class:`Guard` on the parametrized store (for tests that need the object)."""
    g = Guard(store, lease=30.0, wait=0, owner="owner-1")
    yield g
    g.close()
