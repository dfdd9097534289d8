"""Connections of the PostgreSQL store (:class:`~safeagent.stores.postgres.PostgresStore`).

``_PgConnections``, the base of the store's parts: the state ``PostgresStore.__init__``
sets (declared here for the parts that read it), the pool (one per process), a pooled
connection or a single statement for a call, the translation of psycopg's errors into
:class:`~safeagent.errors.StoreError` (a lost connection drains the pool: see
``_failed``), the one retry of a call whose second try is safe (``_again``), and the
clock. Also the pipelined transaction the writes use (``_pipelined_transaction``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from safeagent._audit import AuditEvent
from safeagent._receipt import Record
from safeagent.errors import StoreError
from safeagent.stores import _pg_sql as q
from safeagent.stores._base import Clock, EventBuffer
from safeagent.stores._rows import N_COLUMNS, row_to_record

T = TypeVar("T")

_PIPELINE = psycopg.capabilities.has_pipeline()  # libpq 14 or later


@contextmanager
def _pipelined_transaction(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Cursor[Any]]:
    """A transaction in pipeline mode, BEGIN and COMMIT sent as statements: BEGIN goes out
    with the first statement, COMMIT with the last, and the body waits only where it
    fetches a result. A claim (BEGIN + claim | events + COMMIT) is then two round trips
    instead of four. (``conn.transaction()`` syncs the pipeline as it enters and as it
    leaves: a round trip each.) Any failure rolls back; if the connection is broken, the
    pool discards it."""
    try:
        with conn.pipeline(), conn.cursor() as cur:
            cur.execute("BEGIN", prepare=False)
            yield cur
            cur.execute("COMMIT", prepare=False)
        # leaving the pipeline waits for every result: an error of any statement, the
        # COMMIT's included, is raised here
    except BaseException:
        with suppress(psycopg.Error):
            conn.rollback()
        raise


def _found(row: Sequence[Any] | None) -> tuple[Record | None, int]:
    """GET's one row -> (the record, or None when its columns are NULL; the clock)."""
    if row is None:  # pragma: no cover - GET always returns its one row
        return None, 0
    return (None if row[0] is None else row_to_record(row)), int(row[N_COLUMNS])


# -- lost connections ------------------------------------------------------------------------


def _connection_lost(exc: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    """``conn`` died under the call: the server went away (a restart, a failover, the
    backend terminated, a proxy or the network dropped it). Judged by the connection's
    state after the error, while the connection is still the caller's (the pool may close
    a healthy one it takes back), not by the error: psycopg marks ``broken`` only where it
    met the failure itself; in pipeline mode a FATAL from the server (57P01, as
    ``pg_terminate_backend`` sends) or a socket closed after COMMIT surfaces as "cannot
    exit pipeline mode while busy" on a connection still busy, not yet marked broken. A
    lock timeout, a cancelled statement, a serialization failure or a deadlock leave the
    connection open and idle (status OK): they are not this."""
    if conn is None or not isinstance(exc, psycopg.Error):
        return False
    if conn.broken or conn.closed:
        return True
    pgconn = conn.pgconn
    # A status other than OK: BAD (closed), or mid-(re)connection. A connection the error
    # left busy (a pipeline cut off mid-flight: the server's FATAL may not even have been
    # read yet) can never be used again, and the server may be gone: lost too. A lock
    # timeout or a cancel leaves it idle or in a failed transaction, not busy.
    return (
        pgconn.status != psycopg.pq.ConnStatus.OK
        or pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
    )


def _lost(err: StoreError) -> bool:
    """``err`` is a lost connection (see PostgresStore._failed)."""
    return getattr(err, "connection_lost", False) is True


class _PgConnections:
    """The state every part of the store shares, as ``PostgresStore.__init__`` sets it
    (see there), and the connections: the pool, a connection or one statement for a
    call, errors, the one retry, the clock."""

    dsn: str
    schema: str
    durability: str
    timeout: float
    chain_shards: int
    _fast_path: bool
    _clock: Clock | None
    _sizes: tuple[int, int]
    _sql: dict[str, str]
    _complete_sql: str
    _complete_fast_sql: str
    _complete_carrying_sql: str
    _lock: threading.Lock
    _tx: threading.local
    _uncertain: list[tuple[list[AuditEvent], Callable[[psycopg.Cursor[Any]], bool]]]
    _uncertain_lock: threading.Lock
    _pool: ConnectionPool | None
    _pid: int
    _closed: bool
    _identity: str
    _buffer: EventBuffer
    _found: float
    _unwritable: str | None
    _read_only: bool

    def _get_pool(self) -> ConnectionPool:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._closed:
                raise StoreError("the PostgreSQL store is closed")
            if self._pool is None or self._pid != os.getpid():
                # first use, or a forked child: never share the parent's connections
                self._pool = ConnectionPool(
                    self.dsn,
                    min_size=self._sizes[0],
                    max_size=self._sizes[1],
                    timeout=self.timeout,
                    kwargs={
                        "autocommit": True,
                        "connect_timeout": max(1, int(self.timeout)),
                        "application_name": f"safeagent-{self.schema}",
                    },
                    open=True,
                    name=f"safeagent-{self.schema}",
                )
                self._pid = os.getpid()
            return self._pool

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for the block. An error the block raises is judged while
        the connection is still ours (_failed): once the pool takes it back, it may close
        it for reasons of its own (past ``max_lifetime``, or opened before a drain), and a
        closed connection would pass for a lost one."""
        try:
            with self._get_pool().connection() as conn:
                try:
                    yield conn
                except psycopg.Error as exc:
                    raise self._failed(exc, conn) from exc
        except PoolTimeout as exc:  # an OperationalError too: before the generic branch
            raise self._no_connection(exc) from exc
        except psycopg.Error as exc:  # handing the connection out or back (PoolClosed)
            raise StoreError(f"PostgreSQL failed: {exc}", connection_lost=False) from exc

    def _no_connection(self, exc: PoolTimeout) -> StoreError:
        """The error for a pool that gave no connection within ``timeout``: one direct
        connection attempt (only on this failure path) tells a server that cannot be
        reached, with libpq's reason, from a pool whose connections are all busy."""
        try:
            with psycopg.connect(self.dsn, connect_timeout=max(1, round(self.timeout))):
                pass
        except psycopg.Error as cause:
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)
            return StoreError(f"cannot reach PostgreSQL within {self.timeout} s: {reason}")
        return StoreError(
            f"no PostgreSQL connection within {self.timeout} s: all {self._sizes[1]} pooled "
            f"connections are busy ({exc})"
        )

    def _failed(self, exc: psycopg.Error, conn: psycopg.Connection[Any] | None) -> StoreError:
        """The StoreError for ``exc``, which ``conn`` raised. When the connection was lost
        (_connection_lost), it says so (``connection_lost=True``: the calls that may, try
        once more) and the pool is drained: after a server restart or a failover every
        idle connection is dead too, and each would fail a call of its own. Draining closes
        them (no round trip) and has new ones opened; a connection in use is closed when
        it is returned. Every connection the pool hands out after this was opened after
        the drain began. (psycopg_pool before 3.3 has no drain(): check() tests each idle
        connection instead, a round trip each, only after a loss.)"""
        if not _connection_lost(exc, conn):
            if getattr(exc, "sqlstate", None) == q.CHAIN_HEAD_MISSING:
                return StoreError(
                    "PostgreSQL write refused: the audit chain head of its event is missing "
                    "(a row of audit_chain was deleted?), so the event cannot be chained; "
                    "nothing was written (run `safeagent audit verify`)",
                    connection_lost=False,
                )
            return StoreError(f"PostgreSQL failed: {exc}", connection_lost=False)
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            drain = getattr(pool, "drain", None)
            with suppress(Exception):  # a pool closing meanwhile: the retry reports it
                if drain is not None:
                    drain()
                else:  # psycopg_pool before 3.3
                    pool.check()
        return StoreError(f"PostgreSQL failed: {exc}", connection_lost=True)

    def _one(self, sql: str, params: Sequence[Any]) -> Any:
        """One statement alone in autocommit (its own transaction) and its first row (None
        if it returned none): what _connection does, without its two context managers (the
        hot paths run this twice or three times per execution)."""
        pool = self._get_pool()
        try:
            conn = pool.getconn()
        except PoolTimeout as exc:
            raise self._no_connection(exc) from exc
        except psycopg.Error as exc:  # PoolClosed
            raise StoreError(f"PostgreSQL failed: {exc}") from exc
        try:
            return conn.execute(sql, params).fetchone()
        except psycopg.Error as exc:
            raise self._failed(exc, conn) from exc
        finally:
            pool.putconn(conn)  # a broken connection is discarded, not pooled

    def _again(self, call: Callable[[], T]) -> T:
        """``call`` (a read, or a write a second try cannot double), and once more if its
        connection was lost: the pool was drained (_failed), so on a connection it has
        just opened. Only once: a second failure is raised."""
        try:
            return call()
        except StoreError as err:
            if not _lost(err):
                raise
        return call()

    def _read(self, fn: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """``fn``, which only reads, on a cursor (once more if the connection was lost)."""

        def once() -> T:
            with self._connection() as conn, conn.cursor() as cur:
                return fn(cur)

        return self._again(once)

    def _p(self, **params: Any) -> dict[str, Any]:
        params["now"] = None if self._clock is None else self._clock()
        return params

    def _at(self) -> int | None:
        """The ``now`` parameter of the positional statements: None (the database's clock)
        or the test clock's reading."""
        return None if self._clock is None else self._clock()

    def _record_at(
        self, cur: psycopg.Cursor[Any], namespace: str, request_id: str
    ) -> tuple[Record | None, int]:
        """The record (or None) and the clock, read in one statement."""
        cur.execute(self._sql["GET"], (self._at(), namespace, request_id))
        return _found(cur.fetchone())

    def _now(self) -> int:
        if self._clock is not None:
            return self._clock()

        def read(cur: psycopg.Cursor[Any]) -> int:
            cur.execute(self._sql["NOW_ONLY"], self._p())
            row = cur.fetchone()
            return int(row[0]) if row else 0

        return self._read(read)

    def _db_now(self, cur: psycopg.Cursor[Any]) -> int:
        cur.execute(self._sql["NOW_ONLY"], {"now": None})
        row = cur.fetchone()
        return int(row[0]) if row else 0
