"""examples/simulate_ai.py runs as a script: deterministic per seed, every proof passing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "simulate_ai.py"
TIMEOUT = 120

pytestmark = pytest.mark.slow


def simulate(cwd: Path, *args: str, db: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("SAFEAGENT_DB", "SAFEAGENT_DATABASE_URL")
    }
    if db is not None:
        env["SAFEAGENT_DB"] = str(db)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--cases", "30", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: ok" in result.stdout
    assert "[FAIL]" not in result.stdout
    assert "cases settled                        30 / 30" in result.stdout


def test_same_seed_twice_on_the_default_db_prints_the_same_report(tmp_path):
    """Two runs with one seed on ./safeagent.db in one cwd exit 0 with identical stdout."""
    first = simulate(tmp_path, "--seed", "11")
    second = simulate(tmp_path, "--seed", "11")
    assert_ok(first)
    assert_ok(second)
    assert first.stdout == second.stdout
    assert (tmp_path / "safeagent.db").exists()
    assert str(tmp_path) not in first.stdout


def test_another_seed_passes_its_proofs_with_safeagent_db_set(tmp_path):
    """Another seed, with SAFEAGENT_DB pointing into tmp_path, exits 0 with every proof passing."""
    db = tmp_path / "guard.db"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = simulate(cwd, "--seed", "2024", "--change-mind", "0.3", db=db)
    assert_ok(result)
    assert db.exists()
    assert not (cwd / "safeagent.db").exists()
