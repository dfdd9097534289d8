"""The pure core: what a call does given the record it finds. No I/O, no clocks.

``decide`` implements the behaviour table of docs/design.md section 2; ``classify_exception``
the exception policy. The flow (``_flow``) acts on them, and the sync and async drivers
only do the I/O the flow asks for.
"""

from __future__ import annotations

import concurrent.futures
import enum
from dataclasses import dataclass

from safeagent._receipt import Record, Status
from safeagent.errors import NotExecuted


class Verdict(enum.Enum):
    """What the driver must do next."""

    CLAIM = "claim"  # no record, or a RELEASED one: try the atomic claim, then run fn
    REPLAY = "replay"  # SUCCEEDED or FAILED with the same request: return the stored outcome
    CONFLICT_ACTION = "conflict_action"  # same request id, another action: refuse
    CONFLICT_FINGERPRINT = "conflict_fingerprint"  # same request id, another payload: refuse
    WAIT = "wait"  # PENDING with a live lease: wait for it, bounded
    IN_DOUBT = "in_doubt"  # IN_DOUBT, or PENDING with an expired lease: never re-run silently
    PURGED = "purged"  # a tombstone left by retention: it happened; its receipt is gone


class ReportedFailure(Exception):  # noqa: N818 - a failure reported, not raised into
    """A failure the side effect reported itself: it returned normally, saying it failed
    (an MCP tool's ``CallToolResult(isError=True)``). An integration raises a subclass
    inside the guard to record it; it is FAILED whatever ``outcome_unknown`` or
    ``not_executed`` name, since those classify exceptions a side effect ran into, and
    this one is a definite answer."""


class FrameworkStop(NotExecuted):
    """A framework's own control flow raised through ``fn`` before its work, for the
    framework to call it again (LangGraph's ``interrupt()``; an integration raises a
    subclass around it). RELEASED whatever ``outcome_unknown`` names (a guard declaring
    ``Exception`` there would leave it in doubt, and the approved work would never run):
    those classify exceptions a side effect ran into, and this one says it did not start."""


@dataclass(slots=True)
class Decision:
    """What :func:`decide` answers. Built on every call and never changed: not frozen,
    since a frozen dataclass sets each field through ``object.__setattr__`` (as the
    flow's operations, see ``_flow``)."""

    verdict: Verdict
    record: Record | None
    retry_after_ms: int = 0


def decide(record: Record | None, action: str, fingerprint: str, now_ms: int) -> Decision:
    """Decide what a call with ``(action, fingerprint)`` does on meeting ``record``.

    ``now_ms`` is the store's clock. A released record is claimed whatever it held: it has
    no outcome to protect. Otherwise the action is compared first, then the fingerprint,
    so a conflict never reveals or replays another request's outcome.
    """
    if record is None or record.status is Status.RELEASED:
        return Decision(Verdict.CLAIM, record)
    if record.action != action:
        return Decision(Verdict.CONFLICT_ACTION, record)
    if record.fingerprint != fingerprint:
        return Decision(Verdict.CONFLICT_FINGERPRINT, record)
    if record.purged_at_ms is not None:
        return Decision(Verdict.PURGED, record)
    status = record.effective_status(now_ms)
    if status is Status.PENDING:
        assert record.lease_expires_at_ms is not None
        return Decision(Verdict.WAIT, record, record.lease_expires_at_ms - now_ms)
    if status is Status.IN_DOUBT:
        return Decision(Verdict.IN_DOUBT, record)
    return Decision(Verdict.REPLAY, record)


def classify_exception(
    exc: BaseException,
    not_executed: tuple[type[BaseException], ...],
    outcome_unknown: tuple[type[BaseException], ...],
) -> Status:
    """Map an exception raised by ``fn`` to the status its record gets.

    - :class:`ReportedFailure` (a failure the side effect returned): FAILED;
    - :class:`FrameworkStop` (a framework's control flow before the work): RELEASED;
    - declared "outcome unknown" types: IN_DOUBT (checked first: when a type matches both
      lists, doubt is the safe reading);
    - :class:`~safeagent.errors.NotExecuted` and declared "not executed" types: RELEASED;
    - any ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``,
      ``SystemExit``, ``asyncio.CancelledError``), and ``concurrent.futures``'
      ``CancelledError`` (an ``Exception``: what ``Future.result()`` raises when the work
      it waits for, such as a coroutine run with ``asyncio.run_coroutine_threadsafe``, was
      cancelled): IN_DOUBT, since ``fn`` or the work it waited for was cut off midway;
    - anything else: FAILED, stored and replayed.
    """
    if isinstance(exc, ReportedFailure):
        return Status.FAILED
    if isinstance(exc, FrameworkStop):
        return Status.RELEASED
    if outcome_unknown and isinstance(exc, outcome_unknown):
        return Status.IN_DOUBT
    if isinstance(exc, NotExecuted) or (not_executed and isinstance(exc, not_executed)):
        return Status.RELEASED
    if not isinstance(exc, Exception) or isinstance(exc, concurrent.futures.CancelledError):
        return Status.IN_DOUBT
    return Status.FAILED
