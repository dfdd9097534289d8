"""Connections of the PostgreSQL store (:class:`~safeagent.stores.postgres.PostgresStore`).

``_PgConnections``, the base of the store's parts: the state ``PostgresStore.__init__``
sets (declared here for the parts that read it), the pool (one per process), a pooled
connection or a single statement for a call, the translation of psycopg's errors into
:class:`~safeagent.errors.StoreError` (a lost connection drains the pool: see
``_failed``), the one retry of a call whose second try is safe (``_again``), and the
clock. Also the pipelined transaction the writes use (``_pipelined_transaction``).

Interrupts. A KeyboardInterrupt from a Python signal handler (Ctrl-C, a notebook's
"interrupt kernel"; or a handler's SystemExit) lands at any bytecode of the main thread,
inside psycopg_pool's code too, which recovers from an ``Exception`` but not from these:
one that escapes ``getconn()`` or ``putconn()`` can lose a connection the pool still counts
in use. A client interrupted while it waits stays in the pool's queue (psycopg_pool 3.3's
``WaitingClient.wait`` catches ``Exception`` only) and is handed the next connection
returned, which nobody takes; a connection out of the pool's deque but not yet the
caller's, or on its way back, goes with the interrupted frame. After ``max_size`` of these
every call would fail ("all N pooled connections are busy") until the process restarts.
So whatever escapes a pool operation other than its own errors marks the pool suspect
(``_suspect``, set first in the handler), and the next call replaces it (``_get_pool``);
the old one is closed in the background (``_retire``). Its connections in use stay usable
until returned (then closed); a caller waiting on it gets PoolClosed and takes a
connection of the new pool instead (``_replaced``).
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


def _open(pool: ConnectionPool) -> None:
    """Open ``pool`` in a thread of its own, and wait for it. Signal handlers run in the
    main thread only, so its opening is never interrupted: an interrupt as it starts a
    worker thread would leave that thread running, unknown to the pool, never stopped
    (and another, starved of the stop it took, running too). An interrupt while this
    waits leaves the pool opening, and marked (_get_pool): replaced at the next call."""
    opener = threading.Thread(
        target=_quietly, args=(pool.open,), name=f"{pool.name}-open", daemon=True
    )
    opener.start()
    opener.join()


def _retire(pool: ConnectionPool) -> None:
    """Close ``pool``, just replaced, in a thread of its own: ``close()`` waits for the
    pool's workers (up to 5 s: one may be connecting), which the call replacing it must
    not. Closing fails the callers still waiting on it with PoolClosed (they take a
    connection of the new pool: _replaced) and closes its idle connections; one in use
    stays usable and is closed when returned. Connections it lost are only referenced by
    its queue (cleared: the garbage collector closes them) or by an interrupted frame. A
    pool that cannot be closed now (no thread to spare) is closed when collected."""
    with suppress(Exception):
        threading.Thread(
            target=_close, args=(pool,), name=f"{pool.name}-retire", daemon=True
        ).start()


def _close(pool: ConnectionPool) -> None:
    # open() first: a pool still opening (_open interrupted) is open once it returns (it
    # waits for the opener), and close() of a pool not open yet would do nothing. On a
    # pool open, it does nothing; on one closed, it raises.
    _quietly(pool.open)
    _quietly(pool.close)


def _quietly(action: Callable[[], None]) -> None:
    with suppress(Exception):
        action()


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
    # an interrupt (or any error not the pool's own) escaped a pool operation: the next
    # call replaces the pool (module docstring). Set without a call before it in the
    # handler (CPython runs signal handlers only as a call returns, on a backward jump or
    # at a function's start), so a second interrupt cannot land in between. Set here for
    # the handlers; an instance attribute from the first pool on (_get_pool).
    _suspect: bool = False
    _pid: int
    _closed: bool
    _identity: str
    _buffer: EventBuffer
    _found: float
    _unwritable: str | None
    _read_only: bool

    def _get_pool(self) -> ConnectionPool:
        pool = self._pool
        if pool is not None and self._pid == os.getpid() and not self._suspect:
            return pool
        with self._lock:
            if self._closed:
                raise StoreError("the PostgreSQL store is closed")
            fresh = None
            if self._pool is None or self._pid != os.getpid():
                # first use, or a forked child: never share the parent's connections.
                # Marked until open (below): no other thread takes it before.
                fresh = self._new_pool()
                self._suspect, self._pid, self._pool = True, os.getpid(), fresh
            elif self._suspect:
                # an interrupt escaped the pool's code: it may have lost connections it
                # counts in use, which no one can find again; a new pool replaces it.
                # (A mark set by a call on an older pool, replaced since, costs one
                # replacement too many, never one too few.)
                fresh = self._new_pool()
                pool, self._pool = self._pool, fresh
                _retire(pool)
            if fresh is not None:
                # opened once installed and still marked: an interrupt while this waits
                # for it leaves it to be replaced by the next call (_open)
                _open(fresh)
                self._suspect = False
            return self._pool

    def _new_pool(self) -> ConnectionPool:
        """A new pool, not open yet (no threads, no connections): open() starts them."""
        return ConnectionPool(
            self.dsn,
            min_size=self._sizes[0],
            max_size=self._sizes[1],
            timeout=self.timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, int(self.timeout)),
                "application_name": f"safeagent-{self.schema}",
            },
            open=False,
            name=f"safeagent-{self.schema}",
        )

    def _replaced(self, pool: ConnectionPool, exc: psycopg.Error) -> ConnectionPool:
        """``pool.getconn()`` raised ``exc`` (PoolClosed, or another error of psycopg's
        handing a connection out): the pool to try instead if ``pool`` was replaced
        meanwhile (_get_pool; its closing fails the callers waiting on it), else the
        StoreError (a closed store says so)."""
        if pool is self._pool:
            raise StoreError(f"PostgreSQL failed: {exc}", connection_lost=False) from exc
        return self._get_pool()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for the block (as ``ConnectionPool.connection()``: ``with
        conn`` commits, or rolls back on an error, and the connection is returned). An
        error the block raises is judged while the connection is still ours (_failed):
        once the pool takes it back, it may close it for reasons of its own (past
        ``max_lifetime``, or opened before a drain), and a closed connection would pass
        for a lost one. An interrupt escaping the pool's getconn() or putconn() marks it
        suspect (module docstring)."""
        pool = self._get_pool()
        while True:
            try:
                conn = pool.getconn()
                break
            except PoolTimeout as exc:  # an OperationalError too: before the next branch
                raise self._no_connection(exc) from exc
            except psycopg.Error as exc:  # PoolClosed
                pool = self._replaced(pool, exc)
            except BaseException:
                self._suspect = True  # first: no call before it (see _suspect)
                raise
        try:
            with conn:
                try:
                    yield conn
                except psycopg.Error as exc:
                    raise self._failed(exc, conn) from exc
        except psycopg.Error as exc:  # the commit leaving ``with conn``
            raise StoreError(f"PostgreSQL failed: {exc}", connection_lost=False) from exc
        finally:
            try:
                pool.putconn(conn)  # a broken connection is discarded, not pooled
            except BaseException:
                self._suspect = True
                raise

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
            try:
                with suppress(Exception):  # a pool closing meanwhile: the retry reports it
                    if drain is not None:
                        drain()
                    else:  # psycopg_pool before 3.3
                        pool.check()
            except BaseException:  # interrupted: connections out of its deque, not closed
                self._suspect = True
                raise
        return StoreError(f"PostgreSQL failed: {exc}", connection_lost=True)

    def _one(self, sql: str, params: Sequence[Any]) -> Any:
        """One statement alone in autocommit (its own transaction) and its first row (None
        if it returned none): what _connection does, without its two context managers (the
        hot paths run this twice or three times per execution)."""
        pool = self._get_pool()
        while True:
            try:
                conn = pool.getconn()
                break
            except PoolTimeout as exc:
                raise self._no_connection(exc) from exc
            except psycopg.Error as exc:  # PoolClosed
                pool = self._replaced(pool, exc)
            except BaseException:  # an interrupt: the pool may have lost a connection
                self._suspect = True  # first: no call before it (see _suspect)
                raise
        try:
            return conn.execute(sql, params).fetchone()
        except psycopg.Error as exc:
            raise self._failed(exc, conn) from exc
        finally:
            try:
                pool.putconn(conn)  # a broken connection is discarded, not pooled
            except BaseException:
                self._suspect = True
                raise

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
