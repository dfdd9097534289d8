"""A sync call interrupted (Ctrl-C, SystemExit) after its claim may have landed but before
``fn`` started releases that claim: the retry runs ``fn`` once, at once, instead of meeting
a PENDING record that reads as in doubt when its lease runs out (docs/design.md section 2,
cancellation; the async guard releases a cancelled caller's claim the same way)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safeagent import AsyncGuard, Guard, SQLiteStore, Status
from safeagent._keys import downstream_key, fingerprint
from safeagent._runtime import heartbeats, wakeups
from safeagent.audit import verify
from safeagent.stores._base import ClaimRequest
from tests._landing import at_c_return, interrupt
from tests.conftest import Ledger


def _claim(request_id: str) -> ClaimRequest:
    return ClaimRequest(
        namespace="default",
        request_id=request_id,
        action="warm",
        fingerprint=fingerprint("warm", b"{}"),
        payload_json="{}",
        execution_id="e-" + request_id,
        owner="test",
        lease_ms=30_000,
        downstream_key=downstream_key("default", "warm", request_id),
    )


def _effect(ledger: Ledger, key: str) -> Any:
    def effect(_ctx: Any) -> str:
        ledger.append(key)
        return "charged"

    return effect


@contextlib.contextmanager
def _claims_through(store: Any, hook: Callable[[ClaimRequest, Any], Any]) -> Iterator[None]:
    """The guard's claims go through ``hook(request, claim)`` (``claim``: the store's own
    method, ``claim`` or ``claim_new``) while the block runs; the hook raises, as a signal
    landing as the store's method returns would."""
    names = [name for name in ("claim", "claim_new") if hasattr(store, name)]
    real = {name: getattr(store, name) for name in names}
    for name in names:
        setattr(store, name, functools.partial(lambda n, request: hook(request, real[n]), name))
    try:
        yield
    finally:
        for name in names:
            delattr(store, name)


def _assert_released_then_runs_once(guard: Guard, ledger: Ledger, request_id: str) -> None:
    record = guard.get(request_id)
    assert record is not None
    assert record.status is Status.RELEASED, record
    assert ledger.count() == 0  # fn never ran under the interrupted call
    receipt = guard.execute(request_id, "charge", {"n": 1}, _effect(ledger, request_id))
    assert receipt.replay is False
    assert guard.execute(request_id, "charge", {"n": 1}, _effect(ledger, request_id)).replay
    assert ledger.count() == 1
    kinds = [event.kind.value for event in guard.audit_trail(request_id)]
    assert kinds[:2] == ["claimed", "released"], kinds


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")
def test_ctrl_c_while_the_claim_waits_for_another_threads_commit_writes_nothing(
    tmp_path: Path, ledger: Ledger
) -> None:
    """Ctrl-C lands while the main thread's claim waits for another thread's commit to
    end. The main thread's writes are never part of another thread's commit (group
    commit leaves it out: signal handlers run there), so nothing of the claim was
    written, and the retry runs ``fn`` at once. (The claim used to be queued into that
    commit, which wrote it after the interrupt; the call then had to release it.)"""
    first_inside = threading.Event()
    stalled: list[str] = []

    def clock() -> int:  # stalls the first commit of the thread named "first"
        if threading.current_thread().name == "first" and not stalled:
            stalled.append("first")
            first_inside.set()
            time.sleep(1.0)
        return int(time.time() * 1000)

    store = SQLiteStore(tmp_path / "g.db", clock=clock)
    guard = Guard(store)
    first = threading.Thread(target=store.claim, args=(_claim("a"),), name="first")
    first.start()
    assert first_inside.wait(10)
    main = threading.main_thread().ident
    assert main is not None
    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        guard.execute("c", "charge", {"n": 1}, _effect(ledger, "c"))
    first.join()
    assert not store._group.pending
    assert guard.get("c") is None  # nothing of the interrupted claim was written
    assert guard.execute("c", "charge", {"n": 1}, _effect(ledger, "c")).replay is False
    assert guard.execute("c", "charge", {"n": 1}, _effect(ledger, "c")).replay
    assert ledger.count() == 1
    report = verify(store)
    assert report.ok, report.problems
    guard.close()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_as_the_claim_returns_releases_it(
    store: Any, ledger: Ledger, interrupt: type[BaseException]
) -> None:
    """The claim committed, then the interrupt arrives before its answer reached the guard
    (a signal raised as the store's method returns): the guard finds its own PENDING claim
    by its execution id and releases it."""
    guard = Guard(store, lease=30.0, wait=0)

    def interrupted(request: ClaimRequest, claim: Any) -> Any:
        claim(request)
        raise interrupt

    with pytest.raises(interrupt), _claims_through(store, interrupted):
        guard.execute("r", "charge", {"n": 1}, _effect(ledger, "r"))
    _assert_released_then_runs_once(guard, ledger, "r")


def test_an_interrupt_before_fn_starts_releases_the_claim(
    store: Any, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's answer reached the guard, and the interrupt lands as the lease's
    heartbeat starts, before ``fn``: released."""

    def interrupted(*_args: Any) -> Any:
        raise KeyboardInterrupt

    guard = Guard(store, lease=30.0, wait=0)
    monkeypatch.setattr(heartbeats, "beating", interrupted)
    with pytest.raises(KeyboardInterrupt):
        guard.execute("r", "charge", {"n": 1}, _effect(ledger, "r"))
    monkeypatch.undo()
    _assert_released_then_runs_once(guard, ledger, "r")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_between_the_claims_answer_and_the_heartbeat_releases_the_claim(
    store: Any, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    """The few bytecodes between the flow handing over ``fn`` and the runner's ``try``
    (the in-process waiters' registration, the context variable set): an interrupt there
    used to leave the claim PENDING, to read as in doubt after its lease. Released."""
    register = wakeups.register

    def interrupted(*args: Any) -> Any:
        register(*args)
        raise interrupt  # a signal landing as registration returns

    guard = Guard(store, lease=30.0, wait=0)
    monkeypatch.setattr(wakeups, "register", interrupted)
    with pytest.raises(interrupt):
        guard.execute("r", "charge", {"n": 1}, _effect(ledger, "r"))
    monkeypatch.undo()
    assert not wakeups._slots  # the registration was undone too
    _assert_released_then_runs_once(guard, ledger, "r")


def test_an_interrupt_as_the_call_context_is_set_releases_the_claim(
    store: Any, ledger: Ledger
) -> None:
    """The same window, one line later: the interrupt lands as the runner sets the call's
    context variable, before its ``try`` (a signal runs after a C call returns)."""
    guard = Guard(store, lease=30.0, wait=0)
    with at_c_return("_run", "set", interrupt) as fired, pytest.raises(KeyboardInterrupt):
        guard.execute("r", "charge", {"n": 1}, _effect(ledger, "r"))
    assert fired == ["_run"]
    _assert_released_then_runs_once(guard, ledger, "r")


def test_an_interrupt_inside_fn_still_leaves_the_record_in_doubt(
    store: Any, ledger: Ledger
) -> None:
    """Only a claim whose ``fn`` never started is released: once ``fn`` runs, an interrupt
    may have cut a side effect short, and the record stays in doubt."""
    guard = Guard(store, lease=30.0, wait=0)

    def effect(_ctx: Any) -> None:
        _effect(ledger, "r")(_ctx)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guard.execute("r", "charge", {"n": 1}, effect)
    record = guard.get("r")
    assert record is not None
    assert record.status is Status.IN_DOUBT
    assert ledger.count() == 1


def test_another_callers_claim_is_never_released(store: Any, ledger: Ledger) -> None:
    """The interrupt came before this call's claim committed, and meanwhile another
    caller claimed the id: the record carries the other execution id, so it is left to
    its owner (only a record holding this call's execution id is released)."""
    guard = Guard(store, lease=30.0, wait=0)

    def interrupted(request: ClaimRequest, claim: Any) -> Any:
        type(store).claim(store, _claim("r"))  # another caller's claim lands first
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), _claims_through(store, interrupted):
        guard.execute("r", "charge", {"n": 1}, _effect(ledger, "r"))
    record = guard.get("r")
    assert record is not None
    assert record.status is Status.PENDING
    assert record.execution_id == "e-r"
    assert ledger.count() == 0


def test_an_interrupt_whose_text_cannot_be_stored_as_is_still_releases(
    store: Any, ledger: Ledger
) -> None:
    """``sys.exit(f"cannot open {path}")`` with an undecodable file name: a lone surrogate
    in the message. The release stores it escaped, as any stored error, and lands."""
    guard = Guard(store, lease=30.0, wait=0)

    def interrupted(request: ClaimRequest, claim: Any) -> Any:
        claim(request)
        raise SystemExit("cannot open bad-\udcff\x00.db")

    with pytest.raises(SystemExit), _claims_through(store, interrupted):
        guard.execute("r", "charge", {"n": 1}, _effect(ledger, "r"))
    record = guard.get("r")
    assert record is not None
    assert record.status is Status.RELEASED
    assert record.error is not None
    assert record.error.type == "SystemExit"
    _assert_released_then_runs_once(guard, ledger, "r")


@pytest.mark.parametrize("reconciler", ["owner-1", "reconciler"])
def test_a_claim_taken_over_before_the_undo_is_left_to_its_reconciler(
    store: Any, ledger: Ledger, clock: Any, reconciler: str
) -> None:
    """The claim committed, its answer was lost to an interrupt, and before the guard could
    undo it the lease ran out and a reconciler (of another guard, or of this one under the
    same owner name) took the record over: the record is the reconciler's now, and the
    interrupted call leaves it alone."""
    guard = Guard(store, lease=30.0, wait=0, owner="owner-1")

    def interrupted(request: ClaimRequest, claim: Any) -> Any:
        won = claim(request)
        clock.advance(31)
        taken = store.take_over("default", "r", won.record.fencing_token, reconciler, 30_000)
        assert taken.accepted
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), _claims_through(store, interrupted):
        guard.execute("r", "charge", {"n": 1}, _effect(ledger, "r"))
    record, _ = store.get("default", "r")
    assert record is not None
    assert record.status is Status.PENDING
    assert record.lease_owner == reconciler
    kinds = [event.kind.value for event in guard.audit_trail("r")]
    assert "released" not in kinds, kinds
    assert ledger.count() == 0


def _shut_down(loop: asyncio.AbstractEventLoop, guard: AsyncGuard) -> None:
    """What ``asyncio.run`` does after the main coroutine raised: cancel what is left, let
    it end; then the guard's handed-off work (a release) is waited for."""
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
    loop.run_until_complete(guard.drain())
    loop.close()


@pytest.mark.parametrize(
    "where", [("_run", "get"), ("_run", "set"), ("running", "getattr"), ("add", "add")]
)
@pytest.mark.parametrize("cancelled", [False, True], ids=["awaited", "cancelled"])
def test_async_an_interrupt_in_fns_task_before_fn_starts_releases_the_claim(
    store: Any, ledger: Ledger, where: tuple[str, str], cancelled: bool
) -> None:
    """AsyncGuard, under a loop without ``asyncio.run``'s Ctrl-C handling: the interrupt
    lands in the task that runs ``fn``, before ``fn`` (as the task reads and sets the call's
    context, as its heartbeat starts, once the beat is registered). It stops the loop;
    the call's own task then sees the task's error (``awaited``: the loop run again) or is
    cancelled by the shutdown (``cancelled``). Either way the claim is released, as the
    sync Guard releases it; it used to stay PENDING, to read as in doubt after its lease.
    """
    guard = AsyncGuard(store, lease=30.0, wait=0)

    async def effect(ctx: Any) -> str:
        return str(_effect(ledger, "r")(ctx))

    loop = asyncio.new_event_loop()
    try:
        calling = loop.create_task(guard.execute("r", "charge", {"n": 1}, effect))
        with (
            at_c_return(*where, interrupt, when=_in_async_runner) as fired,
            pytest.raises(KeyboardInterrupt),
        ):
            loop.run_until_complete(calling)
        assert fired
        if not cancelled:
            with pytest.raises(KeyboardInterrupt):
                loop.run_until_complete(calling)
    finally:
        _shut_down(loop, guard)
    check = Guard(store, lease=30.0, wait=0)
    assert check.audit_trail("r")[1].detail["unrun"] is True
    record = check.get("r")
    assert record is not None
    assert record.error is not None
    assert record.error.type == "KeyboardInterrupt", record.error
    assert record.error.message.startswith("the call ended before fn started"), record.error
    _assert_released_then_runs_once(check, ledger, "r")


def _in_async_runner(frame: Any, _callable: Any) -> bool:
    """A frame of AsyncGuard's ``_run`` or of what it calls on the way to ``fn``."""
    while frame is not None:
        if frame.f_code.co_name == "_run" and frame.f_code.co_filename.endswith("_aguard.py"):
            return True
        frame = frame.f_back
    return False


def test_async_an_interrupt_in_the_callers_frame_before_fns_task_begins_never_runs_fn(
    store: Any, ledger: Ledger
) -> None:
    """The interrupt lands in the caller's own frame, as it shields fn's task, before that
    task's first step. The claim is released, so the task must never begin: a first fix
    released the claim and left the task scheduled, and the loop, run again, ran fn under
    a RELEASED record; the retry then ran it a second time."""
    guard = AsyncGuard(store, lease=30.0, wait=0)

    async def effect(ctx: Any) -> str:
        return str(_effect(ledger, "r")(ctx))

    def in_drive(frame: Any, _callable: Any) -> bool:
        return frame.f_back is not None and frame.f_back.f_code.co_name == "_drive"

    loop = asyncio.new_event_loop()
    try:
        calling = loop.create_task(guard.execute("r", "charge", {"n": 1}, effect))
        with (
            at_c_return("shield", "add_done_callback", interrupt, when=in_drive) as fired,
            pytest.raises(KeyboardInterrupt),
        ):
            loop.run_until_complete(calling)
        assert fired == ["shield"]
        loop.run_until_complete(asyncio.sleep(0.05))  # the program goes on with its loop
        assert ledger.count() == 0
    finally:
        _shut_down(loop, guard)
    _assert_released_then_runs_once(Guard(store, lease=30.0, wait=0), ledger, "r")


def test_async_an_interrupt_as_fns_task_ends_leaves_the_record_in_doubt_quietly(
    store: Any, ledger: Ledger
) -> None:
    """The interrupt lands as fn's task ends its heartbeat, after fn ran; the loop is then
    shut down as ``asyncio.run`` does. The record stays PENDING (fn's outcome is not known
    to the guard), the shutdown raises nothing (the hand-off used to re-raise the
    interrupt from a done callback), and the in-process wake-up slot is freed."""
    guard = AsyncGuard(store, lease=30.0, wait=0)

    async def effect(ctx: Any) -> str:
        return str(_effect(ledger, "r")(ctx))

    loop = asyncio.new_event_loop()
    try:
        calling = loop.create_task(guard.execute("r", "charge", {"n": 1}, effect))
        with (
            at_c_return("_run", "discard", interrupt, when=_in_async_runner) as fired,
            pytest.raises(KeyboardInterrupt),
        ):
            loop.run_until_complete(calling)
        assert fired == ["_run"]
    finally:
        _shut_down(loop, guard)
    assert ledger.count() == 1
    record = Guard(store, lease=30.0, wait=0).get("r")
    assert record is not None
    assert record.status is Status.PENDING
    assert not wakeups._slots
