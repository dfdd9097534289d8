"""Running a tool's ``async`` body across threads and event loops: in a thread of its own
awaited from the caller's loop (:func:`in_own_thread`), or on the caller's loop from the
guard's thread (:func:`run_on_loop`). No SDK is imported here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from safeagent import NotExecuted

T = TypeVar("T")

_keepers: set[asyncio.Task[None]] = set()  # strong references: the loop keeps weak ones


async def in_own_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a new thread of its own (the context copied, as
    ``asyncio.to_thread`` does), awaited.

    For a sync :class:`~safeagent.Guard` driving an ``async`` tool body on the caller's
    loop: the loop's default executor is bounded (``min(32, CPUs + 4)`` threads), and if
    each of its threads waited on a tool body of this loop that itself needs the executor
    (``getaddrinfo``, ``to_thread``), no call would ever finish.

    If the awaiting task is cancelled, it gets ``CancelledError`` at once and the thread
    runs on: the guarded call records its outcome. A keeper task holds the loop's shutdown
    (``asyncio.run`` cancels every task, then waits for them) until the thread has ended,
    as it would wait for the default executor's threads, so the outcome is recorded before
    ``asyncio.run`` returns and ``asyncio.run`` never closes the loop under the thread (a
    caller closing its own loop is met by :func:`run_on_loop`).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[bool, Any]] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: tuple[bool, Any]) -> None:
        if not done.done():
            done.set_result(outcome)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, context.run(fn, *args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: no one awaits it
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="safeagent-guard").start()
    keeper = loop.create_task(_keep_until(done))
    _keepers.add(keeper)
    keeper.add_done_callback(_keepers.discard)
    ok, value = await asyncio.shield(done)
    if ok:
        return cast(T, value)
    raise value


_LOOP_POLL = 0.5
"""Seconds between checks, while a guard's thread waits for a tool body on a loop, that
the loop has not been closed under the body."""


def run_on_loop(loop: asyncio.AbstractEventLoop, body: Coroutine[Any, Any, T]) -> T:
    """Run ``body`` (a tool's ``async`` body) on ``loop`` from the guard's thread, and wait
    for it. A caller that runs its own loop (``run_until_complete``, then ``close``) may
    close it under the body: a closed loop never finishes it, so the wait checks every
    half second (:data:`_LOOP_POLL`) that the loop is open.

    Raises:
        NotExecuted: the loop was closed before it took ``body``: nothing ran (the claim
            is released; the next call runs).
        concurrent.futures.CancelledError: ``body`` was cancelled, or the loop was closed
            before it finished: it may have begun (the record is in doubt).
        Whatever ``body`` raised.
    """
    try:
        future = asyncio.run_coroutine_threadsafe(body, loop)
    except RuntimeError as exc:  # the loop is closed
        body.close()
        raise NotExecuted(
            "the caller's event loop was closed before the tool body started; nothing ran"
        ) from exc
    while True:
        try:
            return future.result(timeout=_LOOP_POLL)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the body's own TimeoutError
            if loop.is_closed():
                future.cancel()
                raise concurrent.futures.CancelledError(
                    "the caller's event loop was closed before the tool body finished; it "
                    "may have begun"
                ) from None


async def _keep_until(done: asyncio.Future[Any]) -> None:
    """Wait for ``done``, whatever cancels this task (see :func:`in_own_thread`)."""
    while not done.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(done)
