"""Helpers for the concurrency and crash tests that child processes import.

Spawned processes (``multiprocessing`` with the "spawn" context) import this module by
name, and ``python -m tests._workers <command> <json>`` runs one of its commands in a
fresh interpreter. Side effects write to an *effect ledger*: a plain file that each
execution appends one line to with ``O_APPEND``; tests count the ledger, never the
guard's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safeagent import Guard

ROOT = Path(__file__).resolve().parent.parent
"""The folder that holds the ``tests`` package: children need it on their path."""


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line to the ledger with a single ``O_APPEND`` write."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The ledger's lines (an absent ledger has none)."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def run_script(script: str, *args: str, timeout: float = 60.0) -> str:
    """``script`` in a fresh interpreter run from the repository's root (for fork tests:
    the order of imports decides the order of the at-fork handlers, so the test process's
    own imports must not decide the outcome); killed on timeout. Its stdout, once it
    exited 0."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def child_env() -> dict[str, str]:
    """The environment for ``subprocess`` children: ``tests`` importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def kill_when_marked(module: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``python -m <module> <command> <args as JSON>`` in a fresh interpreter, wait
    until it writes its JSON marker to ``args["marker"]`` (it is then inside ``fn`` or a
    hook, holding its claim), SIGKILL it, and return the marker's content.

    Raises:
        AssertionError: the child never wrote its marker (its stderr says why), or did
            not die of the SIGKILL.
    """
    marker = Path(args["marker"])
    proc = subprocess.Popen(
        [sys.executable, "-m", module, command, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=ROOT,
    )
    try:
        assert wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60)
        assert marker.exists(), proc.communicate(timeout=10)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    result: dict[str, Any] = json.loads(marker.read_text())
    return result


def _describe(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}: {exc}"


# -- multiprocessing (spawn) targets --------------------------------------------------------


def append_ids_worker(
    db: str, ledger: str, ids: list[str], seed: int, barrier: Any, out: str
) -> None:
    """Call every id in a shuffled order behind ``barrier``; write what was seen to ``out``.

    ``out`` gets ``{"pid", "seen": {id: [execution_id, result, replay]}, "errors"}``.
    """
    seen: dict[str, list[Any]] = {}
    errors: list[str] = []
    guard = Guard(db, wait=60.0, lease=120.0)
    try:
        order = list(ids)
        random.Random(seed).shuffle(order)
        barrier.wait(timeout=120)

        def fn(ctx: Any) -> dict[str, Any]:
            append_line(ledger, ctx.request_id)
            return {"id": ctx.request_id, "pid": os.getpid()}

        for rid in order:
            try:
                r = guard.execute(rid, "append", {"id": rid}, fn)
            except BaseException as exc:  # every failure is reported, none expected
                errors.append(f"{rid}: {_describe(exc)}")
            else:
                seen[rid] = [r.execution_id, r.result, r.replay]
    except BaseException as exc:
        errors.append(f"worker: {_describe(exc)}")
    finally:
        guard.close()
        Path(out).write_text(json.dumps({"pid": os.getpid(), "seen": seen, "errors": errors}))


# -- subprocess commands (python -m tests._workers <command> <json args>) ----------------


def cmd_execute(args: dict[str, Any]) -> dict[str, Any]:
    """Execute one request whose side effect appends to the ledger; report the receipt."""
    guard = Guard(args["db"], lease=args.get("lease", 60.0), wait=args.get("wait", 10.0))
    try:

        def fn(ctx: Any) -> dict[str, Any]:
            append_line(args["ledger"], ctx.request_id)
            return {"charge_id": "ch_" + ctx.request_id, "pid": os.getpid()}

        try:
            r = guard.execute(args["request_id"], args["action"], args["payload"], fn)
        except BaseException as exc:
            return {"pid": os.getpid(), "error": _describe(exc)}
        return {
            "pid": os.getpid(),
            "replay": r.replay,
            "execution_id": r.execution_id,
            "result": r.result,
            "status": r.status.value,
            "attempt": r.attempt,
        }
    finally:
        guard.close()


def cmd_claim_and_hang(args: dict[str, Any]) -> dict[str, Any]:
    """Claim with a short lease; inside fn optionally write the ledger, then write the
    marker file and sleep until killed."""
    guard = Guard(args["db"], lease=args["lease"], wait=0)

    def fn(ctx: Any) -> None:
        if args["write_ledger"]:
            append_line(args["ledger"], ctx.request_id)
        tmp = args["marker"] + ".tmp"
        Path(tmp).write_text(json.dumps({"pid": os.getpid(), "execution_id": ctx.execution_id}))
        os.replace(tmp, args["marker"])
        time.sleep(600)  # the parent SIGKILLs us here

    guard.execute(args["request_id"], args["action"], args["payload"], fn)
    return {"pid": os.getpid(), "error": "fn returned: the parent should have killed us"}


def cmd_reconcile_and_hang(args: dict[str, Any]) -> dict[str, Any]:
    """Call an in-doubt request whose action has a reconcile hook: take the reconcile lease
    (short), and inside the hook write the marker (with what the hook was asked) and sleep
    until killed. ``pg_url`` and ``schema`` pick a PostgreSQL store, else ``db`` (SQLite)."""
    from safeagent import ActionPolicy, ReconcileRequest, SQLiteStore

    store: Any
    if "pg_url" in args:
        from safeagent.stores.postgres import PostgresStore

        store = PostgresStore(args["pg_url"], schema=args["schema"])
    else:
        store = SQLiteStore(args["db"])

    def hook(req: ReconcileRequest) -> None:
        asked = {
            "pid": os.getpid(),
            "owner": req.owner,
            "lease_expired_at_ms": req.lease_expired_at_ms,
            "fencing_token": req.fencing_token,
        }
        tmp = args["marker"] + ".tmp"
        Path(tmp).write_text(json.dumps(asked))
        os.replace(tmp, args["marker"])
        time.sleep(600)  # the parent SIGKILLs us here

    policy = ActionPolicy(reconcile=hook)
    guard = Guard(store, lease=args["lease"], wait=0, actions={args["action"]: policy})
    guard.execute(args["request_id"], args["action"], args["payload"], lambda ctx: None)
    return {"pid": os.getpid(), "error": "the hook returned: the parent should have killed us"}


COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "execute": cmd_execute,
    "claim_and_hang": cmd_claim_and_hang,
    "reconcile_and_hang": cmd_reconcile_and_hang,
}


def main(argv: list[str]) -> int:
    command, raw = argv
    print(json.dumps(COMMANDS[command](json.loads(raw))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
