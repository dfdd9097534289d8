"""OpenTelemetry: a span per execution and counters, through the API only."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from safeagent import FingerprintMismatchError, Guard, MemoryStore, _telemetry

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


def _counts() -> dict[str, int]:
    data = _reader.get_metrics_data()
    out: dict[str, int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = sum(
                    int(p.value)
                    for p in metric.data.data_points
                    if p.attributes.get("safeagent.namespace") == "otel"
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
