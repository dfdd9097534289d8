"""The audit trail and retention: ``audit tail|export|verify|anchor``, ``stats``, ``purge``."""

from __future__ import annotations

import enum
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TextIO, cast

import typer

from safeagent import AuditEvent, retention
from safeagent import audit as audit_lib
from safeagent._cli._common import (
    AUDIT_KEY_ENV,
    DEFAULT_SCHEMA,
    EXIT_CODES,
    EXIT_FAILED,
    CliError,
    DbOpt,
    JsonEscapingWriter,
    JsonOpt,
    KeyFileOpt,
    NsFilterOpt,
    SchemaOpt,
    SinceOpt,
    UntilOpt,
    UrlOpt,
    cli_command,
    confirm,
    err_console,
    event_line,
    iso,
    opened,
    out_console,
    parse_duration,
    print_json,
    print_line,
    print_pairs,
    print_table,
    resolve_target,
    time_window,
)

audit_app = typer.Typer(
    help="The tamper-evident audit trail.", no_args_is_help=True, epilog=EXIT_CODES
)


# -- audit -----------------------------------------------------------------------------------


class ExportFormat(str, enum.Enum):
    JSONL = "jsonl"
    CSV = "csv"


@audit_app.command("tail", epilog=EXIT_CODES)
@cli_command
def audit_tail(
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="Show the last N.")] = 20,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing new events (Ctrl-C stops).")
    ] = False,
    interval: Annotated[
        float,
        typer.Option("--interval", min=0.05, max=3600.0, help="Seconds between polls (--follow)."),
    ] = 1.0,
    namespace: NsFilterOpt = None,
    subject: Annotated[
        str | None, typer.Option("--subject", help="Only this request id or case id.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Print the last audit events, one per line; with --follow, keep printing new ones."""

    def show(events: Sequence[AuditEvent]) -> None:
        for event in events:
            if as_json:
                print_json(event.to_dict(), indent=None)
            else:
                print_line(event_line(event))
        sys.stdout.flush()

    with opened(resolve_target(db, database_url, schema)) as store:
        events = store.events(namespace=namespace, subject=subject)
        show(events[len(events) - lines :])
        last = (events[-1].id or 0) if events else 0
        if not follow:
            return
        # Ctrl-C sets a flag the loop checks, instead of raising KeyboardInterrupt at an
        # arbitrary bytecode, where a finalizer or callback could swallow it and leave the
        # loop running.
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda _sig, _frame: stop.set())
        try:
            while not stop.is_set():
                time.sleep(interval)
                if stop.is_set():
                    break
                new = store.events(namespace=namespace, subject=subject, after_id=last)
                if new:
                    show(new)
                    last = new[-1].id or last
        finally:
            signal.signal(signal.SIGINT, previous)


@audit_app.command("export", epilog=EXIT_CODES)
@cli_command
def audit_export(
    fmt: Annotated[
        ExportFormat, typer.Option("--format", case_sensitive=False, help="jsonl or csv.")
    ] = ExportFormat.JSONL,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write to this file (default: stdout).")
    ] = None,
    namespace: NsFilterOpt = None,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Export the audit trail as JSON lines or CSV, redacted by the default redaction hook."""
    with opened(resolve_target(db, database_url, schema)) as store:
        if out is None:
            stdout = cast(TextIO, JsonEscapingWriter(sys.stdout))
            count = audit_lib.export(store, stdout, fmt=fmt.value, namespace=namespace)
        else:
            try:
                with out.open("w", encoding="utf-8", newline="") as handle:
                    escaping = cast(TextIO, JsonEscapingWriter(handle))
                    count = audit_lib.export(store, escaping, fmt=fmt.value, namespace=namespace)
            except BaseException:
                out.unlink(missing_ok=True)  # never leave half an export behind
                raise
    err_console().print(f"exported {count} events" + ("" if out is None else f" to {out}"))


def _load_key(key_file: Path | None, *, required: bool) -> bytes | None:
    """The anchoring key from --key-file or $SAFEAGENT_AUDIT_KEY; ``None`` when neither is
    given and the key is optional."""
    if key_file is None and not os.environ.get(AUDIT_KEY_ENV) and not required:
        return None
    return audit_lib.load_key(path=None if key_file is None else str(key_file))


@audit_app.command("verify", epilog=EXIT_CODES)
@cli_command
def audit_verify(
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Check the audit trail's hash chains, and (with the key) its anchors: an edited,
    deleted or reordered event, a rewritten chain, or an execution record that no longer
    holds what its last event recorded (status, or outcome digest) is reported. Exit 1 if
    any is found.

    Without a key the anchors cannot be checked, so a wholesale rewrite of a chain goes
    unnoticed: pass --key-file or set $SAFEAGENT_AUDIT_KEY."""
    key = _load_key(key_file, required=False)
    with opened(resolve_target(db, database_url, schema)) as store:
        report = audit_lib.verify(store, key=key)
    problems = [
        {
            "kind": p.kind,
            "shard": p.shard,
            "seq": p.seq,
            "event_id": p.event_id,
            "detail": p.detail,
        }
        for p in report.problems
    ]
    if as_json:
        print_json(
            {
                "ok": report.ok,
                "events_checked": report.events_checked,
                "anchors_checked": report.anchors_checked,
                "anchors_unverified": report.anchors_unverified,
                "receipts_checked": report.receipts_checked,
                "receipts_unverified": report.receipts_unverified,
                "key": key is not None,
                "problems": problems,
            }
        )
    else:
        if key is None:
            err_console().print(
                f"warning: no audit key (--key-file or ${AUDIT_KEY_ENV}): anchors not checked"
            )
        if problems:
            print_table(
                ("KIND", "SHARD", "SEQ", "EVENT", "DETAIL"),
                [tuple(p.values()) for p in problems],
            )
        verdict = "ok" if report.ok else f"TAMPERED: {len(problems)} problem(s)"
        out_console().print(
            f"{verdict}: {report.events_checked} events, {report.anchors_checked} anchors "
            f"and {report.receipts_checked} receipts checked"
            + (
                f" ({report.receipts_unverified} finished receipts have no outcome digest"
                " to compare: written before digests)"
                if report.receipts_unverified
                else ""
            )
        )
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


@audit_app.command("anchor", epilog=EXIT_CODES)
@cli_command
def audit_anchor(
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Anchor the heads of the audit chains with the HMAC key (held outside the database):
    run it periodically (cron); events written after the last anchor are only as safe as
    the database. Exit 2 without a key."""
    key = _load_key(key_file, required=True)
    assert key is not None
    with opened(resolve_target(db, database_url, schema)) as store:
        anchor = audit_lib.anchor(store, key=key)
    heads = {str(shard): list(head) for shard, head in sorted(anchor.heads.items())}
    if as_json:
        print_json({"id": anchor.id, "at_ms": anchor.at_ms, "heads": heads})
        return
    out_console().print(
        f"anchor #{anchor.id} at {iso(anchor.at_ms)}: {len(heads)} chain heads signed"
    )


# -- stats, purge ----------------------------------------------------------------------------


@cli_command
def stats(
    since: SinceOpt = None,
    until: UntilOpt = None,
    namespace: NsFilterOpt = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Executions, replays blocked, conflicts and records in doubt, in total and per
    action, over a time window."""
    since_ms, until_ms = time_window(since, until)
    with opened(resolve_target(db, database_url, schema)) as store:
        found = audit_lib.stats(store, since_ms=since_ms, until_ms=until_ms, namespace=namespace)
    counts: dict[str, Any] = {
        "executions": found.executions,
        "replays": found.replays,
        "conflicts": found.conflicts,
        "in_doubt": found.in_doubt,
        "per_action": found.per_action,
    }
    if as_json:
        print_json({**counts, "since_ms": since_ms, "until_ms": until_ms})
        return
    names = ("executions", "replays", "conflicts", "in_doubt")
    print_table(
        ("ACTION", "EXECUTIONS", "REPLAYS", "CONFLICTS", "IN DOUBT"),
        [
            *[(a, *(c.get(n, 0) for n in names)) for a, c in sorted(counts["per_action"].items())],
            ("(total)", *(counts[n] for n in names)),
        ],
        title=f"from {iso(since_ms) if since_ms else 'the start'} to "
        f"{iso(until_ms) if until_ms else 'now'}",
    )


@cli_command
def purge(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", help="Records finished longer ago than this (30d, 12h; unit needed)."
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    by: Annotated[str, typer.Option("--by", help="Who purges (audited).")] = "safeagent-cli",
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Retention: records finished before the cutoff lose payload and result and keep a
    tombstone (so a retry is still recognised and never runs again); released records lose
    their payload; pending and in-doubt records are never touched. Asks first unless --yes; exit
    1 if declined."""
    seconds = parse_duration(older_than, "--older-than")
    target = resolve_target(db, database_url, schema)
    with opened(target) as store:
        cutoff = iso(time.time_ns() // 1_000_000 - round(seconds * 1000))
        question = f"Purge records finished before {cutoff} in {target.describe()}?"
        if not yes and not confirm(question):
            raise CliError(EXIT_FAILED, "not confirmed: nothing was purged")
        report = retention.purge(store, older_than=seconds, actor=by)
    counts = {
        k: getattr(report, k) for k in ("tombstoned", "released", "kept_pending", "kept_in_doubt")
    }
    if as_json:
        print_json({"cutoff": cutoff, **counts})
        return
    print_pairs([("cutoff", cutoff), *counts.items()], title="purge")
