"""OpenTelemetry: a span per execution and counters, through the API only."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from safeagent import (
    AsyncGuard,
    ConfigurationError,
    FingerprintMismatchError,
    Guard,
    MemoryStore,
    NotExecuted,
    OutcomeUnknownError,
    ResultNotSerializableError,
    SQLiteStore,
    StoreError,
    _telemetry,
)

_spans = InMemorySpanExporter()
_reader = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def _sdk() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_spans))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    # The guard re-checks for a newly installed SDK at most once a second; look now.
    _telemetry._state["checked_at"] = -1.0


def _counts(namespace: str = "otel") -> dict[str, int]:
    data = _reader.get_metrics_data()
    out: dict[str, int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = sum(
                    int(p.value)
                    for p in metric.data.data_points
                    if p.attributes.get("safeagent.namespace") == namespace
                )
    return out


def test_each_execution_is_a_span_with_its_outcome_and_no_payload() -> None:
    """execute, replay and conflict each make one span with action, outcome and replay."""
    _spans.clear()
    guard = Guard(MemoryStore(), namespace="otel")
    secret: dict[str, Any] = {"card": "4242424242424242"}
    guard.execute("r-1", "charge", secret, lambda _ctx: {"ok": 1})
    guard.execute("r-1", "charge", secret, lambda _ctx: {"ok": 1})
    with pytest.raises(FingerprintMismatchError):
        guard.execute("r-1", "charge", {"card": "other"}, lambda _ctx: 1)
    spans = [s for s in _spans.get_finished_spans() if s.name == "safeagent.execute"]
    outcomes = [
        (s.attributes["safeagent.outcome"], s.attributes.get("safeagent.replay")) for s in spans
    ]
    assert outcomes == [("executed", False), ("replayed", True), ("conflict", None)]
    assert all(s.attributes["safeagent.action"] == "charge" for s in spans)
    assert all("4242" not in str(dict(s.attributes)) for s in spans)
    counts = _counts()
    assert (counts["safeagent.executions"], counts["safeagent.replays"]) == (1, 1)
    assert counts["safeagent.conflicts"] == 1


def _outcomes(namespace: str) -> list[str]:
    return [
        str(s.attributes["safeagent.outcome"])
        for s in _spans.get_finished_spans()
        if s.name == "safeagent.execute" and s.attributes["safeagent.namespace"] == namespace
    ]


def _timeout(_ctx: object) -> None:
    raise TimeoutError("the charge API did not answer")


def test_a_call_that_leaves_a_record_in_doubt_counts_as_in_doubt(tmp_path: Any) -> None:
    """fn raising an outcome-unknown exception ran (an execution) and left the record in
    doubt: the span says in_doubt and both counters move; the retry meets the in-doubt
    record and counts again. fn raising another error is a failed execution."""
    guard = Guard(SQLiteStore(tmp_path / "t.db"), namespace="otel-doubt")
    with pytest.raises(TimeoutError):
        guard.execute("r-1", "charge", {}, _timeout, outcome_unknown=(TimeoutError,))
    with pytest.raises(OutcomeUnknownError):
        guard.execute("r-1", "charge", {}, _timeout, outcome_unknown=(TimeoutError,))
    with pytest.raises(ValueError, match="invalid literal"):
        guard.execute("r-2", "charge", {}, lambda _ctx: int("x"))
    assert _outcomes("otel-doubt") == ["in_doubt", "in_doubt", "failed"]
    counts = _counts("otel-doubt")
    assert counts["safeagent.in_doubt"] == 2
    assert counts["safeagent.executions"] == 2  # fn ran twice: r-1 once, r-2 once


def test_a_store_failure_before_the_claim_is_an_error_not_an_execution(tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    guard = Guard(store, namespace="otel-error")
    store.close()
    ran: list[int] = []
    with pytest.raises(StoreError):
        guard.execute("r-1", "charge", {}, lambda _ctx: ran.append(1))
    assert ran == []
    assert _outcomes("otel-error") == ["error"]
    assert _counts("otel-error").get("safeagent.executions", 0) == 0


def test_async_guard_counts_in_doubt_the_same_way(tmp_path: Any) -> None:
    guard = AsyncGuard(SQLiteStore(tmp_path / "t.db"), namespace="otel-async")

    async def timeout(_ctx: object) -> None:
        raise TimeoutError("no answer")

    async def twice() -> None:
        with pytest.raises(TimeoutError):
            await guard.execute("r-1", "charge", {}, timeout, outcome_unknown=(TimeoutError,))
        with pytest.raises(OutcomeUnknownError):
            await guard.execute("r-1", "charge", {}, timeout, outcome_unknown=(TimeoutError,))

    asyncio.run(twice())
    assert _outcomes("otel-async") == ["in_doubt", "in_doubt"]
    counts = _counts("otel-async")
    assert (counts["safeagent.in_doubt"], counts["safeagent.executions"]) == (2, 1)


def test_each_way_a_call_ends_has_its_outcome(tmp_path: Any) -> None:
    """released (fn said it did not happen), error (fn could not even be called), executed
    (a result that could not be stored: fn ran), replayed (that result's replay), and
    in_doubt (fn ran, then the store failed to record its outcome)."""
    store = SQLiteStore(tmp_path / "t.db")
    guard = Guard(store, namespace="otel-ways")

    def not_executed(_ctx: object) -> None:
        raise NotExecuted("the gateway refused the connection")

    with pytest.raises(NotExecuted):
        guard.execute("released", "charge", {}, not_executed)
    with pytest.raises(TypeError):
        guard.execute("unstarted", "charge", {}, lambda: 1)  # type: ignore[arg-type,misc]
    for _ in range(2):
        with pytest.raises(ResultNotSerializableError):
            guard.execute("unstorable", "charge", {}, lambda _ctx: object())

    def close_then_succeed(_ctx: object) -> int:
        store.close()  # the completion cannot be written: the record stays PENDING
        return 1

    with pytest.raises(StoreError):
        guard.execute("lost", "charge", {}, close_then_succeed)
    assert _outcomes("otel-ways") == ["released", "error", "executed", "replayed", "in_doubt"]
    counts = _counts("otel-ways")
    assert counts["safeagent.executions"] == 3  # released, unstorable, lost: fn ran
    assert counts["safeagent.replays"] == 1
    assert counts["safeagent.in_doubt"] == 1


def test_what_fn_raises_is_its_own_failure_whatever_its_type(tmp_path: Any) -> None:
    """fn ran and raised a SafeAgent error of its own (a nested guard's conflict, a store
    error): a failed execution, not a conflict or an in-doubt record of this call. An
    ``async def`` fn under the sync Guard never ran: an error, not an execution."""
    guard = Guard(SQLiteStore(tmp_path / "t.db"), namespace="otel-own")
    inner = Guard(MemoryStore(), namespace="otel-inner")
    inner.execute("x", "charge", {"a": 1}, lambda _ctx: 1)

    def nested_conflict(_ctx: object) -> None:
        inner.execute("x", "charge", {"a": 2}, lambda _ctx: 1)

    def own_store_error(_ctx: object) -> None:
        raise StoreError("the ledger service's own database failed")

    async def never_awaited(_ctx: object) -> None:
        pass

    with pytest.raises(FingerprintMismatchError):
        guard.execute("c", "charge", {}, nested_conflict)
    with pytest.raises(StoreError, match="ledger service"):
        guard.execute("s", "charge", {}, own_store_error)
    with pytest.raises(ConfigurationError, match="released"):
        guard.execute("n", "charge", {}, never_awaited)
    assert _outcomes("otel-own") == ["failed", "failed", "error"]
    counts = _counts("otel-own")
    assert counts["safeagent.executions"] == 2
    assert counts.get("safeagent.conflicts", 0) == 0
    assert counts.get("safeagent.in_doubt", 0) == 0
