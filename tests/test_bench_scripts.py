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
def test_decompose_prints_floor_statements_and_guard(tmp_path: Path, mode: str) -> None:
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
    figures = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(floor|statements|guard)\s+([\d.]+) us", out, re.M)
    }
    assert set(figures) == {"floor", "statements", "guard"}, out
    assert all(v > 0 for v in figures.values()), out
    assert not list(tmp_path.glob("sa-decompose-*")), "the temporary files were removed"
