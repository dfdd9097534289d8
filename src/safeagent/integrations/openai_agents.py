"""OpenAI Agents SDK: guard a ``function_tool`` so its function runs at most once per request.

Install with ``pip install -e '.[openai-agents]'``::

    from agents import Agent, Runner, function_tool
    from safeagent import AsyncGuard
    from safeagent.integrations.openai_agents import guard_tool

    @function_tool
    def charge_card(customer: str, amount_cents: int) -> dict: ...

    guard = AsyncGuard("agent.db")
    cashier = Agent(
        name="cashier",
        tools=[guard_tool(charge_card, guard=guard, scope=lambda ctx: ctx.context.order_id)],
    )
    await Runner.run(cashier, "Charge the order", context=order)

**The scope** is required (docs/design.md section 6): either a ``str`` fixed when the tool is
wrapped (a tool built per conversation), or a function of the ``ToolContext`` the SDK hands
every tool invocation, usually reading the object you passed as ``Runner.run(...,
context=...)``: ``scope=lambda ctx: ctx.context.order_id``. A retried run that is given the
same context gets the same scope, so a re-emitted call replays. The SDK's own ids (the
tool-call id, the trace or group id) are not used: they change on a retry.

**How it works.** The guarded tool is a copy of the tool (same name, description, params
JSON schema, strict mode, failure policy, guardrails, approval and timeout settings) whose
invoker runs a wrapper of the tool's Python function (``tool.__wrapped__``). The SDK still
parses and validates the model's JSON arguments; the wrapper then binds them through the
function's signature (defaults applied), turns them into JSON values
(:mod:`safeagent.integrations._keyform`: pydantic's ``to_jsonable_python``, except that a
set counts in canonical order whatever the hash seed, a ``Decimal`` by its number whatever
its spelling, a ``SecretStr`` by the SHA-256 of its secret, and a model holding one of
those or an ``exclude=True`` field by every field), derives the request id
``derive_request_id(scope, action, arguments)`` without the ``exclude`` names, and runs
the function through the guard. The action is the tool's name, or
``"<namespace>.<name>"`` for a tool the SDK runs in a ``tool_namespace(...)`` (as
``run_function_calls`` names it), so that same-named tools of two namespaces never share
records. Both sync and ``async def`` functions work with an
:class:`~safeagent.AsyncGuard`; a sync :class:`~safeagent.Guard` takes sync functions (the
SDK runs them in a worker thread).

**What the model sees.** The tool's return value as stored (a JSON value), the same on the
first call and every replay. With ``replay_marker`` set, a replayed ``str`` result is that
marker followed by the text; any other result (a dict, a list, a ``ToolOutputImage``) and
every result of a tool with an output schema replays unmarked, since text in front of it
would change what the SDK shows the model (a dict's text, structured content, JSON it
parses). A failure reaches the SDK as a :class:`ToolCallError` built from the stored error
type and message, on the first call (chained to the original exception) and on every
replay, so the tool's ``failure_error_function`` renders the same text each time (the
SDK's default, ``default_tool_error_function``, shows ``str(error)`` after a fixed
sentence: ``"<Type>: <message>"``, with the marker on replays when one is set).
A call released with ``NotExecuted`` re-raises that exception (the next call runs again);
SafeAgent's own errors (in progress, in doubt, conflict, store) and a tool exception that
left the record in doubt reach the SDK as themselves. With ``failure_error_function=None``
on the tool, any of them fails the run instead of being shown to the model.

.. versionadded:: 0.3
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import json
import warnings
from collections.abc import Callable
from typing import Any, cast, get_origin, get_type_hints

try:
    from agents import FunctionTool, RunContextWrapper, function_tool
    from agents.function_schema import function_schema
    from agents.tool_context import ToolContext
    from pydantic_core import PydanticSerializationError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "safeagent.integrations.openai_agents needs the OpenAI Agents SDK: "
        "pip install -e '.[openai-agents]' in a SafeAgent clone"
    ) from exc

from safeagent import AsyncGuard, ErrorInfo, Guard, Receipt, bind_arguments
from safeagent._decorator import GUARDED_MARKER
from safeagent.errors import ConfigurationError, GuardError, InvalidPayloadError, TransportIdWarning
from safeagent.integrations._common import (
    REPLAY_MARKER,
    Outcome,
    Prepared,
    aexecute,
    error_text,
    execute,
    request_id_for,
)
from safeagent.integrations._keyform import has_factories, minted_unsent, payload_form
from safeagent.integrations._toolspec import (
    Exclude,
    KeyMode,
    Parameters,
    check_excluded,
    check_key,
    check_marker,
    check_namespace,
    check_scope,
    check_tool_name,
    exclusions,
    hoist_excluded,
    is_async_callable,
    refuse_generator,
    refuse_guarded,
    scope_text,
    warn_transport_ids,
)

__all__ = ["REPLAY_MARKER", "ToolCallError", "TransportIdWarning", "guard_tool"]

Scope = str | Callable[[ToolContext[Any]], str]
"""A fixed scope, or a function of the invocation's ``ToolContext`` that returns one."""

_CONTEXT_PARAMETER = "safeagent_tool_context"


class ToolCallError(GuardError):
    """A guarded tool's stored failure, as handed to the SDK's failure handling.

    Raised on the call that ran the tool (``__cause__`` is the original exception) and on
    every replay, built from the stored error both times, so the model is shown the same
    text. ``str()`` is ``"<Type>: <message>"`` (with the replay marker, when one is set,
    on replays).

    Attributes:
        error_type: the stored exception type (``module.QualName``).
        error_message: the stored message.
        replay: ``True`` when the tool did not run for this call.
        receipt: the guard's receipt of the failure.

    .. versionadded:: 0.3
    """

    error_type: str
    error_message: str
    replay: bool
    receipt: Receipt | None


def _action(name: str, ctx: ToolContext[Any]) -> str:
    """The guard's action for a call of tool ``name``: ``"<namespace>.<name>"`` for a tool
    the SDK resolved in a tool namespace (``tool_namespace(...)``: two namespaces may each
    have a tool of that name, and must not replay each other's receipts), else ``name``,
    as :func:`safeagent.integrations.openai.run_function_calls` names them. A deferred
    top-level tool's synthetic namespace (its own name) is no namespace."""
    namespace = getattr(ctx, "tool_namespace", None)
    if isinstance(namespace, str) and namespace and namespace != name:
        return f"{namespace}.{name}"
    return name


def _takes_context(annotation: Any) -> bool:
    origin = get_origin(annotation) or annotation
    return origin is RunContextWrapper or origin is ToolContext


def _answer(outcome: Outcome, replay_marker: str | None) -> Any:
    """The value handed back to the SDK for ``outcome``, or the exception it raises.

    A replayed ``str`` result gets ``replay_marker`` in front (still a ``str``, which the
    SDK shows the model as it is); any other result replays exactly as stored, unmarked:
    text in front of a dict, a list or a ``ToolOutputImage`` would change what the SDK
    makes of it (the dict's text, structured content), so the replay would not look like
    the first call. ``replay_marker`` is ``None`` for a tool with an output schema, whose
    ``str`` results the SDK parses as JSON."""
    if outcome.kind == "succeeded":
        if outcome.replay and replay_marker and isinstance(outcome.result, str):
            return replay_marker + outcome.result
        return outcome.result
    if outcome.kind == "released" and outcome.exception is not None:
        raise outcome.exception
    error = outcome.error or ErrorInfo("Error", "")
    text = error_text(error).removeprefix("Error: ")
    if outcome.replay and replay_marker:
        text = replay_marker + text
    raise ToolCallError(
        text,
        error_type=error.type,
        error_message=error.message,
        replay=outcome.replay,
        receipt=outcome.receipt,
    ) from outcome.exception


def _factory_model(func: Callable[..., Any]) -> Any:
    """The SDK's pydantic model of ``func``'s arguments when one of them has a
    ``default_factory``, else ``None`` (nothing a call leaves out can be minted). Built
    without the strict JSON schema, which the model does not depend on (and which refuses
    some signatures: a ``dict`` argument, ``**kwargs``)."""
    try:
        model = function_schema(
            func, use_docstring_info=False, strict_json_schema=False
        ).params_pydantic_model
    except Exception:  # noqa: BLE001 - function_tool built it already; then key as bound
        return None
    return model if has_factories(model) else None


_INPUT: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "safeagent_agents_input", default=None
)
"""(the guarded wrapper the SDK is about to call, the raw JSON input its invoker got):
what the SDK validates, before defaults are applied."""


def _note_input(built: FunctionTool, wrapper: Callable[..., Any]) -> bool:
    """Have ``built``'s invoker (the SDK's) note each call's raw JSON input in
    :data:`_INPUT` for ``wrapper``: the SDK hands the function the validated arguments,
    the values a ``default_factory`` filled included, and tells no one which the model
    sent. ``False`` where the SDK's invoker is not the one known here: nothing is noted
    (every value then counts)."""
    invoker = built.on_invoke_tool
    impl = getattr(invoker, "_invoke_tool_impl", None)
    if not callable(impl):
        return False

    async def noting(ctx: ToolContext[Any], input: str) -> Any:
        token = _INPUT.set((wrapper, input))
        try:
            return await impl(ctx, input)
        finally:
            _INPUT.reset(token)

    noting.__dict__.update(getattr(impl, "__dict__", {}))  # the SDK's marks (__wrapped__)
    cast(Any, invoker)._invoke_tool_impl = noting
    return True


def _unsent(model: Any, wrapper: Callable[..., Any]) -> frozenset[str]:
    """The arguments of this call of ``wrapper`` that a minting ``default_factory``
    filled, read off the raw JSON input the SDK's invoker validated (read once: a call
    ``wrapper`` makes of itself is not the invoker's); empty when that is not known."""
    noted = _INPUT.get()
    if noted is None or noted[0] is not wrapper:
        return frozenset()
    _INPUT.set(None)
    try:
        data = json.loads(noted[1]) if noted[1] else {}  # the SDK validates "" as {}
    except ValueError:
        return frozenset()
    return minted_unsent(model, data)  # a factory that raises fails the call


def guard_tool(
    tool: FunctionTool,
    *,
    guard: Guard | AsyncGuard,
    scope: Scope,
    exclude: Exclude = (),
    key: KeyMode = "derived",
    namespace: str | None = None,
    replay_marker: str | None = None,
) -> FunctionTool:
    """A copy of ``tool`` whose function runs through ``guard``: at most once per request id.

    Args:
        tool: a ``FunctionTool`` made by ``@function_tool`` (sync or ``async def``
            function, with or without a context parameter).
        guard: an :class:`~safeagent.AsyncGuard` (any function), or a sync
            :class:`~safeagent.Guard` (sync functions only).
        scope: the business key the calls belong to: a ``str``, or a function of the
            invocation's ``ToolContext`` (``lambda ctx: ctx.context.order_id``) returning a
            non-empty ``str``. Part of every derived request id.
        exclude: volatile argument names left out of request ids and fingerprints (a
            collection, or ``{tool name: names}``).
        key: ``"derived"`` (default) or ``"tool_call_id"``: key on the SDK's tool-call id,
            which a re-emitted call does not keep; emits :class:`TransportIdWarning` now.
        namespace: the guard namespace (tenant) of the records; ``None``: the guard's.
        replay_marker: prefix for replayed ``str`` results and failure texts (see
            :data:`REPLAY_MARKER`); other results replay unmarked (see the module
            docstring). ``None`` (default): a replay returns exactly the first call's value.

    Returns:
        A new ``FunctionTool`` with the same name, description, params JSON schema and
        settings, marked as guarded; ``tool`` itself is not changed.

    Raises:
        ConfigurationError: ``tool`` is not a ``FunctionTool`` made by ``@function_tool``,
            it is already guarded (made by ``guard_tool``, or over a function decorated
            with ``guard.guarded``), its function is a generator or async generator
            function, its name cannot be an action (over 255 characters, ...), the guard
            does not fit the function, ``exclude`` names an argument the tool does not
            take, or an option is invalid.
        InvalidInputError: a ``str`` scope that is empty, too long or not valid UTF-8
            text without NUL; such a ``namespace``.
    """
    if not isinstance(tool, FunctionTool):
        raise ConfigurationError(f"guard_tool needs a FunctionTool, got {type(tool).__name__}")
    try:
        func: Callable[..., Any] = tool.__wrapped__
    except AttributeError as exc:
        raise ConfigurationError(
            f"tool {tool.name!r} was not made by @function_tool: guard its on_invoke_tool "
            "with guard.execute instead"
        ) from exc
    refuse_guarded(f"tool {tool.name!r}", tool, func)
    check_tool_name(tool.name)
    refuse_generator(f"tool {tool.name!r}", func)
    if isinstance(scope, str):
        check_scope(scope)
    elif not callable(scope):
        raise ConfigurationError("scope must be a str or a function of the ToolContext")
    mode = check_key(key)
    check_namespace(namespace)
    marker = check_marker(replay_marker)
    if getattr(tool, "output_json_schema", None) is not None:
        marker = None  # the SDK parses a str result as JSON: a marker would break it
    exclude_all, exclude_by_tool = exclusions(exclude)
    excluded = exclude_all | exclude_by_tool.get(tool.name, frozenset())
    if not isinstance(guard, (Guard, AsyncGuard)):
        raise ConfigurationError(f"guard must be a Guard or an AsyncGuard, got {guard!r}")
    if isinstance(guard, Guard) and is_async_callable(func):
        raise ConfigurationError(f"tool {tool.name!r} is async: guard it with an AsyncGuard")
    if mode == "tool_call_id":
        warn_transport_ids(f"guard_tool({tool.name!r})", stacklevel=2)

    signature = inspect.signature(func)
    hint_source: Any = func if inspect.isroutine(func) else type(func).__call__
    hints = get_type_hints(hint_source, include_extras=True)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
    ]
    takes_context = bool(params) and _takes_context(params[0].annotation)
    context_name = params[0].name if takes_context else _CONTEXT_PARAMETER
    tool_params = params[1:] if takes_context else params
    accepted = Parameters.of(tool_params)
    check_excluded(tool.name, excluded, accepted)
    var_keyword = accepted.var_keyword
    name = tool.name
    factories = _factory_model(func)  # the arguments' model, if one has a default_factory

    def prepare(ctx: ToolContext[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
        call_args = (ctx, *args) if takes_context else args
        bound = bind_arguments(
            func, call_args, kwargs, exclude=(context_name,) if takes_context else ()
        )
        # The SDK passes the validated arguments, the values a default_factory filled
        # included: one that mints (uuid4, datetime.now) would make every retry a new
        # request. The request id and the fingerprint leave them out; the payload keeps
        # them.
        unsent = _unsent(factories, wrapper) if factories is not None else frozenset()
        try:
            keyed = payload_form(bound, unsent)
        except PydanticSerializationError as exc:
            raise InvalidPayloadError(
                f"tool {name!r}: arguments are not JSON values: {exc}"
            ) from exc
        left_out = excluded | unsent
        payload: dict[str, Any] = hoist_excluded(keyed, var_keyword, excluded)
        scope_value = (
            scope_text(scope(ctx), f"tool {name!r}: the scope function", ConfigurationError)
            if callable(scope)
            else check_scope(scope)
        )
        action = _action(name, ctx)
        call_id = str(getattr(ctx, "tool_call_id", ""))
        request_id = request_id_for(scope_value, action, payload, left_out, mode, call_id)
        return Prepared(func, call_args, kwargs, request_id, action, payload, left_out)

    wrapper: Callable[..., Any]
    if isinstance(guard, AsyncGuard):
        async_guard = guard

        async def run_async(ctx: ToolContext[Any], /, *args: Any, **kwargs: Any) -> Any:
            outcome = await aexecute(async_guard, prepare(ctx, args, kwargs), namespace)
            return _answer(outcome, marker)

        wrapper = run_async
    else:
        sync_guard = guard

        def run_sync(ctx: ToolContext[Any], /, *args: Any, **kwargs: Any) -> Any:
            return _answer(execute(sync_guard, prepare(ctx, args, kwargs), namespace), marker)

        wrapper = run_sync

    functools.update_wrapper(wrapper, func)
    setattr(wrapper, GUARDED_MARKER, True)
    context_param = inspect.Parameter(
        context_name, inspect.Parameter.POSITIONAL_ONLY, annotation=ToolContext[Any]
    )
    cast(Any, wrapper).__signature__ = signature.replace(
        parameters=[context_param, *tool_params],
        return_annotation=hints.get("return", signature.return_annotation),
    )
    wrapper.__annotations__ = {
        context_name: ToolContext[Any],
        **{p.name: hints[p.name] for p in tool_params if p.name in hints},
        **({"return": hints["return"]} if "return" in hints else {}),
    }
    built = function_tool(
        wrapper,
        name_override=tool.name,
        description_override=tool.description or None,
        strict_mode=tool.strict_json_schema,
    )
    # A copy keeps every setting of the original; the SDK rebinds the invoker to the copy,
    # so the copy's failure policy applies.
    unnoted = factories is not None and not _note_input(built, wrapper)
    minted = unnoted and sorted(
        name
        for name, field in factories.model_fields.items()
        if field.default_factory is not None and name not in excluded
    )
    if minted:
        warnings.warn(
            f"tool {tool.name!r}: this openai-agents release's tool invoker is not one "
            f"SafeAgent knows, so it cannot tell which of {minted} a call left to their "
            "default_factory; where such a factory mints a new value each time (uuid4, "
            "datetime.now), each retry is a new request that runs again. Name those "
            "arguments in exclude= (or have the model send them).",
            RuntimeWarning,
            stacklevel=2,
        )
    guarded = dataclasses.replace(tool, on_invoke_tool=built.on_invoke_tool)
    setattr(guarded, GUARDED_MARKER, True)
    return guarded
