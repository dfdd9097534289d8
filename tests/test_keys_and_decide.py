"""Unit tests of the pure core: canonical JSON, fingerprints, keys and decide()."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from safeagent._decide import Verdict, classify_exception, decide
from safeagent._keys import (
    canonical_json,
    check_request_id,
    downstream_key,
    fingerprint,
    key_from_value,
)
from safeagent._receipt import Record, Status
from safeagent.errors import InvalidPayloadError, InvalidRequestIdError, NotExecuted

SAFE = 2**53 - 1
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-SAFE, max_value=SAFE)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(action=st.text(min_size=1), payload=json_values)
def test_fingerprint_equals_rfc8785_of_the_whole_object(action: str, payload: object) -> None:
    """The byte-assembled fingerprint equals sha256(rfc8785.dumps({v, action, payload}))."""
    expected = hashlib.sha256(
        rfc8785.dumps({"v": 1, "action": action, "payload": payload})
    ).hexdigest()
    assert fingerprint(action, canonical_json(payload)) == expected


@given(payload=st.dictionaries(st.text(), json_values, max_size=6))
def test_key_order_never_changes_the_fingerprint(payload: dict[str, object]) -> None:
    """Reordering an object's keys gives the same canonical bytes (RFC 8785)."""
    reordered = dict(reversed(list(payload.items())))
    assert canonical_json(payload) == canonical_json(reordered)


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        2**53,
        -(2**53),
        {1: "x"},
        object(),
        {1, 2},
        b"bytes",
        {"a": [float("nan")]},
    ],
)
def test_non_json_payloads_are_rejected(bad: object) -> None:
    """NaN, infinities, unsafe integers, non-str keys and non-JSON types are typed errors."""
    with pytest.raises(InvalidPayloadError):
        canonical_json(bad)


def test_safe_integer_bounds_are_accepted() -> None:
    """+-(2**53 - 1) are the largest integers a payload may hold."""
    assert canonical_json([SAFE, -SAFE]) == f"[{SAFE},{-SAFE}]".encode()


@pytest.mark.parametrize("bad", [None, 0, b"id", "", "x" * 256, ["id"]])
def test_bad_request_ids_are_rejected(bad: object) -> None:
    """A request id is a non-empty str of at most 255 characters."""
    with pytest.raises(InvalidRequestIdError):
        check_request_id(bad)


@given(namespace=st.text(), action=st.text(), request_id=st.text())
def test_downstream_key_equals_rfc8785_of_the_triple(
    namespace: str, action: str, request_id: str
) -> None:
    """The hand-assembled key equals sha256(rfc8785.dumps([ns, action, rid])), and a lone
    surrogate is the same typed error canonical_json raises."""
    try:
        canonical = rfc8785.dumps([namespace, action, request_id])
    except (rfc8785.CanonicalizationError, UnicodeEncodeError):
        with pytest.raises(InvalidPayloadError):
            downstream_key(namespace, action, request_id)
        return
    assert downstream_key(namespace, action, request_id) == (
        "sa1-" + hashlib.sha256(canonical).hexdigest()
    )


def test_downstream_key_is_sha256_of_namespace_action_request_id() -> None:
    """sa1- + hex sha256 of canonical [namespace, action, request_id]; differs per tenant."""
    expected = "sa1-" + hashlib.sha256(b'["tenant-A","charge","k-1"]').hexdigest()
    assert downstream_key("tenant-A", "charge", "k-1") == expected
    assert downstream_key("tenant-B", "charge", "k-1") != expected


def test_key_values_are_encoded_as_canonical_json() -> None:
    """0, False and "0" are three distinct keys; None and "" are missing."""
    keys = {key_from_value(0), key_from_value(False), key_from_value("0")}
    assert keys == {"0", "false", '"0"'}
    assert key_from_value(None) is None
    assert key_from_value("") is None
    assert key_from_value({"b": 1, "a": 2}) == json.dumps({"a": 2, "b": 1}, separators=(",", ":"))


def test_a_key_value_too_long_once_encoded_says_why() -> None:
    """253 characters encode to 255 (the quotes): the limit. 254 characters are refused
    with a message that names both lengths and the quotes, not a length never passed."""
    assert len(key_from_value("k" * 253) or "") == 255
    with pytest.raises(
        InvalidRequestIdError, match="254 characters encodes as a request id of 256"
    ):
        key_from_value("k" * 254)


def _record(status: Status, *, action: str = "a", fp: str = "f", lease_end: int = 100) -> Record:
    return Record(
        namespace="default",
        request_id="r",
        action=action,
        fingerprint=fp,
        status=status,
        payload_json="{}",
        result_json=None,
        error=None,
        execution_id="e",
        attempt=1,
        fencing_token=1,
        lease_owner="o",
        lease_expires_at_ms=lease_end,
        downstream_key="k",
        created_at_ms=0,
        claimed_at_ms=0,
        updated_at_ms=0,
        completed_at_ms=None,
    )


@pytest.mark.parametrize(
    ("status", "now", "action", "fp", "verdict"),
    [
        (Status.PENDING, 50, "a", "f", Verdict.WAIT),
        (Status.PENDING, 100, "a", "f", Verdict.IN_DOUBT),
        (Status.PENDING, 50, "b", "f", Verdict.CONFLICT_ACTION),
        (Status.PENDING, 50, "a", "g", Verdict.CONFLICT_FINGERPRINT),
        (Status.SUCCEEDED, 500, "a", "f", Verdict.REPLAY),
        (Status.SUCCEEDED, 500, "b", "f", Verdict.CONFLICT_ACTION),
        (Status.SUCCEEDED, 500, "a", "g", Verdict.CONFLICT_FINGERPRINT),
        (Status.FAILED, 500, "a", "f", Verdict.REPLAY),
        (Status.FAILED, 500, "a", "g", Verdict.CONFLICT_FINGERPRINT),
        (Status.IN_DOUBT, 0, "a", "f", Verdict.IN_DOUBT),
        (Status.IN_DOUBT, 0, "b", "f", Verdict.CONFLICT_ACTION),
        (Status.RELEASED, 0, "b", "g", Verdict.CLAIM),
    ],
)
def test_decide_follows_the_behaviour_table(
    status: Status, now: int, action: str, fp: str, verdict: Verdict
) -> None:
    """decide() maps (record found, same/other request) to the DESIGN section 2 table."""
    assert decide(_record(status), action, fp, now).verdict is verdict


def test_decide_claims_when_nothing_is_there_and_reports_lease_time_left() -> None:
    """No record: claim. A live lease: wait, with retry-after = the lease time left."""
    assert decide(None, "a", "f", 0).verdict is Verdict.CLAIM
    assert decide(_record(Status.PENDING, lease_end=100), "a", "f", 30).retry_after_ms == 70


class Refused(Exception):
    pass


class Timeout(Exception):
    pass


class Both(Refused, Timeout):
    pass


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (NotExecuted("no"), Status.RELEASED),
        (Refused(), Status.RELEASED),
        (Timeout(), Status.IN_DOUBT),
        (Both(), Status.IN_DOUBT),
        (ValueError(), Status.FAILED),
        (KeyboardInterrupt(), Status.IN_DOUBT),
        (SystemExit(1), Status.IN_DOUBT),
        (asyncio.CancelledError(), Status.IN_DOUBT),
        (concurrent.futures.CancelledError(), Status.IN_DOUBT),
    ],
)
def test_exception_policy(exc: BaseException, status: Status) -> None:
    """Declared types release or leave in doubt (doubt wins); BaseExceptions leave in doubt,
    and so does the ``Exception`` a future's ``result()`` raises for cancelled work."""
    assert classify_exception(exc, (Refused,), (Timeout,)) is status


def test_derived_request_ids_ignore_key_order_and_need_a_scope() -> None:
    """sa1: + sha256 of canonical [scope, action, arguments]; key order does not matter."""
    from safeagent import InvalidInputError, bind_arguments, derive_request_id

    def charge(customer: str, amount_cents: int, currency: str = "EUR") -> None: ...

    bound = bind_arguments(charge, ("CUST-1", 500), {})
    assert bound == {"customer": "CUST-1", "amount_cents": 500, "currency": "EUR"}
    rid = derive_request_id("run-1", "charge", bound)
    expected = hashlib.sha256(
        b'["run-1","charge",{"amount_cents":500,"currency":"EUR","customer":"CUST-1"}]'
    ).hexdigest()
    assert rid == "sa1:" + expected
    assert rid == derive_request_id("run-1", "charge", dict(reversed(list(bound.items()))))
    assert rid != derive_request_id("run-2", "charge", bound)
    assert rid != derive_request_id("run-1", "refund", bound)
    assert bind_arguments(charge, ("CUST-1", 500), {"currency": "USD"}, exclude={"currency"}) == {
        "customer": "CUST-1",
        "amount_cents": 500,
    }
    with pytest.raises(InvalidInputError):
        derive_request_id("", "charge", bound)
    with pytest.raises(InvalidInputError):
        bind_arguments(charge, (), {"nope": 1})


@given(value=json_values)
def test_fast_canonical_json_is_byte_identical_to_rfc8785(value: object) -> None:
    """The hot-path canonicalizer yields exactly the rfc8785 package's bytes."""
    assert canonical_json(value) == rfc8785.dumps(value)


@given(
    value=st.recursive(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
        | st.floats(allow_nan=False, allow_infinity=False, width=64)
        | st.integers(min_value=-SAFE, max_value=SAFE),
        lambda inner: (
            st.dictionaries(
                st.text(alphabet=st.characters(blacklist_categories=("Cs",))), inner, max_size=5
            )
            | st.lists(inner, max_size=5)
        ),
        max_leaves=30,
    )
)
def test_fast_canonical_json_matches_on_astral_keys_and_odd_floats(value: object) -> None:
    """Keys sort by UTF-16 code units and floats format as ECMAScript does, as rfc8785."""
    assert canonical_json(value) == rfc8785.dumps(value)


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-SAFE, max_value=SAFE) | _TEXT,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(alphabet=st.characters(max_codepoint=127)), inner, max_size=5)
    ),
    max_leaves=40,
)


@given(value=plain_values)
def test_the_c_encoder_path_is_byte_identical_to_rfc8785(value: object) -> None:
    """Payloads without floats, subclasses or non-ASCII keys (most payloads) go through
    Python's C encoder, and its bytes are rfc8785's."""
    from safeagent._keys import _NOT_PLAIN, _encode_plain, _plain

    assert _encode_plain is not None  # CPython: the fast path is the one tested here
    assert _plain(value, 0) is not _NOT_PLAIN
    assert canonical_json(value) == rfc8785.dumps(value)


@given(
    value=st.recursive(
        st.integers(min_value=-(2**60), max_value=2**60)
        | st.floats(allow_nan=False, allow_infinity=False)
        | _TEXT,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
        max_leaves=20,
    )
)
def test_what_the_c_encoder_would_get_wrong_goes_the_checked_way(value: object) -> None:
    """Floats, non-ASCII keys and unsafe integers anywhere in a payload leave the C
    encoder's path: the bytes are rfc8785's, and an unsafe integer is the typed error."""
    try:
        expected = rfc8785.dumps(value)
    except rfc8785.CanonicalizationError:
        with pytest.raises(InvalidPayloadError):
            canonical_json(value)
        return
    assert canonical_json(value) == expected


def test_subclasses_and_loops_leave_the_c_encoder_path() -> None:
    """An int or str subclass (an IntEnum, a str Enum) is encoded by its value, as rfc8785
    does; a container holding itself is the typed depth error, never a crash."""
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    class Tag(str, enum.Enum):
        A = "a"

    from safeagent._keys import _NOT_PLAIN, _plain

    value = {"level": Level.HIGH, "tag": Tag.A, "n": [1, (2, "x")]}
    assert _plain(value, 0) is _NOT_PLAIN
    assert canonical_json(value) == rfc8785.dumps(value) == b'{"level":3,"n":[1,[2,"x"]],"tag":"a"}'
    loop: list[object] = [1]
    loop.append(loop)
    with pytest.raises(InvalidPayloadError, match="nested deeper"):
        canonical_json({"a": loop})
    with pytest.raises(InvalidPayloadError, match="UTF-8"):
        canonical_json({"a": ["ok", "\ud800"]})


def test_a_payload_changed_by_another_thread_gives_the_bytes_of_one_of_its_states() -> None:
    """The C encoder reads a checked private copy: a thread flipping a value between an
    int and a float meanwhile never gets a float into its bytes in Python's spelling
    (1e+16), which would be the fingerprint of no state of the payload."""
    import threading

    payload: dict[str, Any] = {"a": 1, "b": list(range(3000))}  # checked after "a"
    states = {rfc8785.dumps({**payload, "a": 1}), rfc8785.dumps({**payload, "a": 1e16})}
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            payload["a"] = 1e16
            time.sleep(0)
            payload["a"] = 1
            time.sleep(0)

    flipper = threading.Thread(target=flip)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a loaded server may
    flipper.start()
    try:
        seen = {canonical_json(payload) for _ in range(1500)}
    finally:
        stop.set()
        flipper.join()
        sys.setswitchinterval(interval)
    assert seen <= states, seen - states


def test_a_payload_freed_or_changed_while_encoded_cannot_crash_or_mislead(
    tmp_path: Path,
) -> None:
    """A garbage-collector callback (or a __del__) that frees or replaces part of the
    payload while it is encoded: the interpreter does not crash, and the bytes are
    those of the payload before or after the change. In a child process, since the
    failure this guards against is a segmentation fault."""
    script = tmp_path / "gc_change.py"
    script.write_text(
        textwrap.dedent(
            """
            import gc, sys
            import rfc8785
            from safeagent._keys import canonical_json

            before = [{"k%d" % i: "v" * 50 for i in range(50)}, 1]
            after = [None, 1e16]
            payload = [dict(before[0]), 1]
            armed = [True]
            junk = []

            def change(phase, info):
                if phase != "start" or not armed[0]:
                    return
                if sys._getframe(1).f_code.co_name != "canonical_json":
                    return
                armed[0] = False
                payload[0] = None  # frees the dict the encoder may be reading
                payload[1] = 1e16
                junk.extend({"x%d" % j: j} for j in range(200))  # reuse its memory

            gc.callbacks.append(change)
            gc.set_threshold(1, 1, 1)
            try:
                out = canonical_json(payload)
            finally:
                gc.set_threshold(700, 10, 10)
                gc.callbacks.remove(change)
            assert out in (rfc8785.dumps(before), rfc8785.dumps(after)), out
            print("ok")
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.strip() == "ok", done.stdout


def test_deep_nesting_is_a_typed_error() -> None:
    """Payloads nested deeper than MAX_DEPTH are rejected with InvalidPayloadError."""
    from safeagent._keys import MAX_DEPTH

    ok: object = 1
    for _ in range(MAX_DEPTH):
        ok = [ok]
    canonical_json(ok)
    with pytest.raises(InvalidPayloadError):
        canonical_json([ok])
    with pytest.raises(InvalidPayloadError):
        canonical_json("\ud800")


def test_results_from_sdks_are_stored_through_model_dump() -> None:
    """A pydantic model result is stored as its JSON dump (json_default)."""
    pydantic = pytest.importorskip("pydantic")

    from safeagent import Guard, MemoryStore

    class Charge(pydantic.BaseModel):
        id: str
        amount: int

    receipt = Guard(MemoryStore()).execute(
        "r", "charge", {}, lambda _ctx: Charge(id="ch_1", amount=5)
    )
    assert receipt.result == {"id": "ch_1", "amount": 5}


class _Backwards(str):
    """A str subclass that orders itself backwards."""

    def __lt__(self, other: object) -> bool:
        return str.__gt__(self, other)  # type: ignore[operator]


class _Shadowing(dict):  # type: ignore[type-arg]
    """A dict subclass whose [], keys() and items() lie about its entries."""

    def __getitem__(self, key: object) -> object:
        return "shadow"

    def items(self) -> Any:
        return [("_secret", 2), *dict.items(self)]

    def keys(self) -> Any:
        return ["_secret", *dict.keys(self)]


def test_subclassed_keys_and_mappings_canonicalize_as_rfc8785_does() -> None:
    """A str subclass's own ordering and a dict subclass's own [], keys() and items() do
    not change the bytes: keys sort by UTF-16 code units, and a dict subclass is read as
    rfc8785 reads it (dict(value): its own entries)."""
    keys = {_Backwards("b"): 2, _Backwards("a"): 1}
    assert canonical_json(keys) == rfc8785.dumps({"a": 1, "b": 2}) == b'{"a":1,"b":2}'
    shadowed = _Shadowing(a=1)
    assert canonical_json(shadowed) == rfc8785.dumps(shadowed) == b'{"a":1}'
    assert canonical_json({"x": [shadowed]}) == rfc8785.dumps({"x": [shadowed]})


def test_in_doubt_messages_give_the_claim_time_in_utc() -> None:
    """An operator reads when the attempt in doubt was claimed, not raw epoch ms."""
    from safeagent._flow import _utc, in_doubt_error

    assert _utc(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    record = Record(
        namespace="ns", request_id="r", action="charge", fingerprint="f",
        status=Status.PENDING, payload_json="{}", result_json=None, error=None,
        execution_id="e", attempt=1, fencing_token=1, lease_owner="host:1:main",
        lease_expires_at_ms=1_700_000_060_123, downstream_key="k",
        created_at_ms=1_700_000_000_123, claimed_at_ms=1_700_000_000_123,
        updated_at_ms=1_700_000_000_123, completed_at_ms=None,
    )  # fmt: skip
    message = str(in_doubt_error("r", "ns", record, 1_700_000_100_000))
    assert "claimed at 2023-11-14T22:13:20.123Z" in message


def test_records_and_store_answers_hash_by_value() -> None:
    """Record and the store's answers stopped being frozen (for speed) but still hash by
    value, as they did: a custom store or a caller may keep them in sets or as keys."""
    from safeagent import Guard, MemoryStore
    from safeagent.stores import ClaimResult

    store = MemoryStore()
    Guard(store).execute("r", "a", {}, lambda _ctx: 1)
    record, _ = store.get("default", "r")
    assert record is not None
    copy = dataclasses.replace(record)
    assert copy is not record
    assert hash(copy) == hash(record)
    assert {record, copy} == {record}
    assert hash(ClaimResult(True, record, 5)) == hash(ClaimResult(True, copy, 5))


def test_execution_ids_are_random_version_4_uuids_in_hex(monkeypatch: pytest.MonkeyPatch) -> None:
    """new_execution_id() has the format of uuid.uuid4().hex: 32 lowercase hex digits of a
    version-4, RFC 4122 variant UUID, the other 122 bits random; ids do not repeat. From
    the same 16 random bytes it gives what uuid4 does."""
    import os
    import uuid

    from safeagent import _keys
    from safeagent._keys import new_execution_id

    ids = [new_execution_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for x in ids[:2000]:
        assert len(x) == 32
        assert set(x) <= set("0123456789abcdef")
        parsed = uuid.UUID(hex=x)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == x
    for n in range(32):  # every digit not fixed by the version and variant varies fully
        seen = {x[n] for x in ids}
        assert seen == ({"4"} if n == 12 else set("89ab") if n == 16 else set("0123456789abcdef"))

    for raw in (bytes(16), b"\xff" * 16, os.urandom(16), bytes(range(16))):
        monkeypatch.setattr(_keys.os, "urandom", lambda n, raw=raw: raw[:n])
        assert new_execution_id() == uuid.UUID(bytes=raw, version=4).hex


def test_a_claim_gets_a_fresh_version_4_execution_id() -> None:
    """Each attempt's execution id, as stored, is a new version-4 UUID in hex."""
    import uuid

    from safeagent import Guard, MemoryStore

    store = MemoryStore()
    guard = Guard(store)
    seen = set()
    for n in range(3):
        guard.execute(f"r{n}", "a", {}, lambda _ctx: 1)
        record, _ = store.get("default", f"r{n}")
        assert record is not None
        assert record.execution_id is not None
        assert uuid.UUID(hex=record.execution_id).version == 4
        seen.add(record.execution_id)
    assert len(seen) == 3
