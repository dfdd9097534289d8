"""The ``safeagent`` command: passwords never reach a message, and bad arguments are
exit 2 before the store is touched (docs/cli.md, "Exit codes" and "Choosing the store").

Passwords: every form a libpq connection string can carry one in (``user:pass@`` in a
URL, ``?password=`` in its query, ``password=`` in a key=value string, quoted or not,
``sslpassword``, a percent-encoded keyword) is masked in every message, including a
driver's message that echoes the string, whether the server is down (exit 3), the string
is malformed (exit 2) or the server answers (a missing schema or role: exit 3). The real
entry point runs in a subprocess, so what is checked is exactly what a terminal shows.

Order: ``cases signal``, ``cases resolve``, ``cases show`` and ``resolve`` check every
argument with the library's own rules first (exit 2), then open the store (exit 3 if it
is missing), then look the case or record up (exit 1 if absent): bad input is exit 2
whether or not the case, the record or the database exists, and nothing is written.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from safeagent import FinalityGate, Guard, SQLiteStore
from safeagent._cli import _common
from tests._workers import child_env
from tests.conftest import PG_URL, pg_schema, require_postgres

SECRET = "Hunter2Secret"
TIMEOUT = 60
SCRIPT = Path(sys.executable).with_name("safeagent")
ENTRY = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "safeagent"]
STORE_ENV = ("SAFEAGENT_DB", "SAFEAGENT_DATABASE_URL", "SAFEAGENT_AUDIT_KEY", "COLUMNS")

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in STORE_ENV:
        monkeypatch.delenv(name, raising=False)


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console script, its output decoded."""
    base = {k: v for k, v in child_env().items() if k not in STORE_ENV}
    return subprocess.run(
        [*ENTRY, *(str(a) for a in args)],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def cli(*args: str | Path) -> Any:
    """The CLI in-process; click's Result (exit_code, stdout, stderr)."""
    from safeagent._cli import app

    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_hidden(result: Any, *secrets: str) -> str:
    """No secret in standard output or standard error; returns standard error."""
    out = result.stdout if isinstance(result.stdout, str) else result.stdout.decode()
    err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
    for secret in secrets:
        assert secret not in out, out
        assert secret not in err, err
    assert "Traceback" not in err, err
    return err


# -- connection strings holding a password -----------------------------------------------


def forms(host: str, port: str, user: str, dbname: str, secret: str = SECRET) -> list[Any]:
    """The same connection, with ``secret`` as its password, in every form libpq reads."""
    return [
        pytest.param(f"postgresql://{user}:{secret}@{host}:{port}/{dbname}", id="userinfo"),
        pytest.param(f"postgres://{user}:{secret}@{host}:{port}/{dbname}", id="postgres-scheme"),
        pytest.param(f"postgresql://{user}@{host}:{port}/{dbname}?password={secret}", id="query"),
        pytest.param(
            f"postgresql://{user}@{host}:{port}/{dbname}?connect_timeout=5&password={secret}"
            "&application_name=x",
            id="query-middle",
        ),
        pytest.param(
            f"postgresql://{user}@{host}:{port}/{dbname}?pass%77ord={secret}", id="query-encoded"
        ),
        pytest.param(
            f"host={host} port={port} user={user} dbname={dbname} password={secret}", id="kv"
        ),
        pytest.param(
            f"host={host} port={port} password = {secret} user={user} dbname={dbname}",
            id="kv-spaces",
        ),
        pytest.param(
            f"host={host} port={port} user={user} password='{secret} 2' dbname={dbname}",
            id="kv-quoted",
        ),
        pytest.param(
            f"host={host} port={port} user={user} dbname={dbname} sslpassword={secret}",
            id="kv-sslpassword",
        ),
    ]


DOWN = forms("127.0.0.1", "1", "ops", "none")


@pytest.mark.parametrize("url", DOWN)
def test_a_server_that_is_down_is_exit_3_and_the_password_is_masked(url: str) -> None:
    """The reviewer's case: only ``user:pass@`` used to be masked; a key=value string or a
    ``?password=`` query printed the password in the exit-3 message."""
    result = run("receipts", "list", "--database-url", url)
    err = assert_hidden(result, SECRET)
    assert result.returncode == 3, err
    assert err.startswith("error: cannot reach PostgreSQL at "), err
    assert "***" in err, err


@pytest.mark.parametrize("url", DOWN)
def test_the_environment_variable_is_masked_too(url: str) -> None:
    result = run("cases", "list", env={"SAFEAGENT_DATABASE_URL": url})
    err = assert_hidden(result, SECRET)
    assert result.returncode == 3, err
    assert "cannot reach PostgreSQL" in err


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"host=db password=hun {SECRET}", id="kv-unquoted-space"),
        pytest.param(f"host=db password='{SECRET}", id="kv-unterminated-quote"),
        pytest.param(f"postgresql://ops:{SECRET}@[::1/none", id="url-bad-ipv6"),
        pytest.param(f"postgresql://ops@db/none?password={SECRET}&bogus=1", id="url-bad-param"),
        pytest.param(f"host=db password={SECRET} bogus=1", id="kv-bad-keyword"),
    ],
)
def test_a_malformed_string_is_exit_2_and_the_drivers_echo_is_masked(url: str) -> None:
    """psycopg's own message quotes what it could not parse (the whole URI, or the word
    after a password with a space): masked too."""
    result = run("receipts", "list", "--database-url", url)
    err = assert_hidden(result, SECRET)
    assert result.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(
        "error: --database-url is not a valid PostgreSQL connection string"
    ), err


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"mysql://ops:{SECRET}@db/x", id="mysql-userinfo"),
        pytest.param(f"mysql://ops@db/x?password={SECRET}", id="mysql-query"),
    ],
)
def test_a_url_that_is_not_postgresql_is_exit_2_masked(url: str) -> None:
    result = run("receipts", "list", "--database-url", url)
    err = assert_hidden(result, SECRET)
    assert result.returncode == 2, err
    assert "--database-url must be a PostgreSQL URL" in err


def test_a_password_that_is_not_utf8_is_exit_2_masked() -> None:
    """The not-UTF-8 message shows the bytes given, with the password masked."""
    result = cli("receipts", "list", "--database-url", f"host=db\udcff password={SECRET}")
    err = assert_hidden(result, SECRET)
    assert result.exit_code == 2, err
    assert "not valid UTF-8" in err


# -- the same, against the real server ----------------------------------------------------


def pg_parts() -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    info = {k: str(v) for k, v in conninfo_to_dict(PG_URL).items()}
    return {
        "host": info.get("host", "127.0.0.1"),
        "port": info.get("port", "5432"),
        "user": info.get("user", "postgres"),
        "dbname": info.get("dbname", "test"),
    }


@pytest.fixture
def pg_schema_seeded() -> Iterator[str]:
    """A schema SafeAgent created, holding one receipt and one case."""
    require_postgres()
    from safeagent.stores.postgres import PostgresStore

    schema = pg_schema()
    store = PostgresStore(PG_URL, schema=schema)
    guard = Guard(store)
    guard.execute("r-1", "charge", {"amount": 5}, lambda ctx: "ok")
    FinalityGate(guard).signal("case-1", "model", "approve", 0.5)
    guard.close()
    try:
        yield schema
    finally:
        store.drop_schema()
        store.close()


LIVE_IDS = [p.id for p in DOWN if p.id != "kv-sslpassword"]  # libpq wants a key file for it


@pytest.mark.parametrize("form", LIVE_IDS)
def test_a_live_server_with_a_missing_schema_is_exit_3_masked(
    pg_schema_seeded: str, form: str
) -> None:
    """The server answers (it ignores the password: trust authentication), the schema is
    not there: exit 3 naming the masked URL."""
    url = {p.id: p.values[0] for p in forms(**pg_parts())}[form]
    result = run("receipts", "list", "--database-url", url, "--schema", "sa_no_such_schema")
    err = assert_hidden(result, SECRET)
    assert result.returncode == 3, err
    assert "no SafeAgent schema 'sa_no_such_schema'" in err, err


@pytest.mark.parametrize("form", LIVE_IDS)
def test_a_live_server_reads_the_store_with_every_form(pg_schema_seeded: str, form: str) -> None:
    url = {p.id: p.values[0] for p in forms(**pg_parts())}[form]
    result = run("receipts", "list", "--database-url", url, "--schema", pg_schema_seeded)
    err = assert_hidden(result, SECRET)
    assert result.returncode == 0, err
    assert "r-1" in result.stdout


def test_a_refused_role_is_exit_3_masked(pg_schema_seeded: str) -> None:
    """The server refuses the connection (no such role): its message is shown, masked."""
    parts = {**pg_parts(), "user": "sa_no_such_role"}
    for url in (p.values[0] for p in forms(**parts) if p.id in ("kv", "query", "userinfo")):
        result = run("receipts", "list", "--database-url", url, "--schema", pg_schema_seeded)
        err = assert_hidden(result, SECRET)
        assert result.returncode == 3, err
        assert "sa_no_such_role" in err, err


# -- the masking functions, with and without psycopg ---------------------------------------


MASKED = [
    (f"postgresql://ops:{SECRET}@db:5432/x", "postgresql://ops:***@db:5432/x"),
    (f"postgresql://ops@db/x?password={SECRET}", "postgresql://ops@db/x?password=***"),
    (
        f"postgresql://ops@db/x?password={SECRET}&sslmode=disable",
        "postgresql://ops@db/x?password=***&sslmode=disable",
    ),
    (f"host=db password={SECRET} dbname=x", "host=db password=*** dbname=x"),
    (f"host=db password='{SECRET} 2' dbname=x", "host=db password=*** dbname=x"),
    (f"host=db sslpassword={SECRET}", "host=db sslpassword=***"),
    (f"postgresql://user@server:{SECRET}@db/x", "postgresql://user@server:***@db/x"),
    ("host=db dbname=x", "host=db dbname=x"),
    ("postgresql://ops@db:5432/x", "postgresql://ops@db:5432/x"),
]


@pytest.mark.parametrize(("url", "shown"), MASKED)
def test_mask_conninfo_keeps_the_form_and_hides_the_password(url: str, shown: str) -> None:
    assert _common.mask_conninfo(url) == shown


@pytest.fixture
def no_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import psycopg...`` fails, as without the postgres extra."""
    real = builtins.__import__

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "psycopg" or name.startswith("psycopg."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


@pytest.mark.usefixtures("no_psycopg")
@pytest.mark.parametrize(("url", "shown"), MASKED)
def test_without_psycopg_the_patterns_still_mask(url: str, shown: str) -> None:
    assert _common._conninfo(url) is None
    assert _common.mask_conninfo(url) == shown


def test_forms_the_patterns_miss_are_rebuilt_from_psycopgs_parse() -> None:
    """``?pass%77ord=`` (libpq decodes the keyword) and ``?`` inside a password: the
    masked string still parses to a password, so it is rebuilt from the parse."""
    from psycopg.conninfo import conninfo_to_dict

    for url in (
        f"postgresql://ops@db/x?pass%77ord={SECRET}",
        f"postgresql://ops:{SECRET}?x@db/x",
        f"postgresql://ops:{quote(SECRET + '/@')}@db/x",
    ):
        shown = _common.mask_conninfo(url)
        assert SECRET not in shown, shown
        assert conninfo_to_dict(shown).get("password") == "***", shown


def test_scrub_masks_a_message_echoing_the_string_or_its_words() -> None:
    url = f"host=db password=hun {SECRET}"
    assert SECRET not in _common.scrub(f'missing "=" after "{SECRET}" in connection info', url)
    short = "host=db password=pw"
    assert _common.scrub("role ops: pw refused (pwned)", short) == "role ops: *** refused (pwned)"
    assert _common.scrub(f"at postgresql://a:{SECRET}@h/x") == "at postgresql://a:***@h/x"
    assert _common.scrub(f"conninfo host=h password={SECRET}") == "conninfo host=h password=***"


def test_a_library_message_naming_the_string_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever writes the message (here a store that fails while opening), ``fail``
    masks the passwords of the connection string the command was given."""
    url = f"host=127.0.0.1 password={SECRET}"

    def broken(target: Any) -> Any:
        from safeagent.errors import StoreError

        raise StoreError(f"could not open {target.where} (password {SECRET} rejected)")

    monkeypatch.setattr("safeagent._cli._records.opened", broken)
    result = cli("receipts", "list", "--database-url", url)
    err = assert_hidden(result, SECRET)
    assert result.exit_code == 3, err
    assert "could not open host=127.0.0.1 password=*** (password *** rejected)" in err


# -- argument checks come first ------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A SafeAgent database with one case (``case-1``, RESOLVED_PROVISIONAL), one FAILED
    record (``r-f``) and no record or case named ``nope``."""
    path = tmp_path / "guard.db"
    guard = Guard(path)
    FinalityGate(guard).signal("case-1", "model", "approve", 0.5)

    def declined(ctx: Any) -> None:
        raise ValueError("declined")

    with pytest.raises(ValueError, match="declined"):
        guard.execute("r-f", "charge", {"amount": 1}, declined)
    guard.close()
    return path


def snapshot(path: Path) -> Any:
    store = SQLiteStore(path)
    try:
        gate = FinalityGate(Guard(store))
        return (
            [(r.request_id, r.status, r.fencing_token) for r in store.records()[0]],
            [(e.id, e.kind) for e in store.events()],
            [(c.case_id, c.state, c.version, c.signals) for c in gate.cases()],
        )
    finally:
        store.close()


SIGNAL_OK = ["--source", "model-b", "--outcome", "approve", "--confidence", "0.5"]
BAD_SIGNALS = [
    pytest.param(["--source", "a", "--outcome", "b", "--confidence", "nan"], id="confidence-nan"),
    pytest.param(["--source", "a", "--outcome", "b", "--confidence", "inf"], id="confidence-inf"),
    pytest.param(["--source", "a", "--outcome", "b", "--confidence", "1.5"], id="confidence-1.5"),
    pytest.param(["--source", "a", "--outcome", "b", "--confidence", "-0.1"], id="confidence-neg"),
    pytest.param(["--source", "", "--outcome", "b", "--confidence", "0.5"], id="source-empty"),
    pytest.param(["--source", "a", "--outcome", "", "--confidence", "0.5"], id="outcome-empty"),
    pytest.param(
        ["--source", "s" * 256, "--outcome", "b", "--confidence", "0.5"], id="source-long"
    ),
    pytest.param([*SIGNAL_OK, "--metadata", "[1]"], id="metadata-not-object"),
    pytest.param([*SIGNAL_OK, "--metadata", "{"], id="metadata-not-json"),
    pytest.param([*SIGNAL_OK, "--namespace", ""], id="namespace-empty"),
]


@pytest.mark.parametrize("case_id", ["nope", "case-1"])
@pytest.mark.parametrize("open_flag", [[], ["--open"]], ids=["", "open"])
@pytest.mark.parametrize("args", BAD_SIGNALS)
def test_a_bad_signal_is_exit_2_whether_or_not_the_case_exists(
    db: Path, case_id: str, open_flag: list[str], args: list[str]
) -> None:
    """The reviewer's case: on a missing case, ``--confidence nan`` or ``--source ''`` was
    exit 1 ("no case") without --open and exit 2 with it. Now 2 in all four."""
    before = snapshot(db)
    result = cli("cases", "signal", case_id, *args, *open_flag, "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert "no case" not in result.stderr
    assert snapshot(db) == before


def test_a_case_id_too_long_for_its_settlement_is_exit_2(db: Path) -> None:
    before = snapshot(db)
    for args in (["cases", "signal", "c" * 251, *SIGNAL_OK], ["cases", "show", "c" * 251]):
        result = cli(*args, "--db", db)
        assert result.exit_code == 2, result.output
    assert snapshot(db) == before


def test_a_good_signal_on_a_missing_case_is_still_exit_1(db: Path) -> None:
    before = snapshot(db)
    result = cli("cases", "signal", "nope", *SIGNAL_OK, "--db", db)
    assert result.exit_code == 1, result.output
    assert "no case 'nope'" in result.stderr
    assert snapshot(db) == before
    opened = cli("cases", "signal", "nope", *SIGNAL_OK, "--open", "--db", db)
    assert opened.exit_code == 0, opened.output


RESOLVE_OK = ["--outcome", "approve", "--by", "carol", "--reason", "policy R7"]
BAD_RESOLVES = [
    pytest.param(["--outcome", "", "--by", "carol", "--reason", "r"], id="outcome-empty"),
    pytest.param(["--outcome", "a", "--by", "", "--reason", "r"], id="by-empty"),
    pytest.param(["--outcome", "a", "--by", "carol", "--reason", "  "], id="reason-blank"),
    pytest.param([*RESOLVE_OK, "--namespace", ""], id="namespace-empty"),
]


@pytest.mark.parametrize("case_id", ["nope", "case-1"])
@pytest.mark.parametrize("args", BAD_RESOLVES)
def test_a_bad_case_resolution_is_exit_2_whether_or_not_the_case_exists(
    db: Path, case_id: str, args: list[str]
) -> None:
    before = snapshot(db)
    result = cli("cases", "resolve", case_id, *args, "--db", db)
    assert result.exit_code == 2, result.output
    assert snapshot(db) == before


def test_a_good_case_resolution_of_a_missing_case_is_exit_1(db: Path) -> None:
    result = cli("cases", "resolve", "nope", *RESOLVE_OK, "--db", db)
    assert result.exit_code == 1, result.output
    assert cli("cases", "resolve", "case-1", *RESOLVE_OK, "--db", db).exit_code == 0


BAD_RESOLUTIONS = [
    pytest.param(["--released", "--by", "", "--reason", "r"], id="by-empty"),
    pytest.param(["--released", "--by", "a", "--reason", " "], id="reason-blank"),
    pytest.param(["--released", "--by", "a", "--reason", "r", "--namespace", ""], id="ns-empty"),
    pytest.param(["--failed", "--by", "a", "--reason", "r", "--error-type", ""], id="error-type"),
    pytest.param(["--rerun", "--by", "b" * 256, "--reason", "r"], id="by-too-long"),
]


@pytest.mark.parametrize("request_id", ["nope", "r-f", "r" * 256])
@pytest.mark.parametrize("args", BAD_RESOLUTIONS)
def test_a_bad_resolution_is_exit_2_whether_or_not_the_record_exists(
    db: Path, request_id: str, args: list[str]
) -> None:
    before = snapshot(db)
    result = cli("resolve", request_id, *args, "--db", db)
    assert result.exit_code == 2, result.output
    assert snapshot(db) == before


def test_a_good_resolution_of_a_missing_record_is_exit_1(db: Path) -> None:
    result = cli("resolve", "nope", "--released", "--by", "a", "--reason", "r", "--db", db)
    assert result.exit_code == 1, result.output
    rerun = cli("resolve", "r-f", "--rerun", "--by", "a", "--reason", "r", "--db", db)
    assert rerun.exit_code == 0, rerun.output


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["cases", "signal", "nope", "--source", "a", "--outcome", "b",
                      "--confidence", "nan"], id="signal"),
        pytest.param(["cases", "resolve", "nope", "--outcome", "a", "--by", "",
                      "--reason", "r"], id="cases-resolve"),
        pytest.param(["cases", "show", "c" * 251], id="cases-show"),
        pytest.param(["resolve", "nope", "--released", "--by", "", "--reason", "r"],
                     id="resolve"),
    ],
)  # fmt: skip
def test_bad_input_is_exit_2_even_without_a_database(tmp_path: Path, args: list[str]) -> None:
    """Arguments are checked before the store is opened: bad input on a mistyped --db is
    exit 2, not exit 3 ("no SafeAgent database"), and no file is created."""
    missing = tmp_path / "missing.db"
    result = run(*args, "--db", missing)
    assert result.returncode == 2, result.stderr
    assert "no SafeAgent database" not in result.stderr
    assert not missing.exists()


def test_good_input_without_a_database_is_still_exit_3(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    result = run("cases", "signal", "nope", *SIGNAL_OK, "--db", missing)
    assert result.returncode == 3, result.stderr
    assert "no SafeAgent database" in result.stderr
    assert not missing.exists()


def test_on_postgresql_a_bad_signal_is_exit_2_and_a_missing_case_exit_1(
    pg_schema_seeded: str,
) -> None:
    url = {p.id: p.values[0] for p in forms(**pg_parts())}["kv"]
    where = ["--database-url", url, "--schema", pg_schema_seeded]
    bad = run("cases", "signal", "nope", "--source", "a", "--outcome", "b",
              "--confidence", "nan", *where)  # fmt: skip
    assert_hidden(bad, SECRET)
    assert bad.returncode == 2, bad.stderr
    missing = run("cases", "signal", "nope", *SIGNAL_OK, *where)
    assert_hidden(missing, SECRET)
    assert missing.returncode == 1, missing.stderr
    resolve = run("resolve", "nope", "--released", "--by", "", "--reason", "r", *where)
    assert resolve.returncode == 2, resolve.stderr
    shown = run("cases", "show", "case-1", "--json", *where)
    assert shown.returncode == 0, shown.stderr
    assert '"RESOLVED_PROVISIONAL"' in shown.stdout
    assert os.environ.get("SAFEAGENT_DATABASE_URL") is None


# -- control characters an agent chose never reach the terminal raw ----------------------------

EVIL_ID = "r-1\x1b[2K\rdefault    r-2   pay   SUCCEEDED\x07"
NEWLINE_ID = "nl\nFAKE ROW\x7f\x9b31m"
EVIL_CASE = "case\x1b[31mRED\u2028default  c-2  FINAL\u202eLIVE\u200b"
EVIL_SOURCE = "src\x07\x85"
CONTROLS = {
    chr(c)
    for c in (
        *range(0x20),
        *range(0x7F, 0xA0),
        *range(0x200B, 0x2010),  # zero-width, and the left-to-right / right-to-left marks
        *range(0x2028, 0x202F),  # line and paragraph separators, bidirectional embeddings
        *range(0x2060, 0x206A),  # word joiner, invisible operators, bidirectional isolates
        0xFEFF,
    )
}


@pytest.fixture
def evil_db(tmp_path: Path) -> Path:
    """Ids and a source holding ESC sequences, CR, newline, BEL, DEL and C1 characters."""
    path = tmp_path / "evil.db"
    guard = Guard(path)
    guard.execute(EVIL_ID, "pay", {}, lambda ctx: 1)
    guard.execute(NEWLINE_ID, "pay", {}, lambda ctx: 1)
    FinalityGate(guard).signal(EVIL_CASE, EVIL_SOURCE, "o", 0.5)
    guard.close()
    return path


def raw_controls(text: str) -> set[str]:
    """The control characters of ``text`` other than the newlines that end its lines."""
    return {c for line in text.split("\n") for c in line if c in CONTROLS}


@pytest.mark.parametrize(
    "command",
    [
        ["receipts", "list"],
        ["cases", "list"],
        ["cases", "show", EVIL_CASE],
        ["audit", "tail", "-n", "100"],
        ["receipts", "show", NEWLINE_ID],
    ],
    ids=["receipts-list", "cases-list", "cases-show", "audit-tail", "receipts-show"],
)
def test_control_characters_in_stored_text_are_escaped_for_the_terminal(
    evil_db: Path, command: list[str]
) -> None:
    """Every control character (C0, DEL, C1, and the invisible ones: a line separator, a
    bidirectional override) of an id or source an agent chose is shown as its backslash
    escape (``\\x1b``, ``\\n``, ``\\x07``, ``\\x9b``, ``\\u2028``): no ESC sequence, no
    fake row, no reordered id, no bell reaches the terminal."""
    result = cli(*command, "--db", evil_db)
    assert result.exit_code == 0, result.output
    assert raw_controls(result.stdout) == set()
    assert raw_controls(result.stderr) == set()
    shown = {
        "receipts": [ascii(EVIL_ID)[1:-1], ascii(NEWLINE_ID)[1:-1]],
        "cases": [ascii(EVIL_CASE)[1:-1]],
        "audit": [ascii(EVIL_ID)[1:-1], ascii(EVIL_CASE)[1:-1], ascii(EVIL_SOURCE)[1:-1]],
    }[command[0]]
    if command[:2] == ["receipts", "show"]:
        shown = [ascii(NEWLINE_ID)[1:-1]]
    for text in shown:
        assert text in result.stdout, (text, result.stdout)


@pytest.mark.parametrize(
    "command",
    [["receipts", "list", "--json"], ["cases", "list", "--json"], ["audit", "tail", "--json"]],
    ids=["receipts-list", "cases-list", "audit-tail"],
)
def test_json_output_escapes_control_characters_and_keeps_the_value(
    evil_db: Path, command: list[str]
) -> None:
    """--json writes every control character as a JSON escape (DEL and C1 too, which
    json.dumps leaves raw), so the output is valid JSON holding the ids as stored."""
    result = cli(*command, "--db", evil_db)
    assert result.exit_code == 0, result.output
    assert raw_controls(result.stdout) == set()
    if command[0] == "audit":
        values = [json.loads(line) for line in result.stdout.splitlines()]
        assert {EVIL_ID, NEWLINE_ID, EVIL_CASE} <= {e["subject"] for e in values}
        assert EVIL_SOURCE in {e["actor"] for e in values}
    elif command[0] == "receipts":
        assert [r["request_id"] for r in json.loads(result.stdout)] == [EVIL_ID, NEWLINE_ID]
    else:
        assert [c["case_id"] for c in json.loads(result.stdout)] == [EVIL_CASE]
    assert "\\u009b" in result.stdout or command[0] == "cases"
