"""How :func:`safeagent.audit.verify` checks the finality gate's cases and signals: each
case's chained ``signal`` and ``state_change`` events are replayed in order
(:class:`_CaseHistory`) and compared with its row and its signal rows, read again before a
mismatch is reported."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

from safeagent._audit import EventKind
from safeagent._cases import CaseRow, CaseState, ConsensusPolicy, Signal, apply_signal
from safeagent._verify import (
    _ACTOR,
    _AT,
    _DETAIL,
    _ID,
    _KIND,
    _NAMESPACE,
    _SEQ,
    _SUBJECT,
    Problem,
    _Trail,
    shard_named,
)
from safeagent._verify_receipts import _TRIES, _busy, _parsed, _snapshot_reader
from safeagent.errors import ConfigurationError
from safeagent.stores._as_stored import Unreadable, case_rows

# -- cases and signals (the finality gate) --------------------------------------------------

_CASE_KINDS = frozenset({EventKind.SIGNAL.value, EventKind.STATE_CHANGE.value})
_OPEN = CaseState.OPEN.value
_PROVISIONAL = CaseState.RESOLVED_PROVISIONAL.value
_RECONCILIATION = CaseState.IN_RECONCILIATION.value
_FINAL = CaseState.FINAL.value
_SETTLED = CaseState.SETTLED.value
_RESOLVABLE = frozenset({_PROVISIONAL, _RECONCILIATION})
_BEFORE_FINAL = _RESOLVABLE | {_OPEN}
_AUTOMATIC = _RESOLVABLE | {_FINAL}
_MAX_FINDINGS = 4

_CaseEvent = tuple[Any, Any, Any, Any, Any, Any]
"""A case event as verification reads it: (kind, actor, at_ms, detail (parsed; None if
unreadable), seq (None when read again by subject), event id)."""

_SignalRow = tuple[Any, Any, Any, Any, Any]
"""(source, outcome, confidence, at_ms, status) of a signal row, or what its event says."""


@dataclass(slots=True)
class _CaseHistory:
    """What the chained events of one case say its row and its signal rows hold, replayed
    in order (stores._base.case_events, state_change_event and settled_event write them):

    - a ``state_change`` from nothing to OPEN opens the case: version 1, created then;
    - a ``signal`` not late is one change of the row (version + 1, updated then), with
      the automatic transitions right after it in the same transaction (``state_change``
      events without ``by``, to RESOLVED_PROVISIONAL, IN_RECONCILIATION or FINAL); it
      makes its source's earlier live signal ``replaced``; a late one (after FINAL)
      changes nothing but its own row;
    - a ``state_change`` with ``by`` is an operator's resolution, one to SETTLED a
      settlement: each one change of the row.

    The case keeps a provisional outcome only while RESOLVED_PROVISIONAL, and an outcome
    only from FINAL on. ``broken`` is the first event that contradicts the history before
    it: the writer then read a case or signals other than its events left, so they were
    edited in between."""

    policy: ConsensusPolicy | None
    """The case's stored policy, to replay the consensus with (None: no row, or an
    invalid policy)."""
    state: str | None = None
    provisional: Any = None
    outcome: Any = None
    resolved_by: Any = None
    version: int = 0
    created_at: Any = None
    updated_at: Any = None
    signals: list[list[Any]] = field(default_factory=list)
    """[source, outcome, confidence, at_ms, status, seq, event id] per signal event."""
    live: dict[Any, int] = field(default_factory=dict)
    """source -> index in ``signals`` of its live signal."""
    live_signals: dict[Any, Signal | None] = field(default_factory=dict)
    """source -> its live signal, built once for the consensus replay (None: a signal
    with a confidence no gate writes, which stops the replay)."""
    broken: str | None = None
    broken_at: tuple[Any, Any] = (None, None)
    last_at: tuple[Any, Any] = (None, None)
    opened_with: tuple[Any, Any] | None = None
    """(threshold, quorum) its opening event recorded (None: an opening written before
    openings recorded the policy)."""
    unreadable: bool = False
    """An event holds what no gate writes (unreadable detail, fields of other types):
    ``broken`` says which, and the rest is not replayed."""
    _tx: list[Any] | None = None
    """The signal transaction being read: [where, transitions expected (None: not
    replayed), transitions seen]."""

    def feed(self, event: _CaseEvent) -> None:
        kind, actor, at_ms, detail, seq, event_id = event
        self.last_at = (seq, event_id)
        if kind == EventKind.SIGNAL.value:
            if isinstance(detail, dict) and _written_by_a_gate(detail):
                self._signal(actor, at_ms, detail)
                return
        elif isinstance(detail, dict):
            self._state_change(at_ms, detail)
            return
        self.unreadable = True
        self._contradiction(
            f"event {event_id} ({kind}) holds a detail no gate writes (unreadable, or "
            "fields of other types)"
        )

    def _state_change(self, at_ms: Any, detail: dict[str, Any]) -> None:
        frm, to, outcome = detail.get("from"), detail.get("to"), detail.get("outcome")
        if frm is None:
            self._close()
            if to != _OPEN or self.state is not None:
                self._contradiction(
                    f"it was opened ({to}) again, though its events left it {self.state}: "
                    "it was deleted before"
                )
            self.state, self.version, self.created_at, self.updated_at = to, 1, at_ms, at_ms
            self.provisional = self.outcome = self.resolved_by = None
            if "threshold" in detail and "quorum" in detail:  # written since policies are
                self.opened_with = (detail["threshold"], detail["quorum"])
            return
        if "by" not in detail and to in _AUTOMATIC and self._tx is not None:
            self._tx[2].append((to, outcome))
            if frm != self.state:
                self._contradiction(
                    f"a signal moved it from {frm}, though its events left it {self.state}: "
                    "it was edited before that signal"
                )
            self._move(to, outcome)
            return
        self._close()
        if "by" in detail:  # an operator's resolution (apply_resolution)
            if to != _FINAL or frm != self.state or frm not in _RESOLVABLE:
                self._contradiction(
                    f"an operator resolved it from {frm} to {to}, though its events left it "
                    f"{self.state}: it was edited before that resolution"
                )
            self.resolved_by = detail["by"]
        elif to == _SETTLED:
            if frm != _FINAL or self.state != _FINAL:
                self._contradiction(
                    f"it was settled from {frm}, though its events left it {self.state}: it "
                    "was edited before the settlement (which then ran)"
                )
            elif outcome != self.outcome:
                self._contradiction(
                    f"it was settled with outcome {outcome!r}, though it went FINAL with "
                    f"{self.outcome!r}: its outcome was edited before the settlement"
                )
        else:
            self._contradiction(f"a transition {frm} -> {to} that no signal caused")
        self._move(to, outcome)
        self.version += 1
        self.updated_at = at_ms

    def _signal(self, source: Any, at_ms: Any, detail: dict[str, Any]) -> None:
        self._close()
        outcome, confidence, late = detail["outcome"], detail["confidence"], detail["late"]
        where = self.last_at
        index = len(self.signals)
        self.signals.append(
            [source, outcome, confidence, at_ms, "late" if late else "live", *where]
        )
        if self.state is None:
            self._contradiction(f"a signal of {source!r} came before the case was opened")
            return
        after_final = self.state in (_FINAL, _SETTLED)
        if bool(late) != after_final:
            self._contradiction(
                f"the signal of {source!r} was taken as {'late' if late else 'live'}, "
                f"though its events left the case {self.state}: it was edited before that "
                "signal"
            )
        if late:
            return
        before = self.live.get(source)
        seen = None if before is None else tuple(self.signals[before][1:3])
        replaced = detail.get("replaced")
        recorded = (
            (replaced.get("outcome"), replaced.get("confidence"))
            if isinstance(replaced, dict)
            else replaced
        )
        if recorded != seen:
            self._contradiction(
                f"the signal of {source!r} replaced a live one holding {recorded}, though "
                f"its events left {seen}: the signals were edited"
            )
        try:
            signal: Signal | None = Signal(source, outcome, float(confidence))
        except (TypeError, ValueError, ArithmeticError, RecursionError):
            signal = None  # a confidence no gate writes: nothing to replay from here
        self._tx = [where, self._consensus(signal), []]
        if before is not None:
            self.signals[before][4] = "replaced"
        self.live[source] = index
        self.live_signals[source] = signal
        self.version += 1
        self.updated_at = at_ms

    def _consensus(self, signal: Signal | None) -> Any:
        """The transitions the case's policy gives for ``signal``, over the live signals
        the events record (apply_signal), or None when that cannot be replayed."""
        if self.policy is None or self.broken is not None or self.state not in _BEFORE_FINAL:
            return None
        live = list(self.live_signals.values())
        if signal is None or any(s is None for s in live):
            return None
        try:
            case = CaseRow(
                "", "", CaseState(self.state), self.provisional, None,
                self.policy.threshold, self.policy.quorum, self.version, 0, 0,
            )  # fmt: skip
            change = apply_signal(case, cast(list[Signal], live), signal)
        except (TypeError, ValueError, ArithmeticError, RecursionError):
            return None  # a state or confidence no gate writes: nothing to replay
        return [
            (to.value, change.outcome if to is CaseState.FINAL else change.provisional_outcome)
            for to in change.path
        ]

    def _close(self) -> None:
        """The end of a signal's transaction: its transitions must be the policy's."""
        tx, self._tx = self._tx, None
        if tx is None or tx[1] is None or tx[1] == tx[2]:
            return
        saved, self.last_at = self.last_at, tx[0]
        self._contradiction(
            f"a signal led to {_path(tx[2])}, but its stored policy (threshold "
            f"{self.policy.threshold if self.policy else None}, quorum "
            f"{self.policy.quorum if self.policy else None}) over the signals its events "
            f"record gives {_path(tx[1])}: the policy or the live signals were edited"
        )
        self.last_at = saved

    def _move(self, to: Any, outcome: Any) -> None:
        """Where the events say the case went (after a contradiction too, so the row is
        compared with its last events)."""
        self.state = to
        self.provisional = outcome if to == _PROVISIONAL else None
        self.outcome = outcome if to in (_FINAL, _SETTLED) else None

    def _contradiction(self, what: str) -> None:
        if self.broken is None:
            self.broken, self.broken_at = what, self.last_at

    def finish(self) -> None:
        self._close()


def _written_by_a_gate(detail: dict[str, Any]) -> bool:
    """A signal event's fields of the types the gate writes (stores._base.case_events)."""
    confidence, replaced = detail.get("confidence"), detail.get("replaced")
    return (
        isinstance(detail.get("outcome"), str)
        and isinstance(confidence, (int, float))
        and not isinstance(confidence, bool)
        and isinstance(detail.get("late"), bool)
        and (replaced is None or isinstance(replaced, dict))
    )


def _path(transitions: list[tuple[Any, Any]]) -> str:
    if not transitions:
        return "no transition"
    return ", ".join(f"{to}" + (f" {outcome!r}" if outcome else "") for to, outcome in transitions)


def _history(events: list[_CaseEvent], row: CaseRow | None) -> _CaseHistory:
    """The replayed history of one case's events, up to one no gate writes."""
    policy = None
    if row is not None:
        try:
            policy = row.policy
        except ConfigurationError:
            policy = None
    history = _CaseHistory(policy)
    for event in events:
        history.feed(event)
        if history.unreadable:
            return history
    history.finish()
    return history


def _judge_case(
    row: CaseRow | None,
    signals: list[tuple[Signal, str]],
    events: list[_CaseEvent],
    legacy: bool,
) -> tuple[str, list[str], tuple[Any, Any]] | None:
    """("ok" | "unverified" | "wrong", findings, (seq, event id) to name) for one case,
    or None when there is nothing to check."""
    if legacy:
        return "unverified", [], (None, None)
    if row is None and not events and not signals:
        return None
    history = _history(events, row)
    findings: list[str] = []
    where = history.last_at
    if history.broken is not None:
        findings.append(history.broken)
        where = history.broken_at
    if history.unreadable:
        return "wrong", findings, where
    if row is not None:
        try:
            row.policy  # noqa: B018 - raises for a policy no gate accepts
        except ConfigurationError:
            findings.append(
                f"its policy (threshold {row.threshold!r}, quorum {row.quorum!r}) is not one "
                "any gate opens a case with"
            )
        opened = history.opened_with
        if opened is not None and (row.threshold, row.quorum) != opened:
            findings.append(
                f"its policy is threshold {row.threshold!r}, quorum {row.quorum!r}, though it "
                f"was opened with threshold {opened[0]!r}, quorum {opened[1]!r}"
            )
    if history.state is None:
        if row is not None:
            findings.append(
                f"no chained event records its opening or any change to it, though every "
                f"gate write appends them in the same transaction: a {row.state.value} case "
                "written behind the gate's back"
            )
    elif row is None:
        findings.append(f"the case is gone, though its events left it {history.state}")
    else:
        findings += _case_differences(row, history)
    findings += _signal_differences(signals, history)
    return ("wrong" if findings else "ok"), findings, where


def _case_differences(row: CaseRow, history: _CaseHistory) -> list[str]:
    expected = {
        "state": history.state,
        "outcome": history.outcome if history.state in (_FINAL, _SETTLED) else None,
        "provisional outcome": history.provisional if history.state == _PROVISIONAL else None,
        "resolver": history.resolved_by,
        "version": history.version,
        "created_at_ms": history.created_at,
        "updated_at_ms": history.updated_at,
    }
    stored = {
        "state": row.state.value,
        "outcome": row.outcome,
        "provisional outcome": row.provisional_outcome,
        "resolver": row.resolved_by,
        "version": row.version,
        "created_at_ms": row.created_at_ms,
        "updated_at_ms": row.updated_at_ms,
    }
    return [
        f"its {name} is {stored[name]!r}, though its events left {expected[name]!r}"
        for name in expected
        if stored[name] != expected[name]
    ]


def _signal_differences(signals: list[tuple[Signal, str]], history: _CaseHistory) -> list[str]:
    """The signal rows (in id order) against the signal events (in chain order): equal, or
    what is forged, gone or edited."""
    stored: list[_SignalRow] = [
        (s.source, s.outcome, s.confidence, s.at_ms, status) for s, status in signals
    ]
    expected: list[_SignalRow] = [(e[0], e[1], e[2], e[3], e[4]) for e in history.signals]
    if stored == expected:
        return []
    extra = Counter(stored) - Counter(expected)
    missing = Counter(expected) - Counter(stored)
    if not extra and not missing:
        return ["its signal rows are in another order than their events"]
    found: list[str] = []
    by_place: dict[tuple[Any, Any], list[_SignalRow]] = {}
    for signal in missing.elements():
        by_place.setdefault((signal[0], signal[3]), []).append(signal)
    for signal in extra.elements():
        same = by_place.get((signal[0], signal[3]))
        if same:
            was = same.pop()
            found.append(
                f"the signal of {signal[0]!r} at {signal[3]} holds {_shown(signal)}, though "
                f"its event recorded {_shown(was)}"
            )
        else:
            found.append(
                f"a signal row of {signal[0]!r} ({_shown(signal)}, at {signal[3]}) that no "
                "chained event records: forged"
            )
    for rest in by_place.values():
        found += [
            f"the signal of {s[0]!r} at {s[3]} ({_shown(s)}) is gone, though its event remains"
            for s in rest
        ]
    return found


def _shown(signal: _SignalRow) -> str:
    return f"{signal[1]!r} at confidence {signal[2]!r}, {signal[4]}"


def _case_events(rows: list[tuple[Any, ...]]) -> dict[tuple[Any, Any], list[_CaseEvent]]:
    """(namespace, case id) -> its trusted case events, in chain order."""
    found: dict[tuple[Any, Any], list[_CaseEvent]] = {}
    for row in rows:
        if row[_KIND] not in _CASE_KINDS:
            continue
        try:
            detail = json.loads(row[_DETAIL])
        except (ValueError, TypeError, RecursionError):
            detail = None
        found.setdefault((row[_NAMESPACE], row[_SUBJECT]), []).append(
            (row[_KIND], row[_ACTOR], row[_AT], detail, row[_SEQ], row[_ID])
        )
    return found


def _check_cases(store: Any, trail: _Trail, problems: list[Problem]) -> tuple[int, int, int]:
    """Compare every case row and its signal rows with what the case's trusted events
    say (:class:`_CaseHistory`). Returns (cases checked, cases unverified, signals
    checked). Rows and events are read apart, so a case that looks wrong is read again,
    rows and events together, before it is reported."""
    if not hasattr(store, "cases"):
        return 0, 0, 0
    by_case = _case_events(trail.trusted)
    try:  # row by row: a row no release writes is reported, and the others still checked
        found = case_rows(store)
    except (ValueError, RecursionError) as exc:  # a store that cannot be read row by row
        problems.append(Problem("case_edited", -1, None, None, f"a case row cannot be read: {exc}"))
        return 0, 0, 0
    rows: dict[tuple[Any, Any], CaseRow] = {}
    checked = unverified = signals_checked = 0
    unreadable: set[tuple[Any, Any]] = set()
    for r in found:
        if isinstance(r, Unreadable):
            key = (r.key[0], r.key[1])  # as stored: a described value could be a real id
            unreadable.add(key)
            checked += 1
            problems.append(_unreadable_case(key, r.problem, by_case.get(key, []), trail.chains))
        else:
            rows[(r.namespace, r.case_id)] = r
    for key in (rows.keys() | by_case.keys()) - unreadable:
        namespace, case_id = key
        # A case opened in the chains is judged on its chained events, whatever rows
        # outside them claim to be its history from before the chains.
        legacy = key in trail.legacy_keys and not _opened_in_chains(by_case.get(key, []))
        signals: list[Any] = []  # as read, if they could be
        try:
            signals = [] if legacy else store.case_signals(namespace, case_id)
            verdict = _judge_case(rows.get(key), signals, by_case.get(key, []), legacy)
            if verdict is not None and verdict[0] == "wrong":
                seqs = {e[5]: e[4] for e in by_case.get(key, [])}
                again = _read_case_again(store, namespace, case_id, trail.untrusted, seqs)
                if again is None:
                    problems.append(_busy("case", key, _TRIES, trail.chains))
                    continue
                row, signals, events = again
                verdict = _judge_case(row, signals, events, legacy)
        # metadata that is not JSON (or nests past the recursion limit), a state no
        # release writes
        except (ValueError, RecursionError) as exc:
            verdict = "wrong", [f"its rows cannot be read: {exc}"], (None, None)
        if verdict is None:
            continue
        status, findings, (seq, event_id) = verdict
        if status == "unverified":
            unverified += 1
            continue
        checked += 1
        signals_checked += len(signals)
        if findings:
            shown = findings[:_MAX_FINDINGS]
            if len(findings) > _MAX_FINDINGS:
                shown.append(f"and {len(findings) - _MAX_FINDINGS} more")
            problems.append(
                Problem(
                    "case_edited",
                    shard_named(namespace, case_id, trail.chains),
                    seq,
                    event_id,
                    f"case {case_id!r} ({namespace}): " + "; ".join(shown),
                )
            )
    return checked, unverified, signals_checked


def _unreadable_case(
    key: tuple[Any, Any], problem: str, events: list[_CaseEvent], chains: int
) -> Problem:
    """The ``case_edited`` of a case row no release writes (a state ``CaseState``
    refuses), placed at the case's last chained event if it has one."""
    seq, event_id = (events[-1][4], events[-1][5]) if events else (None, None)
    return Problem(
        "case_edited",
        shard_named(key[0], key[1], chains),
        seq,
        event_id,
        f"case {key[1]!r} ({key[0]}): its row cannot be read: {problem}",
    )


def _opened_in_chains(events: list[_CaseEvent]) -> bool:
    """Whether a chained event opened the case (a ``state_change`` from nothing)."""
    return any(
        e[0] == EventKind.STATE_CHANGE.value
        and isinstance(e[3], dict)
        and "from" in e[3]
        and e[3]["from"] is None
        for e in events
    )


def _read_case_again(
    store: Any, namespace: str, case_id: str, untrusted: set[Any], seqs: dict[Any, Any]
) -> tuple[CaseRow | None, list[tuple[Signal, str]], list[_CaseEvent]] | None:
    """The case, its signals and its events, read together; None if they never held
    still. A store with a snapshot read (SQLite, PostgreSQL: :func:`_snapshot_reader`)
    reads them in one. Any other is read case and signals, events, case and signals,
    until the case and its signals are the same before and after the events (every write
    to a case raises its version or adds a signal row, so nothing changed it in between),
    at most :data:`_TRIES` times. Events the first read found outside the chains
    (``untrusted``) are left out; ``seqs`` gives the seq of those it found in the chains."""
    snapshot = _snapshot_reader(store)
    if snapshot is not None:
        _, row, signals, rows = snapshot(namespace, case_id)
        events = []
        for event_id, at_ms, kind, _, _, _, actor, _, _, detail in rows:  # EVENT_COLUMNS
            if event_id not in untrusted and kind in _CASE_KINDS:
                events.append((kind, actor, at_ms, _parsed(detail), seqs.get(event_id), event_id))
        return row, signals, events
    row = store.get_case(namespace, case_id)[0]
    signals = store.case_signals(namespace, case_id)
    for _ in range(_TRIES):
        events = [
            (e.kind.value, e.actor, e.at_ms, e.detail, seqs.get(e.id), e.id)
            for e in store.events(namespace=namespace, subject=case_id)
            if e.id not in untrusted and e.kind.value in _CASE_KINDS
        ]
        after = store.get_case(namespace, case_id)[0]
        after_signals = store.case_signals(namespace, case_id)
        if (after, after_signals) == (row, signals):
            return row, signals, events
        row, signals = after, after_signals
    return None
