"""A seeded simulation of AI agents deciding refund requests through the finality gate.

    python examples/simulate_ai.py                      # 200 cases, 4 agents, seed 42
    python examples/simulate_ai.py --seed 7 --cases 50 --agents 5 --change-mind 0.3

Each case is a refund request with a hidden *true* outcome (``approve`` or ``deny``).
``--agents`` agents each send one signal per case: the true outcome, or with probability
``--disagreement`` the other one, at a confidence drawn uniformly from
``[--confidence-low, --confidence-high]``. With probability ``--change-mind`` an agent later
changes its mind on a case: it replaces its signal with the other outcome at a new
confidence. All these signals arrive in one random interleaving, cut into ``--bursts``
bursts. The gate's policy is ``ConsensusPolicy(--threshold, --quorum)`` (docs/design.md section 4).

After every burst the simulation asks to settle *every* case: a case that is not FINAL
must refuse (``NotFinalError``) and run nothing; a FINAL case runs its side effect once;
a SETTLED one replays its stored receipt. Once all signals are in, cases still in
IN_RECONCILIATION, or RESOLVED_PROVISIONAL without consensus, go to an operator.

The operator's rule: pick the outcome with the highest consensus score among the case's
live signals (the confidence-weighted majority, summed exactly: confidences are drawn to
two decimals); on an exact tie, ``deny`` (when in doubt, do not pay). The operator does
not know the true outcome, so an operator resolution can be wrong; the summary shows how
often.

The side effect (``apply_refund_decision``) writes one row to an effect ledger, a SQLite
file in a temporary directory separate from the guard's database, recording the case's
state as the gate reports it *while the side effect runs*. The proofs at the end read that
ledger: every row saw FINAL, no case has two rows, one row per settled case, and every
case ended SETTLED. The exit status is non-zero if any proof fails.

The guard database is the default one (``$SAFEAGENT_DB``, else ``./safeagent.db``) unless
``--db`` names another. Every run uses a fresh namespace (``sim-<uuid>``), so runs never
collide on that file, while the case ids (``refund-0001``...) and the printed output
depend on the seed alone: the same seed prints the same report. ``--verbose`` adds the
namespace, paths and timing, which differ from run to run.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from safeagent import (
    CaseState,
    ConsensusPolicy,
    ExecutionContext,
    FinalityGate,
    Guard,
    NotFinalError,
)
from safeagent.errors import ConfigurationError

OUTCOMES = ("approve", "deny")
SAFE_DEFAULT = "deny"  # the operator's choice on an exact tie
ACTION = "apply_refund_decision"
OPERATOR = "operator"
BEFORE_FINAL = {None, CaseState.OPEN, CaseState.RESOLVED_PROVISIONAL, CaseState.IN_RECONCILIATION}


def other(outcome: str) -> str:
    return OUTCOMES[1] if outcome == OUTCOMES[0] else OUTCOMES[0]


# -- the effect ledger: a separate SQLite file -----------------------------------------------


class Ledger:
    """Where the side effect lands: one row per execution, no uniqueness constraint, so a
    second execution would show up as a second row instead of being hidden."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path)
        self.conn.execute(
            "CREATE TABLE effects (seq INTEGER PRIMARY KEY, case_id TEXT NOT NULL,"
            " effect TEXT NOT NULL, outcome TEXT NOT NULL, observed_state TEXT,"
            " observed_outcome TEXT, downstream_key TEXT NOT NULL, checkpoint TEXT NOT NULL)"
        )
        self.conn.commit()

    def write(
        self,
        case_id: str,
        outcome: str,
        observed: tuple[str | None, str | None],
        downstream_key: str,
        checkpoint: str,
    ) -> int:
        effect = "refund_issued" if outcome == "approve" else "denial_sent"
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO effects (case_id, effect, outcome, observed_state,"
                " observed_outcome, downstream_key, checkpoint) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (case_id, effect, outcome, observed[0], observed[1], downstream_key, checkpoint),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def count(self, case_id: str | None = None) -> int:
        if case_id is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM effects").fetchone()[0])
        row = self.conn.execute("SELECT COUNT(*) FROM effects WHERE case_id = ?", (case_id,))
        return int(row.fetchone()[0])

    def rows(self) -> list[tuple[str, str, str | None, str | None]]:
        return self.conn.execute(
            "SELECT case_id, outcome, observed_state, observed_outcome FROM effects ORDER BY seq"
        ).fetchall()

    def close(self) -> None:
        self.conn.close()


# -- an independent model of docs/design.md section 4, to cross-check the gate ----------------


@dataclass
class Referee:
    """What docs/design.md section 4 says the case's state should be after each signal, computed
    here from scratch (exact rational scores), compared with what the gate returns."""

    policy: ConsensusPolicy
    state: CaseState | None = None
    provisional: str | None = None
    outcome: str | None = None
    live: dict[str, tuple[str, float]] = field(default_factory=dict)

    def winner(self) -> str | None:
        n = len(self.live)
        sums: dict[str, Fraction] = {}
        voters: Counter[str] = Counter()
        for outcome, conf in self.live.values():
            sums[outcome] = sums.get(outcome, Fraction(0)) + Fraction(conf)
            if conf > 0:
                voters[outcome] += 1
        for o, total in sums.items():
            score = total / n
            if (
                score >= Fraction(self.policy.threshold)
                and voters[o] >= self.policy.quorum
                and all(score > t / n for p, t in sums.items() if p != o)
            ):
                return o
        return None

    def signal(self, source: str, outcome: str, confidence: float) -> None:
        if self.state in (CaseState.FINAL, CaseState.SETTLED):
            return  # late: recorded and ignored
        self.live[source] = (outcome, confidence)
        outcomes = {o for o, _ in self.live.values()}
        agreed = next(iter(outcomes)) if len(outcomes) == 1 else None
        if self.state is None or self.state is CaseState.OPEN:
            self.state = CaseState.RESOLVED_PROVISIONAL if agreed else CaseState.IN_RECONCILIATION
            self.provisional = agreed
        elif self.state is CaseState.RESOLVED_PROVISIONAL and agreed != self.provisional:
            self.state = CaseState.IN_RECONCILIATION
            self.provisional = None
        won = self.winner()
        if won is not None:
            self.state, self.outcome = CaseState.FINAL, won


# -- the simulation ----------------------------------------------------------------------------


@dataclass
class Tallies:
    signals: int = 0
    replacements: int = 0
    late: int = 0
    model_mismatches: list[str] = field(default_factory=list)
    refused: int = 0
    refused_ran_something: int = 0
    ran: int = 0
    replayed: int = 0
    replay_ran_something: int = 0
    ran_not_once: int = 0
    per_checkpoint: list[tuple[str, int, int, int]] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="A seeded simulation of AI agents deciding cases through the finality gate."
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cases", type=int, default=200, metavar="N")
    p.add_argument("--agents", type=int, default=4, metavar="K")
    p.add_argument(
        "--disagreement",
        type=float,
        default=0.15,
        metavar="RATE",
        help="probability an agent votes against the true outcome",
    )
    p.add_argument("--confidence-low", type=float, default=0.55)
    p.add_argument("--confidence-high", type=float, default=0.95)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--quorum", type=int, default=3)
    p.add_argument(
        "--change-mind",
        type=float,
        default=0.1,
        metavar="RATE",
        help="probability an agent later replaces its signal on a case",
    )
    p.add_argument(
        "--bursts",
        type=int,
        default=8,
        help="signal bursts; every case is asked to settle after each",
    )
    p.add_argument(
        "--db",
        default=None,
        metavar="PATH",
        help="guard database (default: $SAFEAGENT_DB, else ./safeagent.db)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="also print the run's namespace, paths and timing"
    )
    args = p.parse_args(argv)
    if args.cases < 1 or args.agents < 1 or args.bursts < 1:
        p.error("--cases, --agents and --bursts must be >= 1")
    for name in ("disagreement", "change_mind", "confidence_low", "confidence_high"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.confidence_low > args.confidence_high:
        p.error("--confidence-low must not exceed --confidence-high")
    try:
        args.policy = ConsensusPolicy(threshold=args.threshold, quorum=args.quorum)
    except ConfigurationError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    rng = random.Random(args.seed)
    namespace = f"sim-{uuid.uuid4().hex}"  # unique per run, never printed without --verbose
    case_ids = [f"refund-{i:04d}" for i in range(1, args.cases + 1)]
    agents = [f"agent-{k}" for k in range(1, args.agents + 1)]
    truth = {c: rng.choice(OUTCOMES) for c in case_ids}

    # One token per (case, agent) signal, plus one more for each change of mind; shuffled.
    # An agent's first token on a case is its first signal, the second one its change of mind.
    tokens = [(c, a) for c in case_ids for a in agents]
    tokens += [t for t in list(tokens) if rng.random() < args.change_mind]
    rng.shuffle(tokens)
    size = -(-len(tokens) // args.bursts)
    bursts = [tokens[i : i + size] for i in range(0, len(tokens), size)]

    tmp = tempfile.TemporaryDirectory(prefix="safeagent-sim-")
    ledger = Ledger(Path(tmp.name) / "effects.db")
    guard = Guard(args.db, namespace=namespace)
    gate = FinalityGate(guard, policy=args.policy)
    db_path = getattr(guard.store, "path", "?")
    print(f"guard database: {db_path}  namespace: {namespace}", file=sys.stderr)

    t = Tallies()
    votes: dict[tuple[str, str], str] = {}
    referees = {c: Referee(args.policy) for c in case_ids}
    checkpoint = ""

    def side_effect(outcome: str, ctx: ExecutionContext) -> dict[str, object]:
        case_id = ctx.payload["case_id"]
        seen = gate.get(case_id)  # the state the gate reports while the side effect runs
        observed = (None, None) if seen is None else (seen.state.value, seen.outcome)
        seq = ledger.write(case_id, outcome, observed, ctx.downstream_key, checkpoint)
        return {"ledger_seq": seq, "outcome": outcome}

    def settle_all(label: str) -> None:
        nonlocal checkpoint
        checkpoint = label
        ran = refused = replayed = 0
        for case_id in case_ids:
            before = ledger.count(case_id)
            try:
                receipt = gate.settle(case_id, ACTION, side_effect)
            except NotFinalError as exc:
                refused += 1
                if exc.state not in BEFORE_FINAL or ledger.count(case_id) != before:
                    t.refused_ran_something += 1
                continue
            after = ledger.count(case_id)
            if receipt.replay:
                replayed += 1
                t.replay_ran_something += after != before
            else:
                ran += 1
                t.ran_not_once += after != 1
        t.refused += refused
        t.ran += ran
        t.replayed += replayed
        t.per_checkpoint.append((label, ran, refused, replayed))

    def send(case_id: str, agent: str, outcome: str, confidence: float, revision: int) -> None:
        case = gate.signal(case_id, agent, outcome, confidence, metadata={"revision": revision})
        ref = referees[case_id]
        late = ref.state in (CaseState.FINAL, CaseState.SETTLED)
        ref.signal(agent, outcome, confidence)
        t.signals += 1
        t.late += late
        if late:  # recorded and ignored: the case keeps its state and outcome
            agrees = case.state in (CaseState.FINAL, CaseState.SETTLED)
        else:
            agrees = case.state is ref.state
        if not agrees or (ref.state is CaseState.FINAL and case.outcome != ref.outcome):
            t.model_mismatches.append(
                f"{case_id} after {agent}->{outcome}@{confidence}: gate {case.state.value}"
                f"/{case.outcome}, model {ref.state}/{ref.outcome}"
            )

    # -- signals, burst by burst, each followed by a settle attempt on every case ----------
    for number, burst in enumerate(bursts, 1):
        for case_id, agent in burst:
            key = (case_id, agent)
            confidence = round(rng.uniform(args.confidence_low, args.confidence_high), 2)
            if key not in votes:
                wrong = rng.random() < args.disagreement
                votes[key] = other(truth[case_id]) if wrong else truth[case_id]
                send(case_id, agent, votes[key], confidence, 1)
            else:  # a change of mind: replace the signal with the other outcome
                votes[key] = other(votes[key])
                t.replacements += 1
                send(case_id, agent, votes[key], confidence, 2)
        settle_all(f"burst {number}")
    settle_all("all signals in")

    # -- the operator resolves what consensus did not ---------------------------------------
    resolved_from: Counter[str] = Counter()
    for case_id in case_ids:
        case = gate.get(case_id)
        assert case is not None
        if case.state in (CaseState.IN_RECONCILIATION, CaseState.RESOLVED_PROVISIONAL):
            # Confidences are drawn to two decimals: sum them exactly, in hundredths.
            weight: Counter[str] = Counter()
            for sig in case.signals:
                weight[sig.outcome] += round(sig.confidence * 100)
            best = max(weight.values())
            leaders = sorted(o for o, w in weight.items() if w == best)
            choice = leaders[0] if len(leaders) == 1 else SAFE_DEFAULT
            why = "majority of live signals" if len(leaders) == 1 else "tie: safe default"
            resolved_from[case.state.value] += 1
            gate.resolve(
                case_id, choice, by=OPERATOR, reason=f"no consensus under {args.policy}; {why}"
            )
    settle_all("after operator")

    # -- what happened, from the gate and its audit trail ------------------------------------
    final_cases = {c: gate.get(c) for c in case_ids}
    reconciled = auto = auto_after_recon = by_operator = 0
    match_auto = match_operator = 0
    for case_id, case in final_cases.items():
        assert case is not None
        events = guard.audit_trail(case_id)
        went_to_recon = any(
            e.kind == "state_change" and e.detail.get("to") == "IN_RECONCILIATION" for e in events
        )
        reconciled += went_to_recon
        hit = case.outcome == truth[case_id]
        if case.resolved_by is None:
            auto += 1
            auto_after_recon += went_to_recon
            match_auto += hit
        else:
            by_operator += 1
            match_operator += hit
    states = Counter(c.state.value for c in final_cases.values() if c is not None)
    final_outcome = {c: None if k is None else k.outcome for c, k in final_cases.items()}
    settled = states.get(CaseState.SETTLED.value, 0)

    # -- proofs, from the effect ledger -----------------------------------------------------
    rows = ledger.rows()
    per_case = Counter(r[0] for r in rows)
    proofs = [
        (
            "no side effect ran before FINAL (every ledger row saw FINAL)",
            all(r[2] == CaseState.FINAL.value and r[3] == r[1] for r in rows) and len(rows) > 0,
        ),
        (
            "refused settle attempts ran nothing",
            t.refused_ran_something == 0 and t.replay_ran_something == 0,
        ),
        (
            "no side effect ran twice (<= 1 ledger row per case)",
            all(n == 1 for n in per_case.values()) and t.ran_not_once == 0,
        ),
        ("ledger rows == settled cases == executions", len(rows) == settled == t.ran),
        ("every case ended SETTLED", settled == args.cases),
        (
            "settled outcome == ledger outcome for every case",
            all(final_outcome[c] == o for c, o, _, _ in rows),
        ),
        (
            "gate matched an independent model of docs/design.md section 4 after every signal",
            not t.model_mismatches,
        ),
    ]

    n = args.cases
    print(f"SafeAgent finality-gate simulation (seed {args.seed})")
    print(
        f"  {n} refund cases, {args.agents} agents, disagreement {args.disagreement}, "
        f"confidence [{args.confidence_low}, {args.confidence_high}], "
        f"change of mind {args.change_mind}"
    )
    print(
        f"  policy: threshold {args.policy.threshold}, quorum {args.policy.quorum}; "
        f"{len(bursts)} signal bursts"
    )
    print()
    print(f"signals sent                      {t.signals:5d}")
    print(f"  changes of mind (2nd signals)   {t.replacements:5d}")
    print(f"  late (after FINAL, ignored)     {t.late:5d}")
    print()
    print(f"cases auto-finalized by consensus {auto:5d}")
    print(f"  of which after reconciliation   {auto_after_recon:5d}")
    print(f"cases that went to reconciliation {reconciled:5d}")
    print(
        f"cases resolved by an operator     {by_operator:5d}"
        f"  (from IN_RECONCILIATION {resolved_from['IN_RECONCILIATION']}, "
        f"RESOLVED_PROVISIONAL {resolved_from['RESOLVED_PROVISIONAL']})"
    )
    print(f"cases settled                     {settled:5d} / {n}")
    print()
    print("settle attempts        ran  refused  replayed")
    for label, ran, refused, replayed in t.per_checkpoint:
        print(f"  {label:<18} {ran:5d}  {refused:7d}  {replayed:8d}")
    print(f"  {'total':<18} {t.ran:5d}  {t.refused:7d}  {t.replayed:8d}")
    print(f"settle attempts refused as not final: {t.refused}")
    print()

    def pct(a: int, b: int) -> str:
        return f"{a}/{b} ({100 * a / b:.1f}%)" if b else "0/0"

    print("final outcome == true outcome")
    print(f"  auto-finalized   {pct(match_auto, auto)}")
    print(f"  operator         {pct(match_operator, by_operator)}")
    print(f"  all cases        {pct(match_auto + match_operator, n)}")
    print()
    print("proofs")
    for text, ok in proofs:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    for line in t.model_mismatches[:10]:
        print(f"    mismatch: {line}")
    ok = all(ok for _, ok in proofs)
    print(f"RESULT: {'ok' if ok else 'FAILED'}")
    if args.verbose:
        print()
        print(f"namespace:      {namespace}")
        print(f"guard database: {db_path}")
        print(f"effect ledger:  {ledger.path}")
        print(f"elapsed:        {time.monotonic() - started:.2f} s")
    guard.close()
    ledger.close()
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
