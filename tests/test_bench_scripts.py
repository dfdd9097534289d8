"""The benchmark scripts BENCHMARKS.md cites still run and print their figures (tiny sizes:
this checks that they work, not how fast anything is)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_URL, require_postgres

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


def test_leases_prints_both_rows(tmp_path: Path) -> None:
    out = _run(
        str(BENCH / "leases.py"),
        *("--calls", "20", "--lease", "0.3", "--work", "0.3", "--rounds", "1"),
        *("--json", str(tmp_path / "leases.json")),
        cwd=tmp_path,
    )
    for row in ("batched", "one per lease"):
        assert re.search(rf"^{row}\s+1\s+\d+\s+0\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), out
    figures = json.loads((tmp_path / "leases.json").read_text())
    assert set(figures["rows"]) == {"batched", "one per lease"}


def test_main_thread_prints_every_row(tmp_path: Path) -> None:
    out = _run(
        str(BENCH / "main_thread.py"),
        *("--seconds", "0.3", "--rounds", "1", "--workers", "2"),
        *("--json", str(tmp_path / "main.json")),
        cwd=tmp_path,
    )
    for row in ("workers alone", "with main", "with main, no yield"):
        assert re.search(rf"^{row}\s+[\d.]+%\s+\d+\s+[\d.]+\s+[\d.]+$", out, re.M), out
    figures = json.loads((tmp_path / "main.json").read_text())
    assert figures["medians"]["workers alone"]["main share"] == 0
    assert figures["medians"]["with main"]["main share"] > 0


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


def test_run_quick_measures_every_figure_on_both_backends(tmp_path: Path) -> None:
    """bench/run.py, the suite BENCHMARKS.md reports, end to end at its smallest preset:
    every figure for SQLite in both modes and for PostgreSQL, with the 16-worker row's CPU
    split between this process and the local server."""
    require_postgres()
    out_json = tmp_path / "run.json"
    out = _run(
        str(BENCH / "run.py"),
        "--quick",
        "--no-memory",
        "--postgres",
        PG_URL,
        "--tmpdir",
        str(tmp_path),
        "--json",
        str(out_json),
        cwd=tmp_path,
    )
    results = json.loads(out_json.read_text())
    backends = results["backends"]
    assert set(backends) == {
        "sqlite/durable",
        "sqlite/claim-durable",
        "postgres/durable",
        "postgres/claim-durable",
    }, out
    for key, res in backends.items():
        assert "skipped" not in res, (key, res)
        for fig in ("latency", "threads_shared", "procs_shared", "threads_distinct"):
            assert fig in res, (key, fig)
            assert "failed" not in res[fig], (key, fig, res[fig])
        shared = res["threads_shared"]["safeagent"]["rounds"]
        assert all(r["executions"] == 100 for r in shared), (key, shared)  # --quick: 100 ids
        for phase in ("first", "replay"):
            for name in ("safeagent", "floor"):
                assert res["latency"][phase][name]["mean_us"] > 0, (key, phase, name)
        assert re.search(rf"^\| {re.escape(key)}\s+\|\s+replay mean µs\s+\| \d+", out, re.M), out
    for mode in ("durable", "claim-durable"):
        w16 = backends[f"postgres/{mode}"]["workers16_distinct"]
        for name in ("safeagent", "floor"):
            for r in w16[name]["rounds"]:
                assert r["executions"] > 0, (name, r)
                assert r["client_cpu_us"] > 0, (name, r)
                assert r["server_cpu_us"] is None or r["server_cpu_us"] >= 0, (name, r)
    assert re.search(r"^\| postgres/durable\s+\|\s+CPU us/exec: client; local server", out, re.M)
    fp = results["fingerprint"]
    assert fp["identical"], fp  # the same bytes as rfc8785
    assert fp["nested"]["identical"], fp
    assert re.search(r"^\| fingerprint, nested\s+\|", out, re.M), out


def test_pg_chains_compares_16_and_256_chains_beside_the_floor(tmp_path: Path) -> None:
    """bench/pg_chains.py (BENCHMARKS.md round 11): every variant's row and the ratios;
    its 16-chain variant really has 16 chains (the script asserts it)."""
    require_postgres()
    out = _run(
        str(BENCH / "pg_chains.py"),
        "--rounds",
        "1",
        "--per-thread",
        "5",
        "--postgres",
        PG_URL,
        cwd=tmp_path,
    )
    for variant in ("floor", "chains16", "chains256"):
        assert re.search(rf"^{variant}\s+\d+\s+\d+\s+(\d+|-)\s+\d+\s+[\d.]+%$", out, re.M), out
    for ratio in ("chains16 / floor", "chains256 / floor", "chains256 / chains16"):
        assert re.search(rf"^{ratio}: [\d.]+x$", out, re.M), out
