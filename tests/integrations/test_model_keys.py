"""Request ids of model-valued tool arguments, through the real frameworks.

A review driving the real frameworks found that a nested model field filled by its
``default_factory`` (``uuid4``) got a new value each time the same call was validated:
every retry was a new request and ran again. A field a *minting* factory filled is now
left out of the request id; one the call spelt out, or a deterministic factory's
(``list``, ``lambda: []``), still counts. A model that needs this keeps its own
serializer's forms for its other fields (base64 bytes, a custom type's
``PlainSerializer``), which a first fix had lost.

Each tool is driven as its framework drives it (LangChain ``invoke`` with a tool call,
a FastMCP server through in-process client sessions, an Agents SDK ``on_invoke_tool``, a
CrewAI ``run``), with a real guard; side effects are counted in the effect ledger.
"""

from __future__ import annotations

import os

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")  # before crewai is imported

import asyncio
import collections
import concurrent.futures
import contextvars
import dataclasses
import datetime
import functools
import json
import threading
import typing
import uuid
import warnings
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any

import pytest
from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    computed_field,
    create_model,
    model_serializer,
)
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema

from safeagent import Guard, MemoryStore
from tests.conftest import Ledger
from tests.integrations import require

SCOPE = "conv-1"


def new_id() -> str:
    return uuid.uuid4().hex


def random_bytes() -> bytes:
    return os.urandom(16)


class Line(BaseModel):
    sku: str
    qty: int = 1
    line_id: str = Field(default_factory=new_id)


# -- the frameworks, each driving a plain function as its own tool ------------------------

Tool = Callable[..., str]


def via_langchain(func: Tool, calls: list[dict[str, Any]], guard: Guard) -> list[Any]:
    """``StructuredTool.invoke`` with a tool call per call, a new tool-call id each time (a
    model re-emitting the call after a retry)."""
    require("langchain_core")
    from langchain_core.tools import StructuredTool

    from safeagent.integrations.langchain import guard_tool

    guarded = guard_tool(StructuredTool.from_function(func), guard, scope=SCOPE)
    return [
        guarded.invoke(
            {"type": "tool_call", "name": func.__name__, "id": f"call_{i}", "args": a}
        ).content
        for i, a in enumerate(calls)
    ]


def via_mcp(func: Tool, calls: list[dict[str, Any]], guard: Guard) -> list[Any]:
    """A FastMCP server guarded by ``guard_server``; each call in a new client session (a
    client retrying after a dropped connection)."""
    require("mcp")
    from mcp.server.fastmcp import FastMCP
    from mcp.shared.memory import create_connected_server_and_client_session

    from safeagent.integrations.mcp import guard_server

    server = FastMCP("shop")
    server.tool()(func)
    guard_server(server, guard, scope=SCOPE)

    async def scenario() -> list[Any]:
        texts = []
        for arguments in calls:
            async with create_connected_server_and_client_session(server) as session:
                result = await session.call_tool(func.__name__, arguments)
                assert not result.isError, result
                texts.append("".join(getattr(c, "text", "") for c in result.content))
        return texts

    return asyncio.run(scenario())


def via_openai_agents(func: Tool, calls: list[dict[str, Any]], guard: Guard) -> list[Any]:
    """An Agents SDK ``function_tool`` invoked as the runner invokes it, a new call id each
    time."""
    require("agents")
    from agents import function_tool
    from agents.tool_context import ToolContext

    from safeagent.integrations.openai_agents import guard_tool

    guarded = guard_tool(function_tool(func), guard=guard, scope=SCOPE)

    async def scenario() -> list[Any]:
        outputs = []
        for i, arguments in enumerate(calls):
            text = json.dumps(arguments)
            ctx = ToolContext(
                context=None, tool_name=func.__name__, tool_call_id=f"call_{i}", tool_arguments=text
            )
            outputs.append(await guarded.on_invoke_tool(ctx, text))
        return outputs

    return asyncio.run(scenario())


def via_crewai(
    func: Tool, calls: list[dict[str, Any]], guard: Guard, *, structured: bool = False
) -> list[Any]:
    """A CrewAI tool (its ``args_schema`` made from ``func``'s signature) run with keyword
    arguments (``run``), or ``structured``: invoked with the model's JSON through its
    ``to_structured_tool()``, as an agent's tool call runs it."""
    with warnings.catch_warnings():  # crewai.rag refuses a child attribute
        warnings.simplefilter("ignore", ImportWarning)
        require("crewai")
    from crewai.tools import BaseTool

    from safeagent.integrations.crewai import guard_tool

    hints = typing.get_type_hints(func, include_extras=True)
    hints.pop("return")
    schema = create_model(f"{func.__name__}_args", **hints)  # type: ignore[call-overload]

    class Adapter(BaseTool):
        name: str = func.__name__
        description: str = func.__doc__ or ""
        args_schema: type[BaseModel] = schema

        def _run(self, **kwargs: Any) -> str:
            return func(**kwargs)

    guarded = guard_tool(Adapter(), guard, scope=SCOPE)
    if structured:  # as an agent's tool call runs it: CrewAI's structured tool
        tool = guarded.to_structured_tool()
        return [tool.invoke(json.dumps(arguments)) for arguments in calls]
    return [guarded.run(**arguments) for arguments in calls]


FRAMEWORKS: dict[str, Callable[[Tool, list[dict[str, Any]], Guard], list[Any]]] = {
    "langchain": via_langchain,
    "mcp": via_mcp,
    "openai_agents": via_openai_agents,
    "crewai": via_crewai,
    "crewai_structured": functools.partial(via_crewai, structured=True),
}
EVERY_FRAMEWORK = list(FRAMEWORKS)


def payloads(store: MemoryStore, guard: Guard) -> list[Any]:
    """Every stored payload, as its receipt shows it."""
    records, _ = store.records()
    receipts = [guard.get(r.request_id) for r in records]
    assert all(r is not None for r in receipts)
    return [r.payload for r in receipts if r is not None]


# -- through the frameworks -----------------------------------------------------------------


@pytest.mark.parametrize("framework", EVERY_FRAMEWORK)
def test_a_nested_field_a_minting_factory_filled_is_left_out_of_the_request(
    framework: str, ledger: Ledger
) -> None:
    """The same order re-emitted twice (each validation makes a new ``line_id``) is one
    request: it runs once. A ``line_id`` the model did send counts: two lines, two runs;
    the ``qty`` left to its static default counts as spelt out."""

    def place_order(order_id: str, line: Line) -> str:
        """Place an order."""
        return f"O-{ledger.append('order', order_id)}"

    line = {"sku": "X", "qty": 1}
    calls = [
        {"order_id": "o-1", "line": line},
        {"order_id": "o-1", "line": line},
        {"order_id": "o-1", "line": {"sku": "X"}},
        {"order_id": "o-1", "line": {**line, "line_id": "a"}},
        {"order_id": "o-1", "line": {**line, "line_id": "b"}},
        {"order_id": "o-1", "line": {**line, "line_id": "a"}},
    ]
    store = MemoryStore()
    guard = Guard(store)

    outputs = FRAMEWORKS[framework](place_order, calls, guard)

    assert len(ledger.rows()) == 3
    assert outputs == ["O-1", "O-1", "O-1", "O-2", "O-3", "O-2"]
    lines = sorted((p["line"] for p in payloads(store, guard)), key=lambda v: v.get("line_id", ""))
    assert lines == [
        {"sku": "X", "qty": 1},
        {"sku": "X", "qty": 1, "line_id": "a"},
        {"sku": "X", "qty": 1, "line_id": "b"},
    ]


class Basket(BaseModel):
    """A deterministic factory (the value is the same every time) next to a minting one."""

    lines: list[str] = Field(default_factory=lambda: [])
    region: list[str] = Field(default_factory=lambda: ["eu"])
    created: datetime.datetime = Field(default_factory=datetime.datetime.now)


@pytest.mark.parametrize("framework", EVERY_FRAMEWORK)
def test_a_deterministic_factory_counts_left_out_or_spelt_out(
    framework: str, ledger: Ledger
) -> None:
    """``lines`` left to ``lambda: []`` and spelt out as ``[]`` are one request (the first
    fix made them two: a re-emitted call ran again); ``datetime.now`` mints."""

    def checkout(basket_id: str, basket: Basket) -> str:
        """Check out."""
        return f"C-{ledger.append('checkout', basket_id)}"

    calls = [
        {"basket_id": "b-1", "basket": {}},
        {"basket_id": "b-1", "basket": {"lines": [], "region": ["eu"]}},
        {"basket_id": "b-1", "basket": {"lines": ["x"]}},
        {"basket_id": "b-1", "basket": {}},
    ]
    outputs = FRAMEWORKS[framework](checkout, calls, Guard(MemoryStore()))

    assert outputs == ["C-1", "C-1", "C-2", "C-1"]
    assert len(ledger.rows()) == 2


@pytest.mark.parametrize("framework", EVERY_FRAMEWORK)
def test_a_top_level_argument_a_minting_factory_filled(framework: str, ledger: Ledger) -> None:
    """An argument the call left to a factory that mints is left out like a nested field:
    the framework validated the call afresh and filled it anew, which made every retry a
    new request in LangChain, FastMCP and the Agents SDK (CrewAI keeps the validated model;
    the others are told by the call's raw arguments). One the call sent counts."""
    tags: list[str] = []

    def stamp(order_id: str, tag: Annotated[str, Field(default_factory=new_id)]) -> str:
        """Stamp an order."""
        tags.append(tag)
        return f"S-{ledger.append('stamp', order_id)}"

    calls = [
        {"order_id": "o-1"},
        {"order_id": "o-1"},
        {"order_id": "o-1", "tag": "t"},
        {"order_id": "o-1", "tag": "u"},
        {"order_id": "o-1", "tag": "t"},
        {"order_id": "o-1"},
    ]
    store = MemoryStore()
    guard = Guard(store)

    outputs = FRAMEWORKS[framework](stamp, calls, guard)

    assert outputs == ["S-1", "S-1", "S-2", "S-3", "S-2", "S-1"]
    assert tags[1:] == ["t", "u"]
    assert len(tags[0]) == 32
    # The payload keeps the value the body got (a reconcile hook may need it); the
    # fingerprint and the request id leave it out.
    stored = sorted(p["tag"] for p in payloads(store, guard))
    assert stored == sorted([tags[0], "t", "u"])


@pytest.mark.parametrize("framework", EVERY_FRAMEWORK)
def test_a_minted_value_without_a_json_form_is_left_out_of_the_payload(
    framework: str, ledger: Ledger
) -> None:
    """Random bytes a factory mints have no JSON form: the call runs once and replays (a
    first version kept every minted value in the payload, and this one failed the call)."""

    def pay(
        order_id: str, nonce: Annotated[bytes, Field(default_factory=lambda: os.urandom(16))]
    ) -> str:
        """Pay."""
        return f"P-{ledger.append('pay', order_id)}"

    store = MemoryStore()
    guard = Guard(store)
    outputs = FRAMEWORKS[framework](pay, [{"order_id": "o"}, {"order_id": "o"}], guard)

    assert outputs == ["P-1", "P-1"]
    assert payloads(store, guard) == [{"order_id": "o"}]


def test_a_non_strict_agents_sdk_tool_keys_its_minted_argument_out(ledger: Ledger) -> None:
    """``strict_mode=False`` (a free-form ``dict`` argument needs it): the minted argument
    is still left out (its model was built with the strict schema, which refused it)."""

    def tag(
        order_id: str,
        labels: dict[str, str],
        ref: Annotated[str, Field(default_factory=new_id)],
    ) -> str:
        """Label an order."""
        return f"T-{ledger.append('tag', ref)}"

    require("agents")
    from agents import function_tool
    from agents.tool_context import ToolContext

    from safeagent.integrations.openai_agents import guard_tool

    guarded = guard_tool(
        function_tool(tag, strict_mode=False), guard=Guard(MemoryStore()), scope=SCOPE
    )

    async def scenario() -> list[Any]:
        text = json.dumps({"order_id": "o", "labels": {"k": "v"}})
        ctx = ToolContext(context=None, tool_name="tag", tool_call_id="c", tool_arguments=text)
        return [await guarded.on_invoke_tool(ctx, text) for _ in range(3)]

    assert asyncio.run(scenario()) == ["T-1", "T-1", "T-1"]


def test_an_agents_sdk_whose_invoker_is_unknown_is_told_at_guard_time(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A future SDK whose tool invoker lacks the hook the guarded copy notes the raw input
    by: every value counts then (each retry a new request, for a minted argument), and
    ``guard_tool`` warns so at once, naming the arguments; named in ``exclude=``, the
    argument is left out and the call runs once."""
    require("agents")
    import agents
    from agents import function_tool
    from agents.tool_context import ToolContext

    from safeagent.integrations import openai_agents
    from safeagent.integrations.openai_agents import guard_tool

    def stamp(order_id: str, ref: Annotated[str, Field(default_factory=new_id)]) -> str:
        """Stamp an order."""
        return f"S-{ledger.append('stamp', order_id)}"

    def bare_function_tool(func: Any, **options: Any) -> Any:
        built = agents.function_tool(func, **options)

        async def invoke(ctx: Any, text: str) -> Any:  # no _invoke_tool_impl to wrap
            return await built.on_invoke_tool(ctx, text)

        return dataclasses.replace(built, on_invoke_tool=invoke)

    monkeypatch.setattr(openai_agents, "function_tool", bare_function_tool)
    tool = function_tool(stamp, strict_mode=False)
    with pytest.warns(RuntimeWarning, match=r"\['ref'\].*exclude="):
        guard_tool(tool, guard=Guard(MemoryStore()), scope=SCOPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named in exclude=: nothing to warn about
        guarded = guard_tool(tool, guard=Guard(MemoryStore()), scope=SCOPE, exclude=["ref"])

    async def scenario() -> list[Any]:
        text = json.dumps({"order_id": "o"})
        ctx = ToolContext(context=None, tool_name="stamp", tool_call_id="c", tool_arguments=text)
        return [await guarded.on_invoke_tool(ctx, text) for _ in range(3)]

    assert asyncio.run(scenario()) == ["S-1", "S-1", "S-1"]


def test_an_mcp_tool_guarded_alone_is_told_its_factory_arguments_count(ledger: Ledger) -> None:
    """``guarded`` alone (no ``guard_server``) never sees the client's raw arguments, so a
    value a factory mints counts (a documented limit): the decorator says so at once,
    naming the arguments; named in ``exclude=``, nothing is said and a re-sent call runs
    once."""
    require("mcp")
    from mcp.server.fastmcp import FastMCP

    from safeagent.integrations.mcp import guarded

    def stamp(
        order_id: str, tag: Annotated[str, Field(default_factory=new_id)], note: str = ""
    ) -> str:
        return f"S-{ledger.append('stamp', order_id)}"

    with pytest.warns(RuntimeWarning, match=r"\['tag'\].*guard_server"):
        guarded(Guard(MemoryStore()), scope_arg="order_id")(stamp)
    server = FastMCP("t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        server.tool()(guarded(Guard(MemoryStore()), scope_arg="order_id", exclude=["tag"])(stamp))

    async def scenario() -> list[Any]:
        return [(await server.call_tool("stamp", {"order_id": "o"}))[0][0].text for _ in range(3)]

    assert asyncio.run(scenario()) == ["S-1", "S-1", "S-1"]


def test_an_mcp_tool_notes_its_raw_arguments_wherever_it_goes(ledger: Ledger) -> None:
    """The guarded tool itself notes what the client sent: handed to another server (or a
    new tool manager), the same call re-sent still runs once (a first version patched the
    server's tool manager, and the tool moved without it: three runs)."""
    require("mcp")
    from mcp.server.fastmcp import FastMCP

    from safeagent.integrations.mcp import guard_server

    def stamp(order_id: str, tag: Annotated[str, Field(default_factory=new_id)]) -> str:
        return f"S-{ledger.append('stamp', tag)}"

    first = FastMCP("first")
    first.tool()(stamp)
    guard_server(first, Guard(MemoryStore()), scope=SCOPE)
    second = FastMCP("second", tools=first._tool_manager.list_tools())

    async def scenario() -> list[Any]:
        return [await second.call_tool("stamp", {"order_id": "o"}) for _ in range(3)]

    results = asyncio.run(scenario())

    assert ledger.count() == 1
    assert results[0] == results[1] == results[2]


def test_langchain_asks_pydantic_which_arguments_the_call_set(ledger: Ledger) -> None:
    """A validator that takes a field from another key sets it (two labels, two runs: the
    first fix read raw keys and made them one request); an ``AliasPath`` that does not
    resolve leaves the field to its factory (three retries, one run: the first fix keyed
    the minted value)."""
    require("langchain_core")
    from langchain_core.tools import StructuredTool
    from pydantic import AliasPath, model_validator

    from safeagent.integrations.langchain import guard_tool

    class StampArgs(BaseModel):
        order_id: str
        tag: str = Field(default_factory=new_id, validation_alias=AliasPath("meta", "tag"))

        @model_validator(mode="before")
        @classmethod
        def legacy_label(cls, data: Any) -> Any:
            if isinstance(data, dict) and "label" in data:
                return {**data, "meta": {"tag": data["label"]}}
            return data

    def stamp(order_id: str, tag: str) -> str:
        return f"S-{ledger.append('stamp', tag)}"

    tool = StructuredTool.from_function(stamp, args_schema=StampArgs, description="s")
    guarded = guard_tool(tool, Guard(MemoryStore()), scope=SCOPE)
    outputs = [
        guarded.invoke(a)
        for a in (
            {"order_id": "o", "label": "red"},
            {"order_id": "o", "label": "blue"},
            {"order_id": "o", "label": "red"},
            {"order_id": "o", "meta": {}},
            {"order_id": "o", "meta": {}},
            {"order_id": "o", "meta": {}},
        )
    ]

    assert outputs == ["S-1", "S-2", "S-1", "S-3", "S-3", "S-3"]
    assert [row[1] for row in ledger.rows()][:2] == ["red", "blue"]


def test_the_agents_sdk_input_decides_not_the_tool_context(ledger: Ledger) -> None:
    """What the call sent is read off the input the SDK's invoker validates, never off
    ``ToolContext.tool_arguments``: a context left over from another call (here one
    without ``tag``) does not make two tags one request (it did, read off the context)."""
    require("agents")
    from agents import function_tool
    from agents.tool_context import ToolContext

    from safeagent.integrations.openai_agents import guard_tool

    def stamp(order_id: str, tag: Annotated[str, Field(default_factory=new_id)]) -> str:
        """Stamp."""
        return f"S-{ledger.append('stamp', tag)}"

    guarded = guard_tool(function_tool(stamp), guard=Guard(MemoryStore()), scope=SCOPE)

    async def call(tool_arguments: str, arguments: dict[str, Any]) -> Any:
        ctx = ToolContext(
            context=None, tool_name="stamp", tool_call_id="c", tool_arguments=tool_arguments
        )
        return await guarded.on_invoke_tool(ctx, json.dumps(arguments))

    async def scenario() -> list[Any]:
        return [
            await call('{"order_id": "o"}', {"order_id": "o", "tag": "red"}),
            await call('{"order_id": "o"}', {"order_id": "o", "tag": "blue"}),
            await call('{"order_id": "o", "tag": "x"}', {"order_id": "o"}),
            await call("{}", {"order_id": "o"}),
        ]

    assert asyncio.run(scenario()) == ["S-1", "S-2", "S-3", "S-3"]


def test_mcp_a_nested_call_of_a_tool_of_the_same_name_is_keyed_on_its_own(
    ledger: Ledger,
) -> None:
    """A guarded gateway tool forwarding to another server's tool of the same name: the
    inner call's ``tag`` is its own (the first fix handed it the outer call's raw keys,
    which made two tags one request); a scope argument a minting factory would fill is
    refused before anything runs."""
    require("mcp")
    from mcp.server.fastmcp import FastMCP

    from safeagent.integrations.mcp import guard_server, guarded

    guard = Guard(MemoryStore())
    backend = FastMCP("backend")

    with pytest.warns(RuntimeWarning, match="guarded alone"):  # tags are always sent here

        @backend.tool()
        @guarded(guard, scope="backend")
        def stamp(order_id: str, tag: Annotated[str, Field(default_factory=new_id)]) -> str:
            return f"B-{ledger.append('backend', tag)}"

    gateway = FastMCP("gateway")

    @gateway.tool(name="stamp")
    async def forward(
        order_id: str, fwd: str, tag: Annotated[str, Field(default_factory=new_id)]
    ) -> str:
        ledger.append("gateway", fwd)
        result = await backend.call_tool("stamp", {"order_id": order_id, "tag": fwd})
        return str(result)

    @gateway.tool()
    def open_case(case: Annotated[str, Field(default_factory=new_id)]) -> str:
        return f"C-{ledger.append('case', case)}"

    guard_server(gateway, guard, scope_arg="case", scope="gateway")

    async def scenario() -> Any:
        for fwd in ("red", "blue"):
            await gateway.call_tool("stamp", {"order_id": "o", "fwd": fwd})
        return await gateway.call_tool("open_case", {})

    with pytest.raises(Exception, match="was not sent"):
        asyncio.run(scenario())
    backend_tags = [row[1] for row in ledger.rows() if row[0] == "backend"]
    assert backend_tags == ["red", "blue"]
    assert not [row for row in ledger.rows() if row[0] == "case"]


def test_a_langchain_string_input_and_an_aliased_schema(ledger: Ledger) -> None:
    """A string input sends only the first argument; an ``args_schema`` field sent under
    its alias counts as sent, one left out under its factory does not count."""
    require("langchain_core")
    from langchain_core.tools import StructuredTool

    from safeagent.integrations.langchain import guard_tool

    def note(text: str, tag: str = "") -> str:
        return f"N-{ledger.append('note', text)}"

    class NoteArgs(BaseModel):
        text: str
        tag: str = Field(default_factory=new_id, alias="Tag")

    tool = StructuredTool.from_function(note, args_schema=NoteArgs, name="note", description="n")
    guarded = guard_tool(tool, Guard(MemoryStore()), scope=SCOPE)

    assert guarded.invoke("hi") == "N-1"
    assert guarded.invoke("hi") == "N-1"
    assert guarded.invoke({"text": "hi"}) == "N-1"
    assert guarded.invoke({"text": "hi", "Tag": "t"}) == "N-2"
    assert guarded.invoke({"text": "hi", "Tag": "t"}) == "N-2"
    assert len(ledger.rows()) == 2


# -- key_form's rules, one by one -----------------------------------------------------------


def test_minting_and_deterministic_factories() -> None:
    from safeagent.integrations._keyform import key_form

    assert key_form(Basket()) == {"lines": [], "region": ["eu"]}
    assert key_form(Basket(lines=[])) == key_form(Basket())
    stamped = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert key_form(Basket(created=stamped)) == {
        "lines": [],
        "region": ["eu"],
        "created": "2026-01-02T03:04:05",
    }


def test_an_argument_counts_as_sent_when_pydantic_takes_it_from_the_input() -> None:
    """``minted_unsent`` asks pydantic which fields the raw input sets: under an alias,
    an ``AliasChoices`` choice, an ``AliasPath`` that resolves (one that does not leaves
    the field to its factory), or by a validator that renames a key; a deterministic
    factory's field and a plain default are never left out; input pydantic refuses
    leaves nothing out."""
    from pydantic import AliasChoices, AliasPath, model_validator

    from safeagent.integrations._keyform import minted_unsent

    class Args(BaseModel):
        plain: str = Field(default_factory=new_id)
        aliased: str = Field(default_factory=new_id, alias="Aliased")
        choices: str = Field(
            default_factory=new_id, validation_alias=AliasChoices("c1", AliasPath("c2", 0))
        )
        region: list[str] = Field(default_factory=lambda: ["eu"])
        note: str = "n"
        count: int = 0

        @model_validator(mode="before")
        @classmethod
        def renamed(cls, data: Any) -> Any:
            if isinstance(data, dict) and "legacy" in data:
                return {**data, "plain": data["legacy"]}
            return data

    every = {"plain", "aliased", "choices"}
    assert minted_unsent(Args, {}) == every
    assert minted_unsent(Args, {"plain": "p", "Aliased": "a", "c1": "c"}) == set()
    assert minted_unsent(Args, {"aliased": "a", "c2": ["c"]}) == {"plain", "aliased"}
    assert minted_unsent(Args, {"c2": []}) == every  # the path does not resolve
    assert minted_unsent(Args, {"choices": "c"}) == every  # the name is no input name here
    assert minted_unsent(Args, {"legacy": "p"}) == {"aliased", "choices"}
    assert minted_unsent(Args, {"count": "not a number"}) == set()

    class ByName(Args):
        model_config = ConfigDict(populate_by_name=True)

    assert minted_unsent(ByName, {"aliased": "a", "choices": "c"}) == {"plain"}
    assert minted_unsent(dict, {}) == set()
    assert minted_unsent(Args, ["plain"]) == set()


def test_a_model_with_a_left_out_field_keeps_its_own_serializer() -> None:
    """Base64 bytes (``ser_json_bytes``) and a custom type only its ``PlainSerializer``
    writes, beside a minting factory, count as the model writes them (the first fix
    raised ``UnicodeDecodeError`` and ``InvalidPayloadError`` there), by field name."""
    from safeagent.integrations._keyform import key_form

    form = key_form(Blob(data=b"\xff\x00", price=Cents(250), file_name="a"))
    assert form == {"data": "_wA=", "price": "250c", "file_name": "a"}
    assert key_form(Blob(data=b"\xff\x01", price=Cents(250), file_name="a")) != form


def test_an_excluded_field_still_tells_calls_apart() -> None:
    """An ``exclude=True`` field (left out by pydantic) counts by its own form, also in a
    model that needs ours for a factory: two calls differing only there stay two."""
    from safeagent.integrations._keyform import key_form

    assert key_form(Hidden(order_id="o", note="first")) != key_form(
        Hidden(order_id="o", note="second")
    )


def test_each_factory_is_asked_once_per_class() -> None:
    """A factory is called twice (to see whether it mints) once per class and process,
    not per call; a factory that raises counts as minting; one whose value is a model
    of its own class does not recurse forever."""
    from safeagent.integrations._keyform import key_form

    calls: list[int] = []

    def counted() -> int:
        calls.append(1)
        return 7

    def broken() -> str:
        if calls:
            raise RuntimeError("only once")
        return "x"

    class Counted(BaseModel):
        n: int = Field(default_factory=counted)
        b: str = Field(default_factory=lambda: "b")

    made = [Counted() for _ in range(5)]
    before = len(calls)
    forms = [key_form(m) for m in made]
    assert forms == [{"n": 7, "b": "b"}] * 5
    assert len(calls) - before == 2

    class Node(BaseModel):
        name: str = "n"
        child: Node | None = Field(default_factory=lambda: None)

    assert key_form(Node(child=Node())) == {"name": "n", "child": {"name": "n", "child": None}}


def test_an_extra_with_a_fields_name_does_not_stand_for_the_field() -> None:
    """With aliases and ``extra="allow"``, ``{"unit_price": 5}`` is an extra beside the
    field ``unit_price`` (alias ``unitPrice``, left at 1) and ``{"unitPrice": 5}`` sets
    the field: two calls, two forms (the extra no longer overwrites the field)."""
    from safeagent.integrations._keyform import key_form

    as_extra = key_form(Priced.model_validate({"sku": "X", "unit_price": 5}))
    as_field = key_form(Priced.model_validate({"sku": "X", "unitPrice": 5}))
    assert as_extra != as_field
    assert as_field == {"sku": "X", "unit_price": 5}


def test_models_pydantic_writes_its_own_way_still_key() -> None:
    """An ``exclude_if`` field of base64 bytes, and a model with a ``@model_serializer``
    beside a minting factory, key without an error (the review's two crashes), each the
    same way twice."""
    from safeagent.integrations._keyform import key_form

    assert key_form(Attachment(data=b"\xff")) == key_form(Attachment(data=b"\xff"))
    first, again = key_form(Custom(data=b"\xff")), key_form(Custom(data=b"\xff"))
    assert first == again == {"custom": "_w=="}


def test_a_date_or_a_clock_in_seconds_counts_as_minting() -> None:
    """``date.today`` and a datetime truncated to the second give equal values 20 ms
    apart; a factory of a date, time, datetime or UUID counts as minting all the same."""
    from safeagent.integrations._keyform import key_form

    class Dated(BaseModel):
        sku: str
        day: datetime.date = Field(default_factory=datetime.date.today)
        second: datetime.datetime = Field(
            default_factory=lambda: datetime.datetime.now().replace(microsecond=0)
        )

    assert key_form(Dated(sku="x")) == {"sku": "x"}


def test_threads_keying_a_new_class_at_once_agree() -> None:
    """Threads keying the same new class while its factories are asked wait for the
    answer: none counts a deterministic field out (the review's parallel tool calls ran
    twice)."""
    from safeagent.integrations._keyform import key_form

    class Fresh(BaseModel):
        sku: str
        region: list[str] = Field(default_factory=lambda: ["eu"])
        line_id: str = Field(default_factory=new_id)

    start = threading.Barrier(8)

    def key() -> Any:
        start.wait()
        return key_form(Fresh(sku="x"))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        forms = list(pool.map(lambda _: key(), range(8)))
    assert forms == [{"sku": "x", "region": ["eu"]}] * 8


def test_a_deque_of_models_is_looked_into() -> None:
    from safeagent.integrations._keyform import key_form

    assert key_form(collections.deque([Line(sku="x")])) == [{"sku": "x", "qty": 1}]


def test_an_extra_under_a_fields_serialization_alias_does_not_overwrite_it() -> None:
    """With ``serialization_alias`` and ``extra="allow"``, ``{"unit_price": 1,
    "unitPrice": 2}`` (field 1, extra 2) and ``{"unit_price": 2}`` were written alike by
    pydantic's by-alias form (the extra over the field): the second order never ran."""
    from safeagent.integrations._keyform import key_form

    both = key_form({"item": AliasedItem.model_validate({"unit_price": 1, "unitPrice": 2})})
    one = key_form({"item": AliasedItem.model_validate({"unit_price": 2})})
    assert both != one
    assert key_form({"item": AliasedItem(unit_price=3)}) == {"item": {"unitPrice": 3}}


def test_a_signal_handler_keying_while_its_thread_probes_does_not_hang() -> None:
    """A signal handler keys a call while its thread holds the probe locks (simulated by
    holding them): the locks are reentrant."""
    from safeagent.integrations import _keyform

    class Probed(BaseModel):
        region: list[str] = Field(default_factory=lambda: ["eu"])

    with _keyform._PROBES_LOCK:
        assert _keyform.key_form(Probed()) == {"region": ["eu"]}


def test_a_factory_that_raises_fails_the_call_and_nothing_is_cached() -> None:
    """An exception from a factory probe (a signal handler's deadline lands there, say)
    reaches the caller; the class is asked again next time."""
    from safeagent.integrations import _keyform

    fail = [True]

    def regions() -> list[str]:
        if fail[0] and not made_once:
            raise TimeoutError("deadline")
        return ["eu"]

    made_once: list[int] = []

    class Later(BaseModel):
        region: list[str] = Field(default_factory=regions)

    made_once.append(1)
    basket = Later()  # validation called the factory once
    made_once.clear()
    with pytest.raises(TimeoutError):
        _keyform.key_form(basket)
    assert Later not in _keyform._FACTORIES
    fail[0] = False
    assert _keyform.key_form(basket) == {"region": ["eu"]}


@pytest.mark.parametrize("framework", ["crewai", "crewai_structured"])
def test_a_crewai_argument_its_own_serializer_writes(framework: str, ledger: Ledger) -> None:
    """A top-level argument only its ``PlainSerializer`` can write keys as CrewAI's dump
    writes it (keying on the model's raw values refused every call)."""

    def bill(order_id: str, amount: PricedInCents) -> str:
        """Bill an order."""
        return f"B-{ledger.append('bill', order_id)}"

    calls = [{"order_id": "o-1", "amount": 250}, {"order_id": "o-1", "amount": 250}]
    outputs = FRAMEWORKS[framework](bill, calls, Guard(MemoryStore()))

    assert outputs == ["B-1", "B-1"]


def test_identical_crewai_calls_each_find_a_model() -> None:
    """Two calls whose dumps hold the very same objects (small ints) each take one of the
    kept models, so neither keys on its dump."""
    require("crewai")
    from safeagent.integrations.crewai import _Validations

    kept = _Validations()
    first, second = {"n": 1, "flag": True}, {"n": 1, "flag": True}
    kept.note(first, "model-1")
    kept.note(second, "model-2")
    assert {kept.take(dict(first)), kept.take(dict(second))} == {"model-1", "model-2"}
    assert kept.take(dict(first)) is None


def test_only_the_factories_a_call_left_unset_are_asked() -> None:
    """A factory of a field every call sets is never called by validation, and may not
    work outside it (``os.environ["REGION"]`` unset): it is not asked. A factory that
    raises when asked (one reading a context variable only validation sets) fails the
    call before it runs, and nothing is cached: counting it as minting in one process
    and not in another would give one call two request ids."""
    from safeagent.integrations import _keyform

    def region_from_env() -> str:
        raise KeyError("REGION")

    class Configured(BaseModel):
        sku: str
        region: str = Field(default_factory=region_from_env)
        created: datetime.datetime = Field(default_factory=datetime.datetime.now)

    assert _keyform.key_form(Configured(sku="x", region="eu")) == {"sku": "x", "region": "eu"}

    current: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")

    class Tenanted(BaseModel):
        sku: str
        tenant: str = Field(default_factory=current.get)

    token = current.set("t1")
    try:
        order = Tenanted(sku="x")
    finally:
        current.reset(token)
    with pytest.raises(LookupError):
        _keyform.key_form(order)
    assert "tenant" not in _keyform._FACTORIES.get(Tenanted, {})


def test_a_model_whose_copy_returns_itself_keeps_its_extras() -> None:
    """Our form of a model with extras writes a copy without them, made without the
    model's own copy hooks: a ``__copy__`` returning ``self`` lost the caller's extras,
    a ``model_copy`` that refuses failed the call."""
    from safeagent.integrations._keyform import key_form

    class Kept(BaseModel):
        model_config = ConfigDict(extra="allow")

        sku: str
        amount: Decimal
        line_id: str = Field(default_factory=new_id)

        def __copy__(self) -> Kept:
            return self

        def model_copy(self, *args: Any, **kwargs: Any) -> Any:
            raise TypeError("immutable")

    order = Kept.model_validate({"sku": "x", "amount": "1.50", "note": "gift"})
    assert key_form(order) == {
        "sku": "x",
        "amount": "1.5",
        "__pydantic_extra__": {"note": "gift"},
    }
    assert order.model_extra == {"note": "gift"}


def test_extras_never_stand_for_fields_or_computed_fields() -> None:
    """An extra under a field's name (the field set through its ``validation_alias``)
    and an extra named like a computed field were written over them: two calls, one
    request."""
    from safeagent.integrations._keyform import key_form

    one = key_form(ByAlias.model_validate({"A": 1, "a": 2}))
    five = key_form(ByAlias.model_validate({"A": 5, "a": 2}))
    assert one != five
    assert key_form(Totalled.model_validate({"qty": 1, "total": 5})) != key_form(
        Totalled.model_validate({"qty": 1, "total": 7})
    )


def test_crewai_dumps_by_alias_and_extras_over_fields(ledger: Ledger) -> None:
    """CrewAI's dump of a ``serialize_by_alias`` schema is keyed by alias: a top-level
    argument a minting factory filled is still left out (the same call twice runs once);
    an extra written over a field (what the body gets) counts as the body gets it."""
    require("crewai")
    from crewai.tools import BaseTool

    from safeagent.integrations.crewai import guard_tool

    class Args(BaseModel):
        model_config = ConfigDict(
            serialize_by_alias=True, alias_generator=AliasGenerator(serialization_alias=to_camel)
        )

        order_id: str
        request_tag: str = Field(default_factory=new_id)

    class Loose(BaseModel):
        model_config = ConfigDict(extra="allow")

        order_id: str
        amount: Decimal = Field(default=Decimal(0), validation_alias="amt")

    def tool_of(schema: type[BaseModel]) -> Any:
        class Adapter(BaseTool):
            name: str = "pay"
            description: str = "Pay."
            args_schema: type[BaseModel] = schema

            def _run(self, **kwargs: Any) -> str:
                return f"P-{ledger.append('pay', json.dumps(kwargs, default=str))}"

        return guard_tool(Adapter(), Guard(MemoryStore()), scope=SCOPE)

    tagged = tool_of(Args)
    assert [tagged.run(order_id="o-1"), tagged.run(order_id="o-1")] == ["P-1", "P-1"]
    loose = tool_of(Loose)
    outputs = [loose.run(order_id="o-1", amt="1", amount=x) for x in ("5", "7")]
    assert outputs == ["P-2", "P-3"]

    class Crossed(BaseModel):  # one field's alias is another field's name
        model_config = ConfigDict(serialize_by_alias=True)

        amount: int = Field(serialization_alias="total")
        total: str = Field(default_factory=new_id, serialization_alias="ref")

    crossed = tool_of(Crossed)
    assert [crossed.run(amount=5), crossed.run(amount=7), crossed.run(amount=5)] == [
        "P-4",
        "P-5",
        "P-4",
    ]


# -- models used above ----------------------------------------------------------------------


class Cents:
    """A type with no JSON form of its own: only its ``PlainSerializer`` writes it."""

    def __init__(self, cents: int) -> None:
        self.cents = cents

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return core_schema.no_info_plain_validator_function(
            lambda v: v if isinstance(v, cls) else cls(int(v))
        )


PricedInCents = Annotated[
    Cents,
    PlainSerializer(lambda c: f"{c.cents}c", return_type=str),
    WithJsonSchema({"type": "integer"}),
]


class Blob(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", arbitrary_types_allowed=True)

    data: bytes
    price: PricedInCents
    file_name: str
    upload_id: str = Field(default_factory=new_id)


class Hidden(BaseModel):
    order_id: str
    note: str = Field(default="", exclude=True)
    ref: str = Field(default_factory=new_id)


class Priced(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="allow")

    sku: str
    unit_price: int = 1
    line_id: str = Field(default_factory=new_id)


class Attachment(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64")

    data: bytes = Field(default=b"", exclude_if=lambda v: not v)


class Custom(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64")

    data: bytes
    upload_id: str = Field(default_factory=new_id)

    @model_serializer(mode="wrap")
    def _custom(self, handler: Any) -> Any:
        return {"custom": handler(self)["data"]}


class AliasedItem(BaseModel):
    model_config = ConfigDict(
        alias_generator=AliasGenerator(serialization_alias=to_camel), extra="allow"
    )

    unit_price: int


class ByAlias(BaseModel):
    model_config = ConfigDict(extra="allow")

    a: int = Field(validation_alias="A")


class Totalled(BaseModel):
    model_config = ConfigDict(extra="allow")

    qty: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> int:
        return self.qty * 10
