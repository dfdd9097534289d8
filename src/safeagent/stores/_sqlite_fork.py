"""Each thread's connection, and fork safety, of the SQLite store.

``_ConnHolder``, one thread's connection of a
:class:`~safeagent.stores.sqlite.SQLiteStore`, closed when its thread ends and never in a
forked child (``_abandoned``); ``_ForkGate``, which keeps ``os.fork`` out of SQLite's C
code, and ``_gate``, the process's; the open stores (``_live_stores``) and the fork
handlers registered at import (``_before_fork``, ``_after_fork_in_parent``,
``_after_fork_in_child``).

A forked child rebinds ``_gate`` (``_renew_gate``): other modules read it through this one
(``_sqlite_fork._gate``), never a copy of the name, which would keep the parent's gate.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from contextlib import suppress
from threading import get_ident
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safeagent.stores.sqlite import SQLiteStore


class _ConnHolder:
    """One thread's connection. When the thread ends, its ``threading.local`` slot is
    dropped, the holder is collected and the connection closed: a thread-per-request
    server does not leak a connection (and two file descriptors) per request."""

    __slots__ = ("__weakref__", "_finalizer", "conn", "lock", "pid", "thread")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # Held by its thread through every call into SQLite with ``conn`` (re-entrant: a
        # signal handler's call inside one), and by SQLiteStore.close() to close it: a
        # connection closed while a thread is inside SQLite with it crashes the sqlite3
        # module.
        self.lock = threading.RLock()
        self.pid = os.getpid()
        self.thread = get_ident()  # the thread it belongs to (made on it, by _holder)
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

    Every region of the store that calls into SQLite (connecting, each read with its
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
