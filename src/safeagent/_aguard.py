"""The async guard: the same flows as :class:`~safeagent.Guard`, driven with ``await``.

Store calls run in a worker thread (``asyncio.to_thread``) unless the store says it never
blocks (the memory store), so SQLite never blocks the event loop. Two moments need care
(docs/design.md section 2, cancellation):

- once ``fn`` has started, it runs to completion shielded from the caller's
  cancellation: the caller gets ``CancelledError`` at once, the outcome is recorded when
  ``fn`` ends, and retries wait for it and replay it;
- a task cancelled while it is still claiming leaves no claim behind: if the claim lands
  after all, it is released before anyone could run ``fn`` under it (a reconcile
  take-over that lands after its caller was cancelled is handed back, in doubt).

Both hold when the event loop itself ends meanwhile (``asyncio.run`` returning cancels
every task): the writes that must follow a cancellation (the release, the outcome of a
``fn`` that ran) are made by worker threads, which ``asyncio.run`` waits for, never by a
task the shutdown could cancel first. :meth:`AsyncGuard.aclose` waits for them too, before
it closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable, Collection, Generator
from typing import Any, ParamSpec, TypeVar, cast

from safeagent._audit import AuditEvent, EventKind
from safeagent._core import GuardCore, Outcome, ReconcileReport, ended_before_fn, tally
from safeagent._decorator import AsyncGuardedFunction, decorator_options
from safeagent._flow import (
    AskHook,
    Claim,
    Complete,
    Emit,
    Get,
    Op,
    Reraise,
    Resolve,
    Run,
    TakeOver,
    Wait,
    call_for_record,
    capture,
    execute_flow,
    never_started,
    reconcile_flow,
    resolve_flow,
    type_name,
)
from safeagent._flow import Outcome as FnOutcome
from safeagent._keys import check_request_id
from safeagent._policy import CASE_PREFIX, Seconds
from safeagent._receipt import (
    ErrorInfo,
    ExecutionContext,
    Receipt,
    Status,
    _current,
    lease_clock,
)
from safeagent._runtime import heartbeats, wakeups
from safeagent._telemetry import Observation, observe
from safeagent.errors import OutcomeUnknownError, ReplayedFailureError, ResultNotSerializableError
from safeagent.stores._base import ClaimFirstStore, ClaimResult, Completion, WriteResult

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
# How a claim undone because its caller was cancelled before fn started is recorded.
_CANCELLED = (ErrorInfo("asyncio.CancelledError", "cancelled before fn started"), "cancelled")


class _Ticket:
    """Hands the result of a store write from its worker thread to the task awaiting it,
    unless that task was cancelled first: then the thread undoes the write itself. The
    lock makes the two exclusive, so exactly one side undoes a write nobody will use."""

    __slots__ = ("abandoned", "handed", "lock", "result")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.handed = False
        self.result: Any = None


async def _through(future: asyncio.Future[T]) -> T:
    """The result of ``future``, awaited through any cancellation of the awaiting task: for
    the task running a plain ``fn``, whose thread nothing can stop, so that what is
    recorded is what ``fn`` did even while the event loop shuts down (which cancels every
    task, then waits for them to end)."""
    while True:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise


def _submit(fn: Callable[..., T], *args: Any) -> asyncio.Future[FnOutcome]:
    """``capture(fn, *args)`` in the loop's default executor, in a copy of the current
    context (as ``asyncio.to_thread`` does). A future, not a task: the loop's shutdown
    cancels tasks, and this thread, once submitted, runs to its end (``asyncio.run`` waits
    for the executor before it returns)."""
    call = functools.partial(contextvars.copy_context().run, capture, fn, *args)
    return asyncio.get_running_loop().run_in_executor(None, call)


class AsyncGuard(GuardCore):
    """The ``async`` twin of :class:`~safeagent.Guard`: same arguments, same behaviour,
    ``await``-able methods. ``fn`` may be ``async def`` (awaited) or a plain function
    (run in a worker thread so it cannot block the event loop). See :class:`Guard` for
    the arguments."""

    async def execute(
        self,
        request_id: str,
        action: str,
        payload: Any,
        fn: Callable[[ExecutionContext], Any],
        *,
        namespace: str | None = None,
        exclude: Collection[str] = (),
        wait: Seconds | None = None,
        lease: Seconds | None = None,
        not_executed: Collection[type[BaseException]] | None = None,
        outcome_unknown: Collection[type[BaseException]] | None = None,
    ) -> Receipt:
        """Run ``fn(context)`` at most once for ``(namespace, request_id)``; see
        :meth:`Guard.execute` for arguments, return value and errors. If the calling task
        is cancelled after ``fn`` started, ``fn`` still runs to completion and its outcome
        is recorded; the caller gets ``CancelledError`` at once."""
        call = self._prepare(
            request_id,
            action,
            payload,
            namespace,
            exclude,
            wait,
            lease,
            not_executed,
            outcome_unknown,
        )
        with observe(call.action, call.namespace) as seen:
            receipt = await self._drive(execute_flow(call, fn, self._settings()), seen=seen)
            seen.replay = receipt.replay
        return receipt

    def guarded(
        self,
        action: str | None = None,
        *,
        key_arg: str | None = None,
        exclude: Collection[str] = (),
        allow_missing_key: bool = False,
        namespace: str | None = None,
        wait: Seconds | None = None,
        lease: Seconds | None = None,
        not_executed: Collection[type[BaseException]] | None = None,
        outcome_unknown: Collection[type[BaseException]] | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], AsyncGuardedFunction[P, R]]:
        """Decorate an ``async def`` function; see :meth:`Guard.guarded`."""
        options = decorator_options(namespace, wait, lease, not_executed, outcome_unknown)

        def decorate(func: Callable[P, Awaitable[R]]) -> AsyncGuardedFunction[P, R]:
            return AsyncGuardedFunction(
                self, func, action, key_arg, exclude, allow_missing_key, options
            )

        return decorate

    async def resolve(
        self,
        request_id: str,
        outcome: Outcome | Status,
        *,
        by: str,
        reason: str,
        namespace: str | None = None,
        result: Any = None,
        error_type: str = "safeagent.ResolvedFailed",
        error_message: str | None = None,
    ) -> Receipt:
        """An operator's resolution; see :meth:`Guard.resolve`."""
        ns, status, result_json, error, rerun = self._resolution_args(
            request_id, outcome, by, reason, namespace, result, error_type, error_message
        )
        return await self._drive(
            resolve_flow(
                ns,
                request_id,
                status,
                result_json,
                error,
                by,
                reason,
                rerun=rerun,
                case_prefix=CASE_PREFIX,
            )
        )

    async def reconcile(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> ReconcileReport:
        """Run the reconcile hooks over every record now in doubt; see
        :meth:`Guard.reconcile`."""
        items: list[tuple[str, str, str]] = []
        for receipt in await self.in_doubt(namespace=namespace, all_namespaces=all_namespaces):
            verdict = await self._reconcile_one(receipt)
            items.append((receipt.namespace, receipt.request_id, verdict))
        return tally(items)

    async def _reconcile_one(self, receipt: Receipt) -> str:
        hook = self._reconcile_hook(receipt.action)
        if hook is None:
            return "no_hook"
        record, _ = await self._io(self.store.get, receipt.namespace, receipt.request_id)
        if record is None:
            return "skipped"
        call = call_for_record(record, self._lease_ms(record.action), hook, CASE_PREFIX)
        try:
            done = await self._drive(reconcile_flow(call, record, self._settings()))
        except OutcomeUnknownError:
            return "unknown"
        except ReplayedFailureError:
            return "failed"
        except ResultNotSerializableError:
            return "happened"
        if done is not None:
            return "happened"
        after, _ = await self._io(self.store.get, receipt.namespace, receipt.request_id)
        released = after is not None and after.status is Status.RELEASED
        return "not_happened" if released else "skipped"

    async def get(self, request_id: str, *, namespace: str | None = None) -> Receipt | None:
        """The receipt of ``request_id`` as stored now, or ``None``."""
        record, now = await self._io(
            self.store.get, self._ns(namespace), check_request_id(request_id)
        )
        return None if record is None else Receipt.from_record(record, replay=False, now_ms=now)

    async def in_doubt(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> list[Receipt]:
        """Every record now in doubt; see :meth:`Guard.in_doubt`."""
        ns = self._scope(namespace, all_namespaces)
        records, now = await self._io(
            lambda: self.store.records(namespace=ns, statuses=(Status.IN_DOUBT, Status.PENDING))
        )
        return [
            Receipt.from_record(r, replay=False, now_ms=now)
            for r in records
            if r.effective_status(now) is Status.IN_DOUBT
        ]

    async def audit_trail(
        self,
        request_id: str | None = None,
        *,
        namespace: str | None = None,
        all_namespaces: bool = False,
    ) -> list[AuditEvent]:
        """Audit events in write order; see :meth:`Guard.audit_trail`."""
        ns = self._scope(namespace, all_namespaces)
        return await self._io(lambda: self.store.events(namespace=ns, subject=request_id))

    async def aclose(self) -> None:
        """Wait for the work this guard handed off (a ``fn`` whose caller was cancelled,
        and the write of its outcome; a cancelled claim's release), then write buffered
        audit events, and close the store if the guard opened it."""
        await self.drain()
        await self._io(self.store.close if self._owns_store else self.store.flush_events)

    async def drain(self) -> None:
        """Wait until every piece of work this guard handed off on the running event loop
        has ended: each ``fn`` whose caller was cancelled has returned and its outcome is
        recorded, and each claim a cancelled caller left is released. Work handed off on
        another event loop is not waited for (it ran or was cancelled with that loop)."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()  # a handed-off fn calling this waits for the others
        while True:
            mine = [
                f
                for f in self._handed_off()
                if f.get_loop() is loop and not f.done() and f is not me
            ]
            if not mine:
                return
            # wait(), not gather(): cancelling this wait (a timeout on aclose) must leave
            # the work itself alone, and end the wait at once.
            await asyncio.wait(mine)

    def _handed_off(self) -> set[asyncio.Future[Any]]:
        handed: set[asyncio.Future[Any]] | None = self.__dict__.get("_handed")
        if handed is None:
            handed = self.__dict__["_handed"] = set()
        return handed

    def _keep(self, future: asyncio.Future[Any]) -> None:
        """Hold a reference to background work until it ends (asyncio keeps only weak
        ones to tasks), for :meth:`drain` to wait on."""
        handed = self._handed_off()
        handed.add(future)
        future.add_done_callback(handed.discard)

    async def __aenter__(self) -> AsyncGuard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the driver ------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call: inline for a store that never blocks, else in a worker thread
        (under :func:`capture`, so whatever the store raises reaches this coroutine)."""
        if getattr(self.store, "blocking", True):
            value: T = (await asyncio.to_thread(capture, fn, *args)).unwrap()
            return value
        return fn(*args)

    async def _drive(
        self,
        flow: Generator[Op, Any, T],
        answer: Any = None,
        seen: Observation | None = None,
    ) -> T:
        """Perform each operation the flow yields until it returns or raises; ``seen``
        (telemetry on) learns whether ``fn`` ran and what outcome was recorded.

        An exception of ``fn`` the flow could not raise itself (:class:`Reraise`: a
        ``StopIteration``) cannot leave a coroutine either (PEP 479): the caller gets a
        ``RuntimeError`` whose ``__cause__`` is that exception, as awaiting an ``async``
        function that raises ``StopIteration`` gives. Its outcome is recorded as usual.
        """
        store = self.store
        wake: tuple[tuple[str, str, str], Any] | None = None
        error: BaseException | None = None
        raised: BaseException
        handed_off = False
        claim_sent = 0.0  # monotonic: when the last claim was sent (its lease counts from it)
        try:
            while True:
                try:
                    op: Op = flow.send(answer) if error is None else flow.throw(error)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                except Reraise as carried:
                    raised = carried.error
                    break
                answer = error = None
                if isinstance(op, Run):
                    key = (store.identity, op.context.namespace, op.context.request_id)
                    wake = (key, wakeups.register(key))
                    if seen is not None:
                        seen.ran = True  # until it says it never started
                    started: list[bool] = []
                    running = asyncio.ensure_future(self._run(op, started, claim_sent))
                    try:
                        answer = await asyncio.shield(running)
                        if seen is not None:
                            seen.ran = not answer.unstarted
                    except asyncio.CancelledError:
                        if not started:
                            # fn was not called: its task has not begun (no other task
                            # ran since it was made; it never will now), or it ended on
                            # the way to fn (an interrupt, which stopped the loop; this
                            # is the shutdown's cancellation). The claim is released.
                            running.cancel()
                            if seen is not None:
                                seen.ran = False
                            if running.done() and not running.cancelled():
                                exc = running.exception()  # retrieved: no "never retrieved"
                                self._start(self._release_unrun_ctx, op.context, exc)
                            else:
                                self._start(self._release_unstarted, op.context)
                            raise
                        # fn has started: let it finish and record its outcome without us.
                        # Not in a new task: one made now, as the loop ends, could be
                        # cancelled before its first step; fn's task has begun.
                        handed_off = True
                        self._keep(running)
                        running.add_done_callback(functools.partial(self._finish, flow, wake))
                        raise
                    except BaseException as exc:
                        # An interrupt (KeyboardInterrupt, SystemExit; or GeneratorExit,
                        # this coroutine closed): raised by fn's task on its way to fn,
                        # or landed here, in this frame, before that task's first step.
                        # Either way, while fn was not called, the task is cancelled
                        # first (one not yet begun then never begins: fn never runs) and
                        # the claim released, as the sync Guard does. After fn was called
                        # (an interrupt as its heartbeat ends) the record stays PENDING,
                        # in doubt.
                        if not started:
                            running.cancel()
                            if seen is not None:
                                seen.ran = False
                            raised_in_task = running.done() and not running.cancelled()
                            cause = running.exception() if raised_in_task else exc
                            self._start(self._release_unrun_ctx, op.context, cause)
                        raise
                    continue
                if isinstance(op, (Claim, TakeOver)):  # undone if this caller is cancelled
                    try:
                        if isinstance(op, Claim):
                            claim_sent = lease_clock()
                            claim = (
                                cast(ClaimFirstStore, store).claim_new if op.new else store.claim
                            )
                            answer = await self._write_or_undo(
                                functools.partial(claim, op.request), self._release
                            )
                        else:
                            taking = functools.partial(
                                store.take_over,
                                op.namespace,
                                op.request_id,
                                op.expected_token,
                                op.owner,
                                op.lease_ms,
                            )
                            answer = await self._write_or_undo(taking, self._hand_back)
                    except asyncio.CancelledError:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - thrown into the flow
                        error = exc
                    continue
                if isinstance(op, Complete):
                    if seen is not None:
                        seen.status = op.completion.status
                    # fn has run: its outcome is written even if this caller is cancelled
                    # while the write waits for a worker thread, or the loop ends.
                    try:
                        answer = await self._complete(op.completion)
                    except asyncio.CancelledError:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - thrown into the flow
                        error = exc
                        if seen is not None:
                            seen.unrecorded = True
                    continue
                try:
                    answer = await self._perform(op)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # noqa: BLE001 - thrown into the flow
                    error = exc
            raise RuntimeError(
                f"fn raised {type_name(raised)}, which cannot propagate out of a coroutine "
                "(PEP 479); its outcome was recorded, and it is this error's __cause__"
            ) from raised
        finally:
            if not handed_off:
                flow.close()
                if wake is not None:
                    wakeups.done(*wake)

    def _finish(
        self,
        flow: Generator[Op, Any, Any],
        wake: tuple[tuple[str, str, str], Any],
        running: asyncio.Future[FnOutcome],
    ) -> None:
        """Record the outcome of a ``fn`` whose caller was cancelled, once its task ends (a
        done callback of that task): the rest of the flow (the completion and its event)
        runs in a worker thread, which runs to its end even if the event loop is ending."""
        if running.cancelled() or running.exception() is not None:
            # An interrupt landed as fn's task ended (fn had been called): its outcome is
            # unknown, so the record stays PENDING, in doubt after its lease. Nothing is
            # raised here: this runs as a done callback, often during the loop's shutdown.
            flow.close()
            wakeups.done(*wake)
            return
        outcome = running.result()

        def rest() -> None:
            try:
                op = flow.send(outcome)
                while True:
                    try:
                        if isinstance(op, Complete):
                            answer: Any = self.store.complete(op.completion)
                        elif isinstance(op, Emit):
                            self.store.record_event(op.event, buffered=op.buffered)
                            answer = None
                        else:  # pragma: no cover - run_flow yields nothing else after Run
                            raise TypeError(f"unexpected operation after fn ran: {op!r}")
                    except BaseException as exc:  # noqa: BLE001 - thrown into the flow
                        op = flow.throw(exc)
                        continue
                    op = flow.send(answer)
            except BaseException:  # noqa: BLE001, S110 - the outcome is recorded; nobody to tell
                pass
            finally:
                flow.close()
                wakeups.done(*wake)

        self._start(rest)

    async def _complete(self, completion: Completion) -> Any:
        """``store.complete`` in a worker thread that runs to its end even if the caller is
        cancelled meanwhile (kept for :meth:`drain`)."""
        if not getattr(self.store, "blocking", True):
            return self.store.complete(completion)
        completing = _submit(self.store.complete, completion)
        self._keep(completing)
        outcome: FnOutcome = await asyncio.shield(completing)
        return outcome.unwrap()

    async def _write_or_undo(self, write: Callable[[], T], undo: Callable[[T], None]) -> T:
        """``write()`` (a claim or a take-over) in a worker thread. If the caller is
        cancelled before its result reached it, the write is undone (``undo(result)``): by
        the worker thread when it finishes after the cancellation, else in a thread of its
        own; either way even if the event loop ends meanwhile. Raises what ``write``
        raised, or ``CancelledError``."""
        if not getattr(self.store, "blocking", True):
            result = write()  # inline: nothing can cancel it midway
            try:
                await asyncio.sleep(0)  # a cancellation pending now undoes it, as below
            except asyncio.CancelledError:
                undo(result)
                raise
            return result
        ticket = _Ticket()

        def run() -> T:
            result = write()
            with ticket.lock:
                if not ticket.abandoned:
                    ticket.handed, ticket.result = True, result
                    return result
            undo(result)  # the caller is gone: nobody will use this write
            return result

        writing = _submit(run)
        try:
            outcome: FnOutcome = await asyncio.shield(writing)
        except asyncio.CancelledError:
            with ticket.lock:
                ticket.abandoned = True
                handed, result = ticket.handed, ticket.result
            if handed:  # the thread handed it over just before: undo it from here
                self._start(undo, result)
            else:
                self._keep(writing)
            raise
        value: T = outcome.unwrap()
        return value

    def _start(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` now, without awaiting it: inline for a store that never
        blocks, else in a worker thread that runs to its end even if the loop ends (kept
        for :meth:`drain`; in a thread of its own if the executor is already shut down)."""
        if not getattr(self.store, "blocking", True):
            fn(*args)
            return
        try:
            self._keep(_submit(fn, *args))
        except RuntimeError:
            threading.Thread(target=capture, args=(fn, *args)).start()

    def _release(self, claim: ClaimResult) -> None:
        """Undo a claim whose caller was cancelled before it could run ``fn``: released,
        audited (never raises: a claim left behind reads as in doubt after its lease)."""
        if claim.won:
            record = claim.record
            self._release_unrun(
                record.namespace,
                record.request_id,
                record.fencing_token,
                record.action,
                record.execution_id,
                *_CANCELLED,
            )

    def _release_unrun_ctx(self, ctx: ExecutionContext, exc: BaseException | None) -> None:
        """Undo the claim ``fn`` was about to run under, ``exc`` (an interrupt) having
        ended its task on the way to ``fn``."""
        error = ended_before_fn(exc) if exc is not None else _CANCELLED[0]
        self._release_unrun(
            ctx.namespace,
            ctx.request_id,
            ctx.fencing_token,
            ctx.action,
            ctx.execution_id,
            error,
            "unrun",
        )

    def _release_unstarted(self, ctx: ExecutionContext) -> None:
        """Undo the claim ``fn`` was about to run under, its caller cancelled first."""
        self._release_unrun(
            ctx.namespace,
            ctx.request_id,
            ctx.fencing_token,
            ctx.action,
            ctx.execution_id,
            *_CANCELLED,
        )

    def _hand_back(self, taken: WriteResult) -> None:
        """Undo a reconcile take-over whose caller was cancelled before asking the hook:
        the record goes back in doubt at once, audited as an unknown verdict, instead of
        reading as running under a lease nobody renews (never raises: the lease runs out)."""
        if not taken.accepted or taken.record is None:
            return
        record = taken.record
        with contextlib.suppress(Exception):
            self.store.complete(
                Completion(
                    namespace=record.namespace,
                    request_id=record.request_id,
                    fencing_token=record.fencing_token,
                    status=Status.IN_DOUBT,
                    result_json=None,
                    error=None,
                    actor=self._owner_name(),
                    detail={"verdict": "unknown", "note": "cancelled before the hook ran"},
                    event_kind=EventKind.RECONCILED,
                    action=record.action,
                    execution_id=record.execution_id,
                )
            )

    async def _perform(self, op: Op) -> Any:
        store = self.store
        if isinstance(op, Get):
            read = store.get
            if op.first and self._claim_first:
                read = cast(ClaimFirstStore, store).look
            return await self._io(read, op.namespace, op.request_id)
        if isinstance(op, Emit):
            return await self._io(lambda: store.record_event(op.event, buffered=op.buffered))
        if isinstance(op, Complete):
            return await self._io(store.complete, op.completion)
        if isinstance(op, Wait):
            await wakeups.await_((store.identity, op.namespace, op.request_id), op.timeout)
            return None
        if isinstance(op, Resolve):
            return await self._io(store.resolve, op.resolution)
        if isinstance(op, AskHook):
            request = op.request
            with heartbeats.beating(
                store, request.namespace, request.request_id, request.fencing_token, op.lease_ms
            ):
                # In a task of its own, like fn (see _outcome).
                return await asyncio.ensure_future(_outcome(op.hook, request))
        raise TypeError(f"unknown operation {op!r}")  # pragma: no cover

    async def _run(self, op: Run, started: list[bool], claim_sent: float) -> FnOutcome:
        """Run ``fn`` under a heartbeat (the outermost coroutine of its task), its lease
        counted from ``claim_sent`` (monotonic seconds). ``started`` gets an item as ``fn``
        is about to be called: until then, cancelling the task means ``fn`` never runs,
        and the task raises only an interrupt that landed on the way (:meth:`_drive`
        releases the claim); after, it raises only one that lands as it ends."""
        outer: Any = _current  # not read yet (the task's own copy of the caller's context)
        beating = None
        try:
            ctx = op.context
            outer = _current.get()  # restored as it was, not by a token an interrupt may lose
            _current.set(ctx)
            beating = heartbeats.running(self.store, ctx, op.lease_ms, claim_sent)
            with beating:
                try:
                    started.append(True)
                    return await _outcome(op.fn, ctx, through=True)
                except BaseException as exc:  # noqa: BLE001 - see _outcome
                    return FnOutcome(error=exc)
        finally:
            # Also here, inline (plain stores and a C-level discard: no call where a
            # signal handler runs): an interrupt as the ``with`` calls __exit__ would
            # otherwise leave the lease renewed for as long as the process lives.
            try:
                if beating is not None:
                    beating.beat.view.ended = True
                    beating.beater.beats.discard(beating.beat)
            finally:
                if outer is not _current:
                    _current.set(outer)


async def _outcome(fn: Callable[[Any], Any], arg: Any, *, through: bool = False) -> FnOutcome:
    """Call ``fn(arg)``: awaited if async, in a worker thread if not; never raises.
    ``through``: a plain ``fn``'s thread is awaited through cancellations of this task
    (the task running ``fn``, which only the event loop's shutdown cancels: nothing can
    stop the thread, so the outcome recorded is what ``fn`` did); else a cancellation
    stops the wait (a hook whose caller is cancelled: its verdict is no longer used).

    A plain ``fn`` runs under :func:`capture`, so what it raises comes back from the
    thread as a value (asyncio cannot carry a ``StopIteration`` through a future: the
    await would never end). A ``GeneratorExit`` that reaches a task through a future (one
    an ``async`` fn awaits) is thrown into the task's outermost coroutine, past any
    handler below it: so ``fn`` and hooks each run in a task of their own, whose outermost
    coroutine catches it (:meth:`AsyncGuard._run` for ``fn``, this one for a hook).
    """
    try:
        if inspect.iscoroutinefunction(fn):
            try:
                started = fn(arg)
            except TypeError as exc:  # the call itself, not the coroutine's body
                return FnOutcome(error=exc, unstarted=never_started(fn, exc))
            return FnOutcome(value=await started)
        # A plain function may block: keep it off the event loop, in a worker thread
        # (the context copied, as to_thread does).
        try:
            thread = _submit(fn, arg)
        except RuntimeError as exc:  # the executor is shut down: fn never started
            return FnOutcome(error=exc, unstarted=True)
        outcome = await (_through(thread) if through else thread)
        if outcome.error is None and inspect.isawaitable(outcome.value):
            outcome = FnOutcome(value=await outcome.value)
    except BaseException as exc:  # noqa: BLE001 - the flow classifies it
        return FnOutcome(error=exc)
    return outcome
