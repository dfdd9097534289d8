"""CPU instructions per call on SQLite, counted by valgrind's callgrind: the floor, the
least guard and SafeAgent, first executions and replays, side by side in one run.

    python bench/instructions.py [--n 1000] [--mode durable|claim-durable] [--json out.json]

Wall-clock timings on a shared 2-vCPU VM swing by a third between identical runs; an
instruction count does not: callgrind counts the instructions the process executes
(user space only, not the kernel's fsync), the same for the same code and inputs whatever
else the machine is doing. It is the measure to compare two commits of the hot path with.

Each figure is the difference of two runs of one child process, one making ``n`` calls
and one ``2n``, divided by ``n``: start-up, imports, schema creation and the warm-up
cancel out. Rows are the ones of ``bench/decompose.py`` (the raw sqlite3 floor of
``bench/quick.py``; the least guard, a lower bound for any CPython guard keeping
docs/design.md; ``Guard.execute``), plus the cost of one fingerprint. A replay runs over
300 ids executed during the warm-up.

Caveat: under valgrind OpenSSL cannot use the CPU's SHA extensions, so each SHA-256
counts several times its native cost; rows that hash more (SafeAgent's audit chain, the
fingerprint) are overstated against the floor, which hashes nothing. Compare a row with
itself across commits; for ratios against the floor, the wall-clock figures of
``bench/run.py`` and ``bench/decompose.py`` are the ones the targets use.

Needs ``valgrind`` on PATH (Debian: ``apt install valgrind``). ``--direct`` runs each
workload once without valgrind, to check that the script works where valgrind is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

REPLAY_IDS = 300
ROWS = (
    ("floor", "first"),
    ("least guard", "first"),
    ("guard", "first"),
    ("floor", "replay"),
    ("fingerprint", "replay"),
    ("least guard", "replay"),
    ("guard", "replay"),
)


def child(row: str, kind: str, n: int, mode: str, folder: str) -> None:
    """Build ``row``'s implementation on a fresh file in ``folder``, warm it up with
    ``REPLAY_IDS`` first executions, then make ``n`` calls of ``kind``."""
    from decompose import PAYLOAD, RESULT, LeastGuard  # noqa: PLC0415 - sys.path set above
    from quick import Floor  # noqa: PLC0415

    from safeagent import Guard, SQLiteStore  # noqa: PLC0415
    from safeagent._keys import canonical_json, fingerprint  # noqa: PLC0415

    complete_sync = "NORMAL" if mode == "claim-durable" else "FULL"
    path = os.path.join(folder, f"{row.replace(' ', '-')}-{kind}-{n}.db")
    close = None
    if row == "floor":
        floor = Floor(path, "FULL", complete_sync)
        run = lambda rid: floor.execute(rid, lambda: RESULT)  # noqa: E731
    elif row == "least guard":
        least = LeastGuard(path, "FULL", complete_sync)
        run = lambda rid: least.execute(rid, lambda: RESULT, PAYLOAD)  # noqa: E731
    elif row == "guard":
        guard = Guard(SQLiteStore(path, durability=mode))
        run = lambda rid: guard.execute(rid, "charge", PAYLOAD, lambda _ctx: RESULT)  # noqa: E731
        close = guard.close
    elif row == "fingerprint":
        run = lambda _rid: fingerprint("charge", canonical_json(PAYLOAD))  # noqa: E731
    else:
        raise SystemExit(f"unknown row {row!r}")
    for i in range(REPLAY_IDS):
        run(f"w{i}")
    if kind == "first":
        for i in range(n):
            run(f"f{i:08d}")  # one length for every id: n and 2n runs differ only in count
    else:
        for i in range(n):
            run(f"w{i % REPLAY_IDS}")
    if close is not None:
        close()


def _count(row: str, kind: str, n: int, mode: str, folder: str) -> int:
    """Instructions callgrind counted for one child run of ``n`` calls."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        row,
        kind,
        str(n),
        "--mode",
        mode,
        "--dir",
        folder,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    found = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"valgrind run failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def measure(
    n: int, mode: str, folder: str, jobs: int, rows: tuple[tuple[str, str], ...] = ROWS
) -> dict[str, dict[str, float]]:
    """``{kind: {row: instructions per call}}``: each row's (2n run - n run) / n."""
    work = [(row, kind, size) for row, kind in rows for size in (n, 2 * n)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        counts = list(pool.map(lambda w: _count(w[0], w[1], w[2], mode, folder), work))
    by = dict(zip(work, counts, strict=True))
    out: dict[str, dict[str, float]] = {"first": {}, "replay": {}}
    for row, kind in rows:
        out[kind][row] = (by[(row, kind, 2 * n)] - by[(row, kind, n)]) / n
    return out


def table(figures: dict[str, dict[str, float]]) -> str:
    first, replay = figures["first"], figures["replay"]
    bound = replay["floor"] + replay["fingerprint"]
    lines = [
        "| call | row | instructions per call | / floor | / (floor replay + fingerprint) |",
        "|---|---|---|---|---|",
    ]
    for row in ("floor", "least guard", "guard"):
        lines.append(
            f"| first | {row} | {first[row]:,.0f} | {first[row] / first['floor']:.2f}x | |"
        )
    for row in ("floor", "fingerprint", "least guard", "guard"):
        ratio = "" if row in ("floor", "fingerprint") else f"{replay[row] / bound:.2f}x"
        lines.append(
            f"| replay | {row} | {replay[row]:,.0f} | {replay[row] / replay['floor']:.2f}x "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="calls in the smaller run")
    parser.add_argument("--mode", choices=("durable", "claim-durable"), default="durable")
    parser.add_argument("--dir", default=None, help="where the files go (default: tmpfs)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument(
        "--guard-only",
        action="store_true",
        help="count SafeAgent's rows only (to compare two commits of its hot path)",
    )
    parser.add_argument("--direct", action="store_true", help="run once, without valgrind")
    parser.add_argument("--child", nargs=3, metavar=("ROW", "KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row, kind, n = args.child
        child(row, kind, int(n), args.mode, args.dir)
        return 0
    base = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    with tempfile.TemporaryDirectory(prefix="sa-instructions-", dir=base) as folder:
        if args.direct:
            for row, kind in ROWS:
                child(row, kind, args.n, args.mode, folder)
            print(f"direct run: {len(ROWS)} workloads of {args.n} calls each ran")
            return 0
        if shutil.which("valgrind") is None:
            print("valgrind is not on PATH (Debian: apt install valgrind)", file=sys.stderr)
            return 2
        rows = tuple(r for r in ROWS if r[0] == "guard") if args.guard_only else ROWS
        figures = measure(args.n, args.mode, folder, max(1, args.jobs), rows)
    print(f"SQLite {args.mode}, callgrind instructions per call, n={args.n} (2n - n)")
    if args.guard_only:
        for kind, row in figures.items():
            print(f"guard {kind}: {row['guard']:,.0f}")
    else:
        print(table(figures))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"mode": args.mode, "n": args.n, **figures}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
