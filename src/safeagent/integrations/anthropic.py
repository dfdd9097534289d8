"""Anthropic: run Messages API ``tool_use`` blocks through a guard.

Install with ``pip install -e '.[anthropic]'``. The functions read the ``anthropic``
package's own objects (``Message``, ``ToolUseBlock``) or the same shapes as plain dicts,
and return the ``tool_result`` blocks you send back in the next user turn::

    from safeagent import Guard
    from safeagent.integrations.anthropic import run_tool_uses

    guard = Guard("agent.db")
    message = client.messages.create(...)
    messages.append({"role": "assistant", "content": message.content})
    results = run_tool_uses(message, {"charge_card": charge_card}, guard=guard, scope=order_id)
    messages.append({"role": "user", "content": results})

Every call's request id is derived from ``(scope, tool name, input)`` (docs/design.md section 6;
see :mod:`safeagent.integrations._common` for the rules): a model that re-emits
``charge_card`` with the same input after a retry replays the stored result under its new
``tool_use`` id, and equivalent blocks in one message run once. Blocks run one after
another, in the model's order. What the model is shown:

- a result: a ``str`` as it is, anything else as JSON;
- the tool's exception: ``"Error: <Type>: <message>"`` with ``is_error: True`` (the same
  on every replay);
- an unknown tool or input that does not fit the function: ``"Error: UnknownTool: ..."``
  or ``"Error: InvalidArguments: ..."`` with ``is_error: True``; nothing ran and nothing
  was recorded.

SafeAgent's own errors (``InProgressError``, ``OutcomeUnknownError``, ``ConflictError``,
``StoreError``, ...) propagate, as does a tool exception that left the record in doubt.

.. versionadded:: 0.3
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from safeagent import AsyncGuard, Guard
from safeagent.errors import TransportIdWarning
from safeagent.integrations._common import (
    REPLAY_MARKER,
    Outcome,
    ToolCall,
    arun_calls,
    read,
    run_calls,
)
from safeagent.integrations._toolspec import (
    Exclude,
    KeyMode,
    ToolFunction,
    check_guard,
    check_tools,
    settings,
)

if TYPE_CHECKING:
    from anthropic.types import Message, ToolResultBlockParam

__all__ = [
    "REPLAY_MARKER",
    "TransportIdWarning",
    "arun_tool_uses",
    "run_tool_uses",
]


def _blocks(message: Any) -> Iterable[Any]:
    if isinstance(message, (list, tuple)):
        return message
    content = read(message, "content")
    if isinstance(content, (list, tuple)):
        return content
    if isinstance(content, str):  # a text-only message: no tool use
        return ()
    raise TypeError(
        "expected a Message (with .content) or a list of its content blocks, "
        f"got {type(message).__name__}"
    )


def _tool_uses(message: Any, tools: Mapping[str, ToolFunction]) -> list[ToolCall]:
    calls = []
    for block in _blocks(message):
        if read(block, "type") != "tool_use":
            continue
        name = str(read(block, "name") or "")
        toolset = read(block, "toolset_name")
        if toolset and f"{toolset}.{name}" in tools:
            name = f"{toolset}.{name}"
        calls.append(
            ToolCall(
                call_id=str(read(block, "id") or ""),
                name=name,
                arguments=read(block, "input"),
                extra={"toolset_name": toolset},
            )
        )
    return calls


def _results(
    done: list[tuple[ToolCall, Outcome]], replay_marker: str | None
) -> list[ToolResultBlockParam]:
    results: list[ToolResultBlockParam] = []
    for call, outcome in done:
        result: ToolResultBlockParam = {
            "type": "tool_result",
            "tool_use_id": call.call_id,
            "content": outcome.content(replay_marker),
        }
        if outcome.is_error:
            result["is_error"] = True
        toolset = call.extra.get("toolset_name")
        if toolset:
            result["toolset_name"] = toolset
        results.append(result)
    return results


def run_tool_uses(
    message: Message | Iterable[Any],
    tools: Mapping[str, ToolFunction],
    *,
    guard: Guard,
    scope: str,
    exclude: Exclude = (),
    key: KeyMode = "derived",
    namespace: str | None = None,
    replay_marker: str | None = None,
) -> list[ToolResultBlockParam]:
    """Run the ``tool_use`` blocks of an assistant message through ``guard``.

    Args:
        message: a ``Message`` (its ``.content`` is read) or a list of content blocks
            (``ToolUseBlock`` objects or dicts ``{"type": "tool_use", "id", "name",
            "input": {...}}``). Other blocks (text, thinking, server tools) are skipped.
            A toolset member (``toolset_name`` set) runs the tool named
            ``"<toolset>.<name>"`` when ``tools`` has one, else ``name``.
        tools: tool name -> function, called with the block's ``input`` as keyword
            arguments; it returns a JSON value, a ``str`` or a pydantic model.
        guard: a sync :class:`~safeagent.Guard` (use :func:`arun_tool_uses` with an
            :class:`~safeagent.AsyncGuard` in async code).
        scope: the business key the calls belong to (a run, conversation or order id);
            part of every derived request id, so the same purchase in two orders stays two.
        exclude: volatile argument names left out of request ids and fingerprints: one
            collection for every tool, or ``{tool name: names}``.
        key: ``"derived"`` (default) or ``"tool_call_id"``: key on the ``tool_use`` id,
            which a re-emitted call does not keep; emits :class:`TransportIdWarning`.
        namespace: the guard namespace (tenant) of the records; ``None``: the guard's.
        replay_marker: prefix for replayed content (see :data:`REPLAY_MARKER`); ``None``
            (default): a replay shows exactly the first call's content.

    Returns:
        One ``{"type": "tool_result", "tool_use_id": ..., "content": str}`` block per
        ``tool_use`` block, in order, each with its own ``tool_use_id``; failures carry
        ``"is_error": True``, toolset members their ``toolset_name``.

    Raises:
        TypeError: ``message`` is neither a message nor a list of blocks.
        ConfigurationError: a bad option, an ``AsyncGuard``, an ``async`` tool, a tool
            already guarded (a function decorated with ``guard.guarded``), a generator or
            async generator function, or a tool name that cannot be an action (over 255
            characters, NUL, ...).
        InvalidInputError: a scope or ``namespace`` that is empty, too long, or not valid
            UTF-8 text without NUL.
        GuardError: SafeAgent's own errors (in progress, in doubt, conflict, store).
        Exception: a tool's exception that left the record in doubt.
    """
    options = settings(
        scope=scope,
        exclude=exclude,
        key=key,
        namespace=namespace,
        replay_marker=replay_marker,
        caller="run_tool_uses",
    )
    check_guard(guard, Guard, "arun_tool_uses")
    specs = check_tools(tools, options, allow_async=False, twin="arun_tool_uses")
    done = run_calls(_tool_uses(message, tools), specs, guard, options)
    return _results(done, options.replay_marker)


async def arun_tool_uses(
    message: Message | Iterable[Any],
    tools: Mapping[str, ToolFunction],
    *,
    guard: AsyncGuard,
    scope: str,
    exclude: Exclude = (),
    key: KeyMode = "derived",
    namespace: str | None = None,
    replay_marker: str | None = None,
) -> list[ToolResultBlockParam]:
    """The ``async`` twin of :func:`run_tool_uses`, with an :class:`~safeagent.AsyncGuard`:
    ``async def`` tools are awaited, plain ones run in a worker thread. Arguments, return
    value and errors as :func:`run_tool_uses`."""
    options = settings(
        scope=scope,
        exclude=exclude,
        key=key,
        namespace=namespace,
        replay_marker=replay_marker,
        caller="arun_tool_uses",
    )
    check_guard(guard, AsyncGuard, "run_tool_uses")
    specs = check_tools(tools, options, allow_async=True, twin="arun_tool_uses")
    done = await arun_calls(_tool_uses(message, tools), specs, guard, options)
    return _results(done, options.replay_marker)
