"""Bad input to the ``safeagent`` command: exit 2, one ``error:`` line, no traceback, and
nothing written (docs/cli.md, "Exit codes").

Non-UTF-8 arguments are passed as raw bytes to the real console script (the venv's
``safeagent``, else ``python -m safeagent``), exactly as a shell passes ``$'r\\xff'``;
NUL, which no ``exec`` can carry, goes through typer's CliRunner in-process. The last
section covers the library call behind ``purge`` (``safeagent.retention.purge``): its
``older_than`` bound is 100 years, not the one-year bound of leases and waits.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from safeagent import (
    ConfigurationError,
    ConsensusPolicy,
    EventKind,
    FinalityGate,
    Guard,
    InvalidInputError,
    SQLiteStore,
    retention,
)
from safeagent._policy import MAX_RETENTION
from tests._workers import child_env
from tests.conftest import PG_URL, FakeClock, pg_schema, require_postgres

DAY = 86400.0
YEAR = 365 * DAY
TIMEOUT = 60
SCRIPT = Path(sys.executable).with_name("safeagent")
ENTRY = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "safeagent"]
STORE_ENV = ("SAFEAGENT_DB", "SAFEAGENT_DATABASE_URL", "SAFEAGENT_AUDIT_KEY", "COLUMNS")

runner = CliRunner()


# -- a store three years old -------------------------------------------------------------


def seed(store: Any) -> None:
    """Records and cases that finished three years ago (on the store's clock):
    ``r-1`` SUCCEEDED, ``r-2`` FAILED, ``r-3`` IN_DOUBT, ``case-1`` settled (so
    ``case:case-1`` SUCCEEDED), ``case-2`` IN_RECONCILIATION."""
    guard = Guard(store, lease=30.0, wait=0, owner="seeder", outcome_unknown=(TimeoutError,))
    guard.execute("r-1", "charge", {"amount": 5}, lambda ctx: {"ok": 1})

    def declined(ctx: Any) -> None:
        raise ValueError("card declined")

    def lost(ctx: Any) -> None:
        raise TimeoutError("no answer")

    with pytest.raises(ValueError, match="declined"):
        guard.execute("r-2", "refund", {"amount": 6}, declined)
    with pytest.raises(TimeoutError):
        guard.execute("r-3", "charge", {"amount": 7}, lost)
    gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=0.7, quorum=1))
    gate.signal("case-1", "model-a", "approve", 0.9)
    gate.settle("case-1", "issue_refund", lambda outcome, ctx: {"refunded": outcome})
    gate.signal("case-2", "model-a", "approve", 0.6)
    gate.signal("case-2", "model-b", "reject", 0.6)
    guard.close()


def three_years_ago() -> FakeClock:
    return FakeClock(time.time_ns() // 1_000_000 - round(3 * YEAR * 1000))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in STORE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "guard.db"
    store = SQLiteStore(path, clock=three_years_ago())
    seed(store)
    store.close()
    return path


def snapshot(store: Any) -> dict[str, Any]:
    """Everything a command could change: records, audit events, cases and signals."""
    gate = FinalityGate(Guard(store))
    cases = gate.cases()
    return {
        "records": [
            (r.namespace, r.request_id, r.status, r.purged_at_ms, r.payload_json, r.fencing_token)
            for r in store.records()[0]
        ],
        "events": [(e.id, e.kind, e.subject) for e in store.events()],
        "cases": [(c.case_id, c.state, c.version, c.signals) for c in cases],
        "signals": [gate.history(c.case_id) for c in cases],
    }


def sqlite_snapshot(path: Path) -> dict[str, Any]:
    store = SQLiteStore(path)
    try:
        return snapshot(store)
    finally:
        store.close()


def run(*args: str | bytes | Path, env: dict[str, str] | None = None) -> Any:
    """The real console script with ``args`` as given (bytes stay bytes: not UTF-8)."""
    base = {k: v for k, v in child_env().items() if k not in STORE_ENV}
    argv: list[str | bytes] = [*ENTRY, *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(
        argv,
        env={**base, **(env or {})},
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_usage_error(result: Any, *needles: str) -> str:
    """Exit 2 with exactly one line on stderr, starting ``error:``, no traceback."""
    err = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def cli(*args: str | Path, input: str | None = None) -> Any:
    """The CLI in-process (for NUL, which no exec can pass)."""
    from safeagent._cli import app

    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


# -- text arguments that are not UTF-8 (the real entry point) ----------------------------


SIGNAL = [b"--source", b"s", b"--outcome", b"approve", b"--confidence", b"1"]
NOT_UTF8 = [
    pytest.param([b"receipts", b"show", b"r\xff"], "REQUEST_ID", id="receipts-show"),
    pytest.param(
        [b"receipts", b"show", b"r-1", b"--namespace", b"n\xff"], "--namespace", id="show-ns"
    ),
    pytest.param([b"cases", b"show", b"c\xff"], "CASE_ID", id="cases-show"),
    pytest.param([b"cases", b"signal", b"c\xff", *SIGNAL, b"--open"], "CASE_ID", id="signal"),
    pytest.param(
        [b"cases", b"signal", b"case-2", *SIGNAL[:1], b"s\xfe", *SIGNAL[2:]],
        "--source",
        id="signal-source",
    ),
    pytest.param(
        [b"cases", b"signal", b"case-2", *SIGNAL, b"--metadata", b'{"k": "\xff"}'],
        "--metadata",
        id="signal-metadata",
    ),
    pytest.param(
        [b"cases", b"resolve", b"case-2", b"--outcome", b"ok", b"--by", b"a", b"--reason", b"\xff"],
        "--reason",
        id="cases-resolve",
    ),
    pytest.param([b"receipts", b"list", b"--namespace", b"n\xff"], "--namespace", id="list-ns"),
    pytest.param([b"receipts", b"list", b"--prefix", b"\xc3("], "--prefix", id="list-prefix"),
    pytest.param([b"in-doubt", b"list", b"--namespace", b"n\xff"], "--namespace", id="in-doubt"),
    pytest.param([b"audit", b"tail", b"--namespace", b"n\xff"], "--namespace", id="tail-ns"),
    pytest.param([b"audit", b"tail", b"--subject", b"\xed\xa0\x80"], "--subject", id="tail-sub"),
    pytest.param([b"audit", b"export", b"--namespace", b"n\xff"], "--namespace", id="export"),
    pytest.param([b"stats", b"--namespace", b"n\xff"], "--namespace", id="stats"),
    pytest.param(
        [b"resolve", b"r-3", b"--released", b"--by", b"a\xff", b"--reason", b"r"],
        "--by",
        id="resolve",
    ),
    pytest.param([b"purge", b"--older-than", b"1\xffd", b"--yes"], "--older-than", id="purge"),
    pytest.param([b"purge", b"--older-than", b"1d", b"--yes", b"--by", b"\xff"], "--by", id="by"),
]


@pytest.mark.parametrize(("args", "label"), NOT_UTF8)
def test_a_non_utf8_argument_is_exit_2_with_one_line_and_nothing_written(
    db: Path, args: list[bytes], label: str
) -> None:
    """Any text argument that is not UTF-8 (surrogateescape'd argv): exit 2, one line
    naming the argument and the bytes given, no traceback, the database unchanged."""
    before = sqlite_snapshot(db)
    result = run(*args, "--db", db)
    line = assert_usage_error(result, f"invalid value for {label}", "not valid UTF-8")
    assert "b'" in line  # the bytes the operator typed
    assert sqlite_snapshot(db) == before


def test_a_non_utf8_database_path_is_still_a_path(db: Path, tmp_path: Path) -> None:
    """File paths may hold any bytes: --db with a non-UTF-8 name opens that file."""
    odd = os.fsencode(tmp_path) + b"/guard-\xff.db"
    os.rename(db, odd)
    result = run(b"receipts", b"list", b"--json", b"--db", odd)
    assert result.returncode == 0, result.stderr
    assert {r["request_id"] for r in json.loads(result.stdout)} >= {"r-1", "r-2", "r-3"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["receipts", "show", "r\x00"], "REQUEST_ID", id="receipts-show"),
        pytest.param(["cases", "show", "c\x00"], "CASE_ID", id="cases-show"),
        pytest.param(
            ["cases", "signal", "c\x00", "--source", "s", "--outcome", "o", "--confidence", "1"],
            "CASE_ID",
            id="signal-case",
        ),
        pytest.param(
            [
                "cases",
                "signal",
                "case-2",
                "--source",
                "s\x00",
                "--outcome",
                "o",
                "--confidence",
                "1",
            ],
            "--source",
            id="signal-source",
        ),
        pytest.param(["audit", "tail", "--namespace", "\x00"], "--namespace", id="tail"),
    ],
)
def test_a_nul_in_an_argument_is_exit_2_and_nothing_written(
    db: Path, args: list[str], needle: str
) -> None:
    """A NUL (only reachable in-process) is refused the same way."""
    before = sqlite_snapshot(db)
    result = cli(*args, "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: invalid value for {needle}")
    assert sqlite_snapshot(db) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["receipts", "show", "x" * 256], "request id must be", id="long-request-id"),
        pytest.param(["receipts", "show", "r-1", "--namespace", ""], "namespace", id="empty-ns"),
        pytest.param(["cases", "show", "c" * 251], "case id must be", id="long-case-id"),
        pytest.param(
            [
                "cases",
                "signal",
                "c" * 251,
                "--open",
                "--source",
                "s",
                "--outcome",
                "o",
                "--confidence",
                "1",
            ],
            "case id must be",
            id="signal-long-case-id",
        ),
        pytest.param(
            ["cases", "signal", "case-2", "--source", "s", "--outcome", "o", "--confidence", "nan"],
            "confidence",
            id="nan-confidence",
        ),
        pytest.param(
            [
                "cases",
                "signal",
                "case-2",
                "--source",
                "s",
                "--outcome",
                "o",
                "--confidence",
                "0.5",
                "--metadata",
                '{"a":' + "[" * 5000 + "]" * 5000 + "}",
            ],
            "--metadata: JSON nested too deeply",
            id="metadata-5000-deep",
        ),
        pytest.param(
            [
                "resolve",
                "r-1",
                "--succeeded",
                "--result",
                "[" * 5000 + "]" * 5000,
                "--by",
                "x",
                "--reason",
                "y",
            ],
            "--result: JSON nested too deeply",
            id="result-5000-deep",
        ),
    ],
)
def test_the_librarys_input_errors_are_exit_2(db: Path, args: list[str], needle: str) -> None:
    """An id, name or number the library refuses (InvalidInputError) is exit 2, not 1 or 3."""
    before = sqlite_snapshot(db)
    result = run(*args, "--db", db)
    assert_usage_error(result, needle)
    assert sqlite_snapshot(db) == before


# -- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["99999999999999999999w", "9" * 400 + "d", "36501d", "5300w", "3153600001s"]
)
def test_purge_beyond_100_years_is_exit_2_and_purges_nothing(db: Path, value: str) -> None:
    """An --older-than past 100 years (or too large for a float) was an OverflowError
    traceback: now exit 2, one line, nothing purged."""
    before = sqlite_snapshot(db)
    result = run("purge", "--older-than", value, "--yes", "--db", db)
    assert_usage_error(result, "--older-than: at most 100 years (36500d)")
    assert sqlite_snapshot(db) == before


def test_purge_keeps_several_years_of_records(db: Path) -> None:
    """400d tombstones the three-year-old finished records; 7 years (2555d) and 100 years
    (36500d) are accepted and purge nothing newer than that."""
    for value in ("2555d", "36500d", "5214w"):
        kept = run("purge", "--older-than", value, "--yes", "--json", "--db", db)
        assert kept.returncode == 0, kept.stderr
        counts = json.loads(kept.stdout)
        assert counts["tombstoned"] == 0
        assert counts["cutoff"].endswith("Z")
    assert all(r[3] is None for r in sqlite_snapshot(db)["records"])
    purged = run("purge", "--older-than", "400d", "--yes", "--json", "--db", db)
    assert purged.returncode == 0, purged.stderr
    counts = json.loads(purged.stdout)
    assert counts["tombstoned"] == 3  # r-1, r-2 and case:case-1
    assert counts["kept_in_doubt"] == 1
    tombstones = {r[1] for r in sqlite_snapshot(db)["records"] if r[3] is not None}
    assert tombstones == {"r-1", "r-2", "case:case-1"}


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["stats", "--since", "99999999999999999999w"], id="stats-since"),
        pytest.param(["receipts", "list", "--until", "36501d"], id="list-until"),
        pytest.param(["audit", "tail", "-f", "--interval", "inf"], id="tail-interval"),
        pytest.param(["audit", "tail", "-f", "--interval", "1e300"], id="tail-interval-huge"),
    ],
)
def test_other_absurd_durations_are_exit_2(db: Path, args: list[str]) -> None:
    """--since/--until beyond 100 years, and a --follow interval beyond an hour: exit 2,
    no traceback (they were an OverflowError)."""
    result = run(*args, "--db", db)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err


# -- the store URL -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        pytest.param("mysql://ops:hunter2@db/x", "got a mysql:// URL", id="mysql"),
        pytest.param("sqlite:///guard.db", "got a sqlite:// URL", id="sqlite-url"),
        pytest.param("guard.db", "an SQLite file goes in --db", id="a-path"),
    ],
)
def test_a_database_url_that_is_not_postgresql_is_exit_2(url: str, needle: str) -> None:
    """--database-url mysql://... is bad input (exit 2), not an unreachable PostgreSQL (3);
    the password stays masked."""
    result = run("receipts", "list", "--database-url", url)
    line = assert_usage_error(result, "--database-url must be a PostgreSQL URL", needle)
    assert "hunter2" not in line
    assert "cannot reach" not in line


def test_a_non_postgresql_url_in_the_environment_is_exit_2(tmp_path: Path) -> None:
    """$SAFEAGENT_DATABASE_URL=mysql://... is refused the same way, naming the variable."""
    result = run("in-doubt", "list", env={"SAFEAGENT_DATABASE_URL": "mysql://db/x"})
    assert_usage_error(result, "$SAFEAGENT_DATABASE_URL must be a PostgreSQL URL")
    bad = run(
        "in-doubt",
        "list",
        env={"SAFEAGENT_DATABASE_URL": os.fsdecode(b"postgresql://db/\xff")},
    )
    assert_usage_error(bad, "$SAFEAGENT_DATABASE_URL is not valid UTF-8")


def test_a_malformed_libpq_string_is_exit_2() -> None:
    """A key=value string libpq cannot parse is exit 2 before anything connects."""
    pytest.importorskip("psycopg")
    result = run("receipts", "list", "--database-url", "host=db port")
    assert_usage_error(result, "--database-url is not a valid PostgreSQL connection string")


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.fixture
def pg_store() -> Iterator[tuple[Any, str]]:
    require_postgres()
    from safeagent.stores.postgres import PostgresStore

    schema = pg_schema()
    store = PostgresStore(PG_URL, schema=schema, clock=three_years_ago())
    seed(store)
    try:
        yield store, schema
    finally:
        store.drop_schema()
        store.close()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["receipts", "show", "r\x00"], id="receipts-show-nul"),
        pytest.param(["receipts", "show", "r\udcff"], id="receipts-show-surrogate"),
        pytest.param(["cases", "show", "c\x00"], id="cases-show-nul"),
        pytest.param(
            [
                "cases",
                "signal",
                "c\x00",
                "--open",
                "--source",
                "s",
                "--outcome",
                "o",
                "--confidence",
                "1",
            ],
            id="signal-nul",
        ),
        pytest.param(
            [
                "cases",
                "signal",
                "case-2",
                "--source",
                "s",
                "--outcome",
                "o\udcff",
                "--confidence",
                "1",
            ],
            id="signal-outcome-surrogate",
        ),
        pytest.param(["in-doubt", "list", "--namespace", "n\x00"], id="in-doubt-nul"),
    ],
)
def test_postgresql_bad_text_is_exit_2_not_a_store_error(
    pg_store: tuple[Any, str], args: list[str]
) -> None:
    """On PostgreSQL, NUL or a lone surrogate was a StoreError (exit 3) or a traceback:
    now exit 2, and the schema is unchanged."""
    store, schema = pg_store
    before = snapshot(store)
    result = cli(*args, "--database-url", PG_URL, "--schema", schema)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: invalid value for")
    assert snapshot(store) == before


# -- retention.purge, the library call behind `purge` ------------------------------------


def finished_years_apart(store: Any, clock: FakeClock) -> None:
    """``old`` finished eight years before ``new`` (store clock), which finished now."""
    guard = Guard(store, wait=0)
    guard.execute("old", "charge", {"amount": 1}, lambda ctx: "ok")
    clock.advance(8 * YEAR)
    guard.execute("new", "charge", {"amount": 2}, lambda ctx: "ok")
    guard.close()


def test_retention_of_seven_years_works_on_every_store(store: Any, clock: FakeClock) -> None:
    """older_than=timedelta(days=2555) (payment records: seven years) was refused by the
    one-year lease bound: it tombstones the eight-year-old record only."""
    finished_years_apart(store, clock)
    report = retention.purge(store, older_than=timedelta(days=2555))
    assert (report.tombstoned, report.released) == (1, 0)
    purged = {r.request_id for r in store.records()[0] if r.purged_at_ms is not None}
    assert purged == {"old"}


@pytest.mark.parametrize(
    "older_than",
    [
        pytest.param(MAX_RETENTION, id="100-years-float"),
        pytest.param(timedelta(days=36500), id="100-years-timedelta"),
        pytest.param(int(MAX_RETENTION), id="100-years-int"),
    ],
)
def test_retention_up_to_100_years_is_accepted(
    store: Any, clock: FakeClock, older_than: Any
) -> None:
    """The bound itself is accepted: the cutoff, a century back, is before every record."""
    finished_years_apart(store, clock)
    assert retention.purge(store, older_than=older_than).tombstoned == 0


@pytest.mark.parametrize(
    "older_than",
    [
        pytest.param(timedelta(days=36501), id="100-years-and-a-day"),
        pytest.param(MAX_RETENTION + 1, id="a-second-too-long"),
        pytest.param(10**400, id="int-too-large-for-a-float"),
        pytest.param(-(10**400), id="huge-negative-int"),
        pytest.param(math.inf, id="inf"),
        pytest.param(math.nan, id="nan"),
        pytest.param(-1, id="negative"),
        pytest.param(True, id="bool"),
        pytest.param("30d", id="str"),
        pytest.param(None, id="none"),
    ],
)
def test_retention_beyond_100_years_or_not_a_duration_purges_nothing(
    store: Any, clock: FakeClock, older_than: Any
) -> None:
    """ConfigurationError (with the bound in the message where it applies); no record is
    tombstoned and no purged event is written."""
    finished_years_apart(store, clock)
    with pytest.raises(ConfigurationError, match="older_than must be") as info:
        retention.purge(store, older_than=older_than)
    if isinstance(older_than, timedelta) or older_than in (MAX_RETENTION + 1, 10**400):
        assert "at most 3153600000 s" in str(info.value)
    assert all(r.purged_at_ms is None for r in store.records()[0])
    assert not [e for e in store.events() if e.kind is EventKind.PURGED]


@pytest.mark.parametrize("actor", ["", "ops\x00", "ops\udcff", "a" * 256, 7])
def test_retention_refuses_a_bad_actor_and_purges_nothing(
    store: Any, clock: FakeClock, actor: Any
) -> None:
    """The actor is audited: one with NUL or a lone surrogate is InvalidInputError before
    the store is touched (it was a StoreError on PostgreSQL)."""
    finished_years_apart(store, clock)
    with pytest.raises(InvalidInputError, match="actor must be"):
        retention.purge(store, older_than=60, actor=actor)
    assert all(r.purged_at_ms is None for r in store.records()[0])
    assert not [e for e in store.events() if e.kind is EventKind.PURGED]


def test_a_lease_too_large_for_a_float_is_a_configuration_error() -> None:
    """seconds() compares an int as given: 10**400 is 'at most one year', not OverflowError."""
    from safeagent import MemoryStore

    with pytest.raises(ConfigurationError, match="lease must be at most 31536000 s"):
        Guard(MemoryStore(), lease=10**400)


# -- stored text the output cannot encode (the real entry point) -------------------------

STRICT_UTF8 = {"PYTHONIOENCODING": "utf-8"}  # strict: a lone surrogate would raise
SURROGATE_DETAIL = '{"note":"\\ud800 caf\\u00e9"}'  # an audit detail as stored


@pytest.fixture
def surrogate_db(tmp_path: Path) -> Path:
    """Legal stored text with lone surrogates: ``fn-res``, whose fn returned one;
    ``op-res``, resolved by hand with ``result="\\ud800"``; ``r-doubt`` in doubt; a case
    ``c-1`` whose signal metadata holds one; and audit event 2, whose detail holds one
    (written as an older or foreign writer could: raw SQL)."""
    path = tmp_path / "surrogate.db"
    guard = Guard(path, lease=30.0, wait=0, outcome_unknown=(TimeoutError,))
    guard.execute("fn-res", "pay", {"who": "café"}, lambda ctx: {"name": "file\udcff.txt"})
    for request_id in ("op-res", "r-doubt"):
        with pytest.raises(TimeoutError):
            guard.execute(request_id, "pay", {}, lambda ctx: (_ for _ in ()).throw(TimeoutError()))
    guard.resolve("op-res", "succeeded", result="\ud800", by="alice", reason="dashboard")
    FinalityGate(guard).signal("c-1", source="s", outcome="approve", confidence=0.5)
    guard.close()
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("UPDATE signals SET metadata = ?", ('{"k":"\\udcff"}',))
    conn.execute("UPDATE audit_events SET detail = ? WHERE id = 2", (SURROGATE_DETAIL,))
    conn.commit()
    conn.close()
    return path


def ok_output(result: Any) -> str:
    """Exit 0, no traceback, and standard output that is valid UTF-8."""
    err = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 0, err
    assert "Traceback" not in err
    return str(result.stdout.decode("utf-8"))  # strict: no raw surrogate byte


def strings(value: Any) -> Iterator[str]:
    """Every string in a parsed JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.mark.parametrize(
    ("args", "surrogate"),
    [
        (["receipts", "show", "fn-res"], "\udcff"),  # fn's result
        (["receipts", "show", "op-res"], "\ud800"),  # resolve(result=...)
        (["receipts", "list"], None),
        (["in-doubt", "list"], None),
        (["cases", "show", "c-1"], "\udcff"),  # a signal's metadata
        (["cases", "list"], None),
    ],
)
def test_stored_lone_surrogates_print_as_json_escapes_and_visible_escapes(
    surrogate_db: Path, args: list[str], surrogate: str | None
) -> None:
    """--json stays valid JSON holding the very value (a \\uXXXX escape); the table shows
    a backslash escape. Ordinary non-ASCII text is printed as is. Exit 0, no traceback."""
    as_json = ok_output(run(*args, "--json", "--db", surrogate_db, env=STRICT_UTF8))
    parsed = json.loads(as_json)
    table = ok_output(run(*args, "--db", surrogate_db, env=STRICT_UTF8))
    if surrogate is not None:
        assert any(surrogate in text for text in strings(parsed)), as_json
        assert ascii(surrogate)[1:-1] in table  # the six characters \udcff
    if args == ["receipts", "show", "fn-res"]:
        assert "\\ud800 café" in table  # audit event 2's detail; café as is
        assert "\\ud800 café" in as_json


def test_one_stored_surrogate_does_not_break_the_json_listing(surrogate_db: Path) -> None:
    """Every receipt is listed, each result as stored."""
    rows = json.loads(ok_output(run("receipts", "list", "--json", "--db", surrogate_db)))
    results = {r["request_id"]: r["result"] for r in rows}
    assert results["fn-res"] == {"name": "file\udcff.txt"}
    assert results["op-res"] == "\ud800"


@pytest.mark.parametrize(
    "args",
    [
        ["audit", "tail", "--json"],
        ["audit", "export"],
        ["audit", "export", "--format", "csv"],
    ],
)
def test_audit_output_escapes_a_stored_surrogate(surrogate_db: Path, args: list[str]) -> None:
    """One JSON object per line (tail --json, export jsonl), or CSV whose detail column is
    JSON: the detail parses back to the stored value."""
    out = ok_output(run(*args, "--db", surrogate_db, env=STRICT_UTF8))
    if "csv" in args:
        import csv
        import io

        details = [json.loads(row["detail"]) for row in csv.DictReader(io.StringIO(out))]
    else:
        details = [json.loads(line)["detail"] for line in out.splitlines()]
    assert {"note": "\ud800 café"} in details
    assert "café" in out  # not turned into an escape


def test_audit_tail_table_and_export_file_escape_a_stored_surrogate(
    surrogate_db: Path, tmp_path: Path
) -> None:
    table = ok_output(run("audit", "tail", "--db", surrogate_db, env=STRICT_UTF8))
    assert '{"note":"\\ud800 café"}' in table
    out = tmp_path / "trail.jsonl"
    ok_output(run("audit", "export", "--out", out, "--db", surrogate_db, env=STRICT_UTF8))
    lines = out.read_text(encoding="utf-8").splitlines()
    assert {"note": "\ud800 café"} in [json.loads(line)["detail"] for line in lines]


def test_an_ascii_terminal_gets_escapes_not_a_crash(surrogate_db: Path) -> None:
    """Standard output that cannot encode é either: the JSON escapes it (same value), the
    table shows \\xe9."""
    ascii_env = {"PYTHONIOENCODING": "ascii"}
    args = ("receipts", "show", "fn-res", "--db", surrogate_db, "--no-redact")
    as_json = run(*args, "--json", env=ascii_env)
    assert as_json.returncode == 0, as_json.stderr
    parsed = json.loads(as_json.stdout.decode("ascii"))
    assert parsed["receipt"]["payload"] == {"who": "café"}
    table = run(*args, env=ascii_env)
    assert table.returncode == 0, table.stderr
    assert '{"who":"caf\\xe9"}' in table.stdout.decode("ascii")


# -- an audit key that is not UTF-8 ------------------------------------------------------

RAW_KEY = b"\xff\xfe0123456789abcdefgh"


def key_env(raw: bytes) -> dict[str, str]:
    """$SAFEAGENT_AUDIT_KEY holding ``raw`` as is (os.fsdecode round-trips to the bytes)."""
    return {"SAFEAGENT_AUDIT_KEY": os.fsdecode(raw)}


def test_a_non_utf8_audit_key_in_the_environment_is_its_bytes(db: Path, tmp_path: Path) -> None:
    """``SAFEAGENT_AUDIT_KEY=$(cat keyfile)`` of random bytes: anchor signs with those
    bytes, and verify agrees with --key-file holding the same bytes; another key is a
    bad_anchor (exit 1). No traceback anywhere."""
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(RAW_KEY)
    anchored = run("audit", "anchor", "--json", "--db", db, env=key_env(RAW_KEY))
    assert json.loads(ok_output(anchored))["id"] == 1
    by_file = json.loads(
        ok_output(run("audit", "verify", "--json", "--key-file", key_file, "--db", db))
    )
    by_env = json.loads(
        ok_output(run("audit", "verify", "--json", "--db", db, env=key_env(RAW_KEY)))
    )
    assert by_file["ok"]
    assert by_env["ok"]
    assert by_file["anchors_checked"] == by_env["anchors_checked"] == 1
    other = run("audit", "verify", "--db", db, env=key_env(b"\xfe\xff0123456789abcdefgh"))
    assert other.returncode == 1
    assert b"bad_anchor" in other.stdout
    assert b"Traceback" not in other.stderr


def test_a_short_non_utf8_audit_key_is_exit_2(db: Path) -> None:
    """Counted in bytes: three bytes of which two are not UTF-8 is a key too short."""
    for command in ("anchor", "verify"):
        result = run("audit", command, "--db", db, env=key_env(b"\xff\xfeab"))
        assert_usage_error(result, "at least 16 bytes", "got 4")


def test_load_key_takes_the_environment_variables_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    from safeagent import audit

    monkeypatch.setenv("SAFEAGENT_AUDIT_KEY", os.fsdecode(RAW_KEY))
    assert audit.load_key() == RAW_KEY
    monkeypatch.setenv("SAFEAGENT_AUDIT_KEY", "clé-0123456789abcdef")
    assert audit.load_key() == "clé-0123456789abcdef".encode()


def test_a_key_file_and_the_same_bytes_in_the_environment_are_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Surrounding whitespace (a trailing newline, a CRLF kept by ``$(cat ...)``, a tab)
    is stripped from both sources, so a key file and ``SAFEAGENT_AUDIT_KEY=$(cat file)``
    always sign alike."""
    from safeagent import audit

    for stored in (b" secret-key-0123456789\t", b"\xfe\xffsecret-0123456789\r\n", b"k" * 20):
        keyfile = tmp_path / "audit.key"
        keyfile.write_bytes(stored)
        monkeypatch.setenv("SAFEAGENT_AUDIT_KEY", os.fsdecode(stored.rstrip(b"\n")))
        assert audit.load_key() == audit.load_key(path=str(keyfile)) == stored.strip()


# -- a namespace no record can have --------------------------------------------------------

EVERY_NAMESPACED_COMMAND = [
    pytest.param(["receipts", "list"], id="receipts-list"),
    pytest.param(["receipts", "show", "r-1"], id="receipts-show"),
    pytest.param(["in-doubt", "list"], id="in-doubt-list"),
    pytest.param(["in-doubt", "reconcile", "--app", "nowhere:guard"], id="in-doubt-reconcile"),
    pytest.param(["resolve", "r-3", "--succeeded", "--by", "op", "--reason", "x"], id="resolve"),
    pytest.param(["cases", "list"], id="cases-list"),
    pytest.param(["cases", "show", "case-1"], id="cases-show"),
    pytest.param(
        ["cases", "signal", "case-1", "--source", "s", "--outcome", "o", "--confidence", "0.1"],
        id="cases-signal",
    ),
    pytest.param(
        ["cases", "resolve", "case-2", "--outcome", "o", "--by", "op", "--reason", "x"],
        id="cases-resolve",
    ),
    pytest.param(["audit", "tail"], id="audit-tail"),
    pytest.param(["audit", "export", "--format", "jsonl"], id="audit-export"),
    pytest.param(["stats"], id="stats"),
]


@pytest.mark.parametrize("namespace", ["", "n" * 256], ids=["empty", "256-chars"])
@pytest.mark.parametrize("command", EVERY_NAMESPACED_COMMAND)
def test_every_command_refuses_a_namespace_no_record_can_have(
    db: Path, tmp_path: Path, command: list[str], namespace: str
) -> None:
    """``--namespace ""`` (or one longer than 255 characters) is exit 2 with the library's
    message on every command, listings too (they printed nothing and exit 0), checked
    before the store is opened: on a missing database it is still exit 2, not 3, and
    nothing is created; on the seeded one nothing changes."""
    message = "namespace must be a non-empty str of at most 255 characters"
    before = sqlite_snapshot(db)
    result = cli(*command, "--namespace", namespace, "--db", db)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {message}")
    assert result.stderr.count("\n") == 1
    assert sqlite_snapshot(db) == before
    missing = tmp_path / "missing.db"
    absent = cli(*command, "--namespace", namespace, "--db", missing)
    assert absent.exit_code == 2, absent.output
    assert absent.stderr.startswith(f"error: {message}")
    assert not missing.exists()
