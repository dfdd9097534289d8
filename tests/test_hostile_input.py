"""Hostile request ids and payloads: each call either works and replays identically, or
raises a typed InvalidInputError before anything is recorded; the SQLite file is never
corrupted.

Side effects write rows into an effect ledger (a separate SQLite file); tests count it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import reprlib
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeagent import (
    AsyncFinalityGate,
    AsyncGuard,
    ExecutionContext,
    FinalityGate,
    Guard,
    InvalidInputError,
    SQLiteStore,
)
from tests._workers import ROOT, child_env, read_lines
from tests.conftest import Ledger


def nest_list(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def nest_dict(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def echo(ledger: Ledger, tag: str) -> Callable[[ExecutionContext], Any]:
    """The side effect: one ledger row (under a plain tag), then the payload as result."""

    def fn(ctx: ExecutionContext) -> Any:
        ledger.append(tag)
        return {"echo": ctx.payload}

    return fn


def check_call(
    guard: Guard, ledger: Ledger, tag: str, request_id: Any, payload: Any, ns: str
) -> str:
    """Call twice: either the first runs once and the second replays it identically, or
    the first raises InvalidInputError and nothing at all was recorded in ``ns``."""
    before = ledger.count()
    try:
        first = guard.execute(request_id, "hostile", payload, echo(ledger, tag), namespace=ns)
    except InvalidInputError:
        assert ledger.count() == before
        assert guard.audit_trail(namespace=ns) == []
        records, _ = guard.store.records(namespace=ns)
        assert records == []
        return "rejected"
    assert first.replay is False
    second = guard.execute(request_id, "hostile", payload, echo(ledger, tag), namespace=ns)
    assert second.replay is True
    assert second.execution_id == first.execution_id
    assert second.result == first.result
    assert json.dumps(second.result, sort_keys=True) == json.dumps(first.result, sort_keys=True)
    assert second.request_id == request_id
    assert ledger.count() == before + 1
    return "worked"


def integrity_ok(db: Path) -> bool:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


# -- each kind of hostile input, by name -----------------------------------------------------

OK = "worked"
NO = "rejected"
EITHER = "either"

CASES: dict[str, tuple[Any, Any, str]] = {
    # request ids
    "id-255-ascii": ("r" * 255, {}, OK),
    "id-256-ascii": ("r" * 256, {}, NO),
    "id-255-astral": ("\U0001f600" * 255, {}, OK),
    "id-256-astral": ("\U0001f600" * 256, {}, NO),
    "id-with-nul": ("a\x00b", {}, EITHER),  # PostgreSQL text cannot hold NUL
    "id-empty": ("", {}, NO),
    "id-int": (42, {}, NO),
    "id-bytes": (b"k-1", {}, NO),
    "id-none": (None, {}, NO),
    "id-lone-surrogate": ("\ud800", {}, EITHER),
    "id-surrogate-inside": ("inv-\udfff-1", {}, EITHER),
    # payloads
    "payload-astral-and-nul": ("p", {"\U0001f600": "\x00\U0010ffff"}, OK),
    "payload-lone-surrogate": ("p", {"s": "\ud800"}, NO),
    "payload-surrogate-key": ("p", {"\udfff": 1}, NO),
    "payload-nan": ("p", {"x": float("nan")}, NO),
    "payload-inf": ("p", [float("inf")], NO),
    "payload-minus-inf": ("p", -float("inf"), NO),
    "payload-bytes": ("p", {"x": b"\x00\xff"}, NO),
    "payload-set": ("p", {"x": {1, 2}}, NO),
    "payload-object": ("p", {"x": object()}, NO),
    "payload-int-key": ("p", {1: "a"}, NO),
    "payload-none-key": ("p", {None: "a"}, NO),
    "payload-tuple-key": ("p", {(1, 2): "a"}, NO),
    "payload-2**53": ("p", {"x": 2**53}, NO),
    "payload-minus-2**53": ("p", {"x": -(2**53)}, NO),
    "payload-2**53-1": ("p", {"x": 2**53 - 1, "y": -(2**53 - 1)}, OK),
    "payload-tuple": ("p", {"x": (1, "a")}, OK),
    "payload-minus-zero": ("p", {"x": -0.0, "y": 1e308}, OK),
    "payload-scalar-none": ("p", None, OK),
    "payload-nested-50": ("p", nest_dict(50), OK),
    "payload-nested-400": ("p", nest_dict(400), EITHER),
    "payload-nested-list-700": ("p", nest_list(700), EITHER),
    "payload-nested-dict-900": ("p", nest_dict(900), EITHER),
    "payload-nested-2000": ("p", nest_list(2000), EITHER),
    "payload-nested-dict-2000": ("p", nest_dict(2000), EITHER),
    "payload-200k-words": ("p", {"text": "lorem ipsum " * 17_000}, OK),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_works_and_replays_or_is_rejected_typed(
    name: str, store: Any, ledger: Ledger
) -> None:
    """Each hostile id or payload works and replays, or is rejected typed before any record."""
    request_id, payload, expected = CASES[name]
    guard = Guard(store, wait=0)
    outcome = check_call(guard, ledger, name, request_id, payload, ns="hostile")
    if expected != EITHER:
        assert outcome == expected
    # The store still works for a normal call afterwards.
    normal = guard.execute("normal-1", "hostile", {"a": 1}, echo(ledger, "normal"))
    assert normal.result == {"echo": {"a": 1}}
    guard.close()


NAMES: dict[str, Any] = {
    "lone-surrogate": "\ud800",
    "nul": "a\x00b",
    "256-chars": "n" * 256,
    "empty": "",
    "int": 7,
    "255-astral": "\U0001f600" * 255,
}


@pytest.mark.parametrize("field", ["action", "namespace"])
@pytest.mark.parametrize("name", sorted(NAMES))
def test_hostile_action_or_namespace_works_and_replays_or_is_rejected_typed(
    field: str, name: str, store: Any, ledger: Ledger
) -> None:
    """A hostile action or namespace works and replays, or is rejected typed, recording nothing."""
    value = NAMES[name]
    guard = Guard(store, wait=0)
    action = value if field == "action" else "hostile"
    options = {"namespace": value} if field == "namespace" else {}
    try:
        first = guard.execute("n-1", action, {}, echo(ledger, name), **options)
    except InvalidInputError:
        assert ledger.count() == 0
        assert guard.audit_trail(all_namespaces=True) == []
        assert guard.store.records()[0] == []
    else:
        again = guard.execute("n-1", action, {}, echo(ledger, name), **options)
        assert again.replay is True
        assert again.execution_id == first.execution_id
        assert ledger.count() == 1
    guard.close()


HUGE = """
import sys
from safeagent import Guard
from tests._workers import append_line
db, ledger, body = sys.argv[1], sys.argv[2], bytes(range(256)).hex() * 2048  # 1 MiB of hex
guard = Guard(db, wait=0)
def upload(ctx):
    append_line(ledger, ctx.request_id)
    return len(ctx.payload["body"])
first = guard.execute("huge-1", "upload", {"body": body}, upload)
second = guard.execute("huge-1", "upload", {"body": body}, upload)
assert (second.replay, second.execution_id, second.result) == (True, first.execution_id, 2**20)
print("ok", flush=True)
"""


def test_one_mebibyte_string_payload_is_handled_in_bounded_time(tmp_path: Path) -> None:
    """A 1 MiB string payload is stored and replayed within seconds."""
    ledger = tmp_path / "ledger.txt"
    try:
        done = subprocess.run(
            [sys.executable, "-c", HUGE, str(tmp_path / "guard.db"), str(ledger)],
            capture_output=True,
            text=True,
            timeout=5,
            env=child_env(),
            cwd=ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("executing with a 1 MiB string payload did not finish within 5 s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert read_lines(ledger) == ["huge-1"]


# -- property: anything hypothesis can throw at it -------------------------------------------

surrogate = st.characters(categories=["Cs"])
nasty_char = st.one_of(st.characters(), surrogate, st.just("\x00"), st.just("\U0001f600"))
hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(nasty_char, max_size=30),
    st.sampled_from(
        [
            "\ud800",
            "a\x00b",
            "\U0001f600" * 255,
            "\U0001f600" * 256,
            "r" * 255,
            "r" * 256,
            "",
            " ",
            "é" * 255,
        ]
    ),
    st.integers(250, 260).map(lambda n: "é" * n),
)
big_text = st.one_of(
    st.integers(1_000, 4_000).map(lambda n: "x" * n),
    st.integers(10_000, 100_000).map(lambda n: "word " * (n // 5)),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text,
    big_text,
    st.binary(max_size=8),
    st.frozensets(st.integers(0, 3), max_size=3),
    st.builds(object),
)
keys = st.one_of(hostile_text, st.integers(), st.none(), st.booleans(), st.tuples(st.integers()))
nested = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)
# Deep nesting is drawn as (shape, depth) and built in the test, so that a falsifying
# example prints as ("deep-list", 700) rather than as 700 brackets.
payload_specs = st.one_of(
    st.tuples(st.just("value"), nested),
    st.tuples(
        st.sampled_from(["deep-list", "deep-dict"]),
        st.one_of(st.integers(1, 130), st.integers(130, 2500)),
    ),
)


def build(spec: tuple[str, Any]) -> Any:
    shape, value = spec
    if shape == "deep-list":
        return nest_list(value)
    if shape == "deep-dict":
        return nest_dict(value)
    return value


request_ids = st.one_of(hostile_text, st.integers(), st.binary(max_size=8), st.none())


def test_property_hostile_input_never_corrupts_the_sqlite_store(
    tmp_path: Path, ledger: Ledger
) -> None:
    """Any hostile input works and replays or is rejected typed, and SQLite stays intact."""
    db = tmp_path / "guard.db"
    store = SQLiteStore(db)
    guard = Guard(store, wait=0)
    counter = itertools.count()
    unexpected: list[str] = []

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(request_id=request_ids, payload_spec=payload_specs)
    def one_call(request_id: Any, payload_spec: tuple[str, Any]) -> None:
        n = next(counter)
        try:
            check_call(guard, ledger, f"ex{n}", request_id, build(payload_spec), ns=f"ns-{n}")
        except AssertionError:
            raise
        except Exception as exc:  # neither worked nor typed: collected, reported below
            # (not raised here: whether a deep payload overflows the stack depends on the
            # caller's stack depth, so Hypothesis could not replay it reliably)
            unexpected.append(
                f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:80]} "
                f"[request_id={reprlib.repr(request_id)}, payload={reprlib.repr(payload_spec)}]"
            )

    failure: BaseException | None = None
    try:
        one_call()
    except BaseException as exc:  # checked below, after the store's health
        failure = exc
    normal = guard.execute("normal-1", "hostile", {"a": 1}, echo(ledger, "normal"))
    assert normal.result == {"echo": {"a": 1}}
    guard.close()
    store.close()
    assert os.path.getsize(db) > 0
    assert integrity_ok(db)
    if failure is not None:
        raise failure
    assert not unexpected, "raised neither a receipt nor InvalidInputError:\n" + "\n".join(
        unexpected
    )


UNSTORABLE = ["E\x00x", "E\ud800x"]  # NUL (PostgreSQL refuses it), a lone surrogate (not UTF-8)


@pytest.mark.parametrize("bad", UNSTORABLE, ids=["nul", "surrogate"])
def test_unstorable_text_in_a_failure_is_escaped_not_lost(guard: Any, bad: str) -> None:
    """A NUL or lone surrogate in an exception's type name, a result encoder's complaint,
    a reconcile hook's failure or an operator's error text is stored escaped: the outcome
    is recorded (FAILED or SUCCEEDED), never left PENDING by a store that refuses the
    text, and the caller still gets the original exception."""
    from safeagent import (
        ActionPolicy,
        Reconciliation,
        ReplayedFailureError,
        ResultNotSerializableError,
        Status,
    )

    class Odd(Exception):
        pass

    Odd.__qualname__ = bad

    def raise_odd(_ctx: Any) -> None:
        raise Odd(bad)

    with pytest.raises(Odd):
        guard.execute("typename", "charge", {}, raise_odd)
    with pytest.raises(ReplayedFailureError) as replayed:
        guard.execute("typename", "charge", {}, raise_odd)
    assert "\\x00" in replayed.value.error_type or "\\ud800" in replayed.value.error_type

    class Unencodable:
        pass

    def complain(_value: Any) -> Any:
        raise TypeError(bad)

    g2 = type(guard)(guard.store, result_encoder=complain) if isinstance(guard, Guard) else None
    if g2 is not None:
        with pytest.raises(ResultNotSerializableError):
            g2.execute("encoder", "charge", {}, lambda _ctx: Unencodable())
        assert g2.get("encoder").status is Status.SUCCEEDED

    def timeout(_ctx: Any) -> None:
        raise TimeoutError("no answer")

    with pytest.raises(TimeoutError):
        guard.execute("operator", "charge", {}, timeout, outcome_unknown=(TimeoutError,))
    # An operator's text is refused before anything changes (as FinalityGate.resolve
    # does): the operator can type it again, unlike fn's exception or a hook's answer.
    for field in ("reason", "error_type", "error_message"):
        texts = {"reason": "checked", "error_type": "Refund", "error_message": "m", field: bad}
        with pytest.raises(InvalidInputError, match=f"{field} must be valid UTF-8"):
            guard.resolve("operator", "failed", by="ops", **texts)
        assert guard.get("operator").status is Status.IN_DOUBT
    with pytest.raises(InvalidInputError, match="error_type"):
        guard.resolve("operator", "failed", by="ops", reason="x", error_type=7)
    resolved = guard.resolve(
        "operator", "failed", by="ops", reason="checked", error_type="Refund", error_message=""
    )
    assert resolved.status is Status.FAILED
    assert resolved.error is not None
    assert (resolved.error.type, resolved.error.message) == ("Refund", "checked")

    if isinstance(guard, Guard):
        hooked = Guard(
            guard.store,
            wait=0,
            outcome_unknown=(TimeoutError,),
            actions={"refund": ActionPolicy(reconcile=lambda _r: Reconciliation.failed(bad, bad))},
        )
        with pytest.raises(TimeoutError):
            hooked.execute("hook", "refund", {}, timeout)
        with pytest.raises(ReplayedFailureError):  # the hook's answer, stored and replayed
            hooked.execute("hook", "refund", {}, timeout)
        assert hooked.get("hook").status is Status.FAILED


LISTINGS = (
    ("guard", "in_doubt"),
    ("guard", "reconcile"),
    ("guard", "audit_trail"),
    ("gate", "cases"),
)


@pytest.mark.parametrize(("owner", "method"), LISTINGS)
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_namespace_with_all_namespaces_is_refused(
    tmp_path: Path, owner: str, method: str, flavour: str
) -> None:
    """``namespace="a", all_namespaces=True`` named one tenant and asked for every one:
    once it silently read every tenant (an operator reconciling or resolving "a" acted on
    the others too). Refused before anything is read, as a non-bool flag is."""
    path = str(tmp_path / "r.db")
    with Guard(path) as seed:
        seed.execute("x", "act", {}, lambda _ctx: 1, namespace="b")
    guard: Any = AsyncGuard(path) if flavour == "async" else Guard(path)
    gate: Any = AsyncFinalityGate(guard) if flavour == "async" else FinalityGate(guard)
    target = getattr(guard if owner == "guard" else gate, method)

    def call(**kwargs: Any) -> Any:
        out = target(**kwargs)
        return asyncio.run(out) if flavour == "async" else out

    try:
        with pytest.raises(InvalidInputError, match="all_namespaces"):
            call(namespace="a", all_namespaces=True)
        with pytest.raises(InvalidInputError, match="all_namespaces must be True or False"):
            call(all_namespaces="yes")
        everyone = call(all_namespaces=True)
        if method == "audit_trail":
            assert {e.namespace for e in everyone} == {"b"}
        assert call(namespace="b", all_namespaces=False) is not None
    finally:
        closed = guard.aclose() if flavour == "async" else guard.close()
        if flavour == "async":
            asyncio.run(closed)
