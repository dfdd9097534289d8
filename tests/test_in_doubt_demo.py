"""The in-doubt demo runs as a newcomer runs it: as a script, in a fresh directory, twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "in_doubt_demo.py"
TIMEOUT = 90

pytestmark = pytest.mark.slow


def run_demo(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SAFEAGENT_DB"}
    return subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_demo_ok(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"charges in ledger\s+1\s+1\s*$", result.stdout, re.MULTILINE), output
    assert re.search(r"retry without hook\s+OutcomeUnknownError, 1 charge", result.stdout), output
    assert re.search(r"final status\s+SUCCEEDED\s+SUCCEEDED\s*$", result.stdout, re.MULTILINE)
    assert "[FAILED]" not in result.stdout
    assert "RESULT: ok: 1 charge(s) for request 1" in result.stdout


@pytest.mark.timeout(TIMEOUT)
def test_in_doubt_demo_reconciles_the_killed_workers_charge_once_on_every_run(tmp_path):
    """The in-doubt demo exits 0 twice in one directory, each run with one charge per request."""
    first = run_demo(tmp_path)
    assert_demo_ok(first)
    second = run_demo(tmp_path)
    assert_demo_ok(second)
    assert f"Guard database:  {tmp_path / 'safeagent.db'}" in second.stdout
    charges = [re.findall(r"charge id in receipt\s+(ch_\w+)", r.stdout) for r in (first, second)]
    assert charges[0] != charges[1]
