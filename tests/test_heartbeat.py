"""Heartbeats: a live fn keeps a short lease live; a dead process lets it expire.

Real short leases on SQLite and the real clock (the heartbeat is a real thread). Side
effects write rows into an effect ledger (a separate SQLite file) that the tests count.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from safeagent import (
    ActionPolicy,
    AsyncGuard,
    EventKind,
    ExecutionContext,
    Guard,
    InProgressError,
    MemoryStore,
    OutcomeUnknownError,
    Receipt,
    SQLiteStore,
    Status,
    _runtime,
)
from safeagent._runtime import Heartbeats, heartbeats
from safeagent.stores import BatchRenewStore
from safeagent.stores._base import ClaimRequest
from tests._workers import ROOT, child_env, wait_until
from tests.conftest import Ledger

# A renewal is a durable write: a disk that stalls one fsync for more than two thirds of
# the lease lets it expire (seen once in CI with 0.3 s leases). 0.6 s leases leave 0.4 s,
# and fn still outlives three of them.
LEASE = 0.6
WORK = 1.8


class Observer:
    """Another caller (its own guard and connection) hammering the request with ``wait=0``
    from a thread, and reading the record, until told to stop."""

    def __init__(self, db: Path, request_id: str, fn: Callable[[ExecutionContext], Any]) -> None:
        self.guard = Guard(db, lease=LEASE, wait=0, owner="observer")
        self.request_id = request_id
        self.fn = fn
        self.answers: list[Any] = []
        self.statuses: list[Status] = []
        self.in_doubt_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="observer")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(self.guard.execute(self.request_id, "export", {}, self.fn))
            except BaseException as exc:
                self.answers.append(exc)
            record = self.guard.get(self.request_id)
            assert record is not None
            self.statuses.append(record.status)
            self.in_doubt_seen += len(self.guard.in_doubt())
            time.sleep(0.02)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.guard.close()

    def check_never_in_doubt(self) -> None:
        """Every answer was "in progress" (or, once it finished, the replayed receipt), and
        the record never read as in doubt."""
        assert len(self.answers) >= 10, self.answers
        for answer in self.answers:
            assert not isinstance(answer, OutcomeUnknownError), answer
            if isinstance(answer, Receipt):
                assert answer.replay is True
            else:
                assert isinstance(answer, InProgressError), answer
        assert sum(isinstance(a, InProgressError) for a in self.answers) >= 10
        assert Status.IN_DOUBT not in self.statuses
        assert self.in_doubt_seen == 0


def _kinds(guard: Guard, request_id: str) -> list[EventKind]:
    return [e.kind for e in guard.audit_trail(request_id)]


@pytest.mark.parametrize(
    ("work", "lease", "duration"),
    [
        ("sleep", LEASE, WORK),
        # A pure-Python loop competes with the heartbeat thread for the GIL; on a loaded
        # host renewals then come up to ~0.6 s apart, so this variant gets 0.6 s leases.
        ("busy_loop", 0.6, 1.8),
    ],
)
def test_long_fn_keeps_its_short_lease_live(
    work: str, lease: float, duration: float, tmp_path: Path, ledger: Ledger
) -> None:
    """A sync fn running several short leases keeps its claim live and completes on time."""
    db = tmp_path / "guard.db"
    guard = Guard(db, lease=lease, wait=0)
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def export(ctx: ExecutionContext) -> dict[str, int]:
        ledger.append(ctx.request_id)
        started.set()
        if work == "sleep":
            time.sleep(duration)
            return {"rounds": 0}
        rounds, end = 0, time.monotonic() + duration
        while time.monotonic() < end:  # pure Python: holds the GIL in bursts
            rounds += sum(range(2000)) > 0
        return {"rounds": rounds}

    def run() -> None:
        try:
            outcome["receipt"] = guard.execute("hb-1", "export", {}, export)
        except BaseException as exc:
            outcome["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    assert started.wait(10)
    with Observer(db, "hb-1", export) as observer:
        runner.join(30)
    assert not runner.is_alive()
    assert "error" not in outcome, outcome
    receipt = outcome["receipt"]
    assert receipt.status is Status.SUCCEEDED
    assert receipt.completed_at_ms - receipt.claimed_at_ms >= duration * 1000 - 50
    observer.check_never_in_doubt()
    kinds = _kinds(guard, "hb-1")
    assert EventKind.SUCCEEDED in kinds
    assert EventKind.LATE_COMPLETION not in kinds
    assert ledger.count() == 1
    guard.close()


def test_async_fn_keeps_its_lease_while_the_event_loop_is_blocked(
    tmp_path: Path, ledger: Ledger
) -> None:
    """An async fn keeps its lease live while another task blocks the event loop."""
    db = tmp_path / "guard.db"

    async def export(ctx: ExecutionContext) -> dict[str, bool]:
        ledger.append(ctx.request_id)
        started.set()
        await asyncio.sleep(0.05)
        return {"done": True}

    async def blocker() -> None:
        time.sleep(WORK)  # a badly behaved tool: blocks the whole loop

    async def main() -> Receipt:
        aguard = AsyncGuard(db, lease=LEASE, wait=0)
        job = asyncio.create_task(aguard.execute("hb-2", "export", {}, export))
        assert await asyncio.to_thread(started.wait, 10)
        with observer:
            loop_before = time.monotonic()
            await asyncio.create_task(blocker())
            assert time.monotonic() - loop_before >= WORK
            receipt = await job
        await aguard.aclose()
        return receipt

    started = threading.Event()
    observer = Observer(db, "hb-2", lambda ctx: ledger.append(ctx.request_id))
    receipt = asyncio.run(main())
    assert receipt.replay is False
    assert receipt.status is Status.SUCCEEDED
    observer.check_never_in_doubt()
    with Guard(db, wait=0) as guard:
        kinds = _kinds(guard, "hb-2")
    assert EventKind.SUCCEEDED in kinds
    assert EventKind.LATE_COMPLETION not in kinds
    assert ledger.count() == 1


def test_sigkilled_process_lets_its_lease_expire_within_a_lease_and_a_second(
    tmp_path: Path,
) -> None:
    """A SIGKILLed child's live claim reads as in doubt within about a lease plus a second."""
    # Renewed every third of a lease, a lease lapses while its holder lives only when a
    # renewal is two thirds of a lease late: at 0.5 s that happened once on a loaded CI
    # machine (0.33 s). This test is about expiry after SIGKILL, not renewal latency.
    lease = 1.0
    db = tmp_path / "guard.db"
    marker = tmp_path / "marker.json"
    ledger_file = tmp_path / "ledger.txt"
    args = {
        "db": str(db),
        "ledger": str(ledger_file),
        "request_id": "hb-3",
        "action": "export",
        "payload": {},
        "lease": lease,
        "write_ledger": True,
        "marker": str(marker),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests._workers", "claim_and_hang", json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=ROOT,
    )
    guard = Guard(db, lease=lease, wait=0)
    try:
        assert wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60)
        assert marker.exists(), proc.communicate(timeout=10)
        # Alive: three leases pass and the claim stays live.
        end = time.monotonic() + 3 * lease
        while time.monotonic() < end:
            assert guard.get("hb-3").status is Status.PENDING
            with pytest.raises(InProgressError):
                guard.execute("hb-3", "export", {}, lambda ctx: None)
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    killed_at = time.monotonic()
    assert wait_until(lambda: guard.get("hb-3").status is Status.IN_DOUBT, timeout=10)
    assert time.monotonic() - killed_at <= lease + 1.0
    with pytest.raises(OutcomeUnknownError) as doubt:
        guard.execute("hb-3", "export", {}, lambda ctx: None)
    assert str(proc.pid) in doubt.value.owner
    assert ledger_file.read_text().splitlines() == ["hb-3"]
    guard.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_action_lease_is_what_the_claim_records(flavour: str, store: Any, ledger: Ledger) -> None:
    """ActionPolicy(lease=...) is the lease the claim records, during fn and after it."""
    actions = {"export": ActionPolicy(lease=7.0)}
    seen: list[Any] = []

    def export(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id)
        record, _ = store.get(ctx.namespace, ctx.request_id)
        seen.append(record)
        return "ok"

    if flavour == "sync":
        guard = Guard(store, lease=30.0, wait=0, actions=actions)
        guard.execute("lp-1", "export", {}, export)
        guard.execute("lp-2", "import", {}, export)
        after = [guard.get("lp-1"), guard.get("lp-2")]
        guard.close()
    else:

        async def main() -> list[Any]:
            aguard = AsyncGuard(store, lease=30.0, wait=0, actions=actions)
            await aguard.execute("lp-1", "export", {}, export)
            await aguard.execute("lp-2", "import", {}, export)
            out = [await aguard.get("lp-1"), await aguard.get("lp-2")]
            await aguard.aclose()
            return out

        after = asyncio.run(main())
    during = [r.lease_expires_at_ms - r.claimed_at_ms for r in seen]
    assert during == [7_000, 30_000]
    assert [r.lease_expires_at_ms - r.claimed_at_ms for r in after] == [7_000, 30_000]
    assert ledger.count() == 2


def test_interrupt_inside_beating_enter_leaves_no_beat_renewing_forever(tmp_path: Any) -> None:
    """A KeyboardInterrupt (a signal) that lands in ``_Beating.__enter__`` after the beat
    joined the set, e.g. as ``SimpleQueue.put`` returns, escapes the ``with`` without
    ``__exit__``: the beat must not stay in the set, or the renewal thread keeps that
    claim's lease live for the life of the process and nobody can ever take it over."""
    from safeagent import SQLiteStore
    from safeagent._runtime import Heartbeats
    from safeagent.stores._base import ClaimRequest

    store = SQLiteStore(str(tmp_path / "enter.db"))
    claim = store.claim(
        ClaimRequest(
            namespace="n",
            request_id="interrupted",
            action="act",
            fingerprint="f" * 64,
            payload_json="{}",
            execution_id="e" * 32,
            owner="test",
            lease_ms=300,
            downstream_key="sa1-x",
            detail={},
        )
    )
    token = claim.record.fencing_token
    hb = Heartbeats()
    with hb.beating(store, "n", "warm", 1, 60_000):
        pass  # starts the renewal thread, which then idles for IDLE_WAIT
    beater = hb._beaters[store.identity]
    real = beater.wakeups

    class InterruptedPut:
        def put(self, item: Any) -> None:
            real.put(item)
            raise KeyboardInterrupt  # the pending SIGINT, raised as put() returns

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    deadline = time.monotonic() + 5
    while beater.wake_at == float("inf") and time.monotonic() < deadline:
        time.sleep(0.01)  # let the loop settle into its idle wait
    beater.wakeups = InterruptedPut()  # type: ignore[assignment]
    try:
        # due before the idle wait ends, so the beat's add wakes the loop
        with pytest.raises(KeyboardInterrupt), hb.beating(store, "n", "interrupted", token, 300):
            pytest.fail("the block never runs")
    finally:
        beater.wakeups = real
    time.sleep(0.5)
    leaked = set(beater.beats)
    beater.beats.clear()  # stop renewing, pass or fail
    record, now = store.get("n", "interrupted")
    store.close()
    assert not leaked, "a beat outlived its block"
    assert record is not None
    assert record.lease_expires_at_ms is not None
    assert record.lease_expires_at_ms <= now  # nobody renewed the 300 ms lease


def test_renew_many_renews_each_current_lease_in_one_step(store: Any, clock: Any) -> None:
    """``renew_many`` answers each lease in order: renewed only where the token is current
    and the record still PENDING (the rule of ``renew``), on every store."""
    assert isinstance(store, BatchRenewStore)
    guard = Guard(store, lease=30)
    answers: list[bool] = []

    def export(ctx: ExecutionContext) -> str:
        token = ctx.fencing_token
        clock.advance(10)
        answers.extend(
            store.renew_many(
                [
                    ("default", "running", token, 5_000),
                    ("default", "running", token + 1, 5_000),  # not its token
                    ("default", "missing", 1, 5_000),
                    ("other", "running", token, 5_000),  # another namespace
                    ("default", "done", 1, 5_000),  # SUCCEEDED
                ]
            )
        )
        record = guard.get("running")
        assert record is not None
        assert record.lease_expires_at_ms == clock() + 5_000
        return "ok"

    guard.execute("done", "export", {}, lambda _ctx: "ok")
    guard.execute("running", "export", {}, export)
    assert answers == [True, False, False, False, False]
    assert store.renew_many([]) == []


class CountingStore(SQLiteStore):
    """An SQLite store that counts the transactions renewing leases."""

    renewals = 0

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        self.renewals += 1
        return super().renew(namespace, request_id, fencing_token, lease_ms)

    def renew_many(self, leases: Any) -> list[bool]:
        self.renewals += 1
        return super().renew_many(leases)


def test_a_thousand_calls_at_once_keep_their_short_leases(tmp_path: Path) -> None:
    """One process running 1,000 calls at once on a 0.5 s lease: every lease stays live,
    renewed by a few commits a round. Renewed one per transaction (a commit each, up to a
    millisecond or more on a disk), a round of renewals took longer than the lease on a
    slower disk: healthy calls read as in doubt, and a reconcile hook keeping the README's
    rule ran their side effects a second time."""
    db = tmp_path / "guard.db"
    running: set[str] = set()
    seen_in_doubt: set[str] = set()
    store = CountingStore(db)
    # Late in the test suite the heap holds what earlier tests left (hundreds of
    # thousands of objects): a full collection during the 2 s took about 350 ms, every
    # thread stopped, and leases of 0.5 s lapsed. That pause is the suite's, not this
    # process's: leave it out.
    gc.collect()
    gc.freeze()
    try:
        _thousand_calls(db, store, running, seen_in_doubt)
    finally:
        gc.unfreeze()


def _thousand_calls(db: Path, store: Any, running: set[str], seen_in_doubt: set[str]) -> None:
    """The calls and their checks, for the test above."""

    async def main() -> list[Any]:
        guard = AsyncGuard(store, lease=0.5, wait=0)
        observer = Guard(db, wait=0, owner="observer")

        async def export(ctx: ExecutionContext) -> int:
            running.add(ctx.request_id)
            await asyncio.sleep(2.0)
            running.discard(ctx.request_id)
            return 1

        calls = [
            asyncio.ensure_future(guard.execute(f"r{i}", "export", {}, export)) for i in range(1000)
        ]
        while not all(c.done() for c in calls):
            doubt = await asyncio.to_thread(observer.in_doubt)
            seen_in_doubt.update({r.request_id for r in doubt} & running)
            await asyncio.sleep(0.05)
        observer.close()
        await guard.aclose()
        return [c.result() if c.exception() is None else c.exception() for c in calls]

    results = asyncio.run(main())
    store.close()
    assert seen_in_doubt == set()
    assert all(isinstance(r, Receipt) and r.status is Status.SUCCEEDED for r in results)
    # About 12 rounds of 1,000 leases (2 s at one each 0.167 s), a few commits each; one
    # commit per lease would be 12,000.
    assert 0 < store.renewals < 500, store.renewals


class RenewOnly(SQLiteStore):
    """A subclass changing ``renew`` alone: it refuses the leases of one namespace."""

    calls = 0

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        self.calls += 1
        if namespace == "drained":
            return False
        return super().renew(namespace, request_id, fencing_token, lease_ms)


class ShortAnswers(SQLiteStore):
    """A store breaking ``renew_many``'s protocol: it renews, and answers nothing."""

    def renew_many(self, leases: Any) -> list[bool]:
        super().renew_many(leases)
        return []


def test_a_subclass_changing_renew_alone_keeps_its_renew_called(tmp_path: Path) -> None:
    """The heartbeat renewed through the inherited ``renew_many``, bypassing a subclass's
    own ``renew`` (one refusing a drained namespace's leases renewed them anyway)."""
    store = RenewOnly(tmp_path / "guard.db")
    guard = Guard(store, lease=0.3, wait=0)
    answers: dict[str, Any] = {}

    def run(namespace: str) -> None:
        try:
            answers[namespace] = guard.execute(
                "r", "export", {}, lambda _ctx: time.sleep(1.0), namespace=namespace
            )
        except Exception as exc:
            answers[namespace] = exc

    threads = [threading.Thread(target=run, args=(ns,)) for ns in ("default", "drained")]
    for t in threads:
        t.start()
    time.sleep(0.6)
    assert [r.request_id for r in Guard(store).in_doubt(namespace="drained")] == ["r"]
    assert Guard(store).in_doubt() == []
    for t in threads:
        t.join(10)
    assert store.calls >= 4
    assert isinstance(answers["default"], Receipt)
    guard.close()


def test_a_store_answering_renew_many_wrongly_does_not_stop_the_heartbeat(
    tmp_path: Path,
) -> None:
    """A ``renew_many`` answer of the wrong length raised in the heartbeat thread and ended
    it: no lease of that store identity (another store object's on the same file too) was
    renewed again in that process. Now such an answer counts as a failed renewal."""
    db = tmp_path / "guard.db"
    bad, good = Guard(ShortAnswers(db), lease=0.3, wait=0), Guard(SQLiteStore(db), lease=0.3)
    outcome: dict[str, Any] = {}

    def run(name: str, guard: Guard) -> None:
        try:
            outcome[name] = guard.execute(name, "export", {}, lambda _ctx: time.sleep(1.2))
        except Exception as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=run, args=a) for a in (("bad", bad), ("good", good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert isinstance(outcome["good"], Receipt), outcome
    assert EventKind.LATE_COMPLETION not in _kinds(good, "good")  # its lease never ran out
    bad.close()
    good.close()


def _heartbeat_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "safeagent-heartbeat"}


def test_an_idle_heartbeat_thread_ends_and_a_later_lease_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store's renewal thread ran for the life of the process once it had renewed one
    lease: a process opening a store file per tenant (or per test) gathered one thread per
    file. Now it ends once idle, leaves the registry, and the store's next lease starts
    another, which keeps that lease live."""
    # raising=False: on a build without retirement the test fails on the wait below
    monkeypatch.setattr(_runtime, "BEATER_IDLE_EXIT", 0.2, raising=False)
    monkeypatch.setattr(_runtime, "IDLE_WAIT", 0.05)
    store = CountingStore(tmp_path / "guard.db")
    guard = Guard(store, lease=LEASE, wait=0)
    before = _heartbeat_threads()
    guard.execute("first", "export", {}, lambda _ctx: 1)
    mine = _heartbeat_threads() - before
    assert len(mine) == 1
    assert store.identity in heartbeats._beaters
    assert wait_until(lambda: not any(t.is_alive() for t in mine), timeout=10), "still running"
    assert not mine & set(threading.enumerate())
    assert store.identity not in heartbeats._beaters

    leases: list[tuple[int, int]] = []

    def export(ctx: ExecutionContext) -> int:
        for _ in range(6):  # WORK in all: three leases
            time.sleep(WORK / 6)
            record, now = store.get(ctx.namespace, ctx.request_id)
            assert record is not None
            assert record.lease_expires_at_ms is not None
            leases.append((record.lease_expires_at_ms, now))
        return 1

    receipt = guard.execute("second", "export", {}, export)
    assert receipt.status is Status.SUCCEEDED
    assert all(expires > now for expires, now in leases), leases
    assert leases[-1][0] > leases[0][0], "never renewed"
    assert store.renewals > 0
    assert EventKind.LATE_COMPLETION not in _kinds(guard, "second")
    assert len(_heartbeat_threads() - before - mine) == 1  # the new one, idle for now
    guard.close()


def test_heartbeat_threads_stay_few_across_many_store_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 store files opened in turn, one guarded call each: the renewal threads of the
    idle ones end as the next ones start, so a few run at any time and none is left once
    all are idle (the suite had ~1,089 of them after its first 1,750 tests)."""
    monkeypatch.setattr(_runtime, "BEATER_IDLE_EXIT", 0.02, raising=False)
    monkeypatch.setattr(_runtime, "IDLE_WAIT", 0.02)
    before = _heartbeat_threads()
    started: set[threading.Thread] = set()
    identities: list[str] = []
    peak = 0
    for i in range(200):
        with Guard(tmp_path / f"tenant-{i}.db", wait=0) as guard:
            guard.execute("r", "export", {}, lambda _ctx: 1)
            identities.append(guard.store.identity)
        started |= _heartbeat_threads() - before
        peak = max(peak, sum(t.is_alive() for t in started))
    # About 10 ms a store against 20-40 ms of idling before a thread ends: ~5 at a time.
    assert peak <= 50, peak
    assert wait_until(lambda: not any(t.is_alive() for t in started), timeout=10), sum(
        t.is_alive() for t in started
    )
    assert not set(identities) & set(heartbeats._beaters)


def _pausing_in_runtime(seed: int) -> Callable[..., Any]:
    """A trace function that sleeps up to 0.3 ms at random lines of _runtime.py (one in
    three), releasing the GIL there: a race a few bytecodes wide, such as a beat added
    between the loop's last look at the set and its flag, happens within a few rounds
    instead of once in a million."""
    rng = random.Random(seed)

    def local(_frame: Any, event: str, _arg: Any) -> Any:
        if event == "line" and rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.0003))
        return local

    return lambda frame, _event, _arg: (
        local if frame.f_code.co_filename.endswith("_runtime.py") else None
    )


def test_a_beat_added_as_its_beater_retires_is_still_renewed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Threads entering and leaving heartbeat blocks on one store while its beater retires
    and restarts as soon as it finds no beat: every beat, once its block has been entered,
    is renewed (twice, so by a beater that goes on). A beat that joined a beater whose loop
    had looked at the set and was about to end would never be renewed, and its live claim
    would read as in doubt.

    Rounds in step, each after every block of the one before has ended: the beater finds
    the set empty within 0.5 ms (its beats were due that often) and retires. In even rounds
    each thread waits, between ``beating()`` and entering its block, for the beater handed
    out to retire, so every beat meets a retired beater. In odd rounds it enters after a
    random pause of up to 1 ms, and every thread (the beaters' too) pauses at random lines
    of the runtime (_pausing_in_runtime), so the adds land anywhere in the retirement."""
    monkeypatch.setattr(_runtime, "BEATER_IDLE_EXIT", 0.0, raising=False)
    monkeypatch.setattr(_runtime, "IDLE_WAIT", 0.0002)
    monkeypatch.setattr(_runtime, "MIN_HEARTBEAT", 0.0005)
    threads, rounds = 6, 300
    store = MemoryStore()  # renewals cost no disk: only the threads' timing is tested
    hb = Heartbeats()
    tokens = [
        store.claim(
            ClaimRequest(
                namespace="n",
                request_id=f"r{t}",
                action="act",
                fingerprint="f" * 64,
                payload_json="{}",
                execution_id="e" * 32,
                owner="test",
                lease_ms=600_000,
                downstream_key=f"sa1-{t}",
                detail={},
            )
        ).record.fencing_token
        for t in range(threads)
    ]
    barrier = threading.Barrier(threads)
    failures: list[str] = []
    moved: list[int] = []
    beaters: set[Any] = set()  # the objects: ids of collected ones come again

    def worker(t: int) -> None:
        pause = random.Random(t)
        try:
            for n in range(rounds):
                # Taken while the others may still be in their blocks of the round before:
                # all share a beater that retires after the barrier, as they enter.
                beating = hb.beating(store, "n", f"r{t}", tokens[t], 1)  # due every 0.5 ms
                first = beating.beater
                barrier.wait(30)
                beaters.add(first)
                if n % 2 == 0:
                    retired = lambda b=first: hb._beaters.get(store.identity) is not b  # noqa: E731
                    if not wait_until(retired, 10):
                        failures.append(f"round {n}: the beater never retired")
                        return
                else:
                    time.sleep(pause.uniform(0, 0.001))
                with beating as beat:
                    if beating.beater is not first:
                        moved.append(1)
                    start = beat.renewals
                    renewed = lambda b=beat, s=start: b.renewals >= s + 2  # noqa: E731
                    if not wait_until(renewed, 10, interval=0.0002):
                        failures.append(f"round {n} thread {t}: never renewed")
                        return
                    assert not beat.lost
        except BaseException as exc:
            failures.append(f"thread {t}: {exc!r}")
        finally:
            if failures:
                barrier.abort()  # the others stop at their next round

    trace = threading.gettrace()
    # Threads started from now on: the workers, and the beaters they start.
    threading.settrace(_pausing_in_runtime(seed=7))
    try:
        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
    finally:
        threading.settrace(trace)  # type: ignore[arg-type]
    assert not any(w.is_alive() for w in workers)
    assert failures == [], failures[:5]
    assert len(moved) >= threads * rounds // 2  # at least every beat of the even rounds
    assert len(beaters) >= rounds // 2  # each even round retires the one it was handed
    assert wait_until(lambda: not hb._beaters, timeout=10)  # and the last one retired too
