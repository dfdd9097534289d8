"""Settings: durations, exception policies, per-action policies, reconcile hooks, and the
documented result encoding. Plain values, validated once; no I/O."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import operator
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal, get_args

from safeagent.errors import ConfigurationError, InvalidInputError

DEFAULT_LEASE = 60.0
"""Seconds a claim stays live without a heartbeat. While ``fn`` runs, a heartbeat renews
it every third of its length, so only a dead (or frozen) owner lets it expire."""
DEFAULT_WAIT = 10.0
"""Seconds a call waits for another caller's live claim before raising InProgressError."""
MIN_LEASE = 0.1
"""Shortest lease accepted, in seconds (a heartbeat must be able to renew it in time)."""
MAX_SECONDS = 365 * 24 * 3600.0
"""Longest duration accepted for a lease or a wait: one year, in seconds."""
MAX_RETENTION = 100 * 365 * 24 * 3600.0
"""Longest ``older_than`` accepted by :func:`safeagent.retention.purge`: 100 years (of 365
days), in seconds. Records are kept for years (payment records for seven), and the cutoff
``now - older_than`` stays an instant every store and ``datetime`` can represent."""
CASE_PREFIX = "case:"
"""Request ids of case settlements (docs/design.md section 4); reserved for FinalityGate.settle."""

ExceptionTypes = tuple[type[BaseException], ...]
Seconds = float | dt.timedelta
"""A duration in seconds: a float (or int) or a ``timedelta``."""


def seconds(name: str, value: Seconds, *, allow_zero: bool, maximum: float = MAX_SECONDS) -> float:
    """Validate a duration; return it as float seconds.

    Args:
        name: the argument's name, for the error message.
        value: seconds (an int or float) or a ``timedelta``.
        allow_zero: whether 0 is accepted.
        maximum: the longest duration accepted, in seconds (default :data:`MAX_SECONDS`,
            one year).

    Raises:
        ConfigurationError: not a number or ``timedelta``, negative, NaN, infinite, zero
            where zero is not allowed, or longer than ``maximum``.
    """
    given = value
    number = plain_number(value.total_seconds() if isinstance(value, dt.timedelta) else value)
    if number is None:
        raise ConfigurationError(
            f"{name} must be seconds (float or timedelta), got {_shown(given)}"
        )
    # Checked as converted, and an int exactly (it may be too large for a float): what
    # is checked is what is returned.
    if (
        (isinstance(number, float) and not math.isfinite(number))
        or number < 0
        or (number == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(
            f"{name} must be a finite number of seconds {bound}, got {shown_number(given, number)}"
        )
    if number > maximum:
        raise ConfigurationError(
            f"{name} must be at most {maximum:.0f} s ({maximum / 86400:.0f} days), "
            f"got {shown_number(given, number)}"
        )
    return float(number)


def plain_number(value: object) -> int | float | None:
    """``value`` as the plain number to check and keep, converted *before* any check, so
    that what is checked is what is stored: an ``int`` (``bool`` refused) as the exact
    ``int`` it holds (never through a float, so a huge one cannot overflow, and an
    overridden ``__index__``, ``__int__`` or comparison plays no part), a ``float`` (or a
    subclass) as ``float(value)`` (what its ``__float__`` returns, as a plain float).
    ``None`` for anything else, or a conversion that raises.
    """
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int):
            return operator.index(value)  # an exact int, the value the object holds
        if isinstance(value, float):
            return float(value)
    except Exception:  # noqa: BLE001 - a __float__ or __index__ that raises: not a number
        return None
    return None


def shown_number(given: object, number: float | None) -> str:
    """:func:`_shown` of ``given``, and what it converted to when that differs from what it
    shows (a float subclass whose ``__float__`` returns another value)."""
    text = _shown(given)
    if number is not None and type(given) not in (int, float) and _shown(number) != text:
        text += f" (a {type(given).__name__}, as a number {_shown(number)})"
    return text


def _shown(value: object) -> str:
    """``repr(value)`` for a message, an int of more than 30 digits described instead (one
    too long is refused by ``str()`` beyond 4300 digits, and unreadable long before)."""
    if isinstance(value, int) and not isinstance(value, bool):
        exact = operator.index(value)  # compared as the int it holds
        if not -(10**30) < exact < 10**30:
            return "an int of more than 30 digits"
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a __repr__ that raises: name the type instead
        return f"a {type(value).__name__}"


def retention_seconds(value: Seconds) -> float:
    """Validate a retention age (``older_than``): at least 0 and at most
    :data:`MAX_RETENTION` (100 years), in seconds.

    Raises:
        ConfigurationError: not a number or ``timedelta``, negative, NaN, infinite, or
            longer than 100 years.
    """
    return seconds("older_than", value, allow_zero=True, maximum=MAX_RETENTION)


def lease_seconds(value: Seconds) -> float:
    """Validate a lease: between :data:`MIN_LEASE` and one year, in seconds."""
    lease = seconds("lease", value, allow_zero=False)
    if lease < MIN_LEASE:
        raise ConfigurationError(
            f"lease must be at least {MIN_LEASE} s: the heartbeat renews it every third of "
            f"its length, and a shorter lease expires under ordinary load, got {value!r}"
        )
    return lease


def exception_types(name: str, value: Collection[type[BaseException]] | None) -> ExceptionTypes:
    """Validate a collection of exception classes.

    Raises:
        ConfigurationError: an item that is not an exception class.
    """
    if value is None:
        return ()
    types: tuple[Any, ...] = (value,) if isinstance(value, type) else tuple(value)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise ConfigurationError(f"{name} must hold exception types, got {t!r}")
    return types


def json_default(value: Any) -> Any:
    """The documented result encoding for values ``json`` cannot store on its own.

    ``datetime``/``date``/``time`` become ISO 8601 strings, ``Decimal`` and ``UUID``
    strings, ``Enum`` members their value, sets and frozensets lists, dataclass instances
    dicts, pydantic models ``model_dump(mode="json")``. Anything else raises ``TypeError``
    (the result is then not serializable).
    """
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = getattr(value, "model_dump", None)  # pydantic v2 models, as every SDK returns
    if callable(dump) and not isinstance(value, type):
        return dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@dataclass(frozen=True, slots=True)
class ReconcileRequest:
    """What a reconcile hook is asked about: one in-doubt execution.

    Attributes:
        namespace, request_id, action: the record's identity and action.
        payload: the payload as stored (a JSON value).
        attempt: the attempt that is in doubt: the one that ran ``fn``.
        downstream_key: the idempotency key that attempt handed downstream: ask the
            downstream system about it ("do you have a charge with this key?").
        owner: the lease owner of the attempt in doubt (the process that ran ``fn``),
            never a reconciler: the same in every reconcile round of that attempt,
            whatever earlier rounds answered, raised or left unfinished.
        claimed_at_ms: when that attempt claimed, store clock, ms.
        fencing_token: the token of this reconcile lease.
        lease_expired_at_ms: when that attempt ended (see the attribute's own docstring).
        now_ms: the store's clock as this round began (see the attribute's docstring).
    """

    namespace: str
    request_id: str
    action: str
    payload: Any
    attempt: int
    downstream_key: str
    owner: str | None
    claimed_at_ms: int
    fencing_token: int
    lease_expired_at_ms: int | None = None
    """When the attempt in doubt ended, store clock, ms: its lease expiry if it died (its
    heartbeat stopped), or the instant it recorded the in-doubt outcome itself if ``fn``
    raised an "outcome unknown" exception (it sent nothing after that). Fixed for the
    attempt: the same in every reconcile round, however often the record is retaken. Answer
    ``not_happened`` only once no request that attempt sent can still reach the downstream
    system: once the store's clock is at least this instant plus the downstream's longest
    request timeout (the rule of docs/guide.md's "Reconcile hooks"; compare it with
    :attr:`now_ms`, on the same clock). ``None`` only for a record whose lease expiry was
    never stored."""
    now_ms: int | None = None
    """The store's clock when this round took the record over, ms (the database's clock on
    PostgreSQL): the instant to compare with :attr:`lease_expired_at_ms`, so a hook's rule
    does not depend on the skew between its host's clock and the store's."""


Verdict = Literal["happened", "failed", "not_happened", "unknown"]
_VERDICTS: tuple[str, ...] = get_args(Verdict)


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """A reconcile hook's answer. Build it with the class methods.

    - :meth:`happened`: the side effect took place; ``result`` becomes the stored result
      and every later call replays it.
    - :meth:`failed`: it failed for good; the failure is stored and replayed.
    - :meth:`not_happened`: it surely did not take place; the record is released and the
      calling request runs ``fn`` (a proactive reconcile just releases it).
    - :meth:`unknown`: cannot tell; the record stays in doubt.

    Raises:
        InvalidInputError: a verdict other than these four, or an ``error_type``,
            ``error_message`` or ``note`` that is not a str (``None`` is taken for no
            error message, or an empty note), raised in the hook, which leaves the record
            in doubt, as any exception the hook raises does.
    """

    verdict: Verdict
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    note: str = ""

    @classmethod
    def happened(cls, result: Any = None, *, note: str = "") -> Reconciliation:
        return cls("happened", result=result, note=note)

    @classmethod
    def failed(cls, error_type: str, error_message: str = "", *, note: str = "") -> Reconciliation:
        return cls("failed", error_type=error_type, error_message=error_message, note=note)

    @classmethod
    def not_happened(cls, *, note: str = "") -> Reconciliation:
        return cls("not_happened", note=note)

    @classmethod
    def unknown(cls, *, note: str = "") -> Reconciliation:
        return cls("unknown", note=note)

    def __post_init__(self) -> None:
        """Refuse an answer that could not be recorded as given, while the hook is still
        running: it then raised, which leaves the record in doubt ("unknown")."""
        if self.verdict not in _VERDICTS:
            raise InvalidInputError(
                f"a Reconciliation's verdict is one of {_VERDICTS}, got {self.verdict!r}"
            )
        for name in ("error_type", "error_message"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(
                    f"Reconciliation {name} must be a str, got {type(value).__name__}"
                )
        if self.note is None:  # accepted before the checks: a hook may pass note=None
            object.__setattr__(self, "note", "")
        if not isinstance(self.note, str):
            raise InvalidInputError(
                f"Reconciliation note must be a str, got {type(self.note).__name__}"
            )


ReconcileHook = Callable[[ReconcileRequest], "Reconciliation | Awaitable[Reconciliation]"]
"""A reconcile hook: sync, or ``async def`` (with :class:`~safeagent.AsyncGuard`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionPolicy:
    """Settings for one action (by name), overriding the guard's defaults.

    A per-call argument overrides the action's setting, which overrides the guard's.

    Attributes:
        lease: seconds, or ``None`` for the guard's lease.
        not_executed: exception types that release the claim, or ``None`` for the guard's.
        outcome_unknown: exception types that leave the record in doubt, or ``None``.
        reconcile: the hook that decides what happened to an in-doubt record of this
            action (see :class:`Reconciliation`), or ``None``.
    """

    lease: Seconds | None = None
    not_executed: Collection[type[BaseException]] | None = None
    outcome_unknown: Collection[type[BaseException]] | None = None
    reconcile: ReconcileHook | None = None

    def __post_init__(self) -> None:
        if self.lease is not None:
            lease_seconds(self.lease)
        exception_types("not_executed", self.not_executed)
        exception_types("outcome_unknown", self.outcome_unknown)
        if self.reconcile is not None and not callable(self.reconcile):
            raise ConfigurationError(f"reconcile must be callable, got {self.reconcile!r}")
