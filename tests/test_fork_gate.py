"""The fork gate of the SQLite store (_sqlite_fork.py): no SafeAgent thread is inside a
SQLite call when the process forks (SQLite's own process-wide mutexes, a memory
allocator's among them, would be inherited held, and the child would hang in its first
SQLite call).

The unit tests drive a gate object of their own from threads; the fork tests run in a
fresh interpreter (killed on timeout), whose children are killed on timeout too, so
nothing can hang the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from safeagent.stores import sqlite as sqlite_mod
from tests._workers import run_script

pytestmark = [
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

ROOT = str(Path(__file__).resolve().parent.parent)
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, threading.Event]:
    """``fn`` in a daemon thread; the Event is set once it returned."""
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


class _Forker:
    """A thread that closes a gate as a before-fork handler would, then reopens it (from
    the same thread, as the after-fork handler does) when told."""

    def __init__(self, gate: sqlite_mod._ForkGate, timeout: float) -> None:
        self.closed, self.reopen = threading.Event(), threading.Event()
        self.waited = 0.0

        def run() -> None:
            started = time.monotonic()
            gate.close_for_fork(timeout)
            self.waited = time.monotonic() - started
            self.closed.set()
            self.reopen.wait(10)
            gate.open_after_fork()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.reopen.set()
        self.thread.join(5)


def test_gate_holds_new_regions_back_while_a_fork_is_pending_and_lets_them_go_after() -> None:
    gate = sqlite_mod._ForkGate()
    forker = _Forker(gate, timeout=5)
    assert forker.closed.wait(5)
    assert forker.waited < 1  # no region in progress: nothing to wait for
    entered, leave = threading.Event(), threading.Event()

    def region() -> None:
        me = gate.enter()
        entered.set()
        leave.wait(10)
        gate.exit(me)

    entrant, left = _in_thread(region)
    assert not entered.wait(0.3)  # held back while the fork is pending
    assert gate.inside == []
    forker.finish()
    assert entered.wait(5)  # let through once the fork is done
    assert len(gate.inside) == 1
    leave.set()
    assert left.wait(5)
    entrant.join(5)
    assert (gate.inside, gate.forks, gate._forkers) == ([], 0, [])


def test_the_fork_waits_for_a_region_in_progress_and_nested_entries_pass() -> None:
    gate = sqlite_mod._ForkGate()
    inside, leave, nested = threading.Event(), threading.Event(), threading.Event()

    def region() -> None:
        me = gate.enter()
        inside.set()
        leave.wait(10)
        gate.exit(gate.enter())  # a nested region (a signal handler's read): never held back
        nested.set()
        gate.exit(me)

    worker, _ = _in_thread(region)
    assert inside.wait(5)
    forker = _Forker(gate, timeout=10)
    assert not forker.closed.wait(0.3)  # the fork waits for the region in progress
    leave.set()
    assert nested.wait(5)
    assert forker.closed.wait(5)
    assert 0.3 <= forker.waited < 5
    forker.finish()
    worker.join(5)
    assert gate.inside == []


def test_the_fork_gives_up_waiting_after_its_timeout() -> None:
    gate = sqlite_mod._ForkGate()
    inside, leave = threading.Event(), threading.Event()

    def region() -> None:
        me = gate.enter()
        inside.set()
        leave.wait(10)
        gate.exit(me)

    worker, _ = _in_thread(region)
    assert inside.wait(5)
    forker = _Forker(gate, timeout=0.3)
    assert forker.closed.wait(5)
    assert 0.25 <= forker.waited < 2
    forker.finish()
    leave.set()
    worker.join(5)
    assert gate.inside == []


def test_a_fork_from_inside_a_region_does_not_wait_for_its_own_thread() -> None:
    gate = sqlite_mod._ForkGate()
    me = gate.enter()
    try:
        started = time.monotonic()
        gate.close_for_fork(5)
        assert time.monotonic() - started < 1
        gate.exit(gate.enter())  # the forking thread itself passes the closed gate
        gate.open_after_fork()
    finally:
        gate.exit(me)
    assert (gate.inside, gate.forks, gate._forkers) == ([], 0, [])


def test_the_forking_thread_passes_its_own_closed_gate() -> None:
    """A connection collected (and closed) in the forking thread between its before-fork
    handlers and the fork enters a region: it must not wait for its own fork."""
    gate = sqlite_mod._ForkGate()
    gate.close_for_fork(5)
    try:
        _, done = _in_thread(lambda: None)
        assert done.wait(5)
        started = time.monotonic()
        gate.exit(gate.enter())
        assert time.monotonic() - started < 1
    finally:
        gate.open_after_fork()


def test_a_region_entered_while_its_thread_holds_the_gate_lock_does_not_deadlock() -> None:
    """A connection collected by the cyclic GC in a thread that holds the gate's lock (in
    notify, while a fork is pending) is closed in a region of its own: it waits for the
    fork like any other, instead of waiting for its own thread forever."""
    gate = sqlite_mod._ForkGate()
    forker = _Forker(gate, timeout=5)
    assert forker.closed.wait(5)

    def collected_inside_notify() -> None:
        with gate._lock:
            gate.exit(gate.enter())

    worker, done = _in_thread(collected_inside_notify)
    assert not done.wait(0.3)  # held back by the pending fork, not deadlocked
    forker.finish()
    assert done.wait(5)
    worker.join(5)
    assert (gate.inside, gate.forks, gate._forkers) == ([], 0, [])


FORK_INSIDE_REGION = r"""
import os, sys, time
from safeagent import Guard
from safeagent.stores import _sqlite_fork

guard = Guard(os.path.join(sys.argv[1], "g.db"), wait=0)
guard.execute("warm", "a", {}, lambda ctx: "ok")
gate = _sqlite_fork._gate
me = gate.enter()  # as a signal handler forking in the middle of a read would be
started = time.monotonic()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        code = 0 if guard.execute("child", "a", {}, lambda ctx: "child").result == "child" else 2
    finally:
        os._exit(code)
print("fork took", round(time.monotonic() - started, 2))
gate.exit(me)
deadline = time.monotonic() + 20
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", os.waitstatus_to_exitcode(status))
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung")
        break
    time.sleep(0.01)
print("parent", guard.execute("after", "a", {}, lambda ctx: "parent").result)
print("gate", len(_sqlite_fork._gate.inside), _sqlite_fork._gate.forks)
guard.close()
"""


@needs_fork
def test_a_fork_from_inside_a_gated_region_does_not_deadlock(tmp_path: Path) -> None:
    """The forking thread is inside a region (a signal handler's fork): the fork does not
    wait for it (it would wait for itself until its timeout), the child's guarded call
    completes and the parent's gate is open again after."""
    out = run_script(FORK_INSIDE_REGION, str(tmp_path), timeout=60)
    took = float(out.split("fork took ")[1].split()[0])
    assert took < 1, out
    assert "child exit 0" in out, out
    assert "parent parent" in out, out
    assert "gate 0 0" in out, out


@needs_fork
@pytest.mark.slow
def test_children_forked_beside_busy_threads_never_hang(tmp_path: Path) -> None:
    """40 children forked one after another while 6 threads execute and replay through the
    same SQLite-backed Guard: each completes its guarded call (none waits forever on a
    SQLite mutex a parent thread held at the fork; before the gate, about 1 in 11 did),
    and the parent reads every child's receipt."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "fork_hang.py"), "--forks", "40",
         "--threads", "6", "--timeout", "20", "--dir", str(tmp_path)],
        capture_output=True, check=False, text=True, timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert ": 0 hung (> 20 s, killed), 0 failed, 40 ok;" in out, out
    assert "; 40 child receipts recorded" in out, out
