"""Races of the fork handlers themselves, found by a review of the fork-safety change:
two threads forking at once, a fork while another thread constructs a store.

Each scenario runs in a fresh interpreter (killed on timeout), whose children are killed
on timeout too, so nothing can hang the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._workers import run_script
from tests.conftest import PG_URL, require_postgres

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only"),
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


ROOT = str(Path(__file__).resolve().parent.parent)

TWO_FORKS = r"""
import os, signal, sqlite3, sys, threading, time
from contextlib import suppress
from safeagent import Guard, SQLiteStore
from safeagent.errors import StoreError
from safeagent.stores import sqlite as sqlite_mod

tmp = sys.argv[1]

def export(ctx):
    return os.getpid()

def fork_and_exit():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

# S (busy_timeout 0.3 s) must be visited before T (2 s) by the before-fork handler:
# its order is the weak set's, so pairs are made until it fits.
keep = []
for i in range(50):
    s = SQLiteStore(f"{tmp}/s{i}.db", busy_timeout=0.3)
    t = SQLiteStore(f"{tmp}/t{i}.db", busy_timeout=2)
    keep += [s, t]
    if [x for x in list(sqlite_mod._live_stores) if x in (s, t)] == [s, t]:
        break
    s.close()  # a closed store is skipped by the before-fork handler
    t.close()
else:
    raise SystemExit("could not order the stores")
s_guard, t_guard = Guard(s, wait=0), Guard(t, wait=0)
s_guard.execute("warm", "export", {}, export)

other_process = sqlite3.connect(t.path, isolation_level=None)
other_process.execute("BEGIN IMMEDIATE")  # T's file is locked by another process

def held_elsewhere(lock):  # RLock has no locked() before Python 3.14
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True

def write_on_t():  # holds T's in-process write lock while SQLite busy-waits
    with suppress(StoreError):
        t_guard.execute("t-write", "export", {}, export)

writer = threading.Thread(target=write_on_t)
writer.start()
while not held_elsewhere(t._mutex):
    time.sleep(0.005)
a = threading.Thread(target=fork_and_exit, name="fork-a")
a.start()
while not held_elsewhere(s._mutex):  # A holds S's write lock across its fork, and waits for T's
    time.sleep(0.005)
b = threading.Thread(target=fork_and_exit, name="fork-b")
b.start()
time.sleep(0.6)  # B gives up on S's lock after 0.3 s
other_process.rollback()  # the write on T goes through: both forks complete
for thread in (a, b, writer):
    thread.join(10)
print("locked", held_elsewhere(s._mutex))
started = time.monotonic()
try:
    s_guard.execute("after-forks", "export", {}, export)
    print("write ok", round(time.monotonic() - started, 2))
except StoreError as exc:
    print("write failed", exc)
os._exit(0)
"""


def test_two_threads_forking_at_once_do_not_leave_the_write_lock_held(tmp_path: Path) -> None:
    """Fixed (a review found it broken; the flag was one per store, overwritten by every
    forking thread). Thread A forks: its before-fork handler takes the write lock of
    store S, then waits
    for a write in progress on store T (a write itself waiting on another process's lock of
    T's file). Thread B forks meanwhile: it waits for S's lock, gives up after S's
    busy_timeout, and sets S._forking = False, the flag A's after-fork handler reads to
    know it holds the lock. A's fork then completes and never releases S's lock: every
    later write on S in the parent fails after busy_timeout ("another thread held the write
    lock for more than 0.3 s"), for the life of the process.

    (Run in a fresh interpreter: a before-fork handler of the standard library registered
    after _sqlite_fork.py's, such as concurrent.futures.thread's, runs first and takes a lock
    that serialises the two forks; a process that imported it before safeagent, or never,
    has no such lock.)"""
    out = run_script(TWO_FORKS, str(tmp_path))
    assert "locked False" in out, out
    assert "write ok" in out, out


PG_HALF_BUILT = r"""
import os, sys, threading, time, uuid
from safeagent import Guard
from safeagent.stores import postgres as pg_mod
from safeagent.stores.postgres import PostgresStore

url = sys.argv[1]
schema = "sa_rev_" + uuid.uuid4().hex[:10]

arrived, go = threading.Event(), threading.Event()

def pause_at(line):
    def local(frame, event, arg):
        if event == "line":
            import linecache
            if linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip() == line:
                arrived.set()
                go.wait(30)
        return local
    def calls(frame, event, arg):
        if frame.f_code.co_name == "__init__" and frame.f_code.co_filename == pg_mod.__file__:
            return local
        return None
    return calls

half = []
def build():  # a store being constructed in another thread at the fork
    sys.settrace(pause_at("self._tx = threading.local()"))
    try:
        half.append(PostgresStore(url, schema=schema, max_size=2))
    finally:
        sys.settrace(None)

builder = threading.Thread(target=build)
builder.start()
assert arrived.wait(30)
# a fully built store visited after the half-built one by the after-in-child handler
keep = []
# If the half-built store is visible to the fork handlers, make sure they meet it before
# the full one (a weak set's order is its hash order: try new stores until one follows).
half_built = next((s for s in list(pg_mod._live_stores) if not hasattr(s, "_pool")), None)
for _ in range(50):
    store = PostgresStore(url, schema=schema, max_size=2)
    keep.append(store)
    order = list(pg_mod._live_stores)
    if half_built is None or order.index(half_built) < order.index(store):
        break
    store.close()
guard = Guard(store, wait=0)
guard.execute("warm", "a", {}, lambda ctx: os.getpid())

release, holding = threading.Event(), threading.Event()
def hold():  # a thread of the parent inside the store's lock at the fork
    with store._lock:
        holding.set()
        release.wait(30)
holder = threading.Thread(target=hold)
holder.start()
assert holding.wait(10)
pid = os.fork()
if pid == 0:
    try:
        receipt = guard.execute("in-child", "a", {}, lambda ctx: os.getpid())
        os._exit(0 if receipt.result == os.getpid() else 2)
    except BaseException as exc:
        print("child error", repr(exc), flush=True)
        os._exit(3)
deadline = time.monotonic() + 15
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", os.waitstatus_to_exitcode(status), flush=True)
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung", flush=True)
        break
    time.sleep(0.01)
release.set()
go.set()
builder.join(30)
holder.join(10)
store.drop_schema()
for s in keep + half:
    s.close()
os._exit(0)
"""


def test_fork_while_another_thread_constructs_a_postgres_store(tmp_path: Path) -> None:
    """Fixed (a review found it broken). Before the fix:
    PostgresStore.__init__ added the store to _live_stores before it set _pool (and
    _tx, _closed, ...). A fork in that window ran the child's handler over a half-built
    store: ``self._pool`` raises AttributeError, which aborts _forget_all_in_child, so
    every store after it in the weak set keeps the parent's locks and pool in the child.
    Here a parent thread holds such a store's lock at the fork: the child's first guarded
    call on it waits on that lock forever (and "Exception ignored in ...
    _forget_all_in_child ... AttributeError: ... '_pool'" is printed)."""
    require_postgres()
    proc = subprocess.run(
        [sys.executable, "-c", PG_HALF_BUILT, PG_URL],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "child exit 0" in proc.stdout, proc.stdout + proc.stderr
    assert "AttributeError" not in proc.stderr, proc.stderr
