"""Closing an SQLite store while other threads use it: their reads and writes in progress
end first, every later call fails with StoreError ("closed"), and no connection is ever
closed while a thread is inside SQLite with it (that crashes the interpreter)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from safeagent import Guard, SQLiteStore, Status, StoreError
from safeagent.stores._base import Completion
from tests._landing import at_c_return

_CLOSE_UNDER_LOAD = textwrap.dedent(
    """
    import os, random, signal, sys, threading, time
    from safeagent import Guard, SQLiteStore, StoreError

    # mode: "get", "execute", or "interrupted" (events, get and execute side by side, and
    # a KeyboardInterrupt from SIGALRM at a random moment of each close()).
    folder, mode, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    armed = [False]

    def on_alarm(*_):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    escaped = []
    for i in range(rounds):
        store = SQLiteStore(os.path.join(folder, f"s{i}.db"))
        guard = Guard(store)
        stop = threading.Event()

        def work(t):
            n = 0
            task = mode if mode != "interrupted" else ["events", "get"][t] if t < 2 else "execute"
            while not stop.is_set():
                n += 1
                try:
                    if task == "events":
                        store.events(limit=500)
                    elif task == "get":
                        store.get("default", f"k{n % 5}")
                    else:
                        guard.execute(f"t{t}-{n}", "charge", {"n": n}, lambda ctx: n)
                except StoreError:
                    pass
                except BaseException as exc:
                    escaped.append(repr(exc))
                    return

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        if mode == "interrupted":
            time.sleep(0.02)
            armed[0] = True
            signal.setitimer(signal.ITIMER_REAL, random.uniform(0.00002, 0.002))
        else:
            time.sleep(random.random() * 0.02)
        try:
            store.close()
        except KeyboardInterrupt:
            pass
        time.sleep(0.005)
        armed[0] = False
        stop.set()
        for thread in threads:
            thread.join()
    print("escaped", len(escaped), sorted(set(escaped))[:3])
    """
)


def _close_under_load(tmp_path: Path, mode: str, rounds: int) -> None:
    """Run :data:`_CLOSE_UNDER_LOAD` in a real process: it must exit normally (a negative
    code is a signal, SIGSEGV being -11) with no exception but StoreError escaping."""
    result = subprocess.run(
        [sys.executable, "-c", _CLOSE_UNDER_LOAD, str(tmp_path), mode, str(rounds)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "escaped 0 []", result.stdout


@pytest.mark.parametrize("mode", ["get", "execute"])
def test_closing_a_store_under_busy_threads_never_crashes(tmp_path: Path, mode: str) -> None:
    """Four threads reading (or running guarded calls) while the store closes, 30 times in a
    real process: before close waited for the calls inside SQLite, this killed the process
    with SIGSEGV within 30 rounds in every try."""
    _close_under_load(tmp_path, mode, 30)


def _hold_inside_sqlite(store: SQLiteStore, release: threading.Event) -> dict[str, Any]:
    """Start a thread that reads inside one snapshot of ``store`` until ``release`` is set
    (it is inside SQLite's region all along); returns what it saw."""
    seen: dict[str, Any] = {}
    entered = threading.Event()

    def read(conn: sqlite3.Connection) -> int:
        value = conn.execute("SELECT count(*) FROM executions").fetchone()[0]
        entered.set()
        release.wait(10)
        return int(conn.execute("SELECT count(*) FROM executions").fetchone()[0]) + int(value)

    def run() -> None:
        try:
            seen["result"] = store._snapshot(read)
        except BaseException as exc:
            seen["error"] = exc
        try:
            store.get("default", "after")
        except StoreError as exc:
            seen["after"] = exc

    seen["thread"] = thread = threading.Thread(target=run)
    thread.start()
    assert entered.wait(10)
    return seen


def test_close_waits_for_a_read_in_progress_then_closes_its_connection(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    release = threading.Event()
    seen = _hold_inside_sqlite(store, release)
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (store.close(), closed.set()))
    closer.start()
    assert not closed.wait(0.3)  # the read is still inside SQLite: close waits
    release.set()
    assert closed.wait(10)
    seen["thread"].join(10)
    assert seen.get("result") == 0
    assert "error" not in seen
    assert "closed" in str(seen["after"])
    assert store._in_use == []  # every connection closed


def test_a_read_still_running_when_close_gives_up_keeps_its_connection(tmp_path: Path) -> None:
    """A call inside SQLite past the wait (``busy_timeout``) is not cut off: its connection
    stays open until the store is collected, and the call ends normally."""
    store = SQLiteStore(tmp_path / "s.db", busy_timeout=0.2)
    release = threading.Event()
    seen = _hold_inside_sqlite(store, release)
    started = time.monotonic()
    store.close()
    waited = time.monotonic() - started
    assert 0.15 < waited < 5
    assert len(store._in_use) == 1
    release.set()
    seen["thread"].join(10)
    assert seen.get("result") == 0
    assert "error" not in seen
    assert "closed" in str(seen["after"])  # and that call closed the connection left open
    (kept,) = store._in_use
    with pytest.raises(sqlite3.ProgrammingError):
        kept.conn.execute("SELECT 1")
    with pytest.raises(StoreError, match="closed"):
        store.get("default", "x")


def test_close_from_a_signal_handler_inside_the_threads_own_read_does_not_wait(
    tmp_path: Path,
) -> None:
    """A thread's own call in progress (a handler closing the store in the middle of it)
    is not waited for: it would wait for itself."""
    store = SQLiteStore(tmp_path / "s.db", busy_timeout=5)

    def read(conn: sqlite3.Connection) -> None:
        started = time.monotonic()
        store.close()
        assert time.monotonic() - started < 2
        conn.execute("SELECT 1")

    with pytest.raises(StoreError, match=r"closed|read failed"):
        store._snapshot(read)
    assert store._in_use == []


def _close_at(store: SQLiteStore) -> Any:
    def action(_frame: FrameType, _callable: Any) -> None:
        store.close()

    return action


def test_a_read_whose_connection_close_took_fails_with_store_error(tmp_path: Path) -> None:
    """close() landing (from a signal handler, or another thread) between a call's lookup
    of its connection and its use: StoreError, never sqlite3's ProgrammingError."""
    store = SQLiteStore(tmp_path / "s.db")
    store.get("default", "warm")  # this thread's connection exists
    with (
        at_c_return("_holder", "getpid", _close_at(store)) as fired,
        pytest.raises(StoreError, match="closed"),
    ):
        store.get("default", "x")
    assert fired


def test_a_write_whose_connection_close_took_fails_with_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    guard = Guard(store)
    guard.execute("warm", "charge", {}, lambda ctx: 1)
    with (
        at_c_return("_write", "get_ident", _close_at(store)) as fired,
        pytest.raises(StoreError, match="closed; nothing was written"),
    ):
        store.complete(
            Completion(
                namespace="default",
                request_id="warm",
                fencing_token=1,
                status=Status.SUCCEEDED,
                result_json="1",
                error=None,
                actor="test",
            )
        )
    assert fired


def test_ctrl_c_in_close_under_busy_threads_never_crashes(tmp_path: Path) -> None:
    """A KeyboardInterrupt landing anywhere in close() while four threads use the store: the
    connections close() had not reached stay open (their threads close them), none is
    closed under a call. A first version of the fix dropped the threads' connection slots
    before closing them, and an interrupt there let the collector close them all: SIGSEGV
    in 12 of 12 runs of 25 rounds."""
    _close_under_load(tmp_path, "interrupted", 25)


def test_closing_one_store_never_waits_for_another_stores_calls(tmp_path: Path) -> None:
    """A read in progress on store B (a long verify, say) does not hold up closing store
    A, nor do A's closing hold up B's or C's calls (a first version of the fix closed the
    process-wide fork gate, stalling every store for up to busy_timeout)."""
    a = SQLiteStore(tmp_path / "a.db")
    b = SQLiteStore(tmp_path / "b.db")
    c = SQLiteStore(tmp_path / "c.db")
    a.get("default", "k")
    release = threading.Event()
    seen = _hold_inside_sqlite(b, release)
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (a.close(), closed.set()))
    closer.start()
    # Well before A's busy_timeout (5 s), which a wait for B's read would have run out.
    assert closed.wait(2.5)
    assert not release.is_set()  # B's read is still inside SQLite
    assert c.get("default", "k")[0] is None
    release.set()
    seen["thread"].join(10)
    assert seen.get("result") == 0
    b.close()
    c.close()


def _close_after(store: SQLiteStore, barrier: threading.Barrier, outcomes: list[str]) -> None:
    barrier.wait()
    try:
        store.close()
        outcomes.append("ok")
    except StoreError as exc:  # pragma: no cover - the fault the test below is for
        outcomes.append(repr(exc))


def test_concurrent_closes_all_return_and_write_the_buffered_events_once(
    tmp_path: Path,
) -> None:
    """close() is idempotent under concurrency too: a second closer waits for the first,
    and never writes with a connection the first is closing (it raised StoreError)."""
    for round_ in range(5):
        path = tmp_path / f"s{round_}.db"
        store = SQLiteStore(path)
        guard = Guard(store)
        guard.execute("a", "charge", {}, lambda ctx: 1)
        assert guard.execute("a", "charge", {}, lambda ctx: 1).replay
        assert store._buffer  # the replay's event waits for the next write
        barrier = threading.Barrier(3)
        outcomes: list[str] = []

        args = (store, barrier, outcomes)
        threads = [threading.Thread(target=_close_after, args=args) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes == ["ok"] * 3
        with SQLiteStore(path) as again:
            kinds = [e.kind.value for e in again.events()]
        assert kinds.count("replayed") == 1, kinds


def test_a_thread_connecting_as_the_store_closes_gets_store_error_not_a_live_store(
    tmp_path: Path,
) -> None:
    """A thread's first call opens its connection; close() running in between its
    ``_closed`` check and its connection's registration used to miss that connection,
    and every later call of the thread went on working on the closed store."""
    store = SQLiteStore(tmp_path / "s.db")
    seen: dict[str, Any] = {}

    def close_from_another_thread(_frame: FrameType, _callable: Any) -> None:
        closer = threading.Thread(target=store.close)
        closer.start()
        closer.join(10)

    def newcomer() -> None:
        with at_c_return("_holder", "connect", close_from_another_thread) as fired:
            try:
                store.get("default", "first")
            except StoreError as exc:
                seen["first"] = exc
        seen["fired"] = fired
        try:
            Guard(store).execute("after", "charge", {}, lambda ctx: 1)
        except StoreError as exc:
            seen["after"] = exc

    thread = threading.Thread(target=newcomer)
    thread.start()
    thread.join(20)
    assert seen["fired"]
    assert "closed" in str(seen["first"])
    assert "closed" in str(seen["after"])
    with SQLiteStore(tmp_path / "s.db") as again:
        assert again.get("default", "after")[0] is None
