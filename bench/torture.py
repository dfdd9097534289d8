"""SIGKILL torture, long run: workers racing over shared request ids are SIGKILLed at chosen
points (before the claim, after it, during the side effect, after it, after completion, at
random; with --hook-in-workers also inside the reconcile hook) and restarted, against an
effect service on 127.0.0.1 that keeps its own ledger (the ground truth).

    python bench/torture.py [--ids 10000] [--kills 1000] [--workers 4] [--seed 1]
                            [--variant both|honours-key|ignores-key] [--hook-in-workers]
                            [--lease 1.0] [--timeout 3600] [--json out.json]

Prints the figures as a table (one column per service variant) and writes them as JSON
with --json. Exit status 1 if any invariant is violated (a duplicate effect, a lost id, a
receipt that disagrees with the ledger, an id still in doubt after reconcile) or a worker
failed; 2 if the run could not finish within --timeout. The harness lives in
tests/torture_harness.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.torture_harness import (
    TortureConfig,
    TortureError,
    TortureReport,
    format_report,
    run_torture,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=10_000, help="request ids (default 10000)")
    parser.add_argument("--kills", type=int, default=1_000, help="SIGKILLs per run (1000)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent workers (4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the chaos plan (1)")
    parser.add_argument(
        "--variant",
        choices=("both", "honours-key", "ignores-key"),
        default="both",
        help="which effect service (default: both, one run each)",
    )
    parser.add_argument(
        "--hook-in-workers",
        action="store_true",
        help="chaos-phase workers reconcile in-doubt records themselves (and get killed there)",
    )
    parser.add_argument("--lease", type=float, default=1.0, help="guard lease, s (1.0)")
    parser.add_argument("--wait", type=float, default=0.05, help="guard wait bound, s (0.05)")
    parser.add_argument("--pre-delay", type=float, default=0.01, help="service delay, s (0.01)")
    parser.add_argument("--decline-mod", type=int, default=25, help="service declines 1 in N")
    parser.add_argument("--timeout", type=float, default=3600.0, help="bound per run, s")
    parser.add_argument("--workdir", help="keep the databases and logs here (default: a temp dir)")
    parser.add_argument("--json", help="write the figures as JSON to this file")
    args = parser.parse_args(argv)

    variants = {"both": (True, False), "honours-key": (True,), "ignores-key": (False,)}
    reports: list[TortureReport] = []
    failed_to_finish: list[str] = []
    for honours_key in variants[args.variant]:
        cfg = TortureConfig(
            ids=args.ids,
            kills=args.kills,
            workers=args.workers,
            seed=args.seed,
            honours_key=honours_key,
            hook_in_workers=args.hook_in_workers,
            lease=args.lease,
            wait=args.wait,
            pre_delay=args.pre_delay,
            decline_mod=args.decline_mod,
            timeout=args.timeout,
            workdir=(
                str(Path(args.workdir) / ("keyed" if honours_key else "plain"))
                if args.workdir
                else None
            ),
        )
        print(f"running: {cfg}", file=sys.stderr, flush=True)
        try:
            reports.append(run_torture(cfg))
        except TortureError as exc:
            failed_to_finish.append(f"honours_key={honours_key}: {exc}")
            print(f"could not finish: {exc}", file=sys.stderr, flush=True)
    if reports:
        print(format_report(reports))
    if args.json:
        doc = {
            "argv": sys.argv[1:],
            "runs": [r.to_dict() for r in reports],
            "did_not_finish": failed_to_finish,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    if failed_to_finish:
        return 2
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
