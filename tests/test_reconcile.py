"""Reconcile hooks, proactive reconcile, per-action policies and audited re-runs (issue 4).

Every behaviour runs over both stores and, where the API has both flavours, over
:class:`Guard` and :class:`AsyncGuard` (with sync and ``async def`` hooks). Side effects
write rows into an effect ledger (a separate SQLite file); tests count the ledger, never
the guard's own records. Time is the fake clock of ``conftest``; P1 kills a real child
process.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from safeagent import (
    ActionPolicy,
    AsyncGuard,
    EventKind,
    ExecutionContext,
    FinalityGate,
    Guard,
    InProgressError,
    InvalidInputError,
    InvalidTransitionError,
    OutcomeUnknownError,
    Receipt,
    ReconcileRequest,
    Reconciliation,
    ReplayedFailureError,
    SQLiteStore,
    Status,
)
from safeagent._keys import canonical_json, downstream_key, fingerprint
from safeagent.stores import ClaimRequest
from tests._workers import kill_when_marked
from tests.conftest import FakeClock, Ledger

INVOICE = {"invoice_id": "INV-1", "amount_cents": 500}
ACTION = "send_invoice"
DEAD_OWNER = "worker-dead:4242:MainThread"
HOOK_MODES = ("sync", "async+sync-hook", "async+async-hook")
API_KINDS = ("sync", "async")


class AckTimeout(Exception):
    """The downstream system did not acknowledge: it may or may not have acted."""


class Declined(Exception):
    """A terminal failure of the side effect."""


class Refused(Exception):
    """Surely not executed (declared per action or per call)."""


# -- one synchronous face over Guard and AsyncGuard ------------------------------------------


class Api:
    """Drives a :class:`Guard` or an :class:`AsyncGuard` through one blocking interface, so
    each behaviour is written once. The async guard runs on a private event loop."""

    def __init__(self, mode: str, store: Any, **kwargs: Any) -> None:
        self.is_async = mode.startswith("async")
        self.loop = asyncio.new_event_loop() if self.is_async else None
        self.guard: Any = AsyncGuard(store, **kwargs) if self.is_async else Guard(store, **kwargs)

    def _run(self, value: Any) -> Any:
        return value if self.loop is None else self.loop.run_until_complete(value)

    def execute(self, *args: Any, **kwargs: Any) -> Receipt:
        return self._run(self.guard.execute(*args, **kwargs))

    def get(self, request_id: str) -> Receipt | None:
        return self._run(self.guard.get(request_id))

    def in_doubt(self) -> list[Receipt]:
        return self._run(self.guard.in_doubt())

    def resolve(self, *args: Any, **kwargs: Any) -> Receipt:
        return self._run(self.guard.resolve(*args, **kwargs))

    def reconcile(self) -> Any:
        return self._run(self.guard.reconcile())

    def audit_trail(self, request_id: str) -> list[Any]:
        return self._run(self.guard.audit_trail(request_id))

    def close(self) -> None:
        if self.loop is None:
            self.guard.close()
            return
        self.loop.run_until_complete(self.guard.aclose())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@pytest.fixture
def make_api(store_factory: Callable[..., Any]) -> Iterator[Callable[..., Api]]:
    """``make_api(mode, store, **guard_kwargs)``; closed before the stores are."""
    made: list[Api] = []

    def make(mode: str, store: Any, **kwargs: Any) -> Api:
        kwargs.setdefault("lease", 30.0)
        kwargs.setdefault("wait", 0)
        kwargs.setdefault("owner", "owner-live")
        api = Api(mode, store, **kwargs)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


def hook_for(mode: str, answer: Callable[[ReconcileRequest], Any]) -> Any:
    """The hook in the flavour the mode asks for: ``answer`` itself, or an async wrapper."""
    if mode == "async+async-hook":

        async def async_hook(req: ReconcileRequest) -> Any:
            await asyncio.sleep(0)
            return answer(req)

        return async_hook
    return answer


def sender(ledger: Ledger) -> Callable[[ExecutionContext], dict[str, Any]]:
    """The side effect: one ledger row, then a small receipt body."""

    def send(ctx: ExecutionContext) -> dict[str, Any]:
        ledger.append(ctx.request_id, ctx.execution_id)
        return {"sent": ctx.request_id, "attempt": ctx.attempt}

    return send


@dataclass(frozen=True)
class Dead:
    """What the attempt now in doubt looked like."""

    execution_id: str
    downstream_key: str
    claimed_at_ms: int
    fencing_token: int


def leave_in_doubt(
    store: Any,
    clock: FakeClock,
    ledger: Ledger,
    how: str,
    request_id: str,
    *,
    effect: bool,
    action: str = ACTION,
    payload: Any = INVOICE,
) -> Dead:
    """Leave ``request_id`` in doubt, owned by ``DEAD_OWNER``.

    ``stored``: its fn wrote the ledger (if ``effect``) and then timed out (declared
    outcome unknown), so the record is stored IN_DOUBT. ``expired``: a claim whose owner
    died (never renewed) and whose lease ran out on the store's clock.
    """
    if how == "stored":
        seen: list[ExecutionContext] = []

        def fn(ctx: ExecutionContext) -> None:
            seen.append(ctx)
            if effect:
                ledger.append(ctx.request_id, "dead attempt")
            raise AckTimeout("no acknowledgement within 5 s")

        dead = Guard(store, lease=30.0, wait=0, owner=DEAD_OWNER, outcome_unknown=(AckTimeout,))
        with pytest.raises(AckTimeout):
            dead.execute(request_id, action, payload, fn)
        dead.close()
        record, _ = store.get("default", request_id)
        assert record.status is Status.IN_DOUBT
        return Dead(
            seen[0].execution_id, seen[0].downstream_key, record.claimed_at_ms, record.fencing_token
        )
    assert how == "expired"
    body = canonical_json(payload)
    key = downstream_key("default", action, request_id)
    claim = store.claim(
        ClaimRequest(
            namespace="default",
            request_id=request_id,
            action=action,
            fingerprint=fingerprint(action, body),
            payload_json=body.decode(),
            execution_id="dead" + request_id,
            owner=DEAD_OWNER,
            lease_ms=30_000,
            downstream_key=key,
        )
    )
    assert claim.won
    if effect:
        ledger.append(request_id, "dead attempt")
    clock.advance(31)
    record, now = store.get("default", request_id)
    assert record.effective_status(now) is Status.IN_DOUBT
    return Dead(claim.record.execution_id, key, record.claimed_at_ms, record.fencing_token)


def reconciled_events(api: Api, request_id: str) -> list[Any]:
    return [e for e in api.audit_trail(request_id) if e.kind is EventKind.RECONCILED]


def reconcile_claims(api: Api, request_id: str) -> list[Any]:
    return [
        e
        for e in api.audit_trail(request_id)
        if e.kind is EventKind.CLAIMED and e.detail.get("reconcile") is True
    ]


# Every driver meets a stored IN_DOUBT record; an expired claim (read as in doubt) is met
# by the sync driver and by the async one with an async hook.
MODE_AND_DOUBT = pytest.mark.parametrize(
    ("mode", "doubt"),
    [
        ("sync", "stored"),
        ("sync", "expired"),
        ("async+sync-hook", "stored"),
        ("async+async-hook", "stored"),
        ("async+async-hook", "expired"),
    ],
)


# -- each verdict ---------------------------------------------------------------------------


@MODE_AND_DOUBT
def test_happened_verdict_returns_the_hooks_result_as_a_replay_and_keeps_it(
    mode: str, doubt: str, store: Any, clock: FakeClock, ledger: Ledger, make_api: Any
) -> None:
    """A "happened" verdict gives a replay receipt with the hook's result, replayed later."""
    dead = leave_in_doubt(store, clock, ledger, doubt, "r-1", effect=True)
    asked: list[ReconcileRequest] = []

    def answer(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.happened({"invoice": "INV-1", "mail_id": "m-7"}, note="mail log")

    api = make_api(mode, store, actions={ACTION: ActionPolicy(reconcile=hook_for(mode, answer))})
    send = sender(ledger)
    first = api.execute("r-1", ACTION, INVOICE, send)
    assert first.replay is True
    assert first.status is Status.SUCCEEDED
    assert first.result == {"invoice": "INV-1", "mail_id": "m-7"}
    assert first.execution_id == dead.execution_id
    assert ledger.count() == 1
    for _ in range(2):
        again = api.execute("r-1", ACTION, INVOICE, send)
        assert again.replay is True
        assert again.result == first.result
        assert again.execution_id == first.execution_id
    assert len(asked) == 1
    assert ledger.count() == 1
    assert api.get("r-1").status is Status.SUCCEEDED
    assert api.in_doubt() == []
    assert len(reconcile_claims(api, "r-1")) == 1
    [event] = reconciled_events(api, "r-1")
    assert event.detail["verdict"] == "happened"
    assert event.detail["note"] == "mail log"


@MODE_AND_DOUBT
def test_failed_verdict_replays_the_stored_failure_now_and_later(
    mode: str, doubt: str, store: Any, clock: FakeClock, ledger: Ledger, make_api: Any
) -> None:
    """A "failed" verdict raises ReplayedFailureError with the hook's error, now and later."""
    leave_in_doubt(store, clock, ledger, doubt, "r-2", effect=False)
    asked: list[ReconcileRequest] = []

    def answer(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.failed("MailRejected", "mailbox does not exist")

    api = make_api(mode, store, actions={ACTION: ActionPolicy(reconcile=hook_for(mode, answer))})
    send = sender(ledger)
    for _ in range(3):
        with pytest.raises(ReplayedFailureError) as failure:
            api.execute("r-2", ACTION, INVOICE, send)
        assert failure.value.error_type == "MailRejected"
        assert failure.value.error_message == "mailbox does not exist"
        assert failure.value.receipt.status is Status.FAILED
    assert len(asked) == 1
    assert ledger.count() == 0
    assert api.get("r-2").status is Status.FAILED
    [event] = reconciled_events(api, "r-2")
    assert event.detail["verdict"] == "failed"


@MODE_AND_DOUBT
def test_not_happened_verdict_lets_the_caller_run_fn_once_as_attempt_two(
    mode: str, doubt: str, store: Any, clock: FakeClock, ledger: Ledger, make_api: Any
) -> None:
    """A "did not happen" verdict lets the caller run fn once as attempt 2, replayed later."""
    dead = leave_in_doubt(store, clock, ledger, doubt, "r-3", effect=False)
    asked: list[ReconcileRequest] = []

    def answer(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.not_happened(note="no such mail in the outbox")

    api = make_api(mode, store, actions={ACTION: ActionPolicy(reconcile=hook_for(mode, answer))})
    send = sender(ledger)
    ran = api.execute("r-3", ACTION, INVOICE, send)
    assert ran.replay is False
    assert ran.status is Status.SUCCEEDED
    assert ran.attempt == 2
    assert ran.execution_id != dead.execution_id
    assert ran.result == {"sent": "r-3", "attempt": 2}
    assert ran.downstream_key == dead.downstream_key
    assert ledger.rows() == [("r-3", ran.execution_id)]
    for _ in range(2):
        again = api.execute("r-3", ACTION, INVOICE, send)
        assert again.replay is True
        assert again.execution_id == ran.execution_id
        assert again.result == ran.result
    assert len(asked) == 1
    assert ledger.count() == 1
    [event] = reconciled_events(api, "r-3")
    assert event.detail["verdict"] == "not_happened"


def _hook_raises(req: ReconcileRequest) -> Reconciliation:
    raise ConnectionError("mail API unreachable")


UNKNOWN_ANSWERS: dict[str, Callable[[ReconcileRequest], Any]] = {
    "unknown": lambda req: Reconciliation.unknown(note="mail API unreachable"),
    "raises": _hook_raises,
    "junk": lambda req: {"verdict": "happened"},  # not a Reconciliation
    # a status code for the error type: refused (InvalidInputError) inside the hook, which
    # used to surface as a bare TypeError with the record left PENDING under the hook's lease
    "mistyped": lambda req: Reconciliation.failed(402, "card declined"),  # type: ignore[arg-type]
    "no such verdict": lambda req: Reconciliation("maybe"),  # type: ignore[arg-type]
}


def test_a_reconciliation_takes_none_for_no_note_or_message() -> None:
    """note=None and error_message=None are accepted (a hook may pass them), read as no
    note and no message; any other non-str is refused."""
    assert Reconciliation.happened({"ok": 1}, note=None).note == ""  # type: ignore[arg-type]
    failed = Reconciliation.failed("Declined", None, note=None)  # type: ignore[arg-type]
    assert (failed.error_message, failed.note) == (None, "")
    with pytest.raises(InvalidInputError, match="note"):
        Reconciliation.unknown(note=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("answer_kind", sorted(UNKNOWN_ANSWERS))
@MODE_AND_DOUBT
def test_unknown_raising_or_junk_answer_keeps_the_record_in_doubt(
    mode: str,
    answer_kind: str,
    doubt: str,
    store: Any,
    clock: FakeClock,
    ledger: Ledger,
    make_api: Any,
) -> None:
    """Unknown, raising or junk hook answers give OutcomeUnknownError; the record stays in doubt."""
    dead = leave_in_doubt(store, clock, ledger, doubt, "r-4", effect=True)
    asked: list[ReconcileRequest] = []

    def answer(req: ReconcileRequest) -> Any:
        asked.append(req)
        return UNKNOWN_ANSWERS[answer_kind](req)

    api = make_api(mode, store, actions={ACTION: ActionPolicy(reconcile=hook_for(mode, answer))})
    send = sender(ledger)
    for round_ in (1, 2):
        with pytest.raises(OutcomeUnknownError) as doubt_info:
            api.execute("r-4", ACTION, INVOICE, send)
        assert doubt_info.value.attempt == 1
        assert doubt_info.value.claimed_at_ms == dead.claimed_at_ms
        assert len(asked) == round_
        assert api.get("r-4").status is Status.IN_DOUBT
        assert [r.request_id for r in api.in_doubt()] == ["r-4"]
    assert ledger.count() == 1
    events = reconciled_events(api, "r-4")
    assert len(events) == 2
    assert all(e.detail["verdict"] == "unknown" for e in events)
    if answer_kind == "unknown":
        assert events[0].detail["note"] == "mail API unreachable"
    else:
        assert events[0].detail["note"]  # says what went wrong with the hook


@MODE_AND_DOUBT
def test_hook_is_asked_about_the_attempt_in_doubt(
    mode: str, doubt: str, store: Any, clock: FakeClock, ledger: Ledger, make_api: Any
) -> None:
    """The hook gets the request, the first downstream key, and the dead owner and claim time."""
    dead = leave_in_doubt(store, clock, ledger, doubt, "r-5", effect=False)
    asked: list[ReconcileRequest] = []

    def answer(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.happened("ok")

    api = make_api(mode, store, actions={ACTION: ActionPolicy(reconcile=hook_for(mode, answer))})
    api.execute("r-5", ACTION, INVOICE, sender(ledger))
    [req] = asked
    assert req.namespace == "default"
    assert req.request_id == "r-5"
    assert req.action == ACTION
    assert req.payload == INVOICE
    assert req.attempt == 1
    assert req.downstream_key == dead.downstream_key
    assert req.downstream_key == downstream_key("default", ACTION, "r-5")
    assert req.owner == DEAD_OWNER
    assert req.claimed_at_ms == dead.claimed_at_ms
    assert req.fencing_token == dead.fencing_token + 1
    assert ledger.count() == 0


# -- one caller reconciles at a time ------------------------------------------------------


@pytest.mark.parametrize("short_waits", [0, 4])
def test_eight_threads_one_hook_run_the_others_wait_for_its_answer(
    short_waits: int, store: Any, clock: FakeClock, ledger: Ledger
) -> None:
    """Of eight threads one runs the hook; the others wait for its answer or time out."""
    leave_in_doubt(store, clock, ledger, "stored", "r-8", effect=True)
    entered, release = threading.Event(), threading.Event()
    runners: list[str] = []

    def hook(req: ReconcileRequest) -> Reconciliation:
        runners.append(threading.current_thread().name)
        entered.set()
        assert release.wait(20)
        return Reconciliation.happened({"mail_id": "m-8"})

    guard = Guard(store, lease=30.0, wait=10.0, actions={ACTION: ActionPolicy(reconcile=hook)})
    waits = {f"caller-{i}": (0.2 if i < short_waits else 10.0) for i in range(8)}
    results: dict[str, Any] = {}
    barrier = threading.Barrier(len(waits))
    send = sender(ledger)

    def call(name: str) -> None:
        barrier.wait(10)
        try:
            results[name] = guard.execute("r-8", ACTION, INVOICE, send, wait=waits[name])
        except BaseException as exc:
            results[name] = exc

    threads = {n: threading.Thread(target=call, args=(n,), name=n) for n in waits}
    for t in threads.values():
        t.start()
    try:
        assert entered.wait(10)
        runner = runners[0]
        gave_up = [n for n, w in waits.items() if w < 1 and n != runner]
        for name in gave_up:  # the short bounds run out while the hook still runs
            threads[name].join(10)
            assert not threads[name].is_alive()
        time.sleep(0.2)
        assert all(threads[n].is_alive() for n in waits if n not in gave_up)
        assert guard.get("r-8").status is Status.PENDING  # the reconcile lease
    finally:
        release.set()
        for t in threads.values():
            t.join(20)
    assert runners == [runner]
    for name, outcome in results.items():
        if name in gave_up:
            assert isinstance(outcome, InProgressError), outcome
            assert 0 < outcome.retry_after <= 30
        else:
            assert isinstance(outcome, Receipt), outcome
            assert outcome.replay is True
            assert outcome.result == {"mail_id": "m-8"}
    assert len(results) == 8
    assert ledger.count() == 1
    guard.close()


@pytest.mark.parametrize("short_waits", [0, 4])
@pytest.mark.parametrize("hook_kind", ["sync", "async"])
def test_eight_tasks_one_hook_run_the_others_wait_for_its_answer(
    hook_kind: str, short_waits: int, store: Any, clock: FakeClock, ledger: Ledger
) -> None:
    """Of eight tasks one runs the hook; the others wait for its answer or time out in progress."""
    leave_in_doubt(store, clock, ledger, "stored", "r-9", effect=True)
    caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller")
    runners: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def sync_hook(req: ReconcileRequest) -> Reconciliation:
        runners.append(caller.get())
        entered.set()
        assert release.wait(20)
        return Reconciliation.happened({"mail_id": "m-9"})

    async def async_hook(req: ReconcileRequest) -> Reconciliation:
        runners.append(caller.get())
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return Reconciliation.happened({"mail_id": "m-9"})

    hook = sync_hook if hook_kind == "sync" else async_hook
    waits = {f"task-{i}": (0.2 if i < short_waits else 10.0) for i in range(8)}
    send = sender(ledger)

    async def main() -> tuple[dict[str, Any], list[str]]:
        aguard = AsyncGuard(store, lease=30.0, actions={ACTION: ActionPolicy(reconcile=hook)})
        start = asyncio.Event()

        async def call(name: str) -> Receipt:
            caller.set(name)
            await start.wait()
            return await aguard.execute("r-9", ACTION, INVOICE, send, wait=waits[name])

        tasks = {n: asyncio.create_task(call(n)) for n in waits}
        start.set()
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            runner = runners[0]
            gave_up = [n for n, w in waits.items() if w < 1 and n != runner]
            if gave_up:
                await asyncio.wait([tasks[n] for n in gave_up], timeout=10)
            await asyncio.sleep(0.2)
            assert all(tasks[n].done() for n in gave_up)
            assert not any(tasks[n].done() for n in waits if n not in gave_up)
        finally:
            release.set()
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        await aguard.aclose()
        return dict(zip(tasks, outcomes, strict=True)), gave_up

    results, gave_up = asyncio.run(main())
    assert len(runners) == 1
    for name, outcome in results.items():
        if name in gave_up:
            assert isinstance(outcome, InProgressError), outcome
        else:
            assert isinstance(outcome, Receipt), outcome
            assert outcome.replay is True
            assert outcome.result == {"mail_id": "m-9"}
    assert ledger.count() == 1


def test_hook_interrupted_by_keyboard_interrupt_leaves_the_record_in_doubt(
    store: Any, clock: FakeClock, ledger: Ledger
) -> None:
    """A hook raising KeyboardInterrupt propagates it and leaves the record in doubt."""
    leave_in_doubt(store, clock, ledger, "stored", "r-10", effect=False)
    asked: list[int] = []

    def hook(req: ReconcileRequest) -> Reconciliation:
        asked.append(req.fencing_token)
        if len(asked) == 1:
            raise KeyboardInterrupt
        return Reconciliation.unknown(note="still cannot tell")

    guard = Guard(store, lease=30.0, wait=0, actions={ACTION: ActionPolicy(reconcile=hook)})
    send = sender(ledger)
    with pytest.raises(KeyboardInterrupt):
        guard.execute("r-10", ACTION, INVOICE, send)
    assert guard.get("r-10").status is Status.IN_DOUBT
    assert [r.request_id for r in guard.in_doubt()] == ["r-10"]
    with pytest.raises(OutcomeUnknownError):
        guard.execute("r-10", ACTION, INVOICE, send)
    assert len(asked) == 2
    assert guard.get("r-10").status is Status.IN_DOUBT
    assert ledger.count() == 0
    verdicts = [
        e.detail["verdict"] for e in guard.audit_trail("r-10") if e.kind is EventKind.RECONCILED
    ]
    assert verdicts == ["unknown", "unknown"]
    guard.close()


# -- proactive reconcile ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", HOOK_MODES)
def test_proactive_reconcile_reports_each_verdict_and_retries_follow_it(
    mode: str, store: Any, clock: FakeClock, ledger: Ledger, make_api: Any
) -> None:
    """guard.reconcile() reports each verdict with counts and items; retries then follow them."""
    answers = {
        "p-happened": Reconciliation.happened({"mail_id": "m-1"}),
        "p-failed": Reconciliation.failed("MailRejected", "bounced"),
        "p-not": Reconciliation.not_happened(),
        "p-unknown": Reconciliation.unknown(note="cannot tell"),
    }
    for rid in answers:
        leave_in_doubt(store, clock, ledger, "stored", rid, effect=rid == "p-happened")
    leave_in_doubt(store, clock, ledger, "stored", "p-nohook", effect=False, action="post_tweet")
    asked: list[str] = []

    def answer(req: ReconcileRequest) -> Reconciliation:
        asked.append(req.request_id)
        return answers[req.request_id]

    api = make_api(mode, store, actions={ACTION: ActionPolicy(reconcile=hook_for(mode, answer))})
    send = sender(ledger)
    done = api.execute("p-done", ACTION, INVOICE, send)  # succeeded: not in doubt
    assert ledger.count() == 2

    report = api.reconcile()
    assert sorted(asked) == sorted(answers)
    assert report.checked == 5
    assert (report.happened, report.failed, report.not_happened, report.unknown) == (1, 1, 1, 1)
    assert report.no_hook == 1
    assert report.skipped == 0
    assert sorted(report.items) == sorted(
        [
            ("default", "p-happened", "happened"),
            ("default", "p-failed", "failed"),
            ("default", "p-not", "not_happened"),
            ("default", "p-unknown", "unknown"),
            ("default", "p-nohook", "no_hook"),
        ]
    )
    assert sorted(r.request_id for r in api.in_doubt()) == ["p-nohook", "p-unknown"]
    assert api.get("p-not").status is Status.RELEASED

    # Retries follow the verdicts.
    happened = api.execute("p-happened", ACTION, INVOICE, send)
    assert happened.replay is True
    assert happened.result == {"mail_id": "m-1"}
    with pytest.raises(ReplayedFailureError) as failed:
        api.execute("p-failed", ACTION, INVOICE, send)
    assert failed.value.error_type == "MailRejected"
    ran = api.execute("p-not", ACTION, INVOICE, send)
    assert ran.replay is False
    assert ran.attempt == 2
    assert api.execute("p-not", ACTION, INVOICE, send).execution_id == ran.execution_id
    with pytest.raises(OutcomeUnknownError):
        api.execute("p-unknown", ACTION, INVOICE, send)
    with pytest.raises(OutcomeUnknownError):
        api.execute("p-nohook", "post_tweet", INVOICE, send)
    replayed = api.execute("p-done", ACTION, INVOICE, send)
    assert replayed.replay is True
    assert replayed.execution_id == done.execution_id
    assert ledger.count() == 3  # p-happened's dead attempt, p-done, p-not's rerun
    assert sorted(r[0] for r in ledger.rows()) == ["p-done", "p-happened", "p-not"]


# -- per-action policy precedence ------------------------------------------------------------


def _lease_ms(receipt: Receipt | None) -> int:
    assert receipt is not None
    assert receipt.lease_expires_at_ms is not None
    return receipt.lease_expires_at_ms - receipt.claimed_at_ms


@pytest.mark.parametrize("kind", API_KINDS)
def test_lease_precedence_is_per_call_then_action_then_guard(
    kind: str, store: Any, ledger: Ledger, make_api: Any
) -> None:
    """The lease a claim records is the per-call one, else the action's, else the guard's."""
    api = make_api(
        kind,
        store,
        lease=30.0,
        actions={
            "slow_export": ActionPolicy(lease=120.0),
            "other": ActionPolicy(outcome_unknown=(AckTimeout,)),
        },
    )
    send = sender(ledger)
    api.execute("l-1", "slow_export", {}, send)
    api.execute("l-2", "slow_export", {}, send, lease=5.0)
    api.execute("l-3", "plain", {}, send)
    api.execute("l-4", "other", {}, send)
    api.execute("l-5", "plain", {}, send, lease=7.5)
    assert _lease_ms(api.get("l-1")) == 120_000
    assert _lease_ms(api.get("l-2")) == 5_000
    assert _lease_ms(api.get("l-3")) == 30_000
    assert _lease_ms(api.get("l-4")) == 30_000
    assert _lease_ms(api.get("l-5")) == 7_500
    assert ledger.count() == 5


EXCEPTION_CASES = [
    # (action, raised, per-call overrides, expected status)
    ("plain", AckTimeout, {}, Status.IN_DOUBT),  # the guard's outcome_unknown
    ("plain", Refused, {}, Status.RELEASED),  # the guard's not_executed
    ("plain", Declined, {}, Status.FAILED),
    ("swapped", AckTimeout, {}, Status.RELEASED),  # the action's not_executed wins
    ("swapped", Refused, {}, Status.IN_DOUBT),  # the action's outcome_unknown wins
    ("lease_only", AckTimeout, {}, Status.IN_DOUBT),  # no types of its own: the guard's
    (
        "swapped",
        AckTimeout,
        {"not_executed": (), "outcome_unknown": (AckTimeout,)},
        Status.IN_DOUBT,
    ),
    ("swapped", Refused, {"outcome_unknown": (), "not_executed": ()}, Status.FAILED),
    ("plain", Declined, {"not_executed": (Declined,)}, Status.RELEASED),
]


@pytest.mark.parametrize(("action", "raised", "overrides", "expected"), EXCEPTION_CASES)
@pytest.mark.parametrize("kind", API_KINDS)
def test_exception_type_precedence_is_per_call_then_action_then_guard(
    kind: str,
    action: str,
    raised: type[Exception],
    overrides: dict[str, Any],
    expected: Status,
    store: Any,
    ledger: Ledger,
    make_api: Any,
) -> None:
    """Exception types are classified per call, else per action, else by the guard."""
    api = make_api(
        kind,
        store,
        not_executed=(Refused,),
        outcome_unknown=(AckTimeout,),
        actions={
            "swapped": ActionPolicy(not_executed=(AckTimeout,), outcome_unknown=(Refused,)),
            "lease_only": ActionPolicy(lease=99.0),
        },
    )

    def fn(ctx: ExecutionContext) -> None:
        ledger.append(ctx.request_id)
        raise raised("boom")

    with pytest.raises(raised):
        api.execute("x-1", action, {}, fn, **overrides)
    record = api.get("x-1")
    assert record is not None
    assert record.status is expected
    assert ledger.count() == 1


# -- audited re-run of a failure ---------------------------------------------------------------


def fails_first(ledger: Ledger, attempts: list[int]) -> Callable[[ExecutionContext], Any]:
    """A side effect that books each attempt; the first is refused (Declined)."""

    def flaky(ctx: ExecutionContext) -> dict[str, int]:
        ledger.append(ctx.request_id, str(ctx.attempt))
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Declined("SMTP 550: relay denied")
        return {"attempt": ctx.attempt}

    return flaky


@pytest.mark.parametrize("kind", API_KINDS)
def test_rerun_turns_a_failure_into_a_release_so_the_next_call_runs_again(
    kind: str, store: Any, ledger: Ledger, make_api: Any
) -> None:
    """An audited "rerun" turns FAILED into RELEASED, so the next call runs fn again."""
    api = make_api(kind, store)
    attempts: list[int] = []
    flaky = fails_first(ledger, attempts)

    with pytest.raises(Declined):
        api.execute("f-1", ACTION, INVOICE, flaky)
    with pytest.raises(ReplayedFailureError):
        api.execute("f-1", ACTION, INVOICE, flaky)
    released = api.resolve("f-1", "rerun", by="alice", reason="relay fixed")
    assert released.status is Status.RELEASED
    ran = api.execute("f-1", ACTION, INVOICE, flaky)
    assert ran.replay is False
    assert ran.attempt == 2
    assert ran.result == {"attempt": 2}
    assert api.execute("f-1", ACTION, INVOICE, flaky).replay is True
    assert attempts == [1, 2]
    assert ledger.count() == 2
    [resolved] = [e for e in api.audit_trail("f-1") if e.kind is EventKind.RESOLVED]
    assert resolved.actor == "alice"
    assert resolved.detail["rerun"] is True
    assert resolved.detail["reason"] == "relay fixed"


def test_rerun_of_a_purged_failure_is_no_tombstone_and_verifies(
    store: Any, clock: FakeClock, ledger: Ledger
) -> None:
    """A FAILED record purged by retention, then re-opened by an operator's rerun: the
    record is RELEASED and no longer a tombstone (``purged_at_ms`` cleared), so the next
    call runs fn once, and ``verify`` finds nothing wrong at any point (it reported the
    re-opened row as a tombstone no retention pass covered)."""
    from safeagent.audit import verify
    from safeagent.retention import purge

    guard = Guard(store)
    attempts: list[int] = []
    flaky = fails_first(ledger, attempts)

    with pytest.raises(Declined):
        guard.execute("p-1", ACTION, INVOICE, flaky)
    clock.advance(10.0)
    assert purge(store, older_than=1.0).tombstoned == 1
    assert verify(store).ok, verify(store).problems
    released = guard.resolve("p-1", "rerun", by="alice", reason="relay fixed")
    assert released.status is Status.RELEASED
    assert released.purged_at_ms is None
    assert verify(store).ok, verify(store).problems
    assert guard.execute("p-1", ACTION, INVOICE, flaky).result == {"attempt": 2}
    assert guard.execute("p-1", ACTION, INVOICE, flaky).replay is True
    assert attempts == [1, 2]
    assert verify(store).ok, verify(store).problems


@pytest.mark.parametrize("state", ["succeeded", "in_doubt", "absent"])
@pytest.mark.parametrize("kind", API_KINDS)
def test_rerun_is_refused_unless_the_record_failed(
    kind: str, state: str, store: Any, clock: FakeClock, ledger: Ledger, make_api: Any
) -> None:
    """A rerun raises InvalidTransitionError for succeeded, in-doubt or absent records."""
    if state == "in_doubt":
        leave_in_doubt(store, clock, ledger, "stored", "q-1", effect=False)
    api = make_api(kind, store)
    send = sender(ledger)
    if state == "succeeded":
        api.execute("q-1", ACTION, INVOICE, send)
    before = api.get("q-1")
    with pytest.raises(InvalidTransitionError):
        api.resolve("q-1", "rerun", by="alice", reason="try again")
    assert api.get("q-1") == before
    assert not [e for e in api.audit_trail("q-1") if e.kind is EventKind.RESOLVED]
    assert ledger.count() == (1 if state == "succeeded" else 0)


def test_rerun_is_refused_for_a_case_settlement(store: Any, ledger: Ledger) -> None:
    """A rerun of a failed case: settlement raises InvalidTransitionError, changing nothing."""
    guard = Guard(store, lease=30.0, wait=0)
    gate = FinalityGate(guard)
    gate.signal("C-1", "agent-1", "refund", 1.0)

    def refund(outcome: str, ctx: ExecutionContext) -> None:
        ledger.append(ctx.request_id, outcome)
        raise Declined("payment provider said no")

    with pytest.raises(Declined):
        gate.settle("C-1", "refund", refund)
    assert guard.get("case:C-1").status is Status.FAILED
    with pytest.raises(InvalidTransitionError):
        guard.resolve("case:C-1", "rerun", by="alice", reason="try once more")
    assert guard.get("case:C-1").status is Status.FAILED
    with pytest.raises(ReplayedFailureError):
        gate.settle("C-1", "refund", refund)
    assert ledger.count() == 1
    guard.close()


# -- P1: a claim left by a dead process ------------------------------------------------------


def test_p1_dead_claim_is_in_progress_then_in_doubt_then_reconciled_and_run_once(
    tmp_path: Path, clock: FakeClock, ledger: Ledger
) -> None:
    """P1: a killed claim is in progress at 10 s, in doubt at 31 s, then reconciled and run once."""
    db = tmp_path / "guard.db"
    marker = tmp_path / "marker.json"
    payload = {"invoice_id": "INV-1"}
    args = {
        "db": str(db),
        "ledger": str(tmp_path / "unused-ledger.txt"),
        "request_id": "INV-1",
        "action": ACTION,
        "payload": payload,
        "lease": 30.0,
        "write_ledger": False,  # killed before the side effect
        "marker": str(marker),
    }
    child = kill_when_marked("tests._workers", "claim_and_hang", args)

    # The parent judges leases on a fake clock that starts at the stored claim time.
    probe = SQLiteStore(db)
    claimed, _ = probe.get("default", "INV-1")
    probe.close()
    assert claimed is not None
    assert claimed.status is Status.PENDING
    assert claimed.lease_expires_at_ms == claimed.claimed_at_ms + 30_000
    clock.now_ms = claimed.claimed_at_ms
    store = SQLiteStore(db, clock=clock)
    asked: list[ReconcileRequest] = []

    def hook(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.not_happened(note="no invoice INV-1 in the mail log")

    def send_invoice(ctx: ExecutionContext) -> dict[str, str]:
        ledger.append(ctx.request_id, ctx.downstream_key)
        return {"invoice_id": ctx.payload["invoice_id"], "status": "sent"}

    guard = Guard(store, lease=30.0, wait=0, actions={ACTION: ActionPolicy(reconcile=hook)})
    try:
        # t = 10 s: in progress, retry after the 20 s of lease left; nothing runs.
        clock.advance(10)
        t0 = time.monotonic()
        with pytest.raises(InProgressError) as busy:
            guard.execute("INV-1", ACTION, payload, send_invoice)
        assert time.monotonic() - t0 < 1.0
        assert busy.value.retry_after == pytest.approx(20.0, abs=0.01)
        t0 = time.monotonic()
        with pytest.raises(InProgressError) as bounded:
            guard.execute("INV-1", ACTION, payload, send_invoice, wait=0.3)
        assert 0.3 <= time.monotonic() - t0 < 3.0
        assert bounded.value.retry_after == pytest.approx(20.0, abs=0.01)
        assert ledger.count() == 0
        assert asked == []

        # t = 31 s: in doubt, with the dead attempt's owner and claim time.
        clock.advance(21)
        stored = guard.get("INV-1")
        assert stored.status is Status.IN_DOUBT
        assert str(child["pid"]) in stored.lease_owner
        assert stored.claimed_at_ms == claimed.claimed_at_ms
        assert [r.request_id for r in guard.in_doubt()] == ["INV-1"]
        with (
            Guard(store, lease=30.0, wait=0) as hookless,
            pytest.raises(OutcomeUnknownError) as doubt,
        ):
            hookless.execute("INV-1", ACTION, payload, send_invoice)
        assert str(child["pid"]) in doubt.value.owner
        assert doubt.value.claimed_at_ms == claimed.claimed_at_ms
        assert doubt.value.attempt == 1
        assert ledger.count() == 0

        # The hook says "did not happen": the invoice is sent once, then replayed.
        ran = guard.execute("INV-1", ACTION, payload, send_invoice)
        [req] = asked
        assert str(child["pid"]) in req.owner
        assert req.claimed_at_ms == claimed.claimed_at_ms
        assert req.attempt == 1
        assert req.downstream_key == claimed.downstream_key
        assert ran.replay is False
        assert ran.attempt == 2
        assert ran.execution_id != child["execution_id"]
        assert ledger.rows() == [("INV-1", claimed.downstream_key)]
        for _ in range(2):
            again = guard.execute("INV-1", ACTION, payload, send_invoice)
            assert again.replay is True
            assert again.execution_id == ran.execution_id
            assert again.result == {"invoice_id": "INV-1", "status": "sent"}
        assert ledger.count() == 1
        assert len(asked) == 1
    finally:
        guard.close()
        store.close()
    restarted_store = SQLiteStore(db, clock=clock)  # after a restart too
    with Guard(restarted_store, wait=0) as restarted:
        assert restarted.execute("INV-1", ACTION, payload, send_invoice).replay is True
    restarted_store.close()
    assert ledger.count() == 1
