"""OpenAI: run Chat Completions tool calls and Responses API function calls through a guard.

Install with ``pip install -e '.[openai]'``. The functions read the ``openai``
package's own objects (``ChatCompletionMessage``, ``Response``, ``ResponseFunctionToolCall``)
or the same shapes as plain dicts, and return the plain dicts you send back to the model::

    from safeagent import Guard
    from safeagent.integrations.openai import run_tool_calls

    guard = Guard("agent.db")
    message = client.chat.completions.create(...).choices[0].message
    messages.append(message)
    messages += run_tool_calls(message, {"charge_card": charge_card}, guard=guard, scope=order_id)

Every call's request id is derived from ``(scope, tool name, arguments)`` (docs/design.md section
6; see :mod:`safeagent.integrations._common` for the rules): a model that re-emits
``charge_card`` with the same arguments after a retry replays the stored result under its
new tool-call id, and equivalent calls in one message run once. Calls run one after
another, in the model's order. What the model is shown:

- a result: a ``str`` as it is, anything else as JSON;
- the tool's exception: ``"Error: <Type>: <message>"`` (the same text on every replay);
- an unknown tool or arguments that do not fit the function: ``"Error: UnknownTool: ..."``
  or ``"Error: InvalidArguments: ..."``; nothing ran and nothing was recorded.

SafeAgent's own errors (``InProgressError``, ``OutcomeUnknownError``, ``ConflictError``,
``StoreError``, ...) propagate, as does a tool exception that left the record in doubt:
the model is not told a story the guard cannot vouch for.

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
    plain,
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
    from openai.types.chat import ChatCompletionMessage, ChatCompletionToolMessageParam
    from openai.types.responses import Response
    from openai.types.responses.response_input_param import FunctionCallOutput

__all__ = [
    "REPLAY_MARKER",
    "TransportIdWarning",
    "arun_function_calls",
    "arun_tool_calls",
    "run_function_calls",
    "run_tool_calls",
]


# -- Chat Completions ------------------------------------------------------------------------


def _chat_calls(message: Any) -> list[ToolCall]:
    if read(message, "choices") is not None:
        raise TypeError("pass the assistant message (completion.choices[0].message)")
    tool_calls = read(message, "tool_calls") or ()
    if not isinstance(tool_calls, (list, tuple)):
        raise TypeError(
            f"the message's tool_calls is a list of tool calls, got {type(tool_calls).__name__}"
        )
    calls = []
    for tool_call in tool_calls:
        kind = read(tool_call, "type") or "function"
        function = read(tool_call, "function")
        calls.append(
            ToolCall(
                call_id=str(read(tool_call, "id") or ""),
                name=str(read(function, "name") or "") if function is not None else "",
                arguments=read(function, "arguments") if function is not None else None,
                kind=str(kind),
            )
        )
    return calls


def _tool_messages(
    done: list[tuple[ToolCall, Outcome]], replay_marker: str | None
) -> list[ChatCompletionToolMessageParam]:
    messages: list[ChatCompletionToolMessageParam] = []
    for call, outcome in done:
        messages.append(
            {
                "role": "tool",
                "tool_call_id": call.call_id,
                "content": outcome.content(replay_marker),
            }
        )
    return messages


def run_tool_calls(
    message: ChatCompletionMessage | Mapping[str, Any],
    tools: Mapping[str, ToolFunction],
    *,
    guard: Guard,
    scope: str,
    exclude: Exclude = (),
    key: KeyMode = "derived",
    namespace: str | None = None,
    replay_marker: str | None = None,
) -> list[ChatCompletionToolMessageParam]:
    """Run the ``tool_calls`` of a Chat Completions assistant message through ``guard``.

    Args:
        message: the assistant message: ``completion.choices[0].message`` (a
            ``ChatCompletionMessage``) or the same shape as a dict
            (``{"role": "assistant", "tool_calls": [{"id", "type": "function",
            "function": {"name", "arguments": "<JSON text>"}}]}``). No ``tool_calls``: no
            messages.
        tools: tool name -> function, called with the call's arguments as keyword
            arguments; it returns a JSON value, a ``str`` or a pydantic model.
        guard: a sync :class:`~safeagent.Guard` (use :func:`arun_tool_calls` with an
            :class:`~safeagent.AsyncGuard` in async code).
        scope: the business key the calls belong to (a run, conversation or order id);
            part of every derived request id, so the same purchase in two orders stays two.
        exclude: volatile argument names left out of request ids and fingerprints: one
            collection for every tool, or ``{tool name: names}``.
        key: ``"derived"`` (default) or ``"tool_call_id"``: key on the transport id, which
            a re-emitted call does not keep; emits :class:`TransportIdWarning`.
        namespace: the guard namespace (tenant) of the records; ``None``: the guard's.
        replay_marker: prefix for replayed content (see :data:`REPLAY_MARKER`); ``None``
            (default): a replay shows exactly the first call's content.

    Returns:
        One ``{"role": "tool", "tool_call_id": ..., "content": str}`` message per tool call,
        in order, each with its own ``tool_call_id`` (also when several calls are one
        request and only the first ran).

    Raises:
        TypeError: ``message`` is a whole ``ChatCompletion`` (pass its message), or its
            ``tool_calls`` is not a list.
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
        caller="run_tool_calls",
    )
    check_guard(guard, Guard, "arun_tool_calls")
    specs = check_tools(tools, options, allow_async=False, twin="arun_tool_calls")
    done = run_calls(_chat_calls(message), specs, guard, options)
    return _tool_messages(done, options.replay_marker)


async def arun_tool_calls(
    message: ChatCompletionMessage | Mapping[str, Any],
    tools: Mapping[str, ToolFunction],
    *,
    guard: AsyncGuard,
    scope: str,
    exclude: Exclude = (),
    key: KeyMode = "derived",
    namespace: str | None = None,
    replay_marker: str | None = None,
) -> list[ChatCompletionToolMessageParam]:
    """The ``async`` twin of :func:`run_tool_calls`, with an
    :class:`~safeagent.AsyncGuard`: ``async def`` tools are awaited, plain ones run in a
    worker thread. Arguments, return value and errors as :func:`run_tool_calls`."""
    options = settings(
        scope=scope,
        exclude=exclude,
        key=key,
        namespace=namespace,
        replay_marker=replay_marker,
        caller="arun_tool_calls",
    )
    check_guard(guard, AsyncGuard, "run_tool_calls")
    specs = check_tools(tools, options, allow_async=True, twin="arun_tool_calls")
    done = await arun_calls(_chat_calls(message), specs, guard, options)
    return _tool_messages(done, options.replay_marker)


# -- Responses API ---------------------------------------------------------------------------


def _output_items(response: Any) -> Iterable[Any]:
    if isinstance(response, (list, tuple)):
        return response
    output = read(response, "output")
    if isinstance(output, (list, tuple)):
        return output
    raise TypeError(
        "expected a Response (with .output) or a list of its output items, "
        f"got {type(response).__name__}"
    )


def _function_calls(response: Any, tools: Mapping[str, ToolFunction]) -> list[ToolCall]:
    calls = []
    for item in _output_items(response):
        if read(item, "type") != "function_call":
            continue
        name = str(read(item, "name") or "")
        tool_namespace = read(item, "namespace")
        if tool_namespace and f"{tool_namespace}.{name}" in tools:
            name = f"{tool_namespace}.{name}"
        calls.append(
            ToolCall(
                call_id=str(read(item, "call_id") or ""),
                name=name,
                arguments=read(item, "arguments"),
                extra={"caller": plain(read(item, "caller"))},
            )
        )
    return calls


def _outputs(
    done: list[tuple[ToolCall, Outcome]], replay_marker: str | None
) -> list[FunctionCallOutput]:
    outputs: list[FunctionCallOutput] = []
    for call, outcome in done:
        output: FunctionCallOutput = {
            "type": "function_call_output",
            "call_id": call.call_id,
            "output": outcome.content(replay_marker),
        }
        caller = call.extra.get("caller")
        if caller is not None:
            output["caller"] = caller
        outputs.append(output)
    return outputs


def run_function_calls(
    response: Response | Iterable[Any],
    tools: Mapping[str, ToolFunction],
    *,
    guard: Guard,
    scope: str,
    exclude: Exclude = (),
    key: KeyMode = "derived",
    namespace: str | None = None,
    replay_marker: str | None = None,
) -> list[FunctionCallOutput]:
    """Run the ``function_call`` output items of a Responses API response through ``guard``.

    Args:
        response: a ``Response`` (its ``.output`` is read) or a list of output items
            (``ResponseFunctionToolCall`` objects or dicts ``{"type": "function_call",
            "call_id", "name", "arguments": "<JSON text>"}``). Other items (messages,
            reasoning, hosted tools) are skipped. A call with a ``namespace`` runs the tool
            named ``"<namespace>.<name>"`` when ``tools`` has one, else ``name``.
        tools, guard, scope, exclude, key, namespace, replay_marker: as for
            :func:`run_tool_calls`.

    Returns:
        One ``{"type": "function_call_output", "call_id": ..., "output": str}`` item per
        function call, in order, each with its own ``call_id`` (and the call's ``caller``
        when it has one). Send them as the next request's ``input``, after the output items.

    Raises:
        TypeError: ``response`` is neither a response nor a list of items.
        ConfigurationError, InvalidInputError, GuardError, Exception: as
            :func:`run_tool_calls`.
    """
    options = settings(
        scope=scope,
        exclude=exclude,
        key=key,
        namespace=namespace,
        replay_marker=replay_marker,
        caller="run_function_calls",
    )
    check_guard(guard, Guard, "arun_function_calls")
    specs = check_tools(tools, options, allow_async=False, twin="arun_function_calls")
    done = run_calls(_function_calls(response, tools), specs, guard, options)
    return _outputs(done, options.replay_marker)


async def arun_function_calls(
    response: Response | Iterable[Any],
    tools: Mapping[str, ToolFunction],
    *,
    guard: AsyncGuard,
    scope: str,
    exclude: Exclude = (),
    key: KeyMode = "derived",
    namespace: str | None = None,
    replay_marker: str | None = None,
) -> list[FunctionCallOutput]:
    """The ``async`` twin of :func:`run_function_calls`, with an
    :class:`~safeagent.AsyncGuard`. Arguments, return value and errors as
    :func:`run_function_calls`."""
    options = settings(
        scope=scope,
        exclude=exclude,
        key=key,
        namespace=namespace,
        replay_marker=replay_marker,
        caller="arun_function_calls",
    )
    check_guard(guard, AsyncGuard, "run_function_calls")
    specs = check_tools(tools, options, allow_async=True, twin="arun_function_calls")
    done = await arun_calls(_function_calls(response, tools), specs, guard, options)
    return _outputs(done, options.replay_marker)
