"""MCP: guarded FastMCP tools and SafeAgent's own MCP server, with the real ``mcp`` SDK.

Real client sessions (``ClientSession``) talk to servers over stdio (a child process per
session, as MCP clients run local servers) or over the SDK's in-memory transport (several
sessions against one server object). Side effects are counted in the effect ledger
(``tests/conftest.py``), a SQLite file separate from the guard's database.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integrations import require

require("mcp")

import anyio  # noqa: E402
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.server.fastmcp import Context, FastMCP  # noqa: E402
from mcp.shared.memory import create_connected_server_and_client_session  # noqa: E402
from mcp.types import CallToolResult  # noqa: E402
from pydantic import AnyUrl  # noqa: E402

from safeagent import (  # noqa: E402
    AsyncGuard,
    FinalityGate,
    Guard,
    MemoryStore,
    NotExecuted,
    Status,
)
from safeagent.errors import ConfigurationError  # noqa: E402
from safeagent.integrations.mcp import build_server, guard_server, guarded  # noqa: E402
from tests.conftest import Ledger  # noqa: E402
from tests.integrations import run_example  # noqa: E402

HERE = Path(__file__).parent
TICKET = {"order_id": "ORD-1", "title": "Printer on fire", "priority": "high"}


def text(result: CallToolResult) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@asynccontextmanager
async def stdio_session(
    tmp_path: Path, ledger: Ledger, *args: str, delay: float = 0.0
) -> AsyncIterator[ClientSession]:
    """A client session with a fresh server process (``mcp_ticket_server.py``)."""
    env = {
        **os.environ,
        "GUARD_DB": str(tmp_path / "guard.db"),
        "LEDGER_DB": ledger.path,
        "TOOL_DELAY": str(delay),
    }
    params = StdioServerParameters(
        command=sys.executable, args=[str(HERE / "mcp_ticket_server.py"), *args], env=env
    )
    with (tmp_path / "server.log").open("a") as log:
        async with stdio_client(params, errlog=log) as (read, write):  # noqa: SIM117
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def late_answer(exc: BaseException) -> bool:
    """The SDK's stdio client may trip over an answer that arrives after its session
    closed (``BrokenResourceError``): part of dropping the connection."""
    group = getattr(exc, "exceptions", None)
    if group is not None:
        return all(late_answer(e) for e in group)
    return isinstance(exc, anyio.BrokenResourceError)


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


def test_stdio_connection_dropped_after_the_tool_ran(tmp_path: Path, ledger: Ledger) -> None:
    """Over stdio, retries after a connection dropped post-effect get the stored ticket: one."""

    async def scenario() -> list[CallToolResult]:
        try:
            async with (
                stdio_session(tmp_path, ledger, delay=0.7) as session,
                anyio.create_task_group() as calls,
            ):
                calls.start_soon(session.call_tool, "create_ticket", TICKET)
                await wait_for(lambda: ledger.count("ticket") == 1)  # the tool ran
                calls.cancel_scope.cancel()  # the client stops waiting for the answer
        except Exception as exc:
            if not late_answer(exc):
                raise
        # leaving the session closed the pipes: the connection is gone
        async with stdio_session(tmp_path, ledger) as session:  # a new server process
            results = [await session.call_tool("create_ticket", TICKET)]
        async with stdio_session(tmp_path, ledger) as session:  # and another one
            for args in (dict(reversed(TICKET.items())), {**TICKET, "title": "Other"}):
                results.append(await session.call_tool("create_ticket", args))
        return results

    again, reordered, other = anyio.run(scenario)

    guard = Guard(tmp_path / "guard.db")
    [first_receipt] = [
        guard.get(e.subject) for e in guard.audit_trail() if e.kind.value == "succeeded"
    ][:1]
    guard.close()
    assert first_receipt is not None
    assert first_receipt.status is Status.SUCCEEDED
    assert first_receipt.result == {"ticket_id": "T-1", "priority": "high"}
    for result in (again, reordered):
        assert not result.isError
        assert result.structuredContent == {"ticket_id": "T-1", "priority": "high"}
        assert json.loads(text(result)) == {"ticket_id": "T-1", "priority": "high"}
    assert other.structuredContent == {"ticket_id": "T-2", "priority": "high"}
    assert ledger.count("ticket") == 2
    assert next(d for _, d in ledger.rows("ticket")) == "ORD-1|Printer on fire|high"


def test_stdio_failure_replayed_across_restarts(tmp_path: Path, ledger: Ledger) -> None:
    """Over stdio, each new server process replays the stored failure with the same text."""
    args = {"to": "user@example.test", "template": "welcome"}

    async def scenario() -> list[CallToolResult]:
        results = []
        for _ in range(2):
            async with stdio_session(tmp_path, ledger) as session:
                results.append(await session.call_tool("send_email", args))
        return results

    first, second = anyio.run(scenario)

    assert first.isError
    assert second.isError
    assert text(first) == text(second)
    assert "mail server did not acknowledge" in text(first)
    assert ledger.count("mail") == 1


def ticket_server(ledger: Ledger, guard: Guard | AsyncGuard, *, use_decorator: bool) -> FastMCP:
    """An in-process FastMCP server with a guarded ``create_ticket`` and a reader tool."""
    server = FastMCP("tickets")
    entered: list[str] = []

    async def create_ticket(
        order_id: str, title: str, priority: str = "normal", ctx: Context | None = None
    ) -> dict[str, Any]:
        """Open a support ticket for an order."""
        entered.append(order_id)
        assert ctx is not None  # FastMCP still injects the context
        row = ledger.append("ticket", f"{order_id}|{title}|{priority}")
        await anyio.sleep(0.3)
        return {"ticket_id": f"T-{row}", "priority": priority}

    if use_decorator:
        server.tool()(guarded(guard, scope_arg="order_id")(create_ticket))
    else:
        server.tool()(create_ticket)
        guard_server(server, guard, scope_arg="order_id", tools=["create_ticket"])
    return server


@pytest.mark.parametrize(
    ("kind", "use_decorator"), [("sync", False), ("async", False), ("async", True)]
)
def test_same_server_new_session_after_drop(ledger: Ledger, kind: str, use_decorator: bool) -> None:
    """A new session on the same server after a dropped call gets that call's result."""
    guard: Guard | AsyncGuard = (
        Guard(MemoryStore()) if kind == "sync" else AsyncGuard(MemoryStore())
    )
    server = ticket_server(ledger, guard, use_decorator=use_decorator)

    async def scenario() -> tuple[Any, CallToolResult]:
        async with create_connected_server_and_client_session(server) as session:
            tools = await session.list_tools()
            async with anyio.create_task_group() as calls:
                calls.start_soon(session.call_tool, "create_ticket", TICKET)
                await wait_for(lambda: ledger.count("ticket") == 1)
                calls.cancel_scope.cancel()
        async with create_connected_server_and_client_session(server) as session:
            return tools, await session.call_tool("create_ticket", TICKET)

    tools, result = anyio.run(scenario)

    [schema] = [t for t in tools.tools if t.name == "create_ticket"]
    assert schema.description == "Open a support ticket for an order."
    assert set(schema.inputSchema["properties"]) == {"order_id", "title", "priority"}
    assert not result.isError, text(result)
    assert json.loads(text(result)) == {"ticket_id": "T-1", "priority": "high"}
    assert ledger.count("ticket") == 1


def reserve_server(ledger: Ledger) -> tuple[FastMCP, list[int]]:
    """A server with a ``reserve`` tool that says "not executed" on its first try."""
    server = FastMCP("t")
    tries: list[int] = []

    @server.tool()
    def reserve(day: str, order_id: str | None = None) -> str:
        """Reserve a slot."""
        tries.append(1)
        if len(tries) == 1:
            raise NotExecuted("calendar busy")
        return f"R-{ledger.append('reserve', day)}"

    return server, tries


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "scope"),
        ({"scope": "s", "tools": ["nope"]}, "no tools named"),
        ({"scope_arg": "customer"}, "no argument"),
        ({"scope": "s", "exclude": ["sent_ta"]}, "no guarded tool has"),
        ({"scope": "s", "exclude": {"nope": ["day"]}}, "not guarded here"),
    ],
)
def test_guard_server_refuses_bad_settings(
    ledger: Ledger, options: dict[str, Any], message: str
) -> None:
    """guard_server needs a scope (never transport ids), known tools and argument names."""
    server, _ = reserve_server(ledger)

    with pytest.raises(ConfigurationError, match=message):
        guard_server(server, Guard(MemoryStore()), **options)


def test_guard_server_refuses_guarding_twice(ledger: Ledger) -> None:
    """A tool already guarded is not wrapped a second time."""
    server, _ = reserve_server(ledger)
    guard_server(server, Guard(MemoryStore()), scope="s")

    with pytest.raises(ConfigurationError, match="already guarded"):
        guard_server(server, Guard(MemoryStore()), scope="s")


def call_all(server: FastMCP, calls: list[tuple[str, dict[str, Any]]]) -> list[CallToolResult]:
    async def scenario() -> list[CallToolResult]:
        async with create_connected_server_and_client_session(server) as session:
            return [await session.call_tool(name, args) for name, args in calls]

    return anyio.run(scenario)


def test_call_without_its_scope_argument_gets_an_error(ledger: Ledger) -> None:
    """A call whose scope argument is missing gets an error result and runs nothing."""
    server, tries = reserve_server(ledger)
    guard_server(server, Guard(MemoryStore()), scope_arg="order_id")

    [result] = call_all(server, [("reserve", {"day": "mon"})])

    assert result.isError
    assert "order_id" in text(result)
    assert tries == []


def test_not_executed_lets_the_next_call_run(ledger: Ledger) -> None:
    """A tool raising NotExecuted runs again on the next call, which is then replayed."""
    server, tries = reserve_server(ledger)
    guard_server(server, Guard(MemoryStore()), scope_arg="order_id")
    args = {"day": "mon", "order_id": "ORD-1"}

    released, ran, replayed = call_all(server, [("reserve", args)] * 3)

    assert released.isError
    assert "calendar busy" in text(released)
    assert text(ran) == text(replayed) == "R-1"
    assert len(tries) == 2
    assert ledger.count("reserve") == 1


# -- SafeAgent's own server -------------------------------------------------------------------


def seed(db: Path) -> None:
    """A store with a receipt, a failure, a record in doubt and a case."""
    guard = Guard(db, outcome_unknown=(TimeoutError,))
    guard.execute("k-ok", "create_ticket", {"email": "user@example.test"}, lambda _c: {"t": 1})

    def fails(_ctx: Any) -> Any:
        raise ValueError("card declined")

    def unknown(_ctx: Any) -> Any:
        raise TimeoutError("no answer from the bank")

    with pytest.raises(ValueError, match="declined"):
        guard.execute("k-failed", "charge", {"amount_cents": 500}, fails)
    with pytest.raises(TimeoutError):
        guard.execute("k-doubt", "charge", {"amount_cents": 700}, unknown)
    FinalityGate(guard).signal("case-1", "model-a", "approve", 0.75, metadata={"why": "ok"})
    guard.close()


async def own_server(
    db: Path, log: Path, calls: dict[str, tuple[str, dict[str, Any]]], uris: list[str]
) -> tuple[set[str], dict[str, CallToolResult], list[Any]]:
    """Start ``python -m safeagent.integrations.mcp --db DB`` as a client does, list its
    tools, make ``calls`` and read the resources at ``uris``."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "safeagent.integrations.mcp", "--db", str(db)],
        env=dict(os.environ),
    )
    with log.open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            tools = {t.name for t in (await session.list_tools()).tools}
            results = {key: await session.call_tool(*call) for key, call in calls.items()}
            contents = []
            for uri in uris:
                resource = await session.read_resource(AnyUrl(uri))
                contents.append(json.loads(resource.contents[0].text))  # type: ignore[union-attr]
    return tools, results, contents


def test_own_server_shows_receipts_in_doubt_records_and_audit(tmp_path: Path) -> None:
    """``safeagent mcp`` shows a real stdio client the store's records, payloads redacted."""
    db = tmp_path / "safeagent.db"
    seed(db)
    calls = {
        "receipts": ("list_receipts", {}),
        "failed": ("list_receipts", {"status": "failed"}),
        "ok": ("get_receipt", {"request_id": "k-ok"}),
        "none": ("get_receipt", {"request_id": "nope"}),
        "doubt": ("list_in_doubt", {}),
        "audit": ("audit_trail", {"subject": "k-failed"}),
        "cases": ("list_cases", {}),
        "bad": ("list_receipts", {"status": "lost"}),
    }
    uris = ["safeagent://in-doubt", "safeagent://receipts/default/k-ok"]

    tools, out, (doubt_resource, receipt_resource) = anyio.run(
        own_server, db, tmp_path / "server.log", calls, uris
    )

    assert tools == {
        "list_receipts",
        "get_receipt",
        "list_in_doubt",
        "audit_trail",
        "list_cases",
        "get_case",
        "signal_case",
    }
    data = {k: json.loads(text(v)) for k, v in out.items() if not v.isError and text(v)}
    assert data["receipts"]["count"] == 3
    assert [r["request_id"] for r in data["failed"]["receipts"]] == ["k-failed"]
    assert data["ok"]["result"] == {"t": 1}
    assert data["ok"]["status"] == "SUCCEEDED"
    assert "user@example.test" not in text(out["ok"])  # payloads pass the redaction hook
    assert out["none"].structuredContent == {"result": None}
    assert [r["request_id"] for r in data["doubt"]["receipts"]] == ["k-doubt"]
    assert doubt_resource == data["doubt"]
    assert receipt_resource["request_id"] == "k-ok"
    assert [e["kind"] for e in data["audit"]["events"]] == ["claimed", "failed"]
    assert data["cases"]["cases"][0]["state"] == "RESOLVED_PROVISIONAL"
    assert out["bad"].isError
    assert "status must be one of" in text(out["bad"])


def test_own_server_stores_signals_and_resolves_nothing(tmp_path: Path) -> None:
    """``signal_case`` over stdio lands in the store; the in-doubt record stays in doubt."""
    db = tmp_path / "safeagent.db"
    seed(db)
    signal = {"case_id": "case-1", "source": "model-b", "outcome": "approve", "confidence": 1.0}
    calls = {"signal": ("signal_case", signal), "case": ("get_case", {"case_id": "case-1"})}

    _, out, _ = anyio.run(own_server, db, tmp_path / "server.log", calls, [])

    after_signal = json.loads(text(out["signal"]))
    assert (after_signal["state"], after_signal["outcome"]) == ("FINAL", "approve")
    history = json.loads(text(out["case"]))["history"]
    assert [h["source"] for h in history] == ["model-a", "model-b"]
    guard = Guard(db)
    case = FinalityGate(guard).get("case-1")
    assert case is not None
    assert case.outcome == "approve"
    assert [r.request_id for r in guard.in_doubt()] == ["k-doubt"]
    guard.close()


def test_build_server_refuses_an_async_guard() -> None:
    """SafeAgent's server needs a sync Guard."""
    with pytest.raises(ConfigurationError, match="Guard"):
        build_server(AsyncGuard(MemoryStore()))  # type: ignore[arg-type]


def test_example_runs_offline(tmp_path: Path) -> None:
    """examples/mcp_tickets.py runs offline and exits 0."""
    result = run_example("mcp_tickets.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "guarded server: tickets filed 1" in result.stdout
