"""An MCP client loses its connection mid-call and retries; one ticket is filed.

Run it from any directory, offline (``pip install -e '.[mcp]'``)::

    python examples/mcp_tickets.py

This file is both an MCP server and its client. ``python examples/mcp_tickets.py serve``
runs a FastMCP server over stdio with a ``create_ticket`` tool whose tools are guarded by
``safeagent.integrations.mcp.guard_server`` (``serve --plain``: not guarded). Without
arguments it plays the client, as MCP hosts do, starting the server as a child process:

1. a session calls ``create_ticket``; the ticket is filed, but the connection drops before
   the answer arrives (the client gives up and closes the pipes, the server process ends);
2. a new session, with a new server process, calls ``create_ticket`` again with the same
   arguments. Plain: a second ticket. Guarded: the stored ticket comes back.
3. ``python -m safeagent.integrations.mcp --db ...`` (what ``safeagent mcp`` runs) shows
   the receipt to an MCP client.

Request ids are derived from the scope (the ``order_id`` argument), the tool name and the
arguments; never from JSON-RPC or session ids, which change with every connection. The guard
keeps its records in the default SQLite file (``$SAFEAGENT_DB`` if set, else
``safeagent.db`` in the working directory); each run uses a fresh order id, so the demo works
on every run. Exit code 0 when the plain server filed two tickets and the guarded one one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.server.fastmcp import FastMCP

from safeagent import Guard
from safeagent.integrations.mcp import guard_server

server = FastMCP("tickets")


@server.tool()
async def create_ticket(order_id: str, title: str, priority: str = "normal") -> dict[str, Any]:
    """Open a support ticket for an order."""
    tickets = Path(os.environ["TICKETS_FILE"])
    with tickets.open("a") as f:  # the ticketing system: one line per ticket
        f.write(json.dumps({"order_id": order_id, "title": title}) + "\n")
    number = len(tickets.read_text().splitlines())
    await anyio.sleep(0.5)  # the answer takes a while: long enough to lose the connection
    return {"ticket_id": f"T-{number}", "priority": priority}


def db_path() -> str:
    return os.environ.get("SAFEAGENT_DB") or os.path.abspath("safeagent.db")


def late_answer(exc: BaseException) -> bool:
    """The SDK's stdio client can trip over an answer that arrives after its session
    closed (``BrokenResourceError``): part of dropping the connection here."""
    group = getattr(exc, "exceptions", None)
    if group is not None:
        return all(late_answer(e) for e in group)
    return isinstance(exc, anyio.BrokenResourceError)


def count(tickets: Path) -> int:
    return len(tickets.read_text().splitlines()) if tickets.exists() else 0


async def file_twice(tickets: Path, plain: bool) -> tuple[int, Any]:
    """Session 1 drops after the tool ran; session 2 (a new server process) retries."""
    args = {"order_id": f"ORD-{uuid.uuid4().hex[:8]}", "title": "Printer on fire"}
    params = StdioServerParameters(
        command=sys.executable,
        args=[os.path.abspath(__file__), "serve", *(["--plain"] if plain else [])],
        env={**os.environ, "TICKETS_FILE": str(tickets), "SAFEAGENT_DB": db_path()},
    )
    before = count(tickets)
    with open(os.devnull, "w") as quiet:  # the servers' logs
        try:
            async with stdio_client(params, errlog=quiet) as (read, write):  # noqa: SIM117
                async with ClientSession(read, write) as session, anyio.create_task_group() as tg:
                    await session.initialize()
                    tg.start_soon(session.call_tool, "create_ticket", args)
                    with anyio.fail_after(20):
                        while count(tickets) == before:  # the ticket is filed ...
                            await anyio.sleep(0.05)
                    tg.cancel_scope.cancel()  # ... and the connection drops before the answer
        except Exception as exc:
            if not late_answer(exc):
                raise
        async with stdio_client(params, errlog=quiet) as (read, write):  # noqa: SIM117
            async with ClientSession(read, write) as session:
                await session.initialize()
                retry = await session.call_tool("create_ticket", args)
    return count(tickets) - before, retry.structuredContent


async def show_receipts() -> list[dict[str, Any]]:
    """What ``safeagent mcp`` shows an MCP client about the tickets."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "safeagent.integrations.mcp", "--db", db_path()],
        env=dict(os.environ),
    )
    with open(os.devnull, "w") as quiet:
        async with stdio_client(params, errlog=quiet) as (read, write):  # noqa: SIM117
            async with ClientSession(read, write) as session:
                await session.initialize()
                found = await session.call_tool(
                    "list_receipts", {"action": "create_ticket", "limit": 1}
                )
    return list(json.loads(found.content[0].text)["receipts"])  # type: ignore[union-attr]


async def client() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tickets = Path(tmp) / "tickets.jsonl"
        plain_filed, plain_answer = await file_twice(tickets, plain=True)
        print(f"plain server:   tickets filed {plain_filed}   the retry got {plain_answer}")
        filed, answer = await file_twice(tickets, plain=False)
        print(f"guarded server: tickets filed {filed}   the retry got {answer}")
    [receipt] = await show_receipts()
    print(
        f"safeagent mcp:  latest create_ticket receipt {receipt['status']} "
        f"result={receipt['result']} request_id={receipt['request_id'][:16]}..."
    )
    ok = plain_filed == 2 and filed == 1 and receipt["result"] == answer
    print(f"RESULT: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def serve(plain: bool) -> None:
    guard = Guard()  # $SAFEAGENT_DATABASE_URL, else $SAFEAGENT_DB, else ./safeagent.db
    if not plain:
        guard_server(server, guard, scope_arg="order_id")
    try:
        server.run("stdio")
    finally:
        guard.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(plain="--plain" in sys.argv)
    else:
        sys.exit(anyio.run(client))
