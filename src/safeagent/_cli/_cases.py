"""Decisions of the finality gate: ``cases list|show|signal|resolve``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from safeagent import (
    Case,
    CaseState,
    ConsensusPolicy,
    EventKind,
    FinalityGate,
    Guard,
    MemoryStore,
)
from safeagent._cli import _rows as rows_lib
from safeagent._cli._common import (
    DEFAULT_NAMESPACE,
    DEFAULT_SCHEMA,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_STORE,
    EXIT_USAGE,
    CliError,
    DbOpt,
    JsonOpt,
    NsFilterOpt,
    NsOpt,
    SchemaOpt,
    UrlOpt,
    cli_command,
    compact,
    iso,
    opened,
    out_console,
    parse_json,
    print_json,
    print_pairs,
    print_table,
    receipt_dict,
    resolve_target,
    status_text,
    stored_iso,
    warn_unreadable,
)
from safeagent._gate import _check_case_id
from safeagent._keys import check_name
from safeagent._policy import CASE_PREFIX
from safeagent.errors import ConfigurationError
from safeagent.stores._as_stored import Unreadable

cases_app = typer.Typer(
    help="Decisions of the finality gate.", no_args_is_help=True, epilog=EXIT_CODES
)


# -- cases -----------------------------------------------------------------------------------


def _checking_gate() -> FinalityGate:
    """A gate on an empty in-memory store, only to check a command's arguments with the
    library's own rules before the real store is opened or read: bad input is exit 2
    whether or not the case (or the database) exists, and nothing is touched."""
    return FinalityGate(Guard(MemoryStore()))


def _case_outcome(case: Case) -> str:
    if case.outcome is not None:
        return case.outcome
    if case.provisional_outcome is not None:
        return f"{case.provisional_outcome} (provisional)"
    return "-"


@cases_app.command("list", epilog=EXIT_CODES)
@cli_command
def cases_list(
    state: Annotated[
        list[CaseState] | None,
        typer.Option("--state", case_sensitive=False, help="Only this state (repeatable)."),
    ] = None,
    namespace: NsFilterOpt = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """List cases (decisions), oldest first, optionally by state."""
    with opened(resolve_target(db, database_url, schema)) as store:
        cases = rows_lib.cases(store, namespace=namespace, states=state or None)
    warn_unreadable(cases, "case(s)")
    if as_json:
        print_json([c.to_dict() for c in cases])
        return
    print_table(
        ("NAMESPACE", "CASE ID", "STATE", "OUTCOME", "SIGNALS", "LEADING", "UPDATED"),
        [
            (
                c.get("namespace"),
                c.get("case_id"),
                f"UNREADABLE: {c.problem}",
                "-",
                "-",
                "-",
                stored_iso(c.get("updated_at_ms")),
            )
            if isinstance(c, Unreadable)
            else (
                c.namespace,
                c.case_id,
                c.state.value,
                _case_outcome(c),
                len(c.signals),
                c.tally.winner,
                iso(c.updated_at_ms),
            )
            for c in cases
        ],
    )


@cases_app.command("show", epilog=EXIT_CODES)
@cli_command
def cases_show(
    case_id: Annotated[str, typer.Argument(help="The case id.")],
    namespace: NsOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Show a case: its state, tally, every signal (live, replaced, late), its state
    history from the audit trail, and its settlement receipt. Exit 1 if absent."""
    _check_case_id(case_id)
    namespace = check_name("namespace", namespace)
    with opened(resolve_target(db, database_url, schema)) as store:
        case = rows_lib.case(store, namespace, case_id)
        if case is None:
            raise CliError(EXIT_FAILED, f"no case {case_id!r} in namespace {namespace!r}")
        if isinstance(case, Unreadable):
            raise CliError(
                EXIT_STORE,
                f"{case.describe()} (the row was edited or is corrupt; `audit verify` checks "
                "the trail)",
            )
        history = rows_lib.signals(store, namespace, case_id)
        # Unreadable events of the case too: one may be a state change.
        states = [
            e
            for e in rows_lib.events(store, namespace=namespace, subject=case_id)
            if isinstance(e, Unreadable) or e.kind is EventKind.STATE_CHANGE
        ]
        settlement, now = rows_lib.record(store, namespace, CASE_PREFIX + case_id)
    receipt: dict[str, Any] | None = (
        None
        if settlement is None
        else settlement.to_dict()
        if isinstance(settlement, Unreadable)
        else receipt_dict(settlement, now, redact=True, payload=False)
    )
    warn_unreadable([*history, *states, settlement], "row(s) of the case")
    if as_json:
        print_json(
            {
                "case": case.to_dict(),
                "signals": [
                    s.to_dict() if isinstance(s, Unreadable) else {**s[0].to_dict(), "status": s[1]}
                    for s in history
                ],
                "state_history": [e.to_dict() for e in states],
                "settlement": receipt,
            }
        )
        return
    print_pairs(
        [
            ("state", case.state.value),
            ("outcome", _case_outcome(case)),
            ("policy", f"threshold {case.policy.threshold}, quorum {case.policy.quorum}"),
            ("tally", case.tally.to_dict()),
            ("resolved_by", case.resolved_by),
            ("version", case.version),
            ("created", iso(case.created_at_ms)),
            ("updated", iso(case.updated_at_ms)),
            (
                "settlement",
                None
                if receipt is None
                else f"UNREADABLE: {receipt['unreadable']}"
                if "unreadable" in receipt
                else status_text(receipt),
            ),
        ],
        title=f"case {namespace}/{case_id}",
    )
    typer.echo()
    print_table(
        ("AT", "SOURCE", "OUTCOME", "CONFIDENCE", "STATUS", "METADATA"),
        [
            (
                stored_iso(s.get("at_ms")),
                s.get("source"),
                s.get("outcome"),
                "-",
                f"UNREADABLE: {s.problem}",
                "-",
            )
            if isinstance(s, Unreadable)
            else (
                iso(s[0].at_ms),
                s[0].source,
                s[0].outcome,
                s[0].confidence,
                s[1],
                compact(s[0].metadata),
            )
            for s in history
        ],
        title="signals",
    )
    typer.echo()
    print_table(
        ("AT", "FROM", "TO", "OUTCOME", "ACTOR"),
        [
            (stored_iso(e.get("at_ms")), "-", f"UNREADABLE: {e.problem}", "-", e.get("actor"))
            if isinstance(e, Unreadable)
            else (
                iso(e.at_ms),
                e.detail.get("from"),
                e.detail.get("to"),
                e.detail.get("outcome"),
                e.actor,
            )
            for e in states
        ],
        title="state history",
    )


@cases_app.command("signal", epilog=EXIT_CODES)
@cli_command
def cases_signal(
    case_id: Annotated[str, typer.Argument(help="The case id.")],
    source: Annotated[str, typer.Option("--source", help="Who signals.")],
    outcome: Annotated[str, typer.Option("--outcome", help="What it says should happen.")],
    confidence: Annotated[float, typer.Option("--confidence", help="In [0, 1].")],
    metadata: Annotated[
        str | None, typer.Option("--metadata", help="A JSON object kept with the signal.")
    ] = None,
    open_case: Annotated[
        bool,
        typer.Option("--open", help="Open the case if it does not exist."),
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="With --open: the new case's consensus threshold, in (0, 1] (default 0.8).",
        ),
    ] = None,
    quorum: Annotated[
        int | None,
        typer.Option(
            "--quorum", help="With --open: sources that must vote the outcome (default 1)."
        ),
    ] = None,
    namespace: NsOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Record a signal on a case and apply the transitions it causes. Exit 1 if the
    case does not exist (unless --open), or exists with another policy than --threshold /
    --quorum ask for; exit 2 for bad input, whether or not it exists."""
    meta = None if metadata is None else parse_json(metadata, "--metadata")
    if meta is not None and not isinstance(meta, dict):
        raise CliError(EXIT_USAGE, "--metadata must be a JSON object")
    policy = None
    if threshold is not None or quorum is not None:
        if not open_case:
            raise CliError(EXIT_USAGE, "--threshold and --quorum set the policy of --open")
        defaults = ConsensusPolicy()
        policy = ConsensusPolicy(  # ConfigurationError (exit 2) when out of range
            defaults.threshold if threshold is None else threshold,
            defaults.quorum if quorum is None else quorum,
        )
    # Every argument first (InvalidInputError: exit 2), then the store (exit 3), then
    # whether the case exists (exit 1).
    _checking_gate()._signal_args(case_id, source, outcome, confidence, meta, namespace)
    with opened(resolve_target(db, database_url, schema)) as store:
        gate = FinalityGate(Guard(store))
        existing = gate.get(case_id, namespace=namespace)
        if existing is None and not open_case:
            raise CliError(
                EXIT_FAILED,
                f"no case {case_id!r} in namespace {namespace!r} (pass --open to open it)",
            )
        if existing is None:
            try:
                gate.open(case_id, policy=policy, namespace=namespace)
            except ConfigurationError as exc:  # opened meanwhile, with another policy
                raise CliError(EXIT_FAILED, f"{exc} (no signal recorded)") from exc
        elif policy is not None and existing.policy != policy:
            raise CliError(
                EXIT_FAILED,
                f"case {case_id!r} exists with threshold {existing.policy.threshold} and "
                f"quorum {existing.policy.quorum}; a case's policy never changes (no signal "
                "recorded)",
            )
        case = gate.signal(case_id, source, outcome, confidence, metadata=meta, namespace=namespace)
    if as_json:
        print_json(case.to_dict())
        return
    out_console().print(
        f"case {case.namespace}/{case.case_id}: {case.state.value}, "
        f"outcome {_case_outcome(case)}, {len(case.signals)} live signal(s)"
    )


@cases_app.command("resolve", epilog=EXIT_CODES)
@cli_command
def cases_resolve(
    case_id: Annotated[str, typer.Argument(help="The case id.")],
    outcome: Annotated[str, typer.Option("--outcome", help="The final outcome.")],
    by: Annotated[str, typer.Option("--by", help="Who resolves (audited).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (audited).")],
    namespace: NsOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Make a case FINAL with an operator's outcome (from RESOLVED_PROVISIONAL or
    IN_RECONCILIATION). Exit 1 if the case is absent or in another state; exit 2 for bad
    input, whether or not it exists."""
    _checking_gate()._resolve_args(case_id, outcome, by, reason, namespace)
    with opened(resolve_target(db, database_url, schema)) as store:
        case = FinalityGate(Guard(store)).resolve(
            case_id, outcome, by=by, reason=reason, namespace=namespace
        )
    if as_json:
        print_json(case.to_dict())
        return
    out_console().print(f"case {case.namespace}/{case.case_id}: {case.state.value} {case.outcome}")
