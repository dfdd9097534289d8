"""Fork safety: a child forked while another thread of the parent holds one of the
library's process-wide locks completes its guarded calls, and renews its leases.

Each test holds a lock deterministically (a helper thread acquires it, then waits on an
Event), forks a real child (``os.fork``, or ``multiprocessing`` with the ``fork`` start
method) and has the child make a real guarded call. A lock inherited held would never be
released in the child (its owner thread does not exist there), so a deadlock shows as a
child that does not finish in time: its stacks are dumped (faulthandler) and it is
killed, which fails the test instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import importlib
import json
import linecache
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from safeagent import AsyncGuard, ExecutionContext, Guard, InProgressError, SQLiteStore, Status
from safeagent._runtime import heartbeats, wakeups
from tests.conftest import PG_URL, pg_schema, require_postgres

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only"),
    # Python 3.12+ warns on every fork of a multi-threaded process: forking while other
    # threads hold locks is what these tests do on purpose.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

CHILD_TIMEOUT = 20.0  # seconds; a child still running then is taken as deadlocked
LEASE = 0.3  # seconds: renewed every 0.1 s
WORK = 1.0  # seconds fn sleeps, more than three leases


@contextmanager
def held(*locks: Any) -> Iterator[None]:
    """Each lock held by a thread of its own (acquired before the block starts, released
    when it ends), as a thread of the parent inside ``with lock:`` at the fork would."""
    release = threading.Event()
    holders = []
    for lock in locks:
        acquired = threading.Event()

        def hold(lock: Any = lock, acquired: threading.Event = acquired) -> None:
            with lock:
                acquired.set()
                release.wait()

        holder = threading.Thread(target=hold, name="lock-holder", daemon=True)
        holder.start()
        assert acquired.wait(5), f"{lock!r} could not be taken"
        holders.append(holder)
    try:
        yield
    finally:
        release.set()
        for holder in holders:
            holder.join(5)


def _child_main(work: Callable[[], Any], out: Path, stacks: Path, timeout: float) -> None:
    """The child's whole life: ``work()``, its answer written to ``out``, then _exit (the
    child never returns into pytest). Past ``timeout`` seconds every thread's stack is
    dumped to ``stacks`` and the child exits 1."""
    code = 1
    try:
        with stacks.open("w") as dump:
            faulthandler.dump_traceback_later(timeout, exit=True, file=dump)
            try:
                out.write_text(json.dumps({"result": work()}))
                code = 0
            finally:
                faulthandler.cancel_dump_traceback_later()
    except BaseException:
        out.write_text(json.dumps({"error": traceback.format_exc()}))
    finally:
        os._exit(code)


def _reap(pid: int, out: Path, stacks: Path, timeout: float) -> Any:
    """Wait for the child (killing it past the timeout); its answer, or a failed test."""
    deadline = time.monotonic() + timeout + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child hung and was killed:\n{_read(stacks)}")
        time.sleep(0.01)
    return _answer(os.waitstatus_to_exitcode(status), out, stacks, timeout)


def _answer(code: int | None, out: Path, stacks: Path, timeout: float) -> Any:
    answer = json.loads(out.read_text()) if out.exists() else {}
    if "error" in answer:
        pytest.fail(f"the forked child raised:\n{answer['error']}")
    assert code == 0, (
        f"the forked child exited with {code} (still running after {timeout} s: "
        f"deadlocked?):\n{_read(stacks)}"
    )
    return answer["result"]


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _paths(tmp_path: Path) -> tuple[Path, Path]:
    name = uuid.uuid4().hex[:8]
    return tmp_path / f"child-{name}.json", tmp_path / f"child-{name}.stacks"


def in_forked_child(work: Callable[[], Any], tmp_path: Path, timeout: float = CHILD_TIMEOUT) -> Any:
    """``work()`` run in a child made by ``os.fork`` from this thread; what it returned
    (a JSON value). Fails the test if the child raised, or was still running after
    ``timeout`` seconds (deadlocked: its stacks are in the failure message)."""
    out, stacks = _paths(tmp_path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which never returns
        _child_main(work, out, stacks, timeout)
    return _reap(pid, out, stacks, timeout)


def in_multiprocessing_child(
    work: Callable[[], Any], tmp_path: Path, timeout: float = CHILD_TIMEOUT
) -> Any:
    """:func:`in_forked_child` through ``multiprocessing`` with the ``fork`` start method,
    the way an application starting workers would fork."""
    out, stacks = _paths(tmp_path)
    process = multiprocessing.get_context("fork").Process(
        target=_child_main, args=(work, out, stacks, timeout), name="forked-child"
    )
    process.start()
    process.join(timeout + 10)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"the forked child hung and was killed:\n{_read(stacks)}")
    return _answer(process.exitcode, out, stacks, timeout)


def _export(ctx: ExecutionContext) -> dict[str, Any]:
    return {"exported": ctx.request_id, "pid": os.getpid()}


def guarded_call(guard: Guard, request_id: str) -> dict[str, Any]:
    """One guarded call; what the parent checks of it."""
    receipt = guard.execute(request_id, "export", {"n": 1}, _export)
    return {"result": receipt.result, "replay": receipt.replay, "status": str(receipt.status)}


def long_call(guard: Guard, request_id: str) -> dict[str, Any]:
    """A guarded call whose fn outlives three leases, reading the record's lease expiry as
    it starts and just before it ends (the heartbeat must have pushed it forward), and
    the names of the threads running then."""
    seen: dict[str, Any] = {}

    def export(ctx: ExecutionContext) -> int:
        first = guard.get(ctx.request_id)
        assert first is not None
        time.sleep(WORK)
        last = guard.get(ctx.request_id)
        assert last is not None
        seen.update(
            first=first.lease_expires_at_ms,
            last=last.lease_expires_at_ms,
            status=str(last.status),
            threads=[t.name for t in threading.enumerate()],
        )
        return os.getpid()

    receipt = guard.execute(request_id, "export", {}, export, lease=LEASE)
    return {**seen, "result": receipt.result, "replay": receipt.replay}


def check_renewed(call: dict[str, Any], pid: int) -> None:
    """The lease of ``call`` (made by process ``pid``) was renewed while its fn ran."""
    assert call["result"] == pid
    assert call["replay"] is False
    assert call["status"] == "PENDING"
    assert "safeagent-heartbeat" in call["threads"]
    # Without a renewal the expiry would not move; renewed every 0.1 s over WORK seconds,
    # it moves about 1000 ms (half of that leaves room for a loaded host).
    assert call["last"] - call["first"] >= 500, call


def _locks(which: str) -> tuple[Any, ...]:
    """The runtime locks named ``which``: ``heartbeats``, ``wakeups`` or ``both``."""
    locks = {"heartbeats": (heartbeats._lock,), "wakeups": (wakeups._lock,)}
    return locks.get(which, (heartbeats._lock, wakeups._lock))


@pytest.mark.parametrize("which", ["heartbeats", "wakeups"])
@pytest.mark.parametrize("fork", [in_forked_child, in_multiprocessing_child], ids=["os", "mp"])
def test_child_completes_a_guarded_call_while_a_parent_thread_holds_a_runtime_lock(
    which: str, fork: Callable[[Callable[[], Any], Path], Any], tmp_path: Path
) -> None:
    """A child forked while another thread holds the heartbeat or wake-up lock completes a
    guarded call on SQLite; the parent then replays it, and runs calls of its own."""
    guard = Guard(tmp_path / "guard.db", wait=0)
    assert guarded_call(guard, "before-fork")["replay"] is False  # a renewal thread runs

    with held(*_locks(which)):
        child = fork(lambda: guarded_call(guard, "in-child"), tmp_path)
    assert child["replay"] is False
    assert child["status"] == "SUCCEEDED"
    assert child["result"]["exported"] == "in-child"
    assert child["result"]["pid"] != os.getpid()

    # The parent: the child's receipt is durable and replayed, new calls run.
    assert guarded_call(guard, "in-child") == {**child, "replay": True}
    assert guarded_call(guard, "after-fork")["result"]["pid"] == os.getpid()
    guard.close()


def test_child_renews_its_leases_while_a_parent_thread_holds_the_runtime_locks(
    tmp_path: Path,
) -> None:
    """In a child forked while both runtime locks are held, a fn outliving three short
    leases has its lease renewed by a heartbeat thread of the child's own; afterwards the
    parent's leases are still renewed too."""
    guard = Guard(tmp_path / "guard.db", wait=0)
    guarded_call(guard, "before-fork")

    with held(*_locks("both")):
        child = in_forked_child(lambda: long_call(guard, "long-in-child"), tmp_path)
    assert child["result"] != os.getpid()
    check_renewed(child, child["result"])
    record = guard.get("long-in-child")
    assert record is not None
    assert record.status is Status.SUCCEEDED

    check_renewed(long_call(guard, "long-in-parent"), os.getpid())
    guard.close()


def test_async_guard_in_child_while_a_parent_thread_holds_the_runtime_locks(
    tmp_path: Path,
) -> None:
    """AsyncGuard (its own event loop, in the child) completes a call too."""
    db = tmp_path / "guard.db"

    async def call() -> dict[str, Any]:
        guard = AsyncGuard(db, wait=0)
        try:
            receipt = await guard.execute("async-in-child", "export", {"n": 1}, _export)
            return {"result": receipt.result, "replay": receipt.replay}
        finally:
            await guard.aclose()

    Guard(db).close()  # the file exists before the fork
    with held(*_locks("both")):
        child = in_forked_child(lambda: asyncio.run(call()), tmp_path)
    assert child["replay"] is False
    assert child["result"]["exported"] == "async-in-child"
    guard = Guard(db, wait=0)
    assert guarded_call(guard, "async-in-child")["replay"] is True
    guard.close()


def test_child_completes_a_guarded_call_while_a_parent_thread_holds_the_sqlite_locks(
    tmp_path: Path,
) -> None:
    """The store's own write lock and group-commit lock, held by another thread at the
    fork, do not stop the child's call on the same store object (SQLiteStore makes new
    ones in the child): a regression test for sqlite.py. (busy_timeout=1: a fork may wait
    that long for the write lock, once sqlite.py waits for the write in progress.)"""
    guard = Guard(SQLiteStore(tmp_path / "guard.db", busy_timeout=1), wait=0)
    guarded_call(guard, "before-fork")
    store: Any = guard.store

    with held(store._mutex, store._group.lock, *_locks("both")):
        child = in_forked_child(lambda: guarded_call(guard, "in-child"), tmp_path)
    assert child["status"] == "SUCCEEDED"
    assert guarded_call(guard, "in-child")["replay"] is True
    assert guarded_call(guard, "after-fork")["replay"] is False
    store.close()


def test_fork_while_a_guarded_call_runs_in_another_thread(tmp_path: Path) -> None:
    """The fork of a busy process: one thread inside fn (its claim live, its beat in the
    heartbeat's set, its wake-up slot waited on by a second thread). The child sees that
    claim as another process's (in progress) and runs calls of its own; the parent's call
    and its waiter finish normally."""
    guard = Guard(tmp_path / "guard.db", wait=0)
    waiter_guard = Guard(tmp_path / "guard.db", wait=30)
    inside, finish = threading.Event(), threading.Event()
    answers: dict[str, Any] = {}

    def slow(ctx: ExecutionContext) -> str:
        inside.set()
        assert finish.wait(30)
        return "parent-done"

    def run() -> None:
        # A long lease: no renewal (a SQLite write) runs near the fork. A write in
        # progress at the fork is the sqlite.py patch's test below.
        answers["running"] = guard.execute("busy", "export", {}, slow, lease=60)

    def wait_for_it() -> None:
        answers["waiting"] = waiter_guard.execute("busy", "export", {}, slow)

    threads = [threading.Thread(target=run, name="running")]
    threads[0].start()
    assert inside.wait(10)
    threads.append(threading.Thread(target=wait_for_it, name="waiting"))
    threads[1].start()
    time.sleep(0.2)  # the waiter is parked on the wake-up slot

    def in_child() -> dict[str, Any]:
        try:
            guard.execute("busy", "export", {}, slow)
        except InProgressError:
            busy = "in progress"
        else:  # pragma: no cover - a failure, reported by the parent
            busy = "ran"
        return {"busy": busy, "own": guarded_call(guard, "child-own"), **long_call(guard, "l")}

    try:
        with held(*_locks("both")):
            child = in_forked_child(in_child, tmp_path)
    finally:  # a failed child leaves no thread of this test running
        finish.set()
        for thread in threads:
            thread.join(30)
    assert child["busy"] == "in progress"
    assert child["own"]["status"] == "SUCCEEDED"
    check_renewed(child, child["result"])
    assert answers["running"].result == "parent-done"
    assert answers["running"].replay is False
    assert answers["waiting"].result == "parent-done"
    assert answers["waiting"].replay is True
    guard.close()
    waiter_guard.close()


# -- SQLite: a fork in the middle of the store's own writes ---------------------------------


def _pause_at(
    module: str, function: str, line: str, arrived: threading.Event, go: threading.Event
) -> Any:
    """A trace function for one thread (``sys.settrace``): it stops that thread just before
    it runs the source line ``line`` of ``function`` in ``safeagent.stores.<module>``
    (sqlite.py or one of its _sqlite_*.py parts), tells ``arrived``, and lets it go on when
    ``go`` is set. Only the order of the threads is forced; the code runs unchanged."""
    path = importlib.import_module(f"safeagent.stores.{module}").__file__

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and linecache.getline(path, frame.f_lineno).strip() == line:
            arrived.set()
            go.wait(10)
        return local

    def calls(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        return local if code.co_name == function and code.co_filename == path else None

    return calls


def test_two_threads_of_a_child_make_their_first_sqlite_writes_at_once(tmp_path: Path) -> None:
    """Two threads of a forked child whose first guarded calls on an inherited SQLiteStore
    overlap both succeed. The overlap is forced with a trace function: thread B stops just
    before it would reset the store's locks for the child, thread A writes meanwhile and
    stops while holding the write lock, then B goes on, then A. (With the locks reset once,
    at the fork, B never stops there, and the threads simply run.)"""
    guard = Guard(tmp_path / "guard.db", wait=0)
    guarded_call(guard, "before-fork")

    def work() -> dict[str, Any]:
        b_at_reset, b_go, a_holds, a_go = (threading.Event() for _ in range(4))
        answers: dict[str, Any] = {}

        def call(name: str, tracer: Any) -> None:
            sys.settrace(tracer)
            try:
                answers[name] = guarded_call(guard, f"first-{name}")["status"]
            except BaseException as exc:
                answers[name] = f"{type(exc).__name__}: {exc}"
            finally:
                sys.settrace(None)

        b_tracer = _pause_at("_sqlite_group", "_grouped", "self._after_fork()", b_at_reset, b_go)
        a_tracer = _pause_at("sqlite", "_write", "self._writer = me", a_holds, a_go)
        b = threading.Thread(target=call, args=("b", b_tracer))
        a = threading.Thread(target=call, args=("a", a_tracer))
        b.start()
        while b.is_alive() and not b_at_reset.wait(0.01):
            pass
        a.start()
        if b_at_reset.is_set():  # B saw the parent's pid and is about to reset the locks
            assert a_holds.wait(10)  # A reset them first, and holds the new write lock
            b_go.set()
            b.join(10)
        a_go.set()
        b_go.set()
        a.join(10)
        b.join(10)
        return {**answers, "paused": b_at_reset.is_set()}

    child = in_forked_child(work, tmp_path)
    assert (child["a"], child["b"]) == ("SUCCEEDED", "SUCCEEDED"), child


def test_child_writes_to_the_sqlite_file_a_parent_thread_was_writing_at_the_fork(
    tmp_path: Path,
) -> None:
    """A child forked while another thread is inside one of the store's write transactions
    (SQLite's WAL write lock: every claim, completion and lease renewal takes it) can still
    write to that file once the parent has committed. Without waiting for that commit
    before forking, the child inherits the lock as held by one of its own connections that
    no thread will ever finish, and every write it makes fails ("database is locked")."""
    store = SQLiteStore(tmp_path / "guard.db", busy_timeout=2)
    guard = Guard(store, wait=0)
    guarded_call(guard, "before-fork")
    inside, forked = threading.Event(), threading.Event()

    def slow_write() -> None:
        with cast(Any, store)._write():  # BEGIN IMMEDIATE: the WAL write lock is held
            inside.set()
            time.sleep(0.5)  # then commits on its own, whatever the fork does
        # Idle until the fork is done: a thread that ends closes its connection, and
        # SQLite's own mutexes (taken by any SQLite call, C-level) are not fork-safe.
        forked.wait(30)

    writer = threading.Thread(target=slow_write, name="slow-write")
    writer.start()
    try:
        assert inside.wait(5)
        child = in_forked_child(lambda: guarded_call(guard, "in-child"), tmp_path)
    finally:
        forked.set()
        writer.join(10)
    assert child["status"] == "SUCCEEDED"
    assert guarded_call(guard, "in-child")["replay"] is True
    guard.close()
    store.close()


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture
def pg_guard() -> Iterator[Guard]:
    require_postgres()
    from safeagent.stores.postgres import PostgresStore

    store = PostgresStore(PG_URL, schema=pg_schema(), max_size=4)
    guard = Guard(store, wait=0)
    yield guard
    store.drop_schema()
    store.close()


def test_postgres_child_while_a_parent_thread_holds_the_runtime_locks(
    pg_guard: Guard, tmp_path: Path
) -> None:
    """On PostgreSQL: the child (a pool of its own) completes a call and renews a lease
    while both runtime locks are held at the fork; the parent's pool still works."""
    guarded_call(pg_guard, "before-fork")

    def work() -> dict[str, Any]:
        return {"call": guarded_call(pg_guard, "in-child"), **long_call(pg_guard, "long")}

    with held(*_locks("both")):
        child = in_forked_child(work, tmp_path)
    assert child["call"]["status"] == "SUCCEEDED"
    check_renewed(child, child["result"])
    assert guarded_call(pg_guard, "in-child")["replay"] is True
    check_renewed(long_call(pg_guard, "long-in-parent"), os.getpid())


def test_postgres_child_while_a_parent_thread_holds_the_store_lock(
    pg_guard: Guard, tmp_path: Path
) -> None:
    """On PostgreSQL: the store's own lock (taken to make the pool, and by close), held by
    another thread at the fork, does not stop the child's call on the same store object."""
    guarded_call(pg_guard, "before-fork")
    store: Any = pg_guard.store

    with held(store._lock, *_locks("both")):
        child = in_forked_child(lambda: guarded_call(pg_guard, "in-child"), tmp_path, 5.0)
    assert child["status"] == "SUCCEEDED"
    assert guarded_call(pg_guard, "in-child")["replay"] is True


def test_postgres_child_while_a_parent_thread_holds_the_pool_locks(
    pg_guard: Guard, tmp_path: Path
) -> None:
    """On PostgreSQL: the parent's pool is never stopped in the child, so the pool's own
    locks (its scheduler's, its task queue's: its threads take them all the time), held
    by another thread at the fork, do not stop the child."""
    guarded_call(pg_guard, "before-fork")
    pool: Any = cast(Any, pg_guard.store)._pool
    locks = (pool._sched._lock, pool._tasks.mutex)
    del pool  # the child's copy of this frame must not keep the parent's pool alive

    def work() -> dict[str, Any]:
        call = guarded_call(pg_guard, "in-child")
        gc.collect()  # the parent's pool, now unreferenced, is collected here at the latest
        return call

    with held(*locks):
        child = in_forked_child(work, tmp_path, 5.0)
    assert child["status"] == "SUCCEEDED"
    assert guarded_call(pg_guard, "in-child")["replay"] is True
