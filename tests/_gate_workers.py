"""Child-process helpers for the finality gate tests (tests/test_gate.py).

Spawned processes (``multiprocessing`` with the "spawn" context) import this module by
name, and ``python -m tests._gate_workers <command> <json>`` runs one of its commands in a
fresh interpreter. Side effects append one line to a ledger file (``O_APPEND``, see
``tests._workers.append_line``); tests count the ledger, never the guard's records.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safeagent import FinalityGate, Guard
from tests._workers import append_line


def _describe(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}: {exc}"


# -- multiprocessing (spawn) targets --------------------------------------------------------


def signal_worker(
    db: str, case_id: str, sources: list[str], rounds: int, barrier: Any, out: str
) -> None:
    """Behind ``barrier``, send ``rounds`` signals from each of ``sources`` (round robin).

    ``out`` gets ``{"pid", "sent": [[source, seq], ...], "errors"}``.
    """
    sent: list[list[Any]] = []
    errs: list[str] = []
    guard = Guard(db, wait=30.0, lease=60.0)
    try:
        gate = FinalityGate(guard)
        barrier.wait(timeout=120)
        for seq in range(rounds):
            for source in sources:
                outcome = "approve" if (seq + len(source)) % 2 else "reject"
                try:
                    gate.signal(case_id, source, outcome, 0.5, metadata={"seq": seq})
                except BaseException as exc:  # every failure is reported, none expected
                    errs.append(f"{source}/{seq}: {_describe(exc)}")
                else:
                    sent.append([source, seq])
    except BaseException as exc:
        errs.append(f"worker: {_describe(exc)}")
    finally:
        guard.close()
        Path(out).write_text(json.dumps({"pid": os.getpid(), "sent": sent, "errors": errs}))


def settle_worker(db: str, case_id: str, ledger: str, barrier: Any, out: str) -> None:
    """Behind ``barrier``, settle ``case_id`` once; the side effect sleeps 100 ms and
    appends ``case_id:outcome`` to the ledger. ``out`` gets the receipt or the error."""
    report: dict[str, Any] = {"pid": os.getpid(), "errors": []}
    guard = Guard(db, wait=60.0, lease=60.0)
    try:
        gate = FinalityGate(guard)

        def effect(outcome: str, ctx: Any) -> dict[str, Any]:
            time.sleep(0.1)
            append_line(ledger, f"{case_id}:{outcome}")
            return {"outcome": outcome, "pid": os.getpid(), "execution_id": ctx.execution_id}

        barrier.wait(timeout=120)
        receipt = gate.settle(case_id, "pay_out", effect)
        report["receipt"] = receipt.to_dict()
        report["replay"] = receipt.replay
    except BaseException as exc:
        report["errors"].append(_describe(exc))
    finally:
        guard.close()
        Path(out).write_text(json.dumps(report))


# -- subprocess commands (python -m tests._gate_workers <command> <json args>) -------------


def cmd_inspect(args: dict[str, Any]) -> dict[str, Any]:
    """Open the guard on ``db`` and report a case: its state, history, case audit trail,
    and (when ``settle`` is set) what settling it again returns. The side effect appends
    to the ledger, so a re-run would show there."""
    guard = Guard(args["db"], wait=0)
    try:
        gate = FinalityGate(guard)
        case_id = args["case_id"]
        case = gate.get(case_id)
        report: dict[str, Any] = {
            "pid": os.getpid(),
            "case": None if case is None else case.to_dict(),
            "history": [[s.to_dict(), status] for s, status in gate.history(case_id)],
            "events": [[e.kind.value, e.actor, dict(e.detail)] for e in guard.audit_trail(case_id)],
        }
        if args.get("settle"):

            def effect(outcome: str, ctx: Any) -> str:
                append_line(args["ledger"], f"child:{case_id}:{outcome}")
                return "ran in the child"

            try:
                report["settle"] = gate.settle(case_id, args["action"], effect).to_dict()
            except BaseException as exc:
                report["settle_error"] = _describe(exc)
        return report
    finally:
        guard.close()


def cmd_signal(args: dict[str, Any]) -> dict[str, Any]:
    """Send one signal to a case on ``db``; report the case after it."""
    guard = Guard(args["db"], wait=0)
    try:
        case = FinalityGate(guard).signal(
            args["case_id"], args["source"], args["outcome"], args["confidence"]
        )
        return {"pid": os.getpid(), "case": case.to_dict()}
    finally:
        guard.close()


def cmd_settle_and_hang(args: dict[str, Any]) -> dict[str, Any]:
    """Settle a FINAL case with a short lease; inside fn append to the ledger, write the
    marker file, then sleep until the parent kills us."""
    guard = Guard(args["db"], lease=args["lease"], wait=0)

    def effect(outcome: str, ctx: Any) -> None:
        append_line(args["ledger"], f"{args['case_id']}:{outcome}")
        tmp = args["marker"] + ".tmp"
        Path(tmp).write_text(json.dumps({"pid": os.getpid(), "execution_id": ctx.execution_id}))
        os.replace(tmp, args["marker"])
        time.sleep(600)  # the parent SIGKILLs us here

    FinalityGate(guard).settle(args["case_id"], args["action"], effect)
    return {"pid": os.getpid(), "error": "fn returned: the parent should have killed us"}


COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "inspect": cmd_inspect,
    "signal": cmd_signal,
    "settle_and_hang": cmd_settle_and_hang,
}


def main(argv: list[str]) -> int:
    command, raw = argv
    print(json.dumps(COMMANDS[command](json.loads(raw))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
