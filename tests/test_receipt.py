"""Hot-path constructions that must stay equal to their plain definitions: receipts and
audit events built without the frozen __init__, and the outcome digest built without the
JSON encoder."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeagent._audit import AuditEvent, EventKind, new_event
from safeagent._receipt import ErrorInfo, Receipt, Record, Status
from safeagent.stores._base import outcome_digest

ints = st.integers(min_value=0, max_value=2**62)
maybe_int = st.none() | ints
text = st.text(max_size=20)
results = st.none() | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
).map(json.dumps)


@st.composite
def records(draw: st.DrawFn) -> Record:
    return Record(
        namespace=draw(text),
        request_id=draw(text),
        action=draw(text),
        fingerprint=draw(text),
        status=draw(st.sampled_from(Status)),
        payload_json=draw(st.sampled_from(["", '{"a":1}', "[]"])),
        result_json=draw(results),
        error=draw(st.none() | st.builds(ErrorInfo, text, text)),
        execution_id=draw(text),
        attempt=draw(ints),
        fencing_token=draw(ints),
        lease_owner=draw(st.none() | text),
        lease_expires_at_ms=draw(maybe_int),
        downstream_key=draw(text),
        created_at_ms=draw(ints),
        claimed_at_ms=draw(ints),
        updated_at_ms=draw(ints),
        completed_at_ms=draw(maybe_int),
        purged_at_ms=draw(maybe_int),
        attempt_owner=draw(st.none() | text),
        attempt_ended_at_ms=draw(maybe_int),
        ended_attempt=draw(maybe_int),
    )


def expected(record: Record, replay: bool, now_ms: int | None) -> Receipt:
    """The receipt as the public constructor builds it (the reference)."""
    status = record.status if now_ms is None else record.effective_status(now_ms)
    owner, ended = record.attempt_facts() if status is Status.IN_DOUBT else (None, None)
    return Receipt(
        namespace=record.namespace,
        request_id=record.request_id,
        action=record.action,
        status=status,
        result=None if record.result_json is None else json.loads(record.result_json),
        error=record.error,
        execution_id=record.execution_id,
        fingerprint=record.fingerprint,
        attempt=record.attempt,
        fencing_token=record.fencing_token,
        downstream_key=record.downstream_key,
        created_at_ms=record.created_at_ms,
        claimed_at_ms=record.claimed_at_ms,
        completed_at_ms=record.completed_at_ms,
        replay=replay,
        lease_owner=record.lease_owner,
        lease_expires_at_ms=record.lease_expires_at_ms,
        payload_json=record.payload_json or None,
        attempt_owner=owner,
        attempt_ended_at_ms=ended,
        purged_at_ms=record.purged_at_ms,
    )


@given(record=records(), replay=st.booleans(), now_ms=maybe_int)
def test_from_record_equals_the_constructed_receipt(
    record: Record, replay: bool, now_ms: int | None
) -> None:
    receipt = Receipt.from_record(record, replay=replay, now_ms=now_ms)
    reference = expected(record, replay, now_ms)
    assert receipt == reference
    assert repr(receipt) == repr(reference)
    assert dataclasses.astuple(receipt) == dataclasses.astuple(reference)
    assert receipt.to_dict() == reference.to_dict()


def test_a_receipt_from_a_record_is_still_frozen() -> None:
    record = Record(
        "default", "r-1", "charge", "f" * 64, Status.SUCCEEDED, '{"a":1}', '{"ok":true}',
        None, "e" * 32, 1, 1, "host:1:main", 10, "sa1-x", 1, 1, 2, 2,
    )  # fmt: skip
    receipt = Receipt.from_record(record, replay=True)
    assert receipt.result == {"ok": True}
    assert receipt.replay is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        receipt.status = Status.FAILED  # type: ignore[misc]
    assert dataclasses.replace(receipt, replay=False).replay is False
    # Each call parses the stored result afresh: callers never share a mutable result.
    assert Receipt.from_record(record, replay=True).result is not receipt.result


@given(
    values=st.tuples(
        st.none() | st.text(),
        st.none() | st.text(),
        st.none() | st.text(),
        st.none() | st.text(),
        st.none() | st.text(),
    )
)
def test_outcome_digest_is_sha256_of_the_json_array(values: tuple[str | None, ...]) -> None:
    """The digest events carry since 0.2: SHA-256 of the ASCII JSON array of the five
    stored values. Verify recomputes it for trails written by earlier releases, so the text
    hashed must never change."""
    text = json.dumps(list(values), separators=(",", ":"), ensure_ascii=True)
    assert outcome_digest(*values) == hashlib.sha256(text.encode("ascii")).hexdigest()


@given(
    kind=st.sampled_from(EventKind),
    at_ms=ints,
    names=st.tuples(text, text, st.none() | text, st.none() | text, st.none() | text),
    token=maybe_int,
    detail=st.dictionaries(st.text(max_size=4), st.none() | st.integers() | text, max_size=3),
    event_id=maybe_int,
)
def test_new_event_equals_the_constructed_event(
    kind: EventKind,
    at_ms: int,
    names: tuple[str, str, str | None, str | None, str | None],
    token: int | None,
    detail: dict[str, object],
    event_id: int | None,
) -> None:
    namespace, subject, action, actor, execution_id = names
    event = new_event(
        kind, at_ms, namespace, subject, action, actor, execution_id, token, detail, event_id
    )
    reference = AuditEvent(
        kind=kind,
        at_ms=at_ms,
        namespace=namespace,
        subject=subject,
        action=action,
        actor=actor,
        execution_id=execution_id,
        fencing_token=token,
        detail=detail,
        id=event_id,
    )
    assert event == reference
    assert repr(event) == repr(reference)
    assert dataclasses.astuple(event) == dataclasses.astuple(reference)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.at_ms = 0  # type: ignore[misc]
    assert new_event(kind, at_ms, namespace, subject, None, None, None, None, {}).id is None
