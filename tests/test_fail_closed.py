"""Fail closed: when the SQLite store cannot record, fn does not run (claim) or the record
stays PENDING and reads as in doubt (completion): never lost, never silently re-run.

Each test provokes the real fault: another writer holding the lock, a read-only
filesystem, the database file removed or replaced, a full filesystem. The filesystem
faults mount a small tmpfs (we run as root, which ignores file modes); without the
privilege to mount they skip, except under ``CI=true`` where they fail. Side effects write
rows into an effect ledger on another filesystem; tests count the ledger.
"""

from __future__ import annotations

import errno
import gc
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safeagent import (
    ExecutionContext,
    Guard,
    OutcomeUnknownError,
    SQLiteStore,
    Status,
    StoreError,
)
from tests.conftest import FakeClock, Ledger

CHARGE = {"customer": "CUST-1", "amount_cents": 500}
# Big enough to need many new pages; made of short strings (cheap to redact).
BIG = {"lines": [f"line {i} of the export" for i in range(12_000)]}


def charger(ledger: Ledger) -> Callable[[ExecutionContext], dict[str, str]]:
    def charge(ctx: ExecutionContext) -> dict[str, str]:
        ledger.append(ctx.request_id)
        return {"charge_id": "ch_" + ctx.request_id}

    return charge


def assert_chained_store_error(exc: BaseException, *, root: str = "") -> None:
    """A StoreError chained to what failed underneath; ``root``: words in the innermost
    cause's message."""
    assert isinstance(exc, StoreError)
    assert exc.__cause__ is not None, f"StoreError not chained: {exc!r}"
    innermost: BaseException = exc
    while innermost.__cause__ is not None:
        innermost = innermost.__cause__
    assert root in str(innermost), innermost


def integrity_ok(db: Path) -> bool:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


# -- small tmpfs mounts ---------------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``mount(size)`` mounts a fresh tmpfs of that size and returns its folder; every
    mount is unmounted at teardown. Skips when mounting is not permitted (unless
    ``CI=true``: then the test fails, since these tests must run there)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        try:
            done = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        except FileNotFoundError as exc:  # no mount(8) at all
            done = subprocess.CompletedProcess([], 1, "", f"permission: {exc}")
        if done.returncode != 0:
            why = done.stderr.strip()
            lowered = why.lower()
            denied = os.geteuid() != 0 or any(
                w in lowered for w in ("permission", "not permitted", "superuser", "only root")
            )
            if denied and os.environ.get("CI") != "true":
                pytest.skip(f"cannot mount a tmpfs here (no privilege: {why}); CI must run this")
            pytest.fail(f"mounting a tmpfs failed: {why}")
        mounted.append(where)
        return where

    yield mount
    gc.collect()  # close connections of dropped stores before unmounting
    for where in reversed(mounted):
        _run("mount", "-o", "remount,rw", str(where))
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))


def remount(where: Path, mode: str) -> None:
    done = _run("mount", "-o", f"remount,{mode}", str(where))
    assert done.returncode == 0, done.stderr


def fill_up(where: Path) -> Path:
    """Write junk until the filesystem is full; return the junk file."""
    junk = where / "junk.bin"
    chunk = b"\0" * 65536
    with open(junk, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return junk


# -- claims that cannot be recorded: fn never runs ---------------------------------------------

HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


@pytest.mark.parametrize("holder", ["connection", "process"])
def test_claim_fails_closed_while_another_writer_holds_the_lock(
    holder: str, tmp_path: Path, ledger: Ledger
) -> None:
    """A write lock held past busy_timeout fails the claim with a chained StoreError; no fn run."""
    db = tmp_path / "guard.db"
    store = SQLiteStore(db, busy_timeout=0.2)
    guard = Guard(store, wait=0)
    charge = charger(ledger)
    proc: subprocess.Popen[str] | None = None
    conn: sqlite3.Connection | None = None
    if holder == "connection":
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
    else:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError) as info:
            guard.execute("lk-1", "charge", CHARGE, charge)
        elapsed = time.monotonic() - t0
    finally:
        if conn is not None:
            conn.execute("ROLLBACK")
            conn.close()
        if proc is not None:
            proc.communicate("", timeout=30)
    assert_chained_store_error(info.value, root="locked")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert "locked" in str(info.value.__cause__)
    assert 0.15 <= elapsed < 3.0
    assert ledger.count() == 0
    assert guard.get("lk-1") is None  # nothing recorded
    assert guard.execute("lk-1", "charge", CHARGE, charge).replay is False  # lock gone: runs
    assert ledger.count() == 1
    guard.close()
    store.close()


def test_claim_fails_closed_on_a_read_only_filesystem(
    tmpfs: Callable[[str], Path], ledger: Ledger
) -> None:
    """A read-only filesystem fails the call with a chained StoreError; fn never runs."""
    where = tmpfs("4m")
    db = where / "guard.db"
    made: dict[str, Any] = {}
    charge = charger(ledger)

    def open_and_use() -> None:  # this thread's connection closes when the thread ends
        made["store"] = SQLiteStore(db, busy_timeout=0.2)
        made["guard"] = Guard(made["store"], wait=0)
        made["guard"].execute("before", "charge", CHARGE, charge)

    opener = threading.Thread(target=open_and_use)
    opener.start()
    opener.join(30)
    gc.collect()
    guard, store = made["guard"], made["store"]
    assert ledger.count() == 1
    # A filesystem with a file open for writing cannot be remounted read-only, so the guard
    # holds no connection at this moment (a thread-per-request server between requests).
    remount(where, "ro")
    try:
        with pytest.raises(StoreError) as info:
            guard.execute("ro-1", "charge", CHARGE, charge)
        assert_chained_store_error(info.value)
        assert ledger.count() == 1
        with pytest.raises(StoreError) as reopened:  # a new store fails closed too
            Guard(SQLiteStore(db, busy_timeout=0.2), wait=0).execute(
                "ro-1", "charge", CHARGE, charge
            )
        assert_chained_store_error(reopened.value)
        assert ledger.count() == 1
    finally:
        store.close()
        gc.collect()
        remount(where, "rw")
    with Guard(db, wait=0) as after:
        assert after.get("ro-1") is None
        assert after.execute("before", "charge", CHARGE, charge).replay is True
    assert integrity_ok(db)
    assert ledger.count() == 1


@pytest.mark.parametrize("then", ["removed", "replaced"])
def test_claim_fails_closed_when_the_database_file_is_removed_or_replaced(
    then: str, tmp_path: Path, ledger: Ledger
) -> None:
    """A removed or replaced database file fails the claim with a chained StoreError; no fn run."""
    db = tmp_path / "guard.db"
    store = SQLiteStore(db)
    guard = Guard(store, wait=0)
    charge = charger(ledger)
    guard.execute("before", "charge", CHARGE, charge)
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{db}{suffix}")
        if path.exists():
            os.remove(path)
    if then == "replaced":
        other = SQLiteStore(db)
        other.close()
    with pytest.raises(StoreError) as info:
        guard.execute("gone-1", "charge", CHARGE, charge)
    assert ledger.count() == 1
    with pytest.raises(StoreError):  # every later write too
        guard.execute("gone-2", "charge", CHARGE, charge)
    assert ledger.count() == 1
    guard.close()
    store.close()
    if then == "replaced":
        with Guard(db, wait=0) as fresh:
            assert fresh.get("gone-1") is None
            assert fresh.get("before") is None
    assert_chained_store_error(info.value)


def test_claim_fails_closed_on_a_full_filesystem(
    tmpfs: Callable[[str], Path], ledger: Ledger
) -> None:
    """A full filesystem fails a large claim with a chained StoreError; fn never runs."""
    where = tmpfs("2m")
    db = where / "guard.db"
    store = SQLiteStore(db, busy_timeout=0.2)
    guard = Guard(store, wait=0)
    charge = charger(ledger)
    guard.execute("before", "charge", CHARGE, charge)
    junk = fill_up(where)
    try:
        with pytest.raises(StoreError) as info:
            guard.execute("full-1", "export", BIG, charge)
        assert_chained_store_error(info.value, root="full")
        assert ledger.count() == 1
    finally:
        junk.unlink()
    assert guard.get("full-1") is None
    ran = guard.execute("full-1", "export", BIG, charge)
    assert ran.replay is False
    assert guard.execute("full-1", "export", BIG, charge).replay is True
    assert ledger.count() == 2
    guard.close()
    store.close()
    assert integrity_ok(db)


# -- completions that cannot be recorded: never lost, never re-run ----------------------------


def _check_pending_then_in_doubt(
    guard: Guard, clock: FakeClock, ledger: Ledger, request_id: str, action: str, payload: Any
) -> None:
    """After the fault is repaired: the record is PENDING, reads as in doubt once its lease
    has passed, a retry gets OutcomeUnknownError without running fn, and a restarted
    store sees the same."""
    record = guard.get(request_id)
    assert record is not None
    assert record.status is Status.PENDING
    clock.advance(31)
    assert guard.get(request_id).status is Status.IN_DOUBT
    assert [r.request_id for r in guard.in_doubt()] == [request_id]
    with pytest.raises(OutcomeUnknownError):
        guard.execute(request_id, action, payload, charger(ledger))
    db = Path(guard.store.path)
    guard.close()
    guard.store.close()
    restarted = SQLiteStore(db, clock=clock)
    with Guard(restarted, lease=30.0, wait=0) as again:
        assert again.get(request_id).status is Status.IN_DOUBT
        with pytest.raises(OutcomeUnknownError):
            again.execute(request_id, action, payload, charger(ledger))
    restarted.close()
    assert ledger.count() == 1
    assert integrity_ok(db)


def test_completion_that_cannot_be_written_leaves_the_record_pending_then_in_doubt(
    tmp_path: Path, clock: FakeClock, ledger: Ledger
) -> None:
    """A completion lost to a moved-away file leaves the record PENDING, then in doubt; no rerun."""
    db = tmp_path / "guard.db"
    aside = tmp_path / "aside"
    aside.mkdir()
    store = SQLiteStore(db, clock=clock)
    guard = Guard(store, lease=30.0, wait=0)

    def charge(ctx: ExecutionContext) -> dict[str, str]:
        ledger.append(ctx.request_id)
        for suffix in ("", "-wal", "-shm"):  # an operator moves the files away
            if Path(f"{db}{suffix}").exists():
                os.rename(f"{db}{suffix}", aside / f"guard.db{suffix}")
        return {"charge_id": "ch_1"}

    try:
        with pytest.raises(StoreError) as info:
            guard.execute("mv-1", "charge", CHARGE, charge)
        assert_chained_store_error(info.value, root="No such file")
        assert "no longer at its path: put it back" in str(info.value)
        assert ledger.count() == 1
    finally:
        for suffix in ("", "-wal", "-shm"):  # ... and back
            if (aside / f"guard.db{suffix}").exists():
                os.rename(aside / f"guard.db{suffix}", f"{db}{suffix}")
    _check_pending_then_in_doubt(guard, clock, ledger, "mv-1", "charge", CHARGE)


def test_completion_on_a_full_filesystem_leaves_the_record_pending_then_in_doubt(
    tmpfs: Callable[[str], Path], clock: FakeClock, ledger: Ledger
) -> None:
    """A completion lost to a full disk leaves the record PENDING, then in doubt, never re-run."""
    where = tmpfs("2m")
    db = where / "guard.db"
    store = SQLiteStore(db, clock=clock, busy_timeout=0.2)
    guard = Guard(store, lease=30.0, wait=0)
    junk: list[Path] = []

    def export(ctx: ExecutionContext) -> dict[str, Any]:
        ledger.append(ctx.request_id)
        junk.append(fill_up(where))  # another tenant fills the disk meanwhile
        return BIG

    try:
        with pytest.raises(StoreError) as info:
            guard.execute("full-2", "export", {"month": "2024-05"}, export)
        assert_chained_store_error(info.value, root="full")
        assert ledger.count() == 1
    finally:
        for path in junk:
            path.unlink()
    _check_pending_then_in_doubt(guard, clock, ledger, "full-2", "export", {"month": "2024-05"})
