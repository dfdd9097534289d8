"""What every command shares: exit codes, store selection, output and parsing."""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import os
import re
import sqlite3
import sys
import time
import typing
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
import typer.models
from rich.console import Console
from rich.table import Table
from rich.text import Text

from safeagent import AuditEvent, SQLiteStore, default_redactor
from safeagent import audit as audit_lib
from safeagent._keys import MAX_DEPTH, check_name, nested_deeper, storable, storable_text
from safeagent._policy import MAX_RETENTION
from safeagent._receipt import Receipt, Record
from safeagent.errors import ConfigurationError, GuardError, InvalidInputError, StoreError
from safeagent.stores import ReceiptStore
from safeagent.stores._as_stored import Unreadable
from safeagent.stores._base import DATABASE_URL_ENV, stored_number
from safeagent.stores._pg_sql import SCHEMA_VERSION as PG_SCHEMA_VERSION
from safeagent.stores.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from safeagent.stores.sqlite import default_path

P = ParamSpec("P")
R = TypeVar("R")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STORE = 3

EXIT_CODES = (
    "\b\nExit codes:\n"
    "  0  ok\n"
    "  1  a check failed, an id was not found, or the request was refused\n"
    "  2  usage error or bad input\n"
    "  3  the store is missing, unreachable or failed"
)
AUDIT_KEY_ENV = audit_lib.KEY_ENV
DEFAULT_SCHEMA = "safeagent"
DEFAULT_NAMESPACE = "default"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# A password in a URL's user info: after the first ":" of the authority, up to its last
# "@" before any "?" or "#" (a "/" in it too, which libpq would not read as a password
# but its owner meant as one; libpq reads a "?" as part of one: see mask_conninfo)
_URL_PASSWORD = re.compile(r"(://[^/:?#\s]*:)([^?#\s]*)@")
# libpq's secret keywords: the password, and the passphrase of the client's SSL key.
_SECRET_KEYS = ("password", "sslpassword")
# ...as a URL query parameter (?password=...&...), up to the next parameter or fragment
_QUERY_SECRET = re.compile(r"(?i)([?&](?:ssl)?password=)([^&#\s]*)")
# ...in a key=value string: a quoted value (unterminated too), else a bare one and the
# bare words after it that hold no "=" (libpq refuses them, but they are likely the rest
# of a password with spaces, and its error message would echo them)
_KV_SECRET = re.compile(
    r"(?i)(?<![A-Za-z0-9_])((?:ssl)?password\s*=\s*)"
    r"('(?:[^'\\]|\\.)*(?:'|$)|[^\s']\S*(?:\s+[^\s=']+(?=\s|$))*)"
)
# ...in free text (a driver's message): the same, a bare value stopping at a quote or "&"
_TEXT_SECRET = re.compile(
    r"(?i)(?<![A-Za-z0-9_])((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*(?:'|$)|[^\s'\"&]+)"
)
MASK = "***"
_IN_PLAY: list[str] = []  # connection strings this command was given: masked in messages
_URL_SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.-]*)://")
MAX_DURATION = MAX_RETENTION
"""Longest duration a command takes (``--older-than``, ``--since 7d``): 100 years, in
seconds, the bound of ``safeagent.retention.purge``; an instant that long ago is still
one ``datetime`` and every store can hold."""
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class CliError(Exception):
    """A message for the operator and the exit code that goes with it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fail(code: int, message: str) -> NoReturn:
    """Print ``error: <message>`` on one line of standard error and exit with ``code``.

    Lone surrogates (bytes of a non-UTF-8 argument or file name) and NUL in the message
    are printed as backslash escapes, so reporting bad input cannot fail in turn. Every
    password of a connection string the command was given (and of
    ``$SAFEAGENT_DATABASE_URL``) is masked (:func:`scrub`), whoever wrote the message.
    """
    err_console().print(f"error: {storable_text(scrub(message))}")
    raise typer.Exit(code)


# -- passwords in connection strings ----------------------------------------------------------


def _conninfo(url: str) -> dict[str, str] | None:
    """``url`` as psycopg's (libpq's) own parser reads it; ``None`` without psycopg, or
    when it cannot parse it."""
    try:
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - optional extra

        return {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except Exception:  # noqa: BLE001 - ImportError, psycopg.ProgrammingError and kin
        return None


def _is_url(text: str) -> bool:
    return _URL_SCHEME.match(text) is not None


def _mask_forms(text: str, *, kind: str) -> str:
    """``text`` with the password of every form masked by pattern: ``user:pass@`` and
    ``?password=`` in a URL, ``password=`` (quoted or not) in a key=value string, and
    ``sslpassword`` alike. ``kind``: ``"url"``, ``"conninfo"`` (key=value) or
    ``"text"`` (a message: every form)."""
    text = _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)
    text = _QUERY_SECRET.sub(rf"\g<1>{MASK}", text)
    if kind == "url":
        return text
    return (_KV_SECRET if kind == "conninfo" else _TEXT_SECRET).sub(rf"\g<1>{MASK}", text)


def mask_conninfo(url: str) -> str:
    """``url`` (a PostgreSQL URL or libpq key=value string) as messages show it: every
    password masked. The patterns of :func:`_mask_forms` do it; when psycopg is installed
    its own parser checks the result, and if the masked string still yields a password
    (a form the patterns miss: ``?pass%77ord=``, a ``/`` in the password), the string is
    rebuilt from what the parser read with every password replaced
    (``psycopg.conninfo.make_conninfo``)."""
    masked = _mask_forms(url, kind="url" if _is_url(url) else "conninfo")
    info = _conninfo(url)
    if info is None or not any(info.get(k) for k in _SECRET_KEYS):
        return masked
    again = _conninfo(masked)
    if again is not None and all(again.get(k) in (None, "", MASK) for k in _SECRET_KEYS):
        return masked
    from psycopg.conninfo import make_conninfo  # noqa: PLC0415 - parsed by psycopg above

    return make_conninfo("", **{k: MASK if k in _SECRET_KEYS else v for k, v in info.items()})


def _secrets(url: str) -> set[str]:
    """Every text that may be a password of ``url``: what psycopg's parser reads, and what
    the patterns find (raw, percent-decoded, unquoted, and each word of a value with
    spaces, which libpq's error messages quote one by one)."""
    found: set[str] = set()
    info = _conninfo(url)
    if info is not None:
        found.update(info.get(k, "") for k in _SECRET_KEYS)
    values = [m.group(2) for m in _URL_PASSWORD.finditer(url)]
    values += [m.group(2) for m in _QUERY_SECRET.finditer(url)]
    if not _is_url(url):
        values += [m.group(2) for m in _KV_SECRET.finditer(url)]
    for value in values:
        bare = value.strip("'")
        unescaped = re.sub(r"\\(.)", r"\1", bare)
        found.update((value, bare, unescaped, *unescaped.split()))
        found.update((urllib.parse.unquote(value), urllib.parse.unquote_plus(value)))
    found.discard(MASK)
    return {s for s in found if s.strip()}


def scrub(text: str, *urls: str) -> str:
    """``text`` (a message, possibly a driver's, which may echo the connection string or
    part of it) with every password masked: those of ``urls`` and of every connection
    string this command was given (:func:`remember_conninfo`), by value, and any
    ``password=`` or ``user:pass@`` by pattern. A value shorter than 4 characters is
    masked only as a whole word, so the rest of the message stays readable."""
    for url in (*urls, *_IN_PLAY):
        if url in text:
            text = text.replace(url, mask_conninfo(url))
    secrets = set().union(*(_secrets(url) for url in (*urls, *_IN_PLAY)))
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, MASK)
        else:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    return _mask_forms(text, kind="text")


def remember_conninfo(url: str | None) -> None:
    """Mask ``url``'s passwords in every message this command prints from now on."""
    if url and url not in _IN_PLAY:
        _IN_PLAY.append(url)


def shown_text(text: str) -> str:
    """How a text argument that is not valid UTF-8 is shown in a message: the bytes the
    operator typed (``b'r\\xff'``), whose lone surrogates are those bytes escaped
    (``surrogateescape``), else the text with its code points escaped."""
    try:
        return repr(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        return ascii(text)


def param_label(command: Callable[..., Any], name: str) -> str:
    """How the command line spells parameter ``name`` of ``command``: an option by its
    long flag (``--namespace``), an argument as its help shows it (``REQUEST_ID``), read
    from the ``typer.Option`` / ``typer.Argument`` in its annotation."""
    try:
        hint = typing.get_type_hints(command, include_extras=True).get(name)
    except Exception:  # noqa: BLE001 - only a label for a message
        hint = None
    # Python 3.10 wraps the Annotated of a parameter defaulting to None in Optional[...]
    annotated = [h for h in (hint, *typing.get_args(hint)) if hasattr(h, "__metadata__")]
    for info in annotated[0].__metadata__ if annotated else ():
        if isinstance(info, typer.models.OptionInfo):
            # In Annotated, typer takes the first flag from `default`.
            flags = [d for d in (info.default, *(info.param_decls or ())) if isinstance(d, str)]
            longest = sorted(flags, key=lambda d: not d.startswith("--"))
            return longest[0] if longest else "--" + name.replace("_", "-")
        if isinstance(info, typer.models.ArgumentInfo):
            return name.upper()
    return name


def check_text_arguments(command: Callable[..., Any], values: Mapping[str, Any]) -> None:
    """Refuse any text argument of ``command`` (a ``str``, or a list of them) that is not
    valid UTF-8 without NUL: a non-UTF-8 command-line argument reaches Python as lone
    surrogates (``surrogateescape``), which no store can hold or look up. File paths
    (``Path``) may hold any bytes and are not checked.

    Raises:
        CliError: EXIT_USAGE, naming the argument (``--namespace``, ``REQUEST_ID``) and
            showing the bytes given.
    """
    for name, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, str) and not storable(item):
                raise CliError(
                    EXIT_USAGE,
                    f"invalid value for {param_label(command, name)}: not valid UTF-8 text "
                    f"without NUL: {shown_text(item)}",
                )


def check_namespace(namespace: object) -> None:
    """Refuse a ``--namespace`` no record can have (empty, longer than 255 characters),
    with the library's own rule and message (``check_name``), for every command alike:
    a listing filtered by one would match nothing and exit 0. ``None`` (no filter) passes.

    Raises:
        InvalidInputError: a namespace the library refuses (exit 2).
    """
    if namespace is not None:
        check_name("namespace", namespace)


def cli_command(fn: Callable[P, R]) -> Callable[P, R]:
    """Check every text argument (:func:`check_text_arguments`) and the namespace
    (:func:`check_namespace`) before the command runs, then map the library's
    exceptions to exit codes and one-line messages: its typed input errors
    (``InvalidInputError`` and its subclasses, ``ConfigurationError``) to 2, ``StoreError``
    to 3, other ``GuardError`` refusals to 1."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        _IN_PLAY.clear()  # one command per call (CliRunner runs many in one process)
        remember_conninfo(os.environ.get(DATABASE_URL_ENV))
        given = kwargs.get("database_url")
        remember_conninfo(given if isinstance(given, str) else None)
        try:
            check_text_arguments(fn, kwargs)
            check_namespace(kwargs.get("namespace"))
            return fn(*args, **kwargs)
        except CliError as exc:
            fail(exc.code, exc.message)
        except StoreError as exc:  # includes SchemaVersionError
            fail(EXIT_STORE, str(exc))
        except (ConfigurationError, InvalidInputError) as exc:
            fail(EXIT_USAGE, str(exc))
        except GuardError as exc:  # InvalidTransitionError, NotFinalError, ...
            fail(EXIT_FAILED, str(exc))

    return run


# -- output ----------------------------------------------------------------------------------


def _encoding(stream: IO[str]) -> str:
    """The encoding ``stream`` writes, by its codec's name (UTF-8 when it does not say)."""
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name
    except LookupError:
        return "utf-8"


def _fits(char: str, encoding: str) -> bool:
    try:
        char.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def _escaped(text: str, stream: IO[str], escape: Callable[[str], str]) -> str:
    """``text`` with every character ``stream`` cannot encode strictly (a lone surrogate
    anywhere; ``é`` on an ASCII terminal) replaced by ``escape(char)``, so printing it
    cannot fail, and never writes a surrogate's raw byte (``surrogateescape``)."""
    encoding = _encoding(stream)
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return "".join(c if _fits(c, encoding) else escape(c) for c in text)
    return text


_INVISIBLE = "\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
"""Characters that move or reorder text without showing: zero-width ones, the line and
paragraph separators (a table breaks its rows at them) and the bidirectional controls
(which reorder how an id reads)."""
_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f{_INVISIBLE}]")
"""Control characters: C0 (newline, tab, ESC, BEL...), DEL, C1 (CSI ``\\x9b``...) and
:data:`_INVISIBLE`."""


def printable(text: str, stream: IO[str] | None = None) -> str:
    """``text`` as a table or message shows it on ``stream`` (standard output by default):
    every control character (C0, DEL, C1: an ESC sequence, a newline, a bell in an id an
    agent chose; and the invisible ones, a line separator, a bidirectional override) as
    its Python escape (``\\x1b``, ``\\n``, ``\\u2028``), so stored text cannot move the
    cursor, fake a row, reorder an id or restyle the terminal; and what the stream cannot
    encode as a visible backslash escape (``\\udcff``, ``\\xe9``)."""
    text = _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)
    return _escaped(
        text,
        sys.stdout if stream is None else stream,
        lambda c: c.encode("ascii", "backslashreplace").decode("ascii"),
    )


def json_printable(text: str, stream: IO[str] | None = None) -> str:
    """JSON ``text`` as written to ``stream`` (standard output by default): what the stream
    cannot encode as a JSON ``\\uXXXX`` escape, which only a JSON string can hold, so the
    output is still valid JSON with the same value; other non-ASCII text is left alone."""
    return _escaped(text, sys.stdout if stream is None else stream, lambda c: json.dumps(c)[1:-1])


class JsonEscapingWriter:
    """A text stream that writes JSON (or CSV of JSON) to ``stream`` through
    :func:`json_printable`, for writers that take a stream (``safeagent.audit.export``)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(json_printable(text, self.stream))

    def flush(self) -> None:
        self.stream.flush()


class _Console(Console):
    """A rich console whose text (``console.print("...")``) is :func:`printable`: a message
    holding a lone surrogate or a character the stream cannot encode cannot fail."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(
            *(printable(o, self.file) if isinstance(o, str) else o for o in objects), **kwargs
        )


def _console(file: IO[str]) -> Console:
    wide = file.isatty() or bool(os.environ.get("COLUMNS"))
    return _Console(
        file=file, width=None if wide else 1000, highlight=False, markup=False, emoji=False
    )


def out_console() -> Console:
    return _console(sys.stdout)


def err_console() -> Console:
    return _console(sys.stderr)


def confirm(question: str) -> bool:
    """Ask on the terminal; no answer (end of input) is a no."""
    try:
        return typer.confirm(printable(question, sys.stderr), default=False, err=True)
    except typer.Abort:
        typer.echo(err=True)
        return False


_RAW_IN_JSON = re.compile(f"[\x7f-\x9f{_INVISIBLE}]")
"""The control characters ``json.dumps`` leaves raw: DEL, C1 and :data:`_INVISIBLE`."""


def print_json(value: Any, *, indent: int | None = 2) -> None:
    """``value`` as JSON on standard output (one line with ``indent=None``): non-ASCII
    text as is except control characters (``\\u001b``, ``\\u009b``: JSON escapes,
    the same value), and what standard output cannot encode (a lone surrogate a stored result
    may hold) as a ``\\uXXXX`` escape (:func:`json_printable`), so the output is valid JSON."""
    text = json.dumps(value, indent=indent, ensure_ascii=False, default=str)
    # json.dumps escapes C0 itself; the others (only ever inside a string) as \u escapes.
    text = _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    typer.echo(json_printable(text))


def print_line(text: str) -> None:
    """One line of text on standard output, as a table shows it (:func:`printable`)."""
    typer.echo(printable(text))


def iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    try:  # exact, and portable to instants before 1970 (fromtimestamp is not)
        moment = _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:  # beyond year 1 or 9999
        return f"{ms} ms since 1970"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None
) -> None:
    table = Table(box=None, pad_edge=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:  # escaped before rich measures the columns
        table.add_row(*(Text("-" if cell is None else printable(str(cell))) for cell in row))
    console = out_console()
    if title is not None:
        console.print(title)
    console.print(table)


def print_pairs(pairs: Sequence[tuple[str, Any]], title: str | None = None) -> None:
    print_table(("FIELD", "VALUE"), [(k, compact(v)) for k, v in pairs], title=title)


def compact(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


# -- options ---------------------------------------------------------------------------------

DbOpt = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="SQLite database file (default: $SAFEAGENT_DB, else ./safeagent.db).",
        show_default=False,
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help=f"PostgreSQL URL (default: ${DATABASE_URL_ENV}); wins over $SAFEAGENT_DB.",
        show_default=False,
    ),
]
SchemaOpt = Annotated[str, typer.Option("--schema", help="PostgreSQL schema.")]
NsFilterOpt = Annotated[
    str | None,
    typer.Option("--namespace", help="Only this namespace (default: every namespace)."),
]
NsOpt = Annotated[str, typer.Option("--namespace", help="The record's namespace.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SinceOpt = Annotated[
    str | None,
    typer.Option("--since", help="From this instant: ISO 8601, or a duration ago (2h, 7d)."),
]
UntilOpt = Annotated[
    str | None,
    typer.Option("--until", help="Up to this instant: ISO 8601, or a duration ago (30m)."),
]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--key-file", help=f"File holding the audit HMAC key (default: ${AUDIT_KEY_ENV})."
    ),
]


@dataclass(frozen=True, slots=True)
class Target:
    """Where the store is: an SQLite file or a PostgreSQL URL and schema."""

    kind: str  # "sqlite" or "postgres"
    where: str
    schema: str = DEFAULT_SCHEMA

    def describe(self) -> str:
        if self.kind == "sqlite":
            return self.where
        return f"{mask_conninfo(self.where)} (schema {self.schema})"


def resolve_target(db: Path | None, database_url: str | None, schema: str) -> Target:
    """The rule: --database-url, --db, $SAFEAGENT_DATABASE_URL, $SAFEAGENT_DB, ./safeagent.db.

    Raises:
        CliError: EXIT_USAGE for --db with --database-url, or a URL that is not a
            PostgreSQL one (:func:`check_database_url`).
    """
    if db is not None and database_url:
        raise CliError(EXIT_USAGE, "--db and --database-url are exclusive: pass one")
    if database_url:
        return Target("postgres", check_database_url(database_url, "--database-url"), schema)
    if db is not None:
        return Target("sqlite", str(db))
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return Target("postgres", check_database_url(url, f"${DATABASE_URL_ENV}"), schema)
    return Target("sqlite", default_path())


def check_database_url(url: str, source: str) -> str:
    """Check, before anything connects, that ``url`` names a PostgreSQL database: a
    ``postgresql://`` (or ``postgres://``) URL or a libpq ``key=value`` string that
    libpq can parse. ``source`` names where it came from, for the message.

    Raises:
        CliError: EXIT_USAGE for anything else (``mysql://...``, a file path, text that
            is not valid UTF-8); the password is masked in the message.
    """
    remember_conninfo(url)
    masked = mask_conninfo(url)
    if not storable(url):
        raise CliError(
            EXIT_USAGE, f"{source} is not valid UTF-8 text without NUL: {shown_text(masked)}"
        )
    scheme = _URL_SCHEME.match(url)
    if scheme is not None and scheme.group(1).lower() not in ("postgresql", "postgres"):
        raise CliError(
            EXIT_USAGE,
            f"{source} must be a PostgreSQL URL (postgresql://user@host:5432/db) or a libpq "
            f"key=value string, got a {scheme.group(1)}:// URL: {masked}",
        )
    if scheme is None and "=" not in url:
        raise CliError(
            EXIT_USAGE,
            f"{source} must be a PostgreSQL URL (postgresql://user@host:5432/db) or a libpq "
            "key=value string (an SQLite file goes in --db or $SAFEAGENT_DB)",
        )
    try:
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - optional extra
    except ImportError:  # _check_postgres says what to install
        return url
    try:
        conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError and kin
        detail = scrub(str(exc), url)  # libpq quotes what it could not parse
        raise CliError(
            EXIT_USAGE, f"{source} is not a valid PostgreSQL connection string: {detail}".strip()
        ) from exc
    return url


def _check_sqlite(path: Path) -> None:
    """Refuse a missing file, or one that is not a SafeAgent database, creating nothing."""
    if not path.exists():
        raise CliError(
            EXIT_STORE,
            f"no SafeAgent database at {path.absolute()}: pass --db PATH or set $SAFEAGENT_DB "
            "(nothing was created)",
        )
    if not path.is_file():
        raise CliError(EXIT_STORE, f"{path} is not a file")
    try:
        conn = sqlite3.connect(str(path), timeout=5)
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'safeagent_meta'"
            ).fetchone()
            version = None
            if found is not None:
                version = conn.execute(
                    "SELECT value FROM safeagent_meta WHERE key = 'schema_version'"
                ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise CliError(EXIT_STORE, f"cannot read {path}: {exc}") from exc
    if found is None:
        raise CliError(EXIT_STORE, f"{path} is not a SafeAgent database (nothing was changed)")
    _refuse_older(None if version is None else version[0], str(path), SQLITE_SCHEMA_VERSION)


def _refuse_older(value: Any, where: str, current: int) -> None:
    """Refuse a schema an older SafeAgent wrote: opening it would upgrade it, and the
    release the application runs would then refuse to start on it. The application's own
    next start upgrades it; the CLI never does. A version the store cannot read, or a
    newer one, is left to the store to report.

    Raises:
        CliError: exit 3, nothing was changed.
    """
    version = stored_number(value)
    if version is not None and version < current:
        raise CliError(
            EXIT_STORE,
            f"{where} has schema version {version}, written by an older SafeAgent; this CLI "
            f"would upgrade it to {current}, and that release would then refuse to open it. "
            "Use the CLI of the release the application runs, or upgrade the application "
            "first (its next start upgrades the schema). Nothing was changed.",
        )


def _check_postgres(target: Target) -> None:
    """Refuse an unreachable server or a schema SafeAgent never created."""
    if not _SCHEMA_NAME.match(target.schema):
        raise CliError(EXIT_USAGE, f"--schema must be a plain identifier, got {target.schema!r}")
    try:
        import psycopg  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise CliError(
            EXIT_USAGE,
            "PostgreSQL needs psycopg: pip install -e '.[postgres]' in a SafeAgent clone",
        ) from exc
    try:
        with psycopg.connect(target.where, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT to_regclass(%s)", (f"{target.schema.lower()}.safeagent_meta",)
            ).fetchone()
            version = None
            if row is not None and row[0] is not None:
                version = conn.execute(
                    f"SELECT value FROM {target.schema}.safeagent_meta"  # a checked identifier
                    " WHERE key = 'schema_version'"
                ).fetchone()
    except psycopg.Error as exc:
        detail = scrub(str(exc), target.where)  # libpq may echo the connection string
        raise CliError(
            EXIT_STORE, f"cannot reach PostgreSQL at {target.describe()}: {detail}".strip()
        ) from exc
    if row is None or row[0] is None:
        raise CliError(
            EXIT_STORE,
            f"no SafeAgent schema {target.schema!r} at {target.describe()} "
            "(pass --schema; nothing was created)",
        )
    _refuse_older(
        None if version is None else version[0],
        f"schema {target.schema!r} at {target.describe()}",
        PG_SCHEMA_VERSION,
    )


def open_store(target: Target) -> ReceiptStore:
    """Open the store at ``target``, which must already exist."""
    if target.kind == "sqlite":
        path = Path(target.where)
        _check_sqlite(path)
        return SQLiteStore(path)
    _check_postgres(target)
    from safeagent.stores.postgres import PostgresStore  # noqa: PLC0415 - optional extra

    return PostgresStore(target.where, schema=target.schema)


@contextmanager
def opened(target: Target) -> Iterator[ReceiptStore]:
    store = open_store(target)
    try:
        yield store
    finally:
        store.close()


# -- parsing ---------------------------------------------------------------------------------


def parse_duration(text: str, option: str) -> float:
    """Seconds in ``text`` such as ``90s``, ``15m``, ``2h``, ``7d``, ``2w`` (a unit is
    required: ``--older-than 30`` could mean seconds or days), at most
    :data:`MAX_DURATION` (100 years).

    Raises:
        CliError: EXIT_USAGE for no unit, or a duration longer than 100 years.
    """
    match = _DURATION.match(text)
    if match is None:
        raise CliError(
            EXIT_USAGE,
            f"{option}: expected a duration with a unit (ms, s, m, h, d, w) "
            f"such as 2h or 30d, got {text!r}",
        )
    value = float(match.group(1)) * _UNITS[match.group(2)]  # inf for absurd digit runs
    if not value <= MAX_DURATION:
        raise CliError(
            EXIT_USAGE,
            f"{option}: at most 100 years ({MAX_DURATION / 86400:.0f}d), got {text.strip()!r}",
        )
    return value


def parse_instant(text: str | None, option: str, now_ms: int) -> int | None:
    """Milliseconds since the epoch: ISO 8601 (naive means UTC) or a duration ago."""
    if text is None:
        return None
    if _DURATION.match(text):
        return now_ms - round(1000 * parse_duration(text, option))
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            EXIT_USAGE,
            f"{option}: expected ISO 8601 (2024-05-01T12:00:00Z) or a duration "
            f"ago (2h, 7d), got {text!r}",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return round(moment.timestamp() * 1000)


def time_window(since: str | None, until: str | None) -> tuple[int | None, int | None]:
    now = time.time_ns() // 1_000_000
    since_ms = parse_instant(since, "--since", now)
    until_ms = parse_instant(until, "--until", now)
    if since_ms is not None and until_ms is not None and since_ms > until_ms:
        raise CliError(EXIT_USAGE, "--since is after --until")
    return since_ms, until_ms


def parse_json(text: str, option: str) -> Any:
    """``text`` parsed as JSON; a usage error (exit 2) for anything that is not JSON or
    nests deeper than the library allows a payload (``MAX_DEPTH``, 100 levels), on every
    Python (how deep ``json.loads`` itself goes differs between versions)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError(EXIT_USAGE, f"{option}: not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise CliError(EXIT_USAGE, f"{option}: JSON nested too deeply") from exc
    if nested_deeper(value, MAX_DEPTH):
        raise CliError(EXIT_USAGE, f"{option}: JSON nested too deeply (over {MAX_DEPTH} levels)")
    return value


# -- receipts and events ------------------------------------------------------------------


SHOWN_DEPTH = 100
"""Levels of a stored value the CLI shows (the most a payload may have): a result may be
nested nearly as deep as the recursion limit, and would fail redaction or printing."""


def shown(value: Any, depth: int = 0) -> Any:
    """``value`` with every list or object nested deeper than :data:`SHOWN_DEPTH` levels
    replaced by a note saying so (the library still returns it whole)."""
    if isinstance(value, (dict, list)):
        if depth >= SHOWN_DEPTH:
            return f"[nested deeper than {SHOWN_DEPTH} levels: not shown]"
        if isinstance(value, dict):
            return {key: shown(item, depth + 1) for key, item in value.items()}
        return [shown(item, depth + 1) for item in value]
    return value


def receipt_dict(record: Record, now_ms: int, *, redact: bool, payload: bool) -> dict[str, Any]:
    receipt = Receipt.from_record(record, replay=False, now_ms=now_ms)
    # to_dict decodes the payload; a listing shows none (and one that is not JSON, edited
    # by hand, must not fail the row: receipts show reports it)
    out = dataclasses.replace(receipt, payload_json=None).to_dict()
    out.pop("replay", None)
    out.pop("payload", None)

    def hide(value: Any) -> Any:
        return default_redactor(shown(value)) if redact else shown(value)

    out["result"] = hide(out["result"])
    out["stored_status"] = record.status.value
    out["lease_owner"] = record.lease_owner
    out["lease_expires_at_ms"] = record.lease_expires_at_ms
    # In doubt: the attempt that ran fn and when it ended, not a reconciler that took over.
    out["attempt_owner"] = receipt.attempt_owner
    out["attempt_ended_at_ms"] = receipt.attempt_ended_at_ms
    out["updated_at_ms"] = record.updated_at_ms
    out["purged_at_ms"] = getattr(record, "purged_at_ms", None)
    if payload:
        out["payload"] = hide(json.loads(record.payload_json)) if record.payload_json else None
    return out


def status_text(row: Mapping[str, Any]) -> str:
    status = str(row["status"])
    if row.get("purged_at_ms") is not None:  # a released row still runs on the next call
        return f"{status} (payload purged)" if status == "RELEASED" else f"{status} (tombstone)"
    if status != row["stored_status"]:
        return f"{status} (lease expired)"
    return status


def stored_iso(value: Any) -> str:
    """An instant as stored (ms) in ISO 8601, or ``-`` when the row holds no integer."""
    return iso(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def event_line(event: AuditEvent | Unreadable) -> str:
    """One line of ``audit tail``; an unreadable event says what cannot be read."""
    if isinstance(event, Unreadable):
        where = f"{event.get('namespace')}/{event.get('subject')}"
        return (
            f"{stored_iso(event.get('at_ms'))}  {event.name:<8} {'UNREADABLE':<19} {where}  "
            f"{event.problem}"
        )
    where = f"{event.namespace}/{event.subject}"
    return (
        f"{iso(event.at_ms)}  {'#' + str(event.id):<8} {event.kind.value:<19} {where}  "
        f"{event.action or '-'}  by {event.actor or '-'}  {compact(dict(event.detail))}"
    )


def print_events(events: Sequence[AuditEvent | Unreadable], title: str) -> None:
    print_table(
        ("ID", "AT", "KIND", "ACTOR", "DETAIL"),
        [
            (e.get("id"), stored_iso(e.get("at_ms")), "UNREADABLE", e.get("actor"), e.problem)
            if isinstance(e, Unreadable)
            else (e.id, iso(e.at_ms), e.kind.value, e.actor, compact(dict(e.detail)))
            for e in events
        ],
        title=title,
    )


def warn_unreadable(items: Sequence[Any], what: str, note: str = "shown as UNREADABLE") -> None:
    """On standard error, how many of ``items`` could not be read, and the first few."""
    bad = [i for i in items if isinstance(i, Unreadable)]
    if not bad:
        return
    named = "; ".join(u.describe() for u in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    err_console().print(
        f"warning: {len(bad)} {what} could not be read (edited or corrupt), {note}: {named}"
    )
