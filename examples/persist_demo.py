"""Receipts survive a restart: run this twice, each time in a new process.

    python examples/persist_demo.py   # first run: sends invoice INV-1 ("executed")
    python examples/persist_demo.py   # second run: replayed from SQLite, not sent again

Both runs use the same request id (``persist-demo-1``) and the default embedded store:
``$SAFEAGENT_DB`` if set, else ``safeagent.db`` in the working directory. The side effect
appends one line to ``persist_demo_ledger.txt`` next to that database, so the line count
proves it ran once across runs. To start over, delete both files (or point
``SAFEAGENT_DB`` at a new file).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from safeagent import ExecutionContext, Guard, GuardError

REQUEST_ID = "persist-demo-1"
ACTION = "send_invoice"
PAYLOAD = {"invoice": "INV-1", "customer": "cus_ada", "amount_cents": 4200}


def ledger_path(db_path: str) -> Path:
    return Path(os.path.abspath(db_path)).with_name("persist_demo_ledger.txt")


def send_invoice(ctx: ExecutionContext, ledger: Path) -> dict[str, str]:
    """The side effect: one line in the ledger per invoice actually sent."""
    message_id = f"msg_{uuid.uuid4().hex[:12]}"
    with ledger.open("a", encoding="utf-8") as out:
        out.write(f"sent {PAYLOAD['invoice']} {message_id} key={ctx.downstream_key}\n")
    return {"invoice": PAYLOAD["invoice"], "message_id": message_id}


def main() -> int:
    with Guard() as guard:
        db_path = os.path.abspath(guard.store.path)
        ledger = ledger_path(db_path)
        try:
            receipt = guard.execute(
                REQUEST_ID, ACTION, PAYLOAD, lambda ctx: send_invoice(ctx, ledger)
            )
        except GuardError as exc:
            print(f"{type(exc).__name__}: {exc}")
            return 1
    if receipt.replay:
        print(f"replayed from {db_path}: not executed again")
    else:
        print(f"executed: {ACTION} {PAYLOAD['invoice']} (receipt stored in {db_path})")
    print(f"  execution id: {receipt.execution_id}")
    print(f"  result:       {json.dumps(receipt.result)}")
    sent = ledger.read_text(encoding="utf-8").splitlines() if ledger.exists() else []
    print(f"side effects in {ledger}: {len(sent)}")
    return 0 if len(sent) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
