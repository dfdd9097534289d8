"""The group commit of the SQLite store (:class:`~safeagent.stores.sqlite.SQLiteStore`).

``_SQLiteGroupCommit``: ``_grouped`` runs a claim's or a completion's write in one
transaction with the writes other threads of the process make at the same moment: a
writer queues its job and leads the batch or waits for the thread that does (``_lead``,
``_commit_batch``), and withdraws it when interrupted (``_abandon``). The main thread,
where signal handlers run, writes alone.
``_GroupCommit`` is a store's queue, ``_Job`` one write in it, ``_TxnState`` whether a
transaction committed.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from safeagent.errors import StoreError
from safeagent.stores._base import Clock

T = TypeVar("T")


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


class _SQLiteGroupCommit:
    """The group commit of :class:`~safeagent.stores.sqlite.SQLiteStore` (module
    docstring). The state it reads and the methods it calls are SQLiteStore's, declared
    here."""

    path: str
    _clock: Clock
    _group: _GroupCommit
    _pid: int

    if TYPE_CHECKING:  # SQLiteStore's (sqlite.py)

        def _write(
            self, *, synchronous: str = "FULL", state: _TxnState | None = None
        ) -> AbstractContextManager[sqlite3.Connection]: ...

        def _after_fork(self) -> None: ...

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
            if self._group.leading:
                # Their leader may be waiting for the write lock this thread just gave
                # up: let it run first. Without this the main thread, holding the GIL,
                # took the lock back at once most times, for 2-4x its share of writes.
                time.sleep(0)  # (no lock: a signal handler's call here cannot deadlock)
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
