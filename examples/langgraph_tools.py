"""A LangGraph agent files one ticket, however its tool calls are repeated.

Run it from any directory, offline (``pip install -e '.[langchain]'``)::

    python examples/langgraph_tools.py

The model is LangChain's own ``GenericFakeChatModel``, scripted with tool calls, so no
network and no API key are needed. Two scenes, each played with the plain tool and with the
tool wrapped by ``safeagent.integrations.langchain.guard_tool``:

1. **Parallel duplicates.** The model emits one message with three ``create_ticket`` calls
   with the same arguments (two with the keys in another order), which the agent that
   ``langchain.agents.create_agent`` builds runs concurrently. Plain: three tickets.
   Guarded: one ticket, and three tool messages carrying its id, each under its own
   ``tool_call_id``.
2. **Resume after a failure.** The model asks for ``create_ticket`` and ``page_oncall`` in
   one message; the pager is down, so the tools node fails *after* the ticket was filed.
   The graph is resumed from its checkpoint, and the tools node runs again. Plain: a
   second ticket. Guarded: the stored ticket is returned; one ticket.

Request ids are derived from the conversation's ``thread_id`` (the scope), the tool name and
the arguments. The guard keeps its records in the default SQLite file (``$SAFEAGENT_DB`` if
set, else ``safeagent.db`` in the working directory); each run uses fresh thread ids, so the
demo works on every run. Exit code 0 when the guarded runs filed exactly one ticket each.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from safeagent import Guard
from safeagent.integrations.langchain import guard_tool

TICKETS: list[str] = []  # the ticketing system: one entry per ticket filed
_LOCK = threading.Lock()


@tool
def create_ticket(order_id: str, title: str, priority: str = "normal") -> dict[str, Any]:
    """Open a support ticket for an order."""
    time.sleep(0.1)  # a slow ticketing API: the parallel calls overlap
    with _LOCK:
        TICKETS.append(f"{order_id}: {title} ({priority})")
        return {"ticket_id": f"T-{len(TICKETS)}", "priority": priority}


PAGER_UP = {"up": False}


@tool
def page_oncall(team: str) -> str:
    """Page the on-call engineer of a team."""
    if not PAGER_UP["up"]:
        PAGER_UP["up"] = True  # it is back for the next try
        raise ConnectionError("pager gateway unreachable")
    return f"paged {team}"


def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "args": args, "id": f"call_{uuid.uuid4().hex[:8]}"}


class ScriptedModel(GenericFakeChatModel):
    """LangChain's fake chat model, answering with its scripted messages whatever tools
    an agent binds to it (a real model sends the tools to its API)."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self


def model(messages: list[AIMessage], tools: list[BaseTool]) -> Any:
    """A scripted chat model with the tools bound, for a hand-built graph."""
    fake = GenericFakeChatModel(messages=iter(messages))
    return fake.bind(tools=[convert_to_openai_tool(t) for t in tools])


ARGS = {"order_id": "ORD-1", "title": "Printer on fire", "priority": "high"}


def parallel_duplicates(ticket_tool: BaseTool) -> tuple[int, list[str]]:
    duplicated = AIMessage(
        content="",
        tool_calls=[
            call("create_ticket", ARGS),
            call("create_ticket", dict(reversed(ARGS.items()))),
            call("create_ticket", {"title": "Printer on fire", **ARGS}),
        ],
    )
    tools = [ticket_tool]
    agent = create_agent(ScriptedModel(messages=iter([duplicated, AIMessage("Filed.")])), tools)
    before = len(TICKETS)
    thread = {"configurable": {"thread_id": f"conv-{uuid.uuid4().hex[:8]}"}}
    result = agent.invoke({"messages": [HumanMessage("The printer is on fire!")]}, thread)
    replies = [str(m.content) for m in result["messages"] if isinstance(m, ToolMessage)]
    return len(TICKETS) - before, replies


def resume_after_failure(ticket_tool: BaseTool) -> tuple[int, str]:
    PAGER_UP["up"] = False
    tools = [ticket_tool, page_oncall]
    chat = model(
        [
            AIMessage(
                "", tool_calls=[call("create_ticket", ARGS), call("page_oncall", {"team": "ops"})]
            ),
            AIMessage("Filed and paged."),
        ],
        tools,
    )
    builder = StateGraph(MessagesState)
    builder.add_node("agent", RunnableLambda(lambda s: {"messages": [chat.invoke(s["messages"])]}))
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    graph = builder.compile(checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": f"conv-{uuid.uuid4().hex[:8]}"}}
    before = len(TICKETS)
    try:
        graph.invoke({"messages": [HumanMessage("Printer on fire, page ops")]}, thread)
    except ConnectionError as exc:
        print(f"   (the first run failed after the ticket was filed: {exc})")
    result = graph.invoke(None, thread)  # resume from the checkpoint before the tools node
    reply = next(
        str(m.content)
        for m in result["messages"]
        if isinstance(m, ToolMessage) and m.name == "create_ticket"
    )
    return len(TICKETS) - before, reply


def main() -> int:
    guard = Guard()  # $SAFEAGENT_DATABASE_URL, else $SAFEAGENT_DB, else ./safeagent.db
    guarded = guard_tool(create_ticket, guard)
    ok = True
    print("1. One AI message, three equivalent create_ticket calls, run by a create_agent agent:")
    for label, ticket_tool, expected in (("plain", create_ticket, 3), ("guarded", guarded, 1)):
        filed, replies = parallel_duplicates(ticket_tool)
        print(f"   {label:8} tickets filed: {filed}   tool messages: {replies}")
        ok &= filed == expected if label == "guarded" else filed > 1
        if label == "guarded":
            ok &= len(set(replies)) == 1 and len(replies) == 3
    print("2. The tools node fails after create_ticket ran; resumed from the checkpoint:")
    for label, ticket_tool in (("plain", create_ticket), ("guarded", guarded)):
        filed, reply = resume_after_failure(ticket_tool)
        print(f"   {label:8} tickets filed: {filed}   ticket returned: {reply}")
        ok &= filed == 1 if label == "guarded" else filed == 2
    guard.close()
    print(f"RESULT: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
