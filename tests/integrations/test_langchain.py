"""LangChain tools and LangGraph graphs through the guard, with the real packages.

Models are LangChain's own fake chat models (``GenericFakeChatModel``) scripted with
``AIMessage`` tool calls; no network. Side effects are counted in the effect ledger
(``tests/conftest.py``), a SQLite file separate from the guard's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import pytest

from tests.integrations import require

require("langchain_core")
require("langgraph")
require("langchain")

from langchain.agents import create_agent  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import (  # noqa: E402
    BaseTool,
    InjectedToolArg,
    InjectedToolCallId,
    StructuredTool,
    ToolException,
    tool,
)
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import END, START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import (  # noqa: E402
    InjectedState,
    InjectedStore,
    ToolNode,
    ToolRuntime,
    tools_condition,
)
from langgraph.types import Command  # noqa: E402
from pydantic import BaseModel, Field, SecretStr, ValidationError  # noqa: E402

from safeagent import (  # noqa: E402
    AsyncGuard,
    Guard,
    MemoryStore,
    NotExecuted,
    Status,
    derive_request_id,
)
from safeagent.errors import (  # noqa: E402
    ConfigurationError,
    InvalidPayloadError,
    MissingKeyError,
    OutcomeUnknownError,
    ReplayedFailureError,
    ResultNotSerializableError,
)
from safeagent.integrations.langchain import (  # noqa: E402
    GuardedTool,
    ReplayedToolError,
    TransportIdWarning,
    guard_tool,
    guard_tools,
)
from tests.conftest import Ledger  # noqa: E402
from tests.integrations import run_example  # noqa: E402

THREAD = {"configurable": {"thread_id": "conv-1"}}
TICKET = {"order_id": "ORD-1", "title": "Printer on fire", "priority": "high"}


def ticket_tool(ledger: Ledger, delay: float = 0.0) -> BaseTool:
    """``create_ticket``: one ledger row per ticket; the ticket id is the row id."""

    def create_ticket(order_id: str, title: str, priority: str = "normal") -> dict[str, Any]:
        """Open a support ticket for an order."""
        time.sleep(delay)
        row = ledger.append("ticket", f"{order_id}|{title}|{priority}")
        return {"ticket_id": f"T-{row}", "priority": priority}

    return StructuredTool.from_function(create_ticket)


def call(args: dict[str, Any], call_id: str, name: str = "create_ticket") -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


def scripted(messages: list[AIMessage], tools: list[BaseTool]) -> Any:
    """A fake chat model that answers with ``messages`` in order, with the tools bound
    the way ``create_react_agent`` expects (``bind(tools=...)``)."""
    model = GenericFakeChatModel(messages=iter(messages))
    return model.bind(tools=[convert_to_openai_tool(t) for t in tools])


def react_agent(model: Any, tools: list[BaseTool], **kwargs: Any) -> Any:
    from langgraph.prebuilt import create_react_agent

    with warnings.catch_warnings():  # deprecated in LangGraph 1.x, and still shipped
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_react_agent(model, tools, **kwargs)


def tool_graph(model: Any, tools: list[BaseTool], checkpointer: Any = None) -> Any:
    """agent -> tools -> agent, with a plain ``ToolNode`` running each message's calls."""

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    from langchain_core.runnables import RunnableLambda

    builder = StateGraph(MessagesState)
    builder.add_node("agent", RunnableLambda(agent, afunc=aagent))
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=checkpointer)


class ToolSpans(BaseCallbackHandler):
    """Records when each tool run started and ended (to show calls overlapped)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self._lock = threading.Lock()

    def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self.starts.append(time.monotonic())

    def on_tool_end(self, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self.ends.append(time.monotonic())


def tool_messages(result: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


P7_MESSAGE = AIMessage(
    content="",
    tool_calls=[
        call(TICKET, "call_a"),
        call({"priority": "high", "title": "Printer on fire", "order_id": "ORD-1"}, "call_b"),
        call({"title": "Printer on fire", "priority": "high", "order_id": "ORD-1"}, "call_c"),
    ],
)
P7_LATER = AIMessage(content="", tool_calls=[call({**TICKET, "priority": "low"}, "call_d")])


# -- P7 --------------------------------------------------------------------------------------


class ScriptedModel(GenericFakeChatModel):
    """The fake chat model for ``create_agent``, which binds tools with ``bind_tools``
    (the scripted messages carry the calls, so the tools need not reach it)."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self


def test_create_agent_files_one_ticket_for_parallel_duplicates_and_a_replayed_turn(
    tmp_path: Path, ledger: Ledger
) -> None:
    """LangChain 1.x's ``create_agent`` (which replaces LangGraph's deprecated
    ``create_react_agent``) with guarded tools: three equivalent calls in one message file
    one ticket, and a later turn in which the model repeats the call gets the same ticket
    back; another conversation files its own."""
    guard = Guard(tmp_path / "guard.db")
    tools = guard_tools([ticket_tool(ledger, delay=0.2)], guard)
    repeated = AIMessage(content="", tool_calls=[call(TICKET, "call_e")])
    model = ScriptedModel(
        messages=iter([P7_MESSAGE, AIMessage("Filed."), repeated, AIMessage("Same one.")])
    )
    agent = create_agent(model, tools, checkpointer=InMemorySaver())

    first = agent.invoke({"messages": [HumanMessage("file it")]}, THREAD)
    assert ledger.count("ticket") == 1
    assert {m.content for m in tool_messages(first)} == {'{"ticket_id": "T-1", "priority": "high"}'}

    again = agent.invoke({"messages": [HumanMessage("did you file it?")]}, THREAD)
    assert ledger.count("ticket") == 1
    assert tool_messages(again)[-1].tool_call_id == "call_e"
    assert tool_messages(again)[-1].content == '{"ticket_id": "T-1", "priority": "high"}'

    other = create_agent(
        ScriptedModel(messages=iter([repeated, AIMessage("Filed.")])),
        tools,
        checkpointer=InMemorySaver(),
    )
    other.invoke({"messages": [HumanMessage("file it")]}, {"configurable": {"thread_id": "c2"}})
    assert ledger.count("ticket") == 2
    guard.close()


def test_create_agent_without_a_thread_id_runs_no_tool(tmp_path: Path, ledger: Ledger) -> None:
    """docs/integrations/langchain.md: with a checkpointer LangGraph refuses a run without
    a thread_id; without one, the guarded tool refuses it (MissingKeyError). No ticket."""
    guard = Guard(tmp_path / "guard.db")
    tools = guard_tools([ticket_tool(ledger)], guard)
    with_memory = create_agent(
        ScriptedModel(messages=iter([P7_MESSAGE])), tools, checkpointer=InMemorySaver()
    )
    with pytest.raises(ValueError, match="thread_id"):
        with_memory.invoke({"messages": [HumanMessage("file it")]})
    bare = create_agent(ScriptedModel(messages=iter([P7_MESSAGE])), tools)
    with pytest.raises(MissingKeyError):
        bare.invoke({"messages": [HumanMessage("file it")]})
    assert ledger.count("ticket") == 0
    guard.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_p7_parallel_equivalent_calls_in_react_agent(
    tmp_path: Path, ledger: Ledger, version: str
) -> None:
    """P7: equivalent parallel calls in one AI message file one ticket; a new priority, another."""
    guard = Guard(tmp_path / "guard.db")
    tools = [guard_tool(ticket_tool(ledger, delay=0.2), guard)]
    model = scripted(
        [P7_MESSAGE, AIMessage("Filed."), P7_LATER, AIMessage("Filed the low one.")], tools
    )
    agent = react_agent(model, tools, checkpointer=InMemorySaver(), version=version)
    spans = ToolSpans()
    config = {**THREAD, "callbacks": [spans]}

    first = agent.invoke({"messages": [HumanMessage("file it")]}, config)

    assert ledger.count("ticket") == 1
    replies = tool_messages(first)
    assert sorted(m.tool_call_id for m in replies) == ["call_a", "call_b", "call_c"]
    assert {m.content for m in replies} == {'{"ticket_id": "T-1", "priority": "high"}'}
    assert all(m.status == "success" and m.name == "create_ticket" for m in replies)
    assert len(spans.starts) == 3
    assert max(spans.starts) < min(spans.ends)

    second = agent.invoke({"messages": [HumanMessage("and a low one")]}, config)

    assert ledger.count("ticket") == 2
    assert tool_messages(second)[-1].content == '{"ticket_id": "T-2", "priority": "low"}'
    guard.close()


def test_p7_async_tool_node_with_async_guard(tmp_path: Path, ledger: Ledger) -> None:
    """P7 through graph.ainvoke and an AsyncGuard: one ticket, three replies carrying its id."""
    guard = AsyncGuard(tmp_path / "guard.db")
    tools = [guard_tool(ticket_tool(ledger, delay=0.2), guard)]
    graph = tool_graph(scripted([P7_MESSAGE, AIMessage("Filed.")], tools), tools)

    async def run() -> dict[str, Any]:
        try:
            return dict(await graph.ainvoke({"messages": [HumanMessage("file it")]}, THREAD))
        finally:
            await guard.aclose()

    result = asyncio.run(run())

    assert ledger.count("ticket") == 1
    replies = tool_messages(result)
    assert [m.tool_call_id for m in replies] == ["call_a", "call_b", "call_c"]
    assert len({m.content for m in replies}) == 1


# -- checkpoints -----------------------------------------------------------------------------


def test_graph_resumed_from_checkpoint_after_failure(tmp_path: Path, ledger: Ledger) -> None:
    """A graph resumed, or forked, from its checkpoint after the tools node failed: one ticket."""
    pages = {"n": 0}

    @tool
    def page_oncall(team: str) -> str:
        """Page the on-call engineer of a team."""
        pages["n"] += 1
        if pages["n"] == 1:
            raise ConnectionError("pager gateway unreachable")
        return f"paged {team}"

    message = AIMessage(
        content="",
        tool_calls=[call(TICKET, "call_1"), call({"team": "ops"}, "call_2", "page_oncall")],
    )
    checkpointer = InMemorySaver()

    def fresh_graph() -> tuple[Any, Guard]:
        guard = Guard(tmp_path / "guard.db")  # a new guard on the same file (a restart)
        tools = [guard_tool(ticket_tool(ledger), guard), page_oncall]
        model = scripted([message, AIMessage("Done."), AIMessage("Done again.")], tools)
        return tool_graph(model, tools, checkpointer=checkpointer), guard

    graph, guard = fresh_graph()
    with pytest.raises(ConnectionError):
        graph.invoke({"messages": [HumanMessage("fire!")]}, THREAD)
    guard.close()
    assert ledger.count("ticket") == 1
    [(_, detail)] = ledger.rows("ticket")

    graph, guard = fresh_graph()
    resumed = graph.invoke(None, THREAD)

    assert ledger.count("ticket") == 1
    ticket_reply = next(m for m in tool_messages(resumed) if m.name == "create_ticket")
    assert ticket_reply.content == '{"ticket_id": "T-1", "priority": "high"}'
    assert detail == "ORD-1|Printer on fire|high"
    receipt = guard.get(ticket_reply_request_id(guard))
    assert receipt is not None
    assert receipt.result == {"ticket_id": "T-1", "priority": "high"}

    before_tools = next(
        s for s in graph.get_state_history(THREAD) if s.next == ("tools",)
    )  # the checkpoint the failed run had reached
    forked = graph.invoke(None, before_tools.config)
    assert ledger.count("ticket") == 1
    assert [m.content for m in tool_messages(forked) if m.name == "create_ticket"][-1] == (
        ticket_reply.content
    )
    guard.close()


def ticket_reply_request_id(guard: Guard) -> str:
    """The request id of the only create_ticket record."""
    [event] = [e for e in guard.audit_trail() if e.kind.value == "claimed"]
    return event.subject


def test_langgraph_retry_policy_reruns_the_node_but_not_the_effect(ledger: Ledger) -> None:
    """LangGraph's RetryPolicy re-runs the tools node after a late connection reset: one email."""
    from langgraph.types import RetryPolicy

    entered = {"n": 0}

    @tool
    def send_email(to: str, template: str) -> str:
        """Send an email."""
        entered["n"] += 1
        ledger.append("mail", to)
        raise ConnectionResetError("connection reset after the message was handed over")

    guarded = guard_tool(send_email, Guard(MemoryStore()))
    builder = StateGraph(MessagesState)
    builder.add_node(
        "tools",
        ToolNode([guarded]),
        retry_policy=RetryPolicy(max_attempts=3, initial_interval=0, jitter=False),
    )
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    message = AIMessage(
        "",
        tool_calls=[call({"to": "user@example.test", "template": "welcome"}, "c1", "send_email")],
    )

    with pytest.raises(ReplayedFailureError, match="connection reset") as info:
        builder.compile().invoke({"messages": [message]}, THREAD)

    assert info.value.error_type == "ConnectionResetError"
    assert entered["n"] == 1
    assert ledger.count("mail") == 1


# -- schema, keys and scope ------------------------------------------------------------------


def test_guarded_tool_keeps_name_description_and_schemas(ledger: Ledger) -> None:
    """The guarded tool has the inner tool's name, description and schemas."""
    inner = ticket_tool(ledger)
    guarded = guard_tool(inner, Guard(MemoryStore()))

    assert isinstance(guarded, BaseTool)
    assert isinstance(guarded, GuardedTool)
    assert guarded.inner is inner
    assert (guarded.name, guarded.description) == (inner.name, inner.description)
    assert guarded.args == inner.args
    assert convert_to_openai_tool(guarded) == convert_to_openai_tool(inner)


def test_guard_tools_wraps_each_tool_and_refuses_guarding_twice(ledger: Ledger) -> None:
    """guard_tools wraps every tool given; a guarded tool cannot be guarded again."""
    inner = ticket_tool(ledger)
    both = guard_tools([inner, inner], Guard(MemoryStore()), exclude={"create_ticket": ["title"]})

    assert [type(t) for t in both] == [GuardedTool, GuardedTool]
    with pytest.raises(ConfigurationError, match="already guarded"):
        guard_tool(both[0], Guard(MemoryStore()))


def test_single_input_tool_is_keyed_on_its_input(ledger: Ledger) -> None:
    """A single-input ``Tool`` (a string input, passed positionally) runs once per input."""
    from langchain_core.tools import Tool

    book = Tool(
        name="book_room",
        func=lambda room: f"B-{ledger.append('book', room)}",
        description="Book a meeting room.",
    )
    guarded = guard_tool(book, Guard(MemoryStore()), scope="s")

    assert guarded.invoke("room 1") == guarded.invoke("room 1")
    assert guarded.invoke("room 2") != guarded.invoke("room 1")
    assert ledger.count("book") == 2


def test_string_input_and_its_dict_form_are_one_request(ledger: Ledger) -> None:
    """invoke("hello") and invoke({"text": "hello"}) are one call: LangChain validates a
    string as the tool's first argument, so both get the dict form's request id (the one
    the dict form always had), and the SMS is sent once."""

    @tool
    def send_sms(text: str) -> str:
        """Send an SMS."""
        return f"sent {ledger.append('sms', text)}"

    guard = Guard(MemoryStore())
    guarded = guard_tool(send_sms, guard, scope="conv-1")

    replies = [
        guarded.invoke("hello"),
        guarded.invoke({"text": "hello"}),
        guarded.invoke(call({"text": "hello"}, "c1", "send_sms")).content,
        guarded.invoke("hello"),
        asyncio.run(guarded.ainvoke("hello")),
    ]

    assert replies == ["sent 1"] * 5
    assert ledger.count("sms") == 1
    receipt = guard.get(derive_request_id("conv-1", "send_sms", {"text": "hello"}))
    assert receipt is not None
    assert receipt.payload == {"text": "hello"}


class Lookup(BaseTool):
    """A ``BaseTool`` subclass without an ``args_schema``: LangChain reads its arguments
    from ``_run``'s signature."""

    name: str = "lookup_order"
    description: str = "Look an order up."
    ledger: Any = None

    def _run(self, order_id: str, fields: str = "all") -> str:
        return f"L-{self.ledger.append('lookup', f'{order_id}|{fields}')}"


def test_string_input_keys_like_its_dict_form_with_defaults(ledger: Ledger) -> None:
    """A string input stands for the first argument, with the schema's defaults applied
    (a ``@tool`` with a default), or as given (a subclass without a schema): one run each."""

    @tool
    def notify(user: str, channel: str = "sms") -> str:
        """Notify a user."""
        return f"N-{ledger.append('notify', f'{user}|{channel}')}"

    guard = Guard(MemoryStore())
    guarded = guard_tool(notify, guard, scope="s")
    lookup = guard_tool(Lookup(ledger=ledger), guard, scope="s")

    assert guarded.invoke("u1") == guarded.invoke({"user": "u1"}) == "N-1"
    assert guarded.invoke({"user": "u1", "channel": "sms"}) == "N-1"
    assert guarded.invoke({"user": "u1", "channel": "mail"}) == "N-2"
    assert lookup.invoke("ORD-1") == lookup.invoke({"order_id": "ORD-1"}) == "L-3"
    assert ledger.rows() == [
        ("notify", "u1|sms"),
        ("notify", "u1|mail"),
        ("lookup", "ORD-1|all"),
    ]


def test_injected_arguments_are_passed_but_not_keyed(ledger: Ledger) -> None:
    """Injected state and tool_call_id reach the tool but are not part of the request id."""
    seen: list[tuple[int, str]] = []

    @tool
    def create_ticket(
        title: str,
        state: Annotated[dict[str, Any], InjectedState],
        tool_call_id: Annotated[str, InjectedToolCallId],
    ) -> str:
        """Open a ticket."""
        seen.append((len(state["messages"]), tool_call_id))
        return f"T-{ledger.append('ticket', title)}"

    guarded = guard_tool(create_ticket, Guard(MemoryStore()))
    graph = tool_graph(
        scripted(
            [
                AIMessage("", tool_calls=[call({"title": "x"}, "call_1")]),
                AIMessage("", tool_calls=[call({"title": "x"}, "call_2")]),
                AIMessage("done"),
            ],
            [guarded],
        ),
        [guarded],
    )

    result = graph.invoke({"messages": [HumanMessage("go")]}, THREAD)

    assert ledger.count("ticket") == 1
    assert seen == [(2, "call_1")]
    assert [m.content for m in tool_messages(result)] == ["T-1", "T-1"]


def test_thread_id_scope_keeps_conversations_apart(ledger: Ledger) -> None:
    """By default the thread_id is the scope: the same call in another conversation runs."""
    guarded = guard_tool(ticket_tool(ledger), Guard(MemoryStore()))

    guarded.invoke(TICKET, {"configurable": {"thread_id": "conv-1"}})
    guarded.invoke(TICKET, {"configurable": {"thread_id": "conv-1"}})
    guarded.invoke(TICKET, {"configurable": {"thread_id": "conv-2"}})

    assert ledger.count("ticket") == 2


def test_call_without_scope_is_refused(ledger: Ledger) -> None:
    """A call with no thread_id and no scope= raises MissingKeyError and runs nothing."""
    guarded = guard_tool(ticket_tool(ledger), Guard(MemoryStore()))

    with pytest.raises(MissingKeyError, match="thread_id"):
        guarded.invoke(TICKET)
    assert ledger.count("ticket") == 0


def test_fixed_and_config_scopes_key_calls_alike(ledger: Ledger) -> None:
    """A fixed scope and a scope read from the config give the same call one request id."""
    inner = ticket_tool(ledger)
    guard = Guard(MemoryStore())
    fixed = guard_tool(inner, guard, scope="order-42")
    from_config = guard_tool(inner, guard, scope=lambda config: config["configurable"]["order"])

    first = fixed.invoke(TICKET, {"configurable": {"thread_id": "conv-1"}})
    again = from_config.invoke(TICKET, {"configurable": {"order": "order-42"}})

    assert first == again
    assert ledger.count("ticket") == 1


class _Order:
    """An order object a scope callable might return instead of its id."""

    def __init__(self, number: int) -> None:
        self.number = number


def test_a_scope_callable_must_give_a_str_or_an_int(ledger: Ledger) -> None:
    """An int is its digits; an object used to count by ``str()``, its memory address,
    so the same order loaded again for a retry got a new scope and charged again."""
    inner = ticket_tool(ledger)
    guard = Guard(MemoryStore())
    by_number = guard_tool(inner, guard, scope=lambda config: config["configurable"]["order"])
    by_object = guard_tool(
        inner, guard, scope=lambda config: _Order(config["configurable"]["order"])
    )
    first = by_number.invoke(TICKET, {"configurable": {"order": 42}})
    assert guard_tool(inner, guard, scope="42").invoke(TICKET) == first  # one request
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="scope callable gave _Order"):
            by_object.invoke(TICKET, {"configurable": {"order": 42}})
    assert ledger.count("ticket") == 1


def test_volatile_arguments_can_be_excluded(ledger: Ledger) -> None:
    """An argument named in exclude (a timestamp) does not make a new request."""

    def notify(user: str, sent_at: str) -> str:
        """Notify a user."""
        return f"N-{ledger.append('notify', user)}"

    guarded = guard_tool(
        StructuredTool.from_function(notify),
        Guard(MemoryStore()),
        scope="run-1",
        exclude=["sent_at"],
    )

    assert guarded.invoke({"user": "u1", "sent_at": "10:00"}) == "N-1"
    assert guarded.invoke({"user": "u1", "sent_at": "10:05"}) == "N-1"
    assert ledger.count("notify") == 1


def test_misspelt_volatile_argument_is_refused(ledger: Ledger) -> None:
    """An exclude name the tool does not take is a ConfigurationError when wrapping."""
    with pytest.raises(ConfigurationError, match="sent_ta") as info:
        guard_tool(ticket_tool(ledger), Guard(MemoryStore()), exclude=["sent_ta"])
    # The tool's own arguments, not the "args" of a positional input it does not take.
    assert str(info.value).endswith("it has ['order_id', 'priority', 'title']")
    with pytest.raises(ConfigurationError, match="not there"):
        guard_tools([ticket_tool(ledger)], Guard(MemoryStore()), exclude={"notify": ["at"]})


def test_tool_call_id_keys_warn_and_use_the_transport_id(ledger: Ledger) -> None:
    """key='tool_call_id' warns when wrapped; then each new tool_call_id runs again."""
    with pytest.warns(TransportIdWarning, match="create_ticket"):
        guarded = guard_tool(ticket_tool(ledger), Guard(MemoryStore()), key="tool_call_id")

    guarded.invoke(call(TICKET, "call_1"))
    guarded.invoke(call(TICKET, "call_1"))
    guarded.invoke(call(TICKET, "call_2"))

    assert ledger.count("ticket") == 2
    with pytest.raises(MissingKeyError, match="tool-call ids"):
        guarded.invoke(TICKET)


class CardCharge(BaseModel):
    card_token: SecretStr
    amount_cents: int


class Parcel(BaseModel):
    order_id: str
    total: int


class Payout(BaseModel):
    name: str
    iban: str = Field(exclude=True)  # left out of model_dump: it must still tell calls apart


def test_secret_arguments_tell_calls_apart(ledger: Ledger) -> None:
    """A SecretStr argument counts by the digest of its secret: charges to two cards run
    twice (pydantic would mask both as '**********'), the same card runs once, and the
    stored payload never holds the secret in clear."""

    def charge(card_token: SecretStr, amount_cents: int) -> str:
        """Charge a card."""
        return f"C-{ledger.append('charge', card_token.get_secret_value())}"

    guard = Guard(MemoryStore())
    guarded = guard_tool(
        StructuredTool.from_function(charge, args_schema=CardCharge), guard, scope="s"
    )

    assert guarded.invoke({"card_token": "tok_ALICE", "amount_cents": 500}) == "C-1"
    assert guarded.invoke({"card_token": "tok_BOB", "amount_cents": 500}) == "C-2"
    assert guarded.invoke({"card_token": "tok_ALICE", "amount_cents": 500}) == "C-1"
    assert ledger.rows() == [("charge", "tok_ALICE"), ("charge", "tok_BOB")]
    digest = hashlib.sha256(b"tok_ALICE").hexdigest()
    receipt = guard.get(
        derive_request_id(
            "s", "charge", {"card_token": {"secret_sha256": digest}, "amount_cents": 500}
        )
    )
    assert receipt is not None
    assert "tok_ALICE" not in json.dumps(receipt.payload)


def test_excluded_model_fields_tell_calls_apart(ledger: Ledger) -> None:
    """A model field declared exclude=True (an IBAN) still counts: payouts to two IBANs
    run twice, a retry to the same IBAN once."""

    @tool
    def pay_out(payout: Payout, amount_cents: int) -> str:
        """Pay a supplier out."""
        return f"P-{ledger.append('payout', payout.iban)}"

    guarded = guard_tool(pay_out, Guard(MemoryStore()), scope="s")
    first = {"payout": {"name": "ACME", "iban": "DE01"}, "amount_cents": 900}

    assert guarded.invoke(first) == "P-1"
    assert guarded.invoke({**first, "payout": {"name": "ACME", "iban": "DE02"}}) == "P-2"
    assert guarded.invoke(first) == "P-1"
    assert ledger.rows() == [("payout", "DE01"), ("payout", "DE02")]


def test_model_arguments_without_secrets_keep_their_request_ids(ledger: Ledger) -> None:
    """A model argument with no secret and no excluded field is keyed as pydantic dumps
    it, as it always was: stored request ids do not change."""

    @tool
    def pay_out(payout: Parcel, note: str = "") -> str:
        """Pay out."""
        return f"P-{ledger.append('payout', payout.order_id)}"

    guard = Guard(MemoryStore())
    guarded = guard_tool(pay_out, guard, scope="s")
    guarded.invoke({"payout": {"order_id": "ORD-1", "total": 5}})

    expected = {"payout": {"order_id": "ORD-1", "total": 5}, "note": ""}
    assert guard.get(derive_request_id("s", "pay_out", expected)) is not None


def test_caller_injected_argument_counts_toward_the_request_id(ledger: Ledger) -> None:
    """A plain InjectedToolArg is supplied by the caller (hidden from the model only): a
    charge for another account is another request; the same account replays."""

    @tool
    def charge(account: Annotated[str, InjectedToolArg], amount_cents: int = 500) -> str:
        """Charge the caller's account."""
        return f"C-{ledger.append('charge', f'{account}|{amount_cents}')}"

    guard = Guard(MemoryStore())
    guarded = guard_tool(charge, guard)

    assert guarded.invoke({"account": "acct-ALICE", "amount_cents": 500}, THREAD) == "C-1"
    assert guarded.invoke({"account": "acct-BOB", "amount_cents": 500}, THREAD) == "C-2"
    assert guarded.invoke({"account": "acct-ALICE"}, THREAD) == "C-1"
    assert asyncio.run(guarded.ainvoke({"account": "acct-BOB"}, THREAD)) == "C-2"
    assert ledger.rows() == [("charge", "acct-ALICE|500"), ("charge", "acct-BOB|500")]
    keyed = {"account": "acct-ALICE", "amount_cents": 500}
    assert guard.get(derive_request_id("conv-1", "charge", keyed)) is not None


class SmsClient:
    """An application's client, injected into the tool: not a JSON value."""


def test_caller_injected_argument_can_be_excluded(ledger: Ledger) -> None:
    """A caller-injected argument that does not tell calls apart (a trace id, a client)
    can be named in exclude; a client that is not a JSON value and is not excluded is
    refused loudly before anything runs, with the way out in the message."""

    @tool
    def notify(
        user: str,
        trace_id: Annotated[str, InjectedToolArg],
        client: Annotated[Any, InjectedToolArg],
    ) -> str:
        """Notify a user."""
        assert isinstance(client, SmsClient)
        return f"N-{ledger.append('notify', user)}"

    guard = Guard(MemoryStore())
    guarded = guard_tool(notify, guard, scope="s", exclude=["trace_id", "client"])
    strict = guard_tool(notify, guard, scope="s2", exclude=["trace_id"])

    assert guarded.invoke({"user": "u1", "trace_id": "t-1", "client": SmsClient()}) == "N-1"
    assert guarded.invoke({"user": "u1", "trace_id": "t-2", "client": SmsClient()}) == "N-1"
    with pytest.raises(InvalidPayloadError, match=r"\['client'\].*exclude"):
        strict.invoke({"user": "u1", "trace_id": "t-1", "client": SmsClient()})
    assert ledger.count("notify") == 1
    receipt = guard.get(derive_request_id("s", "notify", {"user": "u1"}))
    assert receipt is not None
    assert receipt.payload == {"user": "u1"}  # an excluded injected value is not stored


def test_framework_injected_arguments_keep_their_request_ids(ledger: Ledger) -> None:
    """State, store, runtime and tool_call_id that ToolNode injects are left out of the
    request id (the state grows between the calls): one run, and the id is that of the
    model's arguments alone, as before."""
    from langgraph.store.memory import InMemoryStore

    @tool
    def create_ticket(
        title: str,
        state: Annotated[dict[str, Any], InjectedState],
        store: Annotated[Any, InjectedStore()],
        runtime: ToolRuntime,
        tool_call_id: Annotated[str, InjectedToolCallId],
    ) -> str:
        """Open a ticket."""
        seen = len(state["messages"])
        return f"T-{ledger.append('ticket', f'{title}|{seen}')}"

    guard = Guard(MemoryStore())
    guarded = guard_tool(create_ticket, guard)
    model = scripted(
        [
            AIMessage("", tool_calls=[call({"title": "x"}, "call_1")]),
            AIMessage("", tool_calls=[call({"title": "x"}, "call_2")]),
            AIMessage("done"),
        ],
        [guarded],
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    builder.add_node("tools", ToolNode([guarded]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    graph = builder.compile(store=InMemoryStore())

    result = graph.invoke({"messages": [HumanMessage("go")]}, THREAD)

    assert [m.content for m in tool_messages(result)] == ["T-1", "T-1"]
    assert ledger.rows() == [("ticket", "x|2")]
    assert guard.get(derive_request_id("conv-1", "create_ticket", {"title": "x"})) is not None


def test_string_input_never_collapses_on_an_injected_first_argument(ledger: Ledger) -> None:
    """A string input goes to the tool's first argument. When LangGraph injects that
    argument (state), the string is keyed positionally: two strings are two requests. A
    caller-injected first argument counts, so the string keys like its dict form."""

    @tool
    def pay(user: Annotated[str, InjectedState("user")], amount: int = 1) -> str:
        """Pay."""
        return f"P-{ledger.append('pay', user)}"

    @tool
    def charge(account: Annotated[str, InjectedToolArg], amount_cents: int = 500) -> str:
        """Charge the caller's account."""
        return f"C-{ledger.append('charge', account)}"

    guard = Guard(MemoryStore())
    paying = guard_tool(pay, guard, scope="s")
    charging = guard_tool(charge, guard, scope="s")

    assert [paying.invoke("alice"), paying.invoke("bob"), paying.invoke("alice")] == [
        "P-1",
        "P-2",
        "P-1",
    ]
    assert guard.get(derive_request_id("s", "pay", {"args": ["bob"]})) is not None
    assert charging.invoke("acct-CAROL") == "C-3"
    assert charging.invoke("acct-DAVE") == "C-4"
    assert charging.invoke({"account": "acct-CAROL"}) == "C-3"
    assert ledger.rows() == [
        ("pay", "alice"),
        ("pay", "bob"),
        ("charge", "acct-CAROL"),
        ("charge", "acct-DAVE"),
    ]


class Transfer(BaseTool):
    """A ``BaseTool`` subclass without an ``args_schema``: LangChain passes the model's
    arguments as they are, without ``_run``'s defaults."""

    name: str = "transfer"
    description: str = "Send money to an account."
    ledger: Any = None

    def _run(self, target: str, amount: int = 100) -> str:
        return f"X-{self.ledger.append('transfer', f'{target}|{amount}')}"


def test_subclass_defaults_count_as_given(ledger: Ledger) -> None:
    """A re-emitted call that spells out a ``_run`` default is the same request: the
    transfer runs once, and the id is the one the spelled-out call always had."""
    guard = Guard(MemoryStore())
    guarded = guard_tool(Transfer(ledger=ledger), guard, scope="s")

    assert guarded.invoke({"target": "acct"}) == "X-1"
    assert guarded.invoke({"target": "acct", "amount": 100}) == "X-1"
    assert guarded.invoke("acct") == "X-1"
    assert asyncio.run(guarded.ainvoke({"amount": 100, "target": "acct"})) == "X-1"
    assert guarded.invoke({"target": "acct", "amount": 50}) == "X-2"
    assert ledger.rows() == [("transfer", "acct|100"), ("transfer", "acct|50")]
    spelled_out = {"target": "acct", "amount": 100}
    receipt = guard.get(derive_request_id("s", "transfer", spelled_out))
    assert receipt is not None
    assert receipt.payload == spelled_out


def test_json_schema_defaults_count_as_given(ledger: Ledger) -> None:
    """A tool whose args_schema is a JSON schema (as MCP adapters build): a model that
    re-emits the call with a default spelled out, under a new tool_call_id, replays."""

    def refund(**kwargs: Any) -> str:
        return f"R-{ledger.append('refund', json.dumps(kwargs, sort_keys=True))}"

    schema = {
        "type": "object",
        "properties": {
            "order_id": {"type": "string"},
            "currency": {"type": "string", "default": "USD"},
        },
        "required": ["order_id"],
    }
    inner = StructuredTool(
        name="refund", description="Refund an order.", args_schema=schema, func=refund
    )
    guard = Guard(MemoryStore())
    guarded = guard_tool(inner, guard)
    graph = tool_graph(
        scripted(
            [
                AIMessage("", tool_calls=[call({"order_id": "o1"}, "call_1", "refund")]),
                AIMessage(
                    "",
                    tool_calls=[call({"order_id": "o1", "currency": "USD"}, "call_2", "refund")],
                ),
                AIMessage(
                    "",
                    tool_calls=[call({"order_id": "o1", "currency": "EUR"}, "call_3", "refund")],
                ),
                AIMessage("done"),
            ],
            [guarded],
        ),
        [guarded],
    )

    result = graph.invoke({"messages": [HumanMessage("go")]}, THREAD)

    assert [m.content for m in tool_messages(result)] == ["R-1", "R-1", "R-2"]
    assert ledger.rows() == [
        ("refund", '{"order_id": "o1"}'),
        ("refund", '{"currency": "EUR", "order_id": "o1"}'),
    ]
    spelled_out = {"order_id": "o1", "currency": "USD"}
    assert guard.get(derive_request_id("conv-1", "refund", spelled_out)) is not None


# -- outcomes --------------------------------------------------------------------------------


def test_tool_exception_is_stored_and_shown_the_same_way(ledger: Ledger) -> None:
    """A stored ToolException is shown to the model with the same text on every call."""

    @tool
    def send_email(to: str, template: str) -> str:
        """Send an email."""
        ledger.append("mail", to)
        raise ToolException("SMTP acknowledgement timed out")

    send_email.handle_tool_error = True
    guarded = guard_tool(send_email, Guard(MemoryStore()), scope="run-1")
    args = {"to": "user@example.test", "template": "welcome"}

    replies = [guarded.invoke(call(args, f"call_{i}", "send_email")) for i in range(3)]

    assert ledger.count("mail") == 1
    assert {(m.content, m.status) for m in replies} == {("SMTP acknowledgement timed out", "error")}


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (
            ToolException("SMTP acknowledgement timed out"),
            "ToolException('SMTP acknowledgement timed out')",
        ),
        (ValueError("card declined"), "ValueError('card declined')"),
    ],
)
def test_tool_node_handling_errors_shows_the_model_the_same_text_on_replay(
    ledger: Ledger, error: Exception, shown: str
) -> None:
    """ToolNode(handle_tool_errors=True) renders repr(error): a LangGraph retry of the
    node replays the stored failure, and the model reads exactly what it read first."""

    @tool
    def send_email(to: str, template: str) -> str:
        """Send an email."""
        ledger.append("mail", to)
        raise error

    builder = StateGraph(MessagesState)
    builder.add_node(
        "tools", ToolNode([guard_tool(send_email, Guard(MemoryStore()))], handle_tool_errors=True)
    )
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    graph = builder.compile()
    message = AIMessage(
        "",
        tool_calls=[call({"to": "user@example.test", "template": "welcome"}, "c1", "send_email")],
    )

    replies = [graph.invoke({"messages": [message]}, THREAD)["messages"][-1] for _ in range(3)]

    assert ledger.count("mail") == 1
    assert len({m.content for m in replies}) == 1  # the same text, first call and replays
    assert f"Error: {shown}" in replies[0].content
    assert {m.status for m in replies} == {"error"}


def error_node_graph(tools: list[BaseTool]) -> Any:
    """START -> ToolNode(handle_tool_errors=True) -> END."""
    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode(tools, handle_tool_errors=True))
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    return builder.compile()


@pytest.mark.parametrize(
    "error",
    [
        KeyError("k"),
        KeyError(42),
        RuntimeError(),
        ToolException(),
        ValueError('it\'s "quoted"\n'),
        ConnectionRefusedError(111, "Connection refused"),
        FileNotFoundError(2, "No such file or directory", "labels/L-1.pdf"),
    ],
    ids=repr,
)
def test_replayed_failure_shows_the_model_the_unguarded_text(
    ledger: Ledger, error: Exception
) -> None:
    """Under ToolNode(handle_tool_errors=True) the first call and every replay show the
    model exactly the text the unguarded tool shows it (repr of its exception)."""

    @tool
    def send_email(to: str, template: str) -> str:
        """Send an email."""
        ledger.append("mail", to)
        raise error

    message = AIMessage(
        "",
        tool_calls=[call({"to": "user@example.test", "template": "welcome"}, "c1", "send_email")],
    )
    unguarded = error_node_graph([send_email]).invoke({"messages": [message]}, THREAD)
    graph = error_node_graph([guard_tool(send_email, Guard(MemoryStore()))])

    replies = [graph.invoke({"messages": [message]}, THREAD)["messages"][-1] for _ in range(3)]

    assert ledger.count("mail") == 2  # the unguarded run, then one guarded run
    assert [m.content for m in replies] == [unguarded["messages"][-1].content] * 3
    assert f"Error: {error!r}" in replies[0].content


def test_replayed_tool_exception_is_a_replayed_tool_error(ledger: Ledger) -> None:
    """Without handle_tool_error, a replayed ToolException raises a typed ReplayedToolError."""

    @tool
    def send_email(to: str, template: str) -> str:
        """Send an email."""
        ledger.append("mail", to)
        raise ToolException("SMTP acknowledgement timed out")

    guarded = guard_tool(send_email, Guard(MemoryStore()), scope="run-1")
    args = {"to": "user@example.test", "template": "welcome"}

    with pytest.raises(ToolException):
        guarded.invoke(args)
    with pytest.raises(ReplayedToolError) as info:
        guarded.invoke(args)

    assert isinstance(info.value, ReplayedFailureError)
    assert info.value.error_message == "SMTP acknowledgement timed out"
    assert ledger.count("mail") == 1


class CardDeclined(ToolException):
    """An application's own ToolException."""


def test_tool_exception_subclass_is_replayed_as_a_tool_exception(ledger: Ledger) -> None:
    """A ToolException subclass is handled by handle_tool_error on the first call and on
    every replay alike (the stored type is looked up among the imported modules)."""

    def charge(amount_cents: int) -> str:
        """Charge a card."""
        ledger.append("charge", str(amount_cents))
        raise CardDeclined("card declined (insufficient funds)")

    inner = StructuredTool.from_function(charge, handle_tool_error=True)
    guarded = guard_tool(inner, Guard(MemoryStore()), scope="s")

    replies = [guarded.invoke(call({"amount_cents": 5}, f"c{i}", "charge")) for i in range(3)]

    assert [(m.content, m.status) for m in replies] == [
        ("card declined (insufficient funds)", "error")
    ] * 3
    assert ledger.count("charge") == 1
    guarded.handle_tool_error = False
    with pytest.raises(ReplayedToolError) as info:
        guarded.invoke({"amount_cents": 5})
    assert info.value.error_type == f"{__name__}.CardDeclined"
    assert repr(info.value) == "CardDeclined('card declined (insufficient funds)')"


@pytest.mark.parametrize(
    ("error_type", "is_tool_exception"),
    [
        ("safeagent_test_never_imported.ToolException", True),  # not loaded: by its name
        ("safeagent_test_never_imported.CardDeclined", False),
        ("tests.integrations.test_langchain.CardDeclined", True),
        ("tests.integrations.test_langchain.Transfer", False),  # found: not a ToolException
        ("langchain_core.tools.base.ToolException", True),
        ("ValueError", False),
    ],
)
def test_stored_type_is_looked_up_only_among_imported_modules(
    error_type: str, is_tool_exception: bool
) -> None:
    """Whether a replay is a ToolException is read from the class the stored type names,
    when its module is already imported; nothing is imported from stored data."""
    from safeagent.integrations.langchain import _replayed

    stored = ReplayedFailureError("x", error_type=error_type, error_message="m", receipt=None)
    replayed = _replayed(stored)

    assert isinstance(replayed, ReplayedToolError) is is_tool_exception
    assert "safeagent_test_never_imported" not in sys.modules


SHOP = '''
from langchain_core.tools import StructuredTool, ToolException


class CardDeclined(ToolException):
    pass


def charge_tool(ledger_path):
    def charge(amount_cents: int) -> str:
        """Charge a card."""
        with open(ledger_path, "a") as ledger:
            ledger.write("charged\\n")
        raise CardDeclined("card declined (insufficient funds)")

    return StructuredTool.from_function(charge, handle_tool_error=True)
'''

APP = """
import sys

from safeagent import Guard
from safeagent.integrations.langchain import guard_tool
from shop import charge_tool

guarded = guard_tool(charge_tool(sys.argv[2]), Guard(sys.argv[1]), scope="order-1")
call = {"name": "charge", "args": {"amount_cents": 5}, "id": sys.argv[3], "type": "tool_call"}
print(guarded.invoke(call).content)
"""


def test_tool_exception_subclass_is_replayed_in_a_fresh_process(tmp_path: Path) -> None:
    """The app is restarted between the first call and the retry: the new process imports
    the module of the exception class as the app does, and the replay is handled the same."""
    (tmp_path / "shop.py").write_text(SHOP)
    (tmp_path / "app.py").write_text(APP)
    db, effects = tmp_path / "guard.db", tmp_path / "effects.txt"

    outputs = []
    for call_id in ("call_1", "call_2"):
        done = subprocess.run(
            [sys.executable, str(tmp_path / "app.py"), str(db), str(effects), call_id],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)

    assert outputs == ["card declined (insufficient funds)\n"] * 2
    assert effects.read_text() == "charged\n"


def test_plain_failure_is_raised_then_replayed(ledger: Ledger) -> None:
    """Any other failure is re-raised once, then replayed as ReplayedFailureError."""

    def charge(customer: str, amount_cents: int) -> str:
        """Charge a card."""
        ledger.append("charge", customer)
        raise TimeoutError("acquirer did not answer")

    guarded = guard_tool(StructuredTool.from_function(charge), Guard(MemoryStore()), scope="o-1")
    args = {"customer": "CUST-1", "amount_cents": 500}

    with pytest.raises(TimeoutError):
        guarded.invoke(args)
    with pytest.raises(ReplayedFailureError, match="acquirer did not answer") as info:
        guarded.invoke(args)

    assert info.value.error_type == "TimeoutError"
    assert ledger.count("charge") == 1


def test_not_executed_releases_the_claim(ledger: Ledger) -> None:
    """A tool raising NotExecuted runs again on the next call."""
    attempts = {"n": 0}

    def reserve(slot: str) -> str:
        """Reserve a slot."""
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise NotExecuted("calendar busy, nothing booked")
        return f"R-{ledger.append('reserve', slot)}"

    guarded = guard_tool(StructuredTool.from_function(reserve), Guard(MemoryStore()), scope="s")

    with pytest.raises(NotExecuted):
        guarded.invoke({"slot": "mon"})
    assert guarded.invoke({"slot": "mon"}) == "R-1"
    assert guarded.invoke({"slot": "mon"}) == "R-1"
    assert attempts["n"] == 2
    assert ledger.count("reserve") == 1


def test_content_and_artifact_survive_replays(ledger: Ledger) -> None:
    """A content_and_artifact tool returns the same content and artifact on a replay."""

    def label(order_id: str) -> tuple[str, dict[str, Any]]:
        """Create a shipping label."""
        row = ledger.append("label", order_id)
        return f"label L-{row}", {"label_id": row}

    tool_ = StructuredTool.from_function(label, response_format="content_and_artifact")
    guarded = guard_tool(tool_, Guard(MemoryStore()), scope="s")

    first = guarded.invoke(call({"order_id": "ORD-1"}, "c1", "label"))
    again = guarded.invoke(call({"order_id": "ORD-1"}, "c2", "label"))

    assert (first.content, first.artifact) == (again.content, again.artifact)
    assert again.artifact == {"label_id": 1}
    assert ledger.count("label") == 1


def test_async_tool_under_a_sync_guard_runs_once(ledger: Ledger) -> None:
    """An async-only tool guarded by a sync Guard runs once for concurrent ainvoke calls."""

    async def refund(order_id: str) -> str:
        """Refund an order."""
        await asyncio.sleep(0.05)
        return f"RF-{ledger.append('refund', order_id)}"

    tool_ = StructuredTool.from_function(coroutine=refund)
    guarded = guard_tool(tool_, Guard(MemoryStore()), scope="s")

    results = asyncio.run(_gather(guarded, {"order_id": "ORD-1"}, 3))

    assert len(set(results)) == 1
    assert ledger.count("refund") == 1


def test_many_concurrent_ainvoke_calls_under_a_sync_guard(ledger: Ledger) -> None:
    """Forty concurrent ainvoke calls of a sync tool under a sync Guard: one ticket, no stall."""
    guarded = guard_tool(ticket_tool(ledger, delay=0.2), Guard(MemoryStore()), scope="s")

    started = time.monotonic()
    results = asyncio.run(_gather(guarded, TICKET, 40))

    assert len(set(map(str, results))) == 1
    assert ledger.count("ticket") == 1
    assert time.monotonic() - started < 5


def test_async_bodies_that_need_the_executor_do_not_starve_a_sync_guard(ledger: Ledger) -> None:
    """A sync Guard and async tool bodies that use the loop's default executor (as DNS
    look-ups and asyncio.to_thread do): more concurrent calls than the executor has
    threads all finish. The guard must not wait for the bodies from executor threads."""

    async def fetch(n: int) -> str:
        """Fetch a page."""
        await asyncio.to_thread(lambda: None)  # needs an executor thread
        return f"P-{ledger.append('fetch', str(n))}"

    guarded = guard_tool(
        StructuredTool.from_function(coroutine=fetch), Guard(MemoryStore()), scope="s"
    )

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
        calls = (guarded.ainvoke({"n": n}) for n in range(4))
        return list(await asyncio.wait_for(asyncio.gather(*calls), 20))

    results = asyncio.run(main())

    assert sorted(results) == ["P-1", "P-2", "P-3", "P-4"]
    assert ledger.count("fetch") == 4


def test_a_caller_timing_out_under_a_sync_guard_leaves_the_body_to_finish(
    ledger: Ledger,
) -> None:
    """The caller's timeout ends its wait at once; the async body, on a loop that lives
    on, finishes and its outcome is recorded: the retry replays it, one charge."""

    async def charge(customer: str) -> str:
        """Charge a card."""
        ledger.append("charge", customer)
        await asyncio.sleep(1.0)
        return "ch_1"

    guarded = guard_tool(
        StructuredTool.from_function(coroutine=charge), Guard(MemoryStore()), scope="s"
    )

    async def main() -> tuple[float, Any]:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(guarded.ainvoke({"customer": "C1"}), 0.05)
        waited = time.monotonic() - started
        await asyncio.sleep(1.5)  # the loop lives on; the body finishes
        return waited, await guarded.ainvoke({"customer": "C1"})

    waited, again = asyncio.run(main())

    assert waited < 0.8  # not the body's 1 s
    assert again == "ch_1"
    assert ledger.count("charge") == 1


def _own_loop(call: Any) -> None:
    """Run ``call()`` (a coroutine) with a timeout of 0.2 s on a loop of its own, then
    close that loop as a caller that does not use asyncio.run may: nothing cancels or
    finishes what is still running on it."""
    loop = asyncio.new_event_loop()

    async def caller() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call(), 0.2)

    loop.run_until_complete(caller())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        loop.close()


def _status_within(guard: Guard, request_id: str, seconds: float) -> Status | None:
    deadline = time.monotonic() + seconds
    while True:
        receipt = guard.get(request_id)
        status = None if receipt is None else receipt.status
        if status not in (None, Status.PENDING) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_a_loop_closed_under_an_async_body_leaves_it_in_doubt(
    tmp_path: Path, ledger: Ledger
) -> None:
    """A sync Guard's async body on a caller's loop that is closed (not by asyncio.run)
    while the body waits: a closed loop never finishes it, so the guard's thread stops
    waiting and records the call in doubt (it may have charged); the retry raises
    OutcomeUnknownError and charges nothing."""

    async def charge(customer: str) -> str:
        """Charge a card."""
        ledger.append("charge", customer)
        await asyncio.sleep(5)
        return "ch_1"

    guard = Guard(tmp_path / "g.db")
    guarded = guard_tool(StructuredTool.from_function(coroutine=charge), guard, scope="s")
    _own_loop(lambda: guarded.ainvoke({"customer": "C1"}))
    request_id = derive_request_id("s", "charge", {"customer": "C1"})

    assert _status_within(guard, request_id, 10) is Status.IN_DOUBT
    with pytest.raises(OutcomeUnknownError):
        asyncio.run(guarded.ainvoke({"customer": "C1"}))
    assert ledger.count("charge") == 1
    guard.close()


def test_a_loop_closed_before_the_claim_was_won_releases_it(tmp_path: Path, ledger: Ledger) -> None:
    """The caller's loop is closed while the guard's thread still waits for the store
    (another writer holds SQLite's lock): the body was never handed to the loop, so
    nothing ran; the claim is released, not stored as a failure, and the retry charges
    once."""

    async def charge(customer: str) -> str:
        """Charge a card."""
        return f"ch_{ledger.append('charge', customer)}"

    path = tmp_path / "g.db"
    guard = Guard(path)
    guarded = guard_tool(StructuredTool.from_function(coroutine=charge), guard, scope="s")
    guard.get("warm-up")  # the store is open before the lock is taken
    lock = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN IMMEDIATE")
    release = threading.Timer(3.0, lambda: lock.execute("COMMIT"))  # long after the close
    release.start()
    try:
        _own_loop(lambda: guarded.ainvoke({"customer": "C1"}))
    finally:
        release.join()
        lock.close()
    request_id = derive_request_id("s", "charge", {"customer": "C1"})

    assert _status_within(guard, request_id, 10) is Status.RELEASED
    assert ledger.count("charge") == 0
    assert asyncio.run(guarded.ainvoke({"customer": "C1"})) == "ch_1"
    assert ledger.count("charge") == 1
    guard.close()


class Receipt(BaseModel):
    """A payment provider's answer, with its raw body: ``bytes`` that are not UTF-8 cannot
    be dumped to JSON."""

    charge_id: str
    raw: bytes


def unstorable_tool(ledger: Ledger, shape: str, body: str) -> BaseTool:
    """``charge``: one ledger row, then a result whose conversion to JSON fails."""

    def result() -> Any:
        row = ledger.append("charge", "C1")
        receipt = Receipt(charge_id=f"ch_{row}", raw=b"\xff\xfe")
        if shape == "content_and_artifact":
            return f"charged ch_{row}", receipt
        if shape == "tool_message":
            return ToolMessage(f"charged ch_{row}", artifact=receipt, tool_call_id="x")
        return receipt

    def charge(customer: str) -> Any:
        """Charge a card."""
        return result()

    async def acharge(customer: str) -> Any:
        """Charge a card."""
        await asyncio.sleep(0)
        return result()

    response_format = "content_and_artifact" if shape == "content_and_artifact" else "content"
    if body == "async":
        return StructuredTool.from_function(
            coroutine=acharge, name="charge", response_format=response_format
        )
    return StructuredTool.from_function(charge, response_format=response_format)


@pytest.mark.parametrize("shape", ["value", "content_and_artifact", "tool_message"])
@pytest.mark.parametrize(
    ("body", "guard_kind", "entry"),
    [
        ("sync", Guard, "invoke"),
        ("sync", Guard, "ainvoke"),
        ("async", Guard, "ainvoke"),
        ("sync", AsyncGuard, "ainvoke"),
        ("async", AsyncGuard, "ainvoke"),
    ],
)
def test_result_that_cannot_be_stored_is_never_recorded_as_failed(
    tmp_path: Path, ledger: Ledger, shape: str, body: str, guard_kind: type, entry: str
) -> None:
    """The tool ran and returned; dumping its result failed. The record is SUCCEEDED
    without a result (never FAILED, which an operator may re-run), the call and its retry
    raise ResultNotSerializableError, and the card is charged once."""
    guarded = guard_tool(unstorable_tool(ledger, shape, body), guard_kind(tmp_path / "g.db"))
    tool_call = call({"customer": "C1"}, "c1", "charge")

    async def ainvoke() -> Any:
        return await guarded.ainvoke(tool_call, THREAD)

    for _ in range(2):
        with pytest.raises(ResultNotSerializableError, match="ran, but its result"):
            guarded.invoke(tool_call, THREAD) if entry == "invoke" else asyncio.run(ainvoke())

    assert ledger.count("charge") == 1
    reader = Guard(tmp_path / "g.db")
    [record] = [reader.get(e.subject) for e in reader.audit_trail() if e.kind.value == "claimed"]
    assert record is not None
    assert record.status is Status.SUCCEEDED
    assert record.error is not None
    assert record.error.type == "safeagent.ResultNotSerializable"
    reader.close()


@pytest.mark.parametrize("retry", ["invoke", "ainvoke"])
def test_cancelled_async_body_under_a_sync_guard_is_in_doubt(
    tmp_path: Path, ledger: Ledger, retry: str
) -> None:
    """An async tool body run from a sync Guard, cut off when the caller times out and
    its event loop shuts down, may have sent its request: the record is IN_DOUBT and the
    retry raises OutcomeUnknownError without charging again."""

    @tool
    async def charge_card(customer: str, amount_cents: int) -> dict[str, Any]:
        """Charge a card."""
        ledger.append("charge", customer)  # the request went out
        await asyncio.sleep(5)  # waiting for the provider's answer
        return {"ok": True}

    guard = Guard(tmp_path / "g.db")
    guarded = guard_tool(charge_card, guard, scope="order-42")
    args = {"customer": "C1", "amount_cents": 500}

    async def caller_times_out() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(guarded.ainvoke(args), 0.3)

    asyncio.run(caller_times_out())  # the loop's shutdown cancels the tool body

    request_id = derive_request_id("order-42", "charge_card", args)
    receipt = guard.get(request_id)
    assert receipt is not None
    assert receipt.status is Status.IN_DOUBT
    assert receipt.error is not None
    assert receipt.error.type == "concurrent.futures._base.CancelledError"
    guard.close()

    again = guard_tool(charge_card, Guard(tmp_path / "g.db"), scope="order-42")
    with pytest.raises(OutcomeUnknownError, match="in doubt"):
        again.invoke(args) if retry == "invoke" else asyncio.run(again.ainvoke(args))
    assert ledger.count("charge") == 1


class AsyncOnlyRefund(BaseTool):
    """A ``BaseTool`` subclass with an async body only: its ``_run`` refuses."""

    name: str = "refund"
    description: str = "Refund an order."
    ledger: Any = None

    def _run(self, order_id: str, amount_cents: int) -> str:
        """No sync body."""
        raise NotImplementedError("refund is async-only: use ainvoke")

    async def _arun(self, order_id: str, amount_cents: int) -> str:
        await asyncio.sleep(0)
        return f"RF-{self.ledger.append('refund', order_id)}"


@pytest.mark.parametrize("kind", ["@tool", "subclass"])
def test_sync_invoke_of_an_async_only_tool_leaves_no_outcome(ledger: Ledger, kind: str) -> None:
    """invoke() on a tool without a sync body runs nothing and stores no outcome: it raises
    ConfigurationError, the claim is released, the later ainvoke runs the tool once, and a
    sync invoke after that replays the stored result."""

    @tool
    async def refund(order_id: str, amount_cents: int) -> str:
        """Refund an order."""
        await asyncio.sleep(0)
        return f"RF-{ledger.append('refund', order_id)}"

    inner = refund if kind == "@tool" else AsyncOnlyRefund(ledger=ledger)
    guard = Guard(MemoryStore())
    guarded = guard_tool(inner, guard, scope="o1")
    args = {"order_id": "o1", "amount_cents": 5}

    with pytest.raises(ConfigurationError, match="no sync body: call it with ainvoke"):
        guarded.invoke(args)
    receipt = guard.get(derive_request_id("o1", "refund", args))
    assert receipt is not None
    assert receipt.status is Status.RELEASED

    assert asyncio.run(guarded.ainvoke(args)) == "RF-1"
    assert guarded.invoke(args) == "RF-1"
    assert asyncio.run(guarded.ainvoke(args)) == "RF-1"
    assert ledger.count("refund") == 1


class StatusTool(BaseTool):
    """A ``BaseTool`` subclass whose ``_run`` is annotated to return a ``Command``."""

    name: str = "set_status"
    description: str = "Set the order's status."

    def _run(self, status: str) -> Command:
        return Command(update={"status": status})


def test_tool_annotated_to_return_a_command_is_refused_when_wrapped() -> None:
    """A tool whose return annotation names a LangGraph Command (alone, generic, in a union
    or a list; a ``@tool`` or a subclass) cannot be guarded: ConfigurationError."""

    def plain_command(status: str) -> Command:
        """Set the status."""
        return Command(update={"status": status})

    def generic_command(status: str) -> Command[str] | None:
        """Set the status."""
        return None

    async def command_list(status: str) -> list[Command | ToolMessage]:
        """Set the status."""
        return []

    tools = [
        StructuredTool.from_function(plain_command),
        StructuredTool.from_function(generic_command),
        StructuredTool.from_function(coroutine=command_list),
        StatusTool(),
    ]
    for inner in tools:
        with pytest.raises(ConfigurationError, match="returns a LangGraph Command"):
            guard_tool(inner, Guard(MemoryStore()), scope="s")


class OrderState(MessagesState):
    status: str


@pytest.mark.parametrize("shape", ["command", "list"])
def test_command_returned_anyway_is_refused_loudly_and_not_rerun(
    ledger: Ledger, shape: str
) -> None:
    """A Command returned by a tool whose annotation does not say so is not mangled into a
    stored dict: the tool ran, so the record is SUCCEEDED without a result; the graph raises
    ResultNotSerializableError naming the Command on that run and on every retry, and the
    tool does not run again."""

    @tool
    def set_status(status: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Any:
        """Set the order's status."""
        ledger.append("status", status)
        command = Command(
            update={
                "messages": [ToolMessage(f"status={status}", tool_call_id=tool_call_id)],
                "status": status,
            }
        )
        return command if shape == "command" else [command]

    guard = Guard(MemoryStore())
    builder = StateGraph(OrderState)
    builder.add_node("tools", ToolNode([guard_tool(set_status, guard)]))
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    graph = builder.compile()
    message = AIMessage("", tool_calls=[call({"status": "paid"}, "s1", "set_status")])

    for _ in range(2):
        with pytest.raises(ResultNotSerializableError, match="returned a LangGraph Command"):
            graph.invoke({"messages": [message]}, THREAD)

    assert ledger.count("status") == 1
    receipt = guard.get(derive_request_id("conv-1", "set_status", {"status": "paid"}))
    assert receipt is not None
    assert receipt.status is Status.SUCCEEDED
    assert receipt.result is None


def test_async_guard_refuses_sync_invoke(ledger: Ledger) -> None:
    """A tool guarded by an AsyncGuard refuses invoke and points to ainvoke."""
    guarded = guard_tool(ticket_tool(ledger), AsyncGuard(MemoryStore()), scope="s")

    with pytest.raises(ConfigurationError, match="ainvoke"):
        guarded.invoke(TICKET)
    assert ledger.count("ticket") == 0


async def _gather(guarded: BaseTool, args: dict[str, Any], n: int) -> list[Any]:
    return list(await asyncio.gather(*(guarded.ainvoke(args) for _ in range(n))))


def test_example_runs_offline(tmp_path: Path) -> None:
    """examples/langgraph_tools.py runs offline and exits 0."""
    result = run_example("langgraph_tools.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: ok" in result.stdout


def test_generator_tools_are_refused_when_wrapped(ledger: Ledger) -> None:
    """A tool over a generator or async generator function (a ``func``, a ``coroutine``, or
    a subclass's ``_run``/``_arun``) is refused: calling it runs none of its body, so the
    guard would record a call whose side effect never happened."""

    def charge(customer: str) -> Any:
        """Charge a card."""
        ledger.append(customer)
        yield "charged"

    async def acharge(customer: str) -> Any:
        """Charge a card."""
        ledger.append(customer)
        yield "charged"

    class GenTool(BaseTool):
        name: str = "charge"
        description: str = "Charge a card."

        def _run(self, customer: str) -> Any:
            ledger.append(customer)
            yield "charged"

    class AsyncGenTool(BaseTool):
        name: str = "charge"
        description: str = "Charge a card."

        def _run(self, customer: str) -> str:
            return "charged"

        async def _arun(self, customer: str) -> Any:
            ledger.append(customer)
            yield "charged"

    tools = [
        StructuredTool.from_function(charge),
        StructuredTool.from_function(coroutine=acharge),
        GenTool(),
        AsyncGenTool(),
    ]
    for inner in tools:
        for guard in (Guard(MemoryStore()), AsyncGuard(MemoryStore())):
            with pytest.raises(ConfigurationError, match="generator function"):
                guard_tool(inner, guard, scope="s")
    assert ledger.count() == 0


@pytest.mark.parametrize("kind", ["invoke", "ainvoke", "AsyncGuard", "outcome_unknown"])
def test_an_interrupt_for_approval_releases_the_claim_and_the_resume_charges_once(
    tmp_path: Path, ledger: Ledger, kind: str
) -> None:
    """LangGraph's human-in-the-loop pattern: the tool calls ``interrupt()`` before its side
    effect, the graph pauses, and ``Command(resume=...)`` runs the tool again from its
    start. ``GraphInterrupt`` used to be recorded as the tool's failure: the resume got the
    replayed failure and the approved charge never ran."""
    from langgraph.types import interrupt

    @tool
    def charge_card(customer: str, amount_cents: int) -> str:
        """Charge a card once an operator approves."""
        if not interrupt({"question": f"charge {customer} {amount_cents}?"}):
            return "declined"
        row = ledger.append("charge", f"{customer}|{amount_cents}")
        return f"charged #{row}"

    path = tmp_path / "g.db"
    guard: Guard | AsyncGuard = (
        AsyncGuard(path)
        if kind == "AsyncGuard"
        # A guard reading every exception as "outcome unknown" still releases the claim:
        # the interrupt says the work did not start (it was left in doubt).
        else Guard(path, outcome_unknown=[Exception])
        if kind == "outcome_unknown"
        else Guard(path)
    )
    graph_builder = StateGraph(MessagesState)
    graph_builder.add_node("tools", ToolNode([guard_tool(charge_card, guard)]))
    graph_builder.add_edge(START, "tools")
    graph_builder.add_edge("tools", END)
    graph = graph_builder.compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "conv-1"}}
    asked = AIMessage(
        "",
        tool_calls=[
            {"name": "charge_card", "args": {"customer": "C1", "amount_cents": 500}, "id": "c1"}
        ],
    )

    def run(value: Any) -> Any:
        if kind == "invoke":
            return graph.invoke(value, config)
        return asyncio.run(graph.ainvoke(value, config))

    paused = run({"messages": [asked]})
    assert [i.value for i in paused["__interrupt__"]] == [{"question": "charge C1 500?"}]
    assert ledger.count("charge") == 0
    request_id = derive_request_id("conv-1", "charge_card", {"customer": "C1", "amount_cents": 500})
    with Guard(path) as reader:
        receipt = reader.get(request_id)
        assert receipt is not None
        assert receipt.status is Status.RELEASED  # not a failure to replay
    resumed = run(Command(resume=True))
    assert resumed["messages"][-1].content == "charged #1"
    assert ledger.count("charge") == 1
    with Guard(path) as reader:
        receipt = reader.get(request_id)
        assert receipt is not None
        assert receipt.status is Status.SUCCEEDED


def test_a_subgraphs_command_for_the_parent_after_the_work_is_not_run_again(
    tmp_path: Path, ledger: Ledger
) -> None:
    """A tool running a subgraph whose node charges and then hands control to the parent
    graph (``Command(graph=Command.PARENT)``, raised through the tool as ``ParentCommand``):
    the work is done, so the claim must not be released. Releasing it (as for
    ``interrupt()``) let the same call re-emitted in the thread charge again."""
    from typing_extensions import TypedDict

    class Sub(TypedDict):
        order: str

    def pay(state: Sub) -> Command[Any]:
        ledger.append("charge", state["order"])
        return Command(graph=Command.PARENT, update={})

    sub_builder = StateGraph(Sub)
    sub_builder.add_node("pay", pay)
    sub_builder.add_edge(START, "pay")
    sub = sub_builder.compile()

    @tool
    def checkout(order: str) -> str:
        """Run the checkout agent for an order."""
        sub.invoke({"order": order})
        return "done"

    graph_builder = StateGraph(MessagesState)
    graph_builder.add_node("tools", ToolNode([guard_tool(checkout, Guard(tmp_path / "g.db"))]))
    graph_builder.add_edge(START, "tools")
    graph_builder.add_edge("tools", END)
    graph = graph_builder.compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t1"}}
    for call_id in ("c1", "c2"):  # the model re-emits the same call
        asked = AIMessage(
            "", tool_calls=[{"name": "checkout", "args": {"order": "o1"}, "id": call_id}]
        )
        with contextlib.suppress(Exception):
            graph.invoke({"messages": [asked]}, config)
    assert ledger.count("charge") == 1


class Shipment(BaseModel):
    carrier_id: int


def test_a_validation_error_the_body_raised_replays_as_one(ledger: Ledger) -> None:
    """A pydantic ``ValidationError`` raised inside the tool body (its parsing of an API
    reply) is one a plain ``ToolNode`` shows the model as an error message; its replay is
    a ``ValidationError`` too (rebuilt with the stored message, the guard's replay as its
    cause), so the graph's retry gets an error message again, not a stopped graph."""

    @tool
    def book_courier(order_id: str) -> str:
        """Book a courier."""
        ledger.append("courier", order_id)
        Shipment.model_validate({"carrier_id": "not a number"})  # the API's reply
        return "booked"

    builder = StateGraph(MessagesState)
    builder.add_node("tools", ToolNode([guard_tool(book_courier, Guard(MemoryStore()))]))
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    graph = builder.compile()
    message = AIMessage("", tool_calls=[call({"order_id": "o-1"}, "c1", "book_courier")])

    replies = [graph.invoke({"messages": [message]}, THREAD)["messages"][-1] for _ in range(2)]

    assert ledger.count("courier") == 1
    assert [m.status for m in replies] == ["error", "error"]
    assert "carrier_id: Input should be a valid integer" in replies[0].content
    assert "replayed: 1 validation error for Shipment" in replies[1].content
    assert "Input should be a valid integer" in replies[1].content  # the stored message

    guarded = guard_tool(book_courier, Guard(MemoryStore()), scope="conv-2")
    with pytest.raises(ValidationError):
        guarded.invoke({"order_id": "o-2"})
    with pytest.raises(ValidationError) as replay:
        guarded.invoke({"order_id": "o-2"})
    assert isinstance(replay.value.__cause__, ReplayedFailureError)
    assert replay.value.__cause__.error_type.endswith("ValidationError")
    assert ledger.count("courier") == 2


class _StateWithAClient(MessagesState):
    client: Any  # a client kept in the graph's state: it holds a lock, and cannot be copied


def test_a_tool_with_state_and_runtime_keys_a_minted_argument_out(ledger: Ledger) -> None:
    """A ToolNode tool taking ``InjectedState`` (holding a lock) and ``ToolRuntime`` beside
    an argument a minting factory fills: the same call re-emitted runs once (a first
    version deep-copied the input to ask pydantic what was sent, failed on the lock and on
    the runtime, and keyed the minted value: three runs)."""

    @tool
    def pay(
        order_id: str,
        state: Annotated[dict[str, Any], InjectedState],
        runtime: ToolRuntime,
        attempt: Annotated[str, Field(default_factory=lambda: uuid.uuid4().hex)],
    ) -> str:
        """Pay an order."""
        return f"P-{ledger.append('pay', attempt)}"

    builder = StateGraph(_StateWithAClient)
    builder.add_node("tools", ToolNode([guard_tool(pay, Guard(MemoryStore()), scope="conv-1")]))
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    graph = builder.compile()
    for i in range(3):
        call = {"name": "pay", "args": {"order_id": "o"}, "id": f"c{i}"}
        graph.invoke({"messages": [AIMessage("", tool_calls=[call])], "client": threading.Lock()})

    assert ledger.count() == 1
