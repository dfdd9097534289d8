"""OpenTelemetry through ``opentelemetry-api`` only: a no-op until the application
installs an SDK and exporters.

Each execution is a span ``safeagent.execute`` with the attributes ``safeagent.action``,
``safeagent.namespace``, ``safeagent.outcome`` and ``safeagent.replay`` (never the payload
or the result). Counters: ``safeagent.executions`` (``fn`` ran), ``safeagent.replays``
(duplicates blocked), ``safeagent.conflicts`` and ``safeagent.in_doubt`` (calls that met
an in-doubt record, or left one: ``fn`` raised an outcome-unknown exception), each with
the action and namespace as attributes.

``safeagent.outcome`` is one of: ``executed`` (a result that could not be stored
included); ``replayed``; ``replayed_failure`` (a stored failure, or a purged receipt);
``conflict``; ``in_doubt`` (met one, or ``fn`` ran and its outcome is unknown or could not
be recorded); ``in_progress``; ``released`` (``fn`` raised a "not executed" exception);
``failed`` (``fn`` ran and raised); ``error`` (``fn`` did not run: the store failed
before the claim was recorded, or ``fn`` could not be called with the context).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import metrics, trace

from safeagent._receipt import Status
from safeagent.errors import (
    ConflictError,
    InProgressError,
    OutcomeUnknownError,
    ReceiptPurgedError,
    ReplayedFailureError,
    ResultNotSerializableError,
)

_tracer = trace.get_tracer("safeagent")
_meter = metrics.get_meter("safeagent")
_counters = {
    "executions": _meter.create_counter(
        "safeagent.executions", description="side effects run (fn called)"
    ),
    "replays": _meter.create_counter(
        "safeagent.replays", description="duplicate calls answered from a stored receipt"
    ),
    "conflicts": _meter.create_counter(
        "safeagent.conflicts", description="request ids reused with another request"
    ),
    "in_doubt": _meter.create_counter(
        "safeagent.in_doubt", description="calls that met an in-doubt record"
    ),
}


def _outcome(exc: BaseException | None, seen: Observation) -> tuple[str, tuple[str, ...]]:
    """``(outcome attribute, counters to increment)`` for how a call ended. Whether ``fn``
    ran is asked first: what ``fn`` raised is its own failure, whatever its type (a nested
    guard's conflict, a store error of its own)."""
    if exc is None:
        return ("replayed", ("replays",)) if seen.replay else ("executed", ("executions",))
    if seen.ran:
        if seen.unrecorded or seen.status is Status.IN_DOUBT:
            # its outcome could not be recorded (the record stays PENDING and reads as in
            # doubt once its lease expires), or fn raised an outcome-unknown exception
            return "in_doubt", ("executions", "in_doubt")
        if isinstance(exc, ResultNotSerializableError):  # fn succeeded; result not kept
            return "executed", ("executions",)
        if seen.status is Status.RELEASED:  # fn said it did not happen (NotExecuted)
            return "released", ("executions",)
        return "failed", ("executions",)
    if isinstance(exc, ConflictError):
        return "conflict", ("conflicts",)
    if isinstance(exc, OutcomeUnknownError):
        return "in_doubt", ("in_doubt",)
    if isinstance(exc, (ReplayedFailureError, ReceiptPurgedError)):
        return "replayed_failure", ("replays",)
    if isinstance(exc, ResultNotSerializableError):
        return "replayed", ("replays",)
    if isinstance(exc, InProgressError):
        return "in_progress", ()
    return "error", ()


class Observation:
    """Filled in by the driver: the receipt's replay flag when the call returns one,
    whether ``fn`` ran (any of its code), the status of the last outcome the call tried
    to record, and whether recording it failed."""

    __slots__ = ("ran", "replay", "status", "unrecorded")

    def __init__(self) -> None:
        self.replay: bool | None = None
        self.ran = False
        self.status: Status | None = None
        self.unrecorded = False  # the store failed to record fn's outcome


_state = {"configured": False, "checked_at": -1.0}


def enabled() -> bool:
    """Whether calls are traced and counted (an OpenTelemetry SDK is installed)."""
    return bool(_state["configured"]) or _configured()


def _configured() -> bool:
    """Whether the application installed a tracer or meter provider (an SDK). Until then
    the API's proxies would do nothing, so the hot path skips them altogether. A provider
    can be installed once and never removed, so a yes is kept; a no is re-checked at most
    once a second (asking the API costs microseconds)."""
    if _state["configured"]:
        return True
    now = time.monotonic()
    if now - _state["checked_at"] < 1.0:
        return False
    _state["checked_at"] = now
    configured = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) or (
        type(metrics.get_meter_provider()).__name__ != "_ProxyMeterProvider"
    )
    _state["configured"] = configured
    return configured


@contextmanager
def observe(action: str, namespace: str) -> Iterator[Observation]:
    """One span and one counter increment around a guarded call."""
    seen = Observation()
    if not _configured():
        yield seen
        return
    attributes: dict[str, Any] = {"safeagent.action": action, "safeagent.namespace": namespace}
    with _tracer.start_as_current_span(
        "safeagent.execute",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        error: BaseException | None = None
        try:
            yield seen
        except BaseException as exc:
            error = exc
            raise
        finally:
            outcome, counters = _outcome(error, seen)
            span.set_attribute("safeagent.outcome", outcome)
            if seen.replay is not None:
                span.set_attribute("safeagent.replay", seen.replay)
            for counter in counters:
                _counters[counter].add(1, attributes)
