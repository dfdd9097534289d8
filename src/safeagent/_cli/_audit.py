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
from safeagent._cli import _rows as rows_lib
from safeagent._cli._common import (
    AUDIT_KEY_ENV,
    DEFAULT_SCHEMA,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_USAGE,
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
    warn_unreadable,
)
from safeagent._keys import check_name
from safeagent.stores._as_stored import Unreadable

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

    def show(events: Sequence[AuditEvent | Unreadable]) -> None:
        warn_unreadable(events, "audit event(s)")
        for event in events:
            if as_json:
                print_json(event.to_dict(), indent=None)
            else:
                print_line(event_line(event))
        sys.stdout.flush()

    def last_id(events: Sequence[AuditEvent | Unreadable], before: int) -> int:
        found = events[-1].get("id") if isinstance(events[-1], Unreadable) else events[-1].id
        return found if isinstance(found, int) and found > before else before

    with opened(resolve_target(db, database_url, schema)) as store:
        events = rows_lib.events(store, namespace=namespace, subject=subject)
        show(events[len(events) - lines :])
        last = last_id(events, 0) if events else 0
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
                new = rows_lib.events(store, namespace=namespace, subject=subject, after_id=last)
                if new:
                    show(new)
                    last = last_id(new, last)
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
    with opened(resolve_target(db, database_url, schema)) as opened_store:
        store = _ExportedEvents(opened_store, marked=fmt is ExportFormat.JSONL)
        if out is None:
            stdout = cast(TextIO, JsonEscapingWriter(sys.stdout))
            count = audit_lib.export(store, stdout, fmt=fmt.value, namespace=namespace)
        else:
            try:  # a path that cannot be written is a usage error, not a traceback
                handle = out.open("w", encoding="utf-8", newline="")
            except OSError as exc:
                raise CliError(
                    EXIT_USAGE, f"--out: cannot write {out}: {exc.strerror or exc}"
                ) from exc
            try:
                with handle:
                    escaping = cast(TextIO, JsonEscapingWriter(handle))
                    count = audit_lib.export(store, escaping, fmt=fmt.value, namespace=namespace)
            except BaseException:
                out.unlink(missing_ok=True)  # never leave half an export behind
                raise
    warn_unreadable(store.unreadable, "audit event(s)", "exported as stored")
    err_console().print(f"exported {count} events" + ("" if out is None else f" to {out}"))


class _StoredEvent:
    """An audit event that cannot be read, as an export writes it: every column as
    stored (the detail too: the export redacts it), and, in JSON lines, ``unreadable``:
    what cannot be read. CSV keeps its columns; standard error names the row."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)


class _ExportedEvents:
    """``store`` for ``audit.export`` / ``audit.stats``: its events read row by row
    (:func:`rows_lib.events`). An unreadable event is left out of the events (``stats``)
    or, with ``export=True``, written as stored (:class:`_StoredEvent`); either way it is
    kept in ``unreadable``."""

    def __init__(self, store: Any, *, marked: bool = False, export: bool = True) -> None:
        self.store = store
        self.marked = marked
        self.export = export
        self.unreadable: list[Unreadable] = []

    def events(self, *, namespace: str | None = None, **_: Any) -> list[Any]:
        out: list[Any] = []
        for event in rows_lib.events(self.store, namespace=namespace):
            if not isinstance(event, Unreadable):
                out.append(event)
                continue
            self.unreadable.append(event)
            if self.export:
                fields = rows_lib.raw_event(event, self.store)
                if self.marked:
                    fields["unreadable"] = event.problem
                out.append(_StoredEvent(fields))
        return out


def _load_key(key_file: Path | None, *, required: bool) -> bytes | None:
    """The anchoring key from --key-file or $SAFEAGENT_AUDIT_KEY; ``None`` when neither is
    given and the key is optional."""
    if key_file is None and not os.environ.get(AUDIT_KEY_ENV) and not required:
        return None
    return audit_lib.load_key(path=None if key_file is None else str(key_file))


PinFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--pin-file",
        help="File holding the last anchor's pin (ID:MAC; its last line), kept outside the "
        "database.",
    ),
]


def _read_pin(last_anchor: str | None, pin_file: Path | None) -> str | None:
    """The pin of the last anchor recorded outside the database: --last-anchor, or the
    last non-empty line of --pin-file."""
    if last_anchor is not None and pin_file is not None:
        raise CliError(EXIT_USAGE, "give --last-anchor or --pin-file, not both")
    if pin_file is None:
        return last_anchor
    try:
        text = pin_file.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise CliError(EXIT_USAGE, f"cannot read the pin file {pin_file}: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise CliError(EXIT_USAGE, f"the pin file {pin_file} holds no pin")
    return lines[-1]


@audit_app.command("verify", epilog=EXIT_CODES)
@cli_command
def audit_verify(
    key_file: KeyFileOpt = None,
    last_anchor: Annotated[
        str | None,
        typer.Option(
            "--last-anchor",
            help="The last anchor's pin (ID:MAC, as `audit anchor` printed it), kept outside "
            "the database: a missing or replaced anchor is then found.",
        ),
    ] = None,
    pin_file: PinFileOpt = None,
    allow_unanchored: Annotated[
        bool,
        typer.Option(
            "--allow-unanchored",
            help="With a key, accept a trail no anchor signs (one never anchored).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Check the audit trail's hash chains, and (with the key) its anchors: an edited,
    deleted or reordered event, a rewritten chain, an event outside the chains, a deleted
    anchor, or an execution record that no longer holds what its last event recorded
    (status, outcome digest, retention tombstone) is reported. Exit 1 if any is found.

    Without a key the anchors cannot be checked, so a wholesale rewrite of a chain goes
    unnoticed: pass --key-file or set $SAFEAGENT_AUDIT_KEY. Without --last-anchor or
    --pin-file, the newest anchors can be deleted unnoticed."""
    pin = _read_pin(last_anchor, pin_file)
    key = _load_key(key_file, required=False)
    if pin is not None:
        audit_lib.parse_pin(pin)  # a bad pin is a usage error before the store is opened
    with opened(resolve_target(db, database_url, schema)) as store:
        report = audit_lib.verify(
            store, key=key, last_anchor=pin, allow_unanchored=allow_unanchored
        )
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
    pinned = None if pin is None else audit_lib.parse_pin(pin)[0]
    if as_json:
        print_json(
            {
                "ok": report.ok,
                "events_checked": report.events_checked,
                "events_legacy": report.events_legacy,
                "anchors_checked": report.anchors_checked,
                "anchors_unverified": report.anchors_unverified,
                "last_anchor": pinned,
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
        if report.ok:
            verdict = "ok"
        elif all(p["kind"] == "busy" for p in problems):
            # Nothing found, nothing vouched for: subjects that never held still.
            verdict = (
                f"NOT VERIFIED: {len(problems)} subject(s) changed under every read; run it again"
            )
        else:
            verdict = f"TAMPERED: {len(problems)} problem(s)"
        notes = []
        if pinned is not None:
            notes.append(f"last anchor #{pinned} checked against its pin")
        if report.receipts_unverified:
            notes.append(
                f"{report.receipts_unverified} receipts unverified: no outcome digest to "
                "compare, or only events from before the chains"
            )
        if report.events_legacy:
            notes.append(
                f"{report.events_legacy} legacy events from before the chains, not verified"
            )
        out_console().print(
            f"{verdict}: {report.events_checked} events, {report.anchors_checked} anchors "
            f"and {report.receipts_checked} receipts checked"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def _write_pin(path: Path, pin: str) -> None:
    """Replace ``path`` with ``pin`` and a newline, atomically (a reader sees the old pin
    or the new one), fsynced."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="ascii") as handle:
            handle.write(pin + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@audit_app.command("anchor", epilog=EXIT_CODES)
@cli_command
def audit_anchor(
    key_file: KeyFileOpt = None,
    pin_file: Annotated[
        Path | None,
        typer.Option(
            "--pin-file",
            help="Also write the new anchor's pin (ID:MAC) to this file, replacing it: keep "
            "it outside the database, for `audit verify --pin-file`.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    database_url: UrlOpt = None,
    schema: SchemaOpt = DEFAULT_SCHEMA,
) -> None:
    """Anchor the heads of the audit chains with the HMAC key (held outside the database):
    run it periodically (cron); events written after the last anchor are only as safe as
    the database. Prints the anchor's pin (ID:MAC): keep it outside the database (or use
    --pin-file), so `audit verify` can tell that no anchor was deleted. Exit 2 without a
    key."""
    key = _load_key(key_file, required=True)
    assert key is not None
    if pin_file is not None and not pin_file.parent.is_dir():
        raise CliError(EXIT_USAGE, f"no directory for the pin file {pin_file}: nothing anchored")
    with opened(resolve_target(db, database_url, schema)) as store:
        anchor = audit_lib.anchor(store, key=key)
    heads = {str(shard): list(head) for shard, head in sorted(anchor.heads.items())}
    if pin_file is not None:
        try:
            _write_pin(pin_file, anchor.pin)
        except OSError as exc:
            raise CliError(
                EXIT_FAILED,
                f"anchor #{anchor.id} was stored, but the pin file {pin_file} could not be "
                f"written ({exc}): keep {anchor.pin} outside the database yourself",
            ) from exc
    if as_json:
        print_json(
            {
                "id": anchor.id,
                "at_ms": anchor.at_ms,
                "heads": heads,
                "mac": anchor.mac,
                "pin": anchor.pin,
            }
        )
        return
    out_console().print(
        f"anchor #{anchor.id} at {iso(anchor.at_ms)}: {len(heads)} chain heads signed"
    )
    # plain, on one line, however narrow the terminal: it is copied as it is
    print_line(
        f"pin {anchor.pin} written to {pin_file}"
        if pin_file is not None
        else f"pin (keep it outside the database): {anchor.pin}"
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
        readable = _ExportedEvents(store, export=False)
        found = audit_lib.stats(readable, since_ms=since_ms, until_ms=until_ms, namespace=namespace)
    warn_unreadable(readable.unreadable, "audit event(s)", "not counted")
    counts: dict[str, Any] = {
        "executions": found.executions,
        "replays": found.replays,
        "conflicts": found.conflicts,
        "in_doubt": found.in_doubt,
        "per_action": found.per_action,
        "events_unreadable": len(readable.unreadable),
    }
    if as_json:
        print_json({**counts, "since_ms": since_ms, "until_ms": until_ms})
        return
    names = ("executions", "replays", "conflicts", "in_doubt")
    print_table(
        ("ACTION", "EXECUTIONS", "REPLAYS", "CONFLICTS", "IN-DOUBT EVENTS"),
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
    their payload; pending and in-doubt records are never touched. The cutoff is read once,
    on the store's clock, before asking: the one shown is the one purged. Asks first unless
    --yes; exit 1 if declined."""
    seconds = parse_duration(older_than, "--older-than")
    by = check_name("actor", by)  # before the store is opened or the question asked
    target = resolve_target(db, database_url, schema)
    with opened(target) as store:
        # One cutoff, read once on the store's clock before the question: the instant
        # shown is the one purged, however long the answer takes (a record finishing
        # meanwhile is after it, and kept).
        _, now_ms = store.records(limit=0)
        cutoff_ms = now_ms - round(seconds * 1000)
        cutoff = iso(cutoff_ms)
        question = f"Purge records finished before {cutoff} in {target.describe()}?"
        if not yes and not confirm(question):
            raise CliError(EXIT_FAILED, "not confirmed: nothing was purged")
        report = retention.purge(store, before_ms=cutoff_ms, actor=by)
    counts = {
        k: getattr(report, k) for k in ("tombstoned", "released", "kept_pending", "kept_in_doubt")
    }
    if as_json:
        print_json({"cutoff": cutoff, "cutoff_ms": cutoff_ms, **counts})
        return
    print_pairs([("cutoff", cutoff), *counts.items()], title="purge")
