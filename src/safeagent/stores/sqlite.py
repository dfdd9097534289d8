"""The SQLite store: the embedded, durable default.

One connection per thread (and per process: a forked child opens its own; see fork()
below), WAL journal, a busy timeout, and every write in a ``BEGIN IMMEDIATE`` transaction,
so many threads and many processes on one host can share one file. The claim is one atomic
``INSERT ... ON CONFLICT DO UPDATE ... WHERE status = 'RELEASED' RETURNING`` statement.

fork(): SQLite's in-process lock bookkeeping and its process-wide mutexes are copied into a
forked child, so a child forked while another thread of the parent was inside a write can
be left unable to write, and one forked while a thread was inside any SQLite call can hang
in its first. The fork handlers at the end of this module wait for a write in progress and
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
from typing import Any, TypeVar

from safeagent._audit import AuditEvent
from safeagent._cases import CaseRow, CaseState, Signal
from safeagent._receipt import Record, Status
from safeagent.errors import (
    ConfigurationError,
    InvalidTransitionError,
    SchemaVersionError,
    StoreError,
)
from safeagent.stores._base import (
    CaseMutation,
    CaseUpdate,
    ClaimRequest,
    ClaimResult,
    Clock,
    Completion,
    EventBuffer,
    Lease,
    Resolution,
    WriteResult,
    case_events,
    check_durability,
    claimed_event,
    completion_events,
    purged_event,
    resolved_event,
    settled_event,
    stamped,
    state_change_event,
    stored_version,
    system_clock_ms,
    take_over_event,
)
from safeagent.stores._rows import (
    CASE_COLUMNS,
    CHAIN_COLUMNS,
    CHAIN_SHARDS,
    COLUMNS,
    EVENT_COLUMNS,
    GENESIS,
    Heads,
    chain_rows,
    dumps,
    row_to_case,
    row_to_event,
    row_to_record,
    row_to_signal,
    shard_of,
)

T = TypeVar("T")

DEFAULT_DB_FILENAME = "safeagent.db"
DB_ENV_VAR = "SAFEAGENT_DB"
DEFAULT_BUSY_TIMEOUT = 5.0

SCHEMA_VERSION = 5

# Numbered migrations: MIGRATIONS[n - 1] takes the schema from version n - 1 to n.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE executions (
            namespace TEXT NOT NULL,
            request_id TEXT NOT NULL,
            action TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            status TEXT NOT NULL,
            payload TEXT NOT NULL,
            result TEXT,
            error_type TEXT,
            error_message TEXT,
            execution_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            fencing_token INTEGER NOT NULL,
            lease_owner TEXT,
            lease_expires_at_ms INTEGER,
            downstream_key TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL,
            claimed_at_ms INTEGER NOT NULL,
            updated_at_ms INTEGER NOT NULL,
            completed_at_ms INTEGER,
            PRIMARY KEY (namespace, request_id)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE audit_events (
            id INTEGER PRIMARY KEY,
            at_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            namespace TEXT NOT NULL,
            subject TEXT NOT NULL,
            action TEXT,
            actor TEXT,
            execution_id TEXT,
            fencing_token INTEGER,
            detail TEXT NOT NULL
        )
        """,
        "CREATE INDEX audit_events_subject ON audit_events (namespace, subject, id)",
    ),
    (
        """
        CREATE TABLE cases (
            namespace TEXT NOT NULL,
            case_id TEXT NOT NULL,
            state TEXT NOT NULL,
            provisional_outcome TEXT,
            outcome TEXT,
            threshold REAL NOT NULL,
            quorum INTEGER NOT NULL,
            version INTEGER NOT NULL,
            created_at_ms INTEGER NOT NULL,
            updated_at_ms INTEGER NOT NULL,
            resolved_by TEXT,
            PRIMARY KEY (namespace, case_id)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE signals (
            id INTEGER PRIMARY KEY,
            namespace TEXT NOT NULL,
            case_id TEXT NOT NULL,
            source TEXT NOT NULL,
            outcome TEXT NOT NULL,
            confidence REAL NOT NULL,
            metadata TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            status TEXT NOT NULL
        )
        """,
        "CREATE INDEX signals_case ON signals (namespace, case_id, status)",
    ),
    (
        "ALTER TABLE executions ADD COLUMN purged_at_ms INTEGER",
        "ALTER TABLE audit_events ADD COLUMN shard INTEGER",
        "ALTER TABLE audit_events ADD COLUMN seq INTEGER",
        "ALTER TABLE audit_events ADD COLUMN prev_hash TEXT",
        "ALTER TABLE audit_events ADD COLUMN hash TEXT",
        "CREATE INDEX audit_events_chain ON audit_events (shard, seq)",
        "CREATE TABLE audit_chain (shard INTEGER PRIMARY KEY, seq INTEGER NOT NULL,"
        " head TEXT NOT NULL)",
        "INSERT INTO audit_chain (shard, seq, head) SELECT value, 0, '"
        + GENESIS
        + "' FROM (WITH RECURSIVE n(value) AS (SELECT 0 UNION ALL SELECT value + 1 FROM n"
        f" WHERE value < {CHAIN_SHARDS - 1}) SELECT value FROM n)",
        "CREATE TABLE audit_anchors (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL,"
        " heads TEXT NOT NULL, mac TEXT NOT NULL)",
    ),
    (
        # The chain head follows every chained insert inside SQLite: appending an event is
        # read head, insert (SQL_HEAD, SQL_APPEND), with no statement to move the head.
        "CREATE TRIGGER audit_chain_advance AFTER INSERT ON audit_events"
        " WHEN NEW.shard IS NOT NULL"
        " BEGIN UPDATE audit_chain SET seq = NEW.seq, head = NEW.hash"
        " WHERE shard = NEW.shard; END",
    ),
    (
        # The facts of the attempt that ran fn (owner, end, attempt number), which a reconcile
        # take-over records once and keeps (Record.attempt_facts): the take-over overwrites
        # lease_owner and lease_expires_at_ms with its own. NULL in rows written before.
        # Numbered (the file is version 5 now), so the previous release refuses to open it;
        # its processes already running go on (they name their columns), and their claims,
        # which do not clear these, cannot leave stale facts: ended_attempt is checked.
        "ALTER TABLE executions ADD COLUMN attempt_owner TEXT",
        "ALTER TABLE executions ADD COLUMN attempt_ended_at_ms INTEGER",
        "ALTER TABLE executions ADD COLUMN ended_attempt INTEGER",
    ),
)

# Indexes the numbered migrations made that the schema no longer has: _migrate drops them
# (DROP INDEX IF EXISTS) on every open, after the numbered migrations. Not a numbered
# migration, because that would raise the stored schema_version, which older SafeAgent
# processes still sharing the file during a rolling upgrade refuse to open; dropping an
# index changes nothing they read or write.
# - audit_events_chain (shard, seq), made by migration 3: only verification's ORDER BY
#   used it (the chain heads are in audit_chain), and it cost every audit event an extra
#   index entry: about one more WAL page per commit.
DROPPED_INDEXES = ("audit_events_chain",)

SQL_GET_CASE = f"SELECT {CASE_COLUMNS} FROM cases WHERE namespace = ? AND case_id = ?"
SQL_OPEN_CASE = f"""
INSERT INTO cases ({CASE_COLUMNS}) VALUES (?, ?, 'OPEN', NULL, NULL, ?, ?, 1, ?, ?, NULL)
ON CONFLICT (namespace, case_id) DO NOTHING
RETURNING {CASE_COLUMNS}
"""
SQL_LIVE_SIGNALS = (
    "SELECT source, outcome, confidence, metadata, at_ms FROM signals"
    " WHERE namespace = ? AND case_id = ? AND status = 'live' ORDER BY id"
)
_N_CASE_COLUMNS = CASE_COLUMNS.count(",") + 1
# Cases with their live signals in one statement (one snapshot): a case's columns, then one
# live signal's (NULL for a case without any), a row per live signal, oldest first.
SQL_CASES_LIVE = (
    "SELECT "
    + ", ".join("c." + name.strip() for name in CASE_COLUMNS.split(","))
    + ", s.source, s.outcome, s.confidence, s.metadata, s.at_ms FROM cases c"
    " LEFT JOIN signals s ON s.namespace = c.namespace AND s.case_id = c.case_id"
    " AND s.status = 'live' WHERE 1 = 1"
)
SQL_SETTLE_CASE = f"""
UPDATE cases SET state = 'SETTLED', version = version + 1, updated_at_ms = ?
WHERE namespace = ? AND case_id = ? AND state = 'FINAL'
RETURNING {CASE_COLUMNS}
"""

SQL_GET = f"SELECT {COLUMNS} FROM executions WHERE namespace = ? AND request_id = ?"
SQL_CLAIM = f"""
INSERT INTO executions ({COLUMNS})
VALUES (?, ?, ?, ?, 'PENDING', ?, NULL, NULL, NULL, ?, 1, 1, ?, ?, ?, ?, ?, ?, NULL, NULL,
    NULL, NULL, NULL)
ON CONFLICT (namespace, request_id) DO UPDATE SET
    action = excluded.action,
    fingerprint = excluded.fingerprint,
    status = 'PENDING',
    payload = excluded.payload,
    result = NULL,
    error_type = NULL,
    error_message = NULL,
    execution_id = excluded.execution_id,
    attempt = executions.attempt + 1,
    fencing_token = executions.fencing_token + 1,
    lease_owner = excluded.lease_owner,
    lease_expires_at_ms = excluded.lease_expires_at_ms,
    downstream_key = excluded.downstream_key,
    claimed_at_ms = excluded.claimed_at_ms,
    updated_at_ms = excluded.updated_at_ms,
    completed_at_ms = NULL,
    purged_at_ms = NULL,
    attempt_owner = NULL,
    attempt_ended_at_ms = NULL,
    ended_attempt = NULL
WHERE executions.status = 'RELEASED'
RETURNING {COLUMNS}
"""
SQL_COMPLETE = f"""
UPDATE executions
SET status = ?, result = ?, error_type = ?, error_message = ?, updated_at_ms = ?,
    completed_at_ms = ?
WHERE namespace = ? AND request_id = ? AND fencing_token = ? AND status = 'PENDING'
RETURNING {COLUMNS}
"""
SQL_RESOLVE = f"""
UPDATE executions
SET status = ?, result = ?, error_type = ?, error_message = ?, updated_at_ms = ?,
    completed_at_ms = ?, fencing_token = fencing_token + 1
WHERE namespace = ? AND request_id = ? AND fencing_token = ?
  AND (status = 'IN_DOUBT' OR (status = 'PENDING' AND lease_expires_at_ms <= ?))
RETURNING {COLUMNS}
"""
# A rerun re-opens a FAILED record, a retention tombstone too: it is no tombstone after.
SQL_RERUN = f"""
UPDATE executions
SET status = 'RELEASED', updated_at_ms = ?, fencing_token = fencing_token + 1,
    purged_at_ms = NULL
WHERE namespace = ? AND request_id = ? AND fencing_token = ? AND status = 'FAILED'
RETURNING {COLUMNS}
"""
SQL_RENEW = """
UPDATE executions SET lease_expires_at_ms = ?, updated_at_ms = ?
WHERE namespace = ? AND request_id = ? AND fencing_token = ? AND status = 'PENDING'
"""
# The first take-over of an attempt records its facts from the row as it was (every
# right-hand side reads the old row); later ones keep them: Record.attempt_facts.
SQL_TAKE_OVER = f"""
UPDATE executions
SET status = 'PENDING', fencing_token = fencing_token + 1, lease_owner = ?,
    lease_expires_at_ms = ?, updated_at_ms = ?,
    attempt_owner = CASE WHEN ended_attempt = attempt THEN attempt_owner ELSE lease_owner END,
    attempt_ended_at_ms = CASE WHEN ended_attempt = attempt THEN attempt_ended_at_ms
        WHEN status = 'IN_DOUBT' THEN updated_at_ms ELSE lease_expires_at_ms END,
    ended_attempt = attempt
WHERE namespace = ? AND request_id = ? AND fencing_token = ?
  AND (status = 'IN_DOUBT' OR (status = 'PENDING' AND lease_expires_at_ms <= ?))
RETURNING {COLUMNS}
"""
# Events are appended to their shards' chains under the write lock (no one interleaves):
# the heads are read, the events hashed in Python (chain_rows) and inserted as they are,
# and the trigger audit_chain_advance moves each head. (Releases before 0.9 hashed a
# single event inside its INSERT through a function registered on each connection;
# calling into Python from SQLite cost more than reading the one head does.)
SQL_HEAD = "SELECT seq, head FROM audit_chain WHERE shard = ?"
SQL_HEADS = "SELECT shard, seq, head FROM audit_chain"
SQL_APPEND = """
INSERT INTO audit_events (at_ms, kind, namespace, subject, action, actor, execution_id,
    fencing_token, detail, shard, seq, prev_hash, hash)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


_MAX_SEQ = 2**63 - 2  # the next seq must still fit SQLite's INTEGER


def _check_head(shard: int, seq: Any, head: Any) -> None:
    """Refuse to extend a chain head of the wrong type or range (the table was edited):
    a store failure (DatabaseError, so the caller gets StoreError), nothing written."""
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ or type(head) is not str:
        raise sqlite3.DatabaseError(
            f"audit chain head of shard {shard} unusable (seq {seq!r}, head {head!r:.80}); "
            "events not written"
        )


def default_path() -> str:
    """The default database file: ``$SAFEAGENT_DB``, else ``safeagent.db`` in the cwd."""
    return os.environ.get(DB_ENV_VAR) or DEFAULT_DB_FILENAME


class _ConnHolder:
    """One thread's connection. When the thread ends, its ``threading.local`` slot is
    dropped, the holder is collected and the connection closed: a thread-per-request
    server does not leak a connection (and two file descriptors) per request."""

    __slots__ = ("__weakref__", "_finalizer", "conn", "pid")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self._finalizer = weakref.finalize(self, _close_quietly, conn, self.pid)
        self._finalizer.atexit = False  # buffered audit events are written at exit first

    def close(self) -> None:
        if self.pid == os.getpid():
            self._finalizer()
        else:
            self.abandon()

    def abandon(self) -> None:
        """Forget a connection inherited from a parent process without closing it
        (closing could checkpoint or remove the parent's WAL under its feet, or wait on a
        mutex of SQLite's a parent thread held at the fork). It is kept referenced for
        the life of this process: a collected connection object closes itself."""
        self._finalizer.detach()
        _abandoned.append(self.conn)


# Connections inherited across fork and never to be closed here (_ConnHolder.abandon).
_abandoned: list[sqlite3.Connection] = []


def _close_quietly(conn: sqlite3.Connection, pid: int) -> None:
    if os.getpid() != pid:  # inherited across fork: the parent's, never closed here
        return
    gate, me = _gate, get_ident()  # closing steps SQLite too (a thread's end closes here)
    try:
        gate.inside.append(me)
        if gate.forks:
            gate.wait_for_forks(me)
        with suppress(sqlite3.Error):
            conn.close()
    finally:
        try:  # noqa: SIM105 - inline, no call: a signal could land before the remove
            gate.inside.remove(me)
        except ValueError:  # interrupted before the append
            pass
        if gate.forks:
            gate.notify()


class _ForkGate:
    """Keeps os.fork out of SQLite's C code. SQLite has process-wide mutexes of its own (its
    memory allocator's, the unix VFS's inode and shm mutexes, the main static mutex), taken
    inside almost any call and out of reach from Python: a child forked while another
    thread of the parent held one inherits it held by a thread that does not exist there,
    and waits forever in its first SQLite call (bench/fork_hang.py: 18 forks in 200 beside
    8 busy threads before this gate, none after).

    Every region of this module that calls into SQLite (connecting, each read with its
    fetches, each write transaction from BEGIN to COMMIT or ROLLBACK, closing a
    connection) holds the gate shared: ``me = gate.enter()``, then ``gate.exit(me)`` on
    the same gate object (a child's stale region exits on the gate it entered), inlined in
    the two hot ones (:meth:`SQLiteStore.get`, :meth:`SQLiteStore._write`). The
    before-fork handler closes it (:meth:`close_for_fork`): new regions wait, and the fork
    waits for the regions in progress to end, at most ``timeout`` seconds, after which it
    goes on as it would without the gate; the parent's after-fork handler reopens it
    (:meth:`open_after_fork`), and a child makes a fresh gate of its own (_renew_gate).

    Cheap: a region appends its thread's id to ``inside`` and removes it after (list
    operations are atomic), and reads ``forks``: no lock, no thread-local. A region that
    finds a fork pending backs out and waits on the Condition (:meth:`wait_for_forks`);
    the fork checks ``inside`` after raising ``forks``, so one of the two sees the other.
    The thread ids tell a thread already inside (a nested region, a signal handler's):
    it never waits, and a fork from inside a region does not wait for its own thread.

    Lock order: a writer takes its store's write lock first, then the gate (the fork
    handler takes the write locks, then closes the gate), and no region waits on any
    other lock. Only SQLite calls made through SafeAgent are gated: other code of the
    process using SQLite (its own sqlite3 connections) is not.
    """

    __slots__ = ("_closed_at", "_forkers", "_idle", "_lock", "forks", "inside", "pid")

    def __init__(self) -> None:
        self.inside: list[int] = []  # the id of each thread inside a region, once per region
        self.forks = 0  # forks pending (two threads may fork at once); changed under _lock
        self._forkers: list[int] = []  # their threads, which pass the closed gate
        # Re-entrant: a connection collected by the cyclic GC while this thread holds it
        # (in notify, say) is closed in a region of its own, which may come here.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # waited on only while a fork is pending
        self._closed_at: float | None = None  # when the last fork was about to happen
        self.pid = os.getpid()

    def enter(self) -> int:
        me = get_ident()
        self.inside.append(me)
        if self.forks:
            try:
                self.wait_for_forks(me)
            except BaseException:  # interrupted while waiting: not inside
                self.exit(me)
                raise
        return me

    def exit(self, me: int) -> None:
        self.inside.remove(me)
        if self.forks:
            self.notify()

    def wait_for_forks(self, me: int) -> None:
        """A region entered (``me`` appended) while a fork is pending: unless this thread
        is inside already or is the one forking (a connection collected and closed by its
        later before-fork handlers, say), back out, wait for the fork, and enter again.
        Bounded, so a fork that never reopens the gate cannot stop the process's SQLite.
        ``me`` is in ``inside`` again when it returns or raises (the caller's exit removes
        it)."""
        inside = self.inside
        if me in self._forkers or inside.count(me) > 1:
            return  # (checked before the lock too: the forking thread may hold it)
        with self._lock:
            if not self.forks or me in self._forkers or inside.count(me) > 1:
                return
            inside.remove(me)
            try:
                self._idle.notify_all()  # the fork may have seen this entry, and wait for it
                deadline = time.monotonic() + _GATE_ENTRY_WAIT
                while self.forks and not self._expire_stale_fork():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._idle.wait(left)
            finally:
                inside.append(me)  # under the lock: a fork closing the gate after sees it

    def _expire_stale_fork(self) -> bool:
        """Under the lock: True, and the gate reopened, when a fork closed it more than
        ``_GATE_ENTRY_WAIT`` seconds ago and its after-fork handler never ran (an interrupt
        landed in it, which CPython reports and drops): else every region would wait that
        long from then on. A fork itself takes milliseconds."""
        closed = self._closed_at
        if closed is None or time.monotonic() - closed <= _GATE_ENTRY_WAIT:
            return False
        self.forks = 0
        self._forkers.clear()
        self._closed_at = None
        self._idle.notify_all()
        return True

    def notify(self) -> None:
        with self._lock:
            self._idle.notify_all()

    def close_for_fork(self, timeout: float) -> None:
        """In the forking thread, before the fork: hold new regions back and wait for the
        regions of other threads to end (at most ``timeout`` seconds)."""
        me = get_ident()
        inside = self.inside
        with self._lock:
            self.forks += 1
            self._forkers.append(me)
            deadline = time.monotonic() + timeout
            # A fork from inside a region (a signal handler's) does not wait for itself.
            while len(inside) > inside.count(me):
                left = deadline - time.monotonic()
                if left <= 0:
                    break  # give up: the fork goes on as it would without the gate
                try:
                    self._idle.wait(left)
                except BaseException:  # noqa: BLE001, S112 - a Ctrl-C here: CPython drops
                    continue  # it and forks anyway, so the wait must not end mid-call
            self._closed_at = time.monotonic()

    def open_after_fork(self) -> None:
        """In the parent, after the fork: let the regions held back go."""
        me = get_ident()
        with self._lock:
            if me in self._forkers:
                self._forkers.remove(me)
                self.forks -= 1
            if not self.forks:
                self._closed_at = None
                self._idle.notify_all()

    def reset_in_child(self) -> None:
        """In a child, on the gate inherited: fresh locks and no fork pending, so a region
        the forking thread was inside at the fork can still exit on it."""
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self.forks = 0
        self._forkers = []
        self._closed_at = None


# Seconds a region waits for a pending fork before going on without it (a fork handler
# that never reopens the gate must not stop the process; a fork takes milliseconds).
_GATE_ENTRY_WAIT = 10.0
# The fork's wait for regions in progress is the longest busy_timeout of the open stores
# (a region can wait that long in SQLite's busy handler), and at least this.
_GATE_MIN_FORK_WAIT = 1.0
_gate = _ForkGate()  # one for the process: SQLite's mutexes are process-wide


_UNSET: Any = object()


class _Job:
    """One write waiting for a group commit: ``work(conn, now_ms)`` and what it gave."""

    __slots__ = ("error", "event", "promoted", "result", "synchronous", "work")

    def __init__(self, work: Callable[[sqlite3.Connection, int], Any], synchronous: str) -> None:
        self.work = work
        self.synchronous = synchronous
        self.result: Any = _UNSET
        self.error: BaseException | None = None
        self.event: threading.Event | None = None
        self.promoted = False


class _TxnState:
    __slots__ = ("committed",)

    def __init__(self) -> None:
        self.committed = False


class _GroupCommit:
    """Claims and completions from many threads of one process, committed together.

    The first writer to arrive becomes the leader: it takes every job queued so far and
    runs them in one transaction with one commit (one fsync), while the writers that
    arrive meanwhile queue up for the next one. This is the group commit of database
    servers (PostgreSQL's commit_delay, InnoDB's binlog group commit): each caller still
    returns only after the commit that holds its write is durable, so no guarantee is
    weakened, but N concurrent claims share one fsync instead of paying N.

    Every thread but the main one: signal handlers run there, and an interrupt of a
    leader or a queued writer could land between any two bytecodes (_grouped).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: list[_Job] = []
        self.leading = False
        self.leader: int | None = None  # the thread id leading now


class SQLiteStore:
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
        holder: _ConnHolder | None = getattr(self._local, "holder", None)
        if holder is not None:
            if holder.pid == os.getpid():
                if (
                    holder.conn.in_transaction
                    and self._writer != get_ident()
                    and not getattr(self._local, "snapshots", 0)
                ):
                    return self._end_leftover(holder)
                return holder.conn
            holder.abandon()  # inherited across fork: never touch the parent's connection
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        gate, me = _gate, get_ident()
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
        return conn

    def _end_leftover(self, holder: _ConnHolder) -> sqlite3.Connection:
        """This thread's connection is inside a transaction no call of this thread is
        running: an interrupt (Ctrl-C, a signal handler's SystemExit) landed where nothing
        could end it, between two bytecodes of a write's or a snapshot's own handling. Roll
        it back (it never committed, and its callers were told so) before the next call:
        left open, a write transaction holds the file's write lock, so every other writer
        fails closed after its busy timeout, and a read transaction pins an old snapshot.
        A connection that cannot roll back is closed and a new one opened."""
        conn = holder.conn
        try:
            conn.execute("ROLLBACK")
            return conn
        except sqlite3.Error:
            self._local.holder = None
            holder.close()
            return self._conn()

    @contextmanager
    def _write(
        self, *, synchronous: str = "FULL", state: _TxnState | None = None
    ) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction that also writes buffered audit events.

        ``state``, when given, learns whether the transaction committed (an interrupt can
        arrive just after COMMIT returned)."""
        conn = self._conn()
        if self._pid != os.getpid():  # a forked child: locks held by the parent's threads
            self._after_fork()
        me = get_ident()
        if self._writer == me:  # a signal handler writing while its thread writes
            raise StoreError(
                f"SQLite write failed on {self.path}: this thread is already inside a write "
                "(a re-entrant call, from a signal handler?); nothing was written"
            )
        gate = _gate
        mutex = self._mutex
        try:  # from the acquire on: an interrupt as it returns must still release it
            if not mutex.acquire(timeout=self.busy_timeout):
                raise StoreError(
                    f"SQLite write failed on {self.path}: another thread held the write "
                    f"lock for more than {self.busy_timeout} s"
                )
            self._writer = me
            gate.inside.append(me)  # gate.enter() after the write lock (the fork's order)
            if gate.forks:
                gate.wait_for_forks(me)
            yield from self._transaction(conn, synchronous, state or _TxnState())
        finally:
            # The lock first: an interrupt landing further on leaves at worst a stale entry
            # in the fork gate (a fork waits for it, then goes on), never the lock held.
            if self._writer == me:
                self._writer = None
            if mutex._is_owned():  # type: ignore[attr-defined]
                mutex.release()
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
        if _gate.pid != self._pid:  # a child made without os.fork's handlers
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

    def _grouped(self, work: Callable[[sqlite3.Connection, int], T], synchronous: str) -> T:
        """Run ``work(conn, now_ms)`` in a transaction shared with the writes other threads
        of this process make at the same moment (see :class:`_GroupCommit`); returns its
        result once that transaction has committed. The main thread writes alone.

        Raises:
            StoreError: the write was not committed; the caller must not act on it.
        """
        if self._pid != os.getpid():
            self._after_fork()
        me = threading.get_ident()
        if me == threading.main_thread().ident:
            # The main thread, where Python runs signal handlers, writes alone: an
            # interrupt there (Ctrl-C, a handler's SystemExit or TimeoutError) can land in
            # any bytecode, so it must never hold another thread's write, nor leave one
            # queued or waiting on a commit it would lead. It takes the write lock
            # between batches of the other threads, which share their commits.
            with self._write(synchronous=synchronous) as conn:
                return work(conn, self._clock())
        job = _Job(work, synchronous)
        group = self._group
        with group.lock:
            group.pending.append(job)
            follow = group.leading
            if follow:
                job.event = threading.Event()
            else:
                group.leading, group.leader = True, me
        try:
            if not follow:
                self._lead(group, job)
            else:
                assert job.event is not None
                job.event.wait()
                if job.promoted:  # the last leader handed over: lead the next batch
                    self._lead(group, job)
        except BaseException:
            # Signals interrupt only the main thread, which does not come here; this is
            # for an exception raised into a thread (PyThreadState_SetAsyncExc). If
            # another thread's commit holds the job, wait for it to end, so the caller's
            # undo (Guard releases a claim it cannot use) reads the write's final state.
            if not self._abandon(group, job) and job.event is not None:
                job.event.wait()
            raise
        if job.error is not None:
            raise job.error
        if job.result is _UNSET:  # pragma: no cover - every path sets one or the other
            raise StoreError(f"SQLite write failed on {self.path}: not committed")
        return job.result  # type: ignore[no-any-return]

    def _abandon(self, group: _GroupCommit, job: _Job) -> bool:
        """A waiting writer was interrupted: withdraw its job, and if it had just been
        handed the lead, hand it on, so no one is left waiting for a leader. Returns
        whether the job was withdrawn before any commit took it."""
        successor = None
        with group.lock:
            withdrawn = job in group.pending
            if withdrawn:
                group.pending.remove(job)
            if job.promoted:
                job.promoted = False
                if group.pending:
                    successor = group.pending[0]
                    successor.promoted = True
                else:
                    group.leading, group.leader = False, None
        if successor is not None and successor.event is not None:
            successor.event.set()
        return withdrawn

    def _lead(self, group: _GroupCommit, own: _Job) -> None:
        """Commit every queued job as one batch, then hand the lead to a waiting writer."""
        batch: list[_Job] = []
        try:
            with group.lock:
                own.promoted = False
                group.leader = threading.get_ident()
                batch, group.pending = group.pending, []
            self._commit_batch(batch, own)
        finally:
            with group.lock:
                successor = group.pending[0] if group.pending else None
                group.leader = None  # (leading stays True while a successor takes over)
                if successor is None:
                    group.leading = False
                else:
                    successor.promoted = True
            for job in batch:
                if job.result is _UNSET and job.error is None:
                    job.error = StoreError(
                        f"SQLite write failed on {self.path}: the thread committing it was "
                        "interrupted; it may not have been written"
                    )
                if job.event is not None:
                    job.event.set()
            if successor is not None and successor.event is not None:
                successor.event.set()

    def _commit_batch(self, batch: list[_Job], own: _Job) -> None:
        """One transaction for ``batch``: with more than one job, each runs under its own
        savepoint, so a write SQLite refuses is undone and fails alone while the others
        commit. A failure of the transaction itself (lock, BEGIN, COMMIT) fails them all
        once, as a single write would."""
        single = len(batch) == 1
        full = (
            batch[0].synchronous == "FULL"
            if single
            else any(job.synchronous == "FULL" for job in batch)
        )
        sync = "FULL" if full else "NORMAL"
        state = _TxnState()
        try:
            with self._write(synchronous=sync, state=state) as conn:
                now = self._clock()
                if single:
                    batch[0].result = batch[0].work(conn, now)
                    return
                for job in batch:
                    conn.execute("SAVEPOINT safeagent_job")
                    try:
                        job.result = job.work(conn, now)
                    except Exception as exc:
                        if not conn.in_transaction:  # SQLite undid the whole transaction
                            raise
                        conn.execute("ROLLBACK TO safeagent_job")
                        job.error = self._own_error(exc)
                    conn.execute("RELEASE safeagent_job")
        except BaseException as exc:
            if state.committed:  # interrupted after COMMIT: every result stands
                raise
            for job in batch:
                job.result = _UNSET
                if job is own:
                    job.error = exc
                else:
                    job.error = StoreError(f"SQLite write failed on {self.path}: {exc}")
                    job.error.__cause__ = exc
            if not isinstance(exc, Exception):
                raise  # an interrupt of this thread: its caller sees it

    def _own_error(self, exc: Exception) -> Exception:
        if isinstance(exc, sqlite3.Error):
            error = StoreError(f"SQLite write failed on {self.path}: {exc}")
            error.__cause__ = exc
            return error
        return exc

    @staticmethod
    def _insert_events(conn: sqlite3.Connection, events: Sequence[AuditEvent]) -> None:
        """Append events to their hash chains, in order (the write lock is held: no one
        interleaves): the heads they extend are read (one row when they share a chain, the
        table otherwise), checked, the events hashed in Python and inserted; the trigger
        moves each head. A missing or unusable head (the table was altered) writes
        nothing."""
        if not events:
            return
        each = [shard_of(e.namespace, e.subject, CHAIN_SHARDS) for e in events]
        shards = set(each)
        if len(shards) == 1:  # one head to read (every claim and completion)
            (shard,) = shards
            row = conn.execute(SQL_HEAD, (shard,)).fetchone()
            heads: Heads = {} if row is None else {shard: (row[0], row[1])}
        else:
            heads = {shard: (seq, head) for shard, seq, head in conn.execute(SQL_HEADS)}
        for shard in shards:
            if shard not in heads:
                raise sqlite3.DatabaseError("audit chain head missing; events not written")
            _check_head(shard, *heads[shard])
        conn.executemany(SQL_APPEND, chain_rows(events, heads, each))

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
        """``fn(conn)``, its fetches included, inside the fork gate (fn takes no lock)."""
        conn = self._conn()
        gate, me = _gate, get_ident()
        try:
            gate.inside.append(me)
            if gate.forks:
                gate.wait_for_forks(me)
            return fn(conn)
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
            # Counted, so a signal handler's call in the middle (on this thread, this
            # connection) does not take this transaction for a leftover (_conn); its own
            # snapshot or write fails instead ("cannot start a transaction within a
            # transaction"), and this one goes on.
            local = self._local
            local.snapshots = getattr(local, "snapshots", 0) + 1
            try:
                conn.execute("BEGIN")  # inside the try: an interrupt as it returns ends it
                return fn(conn)
            finally:
                local.snapshots -= 1
                if conn.in_transaction and not local.snapshots:
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

    def _maybe_flush(self) -> None:
        """Write the buffer if it is due; a failure keeps the events for the next write
        rather than failing the read or replay that triggered it."""
        if self._buffer.due():
            with suppress(StoreError):
                self.flush_events()

    # -- the store interface ---------------------------------------------------------

    def get(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        if self._buffer:
            self._maybe_flush()
        conn = self._conn()
        gate = _gate  # _read, with the gate inline: every call reads its record first
        me = get_ident()
        try:
            gate.inside.append(me)
            if gate.forks:
                gate.wait_for_forks(me)
            row = conn.execute(SQL_GET, (namespace, request_id)).fetchone()
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

    @staticmethod
    def _settle(
        conn: sqlite3.Connection, record: Record, case_id: str, actor: str, now: int
    ) -> list[AuditEvent]:
        row = conn.execute(SQL_SETTLE_CASE, (now, record.namespace, case_id)).fetchone()
        if row is None:
            return []
        return [settled_event(row_to_case(row), record.execution_id, actor, now)]

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

    def record_event(self, event: AuditEvent, *, buffered: bool = False) -> None:
        if buffered:
            self._buffer.add(stamped(event, self._clock()))
            self._maybe_flush()
            return
        with self._write() as conn:
            self._insert_events(conn, [stamped(event, self._clock())])

    def flush_events(self) -> None:
        if self._buffer and not self._closed:
            with self._write():
                pass  # _write writes the buffer inside its transaction

    def _rows_as_stored(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of the read-only ``sql`` as stored, unparsed: for reading rows one by
        one when a parser refuses one of them (``safeagent.stores._as_stored``). Tables
        are written ``{t}executions``; parameters ``?``.

        Raises:
            StoreError: the read failed.
        """
        text = sql.format(t="")
        return self._read(lambda conn: conn.execute(text, list(args)).fetchall())

    def events(
        self,
        *,
        namespace: str | None = None,
        subject: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        self.flush_events()
        sql = f"SELECT {EVENT_COLUMNS} FROM audit_events WHERE id > ?"
        args: list[Any] = [after_id]
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if subject is not None:
            sql += " AND subject = ?"
            args.append(subject)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._read(lambda c: c.execute(sql, args).fetchall())
        return [row_to_event(r) for r in rows]

    def records(
        self,
        *,
        namespace: str | None = None,
        statuses: Sequence[Status] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Record], int]:
        sql = f"SELECT {COLUMNS} FROM executions WHERE 1 = 1"
        args: list[Any] = []
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if statuses is not None:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args.extend(s.value for s in statuses)
        sql += " ORDER BY created_at_ms, namespace, request_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._read(lambda c: c.execute(sql, args).fetchall())
        return [row_to_record(r) for r in rows], self._clock()

    # -- cases -----------------------------------------------------------------------------

    def get_case(self, namespace: str, case_id: str) -> tuple[CaseRow | None, list[Signal]]:
        def read(conn: sqlite3.Connection) -> tuple[CaseRow | None, list[Signal]]:
            row = conn.execute(SQL_GET_CASE, (namespace, case_id)).fetchone()
            if row is None:
                return None, []
            live = conn.execute(SQL_LIVE_SIGNALS, (namespace, case_id)).fetchall()
            return row_to_case(row), [row_to_signal(r) for r in live]

        return self._snapshot(read)  # one read transaction: the case and its signals agree

    def _open_case(
        self,
        conn: sqlite3.Connection,
        namespace: str,
        case_id: str,
        policy: tuple[float, int],
        now: int,
        events: list[AuditEvent],
    ) -> CaseRow:
        row = conn.execute(
            SQL_OPEN_CASE, (namespace, case_id, policy[0], policy[1], now, now)
        ).fetchone()
        if row is not None:
            case = row_to_case(row)
            events.append(
                state_change_event(case, None, CaseState.OPEN, None, "safeagent", {}, now)
            )
            return case
        return row_to_case(conn.execute(SQL_GET_CASE, (namespace, case_id)).fetchone())

    def open_case(self, namespace: str, case_id: str, threshold: float, quorum: int) -> CaseRow:
        events: list[AuditEvent] = []
        with self._write() as conn:
            now = self._clock()
            case = self._open_case(conn, namespace, case_id, (threshold, quorum), now, events)
            self._insert_events(conn, events)
        return case

    def update_case(
        self,
        namespace: str,
        case_id: str,
        mutate: CaseMutation,
        *,
        signal: Signal | None,
        actor: str,
        detail: dict[str, Any],
        open_with: tuple[float, int] | None = None,
    ) -> CaseUpdate:
        events: list[AuditEvent] = []
        with self._write() as conn:
            now = self._clock()
            if open_with is not None:
                case = self._open_case(conn, namespace, case_id, open_with, now, events)
            else:
                row = conn.execute(SQL_GET_CASE, (namespace, case_id)).fetchone()
                if row is None:
                    raise InvalidTransitionError(
                        f"no case {case_id!r} in namespace {namespace!r}", case_id=case_id
                    )
                case = row_to_case(row)
            live = [
                row_to_signal(r)
                for r in conn.execute(SQL_LIVE_SIGNALS, (namespace, case_id)).fetchall()
            ]
            change = mutate(case, live)
            if signal is not None:
                signal = Signal(
                    signal.source, signal.outcome, signal.confidence, signal.metadata, now
                )
                if not change.late:
                    conn.execute(
                        "UPDATE signals SET status = 'replaced' WHERE namespace = ? AND "
                        "case_id = ? AND source = ? AND status = 'live'",
                        (namespace, case_id, signal.source),
                    )
                    live = [s for s in live if s.source != signal.source] + [signal]
                conn.execute(
                    "INSERT INTO signals (namespace, case_id, source, outcome, confidence,"
                    " metadata, at_ms, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        namespace,
                        case_id,
                        signal.source,
                        signal.outcome,
                        signal.confidence,
                        dumps(dict(signal.metadata)),
                        now,
                        "late" if change.late else "live",
                    ),
                )
            after = case
            if change.path or (signal is not None and not change.late):
                row = conn.execute(
                    f"UPDATE cases SET state = ?, provisional_outcome = ?, outcome = ?,"
                    f" version = version + 1, updated_at_ms = ?,"
                    f" resolved_by = COALESCE(?, resolved_by)"
                    f" WHERE namespace = ? AND case_id = ? RETURNING {CASE_COLUMNS}",
                    (
                        (change.path[-1] if change.path else case.state).value,
                        change.stored_provisional(change.path[-1] if change.path else case.state),
                        change.outcome,
                        now,
                        detail.get("by"),
                        namespace,
                        case_id,
                    ),
                ).fetchone()
                after = row_to_case(row)
            events += case_events(case, change, signal, actor, detail, now)
            self._insert_events(conn, events)
        return CaseUpdate(case=after, live=live, change=change)

    def cases(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[CaseRow]:
        sql = f"SELECT {CASE_COLUMNS} FROM cases WHERE 1 = 1"
        args: list[Any] = []
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if states is not None:
            sql += f" AND state IN ({', '.join('?' for _ in states)})"
            args.extend(s.value for s in states)
        sql += " ORDER BY created_at_ms, namespace, case_id"
        return [row_to_case(r) for r in self._read(lambda c: c.execute(sql, args).fetchall())]

    def cases_with_live(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[tuple[CaseRow, list[Signal]]]:
        """:meth:`cases`, each with its live signals (oldest first), read in one statement:
        one snapshot, so no case's row is of one moment and its signals of another."""
        sql = SQL_CASES_LIVE
        args: list[Any] = []
        if namespace is not None:
            sql += " AND c.namespace = ?"
            args.append(namespace)
        if states is not None:
            sql += f" AND c.state IN ({', '.join('?' for _ in states)})"
            args.extend(s.value for s in states)
        sql += " ORDER BY c.created_at_ms, c.namespace, c.case_id, s.id"
        out: list[tuple[CaseRow, list[Signal]]] = []
        for row in self._read(lambda c: c.execute(sql, args).fetchall()):
            if not out or (out[-1][0].namespace, out[-1][0].case_id) != (row[0], row[1]):
                out.append((row_to_case(row), []))
            if row[_N_CASE_COLUMNS] is not None:  # a live signal (source is NOT NULL)
                out[-1][1].append(row_to_signal(row[_N_CASE_COLUMNS:]))
        return out

    def case_signals(self, namespace: str, case_id: str) -> list[tuple[Signal, str]]:
        rows = self._read(
            lambda c: c.execute(
                "SELECT source, outcome, confidence, metadata, at_ms, status FROM signals"
                " WHERE namespace = ? AND case_id = ? ORDER BY id",
                (namespace, case_id),
            ).fetchall()
        )
        return [(row_to_signal(r), r[5]) for r in rows]

    # -- tamper evidence and retention -------------------------------------------------

    def audit_chain(self) -> tuple[list[tuple[Any, ...]], Heads]:
        """Every event row (``CHAIN_COLUMNS`` order, by shard and seq; rows outside the
        chains, with a NULL shard, come too, so verification can report them) and the
        chain heads as stored (shard -> (seq, hash)). No index serves the order: SQLite
        sorts the events, which an offline verification can afford."""
        self.flush_events()

        def read(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[Any, ...]], dict[int, tuple[int, str]]]:
            rows = conn.execute(
                f"SELECT {CHAIN_COLUMNS} FROM audit_events ORDER BY shard, seq, id"
            ).fetchall()
            heads = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT * FROM audit_chain")}
            return [tuple(r) for r in rows], heads

        return self._snapshot(read)

    def subject_snapshot(
        self, namespace: str, subject: str
    ) -> tuple[Record | None, CaseRow | None, list[tuple[Signal, str]], list[tuple[Any, ...]]]:
        """One subject as one snapshot, for verification to read again what looked wrong:
        the execution record with request id ``subject``, the case with case id ``subject``
        and its signals (as :meth:`case_signals`), and the subject's event rows by id
        (``EVENT_COLUMNS`` order, unparsed), all in one read transaction."""
        self.flush_events()

        def read(conn: sqlite3.Connection) -> tuple[Any, ...]:
            key = (namespace, subject)
            return (
                conn.execute(SQL_GET, key).fetchone(),
                conn.execute(SQL_GET_CASE, key).fetchone(),
                conn.execute(
                    "SELECT source, outcome, confidence, metadata, at_ms, status FROM signals"
                    " WHERE namespace = ? AND case_id = ? ORDER BY id",
                    key,
                ).fetchall(),
                conn.execute(
                    f"SELECT {EVENT_COLUMNS} FROM audit_events"
                    " WHERE namespace = ? AND subject = ? ORDER BY id",
                    key,
                ).fetchall(),
            )

        record, case, signals, events = self._snapshot(read)
        return (
            None if record is None else row_to_record(record),
            None if case is None else row_to_case(case),
            [(row_to_signal(r), r[5]) for r in signals],
            [tuple(r) for r in events],
        )

    def add_anchor(self, heads_json: str, mac: str) -> tuple[int, int]:
        """Store an anchor of the chain heads; returns ``(id, at_ms)``."""
        with self._write() as conn:
            now = self._clock()
            cur = conn.execute(
                "INSERT INTO audit_anchors (at_ms, heads, mac) VALUES (?, ?, ?)",
                (now, heads_json, mac),
            )
            return int(cur.lastrowid or 0), now

    def anchors(self, *, last: int | None = None) -> list[tuple[int, int, str, str]]:
        """Every anchor ``(id, at_ms, heads_json, mac)``, oldest first; with ``last``,
        only the newest ``last`` of them."""
        sql = "SELECT id, at_ms, heads, mac FROM audit_anchors ORDER BY id"
        args: tuple[Any, ...] = ()
        if last is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT ?) ORDER BY id"
            args = (last,)
        rows = self._read(lambda c: c.execute(sql, args).fetchall())
        return [tuple(r) for r in rows]

    def chain_heads(self) -> dict[int, tuple[int, str]]:
        """The current head of every chain: shard -> (seq, hash)."""
        self.flush_events()
        return self._read(
            lambda c: {
                r[0]: (r[1], r[2]) for r in c.execute("SELECT shard, seq, head FROM audit_chain")
            }
        )

    def purge(self, cutoff_ms: int, actor: str) -> dict[str, int]:
        """Retention: records finished before ``cutoff_ms`` lose payload and result and
        keep a tombstone (identity, action, fingerprint, final status); released records
        lose their payload too but keep their row, so the next claim of the id goes on
        from their fencing token (it never goes back); pending and in-doubt records are
        never touched, and counted as read at the store's clock: a PENDING record whose
        lease has expired counts as in doubt (``kept_in_doubt``), as it reads. Audited."""
        with self._write() as conn:
            now = self._clock()
            released = conn.execute(
                "UPDATE executions SET payload = '', result = NULL, error_message = NULL,"
                " purged_at_ms = ? WHERE status = 'RELEASED' AND purged_at_ms IS NULL"
                " AND updated_at_ms < ?",
                (now, cutoff_ms),
            ).rowcount
            tombstoned = conn.execute(
                "UPDATE executions SET payload = '', result = NULL, error_message = NULL,"
                " purged_at_ms = ? WHERE status IN ('SUCCEEDED', 'FAILED')"
                " AND purged_at_ms IS NULL AND COALESCE(completed_at_ms, updated_at_ms) < ?",
                (now, cutoff_ms),
            ).rowcount
            kept = dict(  # as read at now: an expired PENDING lease is in doubt
                conn.execute(
                    "SELECT CASE WHEN status = 'PENDING' AND (lease_expires_at_ms IS NULL"
                    " OR lease_expires_at_ms > ?) THEN 'PENDING' ELSE 'IN_DOUBT' END AS seen,"
                    " count(*) FROM executions WHERE status IN ('PENDING', 'IN_DOUBT')"
                    " GROUP BY seen",
                    (now,),
                ).fetchall()
            )
            counts = {
                "tombstoned": tombstoned,
                "released": released,
                "kept_pending": int(kept.get("PENDING", 0)),
                "kept_in_doubt": int(kept.get("IN_DOUBT", 0)),
            }
            self._insert_events(conn, [purged_event(now, cutoff_ms, actor, counts)])
        return counts

    def close(self) -> None:
        """Write buffered audit events and close every connection this store opened."""
        if self._closed:
            return
        try:
            self.flush_events()
        finally:
            self._closed = True
            self._buffer.detach()
            # No connection is closed under a thread still writing with it (that crashes
            # the sqlite3 module): wait for the write lock, as a writer would.
            locked = self._pid == os.getpid() and self._mutex.acquire(timeout=self.busy_timeout)
            try:
                for holder in list(self._holders):
                    holder.close()
                self._local = threading.local()
            finally:
                if locked:
                    self._mutex.release()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_live_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
# The stores whose write lock the forking thread took, and the gate it closed (per thread:
# two threads may fork at once, and each releases only what it took).
_fork_held = threading.local()


def _renew_gate() -> None:
    """In a child: a fresh gate for the regions to come; the inherited one is reset, so a
    region the forking thread was inside at the fork exits on it without waiting."""
    global _gate
    old, _gate = _gate, _ForkGate()
    old.reset_in_child()


def _fork_stack() -> list[tuple[list[SQLiteStore], _ForkGate | None]]:
    """This thread's forks in progress, innermost last: (stores whose write lock it took,
    the gate it closed). A stack, because a signal handler may fork while its thread's
    own fork waits in these handlers."""
    stack: list[tuple[list[SQLiteStore], _ForkGate | None]] | None = getattr(
        _fork_held, "stack", None
    )
    if stack is None:
        stack = _fork_held.stack = []
    return stack


def _before_fork() -> None:
    """Write locks first (a fork waits for a write in progress, and holds the lock across
    the fork), then the gate: no SafeAgent thread is inside SQLite at the fork."""
    stack = _fork_stack()
    outer = {id(store) for stores, _ in stack for store in stores}  # held by this thread
    held: list[SQLiteStore] = []
    stack.append((held, None))
    stores = list(_live_stores)
    for store in stores:
        if id(store) in outer:
            continue  # its outer fork holds the lock: waiting for it would wait for itself
        with suppress(Exception):  # one store cannot keep the others from being handled
            if store._lock_for_fork():
                held.append(store)
    wait = max((getattr(s, "busy_timeout", 0.0) for s in stores), default=0.0)
    gate = _gate
    stack[-1] = (held, gate)
    with suppress(Exception):
        gate.close_for_fork(max(wait, _GATE_MIN_FORK_WAIT))


def _after_fork_in_parent() -> None:
    stack = _fork_stack()
    held, gate = stack.pop() if stack else ([], None)
    if gate is not None:
        with suppress(Exception):
            gate.open_after_fork()
    for store in held:
        with suppress(RuntimeError):
            store._mutex.release()


def _after_fork_in_child() -> None:
    _fork_held.stack = []  # the child remakes every lock, those included
    _renew_gate()
    for store in list(_live_stores):
        with suppress(Exception):
            store._after_fork()


# Run only at a fork, never on a call (tests/test_fork_safety.py).
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
