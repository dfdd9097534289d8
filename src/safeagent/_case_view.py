"""What the finality gate returns of a case, and reading it from a store: each
:class:`Case` is its row and live signals read together (one snapshot), and a row no
release writes is a typed :class:`~safeagent.errors.StoreError` naming it, never a bare
``ValueError`` or a listing that stops at it without saying which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from safeagent._cases import CaseRow, CaseState, ConsensusPolicy, Signal, Tally
from safeagent.errors import ConfigurationError, GuardError, StoreError
from safeagent.stores._as_stored import Unreadable, case_from_row, case_rows, rows_as_stored
from safeagent.stores._rows import CASE_COLUMNS


@dataclass(frozen=True, slots=True)
class Case:
    """A decision and where it stands.

    Attributes:
        namespace, case_id: its identity.
        state: a :class:`CaseState`.
        outcome: the final outcome (FINAL and SETTLED), else ``None``.
        provisional_outcome: the outcome all live signals agree on while
            RESOLVED_PROVISIONAL, else ``None``.
        policy: the :class:`ConsensusPolicy` the case was opened with.
        tally: the live signals' scores.
        signals: the live signals, one per source, oldest first.
        version: bumped on every change.
        resolved_by: the operator who finalized it, if one did.
        created_at_ms, updated_at_ms: store-clock instants in ms.
    """

    namespace: str
    case_id: str
    state: CaseState
    outcome: str | None
    provisional_outcome: str | None
    policy: ConsensusPolicy
    tally: Tally
    signals: tuple[Signal, ...]
    version: int
    resolved_by: str | None
    created_at_ms: int
    updated_at_ms: int

    @classmethod
    def _from(cls, row: CaseRow, live: Sequence[Signal]) -> Case:
        policy = row.policy
        return cls(
            namespace=row.namespace,
            case_id=row.case_id,
            state=row.state,
            outcome=row.outcome,
            provisional_outcome=row.provisional_outcome,
            policy=policy,
            tally=policy.tally(live),
            signals=tuple(live),
            version=row.version,
            resolved_by=row.resolved_by,
            created_at_ms=row.created_at_ms,
            updated_at_ms=row.updated_at_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "case_id": self.case_id,
            "state": self.state.value,
            "outcome": self.outcome,
            "provisional_outcome": self.provisional_outcome,
            "policy": {"threshold": self.policy.threshold, "quorum": self.policy.quorum},
            "tally": self.tally.to_dict(),
            "signals": [s.to_dict() for s in self.signals],
            "version": self.version,
            "resolved_by": self.resolved_by,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
        }


def case_of(row: CaseRow, live: Sequence[Signal]) -> Case:
    """``Case._from(row, live)``; a stored row it cannot read is a typed error naming it.

    Raises:
        StoreError: the row (its state, policy) or one of its live signals cannot be read
            (edited by hand or corrupt).
    """
    try:
        return Case._from(row, live)
    except Exception as exc:
        raise _unreadable_case(_problem(row.namespace, row.case_id, exc)) from exc


_UNREADABLE_HINT = (
    "(edited by hand or corrupt: `safeagent cases list` shows it marked, `safeagent audit "
    "verify` checks the trail)"
)


def _problem(namespace: str, case_id: str, exc: Exception) -> str:
    """What cannot be read in a case's row or live signals (``exc``: what reading them
    raised), never a stored payload or metadata."""
    name = f"case {namespace}/{case_id}"
    if isinstance(exc, ConfigurationError):  # the stored policy is out of range
        return f"{name}: its stored policy is invalid ({exc})"
    return f"{name}: it or one of its live signals cannot be read ({type(exc).__name__})"


def _unreadable_case(problem: str) -> StoreError:
    return StoreError(f"{problem} {_UNREADABLE_HINT}", unreadable=(problem,))


def _read_listing(
    store: Any, namespace: str | None, states: tuple[CaseState, ...] | None
) -> list[tuple[CaseRow, list[Signal]]]:
    """Each listed case's row with its live signals, the two read together.

    A store with ``cases_with_live`` reads the whole listing as one snapshot (one
    statement or read transaction). Another store's listing is read case by case with
    ``get_case``, whose row and signals are one snapshot: a case that left ``states``
    since the listing was read is left out.
    """
    if getattr(type(store), "cases_with_live", None) is not None:
        return list(store.cases_with_live(namespace=namespace, states=states))
    out = []
    for listed in store.cases(namespace=namespace, states=states):
        row, live = store.get_case(listed.namespace, listed.case_id)
        if row is not None and (states is None or row.state in states):
            out.append((row, list(live)))
    return out


def list_cases(
    store: Any, namespace: str | None, states: tuple[CaseState, ...] | None
) -> list[Case]:
    """The listing of :meth:`FinalityGate.cases`, each case one snapshot of its row and
    live signals.

    Raises:
        StoreError: the store failed, or rows cannot be read (named, in ``unreadable``).
    """
    try:
        pairs = _read_listing(store, namespace, states)
    except GuardError:
        raise
    except Exception as exc:  # a row the store's parser refused
        found = _unreadable(store, namespace, states)
        raise _listing_error(
            found or [f"a case row cannot be read ({type(exc).__name__})"]
        ) from exc
    cases: list[Case] = []
    bad: list[str] = []
    for row, live in pairs:
        try:
            cases.append(Case._from(row, live))
        except Exception as exc:  # noqa: BLE001 - a policy or signal the tally cannot count
            bad.append(_problem(row.namespace, row.case_id, exc))
    if bad:
        raise _listing_error(bad)
    return cases


def _listing_error(found: list[str]) -> StoreError:
    shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
    return StoreError(
        f"{len(found)} case row(s) cannot be read, so no listing is returned: {shown} "
        f"{_UNREADABLE_HINT}",
        unreadable=tuple(found),
    )


def _unreadable(
    store: Any, namespace: str | None, states: tuple[CaseState, ...] | None
) -> list[str]:
    """The listed rows that cannot be read, named: on the error path only (a read per
    case). Whatever fails meanwhile ends the search with what was found."""
    found: list[str] = []
    try:
        for row in case_rows(store, namespace=namespace, states=states):
            if isinstance(row, Unreadable):
                found.append(row.describe())
                continue
            try:
                stored, live = store.get_case(row.namespace, row.case_id)
                if stored is not None:
                    Case._from(stored, live)
            except StoreError:
                break
            except Exception as exc:  # noqa: BLE001 - this one cannot be read
                found.append(_problem(row.namespace, row.case_id, exc))
    except Exception:  # noqa: BLE001, S110 - the store failed meanwhile: report what was found
        pass
    return found


def read_case(store: Any, namespace: str, case_id: str) -> tuple[CaseRow | None, list[Signal]]:
    """``store.get_case``; a row its parser refuses is a typed error naming it.

    Raises:
        StoreError: the store failed, or the case's row or live signals cannot be read.
    """
    try:
        row, live = store.get_case(namespace, case_id)
    except GuardError:
        raise
    except Exception as exc:  # a row the store's parser refused
        problem = _row_problem(store, namespace, case_id) or _problem(namespace, case_id, exc)
        raise _unreadable_case(problem) from exc
    return row, list(live)


def write_case(store: Any, namespace: str, case_id: str, mutate: Any, **kwargs: Any) -> Case:
    """``store.update_case(namespace, case_id, mutate, **kwargs)``, the case it leaves; a
    stored row its parser refuses is a typed error naming it, as for a read.

    Raises:
        StoreError: the store failed, or the case's row (its state, its stored policy) or
            live signals cannot be read; nothing changed.
        GuardError: what ``mutate`` raises (an invalid transition), as it is.
    """

    def readable_first(case: CaseRow, live: list[Signal]) -> Any:
        # Inside the store's transaction, before anything is written: a row whose policy
        # or signals the returned Case could not hold aborts it (nothing recorded), rather
        # than being written and then failing to be returned.
        Case._from(case, live)
        return mutate(case, live)

    try:
        update = store.update_case(namespace, case_id, readable_first, **kwargs)
    except Exception as exc:
        # The arguments were checked before: a ConfigurationError here is the stored
        # policy's, any other GuardError the store's failure or a refused transition.
        if isinstance(exc, GuardError) and not isinstance(exc, ConfigurationError):
            raise
        problem = _row_problem(store, namespace, case_id) or _problem(namespace, case_id, exc)
        raise _unreadable_case(problem) from exc
    return case_of(update.case, update.live)


def _row_problem(store: Any, namespace: str, case_id: str) -> str | None:
    """What cannot be read in one case's row as stored (its state, a column), or ``None``
    (the row reads, or the store cannot be read row by row): on the error path only."""
    sql = f"SELECT {CASE_COLUMNS} FROM {{t}}cases WHERE namespace = ? AND case_id = ?"
    try:
        rows = rows_as_stored(store, sql, [namespace, case_id])
    except Exception:  # noqa: BLE001 - no row-by-row reader, or the store failed
        return None
    for stored in rows:
        row = case_from_row(stored)
        if isinstance(row, Unreadable):
            return row.describe()
    return None
