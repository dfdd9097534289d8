"""How often a child forked while other threads use a SQLite-backed guard hangs.

    python bench/fork_hang.py [--forks 200] [--threads 8] [--timeout 10]

SafeAgent's fork handlers make a fork wait for a SQLite write in progress and give the
child fresh locks of its own (tests/test_fork_safety.py, tests/test_fork_races.py). What
they cannot reach are the mutexes inside SQLite's C library: a thread of the parent that
was inside any SQLite call (a read, a prepare) at the instant of the fork can leave one
held in the child, whose first SQLite call then waits forever. This script measures that
rate, which README.md cites: ``--threads`` threads execute and replay through one Guard
while the main thread forks ``--forks`` children one after another; each child makes one
guarded call on a fresh id and exits 0. A child still running after ``--timeout`` seconds
is counted as hung and killed. Exit code 0 whatever the rate (it is a measurement).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from safeagent import Guard  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per child")
    parser.add_argument(
        "--dir", default=None, help="where the database goes (default: a new temp dir)"
    )
    args = parser.parse_args()
    if not hasattr(os, "fork"):
        print("os.fork is not available here")
        return 0
    folder = args.dir or tempfile.mkdtemp(prefix="sa-fork-")
    guard = Guard(os.path.join(folder, "fork.db"))
    stop = threading.Event()

    def busy(k: int) -> None:
        n = 0
        while not stop.is_set():
            guard.execute(f"busy-{k}-{n % 50}", "work", {"n": n % 50}, lambda _ctx: "ok")
            n += 1

    threads = [threading.Thread(target=busy, args=(k,), daemon=True) for k in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # the threads are busy before the first fork
    hung = failed = 0
    started = time.monotonic()
    try:
        for i in range(args.forks):
            pid = os.fork()
            if pid == 0:  # the child: one guarded call, then out without cleanup
                code = 1
                try:
                    receipt = guard.execute(f"child-{i}", "work", {}, lambda _ctx: "child")
                    code = 0 if receipt.result == "child" else 1
                finally:
                    os._exit(code)
            deadline = time.monotonic() + args.timeout
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    failed += os.waitstatus_to_exitcode(status) != 0
                    break
                if time.monotonic() > deadline:
                    hung += 1
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join()
    took = time.monotonic() - started
    recorded = sum(guard.get(f"child-{i}") is not None for i in range(args.forks))
    guard.close()
    print(
        f"{args.forks} forks beside {args.threads} busy threads in {took:.1f} s: "
        f"{hung} hung (> {args.timeout:g} s, killed), {failed} failed, "
        f"{args.forks - hung - failed} ok; hang rate {hung / args.forks:.1%}; "
        f"{recorded} child receipts recorded"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
