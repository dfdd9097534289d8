"""A FastMCP server with guarded tools, run over stdio by ``test_mcp.py``.

Environment: ``GUARD_DB`` (the guard's SQLite file), ``LEDGER_DB`` (the effect ledger,
``tests/conftest.py``'s table), ``TOOL_DELAY`` (seconds ``create_ticket`` takes after its
effect, so a client can drop the connection while the answer is on its way) and
``SCOPE`` (the server-level scope of the tools without an ``order_id``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from mcp.server.fastmcp import FastMCP

from safeagent import Guard
from safeagent.integrations.mcp import guard_server

server = FastMCP("tickets")


def effect(key: str, detail: str) -> int:
    """Write one ledger row; returns its id."""
    conn = sqlite3.connect(os.environ["LEDGER_DB"], timeout=30, isolation_level=None)
    try:
        cur = conn.execute("INSERT INTO effects (key, detail) VALUES (?, ?)", (key, detail))
        return int(cur.lastrowid or 0)
    finally:
        conn.close()


@server.tool()
def create_ticket(order_id: str, title: str, priority: str = "normal") -> dict[str, Any]:
    """Open a support ticket for an order."""
    row = effect("ticket", f"{order_id}|{title}|{priority}")
    time.sleep(float(os.environ.get("TOOL_DELAY", "0")))
    return {"ticket_id": f"T-{row}", "priority": priority}


@server.tool()
def send_email(to: str, template: str) -> str:
    """Send a templated email; the mail server never acknowledges."""
    effect("mail", f"{to}|{template}")
    raise TimeoutError("mail server did not acknowledge")


if __name__ == "__main__":
    guard = Guard(os.environ["GUARD_DB"])
    guard_server(server, guard, scope=os.environ.get("SCOPE", "run-1"), scope_arg="order_id")
    try:
        server.run("stdio")
    finally:
        guard.close()
