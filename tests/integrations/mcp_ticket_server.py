"""A FastMCP server with guarded tools, run over stdio by ``test_mcp.py``.

Environment: ``GUARD_DB`` (the guard's SQLite file), ``LEDGER_DB`` (the effect ledger,
``tests/conftest.py``'s table), ``TOOL_DELAY`` (seconds ``create_ticket`` and
``book_courier`` take after their effect, so a client can drop the connection while the
answer is on its way), ``SCOPE`` (the server-level scope of the tools without an
``order_id``), ``GUARD_KIND`` (``sync``, the default: a ``Guard``; ``async``: an
``AsyncGuard``) and ``LEASE`` (the guard's lease in seconds).
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import anyio
from mcp.server.fastmcp import FastMCP

from safeagent import AsyncGuard, Guard
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
async def book_courier(order_id: str, address: str) -> dict[str, Any]:
    """Book a courier: the request goes out at once, the answer comes TOOL_DELAY s later."""
    row = effect("courier", f"{order_id}|{address}")
    await anyio.sleep(float(os.environ.get("TOOL_DELAY", "0")))
    effect("courier-answer", str(row))
    return {"booking_id": f"B-{row}"}


@server.tool()
def send_email(to: str, template: str) -> str:
    """Send a templated email; the mail server never acknowledges."""
    effect("mail", f"{to}|{template}")
    raise TimeoutError("mail server did not acknowledge")


if __name__ == "__main__":
    kind = AsyncGuard if os.environ.get("GUARD_KIND") == "async" else Guard
    lease = {"lease": float(os.environ["LEASE"])} if os.environ.get("LEASE") else {}
    guard = kind(os.environ["GUARD_DB"], **lease)
    guard_server(server, guard, scope=os.environ.get("SCOPE", "run-1"), scope_arg="order_id")
    try:
        server.run("stdio")
    finally:
        if isinstance(guard, AsyncGuard):
            anyio.run(guard.aclose)
        else:
            guard.close()
