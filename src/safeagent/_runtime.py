"""Process-wide machinery shared by the sync and async drivers: in-process wake-ups for
callers waiting on a claim, and the heartbeat thread that renews leases while ``fn`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from safeagent.stores._base import ReceiptStore

WakeKey = tuple[str, str, str]  # (store identity, namespace, request id)
MIN_HEARTBEAT = 0.01


@dataclass
class _Slot:
    event: threading.Event = field(default_factory=threading.Event)
    async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(
        default_factory=list
    )


class Wakeups:
    """Wakes callers waiting on a claim held in this process as soon as it completes.

    Callers waiting on a claim held by another process find no slot and poll instead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[WakeKey, _Slot] = {}

    def register(self, key: WakeKey) -> _Slot:
        slot = _Slot()
        with self._lock:
            self._slots[key] = slot
        return slot

    def done(self, key: WakeKey, slot: _Slot) -> None:
        with self._lock:
            if self._slots.get(key) is slot:
                del self._slots[key]
            slot.event.set()
            waiters, slot.async_waiters = slot.async_waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(event.set)

    def wait(self, key: WakeKey, timeout: float) -> None:
        with self._lock:
            slot = self._slots.get(key)
        if slot is None:
            time.sleep(timeout)
        else:
            slot.event.wait(timeout)

    async def await_(self, key: WakeKey, timeout: float) -> None:
        event = asyncio.Event()
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and not slot.event.is_set():
                slot.async_waiters.append((asyncio.get_running_loop(), event))
        if slot is None:
            await asyncio.sleep(timeout)
            return
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


wakeups = Wakeups()


@dataclass(eq=False)
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


class _Beater:
    """The renewal thread of one store: a stalled store delays only its own leases."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.beats: set[Beat] = set()
        threading.Thread(target=self._loop, name="safeagent-heartbeat", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                due = [b for b in self.beats if b.next_due <= now]
                if not due:
                    wait = min((b.next_due for b in self.beats), default=now + 3600) - now
                    self.cond.wait(max(wait, 0.001))
                    continue
            for beat in due:
                try:
                    renewed = beat.store.renew(
                        beat.namespace, beat.request_id, beat.fencing_token, beat.lease_ms
                    )
                except Exception:  # noqa: BLE001 - a failed renewal is retried soon
                    renewed = None
                with self.cond:
                    beat.renewals += 1
                    if renewed is False:  # the token is no longer current: someone took over
                        beat.lost = True
                        self.beats.discard(beat)
                    elif renewed is None:  # the store failed: try again quickly
                        beat.next_due = time.monotonic() + min(beat.interval, 0.05)
                    else:
                        beat.next_due = time.monotonic() + beat.interval


class Heartbeats:
    """Renews the lease of every running ``fn`` each third of its length, from one daemon
    thread per store (per process). It runs off the caller's thread and off any event
    loop, so a busy caller (or a blocked loop) never lets a live claim expire, and a store
    that stalls cannot starve another store's leases. A dead or frozen process stops
    renewing, and its claims read as in doubt once their lease runs out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beaters: dict[str, _Beater] = {}
        self._pid = 0

    def _beater(self, identity: str) -> _Beater:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: threads are gone
                self._pid = os.getpid()
                self._beaters = {}
            beater = self._beaters.get(identity)
            if beater is None:
                beater = self._beaters[identity] = _Beater()
            return beater

    @contextlib.contextmanager
    def beating(
        self, store: ReceiptStore, namespace: str, request_id: str, token: int, lease_ms: int
    ) -> Iterator[Beat]:
        """Renew this lease until the block ends."""
        interval = max(MIN_HEARTBEAT, lease_ms / 3000)
        beat = Beat(
            store, namespace, request_id, token, lease_ms, interval, time.monotonic() + interval
        )
        beater = self._beater(store.identity)
        with beater.cond:
            beater.beats.add(beat)
            beater.cond.notify()
        try:
            yield beat
        finally:
            with beater.cond:
                beater.beats.discard(beat)


heartbeats = Heartbeats()
