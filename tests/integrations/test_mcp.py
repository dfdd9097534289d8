"""MCP: guarded FastMCP tools and SafeAgent's own MCP server, with the real ``mcp`` SDK.

Real client sessions (``ClientSession``) talk to servers over stdio (a child process per
session, as MCP clients run local servers) or over the SDK's in-memory transport (several
sessions against one server object). Side effects are counted in the effect ledger
(``tests/conftest.py``), a SQLite file separate from the guard's database.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integrations import require

require("mcp")

import anyio  # noqa: E402
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.server.fastmcp import Audio, Context, FastMCP, Image  # noqa: E402
from mcp.server.fastmcp.exceptions import ToolError  # noqa: E402
from mcp.shared.memory import create_connected_server_and_client_session  # noqa: E402
from mcp.types import (  # noqa: E402
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
)
from pydantic import AnyUrl, BaseModel, ConfigDict, Field, SecretStr  # noqa: E402

from safeagent import (  # noqa: E402
    AsyncGuard,
    CaseState,
    ConsensusPolicy,
    ErrorInfo,
    FinalityGate,
    Guard,
    MemoryStore,
    NotExecuted,
    Status,
    derive_request_id,
)
from safeagent.errors import ConfigurationError, InvalidInputError  # noqa: E402
from safeagent.integrations.mcp import build_server, guard_server, guarded  # noqa: E402
from tests.conftest import Ledger  # noqa: E402
from tests.integrations import run_example  # noqa: E402

HERE = Path(__file__).parent
TICKET = {"order_id": "ORD-1", "title": "Printer on fire", "priority": "high"}


def text(result: CallToolResult) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@asynccontextmanager
async def stdio_session(
    tmp_path: Path, ledger: Ledger, *args: str, delay: float = 0.0, **settings: str
) -> AsyncIterator[ClientSession]:
    """A client session with a fresh server process (``mcp_ticket_server.py``; ``settings``:
    more of its environment, such as ``GUARD_KIND`` and ``LEASE``)."""
    env = {
        **os.environ,
        "GUARD_DB": str(tmp_path / "guard.db"),
        "LEDGER_DB": ledger.path,
        "TOOL_DELAY": str(delay),
        **settings,
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


@pytest.mark.parametrize("use_decorator", [False, True])
def test_async_bodies_that_need_worker_threads_do_not_starve_a_sync_guard(
    ledger: Ledger, use_decorator: bool
) -> None:
    """A sync Guard and async tool bodies that themselves take a token of anyio's default
    thread limiter (anyio.to_thread, as HTTP clients' DNS look-ups do): more concurrent
    calls than the limiter has tokens all finish, each charging once. The guard's own
    threads must not hold those tokens while they wait for the bodies."""
    guard = Guard(MemoryStore())
    server = FastMCP("t")

    async def fetch(n: int) -> str:
        """Fetch a page."""
        await anyio.to_thread.run_sync(lambda: None)
        return f"P-{ledger.append('fetch', str(n))}"

    if use_decorator:
        server.tool()(guarded(guard, scope="s")(fetch))
    else:
        server.tool()(fetch)
        guard_server(server, guard, scope="s")

    async def scenario() -> list[str]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2
        results: list[str] = []

        async def one(session: ClientSession, n: int) -> None:
            results.append(text(await session.call_tool("fetch", {"n": n})))

        async with (
            create_connected_server_and_client_session(server) as session,
            anyio.create_task_group() as calls,
        ):
            for n in range(4):
                calls.start_soon(one, session, n)
        return results

    # In a daemon thread (the threads it starts are daemons too): a starved run cannot be
    # cancelled, and must fail this test, not hang the suite.
    box: list[list[str]] = []
    runner = threading.Thread(target=lambda: box.append(anyio.run(scenario)), daemon=True)
    runner.start()
    runner.join(30)

    assert box, "the calls did not finish within 30 s: the guard's threads starved them"
    assert sorted(box[0]) == ["P-1", "P-2", "P-3", "P-4"]
    assert ledger.count("fetch") == 4


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


def test_guard_server_refuses_a_tool_under_guarded_and_changes_nothing(
    tmp_path: Path, ledger: Ledger
) -> None:
    """A tool made with ``@guarded`` under ``@server.tool()`` is refused by
    ``guard_server`` before any tool is changed (a second guard would meet the first one's
    claim and store its InProgressError as the tool's failure); the tool then runs once
    and replays through its own guard."""
    guard = Guard(tmp_path / "guard.db", wait=2)
    server = FastMCP("t")

    @server.tool()
    def search(query: str) -> str:
        """Search tickets."""
        return query

    @server.tool()
    @guarded(guard, scope="run-1")
    def create_ticket(title: str) -> dict[str, Any]:
        """Open a ticket."""
        return {"id": ledger.append("ticket", title)}

    manager = server._tool_manager
    before = {name: manager.get_tool(name).fn for name in ("search", "create_ticket")}  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="'create_ticket' is already guarded"):
        guard_server(server, guard, scope="run-1")
    after = {name: manager.get_tool(name).fn for name in ("search", "create_ticket")}  # type: ignore[union-attr]
    first, again = call_all(server, [("create_ticket", {"title": "x"})] * 2)
    receipt = guard.get(derive_request_id("run-1", "create_ticket", {"title": "x"}))
    guard.close()

    assert after == before
    assert not first.isError, text(first)
    assert not again.isError, text(again)
    assert json.loads(text(first)) == json.loads(text(again)) == {"id": 1}
    assert ledger.count("ticket") == 1
    assert receipt is not None
    assert (receipt.status, receipt.result) == (Status.SUCCEEDED, {"id": 1})


def test_guarded_functions_are_not_guarded_again(ledger: Ledger) -> None:
    """``guarded`` refuses a function already guarded (by ``guarded`` or ``guard.guarded``),
    and ``guard_server`` a tool registered over a ``guard.guarded`` function."""
    guard = Guard(MemoryStore())

    def reserve(day: str) -> str:
        return f"R-{ledger.append('reserve', day)}"

    once = guarded(guard, scope="s")(reserve)
    with pytest.raises(ConfigurationError, match="'reserve' is already guarded"):
        guarded(guard, scope="s")(once)
    keyed = guard.guarded(action="reserve", key_arg="day")(reserve)
    with pytest.raises(ConfigurationError, match="'reserve' is already guarded"):
        guarded(guard, scope="s")(keyed)
    server = FastMCP("t")
    server.tool(name="reserve")(keyed)
    with pytest.raises(ConfigurationError, match="'reserve' is already guarded"):
        guard_server(server, guard, scope="s")
    assert ledger.count() == 0


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


# -- what the client is shown, first and on every replay --------------------------------------


def shown(result: CallToolResult) -> dict[str, Any]:
    """A tool result as the client receives it (what goes over the wire)."""
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


class Charge(BaseModel):
    """A charge whose JSON names differ from its Python ones (an alias)."""

    model_config = ConfigDict(populate_by_name=False)

    charge_id: str = Field(alias="chargeId")
    amount_cents: int


class Opaque:
    """A return value pydantic-like enough to be dumped, except that dumping it fails;
    FastMCP shows it as its ``str``."""

    def model_dump(self, **_: Any) -> Any:
        raise RuntimeError("no JSON form")

    def __str__(self) -> str:
        return "opaque receipt #7"


PNG = b"\x89PNG\r\n\x1a\n-receipt"
WAV = b"RIFF\x00\x00\x00\x00WAVE"
OUTPUTS = [
    "text",
    "mapping",
    "model",
    "note",
    "picture",
    "sound",
    "attachment",
    "blocks",
    "result",
    "opaque",
]


def outputs_server(ledger: Ledger, wrap: Callable[[Any], Any] = lambda f: f) -> FastMCP:
    """A server whose tools return each kind of value FastMCP renders; each call of a tool
    writes one ledger row under its name. ``wrap`` decorates every tool function."""
    server = FastMCP("outputs")

    @server.tool()
    @wrap
    def text(order_id: str) -> str:
        ledger.append("text")
        return "filed"

    @server.tool()
    @wrap
    def mapping(order_id: str) -> dict[str, Any]:
        ledger.append("mapping")
        return {"ticket": "T-1", "at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)}

    @server.tool()
    @wrap
    def model(order_id: str) -> Charge:
        ledger.append("model")
        return Charge(chargeId="ch_1", amount_cents=500)

    @server.tool()
    @wrap
    def note(order_id: str) -> TextContent:
        ledger.append("note")
        return TextContent(type="text", text="hello")

    @server.tool()
    @wrap
    def picture(order_id: str) -> Image:
        ledger.append("picture")
        return Image(data=PNG, format="png")

    @server.tool()
    @wrap
    def sound(order_id: str) -> Audio:
        ledger.append("sound")
        return Audio(data=WAV, format="wav")

    @server.tool()
    @wrap
    def attachment(order_id: str) -> EmbeddedResource:
        ledger.append("attachment")
        resource = TextResourceContents(
            uri=AnyUrl("file:///receipts/1.txt"), text="paid", mimeType="text/plain"
        )
        return EmbeddedResource(type="resource", resource=resource)

    @server.tool()
    @wrap
    def blocks(order_id: str):  # type: ignore[no-untyped-def]  # unannotated on purpose
        ledger.append("blocks")
        return [TextContent(type="text", text="scan"), Image(data=PNG, format="png"), {"k": 1}]

    @server.tool()
    @wrap
    def result(order_id: str) -> CallToolResult:
        ledger.append("result")
        return CallToolResult(
            content=[TextContent(type="text", text="done")], structuredContent={"ok": True}
        )

    @server.tool()
    @wrap
    def opaque(order_id: str):  # type: ignore[no-untyped-def]  # unannotated on purpose
        ledger.append("opaque")
        return Opaque()

    return server


@pytest.mark.parametrize("how", ["guard_server", "guarded"])
def test_every_kind_of_result_is_replayed_as_first_shown(
    tmp_path: Path, ledger: Ledger, how: str
) -> None:
    """Strings, JSON values, models, content blocks, Image/Audio and CallToolResult: the
    first guarded call and every replay (a new server, a new guard over the same database)
    show the client exactly what an unguarded server shows, and each tool runs once."""
    calls = [(name, {"order_id": "o1"}) for name in OUTPUTS]
    unguarded = call_all(outputs_server(Ledger(tmp_path / "unguarded.db")), calls)

    def guarded_server() -> FastMCP:
        if how == "guard_server":
            guard = Guard(tmp_path / "guard.db")
            return guard_server(outputs_server(ledger), guard, scope_arg="order_id")
        aguard = AsyncGuard(tmp_path / "guard.db")
        return outputs_server(ledger, guarded(aguard, scope_arg="order_id"))

    first = call_all(guarded_server(), calls)
    replayed = call_all(guarded_server(), calls)

    for name, plain_result, first_result, replay in zip(
        OUTPUTS, unguarded, first, replayed, strict=True
    ):
        assert not plain_result.isError, (name, text(plain_result))
        assert shown(first_result) == shown(plain_result), name
        assert shown(replay) == shown(plain_result), name
        assert ledger.count(name) == 1, name
    by_name = dict(zip(OUTPUTS, replayed, strict=True))
    assert text(by_name["note"]) == "hello"
    assert text(by_name["opaque"]) == json.dumps("opaque receipt #7")  # as FastMCP shows it
    [image] = by_name["picture"].content
    assert isinstance(image, ImageContent)
    assert (image.data, image.mimeType) == (base64.b64encode(PNG).decode(), "image/png")
    assert [c.type for c in by_name["blocks"].content] == ["text", "image", "text"]
    assert by_name["model"].structuredContent == {"chargeId": "ch_1", "amount_cents": 500}
    guard = Guard(tmp_path / "guard.db")
    stored = guard.get(derive_request_id("o1", "text", {"order_id": "o1"}))
    guard.close()
    assert stored is not None
    assert stored.result == "filed"  # plain values are stored as they are


def error_result_server(ledger: Ledger, guard: Guard | AsyncGuard | None) -> FastMCP:
    """Tools that report their own failure with ``CallToolResult(isError=True)``."""
    server = FastMCP("pay")

    @server.tool()
    async def charge(order_id: str, amount_cents: int) -> CallToolResult:
        ledger.append("charge")
        return CallToolResult(
            isError=True, content=[TextContent(type="text", text="card declined")]
        )

    @server.tool()
    def scan(order_id: str) -> CallToolResult:
        ledger.append("scan")
        return CallToolResult(
            isError=True,
            content=[
                TextContent(type="text", text="blurry"),
                ImageContent(
                    type="image", data=base64.b64encode(PNG).decode(), mimeType="image/png"
                ),
            ],
        )

    if guard is not None:
        guard_server(server, guard, scope_arg="order_id")
    return server


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_tool_error_result_is_stored_failed_and_replayed(
    tmp_path: Path, ledger: Ledger, kind: str
) -> None:
    """A tool that returns an error result: the record is FAILED (with a type and the
    text), the tool never runs again, and every replay shows the client the same error
    result (isError, the same content) as the first call and an unguarded server."""
    calls = [
        ("charge", {"order_id": "o1", "amount_cents": 500}),
        ("scan", {"order_id": "o1"}),
    ]
    unguarded = call_all(error_result_server(Ledger(tmp_path / "unguarded.db"), None), calls)

    def new_guard() -> Guard | AsyncGuard:
        return Guard(tmp_path / "guard.db") if kind == "sync" else AsyncGuard(tmp_path / "guard.db")

    first = call_all(error_result_server(ledger, new_guard()), calls)
    replayed = call_all(error_result_server(ledger, new_guard()), calls * 2)

    for plain_result, first_result, replays in zip(
        unguarded, first, (replayed[::2], replayed[1::2]), strict=True
    ):
        assert plain_result.isError
        assert shown(first_result) == shown(plain_result)
        assert [shown(r) for r in replays] == [shown(plain_result)] * 2
    assert text(first[0]) == "card declined"
    assert ledger.count("charge") == ledger.count("scan") == 1
    guard = Guard(tmp_path / "guard.db")
    charge = guard.get(derive_request_id("o1", "charge", calls[0][1]))
    scan = guard.get(derive_request_id("o1", "scan", calls[1][1]))
    guard.close()
    assert charge is not None
    assert scan is not None
    assert charge.status is scan.status is Status.FAILED
    assert charge.error == ErrorInfo("safeagent.integrations.mcp.ToolErrorResult", "card declined")
    assert scan.error is not None
    assert json.loads(scan.error.message)["content"][0] == {"type": "text", "text": "blurry"}


def test_operator_result_of_an_in_doubt_call_is_shown_as_fastmcp_shows_it(
    ledger: Ledger,
) -> None:
    """An operator resolves an in-doubt call with a plain result: the retry shows it as
    FastMCP shows that value (text and structured content), and the tool does not run."""
    server = FastMCP("tickets")

    @server.tool()
    def create_ticket(order_id: str) -> dict[str, Any]:
        ledger.append("ticket")
        raise TimeoutError("no answer")

    guard = Guard(MemoryStore(), outcome_unknown=(TimeoutError,))
    guard_server(server, guard, scope_arg="order_id")
    [in_doubt] = call_all(server, [("create_ticket", {"order_id": "o1"})])
    rid = derive_request_id("o1", "create_ticket", {"order_id": "o1"})
    guard.resolve(rid, Status.SUCCEEDED, by="ops", reason="found it", result={"ticket_id": "T-9"})

    [retry] = call_all(server, [("create_ticket", {"order_id": "o1"})])

    assert in_doubt.isError
    assert not retry.isError
    assert retry.structuredContent == {"ticket_id": "T-9"}
    assert json.loads(text(retry)) == {"ticket_id": "T-9"}
    assert ledger.count("ticket") == 1


def test_guarded_follows_structured_output_false(tmp_path: Path, ledger: Ledger) -> None:
    """``guarded(structured_output=False)`` under ``@server.tool(structured_output=False)``:
    the first call and the replay show what the unguarded tool shows (no structured
    content), for a value stored as FastMCP's rendering (a model with an alias)."""

    def make(wrap: Callable[[Any], Any], book: Ledger) -> FastMCP:
        server = FastMCP("pay")

        @server.tool(structured_output=False)
        @wrap
        def charge(order_id: str) -> Charge:
            book.append("charge")
            return Charge(chargeId="ch_1", amount_cents=500)

        return server

    calls = [("charge", {"order_id": "o1"})]
    [unguarded] = call_all(make(lambda f: f, Ledger(tmp_path / "unguarded.db")), calls)
    guard = Guard(MemoryStore())
    wrap = guarded(guard, scope_arg="order_id", structured_output=False)

    first, replay = call_all(make(wrap, ledger), calls * 2)

    assert unguarded.structuredContent is None
    assert shown(first) == shown(replay) == shown(unguarded)
    assert ledger.count("charge") == 1


class RawReceipt(BaseModel):
    """A result whose bytes are not UTF-8: pydantic cannot turn it into JSON."""

    charge_id: str
    raw: bytes


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_result_that_cannot_be_stored_is_not_recorded_as_failed(
    tmp_path: Path, ledger: Ledger, kind: str
) -> None:
    """The tool ran, then its value could not be turned into JSON: the record is
    SUCCEEDED without a result (never FAILED, which an operator might re-run), the client
    gets ResultNotSerializableError, and a retry does not run the tool again."""
    server = FastMCP("pay")

    @server.tool()
    def charge(order_id: str) -> RawReceipt:
        ledger.append("charge")
        return RawReceipt(charge_id="ch_1", raw=b"\xff\xfe")

    guard: Guard | AsyncGuard = (
        Guard(tmp_path / "guard.db") if kind == "sync" else AsyncGuard(tmp_path / "guard.db")
    )
    guard_server(server, guard, scope_arg="order_id")

    first, retry = call_all(server, [("charge", {"order_id": "o1"})] * 2)

    assert first.isError
    assert retry.isError
    assert "could not be stored" in text(first)
    assert "could not be stored" in text(retry)
    assert ledger.count("charge") == 1
    check = Guard(tmp_path / "guard.db")
    record = check.get(derive_request_id("o1", "charge", {"order_id": "o1"}))
    check.close()
    assert record is not None
    assert record.status is Status.SUCCEEDED
    assert record.result is None
    assert record.error is not None
    assert record.error.type == "safeagent.ResultNotSerializable"


def test_failure_with_an_empty_message_replays_the_same_text(ledger: Ledger) -> None:
    """An exception with no message: the replay shows the first call's exact text."""
    server = FastMCP("t")

    @server.tool()
    def fail_empty(order_id: str) -> str:
        ledger.append("fail")
        raise RuntimeError

    guard_server(server, Guard(MemoryStore()), scope_arg="order_id")

    first, replay = call_all(server, [("fail_empty", {"order_id": "o1"})] * 2)

    assert first.isError
    assert replay.isError
    assert text(first) == text(replay) == "Error executing tool fail_empty: "
    assert ledger.count("fail") == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_stdio_body_finishes_after_the_client_disconnects(
    tmp_path: Path, ledger: Ledger, kind: str
) -> None:
    """Over stdio, a client gives up mid-call and closes the connection: the server process
    lets the started body finish and records it before it exits; the retry, in a new
    server process, replays it (with an AsyncGuard as with a Guard)."""
    args = {"order_id": "ORD-9", "address": "1 Main St"}

    async def scenario() -> tuple[int, CallToolResult]:
        try:
            async with (
                stdio_session(tmp_path, ledger, delay=1.0, GUARD_KIND=kind) as session,
                anyio.create_task_group() as calls,
            ):
                calls.start_soon(session.call_tool, "book_courier", args)
                await wait_for(lambda: ledger.count("courier") == 1)  # the request went out
                calls.cancel_scope.cancel()  # the client gives up and disconnects
        except Exception as exc:
            if not late_answer(exc):
                raise
        answered = ledger.count("courier-answer")  # the old server process has exited
        async with stdio_session(tmp_path, ledger, GUARD_KIND=kind) as session:
            return answered, await session.call_tool("book_courier", args)

    answered, retry = anyio.run(scenario)

    assert answered == 1
    assert not retry.isError, text(retry)
    assert retry.structuredContent == {"booking_id": "B-1"}
    assert ledger.count("courier") == ledger.count("courier-answer") == 1
    guard = Guard(tmp_path / "guard.db")
    record = guard.get(derive_request_id("ORD-9", "book_courier", args))
    guard.close()
    assert record is not None
    assert record.status is Status.SUCCEEDED


def test_stdio_server_killed_mid_body_leaves_the_record_in_doubt(
    tmp_path: Path, ledger: Ledger
) -> None:
    """A body still running when the client kills the server (the SDK's stdio client
    terminates it 2 s after closing its stdin) is cut off: once its lease has expired, the
    retry gets "in doubt" and the tool does not run again."""
    args = {"order_id": "ORD-9", "address": "1 Main St"}

    async def scenario() -> CallToolResult:
        try:
            async with (
                stdio_session(tmp_path, ledger, delay=6.0, GUARD_KIND="async", LEASE="1") as s,
                anyio.create_task_group() as calls,
            ):
                calls.start_soon(s.call_tool, "book_courier", args)
                await wait_for(lambda: ledger.count("courier") == 1)
                calls.cancel_scope.cancel()
        except Exception as exc:
            if not late_answer(exc):
                raise
        await anyio.sleep(1.5)  # the lease of the killed attempt expires
        async with stdio_session(tmp_path, ledger, GUARD_KIND="async") as session:
            return await session.call_tool("book_courier", args)

    retry = anyio.run(scenario)

    assert retry.isError
    assert "in doubt" in text(retry)
    assert ledger.count("courier") == 1
    assert ledger.count("courier-answer") == 0


class CancelAfterClaim(MemoryStore):
    """A store that, once, runs ``cancel`` ``turns`` event-loop turns after a claim is
    won: sweeping ``turns`` moves the cancellation across the moments around the start of
    the tool body (still claiming; the body handed to its task but not started; running)."""

    def __init__(self, turns: int) -> None:
        super().__init__()
        self.turns = turns
        self.cancel: Callable[[], None] | None = None

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        answer = super().claim(*args, **kwargs)
        cancel, self.cancel = self.cancel, None
        if cancel is not None:
            loop = asyncio.get_running_loop()

            def later(turns: int) -> None:
                if turns:
                    loop.call_soon(later, turns - 1)
                else:
                    cancel()

            later(self.turns)
        return answer


async def cancelled_booking(ledger: Ledger, turns: int) -> tuple[bool, Any]:
    """Call a guarded ``book`` tool (AsyncGuard) and cancel the call ``turns`` loop turns
    after its claim; once the call has returned: was it cancelled, and its record."""
    store = CancelAfterClaim(turns)
    guard = AsyncGuard(store)
    server = FastMCP("couriers")

    @server.tool()
    async def book(order_id: str) -> str:
        ledger.append(f"courier-{order_id}")
        await anyio.sleep(0.05)
        ledger.append(f"answer-{order_id}")
        return "B-1"

    guard_server(server, guard, scope_arg="order_id")
    request = {"order_id": f"o{turns}"}
    request_id = derive_request_id(f"o{turns}", "book", request)
    with anyio.CancelScope() as scope:
        store.cancel = scope.cancel
        await server.call_tool("book", request)
    record = await guard.get(request_id)
    if ledger.count(f"courier-o{turns}") == 0:  # cancelled while claiming: the guard
        await anyio.sleep(0.05)  # releases the claim in the background
        record = await guard.get(request_id)
    return scope.cancelled_caught, record


def test_async_guard_cancelled_call_ends_after_its_outcome_is_recorded(ledger: Ledger) -> None:
    """With an AsyncGuard, a call cancelled at any moment returns only once nothing is
    left running: either the body never started (the claim is released) or it has
    finished and its outcome is recorded, so a server that exits as soon as its handlers
    return (a stdio server whose client disconnected) does not cut the body off."""
    seen: set[tuple[bool, Status]] = set()
    for turns in range(8):
        cancelled, record = anyio.run(cancelled_booking, ledger, turns)

        ran = ledger.count(f"courier-o{turns}")
        assert ledger.count(f"answer-o{turns}") == ran, turns  # never cut off
        assert record is not None
        assert record.status is (Status.SUCCEEDED if ran else Status.RELEASED), turns
        seen.add((cancelled, record.status))
    # the sweep met a call cancelled before the body and one cancelled once it had started
    assert {(True, Status.RELEASED), (True, Status.SUCCEEDED)} <= seen, seen


# -- SafeAgent's own server -------------------------------------------------------------------


def seed(db: Path) -> None:
    """A store with a receipt, a failure, a record in doubt, a case, and a case in another
    namespace."""
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
    FinalityGate(guard).open("case-b", namespace="tenant-b")
    guard.close()


async def own_server(
    db: Path,
    log: Path,
    calls: dict[str, tuple[str, dict[str, Any]]],
    uris: list[str],
    *options: str,
) -> tuple[set[str], dict[str, CallToolResult], list[Any]]:
    """Start ``python -m safeagent.integrations.mcp --db DB [options]`` as a client does,
    list its tools, make ``calls`` and read the resources at ``uris``."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "safeagent.integrations.mcp", "--db", str(db), *options],
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
        "cases_b": ("list_cases", {"namespace": "tenant-b"}),
        "bad": ("list_receipts", {"status": "lost"}),
    }
    uris = ["safeagent://in-doubt", "safeagent://receipts/default/k-ok"]

    tools, out, (doubt_resource, receipt_resource) = anyio.run(
        own_server, db, tmp_path / "server.log", calls, uris
    )

    assert tools == {  # no signal_case: no --signal-source, so the server writes nothing
        "list_receipts",
        "get_receipt",
        "list_in_doubt",
        "audit_trail",
        "list_cases",
        "get_case",
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
    # every namespace by default, as the tool says; one when asked
    assert [(c["namespace"], c["case_id"]) for c in data["cases"]["cases"]] == [
        ("default", "case-1"),
        ("tenant-b", "case-b"),
    ]
    assert [c["case_id"] for c in data["cases_b"]["cases"]] == ["case-b"]
    assert out["bad"].isError
    assert "status must be one of" in text(out["bad"])


def test_own_server_stores_signals_and_resolves_nothing(tmp_path: Path) -> None:
    """``signal_case`` over stdio (``--signal-source model-b``) lands in the store as
    ``model-b``; the in-doubt record stays in doubt."""
    db = tmp_path / "safeagent.db"
    seed(db)
    signal = {"case_id": "case-1", "outcome": "approve", "confidence": 1.0}
    calls = {"signal": ("signal_case", signal), "case": ("get_case", {"case_id": "case-1"})}

    _, out, _ = anyio.run(
        own_server, db, tmp_path / "server.log", calls, [], "--signal-source", "model-b"
    )

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


def test_a_client_cannot_signal_as_another_source_nor_open_a_case(tmp_path: Path) -> None:
    """A model on SafeAgent's server used to name the source of its signal: naming a
    human reviewer's, it replaced the reviewer's live "reject" with "approve" and made the
    case FINAL, and ``settle`` paid out; and signalling a case nobody had opened opened it
    with the default policy (threshold 0.8, quorum 1), so it could decide alone before the
    application opened it with a stricter one. The source is now the server's own, and
    only a case the application opened takes signals."""
    db = tmp_path / "safeagent.db"
    guard = Guard(db)
    gate = FinalityGate(guard)
    gate.open("refund-9", policy=ConsensusPolicy(0.7, 2))
    gate.signal("refund-9", "fraud-model", "approve", 0.9)
    gate.signal("refund-9", "human-review", "reject", 1.0)
    server = build_server(guard, signal_source="fraud-model")

    def call(arguments: dict[str, Any]) -> Any:
        return asyncio.run(server.call_tool("signal_case", arguments))

    # "source" is no argument of the tool: left out, the signal is the server's own
    call({"case_id": "refund-9", "source": "human-review", "outcome": "approve", "confidence": 1})
    call({"case_id": "refund-9", "outcome": "approve", "confidence": 1.0})
    with pytest.raises(ToolError, match="no case 'new-case'"):
        call({"case_id": "new-case", "outcome": "approve", "confidence": 1.0})
    case = gate.get("refund-9")
    assert case is not None
    assert case.state is not CaseState.FINAL
    assert {(s.source, s.outcome) for s in case.signals} == {
        ("fraud-model", "approve"),
        ("human-review", "reject"),
    }
    assert gate.get("new-case") is None
    guard.close()


def test_a_server_without_a_signal_source_writes_nothing() -> None:
    """``build_server(guard)``: no ``signal_case`` tool; a bad ``signal_source`` is a typed
    error before anything is served."""
    guard = Guard(MemoryStore())
    tools = asyncio.run(build_server(guard).list_tools())
    assert "signal_case" not in {t.name for t in tools}
    with pytest.raises(InvalidInputError):
        build_server(guard, signal_source="")


def test_the_module_entry_point_refuses_a_bad_signal_source_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m safeagent.integrations.mcp --signal-source ''`` is a usage error (exit 2,
    one line), as ``safeagent mcp`` is, not a traceback; nothing is served."""
    from safeagent.integrations.mcp import main

    with pytest.raises(SystemExit) as info:
        main(["--db", ":memory:", "--signal-source", ""])
    assert info.value.code == 2
    assert "signal source" in capsys.readouterr().err


def test_build_server_refuses_an_async_guard() -> None:
    """SafeAgent's server needs a sync Guard."""
    with pytest.raises(ConfigurationError, match="Guard"):
        build_server(AsyncGuard(MemoryStore()))  # type: ignore[arg-type]


def test_example_runs_offline(tmp_path: Path) -> None:
    """examples/mcp_tickets.py runs offline and exits 0."""
    result = run_example("mcp_tickets.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "guarded server: tickets filed 1" in result.stdout


def test_error_result_stays_failed_under_a_guard_that_doubts_every_exception(
    tmp_path: Path, ledger: Ledger
) -> None:
    """A guard declaring every Exception "outcome unknown" (a cautious default) must not
    turn a tool's definite error result into a record in doubt: it is FAILED, and every
    replay shows the first call's error result, not an in-doubt error."""
    calls = [("charge", {"order_id": "o1", "amount_cents": 500})]

    def cautious() -> Guard:
        return Guard(tmp_path / "guard.db", outcome_unknown=(Exception,))

    first = call_all(error_result_server(ledger, cautious()), calls)
    replayed = call_all(error_result_server(ledger, cautious()), calls * 2)
    assert [shown(r) for r in replayed] == [shown(first[0])] * 2
    assert text(first[0]) == "card declined"
    assert first[0].isError
    guard = cautious()
    record = guard.get(derive_request_id("o1", "charge", calls[0][1]))
    guard.close()
    assert record is not None
    assert record.status is Status.FAILED
    assert ledger.count("charge") == 1


class Card(BaseModel):
    """A card whose token pydantic masks when it dumps it."""

    token: SecretStr


class Payee(BaseModel):
    """A payee whose IBAN pydantic leaves out when it dumps it."""

    name: str
    iban: str = Field(exclude=True)


def test_calls_differing_only_in_a_secret_or_an_excluded_field_are_two_requests(
    ledger: Ledger,
) -> None:
    """pydantic dumps a SecretStr as '**********' and leaves out an ``exclude=True`` field:
    keyed on that dump, a charge to another card (a payout to another IBAN) got the first
    one's request id and was replayed as it. Each distinct call runs once; the same call
    again replays; the stored payload never holds the secret in clear."""
    server = FastMCP("pay")

    @server.tool()
    def charge(order_id: str, card: Card, amount_cents: int) -> str:
        ledger.append("charge", card.token.get_secret_value())
        return f"charged {card.token.get_secret_value()}"

    @server.tool()
    def payout(order_id: str, payee: Payee, amount_cents: int) -> str:
        ledger.append("payout", payee.iban)
        return f"paid {payee.iban}"

    store = MemoryStore()
    guard_server(server, Guard(store), scope_arg="order_id")
    calls = [
        ("charge", {"order_id": "o1", "card": {"token": "tok_ALICE"}, "amount_cents": 500}),
        ("charge", {"order_id": "o1", "card": {"token": "tok_BOB"}, "amount_cents": 500}),
        ("payout", {"order_id": "o1", "payee": {"name": "A", "iban": "DE111"}, "amount_cents": 5}),
        ("payout", {"order_id": "o1", "payee": {"name": "A", "iban": "FR999"}, "amount_cents": 5}),
    ]
    results = call_all(server, calls * 2)
    assert [text(r) for r in results] == [
        "charged tok_ALICE",
        "charged tok_BOB",
        "paid DE111",
        "paid FR999",
    ] * 2
    assert ledger.rows() == [
        ("charge", "tok_ALICE"),
        ("charge", "tok_BOB"),
        ("payout", "DE111"),
        ("payout", "FR999"),
    ]
    stored = " ".join(r.payload_json for r in store.records()[0])
    assert "tok_ALICE" not in stored
    assert "secret_sha256" in stored


def test_generator_functions_are_refused_before_anything_changes(ledger: Ledger) -> None:
    """``guarded`` and ``guard_server`` refuse a generator or async generator function tool
    (calling one runs none of its body, so its call would be recorded as done); the
    server's tools are left as they were."""

    def export_rows(table: str) -> Any:
        """Export rows."""
        ledger.append("export", table)
        yield "row"

    async def stream_rows(table: str) -> Any:
        """Stream rows."""
        ledger.append("stream", table)
        yield "row"

    guard = Guard(MemoryStore())
    for fn, kind in ((export_rows, "a generator"), (stream_rows, "an async generator")):
        with pytest.raises(ConfigurationError, match=f"is {kind} function"):
            guarded(guard, scope="s")(fn)
        server = FastMCP("t")
        server.tool()(fn)
        before = server._tool_manager.get_tool(fn.__name__).fn  # type: ignore[union-attr]
        with pytest.raises(ConfigurationError, match=f"is {kind} function"):
            guard_server(server, guard, scope="s")
        assert server._tool_manager.get_tool(fn.__name__).fn is before  # type: ignore[union-attr]
    assert ledger.count() == 0


@pytest.mark.parametrize(
    ("kind", "sync_body"), [("Guard", False), ("Guard", True), ("AsyncGuard", False)]
)
def test_a_url_elicitation_releases_the_claim_so_the_clients_retry_runs(
    tmp_path: Path, ledger: Ledger, kind: str, sync_body: bool
) -> None:
    """URL-mode elicitation: a tool that needs the user to act first (authorize) raises
    ``UrlElicitationRequiredError``; the client gets error -32042, the user acts, and the
    client retries the same call. It used to be recorded as the tool's failure: every
    retry got a plain error result and the export never ran."""
    from mcp.shared.exceptions import McpError, UrlElicitationRequiredError
    from mcp.types import ElicitRequestURLParams

    authorized: set[str] = set()

    def export(order_id: str, folder: str) -> str:
        if order_id not in authorized:
            params = ElicitRequestURLParams(
                mode="url",
                message="Authorize access",
                url="https://example.test/oauth",
                elicitationId="auth-1",
            )
            raise UrlElicitationRequiredError([params])
        ledger.append("export", folder)
        return f"exported {folder}"

    async def export_async(order_id: str, folder: str) -> str:
        return export(order_id, folder)

    server = FastMCP("files")
    server.tool(name="export_files")(export if sync_body else export_async)
    path = tmp_path / "g.db"
    guard: Guard | AsyncGuard = AsyncGuard(path) if kind == "AsyncGuard" else Guard(path)
    guard_server(server, guard, scope_arg="order_id")
    arguments = {"order_id": "o1", "folder": "/reports"}

    async def scenario() -> tuple[int, CallToolResult]:
        async with create_connected_server_and_client_session(server) as session:
            with pytest.raises(McpError) as info:
                await session.call_tool("export_files", arguments)
            authorized.add("o1")  # the user completed the URL flow
            return info.value.error.code, await session.call_tool("export_files", arguments)

    code, retried = anyio.run(scenario)
    assert code == -32042
    assert not retried.isError, text(retried)
    assert text(retried) == "exported /reports"
    assert ledger.count("export") == 1
