"""DESIGN.md section 2: every row and column of the behaviour table, over both stores.

Side effects write rows into an effect ledger (a separate SQLite file); tests count the
ledger, never the guard's own records. Time is a fake clock; the only real waits are the
short bounds of the waiting tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from typing import Any

import pytest
import rfc8785

from safeagent import (
    ActionMismatchError,
    EventKind,
    ExecutionContext,
    FingerprintMismatchError,
    Guard,
    InProgressError,
    InvalidInputError,
    InvalidPayloadError,
    InvalidRequestIdError,
    InvalidTransitionError,
    MemoryStore,
    NotExecuted,
    OutcomeUnknownError,
    Receipt,
    ReplayedFailureError,
    Status,
    _flow,
    default_redactor,
)
from tests.conftest import FakeClock, Ledger


class Boom(Exception):
    """A terminal failure of the side effect."""


class Refused(Exception):
    """Declared "not executed"."""


class AckTimeout(Exception):
    """Declared "outcome unknown"."""


class Both(Refused, AckTimeout):
    """Matches both lists."""


def booking(ledger: Ledger, result: Any = None, tag: str = "") -> Any:
    """A side effect: one ledger row, then ``result`` (default: a dict naming the request)."""

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id, tag or json.dumps(ctx.payload))
        return {"booked": ctx.request_id, "attempt": ctx.attempt} if result is None else result

    return fn


def raising(ledger: Ledger, exc: BaseException, *, book: bool = True) -> Any:
    """A side effect that (optionally) books a ledger row, then raises ``exc``."""

    def fn(ctx: ExecutionContext) -> Any:
        if book:
            ledger.append(ctx.request_id, "then-raised")
        raise exc

    return fn


def expected_downstream_key(namespace: str, action: str, request_id: str) -> str:
    return "sa1-" + hashlib.sha256(rfc8785.dumps([namespace, action, request_id])).hexdigest()


def kinds(guard: Guard, request_id: str | None = None, **kw: Any) -> list[EventKind]:
    return [e.kind for e in guard.audit_trail(request_id, **kw)]


def released_record(guard: Guard, ledger: Ledger, rid: str = "r-1") -> Receipt:
    """Make a RELEASED record for ``rid`` (fn raises NotExecuted before booking)."""
    with pytest.raises(NotExecuted):
        guard.execute(rid, "charge", {"amount": 1}, raising(ledger, NotExecuted("no"), book=False))
    receipt = guard.get(rid)
    assert receipt is not None
    assert receipt.status is Status.RELEASED
    return receipt


# -- none / RELEASED ----------------------------------------------------------------------


def test_a_replay_never_depends_on_the_redact_hook(store: Any, ledger: Ledger) -> None:
    """The redact hook fails on a payload it handled when the call ran (it was changed, or
    its service is down): the replay answers the receipt all the same, on every store (on
    PostgreSQL the guard claims before it reads, and that claim's event would call the
    hook: the call reads first instead). A new call fails before anything is written."""
    failing = {"now": False}

    def redact(value: Any) -> Any:
        if failing["now"]:
            raise RuntimeError("redactor down")
        return default_redactor(value)

    guard = Guard(store, lease=30.0, wait=0, redact=redact)
    first = guard.execute("r", "charge", {"amount": 1}, booking(ledger))
    failing["now"] = True
    again = guard.execute("r", "charge", {"amount": 1}, booking(ledger))
    assert (again.replay, again.result, again.execution_id) == (
        True,
        first.result,
        first.execution_id,
    )
    with pytest.raises(RuntimeError, match="redactor down"):
        guard.execute("new", "charge", {"amount": 2}, booking(ledger))
    assert ledger.count("r") == 1
    assert ledger.count("new") == 0
    assert guard.get("new") is None
    guard.close()


def test_a_store_with_part_of_the_claim_first_interface_is_read_first() -> None:
    """A store that says claim_first and has claim_new but no look (ClaimFirstStore asks
    for all three) is used as any store: read first, never claim_new."""

    class Half(MemoryStore):
        claim_first = True

        def claim_new(self, request: Any) -> Any:
            raise AssertionError("claim_new of a store without look")

    guard = Guard(Half(), wait=0)
    assert not guard.execute("r", "a", {}, lambda _ctx: 1).replay
    assert guard.execute("r", "a", {}, lambda _ctx: 1).replay


@pytest.mark.parametrize("size", [_flow.CLAIM_FIRST_MAX_PAYLOAD - 100, 50_000])
def test_payloads_either_side_of_the_claim_first_limit_run_once_and_replay(
    store: Any, ledger: Ledger, size: int
) -> None:
    """A payload under and over CLAIM_FIRST_MAX_PAYLOAD characters (on PostgreSQL the
    guard claims first under it, reads first over it): one run, then replays."""
    guard = Guard(store, lease=30.0, wait=0)
    payload = {"memo": "x" * size}
    first = guard.execute("big", "charge", payload, booking(ledger, result="ok"))
    for _ in range(2):
        again = guard.execute("big", "charge", payload, booking(ledger, result="ok"))
        assert (again.replay, again.execution_id) == (True, first.execution_id)
    with pytest.raises(FingerprintMismatchError):
        guard.execute("big", "charge", {"memo": "y" * size}, booking(ledger))
    assert ledger.count("big") == 1
    guard.close()


def test_absent_same_runs_once_then_replays(guard: Guard, ledger: Ledger) -> None:
    """none + same request: claims, runs fn once, stores the receipt; the retry replays it."""
    first = guard.execute("r-1", "charge", {"amount": 5}, booking(ledger))
    assert first.replay is False
    assert first.status is Status.SUCCEEDED
    assert first.attempt == 1
    assert first.fencing_token == 1
    assert first.ok
    second = guard.execute("r-1", "charge", {"amount": 5}, booking(ledger))
    assert second.replay is True
    assert second.result == first.result == {"booked": "r-1", "attempt": 1}
    assert second.execution_id == first.execution_id
    assert ledger.count() == 1


def test_released_same_runs_again(guard: Guard, ledger: Ledger) -> None:
    """RELEASED + same request: the next call claims and runs fn (once)."""
    released_record(guard, ledger)
    receipt = guard.execute("r-1", "charge", {"amount": 1}, booking(ledger))
    assert receipt.replay is False
    assert receipt.attempt == 2
    assert guard.execute("r-1", "charge", {"amount": 1}, booking(ledger)).replay is True
    assert ledger.count() == 1


def test_released_other_payload_and_action_claims(guard: Guard, ledger: Ledger) -> None:
    """RELEASED + other action/payload: claims (a released record has no outcome to protect)."""
    released_record(guard, ledger)
    seen: list[ExecutionContext] = []

    def fn(ctx: ExecutionContext) -> Any:
        seen.append(ctx)
        ledger.append(ctx.request_id, "refund")
        return "refunded"

    receipt = guard.execute("r-1", "refund", {"amount": 99}, fn)
    assert receipt.replay is False
    assert receipt.action == "refund"
    assert receipt.result == "refunded"
    assert ledger.count() == 1
    # The record now belongs to the new request: same -> replay, the old one -> conflict.
    assert guard.execute("r-1", "refund", {"amount": 99}, fn).replay is True
    with pytest.raises(ActionMismatchError):
        guard.execute("r-1", "charge", {"amount": 1}, booking(ledger))
    # The downstream key follows the action that now owns the record (DESIGN section 2).
    expected = expected_downstream_key("default", "refund", "r-1")
    assert seen[0].downstream_key == expected
    assert receipt.downstream_key == expected
    assert ledger.count() == 1


# -- PENDING, lease live ------------------------------------------------------------------


def test_pending_same_wait_zero_answers_in_progress_with_lease_left(
    guard: Guard, ledger: Ledger, clock: FakeClock
) -> None:
    """PENDING live + same, wait=0: InProgressError at once, retry_after = lease time left."""
    inner: list[BaseException] = []

    def fn(ctx: ExecutionContext) -> Any:
        clock.advance(10)  # 10 s into a 30 s lease
        ledger.append(ctx.request_id)
        try:
            guard.execute("r-1", "charge", {"amount": 1}, booking(ledger), wait=0)
        except InProgressError as exc:
            inner.append(exc)
        return "done"

    started = time.monotonic()
    assert guard.execute("r-1", "charge", {"amount": 1}, fn).result == "done"
    assert time.monotonic() - started < 2.0
    assert len(inner) == 1
    err = inner[0]
    assert isinstance(err, InProgressError)
    assert err.retry_after == pytest.approx(20.0)
    assert err.receipt.status is Status.PENDING
    assert ledger.count() == 1


def test_pending_same_waits_up_to_the_bound(guard: Guard, ledger: Ledger) -> None:
    """PENDING live + same, wait bound: waits about the bound, then InProgressError."""
    holding, release = threading.Event(), threading.Event()

    def slow(ctx: ExecutionContext) -> Any:
        holding.set()
        release.wait(10)
        ledger.append(ctx.request_id)
        return {"n": 1}

    holder = threading.Thread(
        target=guard.execute, args=("r-1", "charge", {"amount": 1}, slow), daemon=True
    )
    holder.start()
    try:
        assert holding.wait(5)
        started = time.monotonic()
        with pytest.raises(InProgressError) as info:
            guard.execute("r-1", "charge", {"amount": 1}, booking(ledger), wait=0.3)
        waited = time.monotonic() - started
        assert 0.25 <= waited < 2.0
        assert info.value.retry_after == pytest.approx(30.0)  # fake clock did not move
        # The message names the holder and says a dead owner's claim turns in doubt.
        assert info.value.receipt is not None
        assert f"claimed by {info.value.receipt.lease_owner} " in str(info.value)
        assert "reads as in doubt, never re-run" in str(info.value)
    finally:
        release.set()
        holder.join(10)
    assert ledger.count() == 1


def _wakeup_lag(guard: Guard, ledger: Ledger, rid: str, release_after: float) -> float:
    """Seconds between a holder thread finishing and the waiter getting the receipt."""
    holding, release = threading.Event(), threading.Event()
    holder_done: list[float] = []
    holder_receipt: list[Receipt] = []

    def slow(ctx: ExecutionContext) -> Any:
        holding.set()
        release.wait(10)
        ledger.append(ctx.request_id)
        return {"n": ctx.request_id}

    def hold() -> None:
        holder_receipt.append(guard.execute(rid, "charge", {"amount": 1}, slow))
        holder_done.append(time.monotonic())

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(5)
    threading.Timer(release_after, release.set).start()
    receipt = guard.execute(rid, "charge", {"amount": 1}, booking(ledger), wait=10)
    waiter_done = time.monotonic()
    holder.join(10)
    assert receipt.replay is True
    assert receipt.result == {"n": rid}
    assert receipt.execution_id == holder_receipt[0].execution_id
    return waiter_done - holder_done[0]


def test_pending_same_in_process_wakeup_returns_receipt_when_holder_finishes(
    guard: Guard, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PENDING live + same: a waiter wakes as soon as the in-process holder finishes, not at
    its next poll. The polls are set 8 s apart here, so polling alone would answer about
    8 s after the release; the wake-up answers within milliseconds (the bound leaves room
    for a loaded machine)."""
    monkeypatch.setattr(_flow, "POLL_START", 8.0)
    monkeypatch.setattr(_flow, "POLL_MAX", 8.0)
    delays = (0.05, 0.2, 0.35)
    lags = [_wakeup_lag(guard, ledger, f"r-{i}", d) for i, d in enumerate(delays)]
    assert max(lags) < 2.0, lags
    assert ledger.count() == len(delays)


def test_pending_other_payload_conflicts_at_once(guard: Guard, ledger: Ledger) -> None:
    """PENDING live + other payload or action: conflict at once (no wait), nothing runs."""
    inner: list[BaseException] = []

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id)
        for action, payload in (("charge", {"amount": 2}), ("refund", {"amount": 1})):
            started = time.monotonic()
            try:
                guard.execute("r-1", action, payload, booking(ledger), wait=5)
            except (FingerprintMismatchError, ActionMismatchError) as exc:
                inner.append(exc)
            assert time.monotonic() - started < 1.0
        return "ok"

    guard.execute("r-1", "charge", {"amount": 1}, fn)
    assert [type(e) for e in inner] == [FingerprintMismatchError, ActionMismatchError]
    assert ledger.count() == 1


# -- SUCCEEDED ----------------------------------------------------------------------------


def test_a_result_nested_near_the_recursion_limit_replays_from_a_deeper_stack(
    guard: Guard, ledger: Ledger
) -> None:
    """A result nested 900 levels deep is stored (the encoder ran from a shallow stack)
    and replays whole from a caller 200 frames deeper, where decoding it would pass the
    recursion limit: it is decoded on a fresh stack, not a RecursionError."""
    value: Any = "bottom"
    for _ in range(900):
        value = [value]
    first = guard.execute("r-deep", "charge", {}, booking(ledger, value))
    assert first.result == value

    def deeper(frames: int) -> Any:
        if frames == 0:
            receipt = guard.execute("r-deep", "charge", {}, booking(ledger, None))
            return receipt, receipt.to_json()
        return deeper(frames - 1)

    again, text = deeper(200)
    assert again.replay is True
    assert again.result == value
    assert text == first.to_json().replace('"replay":false', '"replay":true')
    assert ledger.count() == 1


def test_succeeded_dict_result_round_trips(guard: Guard, ledger: Ledger) -> None:
    """SUCCEEDED + same: the stored receipt, marked replay, with an equal dict result."""
    value = {"charge_id": "ch_1", "amount": 5, "items": [1, 2], "meta": {"x": None}}
    first = guard.execute("r-1", "charge", {"amount": 5}, booking(ledger, value))
    replay = guard.execute("r-1", "charge", {"amount": 5}, booking(ledger, value))
    assert first.result == replay.result == value
    assert replay.replay is True
    assert replay.status is Status.SUCCEEDED
    assert ledger.count() == 1


def test_tuple_result_is_a_list_on_the_first_call_too(guard: Guard, ledger: Ledger) -> None:
    """The first call returns the stored form (a tuple comes back as a list), as replays do."""
    first = guard.execute("r-1", "charge", {}, booking(ledger, ("a", 1)))
    replay = guard.execute("r-1", "charge", {}, booking(ledger, ("a", 1)))
    assert first.result == ["a", 1]
    assert type(first.result) is list
    assert type(replay.result) is list
    assert replay.result == first.result
    assert ledger.count() == 1


def test_succeeded_other_action_is_action_mismatch(guard: Guard, ledger: Ledger) -> None:
    """SUCCEEDED + other action: ActionMismatchError carrying the stored receipt; nothing runs."""
    first = guard.execute("r-1", "charge", {"amount": 5}, booking(ledger))
    with pytest.raises(ActionMismatchError) as info:
        guard.execute("r-1", "refund", {"amount": 5}, booking(ledger))
    assert info.value.receipt.execution_id == first.execution_id
    assert info.value.request_id == "r-1"
    assert ledger.count() == 1


def test_succeeded_other_payload_is_fingerprint_mismatch(guard: Guard, ledger: Ledger) -> None:
    """SUCCEEDED + other payload: FingerprintMismatchError; nothing runs, receipt unchanged."""
    first = guard.execute("r-1", "charge", {"amount": 5}, booking(ledger))
    with pytest.raises(FingerprintMismatchError) as info:
        guard.execute("r-1", "charge", {"amount": 6}, booking(ledger))
    assert info.value.receipt.fingerprint == first.fingerprint
    assert ledger.count() == 1
    after = guard.get("r-1")
    assert after is not None
    assert after.result == first.result
    assert after.execution_id == first.execution_id


# -- FAILED -------------------------------------------------------------------------------


def test_failed_first_call_reraises_original_then_replays_typed(
    guard: Guard, ledger: Ledger
) -> None:
    """FAILED + same: the first call re-raises the original; replays raise ReplayedFailureError."""
    original = Boom("card declined")
    with pytest.raises(Boom) as info:
        guard.execute("r-1", "charge", {"amount": 5}, raising(ledger, original))
    assert info.value is original
    for _ in range(2):
        with pytest.raises(ReplayedFailureError) as replay:
            guard.execute("r-1", "charge", {"amount": 5}, raising(ledger, Boom("again")))
        assert replay.value.error_type.endswith("Boom")
        assert replay.value.error_message == "card declined"
        assert replay.value.receipt.status is Status.FAILED
        assert replay.value.receipt.replay is True
    assert ledger.count() == 1


def test_failed_builtin_error_type_is_its_plain_name(guard: Guard, ledger: Ledger) -> None:
    """A replayed builtin failure names its type plainly (ValueError)."""
    with pytest.raises(ValueError, match="bad"):
        guard.execute("r-1", "charge", {}, raising(ledger, ValueError("bad")))
    with pytest.raises(ReplayedFailureError) as replay:
        guard.execute("r-1", "charge", {}, booking(ledger))
    assert replay.value.error_type == "ValueError"
    assert replay.value.error_message == "bad"
    assert ledger.count() == 1


def test_failed_other_request_conflicts(guard: Guard, ledger: Ledger) -> None:
    """FAILED + other payload or action: conflict, nothing runs."""
    with pytest.raises(Boom):
        guard.execute("r-1", "charge", {"amount": 5}, raising(ledger, Boom("x")))
    with pytest.raises(FingerprintMismatchError):
        guard.execute("r-1", "charge", {"amount": 6}, booking(ledger))
    with pytest.raises(ActionMismatchError):
        guard.execute("r-1", "refund", {"amount": 5}, booking(ledger))
    assert ledger.count() == 1


# -- IN_DOUBT -----------------------------------------------------------------------------


def test_in_doubt_same_raises_outcome_unknown(
    guard: Guard, ledger: Ledger, clock: FakeClock
) -> None:
    """IN_DOUBT + same (no reconcile hook): OutcomeUnknownError with owner, claim time, attempt."""
    claimed_at = clock()
    timeout = AckTimeout("no ack")
    with pytest.raises(AckTimeout) as info:
        guard.execute("r-1", "charge", {}, raising(ledger, timeout), outcome_unknown=(AckTimeout,))
    assert info.value is timeout
    clock.advance(5)
    for _ in range(2):
        with pytest.raises(OutcomeUnknownError) as doubt:
            guard.execute("r-1", "charge", {}, booking(ledger))
        assert doubt.value.owner == "owner-1"
        assert doubt.value.claimed_at_ms == claimed_at
        assert doubt.value.attempt == 1
        assert doubt.value.receipt.status is Status.IN_DOUBT
    assert ledger.count() == 1
    assert [r.request_id for r in guard.in_doubt()] == ["r-1"]


def test_in_doubt_other_request_conflicts(guard: Guard, ledger: Ledger) -> None:
    """IN_DOUBT + other payload or action: conflict, nothing runs."""
    with pytest.raises(AckTimeout):
        guard.execute(
            "r-1", "charge", {"a": 1}, raising(ledger, AckTimeout()), outcome_unknown=[AckTimeout]
        )
    with pytest.raises(FingerprintMismatchError):
        guard.execute("r-1", "charge", {"a": 2}, booking(ledger))
    with pytest.raises(ActionMismatchError):
        guard.execute("r-1", "refund", {"a": 1}, booking(ledger))
    assert ledger.count() == 1


def test_expired_lease_reads_as_in_doubt(guard: Guard, ledger: Ledger, clock: FakeClock) -> None:
    """A PENDING record whose lease expired on the store's clock reads as IN_DOUBT."""
    inner: list[BaseException] = []

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(ctx.request_id)
        clock.advance(31)  # past the 30 s lease, nobody has taken over yet
        current = guard.get("r-1")
        assert current is not None
        assert current.status is Status.IN_DOUBT
        try:
            guard.execute("r-1", "charge", {}, booking(ledger))
        except OutcomeUnknownError as exc:
            inner.append(exc)
        return "late"

    guard.execute("r-1", "charge", {}, fn)
    assert len(inner) == 1
    assert ledger.count() == 1


# -- exception policy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc", [NotExecuted("refused"), Refused("refused")], ids=["NotExecuted", "declared"]
)
def test_not_executed_releases_and_next_call_runs(
    guard: Guard, ledger: Ledger, exc: Exception
) -> None:
    """NotExecuted / a not_executed type: claim released; next call runs (attempt 2, token 2)."""
    with pytest.raises(type(exc)):
        guard.execute(
            "r-1", "charge", {}, raising(ledger, exc, book=False), not_executed=(Refused,)
        )
    released = guard.get("r-1")
    assert released is not None
    assert released.status is Status.RELEASED
    assert ledger.count() == 0
    contexts: list[ExecutionContext] = []

    def fn(ctx: ExecutionContext) -> Any:
        contexts.append(ctx)
        ledger.append(ctx.request_id)
        return "sent"

    second = guard.execute("r-1", "charge", {}, fn)
    assert second.replay is False
    assert (second.attempt, second.fencing_token) == (2, 2)
    assert (contexts[0].attempt, contexts[0].fencing_token) == (2, 2)
    assert second.execution_id != released.execution_id
    assert contexts[0].execution_id == second.execution_id
    assert guard.execute("r-1", "charge", {}, fn).replay is True
    assert ledger.count() == 1


def test_bare_not_executed_class_releases(guard: Guard, ledger: Ledger) -> None:
    """`raise NotExecuted` (the bare class, no message) releases like any NotExecuted."""

    def fn(ctx: ExecutionContext) -> Any:
        raise NotExecuted

    with pytest.raises(NotExecuted):
        guard.execute("r-1", "charge", {}, fn)
    released = guard.get("r-1")
    assert released is not None
    assert released.status is Status.RELEASED
    assert guard.execute("r-1", "charge", {}, booking(ledger)).attempt == 2
    assert ledger.count() == 1


def test_guard_level_not_executed_types_release(store: Any, ledger: Ledger) -> None:
    """not_executed set on the Guard applies to every call."""
    g = Guard(store, wait=0, not_executed=(ConnectionRefusedError,))
    with pytest.raises(ConnectionRefusedError):
        g.execute("r-1", "send", {}, raising(ledger, ConnectionRefusedError(), book=False))
    assert g.execute("r-1", "send", {}, booking(ledger)).attempt == 2
    assert ledger.count() == 1


def test_outcome_unknown_type_makes_in_doubt(guard: Guard, ledger: Ledger) -> None:
    """An outcome_unknown type leaves the record IN_DOUBT (and the exception propagates)."""
    with pytest.raises(TimeoutError):
        guard.execute(
            "r-1", "charge", {}, raising(ledger, TimeoutError()), outcome_unknown=(TimeoutError,)
        )
    receipt = guard.get("r-1")
    assert receipt is not None
    assert receipt.status is Status.IN_DOUBT
    assert receipt.error is not None
    assert receipt.error.type == "TimeoutError"


def test_type_in_both_lists_is_in_doubt(guard: Guard, ledger: Ledger) -> None:
    """A type matching both not_executed and outcome_unknown: IN_DOUBT wins."""
    with pytest.raises(Both):
        guard.execute(
            "r-1",
            "charge",
            {},
            raising(ledger, Both()),
            not_executed=(Refused,),
            outcome_unknown=(AckTimeout,),
        )
    receipt = guard.get("r-1")
    assert receipt is not None
    assert receipt.status is Status.IN_DOUBT
    with pytest.raises(OutcomeUnknownError):
        guard.execute("r-1", "charge", {}, booking(ledger))
    assert ledger.count() == 1


# -- the context handed to fn ---------------------------------------------------------------


def test_context_fields_and_downstream_key(guard: Guard, ledger: Ledger) -> None:
    """fn's context: request id, namespace, attempt, token, downstream key = sa1-sha256(...)."""
    seen: list[ExecutionContext] = []

    def fn(ctx: ExecutionContext) -> Any:
        seen.append(ctx)
        if len(seen) == 1:
            raise NotExecuted("first attempt never left")
        ledger.append(ctx.downstream_key)
        return "ok"

    with pytest.raises(NotExecuted):
        guard.execute("r-1", "charge", {"amount": 5}, fn)
    receipt = guard.execute("r-1", "charge", {"amount": 5}, fn)
    expected = expected_downstream_key("default", "charge", "r-1")
    first, second = seen
    assert (first.request_id, first.namespace, first.action) == ("r-1", "default", "charge")
    assert first.payload == {"amount": 5}
    assert (first.attempt, first.fencing_token) == (1, 1)
    assert (second.attempt, second.fencing_token) == (2, 2)
    assert first.downstream_key == second.downstream_key == expected
    assert receipt.downstream_key == expected
    assert ledger.rows() == [(expected, None)]


def test_downstream_key_differs_per_namespace(guard: Guard, ledger: Ledger) -> None:
    """The same request id in two namespaces gets two downstream keys."""
    keys = {}
    for ns in ("tenant-A", "tenant-B"):
        receipt = guard.execute("k-1", "create_ticket", {}, booking(ledger), namespace=ns)
        assert receipt.namespace == ns
        assert receipt.downstream_key == expected_downstream_key(ns, "create_ticket", "k-1")
        keys[ns] = receipt.downstream_key
    assert keys["tenant-A"] != keys["tenant-B"]
    assert ledger.count() == 2


# -- fingerprints ---------------------------------------------------------------------------


def test_exclude_leaves_a_field_out_of_the_fingerprint(guard: Guard, ledger: Ledger) -> None:
    """exclude= leaves a volatile field out of the fingerprint: a retry replays."""
    first = guard.execute(
        "r-1", "charge", {"amount": 5, "sent_at": "10:00"}, booking(ledger), exclude=("sent_at",)
    )
    replay = guard.execute(
        "r-1", "charge", {"amount": 5, "sent_at": "10:05"}, booking(ledger), exclude=("sent_at",)
    )
    assert replay.replay is True
    assert replay.fingerprint == first.fingerprint
    with pytest.raises(FingerprintMismatchError):
        guard.execute(
            "r-1",
            "charge",
            {"amount": 6, "sent_at": "10:05"},
            booking(ledger),
            exclude=("sent_at",),
        )
    assert ledger.count() == 1


def test_payload_key_order_does_not_matter(guard: Guard, ledger: Ledger) -> None:
    """RFC 8785: the same payload with keys in another order (nested too) replays."""
    guard.execute("r-1", "charge", {"a": 1, "b": {"x": 1, "y": 2}}, booking(ledger))
    replay = guard.execute("r-1", "charge", {"b": {"y": 2, "x": 1}, "a": 1}, booking(ledger))
    assert replay.replay is True
    assert ledger.count() == 1


def test_one_and_one_point_zero_are_the_same_number(guard: Guard, ledger: Ledger) -> None:
    """RFC 8785: 1 and 1.0 are the same number, so the retry replays."""
    guard.execute("r-1", "charge", {"amount": 1}, booking(ledger))
    assert guard.execute("r-1", "charge", {"amount": 1.0}, booking(ledger)).replay is True
    assert ledger.count() == 1


# -- bad inputs -----------------------------------------------------------------------------


def assert_nothing_recorded(guard: Guard, ledger: Ledger) -> None:
    assert guard.audit_trail() == []
    assert guard.store.records()[0] == []
    assert guard.get("r-1") is None
    assert ledger.count() == 0


@pytest.mark.parametrize(
    "bad_id", [None, 0, "", "x" * 256, b"r-1"], ids=["None", "0", "empty", "256", "bytes"]
)
def test_bad_request_ids_are_rejected_before_anything(
    guard: Guard, ledger: Ledger, bad_id: Any
) -> None:
    """Bad request ids raise InvalidRequestIdError; fn not called; nothing recorded."""
    with pytest.raises(InvalidRequestIdError):
        guard.execute(bad_id, "charge", {}, booking(ledger))
    assert_nothing_recorded(guard, ledger)


@pytest.mark.parametrize(
    "bad_payload",
    [
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": 2**53},
        {"x": -(2**53)},
        {1: "x"},
        {"x": object()},
        {"x": {1, 2}},
    ],
    ids=["nan", "inf", "2**53", "-2**53", "int-key", "object", "set"],
)
def test_bad_payloads_are_rejected_before_anything(
    guard: Guard, ledger: Ledger, bad_payload: Any
) -> None:
    """Non-JSON payloads raise InvalidPayloadError; fn not called; nothing recorded."""
    with pytest.raises(InvalidPayloadError):
        guard.execute("r-1", "charge", bad_payload, booking(ledger))
    assert_nothing_recorded(guard, ledger)


@pytest.mark.parametrize(
    ("action", "namespace"),
    [("", None), (None, None), ("a" * 256, None), ("charge", "")],
    ids=["empty-action", "None-action", "long-action", "empty-namespace"],
)
def test_bad_action_or_namespace_rejected_before_anything(
    guard: Guard, ledger: Ledger, action: Any, namespace: Any
) -> None:
    """A bad action or namespace raises InvalidInputError; fn not called; nothing recorded."""
    with pytest.raises(InvalidInputError):
        guard.execute("r-1", action, {}, booking(ledger), namespace=namespace)
    assert_nothing_recorded(guard, ledger)


def test_edge_values_that_are_valid_work(guard: Guard, ledger: Ledger) -> None:
    """A 255-character request id and integers of +-(2**53 - 1) are accepted."""
    rid = "x" * 255
    payload = {"max": 2**53 - 1, "min": -(2**53 - 1)}
    first = guard.execute(rid, "charge", payload, booking(ledger))
    assert first.request_id == rid
    assert guard.execute(rid, "charge", payload, booking(ledger)).replay is True
    assert ledger.count() == 1


# -- audit trail ----------------------------------------------------------------------------


def test_audit_success_conflict_and_replay(guard: Guard, ledger: Ledger) -> None:
    """Audit: claimed+succeeded, then conflict, then replayed (after close/flush)."""
    guard.execute("r-1", "charge", {"amount": 5}, booking(ledger))
    assert kinds(guard, "r-1") == [EventKind.CLAIMED, EventKind.SUCCEEDED]
    with pytest.raises(FingerprintMismatchError):
        guard.execute("r-1", "charge", {"amount": 6}, booking(ledger))
    assert kinds(guard, "r-1")[-1] is EventKind.CONFLICT
    guard.execute("r-1", "charge", {"amount": 5}, booking(ledger))
    guard.close()  # writes buffered replay events
    assert kinds(guard, "r-1") == [
        EventKind.CLAIMED,
        EventKind.SUCCEEDED,
        EventKind.CONFLICT,
        EventKind.REPLAYED,
    ]
    conflict = guard.audit_trail("r-1")[2]
    assert conflict.action == "charge"
    assert conflict.namespace == "default"


def test_audit_released_failed_in_doubt(guard: Guard, ledger: Ledger) -> None:
    """Audit: released, failed and in_doubt outcomes each write their event after claimed."""
    with pytest.raises(NotExecuted):
        guard.execute("a", "x", {}, raising(ledger, NotExecuted("no"), book=False))
    with pytest.raises(Boom):
        guard.execute("b", "x", {}, raising(ledger, Boom()))
    with pytest.raises(AckTimeout):
        guard.execute("c", "x", {}, raising(ledger, AckTimeout()), outcome_unknown=(AckTimeout,))
    assert kinds(guard, "a") == [EventKind.CLAIMED, EventKind.RELEASED]
    assert kinds(guard, "b") == [EventKind.CLAIMED, EventKind.FAILED]
    assert kinds(guard, "c") == [EventKind.CLAIMED, EventKind.IN_DOUBT]


def test_audit_resolution_names_actor_and_reason(guard: Guard, ledger: Ledger) -> None:
    """Audit: an operator resolution writes a resolved event with actor and reason."""
    with pytest.raises(AckTimeout):
        guard.execute("r-1", "x", {}, raising(ledger, AckTimeout()), outcome_unknown=(AckTimeout,))
    guard.resolve("r-1", "succeeded", by="alice", reason="bank says paid", result={"ok": 1})
    event = guard.audit_trail("r-1")[-1]
    assert event.kind is EventKind.RESOLVED
    assert event.actor == "alice"
    assert event.detail["reason"] == "bank says paid"
    assert event.detail["status"] == "SUCCEEDED"


# -- operator resolution --------------------------------------------------------------------


def test_resolve_refuses_absent_record(guard: Guard) -> None:
    """resolve on an absent record: InvalidTransitionError, nothing recorded."""
    with pytest.raises(InvalidTransitionError):
        guard.resolve("nope", "released", by="alice", reason="r")
    assert guard.get("nope") is None
    assert guard.audit_trail() == []


def test_resolve_refuses_live_pending_record(guard: Guard, ledger: Ledger) -> None:
    """resolve on a PENDING record with a live lease: InvalidTransitionError."""
    inner: list[BaseException] = []

    def fn(ctx: ExecutionContext) -> Any:
        try:
            guard.resolve("r-1", "released", by="alice", reason="r")
        except InvalidTransitionError as exc:
            inner.append(exc)
        ledger.append(ctx.request_id)
        return "done"

    receipt = guard.execute("r-1", "charge", {}, fn)
    assert len(inner) == 1
    assert receipt.status is Status.SUCCEEDED
    assert EventKind.RESOLVED not in kinds(guard, "r-1")


def test_resolve_refuses_terminal_records(guard: Guard, ledger: Ledger) -> None:
    """resolve on SUCCEEDED or FAILED records: InvalidTransitionError, record unchanged."""
    first = guard.execute("ok", "charge", {}, booking(ledger))
    with pytest.raises(Boom):
        guard.execute("bad", "charge", {}, raising(ledger, Boom()))
    for rid in ("ok", "bad"):
        for outcome in ("succeeded", "failed", "released"):
            with pytest.raises(InvalidTransitionError):
                guard.resolve(rid, outcome, by="alice", reason="r")  # type: ignore[arg-type]
    after = guard.get("ok")
    assert after is not None
    assert after.status is Status.SUCCEEDED
    assert after.result == first.result
    assert guard.execute("ok", "charge", {}, booking(ledger)).replay is True


def _in_doubt(guard: Guard, ledger: Ledger) -> None:
    with pytest.raises(AckTimeout):
        guard.execute(
            "r-1", "charge", {"n": 1}, raising(ledger, AckTimeout()), outcome_unknown=(AckTimeout,)
        )


def test_resolve_succeeded_then_calls_replay_the_result(guard: Guard, ledger: Ledger) -> None:
    """resolve "succeeded" with a result: later calls replay that result, fn never reruns."""
    _in_doubt(guard, ledger)
    resolved = guard.resolve(
        "r-1", "succeeded", by="alice", reason="confirmed", result={"charge_id": "ch_9"}
    )
    assert resolved.status is Status.SUCCEEDED
    replay = guard.execute("r-1", "charge", {"n": 1}, booking(ledger))
    assert replay.replay is True
    assert replay.result == {"charge_id": "ch_9"}
    assert ledger.count() == 1


def test_resolve_failed_then_calls_replay_the_failure(guard: Guard, ledger: Ledger) -> None:
    """resolve "failed": later calls raise ReplayedFailureError."""
    _in_doubt(guard, ledger)
    guard.resolve("r-1", "failed", by="alice", reason="bank says declined")
    with pytest.raises(ReplayedFailureError) as info:
        guard.execute("r-1", "charge", {"n": 1}, booking(ledger))
    assert info.value.error_message == "bank says declined"
    assert ledger.count() == 1


def test_resolve_released_lets_the_next_call_run(guard: Guard, ledger: Ledger) -> None:
    """resolve "released": the next call runs fn (attempt 2, a newer fencing token)."""
    _in_doubt(guard, ledger)
    before = guard.get("r-1")
    assert before is not None
    guard.resolve("r-1", "released", by="alice", reason="never reached the bank")
    receipt = guard.execute("r-1", "charge", {"n": 1}, booking(ledger))
    assert receipt.replay is False
    assert receipt.attempt == 2
    assert receipt.fencing_token > before.fencing_token
    assert ledger.count() == 2  # the in-doubt attempt's row, and this run's


# -- the receipt ----------------------------------------------------------------------------


def test_receipt_is_immutable_and_serializes_to_json(guard: Guard, ledger: Ledger) -> None:
    """A receipt is frozen; to_dict() is JSON values and to_json() is its JSON text."""
    receipt = guard.execute("r-1", "charge", {"amount": 5}, booking(ledger))
    with pytest.raises(dataclasses.FrozenInstanceError):
        receipt.result = "changed"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        receipt.status = Status.FAILED  # type: ignore[misc]
    as_dict = receipt.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert json.loads(receipt.to_json()) == as_dict
    assert as_dict["status"] == "SUCCEEDED"
    assert as_dict["result"] == {"booked": "r-1", "attempt": 1}
    assert as_dict["error"] is None


def test_a_receipt_holding_a_lone_surrogate_still_serializes(guard: Guard) -> None:
    """A result may hold a lone surrogate (a file name read with surrogateescape): its
    receipt's JSON text escapes it, so any UTF-8 transport (MCP, HTTP) can carry it."""
    receipt = guard.execute("r-1", "read", {}, lambda _ctx: {"file": "caf\udce9.txt"})
    text = receipt.to_json()
    text.encode("utf-8")
    assert json.loads(text)["result"] == {"file": "caf\udce9.txt"}
    plain = guard.execute("r-2", "read", {}, lambda _ctx: {"file": "café.txt"}).to_json()
    assert "café" in plain  # ordinary non-ASCII text is left as is


def test_the_documented_defaults_a_60_second_lease_and_a_10_second_wait(
    clock: FakeClock,
) -> None:
    """README: "lease default 60 s", "wait=10" by default: a claim's lease runs 60,000 ms
    of the store's clock from the claim, and a caller waits up to 10 s for a live claim."""
    guard = Guard(MemoryStore(clock=clock))
    assert (guard.lease, guard.wait) == (60.0, 10.0)
    seen: list[Any] = []

    def fn(ctx: Any) -> int:
        seen.append(guard.get(ctx.request_id))
        return 1

    guard.execute("d-1", "act", {}, fn)
    (during,) = seen
    assert during.status is Status.PENDING
    assert during.lease_expires_at_ms - during.claimed_at_ms == 60_000


def test_a_decorated_functions_payload_is_its_bound_arguments_with_defaults_minus_key_and_exclude(
    clock: FakeClock, ledger: Ledger
) -> None:
    """README: the payload is the arguments bound through the signature, defaults applied,
    minus ``key_arg`` and ``exclude``: a call that spells a default out is the same request
    (a replay), one that changes an excluded argument too, and one that changes a real
    argument is refused as another payload under the same key."""
    guard = Guard(MemoryStore(clock=clock))

    @guard.guarded(action="create_ticket", key_arg="request_id", exclude=("trace",))
    def create(
        title: str, priority: str = "normal", trace: str | None = None, request_id: str = ""
    ) -> str:
        ledger.append(request_id, title)
        return "T-1"

    assert create("Printer on fire", request_id="k-1", trace="a") == "T-1"
    stored = guard.get(create.request_id_for("k-1"))
    assert stored is not None
    assert stored.payload == {"title": "Printer on fire", "priority": "normal"}
    assert create("Printer on fire", "normal", request_id="k-1", trace="b") == "T-1"
    assert ledger.count() == 1
    with pytest.raises(FingerprintMismatchError):
        create("Printer on fire", "high", request_id="k-1")
    assert ledger.count() == 1
