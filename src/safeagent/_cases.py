"""The finality gate's pure core: case states, transitions and consensus (docs/design.md section 4).

No I/O here. A store applies :func:`apply_signal` and :func:`apply_resolution` inside one
transaction (with the case row locked), so the rules are written once for every store.

States and the only transitions allowed::

    OPEN --agree--> RESOLVED_PROVISIONAL --consensus or operator--> FINAL --receipt--> SETTLED
      |                     | provisional outcome changes             ^
      '--conflict--> IN_RECONCILIATION --consensus or operator--------'
"""

from __future__ import annotations

import decimal
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from safeagent._keys import check_name
from safeagent._policy import plain_number, shown_number
from safeagent.errors import ConfigurationError, InvalidInputError, InvalidTransitionError


class CaseState(str, enum.Enum):
    """Where a decision stands."""

    OPEN = "OPEN"
    RESOLVED_PROVISIONAL = "RESOLVED_PROVISIONAL"
    IN_RECONCILIATION = "IN_RECONCILIATION"
    FINAL = "FINAL"
    SETTLED = "SETTLED"

    def __str__(self) -> str:
        return self.value


TRANSITIONS: Mapping[CaseState, frozenset[CaseState]] = {
    CaseState.OPEN: frozenset({CaseState.RESOLVED_PROVISIONAL, CaseState.IN_RECONCILIATION}),
    CaseState.RESOLVED_PROVISIONAL: frozenset({CaseState.IN_RECONCILIATION, CaseState.FINAL}),
    CaseState.IN_RECONCILIATION: frozenset({CaseState.FINAL}),
    CaseState.FINAL: frozenset({CaseState.SETTLED}),
    CaseState.SETTLED: frozenset(),
}
"""docs/design.md section 4's transition table: the only (from, to) pairs allowed."""

BEFORE_FINAL = frozenset(
    {CaseState.OPEN, CaseState.RESOLVED_PROVISIONAL, CaseState.IN_RECONCILIATION}
)

MAX_QUORUM = 2**31 - 1
"""The largest quorum a policy takes: PostgreSQL's ``integer`` column (SQLite's is wider),
so a policy one store accepts every store accepts."""


def check_transition(case_id: str, frm: CaseState, to: CaseState) -> None:
    """Raise :class:`InvalidTransitionError` unless ``frm -> to`` is in the table."""
    if to not in TRANSITIONS[frm]:
        raise InvalidTransitionError(
            f"case {case_id!r}: {frm.value} -> {to.value} is not an allowed transition",
            case_id=case_id,
            from_state=frm,
            to_state=to,
        )


_EXACT = decimal.Context(
    prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[decimal.Inexact]
)
"""Sums and products of decimals, exactly: the precision is unbounded in practice (a
result has only the digits it needs), and an inexact result would raise, never round."""


def _decimal(x: float) -> decimal.Decimal:
    """``x`` as the decimal number it is written as (its shortest repr), exactly.

    Raises:
        ValueError: NaN or an infinity (no signal or policy holds one).
    """
    exact = decimal.Decimal(repr(float(x)))
    if not exact.is_finite():
        raise ValueError(f"not a finite number: {x!r}")
    return exact


@dataclass(frozen=True, slots=True)
class ConsensusPolicy:
    """When the live signals make a case FINAL (docs/design.md section 4).

    With live signals ``S`` (one per source), ``score(o)`` is the sum of the confidences of
    the sources voting ``o``, divided by ``|S|``. The case becomes FINAL with outcome ``o``
    when all three hold:

    1. ``score(o) >= threshold``;
    2. at least ``quorum`` sources vote ``o`` with confidence > 0;
    3. ``score(o)`` is strictly above every other outcome's score (a tie never finalizes).

    Scores are compared exactly, in rational arithmetic on the numbers as written in
    decimal (``0.6`` is 3/5, not the binary float nearest to it), so ``(0.6 + 1.0) / 2``
    meets a threshold of ``0.8`` and ``3 x 0.7`` meets ``0.7``, whatever float rounding
    would say.

    Worked example, threshold 0.7 and quorum 2: A votes ``approve`` at 0.9 (RESOLVED_PROVISIONAL),
    C votes ``reject`` at 0.6 (a conflict: IN_RECONCILIATION), B votes ``approve`` at 0.8:
    ``score(approve) = 1.7 / 3 = 0.567`` < 0.7, not final. C replaces its signal with
    ``approve`` at 0.5: ``score(approve) = 2.2 / 3 = 0.733``, three voters, no rival: FINAL
    ``approve``.

    Args:
        threshold: in (0, 1].
        quorum: an int in [1, MAX_QUORUM] (2,147,483,647: PostgreSQL's ``integer``, so
            every store keeps the same range).

    Raises:
        ConfigurationError: a threshold or quorum out of range.
    """

    threshold: float = 0.8
    quorum: int = 1

    def __post_init__(self) -> None:
        # Converted first, then checked, then kept as converted: a float subclass whose
        # __float__ says otherwise, or an int too large for a float, cannot slip past.
        t = plain_number(self.threshold)
        if t is None or not 0 < t <= 1:
            raise ConfigurationError(
                f"threshold must be in (0, 1], got {shown_number(self.threshold, t)}"
            )
        q = plain_number(self.quorum)
        if not isinstance(q, int) or not 1 <= q <= MAX_QUORUM:
            raise ConfigurationError(
                f"quorum must be an int in [1, {MAX_QUORUM}], got {shown_number(self.quorum, q)}"
            )
        object.__setattr__(self, "threshold", float(t))
        object.__setattr__(self, "quorum", q)

    def tally(self, signals: Sequence[Signal]) -> Tally:
        """Score the live signals and say which outcome, if any, is final."""
        if not signals:
            return Tally(scores={}, voters={}, winner=None)
        # Every score shares the divisor n, so scores compare as their sums and
        # score >= threshold as sum >= threshold * n: exact decimal sums and one exact
        # product, no division (as fast as floats, where fractions took milliseconds for
        # a few hundred signals).
        add, zero = _EXACT.add, decimal.Decimal(0)
        sums: dict[str, decimal.Decimal] = {}
        voters: dict[str, int] = {}
        exact: dict[float, decimal.Decimal] = {}  # confidences repeat: each converted once
        for s in signals:
            value = exact.get(s.confidence)
            if value is None:
                value = exact[s.confidence] = _decimal(s.confidence)
            sums[s.outcome] = add(sums.get(s.outcome, zero), value)
            if s.confidence > 0:
                voters[s.outcome] = voters.get(s.outcome, 0) + 1
        n = len(signals)
        bar = _EXACT.multiply(_decimal(self.threshold), n)
        winner = None
        for outcome, total in sums.items():
            if (
                total >= bar
                and voters.get(outcome, 0) >= self.quorum
                and all(total > other for o, other in sums.items() if o != outcome)
            ):
                winner = outcome
        return Tally(
            scores={o: float(Fraction(total) / n) for o, total in sorted(sums.items())},
            voters=dict(sorted(voters.items())),
            winner=winner,
        )


@dataclass(frozen=True, slots=True)
class Tally:
    """The scores of the live signals: ``scores[o]`` as defined by the policy,
    ``voters[o]`` the sources voting ``o`` with confidence > 0, ``winner`` the outcome that
    meets the policy (or ``None``)."""

    scores: Mapping[str, float]
    voters: Mapping[str, int]
    winner: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "voters": dict(self.voters), "winner": self.winner}


@dataclass(frozen=True, slots=True)
class Signal:
    """One source's view of a case: ``outcome`` with ``confidence`` in [0, 1]."""

    source: str
    outcome: str
    confidence: float
    metadata: Mapping[str, Any] = field(default_factory=dict)
    at_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "outcome": self.outcome,
            "confidence": self.confidence,
            "metadata": dict(self.metadata),
            "at_ms": self.at_ms,
        }


def check_signal(source: object, outcome: object, confidence: object) -> float:
    """Validate a signal's fields; return the confidence as a float.

    ``source`` and ``outcome`` are names (:func:`~safeagent._keys.check_name`): every store
    keeps them as text and the outcome goes into the settlement's payload.

    The confidence is converted before it is checked (:func:`~safeagent._policy.plain_number`):
    an ``int`` exactly, a ``float`` through ``float()``; the value checked is the value
    returned.

    Raises:
        InvalidInputError: a source or outcome that is not a non-empty ``str`` of at most
            255 characters of valid UTF-8 without NUL (a lone surrogate, a NUL byte), or a
            confidence that is not a number in [0, 1] (a ``bool``, NaN, an int of any size
            outside it).
    """
    source = check_name("source", source)
    outcome = check_name("outcome", outcome)
    # Converted first (an int exactly: 10**400 is refused, not an OverflowError), then
    # checked, and the checked value is the one returned and stored.
    value = plain_number(confidence)
    if value is None or not 0 <= value <= 1:  # NaN compares false: refused too
        raise InvalidInputError(
            f"confidence must be a number in [0, 1], got {shown_number(confidence, value)}"
        )
    return float(value) + 0.0  # -0.0 as 0.0: every store keeps the same value


@dataclass(frozen=True, slots=True)
class CaseRow:
    """A case as stored: state, the provisional and final outcomes, its policy, a version
    bumped on every change, and who resolved it (an operator) if anyone did."""

    namespace: str
    case_id: str
    state: CaseState
    provisional_outcome: str | None
    outcome: str | None
    threshold: float
    quorum: int
    version: int
    created_at_ms: int
    updated_at_ms: int
    resolved_by: str | None = None

    @property
    def policy(self) -> ConsensusPolicy:
        return ConsensusPolicy(self.threshold, self.quorum)


@dataclass(frozen=True, slots=True)
class CaseChange:
    """What one signal or resolution does to a case: the states it passes through (each one
    audited), the new provisional and final outcomes, and whether the signal was late.

    ``provisional_outcome`` is the one agreed at the RESOLVED_PROVISIONAL step (audited);
    the case keeps it only while it stays RESOLVED_PROVISIONAL (see :meth:`stored_provisional`).
    """

    path: tuple[CaseState, ...]
    provisional_outcome: str | None
    outcome: str | None
    late: bool = False
    replaced: Signal | None = None

    def stored_provisional(self, state: CaseState) -> str | None:
        """The provisional outcome a case in ``state`` keeps: only RESOLVED_PROVISIONAL
        has one."""
        return self.provisional_outcome if state is CaseState.RESOLVED_PROVISIONAL else None


def apply_signal(case: CaseRow, live: Sequence[Signal], signal: Signal) -> CaseChange:
    """The transitions a new ``signal`` causes, given the case and its live signals.

    Before FINAL, the signal replaces its source's live signal. All live signals agreeing
    make OPEN -> RESOLVED_PROVISIONAL; a conflict, or any change of the provisional outcome,
    makes it IN_RECONCILIATION. Then, if the policy finds a winner, the case moves to FINAL
    in the same step. After FINAL the signal is recorded and ignored (``late``).
    """
    if case.state not in BEFORE_FINAL:
        return CaseChange((), case.provisional_outcome, case.outcome, late=True)
    replaced = next((s for s in live if s.source == signal.source), None)
    signals = [s for s in live if s.source != signal.source] + [signal]
    outcomes = {s.outcome for s in signals}
    agreed = next(iter(outcomes)) if len(outcomes) == 1 else None
    state = case.state
    path: list[CaseState] = []
    provisional = case.provisional_outcome
    if state is CaseState.OPEN:
        state = CaseState.RESOLVED_PROVISIONAL if agreed else CaseState.IN_RECONCILIATION
        path.append(state)
        provisional = agreed
    elif state is CaseState.RESOLVED_PROVISIONAL and agreed != case.provisional_outcome:
        state = CaseState.IN_RECONCILIATION
        path.append(state)
        provisional = None
    winner = case.policy.tally(signals).winner
    outcome = None
    if winner is not None:
        # Still RESOLVED_PROVISIONAL means every live signal votes `provisional`, so the
        # winner can only be that outcome; IN_RECONCILIATION may finalize any outcome.
        path.append(CaseState.FINAL)
        outcome = winner
    return CaseChange(tuple(path), provisional, outcome, replaced=replaced)


def apply_resolution(case: CaseRow, outcome: str) -> CaseChange:
    """An operator's resolution: RESOLVED_PROVISIONAL or IN_RECONCILIATION -> FINAL.

    Raises:
        InvalidTransitionError: from any other state.
    """
    if case.state not in (CaseState.RESOLVED_PROVISIONAL, CaseState.IN_RECONCILIATION):
        raise InvalidTransitionError(
            f"case {case.case_id!r} is {case.state.value}: an operator resolves only "
            "RESOLVED_PROVISIONAL or IN_RECONCILIATION cases",
            case_id=case.case_id,
            from_state=case.state,
            to_state=CaseState.FINAL,
        )
    return CaseChange((CaseState.FINAL,), None, outcome)
