"""Retention: forget what finished records held, never that they happened.

SafeAgent keeps receipts by default, unlike Stripe's 24 hours: an agent may retry a tool
call days later (a resumed plan, a replayed queue), and a receipt that expired lets that
retry charge again. When storage or privacy asks for less, :func:`purge` removes the
payload and result of records that finished before a cutoff and leaves a **tombstone**:
namespace, request id, action, fingerprint and final status. A retry after the purge is
still recognised: with the same request it gets :class:`~safeagent.ReceiptPurgedError`
(the side effect does not run again), with another request a conflict. Records that are
pending or in doubt are never touched. Released records (no outcome) lose their payload
too, but their row stays: deleting it would let the next claim of that id start its
fencing token again at 1, and a stalled worker still holding the old token 1 could then
complete the new attempt.

A purge does not touch the audit trail, which is append-only and hash-chained (erasing an
event would break the chain it is verified by), nor cases and their signals: the
``claimed`` event keeps the payload as the guard's ``redact`` hook left it, a ``failed``
event its error message, a signal its metadata. Personal data that must be erasable
should never reach the trail: mask it with ``redact=`` (the default masks card numbers,
secrets and e-mail addresses) or keep it out of payloads (pass a reference instead).

A pass purges only what finished before it ran: a cutoff later than the store's clock
plus 1 s (one read before a confirmation, from a clock that has since stepped back) is
cut to that, so that audit verification, which checks every tombstone against the pass
that made it, never takes it for an edit.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from safeagent._core import GuardCore
from safeagent._keys import check_name
from safeagent._policy import Seconds, retention_seconds
from safeagent.errors import ConfigurationError

__all__ = ["PurgeReport", "purge"]


def _store_of(target: Any, function: str, needs: Iterable[str]) -> Any:
    """The store behind ``target``: ``target`` itself if it has every method in
    ``needs``, the store of a ``Guard`` / ``AsyncGuard``, or of a ``FinalityGate`` /
    ``AsyncFinalityGate`` (its guard's store).

    Raises:
        ConfigurationError: ``target`` is none of these (a path, a URL, ``None``),
            naming ``function`` and what it takes; nothing was done.
    """
    guard = target if isinstance(target, GuardCore) else getattr(target, "guard", None)
    store = guard.store if isinstance(guard, GuardCore) else target
    if isinstance(store, (str, bytes)) or not all(
        callable(getattr(store, name, None)) for name in needs
    ):
        # Only the type is named: a path or URL given by mistake may hold a password.
        raise ConfigurationError(
            f"{function} takes a store (SQLiteStore, PostgresStore or MemoryStore) or a "
            f"Guard / AsyncGuard (whose store is used), got {type(target).__name__}"
        )
    return store


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What :func:`purge` did: finished records turned into tombstones, released records
    whose payload was removed (their rows stay), and pending / in-doubt records kept (they
    are never purged)."""

    tombstoned: int
    released: int
    kept_pending: int
    kept_in_doubt: int


class _Unset(enum.Enum):
    UNSET = "UNSET"


_UNSET = _Unset.UNSET
"""``older_than`` not given (``None`` given is refused as not a number of seconds)."""

_BIGINT = (-(2**63), 2**63 - 1)
"""The instants a store column holds (SQLite's INTEGER, PostgreSQL's BIGINT), in ms."""


def purge(
    store: Any,
    *,
    older_than: Seconds | _Unset = _UNSET,
    before_ms: int | None = None,
    actor: str = "safeagent.retention",
) -> PurgeReport:
    """Tombstone every SUCCEEDED or FAILED record that finished before the cutoff, and
    remove the payload of RELEASED ones last updated before it (keeping their rows and
    fencing tokens); audited as one ``purged`` event that records the cutoff.

    The cutoff is ``older_than`` seconds before the store's clock, read when the purge
    starts, or the instant ``before_ms``: pass exactly one. Take ``before_ms`` to purge
    up to a cutoff read (and shown, confirmed) earlier: ``store.records(limit=0)[1]`` is
    the store's clock, so ``before_ms=now - age_ms`` purges what finished before that
    instant however long the confirmation took, and nothing that finished after it.

    Args:
        store: a store (``SQLiteStore``, ``PostgresStore`` or ``MemoryStore``), or a
            ``Guard`` / ``AsyncGuard`` (or finality gate), whose store is used.
        older_than: the age, in seconds (int, float or ``timedelta``): at least 0 and at
            most 100 years (:data:`~safeagent._policy.MAX_RETENTION`, 3 153 600 000 s), so
            that retention of several years (payment records: seven) works and the cutoff
            stays a representable instant. ``0`` purges every finished record.
        before_ms: the cutoff itself, in milliseconds since the epoch on the store's
            clock: an ``int`` (not a ``bool``) from -2**63 to 2**63 - 1, the range a
            store's columns hold. Records that finished at ``before_ms`` or later are
            kept.
        actor: who purges, for the audit trail: a non-empty name of at most 255
            characters of valid UTF-8 without NUL.

    Raises:
        ConfigurationError: ``store`` is neither a store nor a guard; both or neither of
            ``older_than`` and ``before_ms`` given; ``older_than`` is not a finite number
            of seconds, is negative or is longer than 100 years; ``before_ms`` is not an
            ``int`` or is outside that range; nothing was purged.
        InvalidInputError: a bad ``actor``; nothing was purged.
        StoreError: the store failed; nothing was purged, except when the error says the
            connection was lost (``connection_lost``, PostgreSQL): the pass may have
            committed. Running it again is safe either way (a record already purged is
            left as it is).

    .. versionchanged:: 0.3
        ``before_ms``; ``older_than`` is no longer required.
    """
    store = _store_of(store, "retention.purge", ("records", "purge"))
    if (older_than is _UNSET) == (before_ms is None):
        raise ConfigurationError(
            "retention.purge takes exactly one of older_than (seconds) and before_ms "
            f"(a store-clock instant, ms), got {'both' if before_ms is not None else 'neither'}"
        )
    if before_ms is not None and (
        not isinstance(before_ms, int)
        or isinstance(before_ms, bool)
        or not _BIGINT[0] <= before_ms <= _BIGINT[1]
    ):
        raise ConfigurationError(
            "before_ms must be an int of milliseconds since the epoch from -2**63 to "
            f"2**63 - 1, got {before_ms!r}"
        )
    age_ms = None if older_than is _UNSET else int(1000 * retention_seconds(older_than))
    actor = check_name("actor", actor)
    if age_ms is None:
        assert before_ms is not None
        cutoff_ms = int(before_ms)  # a plain int (an IntEnum or int subclass is not stored)
    else:
        _, now = store.records(limit=0)
        cutoff_ms = (now if now else time.time_ns() // 1_000_000) - age_ms
    counts = store.purge(cutoff_ms, actor)
    return PurgeReport(**counts)
