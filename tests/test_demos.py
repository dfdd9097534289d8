"""The examples run as newcomers run them: as scripts, in a fresh directory, twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 60

pytestmark = pytest.mark.slow


def run_example(
    name: str, cwd: Path, db: Path | None = None, url: str | None = None, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("SAFEAGENT_DB", "SAFEAGENT_DATABASE_URL")
    }
    if db is not None:
        env["SAFEAGENT_DB"] = str(db)
    if url is not None:
        env["SAFEAGENT_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_demo_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"charges in ledger\s+2\s+1\s*$", result.stdout, re.MULTILINE)
    assert re.search(r"replay flag\s+-\s+True\s*$", result.stdout, re.MULTILINE)
    assert "[FAILED]" not in result.stdout
    assert "RESULT: ok" in result.stdout


def test_safe_agent_demo_charges_twice_unguarded_and_once_guarded_on_every_run(tmp_path):
    """The main demo exits 0 twice in one directory: 2 charges unguarded, 1 guarded."""
    first = run_example("safe_agent_demo.py", tmp_path)
    assert_demo_ok(first)
    second = run_example("safe_agent_demo.py", tmp_path)
    assert_demo_ok(second)
    assert (tmp_path / "safeagent.db").exists()
    assert f"Guard database:  {tmp_path / 'safeagent.db'}" in second.stdout


def test_safe_agent_demo_keeps_the_ledger_it_is_given(tmp_path):
    """The demo's ledger is a temporary file it says it removes; --ledger PATH keeps it,
    and it holds what the demo printed: two charges without a key, one with."""
    import sqlite3
    from contextlib import closing

    ledger = tmp_path / "ledger.db"
    result = run_example("safe_agent_demo.py", tmp_path, None, None, "--ledger", str(ledger))
    assert_demo_ok(result)
    assert f"Payments ledger: {ledger}\n" in result.stdout
    with closing(sqlite3.connect(ledger)) as conn:
        keys = [k for (k,) in conn.execute("SELECT idempotency_key FROM charges ORDER BY rowid")]
    assert len(keys) == 3
    assert keys[:2] == [None, None]
    assert keys[2] is not None
    default = run_example("safe_agent_demo.py", tmp_path)
    assert "(removed on exit; --ledger PATH keeps it)" in default.stdout


def test_safe_agent_demo_honours_safeagent_db(tmp_path):
    """With SAFEAGENT_DB set, the main demo keeps its guard records in that file only."""
    db = tmp_path / "elsewhere" / "guard.db"
    db.parent.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_example("safe_agent_demo.py", cwd, db=db)
    assert_demo_ok(result)
    assert db.exists()
    assert not (cwd / "safeagent.db").exists()
    assert f"Guard database:  {db}" in result.stdout


def test_safe_agent_demo_runs_on_the_postgresql_of_safeagent_database_url(
    tmp_path, pg_throwaway_database_url
):
    """With $SAFEAGENT_DATABASE_URL set, Guard() (in the demo and its service process)
    keeps the records in that PostgreSQL database, and the demo says so without printing
    the URL, which may hold a password."""
    result = run_example("safe_agent_demo.py", tmp_path, url=pg_throwaway_database_url)
    assert_demo_ok(result)
    assert "Guard database:  PostgreSQL, schema safeagent" in result.stdout
    assert pg_throwaway_database_url not in result.stdout
    assert not (tmp_path / "safeagent.db").exists()


def test_persist_demo_executes_once_then_replays_from_sqlite(tmp_path):
    """The persist demo executes on its first run and replays on its second: one side effect."""
    first = run_example("persist_demo.py", tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.startswith("executed")

    second = run_example("persist_demo.py", tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    db = tmp_path / "safeagent.db"
    assert f"replayed from {db}: not executed again" in second.stdout

    execution_ids = [re.findall(r"execution id: (\w+)", r.stdout) for r in (first, second)]
    assert len(execution_ids[0]) == 1
    assert execution_ids[0] == execution_ids[1]
    ledger = tmp_path / "persist_demo_ledger.txt"
    assert len(ledger.read_text(encoding="utf-8").splitlines()) == 1
