"""Execution records: ``receipts``, ``in-doubt`` and ``resolve``."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from safeagent import (
    ActionPolicy,
    AsyncGuard,
    Guard,
    MemoryStore,
    ReconcileReport,
    Status,
    default_redactor,
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
    SinceOpt,
    UntilOpt,
    UrlOpt,
    cli_command,
    err_console,
    iso,
    opened,
    out_console,
    parse_json,
    print_events,
    print_json,
    print_pairs,
    print_table,
    receipt_dict,
    resolve_target,
    shown,
    status_text,
    stored_iso,
    time_window,
    warn_unreadable,
)
from safeagent._core import GuardCore, tally
from safeagent._keys import MAX_REQUEST_ID_LENGTH, check_name, check_request_id
from safeagent._receipt import Receipt
from safeagent.stores import ReceiptStore
from safeagent.stores._as_stored import Unreadable

# guard.resolve's own default, for checking the arguments before the store is opened
_DEFAULT_ERROR_TYPE = inspect.signature(Guard.resolve).parameters["error_type"].default

receipts_app = typer.Typer(
    help="Execution records (receipts).", no_args_is_help=True, epilog=EXIT_CODES
)
in_doubt_app = typer.Typer(
    help="Records whose outcome is unknown.", no_args_is_help=True, epilog=EXIT_CODES
)


# -- receipts --------------------------------------------------------------------------------


@receipts_app.command("list", epilog=EXIT_CODES)
@cli_command
def receipts_list(
    namespace: NsFilterOpt = None,
    action: Annotated[str | None, typer.Option(help="Only this action.")] = None,
    status: Annotated[
        list[Status] | None,
        typer.Option(
            "--status",
            case_sensitive=False,
            help="Only this status as read (repeatable; an expired lease reads IN_DOUBT).",
        ),
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Request ids starting with this.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many rows first.")] = 0,
    newest_first: Annotated[
        bool, typer.Option("--newest-first", help="Newest first (default: oldest first).")
    ] = False,
    no_redact: Annotated[
        bool, typer.Option("--no-redact", help="Show results unredacted in --json.")
    ] = False,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """List receipts, filtered by namespace, action, status, creation time and request id
    prefix, oldest first, one page at a time (--limit, --offset)."""
    since_ms, until_ms = time_window(since, until)
    wanted = None if not status else {s.value for s in status}
    with opened(resolve_target(db, database_url, schema)) as store:
        records, now = rows_lib.records(store, namespace=namespace)
    rows: list[dict[str, Any] | Unreadable] = []
    for record in records:
        if isinstance(record, Unreadable):
            # Listed unless a filter it can be judged by excludes it: it must be seen.
            if _excluded(record, action, prefix, since_ms, until_ms):
                continue
            rows.append(record)
            continue
        if action is not None and record.action != action:
            continue
        if prefix is not None and not record.request_id.startswith(prefix):
            continue
        if since_ms is not None and record.created_at_ms < since_ms:
            continue
        if until_ms is not None and record.created_at_ms > until_ms:
            continue
        row = receipt_dict(record, now, redact=not no_redact, payload=False)
        if wanted is not None and row["status"] not in wanted:
            continue
        rows.append(row)
    if newest_first:
        rows.reverse()
    page = rows[offset : offset + limit]
    warn_unreadable(page, "receipt(s)")
    if as_json:
        print_json([r.to_dict() if isinstance(r, Unreadable) else r for r in page])
        return
    print_table(
        ("NAMESPACE", "REQUEST ID", "ACTION", "STATUS", "ATTEMPT", "CREATED", "COMPLETED"),
        [
            (
                r.get("namespace"),
                r.get("request_id"),
                r.get("action"),
                f"UNREADABLE: {r.problem}",
                "-",
                stored_iso(r.get("created_at_ms")),
                "-",
            )
            if isinstance(r, Unreadable)
            else (
                r["namespace"],
                r["request_id"],
                r["action"],
                status_text(r),
                r["attempt"],
                iso(r["created_at_ms"]),
                iso(r["completed_at_ms"]),
            )
            for r in page
        ],
    )
    if not rows:
        err_console().print("no matching receipts")
    else:
        shown = f"{offset + 1}-{offset + len(page)}" if page else "none"
        err_console().print(f"{shown} of {len(rows)} matching receipts")


def _excluded(
    row: Unreadable,
    action: str | None,
    prefix: str | None,
    since_ms: int | None,
    until_ms: int | None,
) -> bool:
    """An unreadable receipt is left out only by a filter whose field it holds readably
    (an action, a request id, a creation time); --status cannot judge it."""
    stored_action, request_id = row.get("action"), row.get("request_id")
    created = row.get("created_at_ms")
    if action is not None and isinstance(stored_action, str) and stored_action != action:
        return True
    if prefix is not None and isinstance(request_id, str) and not request_id.startswith(prefix):
        return True
    if not isinstance(created, int):
        return False
    return (since_ms is not None and created < since_ms) or (
        until_ms is not None and created > until_ms
    )


def _unreadable_error(row: Unreadable) -> CliError:
    """The one-line error (exit 3) of a command about one row that cannot be read."""
    return CliError(
        EXIT_STORE,
        f"{row.describe()} (the row was edited or is corrupt; `audit verify` checks the trail)",
    )


@receipts_app.command("show", epilog=EXIT_CODES)
@cli_command
def receipts_show(
    request_id: Annotated[str, typer.Argument(help="The request id.")],
    namespace: NsOpt = DEFAULT_NAMESPACE,
    no_redact: Annotated[
        bool, typer.Option("--no-redact", help="Show payload and result unredacted.")
    ] = False,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Show one receipt in full (payload and result redacted unless --no-redact) and its
    audit trail. Exit 1 if there is no such receipt; exit 2 for an id or namespace no
    record can have."""
    request_id = check_request_id(request_id)
    namespace = check_name("namespace", namespace)
    with opened(resolve_target(db, database_url, schema)) as store:
        record, now = rows_lib.record(store, namespace, request_id)
        if record is None:
            message = f"no receipt {request_id!r} in namespace {namespace!r}"
            quoted = json.dumps(request_id, ensure_ascii=False)
            if (
                len(quoted) <= MAX_REQUEST_ID_LENGTH
                and rows_lib.record(store, namespace, quoted)[0]
            ):
                # The decorator stores a str key as its JSON text (docs/design.md section 6).
                message += f"; there is one for {quoted} (a decorator's key, stored quoted)"
            raise CliError(EXIT_FAILED, message)
        if isinstance(record, Unreadable):
            raise _unreadable_error(record)
        events = rows_lib.events(store, namespace=namespace, subject=request_id)
    try:
        receipt = receipt_dict(record, now, redact=not no_redact, payload=True)
    except ValueError:  # the only field not decoded before: the payload
        raise _unreadable_error(
            Unreadable("receipt", f"{namespace}/{request_id}", "payload is not JSON", {})
        ) from None
    warn_unreadable(events, "audit event(s)")
    if as_json:
        print_json({"receipt": receipt, "audit_trail": [e.to_dict() for e in events]})
        return
    receipt["status"] = status_text(receipt)
    # Store-clock milliseconds shown as ISO 8601 UTC, under names without "_ms" (the JSON
    # output keeps the integer fields and their names).
    pairs = [
        (key[:-3], None if value is None else iso(value))
        if key.endswith("_at_ms")
        else (key, value)
        for key, value in receipt.items()
    ]
    print_pairs(pairs, title=f"receipt {namespace}/{request_id}")
    typer.echo()
    print_events(events, "audit trail")


# -- in doubt --------------------------------------------------------------------------------


@in_doubt_app.command("list", epilog=EXIT_CODES)
@cli_command
def in_doubt_list(
    namespace: NsFilterOpt = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """List records whose outcome is unknown: stored IN_DOUBT, or PENDING with an
    expired lease (its owner died). Settle them with `in-doubt reconcile` or `resolve`."""
    with opened(resolve_target(db, database_url, schema)) as store:
        records, now = rows_lib.records(
            store, namespace=namespace, statuses=(Status.IN_DOUBT, Status.PENDING)
        )
    # An unreadable PENDING or IN_DOUBT row is listed: whether it is in doubt is unknown.
    rows = [
        r if isinstance(r, Unreadable) else receipt_dict(r, now, redact=True, payload=False)
        for r in records
        if isinstance(r, Unreadable) or r.effective_status(now) is Status.IN_DOUBT
    ]
    warn_unreadable(rows, "record(s)")
    if as_json:
        print_json([r.to_dict() if isinstance(r, Unreadable) else r for r in rows])
        return
    print_table(
        ("NAMESPACE", "REQUEST ID", "ACTION", "STORED", "ATTEMPT", "OWNER", "CLAIMED"),
        [
            (
                r.get("namespace"),
                r.get("request_id"),
                r.get("action"),
                f"UNREADABLE: {r.problem}",
                "-",
                "-",
                "-",
            )
            if isinstance(r, Unreadable)
            else (
                r["namespace"],
                r["request_id"],
                r["action"],
                "IN_DOUBT" if r["stored_status"] == "IN_DOUBT" else "PENDING, lease expired",
                r["attempt"],
                r["attempt_owner"],
                iso(r["claimed_at_ms"]),
            )
            for r in rows
        ],
    )
    err_console().print(f"{len(rows)} in doubt")


def _app_guard(spec: str) -> GuardCore:
    """Import ``module:attr`` and return the guard whose ``actions`` hold the hooks."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(EXIT_USAGE, f"--app must be module:attribute, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the operator's project
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the app's own import is the operator's to fix
        raise CliError(EXIT_USAGE, f"cannot import {module_name!r}: {exc!r}") from exc
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise CliError(EXIT_USAGE, f"{module_name!r} has no attribute {attr!r}") from None
    candidate = found if isinstance(found, GuardCore) else getattr(found, "guard", None)
    if isinstance(candidate, GuardCore):
        return candidate
    actions = getattr(found, "actions", found)
    if isinstance(actions, Mapping) and all(isinstance(v, ActionPolicy) for v in actions.values()):
        return Guard(MemoryStore(), actions=actions)  # holds the settings only
    raise CliError(
        EXIT_USAGE,
        f"{spec} is {type(found).__name__}: expected a safeagent Guard, an object with a "
        ".guard, or a mapping of action names to ActionPolicy",
    )


def _reconcile_guard(store: ReceiptStore, source: GuardCore) -> Guard | AsyncGuard:
    hooks = [p.reconcile for p in source.actions.values() if p.reconcile is not None]
    settings: dict[str, Any] = {
        "actions": source.actions,
        "lease": source.lease,
        "redact": source.redact,
        "result_encoder": source.result_encoder,
    }
    if isinstance(source, AsyncGuard) or any(inspect.iscoroutinefunction(h) for h in hooks):
        return AsyncGuard(store, **settings)
    return Guard(store, **settings)


def _run_reconcile(
    guard: Guard | AsyncGuard, receipts: Sequence[Receipt], progress: Progress
) -> ReconcileReport:
    task = progress.add_task("reconciling", total=len(receipts))
    items: list[tuple[str, str, str]] = []

    async def run_async(aguard: AsyncGuard) -> None:
        for receipt in receipts:
            verdict = await aguard._reconcile_one(receipt)
            items.append((receipt.namespace, receipt.request_id, verdict))
            progress.advance(task)

    if isinstance(guard, AsyncGuard):
        asyncio.run(run_async(guard))
    else:
        for receipt in receipts:
            items.append((receipt.namespace, receipt.request_id, guard._reconcile_one(receipt)))
            progress.advance(task)
    return tally(items)


@in_doubt_app.command("reconcile", epilog=EXIT_CODES)
@cli_command
def in_doubt_reconcile(
    app_spec: Annotated[
        str,
        typer.Option(
            "--app",
            help="module:attribute of the application's Guard (built with actions= and "
            "reconcile hooks), of an object with a .guard, or of an actions mapping. "
            "Imported from the working directory: its top-level code runs.",
        ),
    ],
    namespace: NsFilterOpt = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Run the application's reconcile hooks over every record now in doubt.

    "happened" stores the result, "failed" the failure, "not_happened" releases the record
    (the next call runs it), "unknown" leaves it in doubt. Exit 1 if any record is still in
    doubt afterwards (unknown, or no hook for its action), or one could not be read."""
    source = _app_guard(app_spec)
    with opened(resolve_target(db, database_url, schema)) as store:
        guard = _reconcile_guard(store, source)
        records, now = rows_lib.records(
            store, namespace=namespace, statuses=(Status.IN_DOUBT, Status.PENDING)
        )
        unreadable = [r for r in records if isinstance(r, Unreadable)]
        receipts = [
            Receipt.from_record(r, replay=False, now_ms=now)
            for r in records
            if not isinstance(r, Unreadable) and r.effective_status(now) is Status.IN_DOUBT
        ]
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console(),
            transient=True,
            disable=not sys.stderr.isatty(),
        ) as progress:
            report = _run_reconcile(guard, receipts, progress)
    counts = {
        k: getattr(report, k)
        for k in ("checked", "happened", "failed", "not_happened", "unknown", "no_hook", "skipped")
    }
    if as_json:
        items = [{"namespace": n, "request_id": r, "verdict": v} for n, r, v in report.items]
        print_json({**counts, "items": items})
    else:
        print_table(("NAMESPACE", "REQUEST ID", "VERDICT"), report.items)
        typer.echo()
        print_pairs(list(counts.items()), title="reconcile report")
    # A row that cannot be read may be in doubt: it was not reconciled.
    warn_unreadable(unreadable, "record(s)", "not reconciled")
    if report.unknown or report.no_hook or unreadable:
        raise typer.Exit(EXIT_FAILED)


# -- resolve ---------------------------------------------------------------------------------


@cli_command
def resolve(
    request_id: Annotated[str, typer.Argument(help="The request id of the record.")],
    by: Annotated[str, typer.Option("--by", help="Who resolves (audited).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (audited).")],
    succeeded: Annotated[
        bool, typer.Option("--succeeded", help="The side effect happened.")
    ] = False,
    failed: Annotated[bool, typer.Option("--failed", help="It failed.")] = False,
    released: Annotated[
        bool, typer.Option("--released", help="It surely did not happen: the next call runs it.")
    ] = False,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Re-run a FAILED record: the next call runs it.")
    ] = False,
    result: Annotated[
        str | None, typer.Option("--result", help="With --succeeded: the result, as JSON.")
    ] = None,
    error_type: Annotated[
        str | None, typer.Option("--error-type", help="With --failed: the error type.")
    ] = None,
    error_message: Annotated[
        str | None,
        typer.Option("--error-message", help="With --failed: the message (default: reason)."),
    ] = None,
    namespace: NsOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Resolve an in-doubt record by hand (--succeeded, --failed or --released), or
    re-run a FAILED one (--rerun); audited with --by and --reason.

    Exit 1 if there is no such record or it is not in a state the outcome allows; exit 2
    for bad input, whether or not it exists."""
    chosen = [
        name
        for name, on in (
            ("succeeded", succeeded),
            ("failed", failed),
            ("released", released),
            ("rerun", rerun),
        )
        if on
    ]
    if len(chosen) != 1:
        raise CliError(EXIT_USAGE, "pass exactly one of --succeeded, --failed, --released, --rerun")
    outcome = chosen[0]
    if result is not None and outcome != "succeeded":
        raise CliError(EXIT_USAGE, "--result goes with --succeeded only")
    if (error_type is not None or error_message is not None) and outcome != "failed":
        raise CliError(EXIT_USAGE, "--error-type and --error-message go with --failed only")
    value = None if result is None else parse_json(result, "--result")
    extra: dict[str, Any] = {}
    if error_type is not None:
        extra["error_type"] = error_type
    if error_message is not None:
        extra["error_message"] = error_message
    # Every argument first, with the library's own rules (InvalidInputError: exit 2), so
    # bad input is exit 2 whether or not the record (or the database) exists.
    Guard(MemoryStore())._resolution_args(
        request_id,
        outcome,  # type: ignore[arg-type]  # one of the four literals, checked above
        by,
        reason,
        namespace,
        value,
        extra.get("error_type", _DEFAULT_ERROR_TYPE),
        error_message,
    )
    with opened(resolve_target(db, database_url, schema)) as store:
        guard = Guard(store)
        receipt = guard.resolve(
            request_id,
            outcome,  # type: ignore[arg-type]  # one of the four literals, checked above
            by=by,
            reason=reason,
            namespace=namespace,
            result=value,
            **extra,
        )
    if as_json:
        out = receipt.to_dict()
        out.pop("replay", None)
        out["result"] = default_redactor(shown(out["result"]))
        if "payload" in out:
            out["payload"] = default_redactor(shown(out["payload"]))
        print_json(out)
        return
    out_console().print(
        f"resolved {receipt.namespace}/{receipt.request_id} ({outcome}): now "
        f"{receipt.status.value}, fencing token {receipt.fencing_token}, by {by}"
    )
