"""Process-wide machinery shared by the sync and async drivers: in-process wake-ups for
callers waiting on a claim, and the heartbeat thread that renews leases while ``fn`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

from safeagent._receipt import STORE_CLOCK_RESOLUTION, LeaseView, lease_clock
from safeagent.stores._base import BatchRenewStore, ReceiptStore

WakeKey = tuple[str, str, str]  # (store identity, namespace, request id)
MIN_HEARTBEAT = 0.01
# Seconds an idle heartbeat thread sleeps before looking again: a beat due later than that
# (the default 60 s lease renews every 20 s) is picked up without waking the thread.
IDLE_WAIT = 5.0
# Seconds a store's heartbeat thread goes without a beat (no lease to renew, none asked
# for) before it ends, checked on its IDLE_WAIT wake-ups: a process that opens many store
# files (one per tenant, per test) keeps a thread only for those it used lately. A store
# used less often pays one thread start per call (about 0.1 ms, less than its commits).
BEATER_IDLE_EXIT = 10.0
# When one beat is due, every beat due within this share of its interval is renewed with
# it (early, which only extends its lease): the beats of calls that started at about the
# same moment share one commit.
EARLY = 0.25
# Leases renewed by one transaction at most: SQLite holds its write lock while it runs.
RENEW_BATCH = 500


class Slot:
    """One running claim: the waiters it must wake when it completes. The event is made
    only when a caller waits, so a claim nobody waits on costs no lock objects."""

    __slots__ = ("async_waiters", "done", "event")

    def __init__(self) -> None:
        self.event: threading.Event | None = None
        self.async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.done = False


class Wakeups:
    """Wakes callers waiting on a claim held in this process as soon as it completes.

    Callers waiting on a claim held by another process find no slot and poll instead.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a signal handler's guarded call may take it
        self._slots: dict[WakeKey, Slot] = {}

    def _forget_in_child(self) -> None:
        """In a forked child, before any other of its code runs: a new lock (the old one may
        be held by a thread of the parent, which does not exist here), and no slots. The
        parent's claims are another process's to this child (its callers poll them), and a
        slot's event or loop belongs to the parent's threads: setting it here could block
        on a lock one of them held, or wake the parent's event loop through the pipe they
        share. A claim of the thread that forked (a fork inside ``fn``) still ends in
        :meth:`done`, which then finds nothing to wake.
        """
        self._lock = threading.RLock()
        for slot in self._slots.values():
            slot.event = None
            slot.async_waiters = []
        self._slots = {}

    def register(self, key: WakeKey, slot: Slot | None = None) -> Slot:
        """Register ``slot`` (a new one by default) as the claim ``key``'s in this process.
        A caller that passes a slot it already holds can always end it with :meth:`done`,
        even if an interrupt lands as this returns."""
        if slot is None:
            slot = Slot()
        with self._lock:
            self._slots[key] = slot
        return slot

    def done(self, key: WakeKey, slot: Slot) -> None:
        with self._lock:
            if self._slots.get(key) is slot:
                del self._slots[key]
            slot.done = True
            event = slot.event
            waiters, slot.async_waiters = slot.async_waiters, []
        if event is not None:
            event.set()
        for loop, aevent in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(aevent.set)

    def wait(self, key: WakeKey, timeout: float) -> None:
        with self._lock:
            slot = self._slots.get(key)
            event = None
            if slot is not None and not slot.done:
                event = slot.event
                if event is None:
                    event = slot.event = threading.Event()
        if slot is None:
            time.sleep(timeout)
        elif event is not None:
            event.wait(timeout)

    async def await_(self, key: WakeKey, timeout: float) -> None:
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and not slot.done:
                slot.async_waiters.append(waiter)
        if slot is None:
            await asyncio.sleep(timeout)
            return
        if slot.done:
            return
        try:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            # A waiter that timed out (to poll the store again) or was cancelled takes its
            # registration back: a long claim polled every POLL_MAX would otherwise gather
            # one per poll and waiter until it completes.
            with self._lock, contextlib.suppress(ValueError):  # done() took the list
                slot.async_waiters.remove(waiter)


wakeups = Wakeups()


@dataclass(eq=False, slots=True)
class Beat:
    """One running ``fn`` whose lease the heartbeat renews."""

    store: ReceiptStore
    namespace: str
    request_id: str
    fencing_token: int
    lease_ms: int
    interval: float
    next_due: float
    renewals: int = 0
    lost: bool = False
    view: LeaseView = field(default_factory=lambda: LeaseView(math.inf))
    """What ``fn``'s ``ctx.lease_left()`` reads: until when (on :func:`lease_clock`) the
    lease surely holds, the claim's or the latest renewal's send time plus the lease
    (the store set its expiry later than that, less its clock's millisecond)."""


class _Beater:
    """The renewal thread of one store: a stalled store delays only its own leases.

    No lock is shared with the callers: they add and discard their beats in the set
    (single operations, atomic under the GIL) and wake the loop through a SimpleQueue,
    whose put() may be called re-entrantly. So a signal handler that runs a guarded call
    wherever its thread was interrupted can neither deadlock on this thread nor keep it
    from renewing the store's leases (tests/test_hot_path_faults.py).

    Retirement: a beater that has had no beat for BEATER_IDLE_EXIT seconds ends its thread
    and leaves its :class:`Heartbeats`, so the next lease of its store starts a new one.
    Under the owner's lock (which :meth:`Heartbeats._beater` takes to hand a beater out)
    the loop sets ``retired``, and only then looks at the set: a beat there keeps it
    running. A caller adds its beat, and only then reads ``retired`` (the one step the
    hot path pays): set, it moves the beat to the beater its owner hands out now. Under
    the GIL one of the two sees the other's write: the loop's look comes after the add
    (it finds the beat and stays), or before it, and then the caller's read comes after
    ``retired`` was set (it moves). The loop never waits for that lock (a caller's thread
    may hold it under a signal handler's guarded call): busy, it retires on a later
    wake-up.
    """

    def __init__(self, owner: Heartbeats, identity: str) -> None:
        self.owner = owner
        self.identity = identity
        self.beats: set[Beat] = set()
        self.wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
        # When the loop's wait ends (monotonic seconds); +inf while it looks at the beats,
        # so a beat added meanwhile always wakes it. A new beat due earlier than this wakes
        # it; any other beat costs no wake-up, so a call that finishes well within its
        # lease never makes the caller and this thread trade the GIL.
        self.wake_at = math.inf
        # Monotonic seconds of the last sign of use: handed out by the owner (under its
        # lock), or seen with beats by the loop. Only ever a reason not to retire yet.
        self.last_used = time.monotonic()
        self.retired = False  # set by the loop, under the owner's lock, as it ends
        self.thread = threading.Thread(target=self._loop, name="safeagent-heartbeat", daemon=True)
        self.thread.start()

    def add(self, beat: Beat) -> None:
        self.beats.add(beat)
        if beat.next_due < self.wake_at:
            self.wakeups.put(None)

    def discard(self, beat: Beat) -> None:
        self.beats.discard(beat)

    def _retire(self) -> bool:
        """End this beater if it is still unused: True if it left its owner (its loop must
        return), False if it goes on. See the class docstring for the order of steps."""
        lock = self.owner._lock
        if not lock.acquire(blocking=False):
            return False  # a caller holds it, perhaps under a signal handler: not now
        try:
            if time.monotonic() - self.last_used < BEATER_IDLE_EXIT:
                return False  # just handed out: its beat is on the way
            self.retired = True
            if self.beats:  # a beat came before the flag was set: its caller will not move
                self.retired = False
                return False
            if self.owner._beaters.get(self.identity) is self:
                del self.owner._beaters[self.identity]
            return True
        finally:
            lock.release()

    def _loop(self) -> None:
        while True:
            self.wake_at = math.inf
            now = time.monotonic()
            beats = tuple(self.beats)  # one C-level copy: callers may add meanwhile
            if beats:
                self.last_used = now
            elif now - self.last_used >= BEATER_IDLE_EXIT and self._retire():
                return
            if not any(b.next_due <= now for b in beats):
                due = []
            else:  # with every beat due within a quarter interval: one commit renews them all
                due = [b for b in beats if b.next_due - b.interval * EARLY <= now]
            if not due:
                next_due = min((b.next_due for b in beats), default=now + IDLE_WAIT)
                wait = max(next_due - now, 0.001)
                self.wake_at = now + wait
                with contextlib.suppress(queue.Empty):
                    self.wakeups.get(timeout=wait)
                with contextlib.suppress(queue.Empty):
                    while True:  # wake-ups that came while it looked: it looks again now
                        self.wakeups.get_nowait()
                continue
            for batch in _batches(due):
                sent = lease_clock()
                answers = _renew(batch)
                done = time.monotonic()
                for beat, renewed in zip(batch, answers, strict=True):
                    beat.renewals += 1
                    if renewed is False:  # the token is no longer current: someone took over
                        beat.lost = beat.view.lost = True
                        self.beats.discard(beat)
                    elif renewed is None:  # the store failed: try again quickly
                        beat.next_due = done + min(beat.interval, 0.05)
                    else:
                        beat.next_due = done + beat.interval
                        until = sent + beat.lease_ms / 1000 - STORE_CLOCK_RESOLUTION
                        beat.view.valid_until = max(beat.view.valid_until, until)


def _batches(due: list[Beat]) -> list[list[Beat]]:
    """``due`` by store object (one transaction renews only its own store's leases), in
    batches of at most RENEW_BATCH (a transaction holds SQLite's write lock while it runs)."""
    by_store: dict[int, list[Beat]] = {}
    for beat in due:
        by_store.setdefault(id(beat.store), []).append(beat)
    return [
        beats[i : i + RENEW_BATCH]
        for beats in by_store.values()
        for i in range(0, len(beats), RENEW_BATCH)
    ]


def _renews_in_batches(cls: type) -> bool:
    """Whether the class that defines ``renew`` for ``cls`` defines ``renew_many`` too: a
    subclass or wrapper that changes ``renew`` alone (refusing some leases, counting them)
    keeps its ``renew`` called, one lease at a time, as before ``renew_many`` existed."""
    for klass in cls.__mro__:
        if "renew" in vars(klass):
            return "renew_many" in vars(klass)
    return False  # renew reached through __getattr__ (a proxy): call it as it is


_BATCHING: dict[type, bool] = {}


def _renew(batch: list[Beat]) -> list[bool | None]:
    """Renew one store's leases: True renewed, False lost (no longer its token), None the
    store failed (tried again soon). One transaction for them all where the store can
    (``renew_many``, see :func:`_renews_in_batches`), else one each."""
    store = batch[0].store
    batching = _BATCHING.get(type(store))
    if batching is None:
        batching = _BATCHING[type(store)] = _renews_in_batches(type(store))
    if batching:
        leases = [(b.namespace, b.request_id, b.fencing_token, b.lease_ms) for b in batch]
        try:
            renewed: list[bool | None] = list(cast(BatchRenewStore, store).renew_many(leases))
        except Exception:  # noqa: BLE001 - a failed renewal is retried soon
            return [None] * len(batch)
        if len(renewed) != len(batch) or any(type(a) is not bool for a in renewed):
            return [None] * len(batch)  # a store breaking the protocol: as if it failed
        return renewed
    answers: list[bool | None] = []
    for b in batch:
        try:
            answers.append(store.renew(b.namespace, b.request_id, b.fencing_token, b.lease_ms))
        except Exception:  # noqa: BLE001 - a failed renewal is retried soon
            answers.append(None)
    return answers


class Heartbeats:
    """Renews the lease of every running ``fn`` each third of its length, from one daemon
    thread per store (per process). It runs off the caller's thread and off any event
    loop, so a busy caller (or a blocked loop) never lets a live claim expire, and a store
    that stalls cannot starve another store's leases. A dead or frozen process stops
    renewing, and its claims read as in doubt once their lease runs out.

    A store's thread ends once it has had no lease to renew for BEATER_IDLE_EXIT seconds
    (checked every IDLE_WAIT seconds, so it ends within the sum of the two), and its next
    lease starts a new one: a process opening many store files keeps threads only for
    those in use, not one per file it ever opened.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a signal handler's guarded call may take it
        self._beaters: dict[str, _Beater] = {}
        self._pid = 0

    def _forget_in_child(self) -> None:
        """In a forked child, before any other of its code runs: a new lock (the old one may
        be held by a thread of the parent, which does not exist here) and no renewal threads
        (theirs did not survive the fork either). The first lease this child takes starts
        a renewal thread of its own. The pid check in :meth:`_beater` stays: it still drops
        the threads in a child made by a C-level fork(), which runs no handlers.
        """
        self._lock = threading.RLock()
        self._beaters = {}
        self._pid = os.getpid()

    def _beater(self, identity: str, now: float | None = None) -> _Beater:
        """The live beater of ``identity``, started if there is none; ``now`` (monotonic
        seconds) marks it used, so it does not retire before the caller's beat joins it."""
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: threads are gone
                self._pid = os.getpid()
                self._beaters = {}
            beater = self._beaters.get(identity)
            if beater is None:
                beater = self._beaters[identity] = _Beater(self, identity)
            beater.last_used = time.monotonic() if now is None else now
            return beater

    def beating(
        self,
        store: ReceiptStore,
        namespace: str,
        request_id: str,
        token: int,
        lease_ms: int,
        since: float | None = None,
        view: LeaseView | None = None,
    ) -> _Beating:
        """Renew this lease until the block ends (a context manager giving the Beat).
        ``since``: when the lease's claim was sent, on :func:`lease_clock` (the Beat's
        ``view``, ``view`` when given, holds until then plus the lease); ``None``: not
        counted (a reconcile hook's lease)."""
        interval = max(MIN_HEARTBEAT, lease_ms / 3000)
        now = time.monotonic()
        beat = Beat(store, namespace, request_id, token, lease_ms, interval, now + interval)
        if view is not None:
            beat.view = view
        if since is not None:
            beat.view.valid_until = since + lease_ms / 1000 - STORE_CLOCK_RESOLUTION
        return _Beating(self._beater(store.identity, now), beat)

    def running(self, store: ReceiptStore, ctx: Any, lease_ms: int, since: float) -> _Beating:
        """:meth:`beating` for a running ``fn``'s context ``ctx``: its lease counted from
        ``since`` (when its claim was sent, on :func:`lease_clock`), kept in the view its
        ``ctx.lease_left()`` reads."""
        return self.beating(
            store,
            ctx.namespace,
            ctx.request_id,
            ctx.fencing_token,
            lease_ms,
            since or lease_clock(),
            getattr(ctx, "_lease", None),
        )


class _Beating:
    """The block of :meth:`Heartbeats.beating`: a class, not a generator-based context
    manager, because every guarded call enters one."""

    __slots__ = ("beat", "beater")

    def __init__(self, beater: _Beater, beat: Beat) -> None:
        self.beater = beater
        self.beat = beat

    def __enter__(self) -> Beat:
        beater = self.beater
        try:
            beater.add(self.beat)
            # Read after the add, never before: see _Beater on retirement.
            if beater.retired:
                self._move()
        except BaseException:
            # An interrupt after the beat joined the set: ``with`` calls no __exit__, and
            # a beat left there would renew its lease for as long as the process lives.
            # (_move keeps the beat in no set but self.beater's.)
            self.beat.view.ended = True
            self.beater.discard(self.beat)
            raise
        return self.beat

    def _move(self) -> None:
        """Move the beat off a retired beater (its thread may have ended) to the one its
        owner hands out now; again if that one retires before it sees the beat."""
        while self.beater.retired:
            old = self.beater
            old.discard(self.beat)
            self.beater = old.owner._beater(old.identity)
            self.beater.add(self.beat)

    def __exit__(self, *exc: object) -> None:
        self.beat.view.ended = True  # first: fn is over, nothing it left may send now
        self.beater.discard(self.beat)


heartbeats = Heartbeats()


def _forget_all_in_child() -> None:
    wakeups._forget_in_child()
    heartbeats._forget_in_child()


# Run only at a fork, never on a call: a thread of the parent inside one of these locks at
# that moment would otherwise leave it held for good in the child, and the child's first
# guarded call would wait on it forever (tests/test_fork_safety.py).
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)
