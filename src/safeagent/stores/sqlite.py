"""The SQLite store: the embedded, durable default.

One connection per thread (and per process: a forked child opens its own; see fork()
below), WAL journal, a busy timeout, and every write in a ``BEGIN IMMEDIATE`` transaction,
so many threads and many processes on one host can share one file. The claim is one atomic
``INSERT ... ON CONFLICT DO UPDATE ... WHERE status = 'RELEASED' RETURNING`` statement.

fork(): SQLite's in-process lock bookkeeping and its process-wide mutexes are copied into a
forked child, so a child forked while another thread of the parent was inside a write can
be left unable to write, and one forked while a thread was inside any SQLite call can hang
in its first. The fork handlers (_sqlite_fork.py) wait for a write in progress and
for every SQLite call of SafeAgent's threads (_ForkGate), at most ``busy_timeout``. Still,
open stores after fork, or start processes with ``spawn`` (SQLite's FAQ: connections must
not cross fork).

Durability (docs/design.md section 3):

- ``"durable"`` (default): claim and completion commit with ``synchronous=FULL``; in WAL
  mode every commit is fsynced before ``execute`` returns.
- ``"claim-durable"``: the claim commits with ``synchronous=FULL``, the completion with
  ``synchronous=NORMAL`` (no fsync). A power loss can turn a recent receipt back into a
  PENDING claim, read as in doubt after its lease: never a duplicate.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from threading import get_ident
from typing import TypeVar

from safeagent._receipt import Record, Status
from safeagent.errors import ConfigurationError, SchemaVersionError, StoreError
from safeagent.stores import _sqlite_fork as _fork
from safeagent.stores._base import (
    ClaimRequest,
    ClaimResult,
    Clock,
    Completion,
    EventBuffer,
    Lease,
    Resolution,
    WriteResult,
    check_durability,
    claimed_event,
    completion_events,
    resolved_event,
    stored_version,
    system_clock_ms,
    take_over_event,
)
from safeagent.stores._rows import CHAIN_SHARDS, row_to_record

# The store's parts. SQLiteStore (below: construction, connections, transactions, the
# record's writes, close) is made of the mixins; each module's docstring says what it holds:
#   _sqlite_group  the group commit of claims and completions (_grouped)
#   _sqlite_cases  open_case, update_case, the case reads, settling a case
#   _sqlite_trail  audit events and their chains, listings, verification's reads,
#                  anchors, purge
#   _sqlite_fork   each thread's connection, the fork gate and the fork handlers
#   _sqlite_sql    the numbered migrations and every statement's text
# (_sqlite_fork is imported as _fork above too: a forked child rebinds its _gate, so the
# code here reads _fork._gate, never a copy of the name.)
from safeagent.stores._sqlite_cases import _SQLiteCases
from safeagent.stores._sqlite_fork import _ConnHolder, _live_stores, _renew_gate
from safeagent.stores._sqlite_fork import _ForkGate as _ForkGate  # noqa: PLC0414 - re-exported (tests)
from safeagent.stores._sqlite_group import _GroupCommit, _SQLiteGroupCommit, _TxnState
from safeagent.stores._sqlite_sql import (
    DROPPED_INDEXES,
    MIGRATIONS,
    SCHEMA_VERSION,
    SQL_APPEND,
    SQL_CASES_LIVE,
    SQL_CLAIM,
    SQL_COMPLETE,
    SQL_GET,
    SQL_GET_CASE,
    SQL_HEAD,
    SQL_HEADS,
    SQL_LIVE_SIGNALS,
    SQL_OPEN_CASE,
    SQL_RENEW,
    SQL_RERUN,
    SQL_RESOLVE,
    SQL_SETTLE_CASE,
    SQL_TAKE_OVER,
)
from safeagent.stores._sqlite_trail import _SQLiteTrail

# Everything defined here before the store was split in parts is still importable from
# here: the schema and statements (the CLI, bench/decompose.py, tests), the fork gate's
# class (tests). Not _gate: read it as _sqlite_fork._gate (see there).
__all__ = [
    "DB_ENV_VAR",
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_DB_FILENAME",
    "DROPPED_INDEXES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SQL_APPEND",
    "SQL_CASES_LIVE",
    "SQL_CLAIM",
    "SQL_COMPLETE",
    "SQL_GET",
    "SQL_GET_CASE",
    "SQL_HEAD",
    "SQL_HEADS",
    "SQL_LIVE_SIGNALS",
    "SQL_OPEN_CASE",
    "SQL_RENEW",
    "SQL_RERUN",
    "SQL_RESOLVE",
    "SQL_SETTLE_CASE",
    "SQL_TAKE_OVER",
    "SQLiteStore",
    "default_path",
]

T = TypeVar("T")

DEFAULT_DB_FILENAME = "safeagent.db"
DB_ENV_VAR = "SAFEAGENT_DB"
DEFAULT_BUSY_TIMEOUT = 5.0


def default_path() -> str:
    """The default database file: ``$SAFEAGENT_DB``, else ``safeagent.db`` in the cwd."""
    return os.environ.get(DB_ENV_VAR) or DEFAULT_DB_FILENAME


class SQLiteStore(_SQLiteCases, _SQLiteTrail, _SQLiteGroupCommit):
    """Execution records and the audit trail in one SQLite file.

    Args:
        path: the database file. ``None`` means ``$SAFEAGENT_DB``, else ``safeagent.db`` in
            the current working directory. Its folder must exist.
        durability: ``"durable"`` (default) or ``"claim-durable"`` (module docstring).
        busy_timeout: seconds a write waits for another writer's lock before failing
            closed with :class:`~safeagent.errors.StoreError` (default 5.0).
        clock: integer milliseconds since the epoch; the system clock by default. Leases
            are judged on it; pass a fake one in tests only.

    Raises:
        ConfigurationError: an unknown durability mode, or a path that is not a file's
            (``":memory:"``: use :class:`~safeagent.MemoryStore`; a ``file:`` URI).
        StoreError: the file cannot be opened or migrated.
        SchemaVersionError: the file was written by a newer SafeAgent.
    """

    durable = True
    chain_shards = CHAIN_SHARDS  # audit chains: one writer at a time, more would not help

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        durability: str = "durable",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        self.durability = check_durability(durability)
        raw = os.fspath(path) if path is not None else default_path()
        if not isinstance(raw, str) or raw == ":memory:" or raw.startswith("file:") or not raw:
            # Each thread opens its own connection: ":memory:" would give each an empty
            # database of its own, and a "file:" URI (read as one by SQLite builds with URI
            # support) keeps a relative path relative to whatever the cwd is when a thread
            # connects, so a thread started after os.chdir would claim in another file.
            raise ConfigurationError(
                f"SQLiteStore needs the path of a database file, got {raw!r}"
                + (
                    " (for a store in memory, use safeagent.MemoryStore)"
                    if isinstance(raw, str) and "memory" in raw
                    else " (not a file: URI: SafeAgent sets the connection's mode itself)"
                    if isinstance(raw, str) and raw.startswith("file:")
                    else ""
                )
            )
        # Absolute now: a later os.chdir must not send new threads to another file.
        self.path = os.path.abspath(raw)
        self._identity = "sqlite:" + self.path  # read on every call
        self.busy_timeout = float(busy_timeout)
        self._clock = clock or system_clock_ms
        self._local = threading.local()
        self._holders: weakref.WeakSet[_ConnHolder] = weakref.WeakSet()
        self._in_use: list[_ConnHolder] = []  # left open by close() (_close_connections)
        self._close_lock = threading.RLock()
        self._closed = False
        self._buffer = EventBuffer(self.flush_events)
        # In-process writers take this lock before SQLite's: a thread waiting on another
        # thread of this process is woken at once, instead of by SQLite's busy handler,
        # which sleeps for milliseconds between tries. An RLock for its owner check: a
        # write interrupted as the acquire returns, before it could note that it holds
        # the lock, still releases it (_write). (Nested writes are refused by _writer.)
        self._mutex = threading.RLock()
        self._writer: int | None = None  # the thread holding _mutex
        self._group = _GroupCommit()
        self._pid = os.getpid()
        _live_stores.add(self)  # see _lock_for_fork and _after_fork
        self._file_id: tuple[int, int] | None = None
        self._migrate()
        self._file_id = self._stat()

    @property
    def identity(self) -> str:
        return self._identity

    # -- connections and transactions ------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (tests and bench/ use it; the store uses _holder)."""
        return self._holder().conn

    def _holder(self) -> _ConnHolder:
        """This thread's connection and its lock, opened on first use.

        Raises:
            StoreError: the store is closed, or the file cannot be opened.
        """
        holder: _ConnHolder | None = getattr(self._local, "holder", None)
        if holder is not None:
            if holder.pid == os.getpid():
                if self._closed:  # its connection, if close() left it open, ends here
                    raise self._closed_error(holder)
                try:
                    if (
                        holder.conn.in_transaction
                        and self._writer != get_ident()
                        and not getattr(self._local, "snapshots", 0)
                    ):
                        return self._end_leftover(holder)
                except sqlite3.ProgrammingError as exc:  # close() closed it just now
                    raise StoreError(f"store {self.path} is closed") from exc
                return holder
            holder.abandon()  # inherited across fork: never touch the parent's connection
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        gate, me = _fork._gate, get_ident()
        conn = None
        try:
            gate.inside.append(me)
            if gate.forks:
                gate.wait_for_forks(me)
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            if conn is not None:  # closed here, in the gate, not by a later collection
                with suppress(sqlite3.Error):
                    conn.close()
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        finally:
            try:  # noqa: SIM105 - inline, no call: a signal could land before the remove
                gate.inside.remove(me)
            except ValueError:  # interrupted before the append
                pass
            if gate.forks:
                gate.notify()
        holder = _ConnHolder(conn)
        self._local.holder = holder
        self._holders.add(holder)
        if self._closed:  # close() began meanwhile and may have listed the holders before it
            raise self._closed_error(holder)
        return holder

    def _closed_error(self, holder: _ConnHolder) -> StoreError:
        """The error of a call on a closed store, this thread's connection closed first (no
        call of this thread is inside SQLite with it: this one has not begun)."""
        holder.close()
        return StoreError(f"store {self.path} is closed")

    def _end_leftover(self, holder: _ConnHolder) -> _ConnHolder:
        """This thread's connection is inside a transaction no call of this thread is
        running: an interrupt (Ctrl-C, a signal handler's SystemExit) landed where nothing
        could end it, between two bytecodes of a write's or a snapshot's own handling. Roll
        it back (it never committed, and its callers were told so) before the next call:
        left open, a write transaction holds the file's write lock, so every other writer
        fails closed after its busy timeout, and a read transaction pins an old snapshot.
        A connection that cannot roll back is closed and a new one opened."""
        try:
            with holder.lock:  # close() never closes it under the ROLLBACK
                holder.conn.execute("ROLLBACK")
            return holder
        except sqlite3.Error:
            self._local.holder = None
            holder.close()
            return self._holder()

    @contextmanager
    def _write(
        self, *, synchronous: str = "FULL", state: _TxnState | None = None
    ) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction that also writes buffered audit events.

        ``state``, when given, learns whether the transaction committed (an interrupt can
        arrive just after COMMIT returned)."""
        holder = self._holder()
        conn = holder.conn
        if self._pid != os.getpid():  # a forked child: locks held by the parent's threads
            self._after_fork()
        me = get_ident()
        try:
            inside = conn.in_transaction
        except sqlite3.ProgrammingError as exc:  # close() closed it since _conn returned it
            raise StoreError(f"store {self.path} is closed; nothing was written") from exc
        if inside and self._writer != me:  # inside this thread's snapshot
            raise StoreError(
                f"SQLite write failed on {self.path}: this thread is inside a snapshot read "
                "(a call from a signal handler?); nothing was written"
            )
        if self._writer == me:  # a signal handler writing while its thread writes
            raise StoreError(
                f"SQLite write failed on {self.path}: this thread is already inside a write "
                "(a re-entrant call, from a signal handler?); nothing was written"
            )
        gate = _fork._gate
        mutex = self._mutex
        own = holder.lock
        try:  # from the acquire on: an interrupt as it returns must still release it
            if not mutex.acquire(timeout=self.busy_timeout):
                raise StoreError(
                    f"SQLite write failed on {self.path}: another thread held the write "
                    f"lock for more than {self.busy_timeout} s"
                )
            self._writer = me
            own.acquire()  # the connection's (close() waits for it), after the write lock
            gate.inside.append(me)  # gate.enter() after the write lock (the fork's order)
            if gate.forks:
                gate.wait_for_forks(me)
            yield from self._transaction(conn, synchronous, state or _TxnState())
        finally:
            try:  # noqa: SIM105 - one call, as for the write lock below
                own.release()
            except RuntimeError:  # not acquired, or a stranded write closed from another
                # thread (below): the writer's thread keeps it, and its own later calls,
                # re-entering it, still work; close() leaves that connection to them.
                pass
            # The lock first: an interrupt landing further on leaves at worst a stale entry
            # in the fork gate (a fork waits for it, then goes on), never the lock held.
            if self._writer == me:
                self._writer = None
            try:  # one call, no check before it: an interrupt cannot land in between
                mutex.release()
            except RuntimeError:  # not this thread's: not acquired (timed out, interrupted
                # waiting), or this write was stranded: an interrupt as the ``with`` entered
                # or left it, and the garbage collector closes it now from another thread.
                # The writer's thread holds the lock then (its own writes were refused
                # meanwhile, _writer being set); nobody can release it: replace it.
                if get_ident() != me and self._mutex is mutex:
                    self._mutex = threading.RLock()
            try:  # noqa: SIM105 - leave the gate inline (every write)
                gate.inside.remove(me)
            except ValueError:  # interrupted before the append
                pass
            if gate.forks:
                gate.notify()

    def _lock_for_fork(self) -> bool:
        """In the thread calling os.fork, just before it forks: wait for the write in
        progress to commit (at most ``busy_timeout``), and hold the write lock across the
        fork; True if this thread now holds it (it releases it after the fork). SQLite
        keeps its file locks per process, in memory: a child forked inside another
        thread's write transaction would inherit the WAL write lock as held by a
        connection of its own that nobody will ever finish, and every write the child
        makes to this file, on any connection, would fail ("database is locked")."""
        return (
            not self._closed
            and self._pid == os.getpid()
            and self._writer != threading.get_ident()  # fork from inside a write
            and self._mutex.acquire(timeout=self.busy_timeout)
        )

    def _after_fork(self) -> None:
        """New locks in a forked child: the parent's may be held by its threads, which do
        not exist here. Runs once, at the fork, before any other code of the child
        (_after_fork_in_child). The pid checks in _write and _grouped stay for a child made
        without os.fork's handlers, but are not enough alone: two threads of a child that
        both saw the parent's pid would each make new locks, and one could then release
        the write lock the other holds."""
        self._mutex = threading.RLock()
        self._writer = None
        self._group = _GroupCommit()
        self._pid = os.getpid()
        if _fork._gate.pid != self._pid:  # a child made without os.fork's handlers
            _renew_gate()

    def _transaction(
        self, conn: sqlite3.Connection, synchronous: str, state: _TxnState
    ) -> Iterator[sqlite3.Connection]:
        """The body of :meth:`_write` once the write lock is held (a generator it
        delegates to, so a write costs one context manager, not two)."""
        switch = synchronous != "FULL"
        events = self._buffer.take() if self._buffer else []
        committing = False
        try:
            if switch:
                conn.execute(f"PRAGMA synchronous = {synchronous}")
            try:
                # Inside the try: an interrupt as BEGIN returns must reach the ROLLBACK
                # below, or the connection would keep the write lock (_end_leftover).
                conn.execute("BEGIN IMMEDIATE")
                self._check_file()
                if events:  # observed earlier, so written ahead of this transaction's own
                    self._insert_events(conn, events)
                yield conn
                committing = True
                conn.execute("COMMIT")
                state.committed = True
            except sqlite3.Error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            except BaseException:
                # An interrupt right after COMMIT returned: the transaction is done.
                state.committed = committing and not conn.in_transaction
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._buffer.put_back(events)
            raise StoreError(f"SQLite write failed on {self.path}: {exc}") from exc
        except BaseException:
            if not state.committed:  # else they were written: never write them twice
                self._buffer.put_back(events)
            raise
        finally:
            if switch:
                try:
                    conn.execute("PRAGMA synchronous = FULL")
                except sqlite3.Error:  # the connection is unusable; the next call reconnects
                    self._local.holder = None

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino)

    def _check_file(self) -> None:
        """Fail closed if the database file was removed or replaced under us: SQLite would
        go on writing into the unlinked file, and every receipt written there is lost."""
        if self._file_id is None:  # still opening
            return
        try:
            current = self._stat()
        except OSError as exc:
            raise StoreError(
                f"the SQLite database {self.path} was removed ({exc}); nothing was written"
            ) from exc
        if current != self._file_id:
            stale = OSError(errno.ESTALE, "the database file's device and inode changed", self.path)
            raise StoreError(
                f"the SQLite database {self.path} was replaced by another file; "
                "nothing was written (open a new store to use the new file)"
            ) from stale

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)``, its fetches included, holding the connection's lock, inside the
        fork gate (fn takes no other lock)."""
        holder = self._holder()
        gate, me = _fork._gate, get_ident()
        with holder.lock:
            try:
                gate.inside.append(me)
                if gate.forks:
                    gate.wait_for_forks(me)
                return fn(holder.conn)
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite read failed on {self.path}: {exc}") from exc
            finally:
                try:  # noqa: SIM105 - inline, no call: a signal could land before the remove
                    gate.inside.remove(me)
                except ValueError:  # interrupted before the append
                    pass
                if gate.forks:
                    gate.notify()

    def _snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` in one read transaction: every statement reads one snapshot."""

        def read(conn: sqlite3.Connection) -> T:
            # Refused inside this thread's own write or snapshot (a signal handler's call):
            # its COMMIT would commit that write half done. Counted, so a handler's call
            # in the middle of this one does not take it for a leftover (_conn) and a
            # handler's write is refused (_write): this snapshot goes on whole.
            if conn.in_transaction:
                raise sqlite3.OperationalError(
                    "this thread is inside a write or a snapshot read (a call from a signal "
                    "handler?); nothing was read"
                )
            local = self._local
            local.snapshots = getattr(local, "snapshots", 0) + 1
            try:
                conn.execute("BEGIN")  # inside the try: an interrupt as it returns ends it
                return fn(conn)
            finally:
                local.snapshots -= 1
                if conn.in_transaction:
                    conn.execute("COMMIT")

        return self._read(read)

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS safeagent_meta (key TEXT PRIMARY KEY, value TEXT)"
            )
            row = conn.execute(
                "SELECT value FROM safeagent_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = 0 if row is None else stored_version(row[0], str(self.path))
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path} has schema version {version}, but this SafeAgent "
                    f"understands up to {SCHEMA_VERSION}: upgrade SafeAgent to use it",
                    found=version,
                    supported=SCHEMA_VERSION,
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number - 1]:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(
                    "INSERT OR REPLACE INTO safeagent_meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            for name in DROPPED_INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {name}")

    # -- the store interface ---------------------------------------------------------

    def get(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        if self._buffer:
            self._maybe_flush()
        holder = self._holder()
        gate = _fork._gate  # _read, with the gate inline: every call reads its record first
        me = get_ident()
        with holder.lock:
            try:
                gate.inside.append(me)
                if gate.forks:
                    gate.wait_for_forks(me)
                row = holder.conn.execute(SQL_GET, (namespace, request_id)).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite read failed on {self.path}: {exc}") from exc
            finally:
                try:  # noqa: SIM105 - leave the gate inline
                    gate.inside.remove(me)
                except ValueError:  # interrupted before the append
                    pass
                if gate.forks:
                    gate.notify()
        return (None if row is None else row_to_record(row)), self._clock()

    def claim(self, request: ClaimRequest) -> ClaimResult:
        return self._grouped(lambda conn, now: self._claim(conn, now, request), "FULL")

    def _claim(self, conn: sqlite3.Connection, now: int, request: ClaimRequest) -> ClaimResult:
        row = conn.execute(
            SQL_CLAIM,
            (
                request.namespace,
                request.request_id,
                request.action,
                request.fingerprint,
                request.payload_json,
                request.execution_id,
                request.owner,
                now + request.lease_ms,
                request.downstream_key,
                now,
                now,
                now,
            ),
        ).fetchone()
        if row is None:
            existing = conn.execute(SQL_GET, (request.namespace, request.request_id)).fetchone()
            return ClaimResult(won=False, record=row_to_record(existing), now_ms=now)
        record = row_to_record(row)
        self._insert_events(conn, [claimed_event(request, record, now)])
        return ClaimResult(won=True, record=record, now_ms=now)

    def complete(self, completion: Completion) -> WriteResult:
        sync = "NORMAL" if self.durability == "claim-durable" else "FULL"
        return self._grouped(lambda conn, now: self._complete(conn, now, completion), sync)

    def _complete(self, conn: sqlite3.Connection, now: int, completion: Completion) -> WriteResult:
        terminal = completion.status in (Status.SUCCEEDED, Status.FAILED)
        error = completion.error
        row = conn.execute(
            SQL_COMPLETE,
            (
                completion.status.value,
                completion.result_json,
                None if error is None else error.type,
                None if error is None else error.message,
                now,
                now if terminal else None,
                completion.namespace,
                completion.request_id,
                completion.fencing_token,
            ),
        ).fetchone()
        after = None if row is None else row_to_record(row)
        before = after
        if after is None:  # rejected: read what is there, for the audit trail
            current = conn.execute(
                SQL_GET, (completion.namespace, completion.request_id)
            ).fetchone()
            before = None if current is None else row_to_record(current)
        events = completion_events(completion, before, after, now)
        if after is not None and terminal and completion.settle_case is not None:
            events += self._settle(conn, after, completion.settle_case, completion.actor, now)
        self._insert_events(conn, events)
        if after is None:
            return WriteResult(accepted=False, record=before)
        late = after.lease_expires_at_ms is not None and now >= after.lease_expires_at_ms
        return WriteResult(accepted=True, record=after, late=late)

    def resolve(self, resolution: Resolution) -> WriteResult:
        terminal = resolution.status in (Status.SUCCEEDED, Status.FAILED)
        error = resolution.error
        with self._write() as conn:
            now = self._clock()
            if resolution.rerun:
                row = conn.execute(
                    SQL_RERUN,
                    (now, resolution.namespace, resolution.request_id, resolution.expected_token),
                ).fetchone()
            else:
                row = conn.execute(
                    SQL_RESOLVE,
                    (
                        resolution.status.value,
                        resolution.result_json,
                        None if error is None else error.type,
                        None if error is None else error.message,
                        now,
                        now if terminal else None,
                        resolution.namespace,
                        resolution.request_id,
                        resolution.expected_token,
                        now,
                    ),
                ).fetchone()
            if row is None:
                current = conn.execute(
                    SQL_GET, (resolution.namespace, resolution.request_id)
                ).fetchone()
                return WriteResult(
                    accepted=False, record=None if current is None else row_to_record(current)
                )
            record = row_to_record(row)
            events = [resolved_event(resolution, record, now)]
            if terminal and resolution.settle_case is not None:
                events += self._settle(conn, record, resolution.settle_case, resolution.actor, now)
            self._insert_events(conn, events)
        return WriteResult(accepted=True, record=record)

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        with self._write() as conn:
            now = self._clock()
            cursor = conn.execute(
                SQL_RENEW, (now + lease_ms, now, namespace, request_id, fencing_token)
            )
            return cursor.rowcount == 1

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        with self._write() as conn:
            now = self._clock()
            return [
                conn.execute(SQL_RENEW, (now + lease_ms, now, ns, rid, token)).rowcount == 1
                for ns, rid, token, lease_ms in leases
            ]

    def take_over(
        self, namespace: str, request_id: str, expected_token: int, owner: str, lease_ms: int
    ) -> WriteResult:
        with self._write() as conn:
            now = self._clock()
            row = conn.execute(
                SQL_TAKE_OVER,
                (owner, now + lease_ms, now, namespace, request_id, expected_token, now),
            ).fetchone()
            if row is None:
                current = conn.execute(SQL_GET, (namespace, request_id)).fetchone()
                return WriteResult(
                    accepted=False, record=None if current is None else row_to_record(current)
                )
            record = row_to_record(row)
            self._insert_events(conn, [take_over_event(record, owner, now)])
        return WriteResult(accepted=True, record=record)

    def close(self) -> None:
        """Write buffered audit events and close every connection this store opened.

        Safe while other threads use the store: a call in progress inside SQLite ends
        first (close waits for it, at most ``busy_timeout`` seconds in all; a connection
        still in use then is closed by its own thread's next call, or when the store is
        collected), and every call that begins later raises
        :class:`~safeagent.errors.StoreError` ("closed"). Closing a connection while
        another thread is inside SQLite with it would crash the interpreter. A guarded
        call whose ``fn`` is running as the store closes cannot record its outcome: its
        record is left in doubt. Idempotent; a second caller waits for the first.
        """
        with self._close_lock:  # re-entrant: a signal handler's close() returns at once
            if self._closed:
                return
            try:
                self.flush_events()
            finally:
                self._closed = True
                self._buffer.detach()
                self._close_connections()

    def _close_connections(self) -> None:
        """Close each connection of this store under its lock, which every call into SQLite
        holds (get, _read, _write, _end_leftover): one in use is closed as soon as its
        call ends. Per connection, not the fork gate: closing one store never holds back
        another's calls. Those still in use after ``busy_timeout`` seconds in all are kept
        open (``_in_use``); their thread closes them on its next call (_closed_error)."""
        holders = list(self._holders)
        if self._pid != os.getpid():  # a forked child: abandons them, never closes them
            for holder in holders:
                holder.close()
            return
        me = get_ident()
        deadline = time.monotonic() + self.busy_timeout
        for holder in holders:
            if holder.thread == me:  # this thread's: no call of it is inside SQLite now
                holder.close()
                continue
            lock = holder.lock
            try:
                if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    holder.close()
                else:
                    self._in_use.append(holder)
            finally:
                try:  # noqa: SIM105 - inline, no check before it: an interrupt cannot land in between
                    lock.release()
                except RuntimeError:  # not acquired (timed out, or interrupted before)
                    pass

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
