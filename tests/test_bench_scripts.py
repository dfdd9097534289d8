"""The benchmark scripts BENCHMARKS.md cites still run and print their figures (tiny sizes:
this checks that they work, not how fast anything is)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.slow


def _run(*args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quick_prints_both_modes(tmp_path: Path) -> None:
    out = _run(str(BENCH / "quick.py"), "--n", "30", cwd=tmp_path)
    for mode in ("durable", "claim-durable"):
        for call in ("first", "replay"):
            assert re.search(rf"^{mode}\s+{call}\s+[\d.]+ /", out, re.M), out


@pytest.mark.parametrize("mode", ["durable", "claim-durable"])
def test_decompose_prints_every_row_first_and_replay(tmp_path: Path, mode: str) -> None:
    out = _run(
        str(BENCH / "decompose.py"),
        "--n",
        "60",
        "--dir",
        str(tmp_path),
        "--mode",
        mode,
        cwd=tmp_path,
    )
    first, _, replay = out.partition("replay of the same ids")
    row = r"^(floor|audited floor|least guard|statements|guard|fingerprint)\s+([\d.]+) us"
    figures = {m.group(1): float(m.group(2)) for m in re.finditer(row, first, re.M)}
    assert set(figures) == {"floor", "audited floor", "least guard", "statements", "guard"}, out
    assert all(v > 0 for v in figures.values()), out
    again = {m.group(1): float(m.group(2)) for m in re.finditer(row, replay, re.M)}
    assert set(again) == {"floor", "least guard", "guard", "fingerprint"}, out
    assert all(v > 0 for v in again.values()), out
    assert re.search(r"^guard / \(floor replay \+ one fingerprint\): [\d.]+x$", replay, re.M), out
    wal = re.search(r"^WAL pages written per first execution: (.+)$", first, re.M)
    assert wal, out
    pages = dict(part.rsplit(" ", 1) for part in wal.group(1).split(", "))
    assert set(pages) == {"floor", "audited floor", "least guard", "statements", "guard"}, out
    assert all(float(v) >= 1 for v in pages.values()), out  # each commit writes a page
    assert not list(tmp_path.glob("sa-decompose-*")), "the temporary files were removed"


def test_instructions_runs_every_workload_directly(tmp_path: Path) -> None:
    """bench/instructions.py counts instructions under valgrind; ``--direct`` runs the
    same child workloads without it, so the script is checked where valgrind is missing."""
    out = _run(
        str(BENCH / "instructions.py"),
        "--direct",
        "--n",
        "20",
        "--dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert "direct run: 7 workloads of 20 calls each ran" in out, out
