"""MCP: guarded tools on a FastMCP server, and SafeAgent's own MCP server.

``pip install -e '.[mcp]'``; written for the official MCP Python SDK's ``FastMCP``
(``mcp.server.fastmcp``, SDK 1.x).

**Guarding a server's tools.** :func:`guard_server` wraps the tools already registered on
a ``FastMCP`` server, in place; :func:`guarded` wraps one function before it is
registered (put it under ``@server.tool()``). Either way the tool keeps its name,
description and input and output schemas, and its side effect runs at most once per
request id: the first call runs it and stores the outcome, every later call with the same
request id gets the stored result (or the stored failure, with the same error text) and
the tool does not run again. Clients reconnect, time out and retry with the same
arguments; none of that runs the side effect twice, across sessions and server restarts
alike (the receipts live in the guard's store).

**Request ids** (docs/design.md section 6): :func:`safeagent.derive_request_id` over ``(scope,
tool name, arguments)``, the arguments as FastMCP validated them (defaults applied),
minus the FastMCP ``Context`` and the volatile arguments named in ``exclude``. They are
**never** keyed on JSON-RPC request ids or session ids: those are transport ids, numbered
afresh by every session (two different calls in two sessions often share JSON-RPC id 1)
and changed by every reconnect (a retry after a dropped connection has a new one). The
**scope** is a server-level setting (``scope="tenant-A/run-7"``, for a server that serves
one run or one conversation) or a tool argument (``scope_arg="order_id"``: each call's
scope is the value of that argument). A call whose ``scope_arg`` is missing or empty
raises :class:`~safeagent.errors.MissingKeyError` before anything runs.

**Results and failures.** A tool's return value is stored as FastMCP shows it (its own
conversion: content blocks and structured output): as the value itself when its JSON form
is shown the same way (strings, JSON values, most pydantic models), else as FastMCP's
rendering, ``{"mcp.CallToolResult": {...}}`` (content blocks, ``Image``/``Audio``,
``CallToolResult``, models with aliases, datetimes, ...). The first call and every replay
show the client the stored result, exactly what an unguarded server shows. A value that
FastMCP cannot render and that has no JSON form is recorded SUCCEEDED without a result
(:class:`~safeagent.errors.ResultNotSerializableError`, first call and replays), never as
a failure: the tool has run. A tool that returns ``CallToolResult(isError=True)`` has
failed: the record is FAILED (:class:`ToolErrorResult`) and every replay shows the same
error result. A tool that raises: the failure is stored and the exception propagates
(FastMCP shows the client ``"Error executing tool <name>: <message>"``); a replay raises
:class:`~safeagent.errors.ReplayedFailureError` whose message is the stored one, so the
client sees the same text. ``NotExecuted`` releases the claim (the next call runs). A
body that has started runs to completion, and its outcome is recorded, whatever becomes
of the request: the call returns only then, so a stdio server whose client disconnected
exits after the body has finished (unless the process is killed first).

**SafeAgent's own server.** :func:`serve` runs an MCP server over stdio (``safeagent
mcp``, or ``python -m safeagent.integrations.mcp``) that shows MCP clients the receipts,
in-doubt records, audit trail and cases of a local store. Tools: ``list_receipts``,
``get_receipt``, ``list_in_doubt``, ``audit_trail``, ``list_cases``, ``get_case``; and
``signal_case`` when the server is given a ``signal_source``, the one source its signals
are recorded as (a client never names one), for cases the application opened. Resources: ``safeagent://in-doubt``,
``safeagent://receipts/{namespace}/{request_id}``, ``safeagent://cases/{namespace}/{case_id}``
(percent-encode a ``/`` in an id). Payloads, results and signal metadata pass through the
guard's redaction hook first. It resolves nothing: an in-doubt record is settled by an
operator (``Guard.resolve``) or a reconcile hook, never by a model. Nothing is hosted:
the server is a local process reading the local store.

.. versionadded:: 0.3
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import inspect
import json
import sys
import warnings
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
from pydantic_core import PydanticSerializationError

try:
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.server.fastmcp.utilities.context_injection import find_context_parameter
    from mcp.server.fastmcp.utilities.func_metadata import FuncMetadata, func_metadata
    from mcp.types import CallToolResult, TextContent
except ImportError as exc:  # pragma: no cover - depends on the installed SDK
    raise ImportError(
        "safeagent.integrations.mcp needs the MCP Python SDK 1.x (mcp.server.fastmcp): "
        "pip install -e '.[mcp]' in a SafeAgent clone (mcp<2)"
    ) from exc

from safeagent import (
    AsyncGuard,
    ExecutionContext,
    Guard,
    Status,
    derive_request_id,
)
from safeagent._decide import ReportedFailure
from safeagent._decorator import GUARDED_MARKER
from safeagent._keys import check_name
from safeagent.errors import (
    ConfigurationError,
    InvalidInputError,
    InvalidPayloadError,
    MissingKeyError,
    ReplayedFailureError,
)
from safeagent.integrations._common import ControlFlow, note_raised, storable
from safeagent.integrations._keyform import has_factories, minted_unsent, payload_form
from safeagent.integrations._mcp_server import build_server, serve
from safeagent.integrations._toolspec import (
    check_scope,
    refuse_generator,
    refuse_guarded,
    scope_text,
)

__all__ = ["ToolErrorResult", "build_server", "guard_server", "guarded", "main", "serve"]

F = TypeVar("F", bound=Callable[..., Any])


# -- guarding tools --------------------------------------------------------------------------


class _Keying:
    """How one tool's calls become request ids."""

    def __init__(
        self,
        name: str,
        scope: str | None,
        scope_arg: str | None,
        exclude: Collection[str],
        parameters: Collection[str],
    ) -> None:
        if isinstance(scope, str):
            check_scope(scope)
        elif scope is not None:
            raise ConfigurationError(f"scope must be a str or None, got {scope!r}")
        if scope_arg is not None and scope_arg not in parameters:
            if scope is None:
                raise ConfigurationError(
                    f"tool {name!r} has no argument {scope_arg!r} (scope_arg) and no "
                    f"server-level scope; its arguments are {sorted(parameters)}"
                )
            scope_arg = None  # this tool falls back to the server-level scope
        if scope is None and scope_arg is None:
            raise ConfigurationError(
                f"tool {name!r}: give scope= (a server-level scope) or scope_arg= (the "
                "argument whose value is the scope); MCP transport ids are never used"
            )
        if isinstance(exclude, str) or not all(isinstance(n, str) for n in exclude):
            raise ConfigurationError(f"exclude must be a collection of argument names: {exclude!r}")
        unknown = sorted(set(exclude) - set(parameters))
        if unknown:  # a misspelt volatile name would stay in the request id: every retry runs
            raise ConfigurationError(
                f"tool {name!r} has no arguments {unknown} (exclude); it has {sorted(parameters)}"
            )
        self.name = name
        self.scope = scope
        self.scope_arg = scope_arg
        self.exclude = frozenset(exclude)

    def request(
        self, arguments: dict[str, Any], unsent: frozenset[str] = frozenset()
    ) -> tuple[str, dict[str, Any]]:
        """The request id and the payload of one call (``arguments`` without Context);
        the request id leaves out ``exclude`` and ``unsent`` (the arguments a minting
        ``default_factory`` filled), the payload keeps them.

        Raises:
            InvalidPayloadError: arguments that are not JSON values.
            MissingKeyError: the ``scope_arg`` argument is ``None``, empty, or filled by a
                minting ``default_factory`` (a new scope on every retry).
            InvalidInputError: a ``scope_arg`` value that is no scope.
        """
        try:
            payload: dict[str, Any] = payload_form(arguments, unsent)
        except PydanticSerializationError as exc:
            raise InvalidPayloadError(
                f"tool {self.name!r}: arguments are not JSON values: {exc}"
            ) from exc
        if self.scope_arg is not None:
            if self.scope_arg in unsent:
                raise MissingKeyError(
                    f"tool {self.name!r}: argument {self.scope_arg!r} (the scope of its "
                    "request ids) was not sent, and its default_factory makes a new value "
                    "on every call"
                )
            value = arguments.get(self.scope_arg)
            if value is None or value == "":
                raise MissingKeyError(
                    f"tool {self.name!r}: argument {self.scope_arg!r} (the scope of its "
                    f"request ids) is {value!r}"
                )
            where = f"tool {self.name!r}: argument {self.scope_arg!r}"
            scope = scope_text(value, where, InvalidInputError)
        else:
            assert self.scope is not None  # checked in __init__
            scope = self.scope
        kept = {k: v for k, v in payload.items() if k not in self.exclude and k not in unsent}
        return derive_request_id(scope, self.name, kept), payload


# MCP's control flow through a tool: URL-mode elicitation (mcp 1.x from 1.23) asks the
# client to have the user act (authorize, pay) and then retry the same call; its claim is
# released so that retry runs (``_common.ControlFlow``). Absent from older SDKs.
try:
    from mcp.shared.exceptions import UrlElicitationRequiredError as _UrlElicitation

    _CLIENT_FLOW: tuple[type[BaseException], ...] = (_UrlElicitation,)
except ImportError:  # pragma: no cover - depends on the installed SDK
    _CLIENT_FLOW = ()


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


class ToolErrorResult(ReportedFailure):
    """How a guarded tool's own error result, ``CallToolResult(isError=True)``, is recorded:
    a FAILED call with this type (``safeagent.integrations.mcp.ToolErrorResult``) whose
    message is the result's text when it is one plain text block (a ``"card declined"``),
    else the whole result as JSON. Every replay shows the client the same error result;
    the tool does not run again. It is FAILED whatever the guard's ``outcome_unknown``
    names (a definite answer, not an exception the tool ran into). Raised inside the
    guard only: the client never sees it."""


_TOOL_ERROR = f"{ToolErrorResult.__module__}.{ToolErrorResult.__qualname__}"
_RESULT_KEY = "mcp.CallToolResult"  # a stored {_RESULT_KEY: result}: FastMCP's rendering


def _dump(result: CallToolResult) -> dict[str, Any]:
    """``result`` as JSON values, as the client receives it."""
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def _error_message(result: CallToolResult) -> str:
    """The stored message of an error result (see :class:`ToolErrorResult`)."""
    try:
        blocks = result.content
        if len(blocks) == 1 and isinstance(blocks[0], TextContent):
            message = blocks[0].text
            simple = CallToolResult(content=[TextContent(type="text", text=message)], isError=True)
            if result == simple and not isinstance(_json_or_none(message), dict):
                return message
        return json.dumps(_dump(result), ensure_ascii=False)
    except Exception:  # noqa: BLE001 - the tool ran: its failure is recorded whatever happens
        return "\n".join(getattr(block, "text", "") for block in result.content)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _error_result(message: str) -> CallToolResult:
    """The error result a stored :class:`ToolErrorResult` message stands for."""
    data = _json_or_none(message)
    if isinstance(data, dict):
        try:
            return CallToolResult.model_validate({**data, "isError": True})
        except ValueError:
            pass
    return CallToolResult(content=[TextContent(type="text", text=message)], isError=True)


def _shown(stored: Any) -> Any:
    """What the wrapper returns to FastMCP for a stored value: the stored value itself, or
    the :class:`CallToolResult` it stands for."""
    if isinstance(stored, dict) and len(stored) == 1 and isinstance(stored.get(_RESULT_KEY), dict):
        try:
            return CallToolResult.model_validate(stored[_RESULT_KEY])
        except ValueError:
            pass
    return stored


class _Results:
    """How one tool's return values are stored, with FastMCP's own conversion of return
    values (``FuncMetadata.convert_result``: content blocks and structured output)."""

    def __init__(self, metadata: FuncMetadata, encoder: Callable[[Any], Any]) -> None:
        self._convert = metadata.convert_result
        self._encoder = encoder

    def _rendered(self, value: Any) -> dict[str, Any]:
        converted = self._convert(value)
        if isinstance(converted, CallToolResult):
            return _dump(converted)
        if isinstance(converted, tuple):  # (content blocks, structured content)
            content, structured = converted
            return _dump(CallToolResult(content=list(content), structuredContent=structured))
        return _dump(CallToolResult(content=list(converted)))

    def stored(self, value: Any) -> Any:
        """What the guard stores for the value a tool returned (the tool has run): the
        value as JSON when FastMCP shows that exactly as it shows the value, else
        FastMCP's rendering of the value (``{"mcp.CallToolResult": ...}``), else the value
        as it is (the guard then records SUCCEEDED without a result and raises
        ``ResultNotSerializableError``). Never raises, but :class:`ToolErrorResult` for an
        error result."""
        if isinstance(value, CallToolResult) and value.isError:
            raise ToolErrorResult(_error_message(value))
        kept = storable(value)
        try:
            rendered = self._rendered(value)
        except Exception:  # noqa: BLE001 - FastMCP cannot show it either: store what we have
            return kept
        try:
            text = json.dumps(kept, default=self._encoder, allow_nan=False)
            if self._rendered(_shown(json.loads(text))) == rendered:
                return kept
        except Exception:  # noqa: BLE001, S110 - not faithful as JSON: store the rendering
            pass
        return {_RESULT_KEY: rendered}


async def _until_recorded(
    guard: AsyncGuard, request_id: str, namespace: str | None, ended: anyio.Event
) -> None:
    """Wait, shielded, until a body the guard took over from a cancelled call has ended
    and its outcome is recorded (the guard records it in the background; at most 30 s
    after the body ended)."""
    with anyio.CancelScope(shield=True):
        await ended.wait()
        with anyio.move_on_after(30):
            while True:
                receipt = await guard.get(request_id, namespace=namespace)
                if receipt is None or receipt.status is not Status.PENDING:
                    return
                await anyio.sleep(0.01)


_RAW: contextvars.ContextVar[tuple[Any, dict[str, Any]] | None] = contextvars.ContextVar(
    "safeagent_mcp_raw_arguments", default=None
)
"""(the function a guarded tool is about to call, a copy of the raw arguments it got):
what FastMCP validates, before defaults are applied. Noted only for a tool
:func:`guard_server` guarded whose arguments have a ``default_factory``."""


_FACTORIES = "_safeagent_factories"
"""Set on a guarded tool's function whose arguments have a ``default_factory``: its tool
notes the raw arguments of its calls (:class:`_NotingMetadata`)."""


class _NotingMetadata(FuncMetadata):
    """A guarded tool's FastMCP metadata that notes each call's raw arguments in
    :data:`_RAW` while it validates them and calls the tool's function: FastMCP hands the
    function the validated arguments, the values a ``default_factory`` filled included,
    and tells no one which the client sent. It belongs to the tool, so it goes wherever
    the tool goes (a new tool manager, another server)."""

    async def call_fn_with_arg_validation(
        self,
        fn: Callable[..., Any],
        fn_is_async: bool,
        arguments_to_validate: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        raw = arguments_to_validate
        token = _RAW.set((fn, dict(raw)) if isinstance(raw, dict) else None)
        try:
            return await super().call_fn_with_arg_validation(
                fn, fn_is_async, arguments_to_validate, *args, **kwargs
            )
        finally:
            _RAW.reset(token)


def _noting(metadata: FuncMetadata) -> FuncMetadata:
    """``metadata`` as a :class:`_NotingMetadata` (the same fields)."""
    values = {name: getattr(metadata, name) for name in type(metadata).model_fields}
    return _NotingMetadata.model_construct(**values)


def _unsent(fn: Any, metadata: FuncMetadata) -> frozenset[str]:
    """The arguments (as FastMCP passes them: by alias where a field has one) of this call
    of ``fn`` (a guarded tool's function) that a minting ``default_factory`` filled, when
    its tool is calling ``fn`` itself now; else empty (every value is keyed). Read once:
    a call ``fn`` makes of itself is not its tool's."""
    noted = _RAW.get()
    if noted is None or noted[0] is not fn:
        return frozenset()
    _RAW.set(None)  # the tool's metadata resets it when its call returns
    model = metadata.arg_model
    try:
        raw = metadata.pre_parse_json(noted[1])  # as FastMCP validates them
    except Exception:  # noqa: BLE001 - FastMCP fails the call itself
        return frozenset()
    fields = model.__pydantic_fields__
    return frozenset(fields[n].alias or n for n in minted_unsent(model, raw))


def _wrap(
    fn: Callable[..., Any],
    guard: Guard | AsyncGuard,
    keying: _Keying,
    namespace: str | None,
    metadata: FuncMetadata,
) -> Callable[..., Awaitable[Any]]:
    """An ``async`` function that runs ``fn`` through the guard (see the module docstring);
    ``metadata``: the tool's FastMCP metadata, which converts its return values."""
    if not isinstance(guard, (Guard, AsyncGuard)):
        raise ConfigurationError(f"guard must be a Guard or an AsyncGuard, got {guard!r}")
    fn_is_async = _is_async(fn)
    results = _Results(metadata, guard.result_encoder)
    factories = has_factories(metadata.arg_model)

    async def run_async(
        guard: AsyncGuard,
        request_id: str,
        payload: Any,
        kwargs: dict[str, Any],
        raised: list[BaseException],
        excluded: frozenset[str],
    ) -> Any:
        started: list[bool] = []
        ended = anyio.Event()

        async def afn(_ctx: ExecutionContext) -> Any:
            started.append(True)
            try:
                value = fn(**kwargs)
                if inspect.isawaitable(value):
                    value = await value
            except BaseException as exc:
                note_raised(exc, raised, _CLIENT_FLOW)
                raise
            finally:
                ended.set()
            return results.stored(value)

        try:
            return await guard.execute(
                request_id, keying.name, payload, afn, namespace=namespace, exclude=excluded
            )
        except anyio.get_cancelled_exc_class():
            # The guard lets a started body finish in the background and records its
            # outcome then. Return only after that: a server whose handlers have all
            # returned may exit (a stdio server whose client disconnected), and that
            # would cut the body off.
            if started:
                await _until_recorded(guard, request_id, namespace, ended)
            raise

    async def call(**kwargs: Any) -> Any:
        # What a minting default_factory filled is not keyed: a retry mints it afresh.
        unsent = _unsent(call, metadata) if factories else frozenset()
        arguments = {k: v for k, v in kwargs.items() if not isinstance(v, Context)}
        request_id, payload = keying.request(arguments, unsent)
        excluded = keying.exclude | unsent
        raised: list[BaseException] = []

        try:
            if isinstance(guard, AsyncGuard):
                receipt = await run_async(guard, request_id, payload, kwargs, raised, excluded)
            else:

                async def shielded() -> Any:
                    # Once started, the body runs to completion whatever the caller does
                    # (a client that cancels or disconnects); its outcome is recorded.
                    with anyio.CancelScope(shield=True):
                        return await fn(**kwargs)

                def sfn(_ctx: ExecutionContext) -> Any:
                    try:
                        # an async body runs on the server's loop
                        value = anyio.from_thread.run(shielded) if fn_is_async else fn(**kwargs)
                    except BaseException as exc:
                        note_raised(exc, raised, _CLIENT_FLOW)
                        raise
                    return results.stored(value)

                # Not cancellable: the worker thread runs the body to completion anyway.
                # An async body runs on the loop while the guard's thread waits for it:
                # that thread takes no token of anyio's default limiter (40 threads),
                # which the body may need itself (to_thread); with as many calls as
                # tokens, none would finish.
                receipt = await anyio.to_thread.run_sync(
                    functools.partial(
                        guard.execute,
                        request_id,
                        keying.name,
                        payload,
                        sfn,
                        namespace=namespace,
                        exclude=excluded,
                    ),
                    limiter=anyio.CapacityLimiter(1) if fn_is_async else None,
                )
        except ControlFlow as flow:  # the client must act first, then retry: released
            raise flow.original from None
        except ToolErrorResult as err:  # the tool's error result, recorded as a failure
            return _error_result(str(err))
        except ReplayedFailureError as err:
            if raised and err is raised[-1]:
                raise
            if err.error_type == _TOOL_ERROR:
                return _error_result(err.error_message)
            # The client saw "Error executing tool <name>: <message>" the first time.
            raise ReplayedFailureError(
                err.error_message,
                error_type=err.error_type,
                error_message=err.error_message,
                receipt=err.receipt,
            ) from None
        return _shown(receipt.result)

    if factories:
        setattr(call, _FACTORIES, True)
    return call


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)
    except (NameError, TypeError):  # annotations that cannot be evaluated here
        return inspect.signature(fn)


def guarded(
    guard: Guard | AsyncGuard,
    *,
    scope: str | None = None,
    scope_arg: str | None = None,
    exclude: Collection[str] = (),
    namespace: str | None = None,
    name: str | None = None,
    structured_output: bool | None = None,
) -> Callable[[F], F]:
    """Decorator: guard a tool function before FastMCP registers it.

    Put it *under* ``@server.tool()``::

        @server.tool()
        @guarded(guard, scope_arg="order_id")
        def create_ticket(order_id: str, title: str, priority: str = "normal") -> dict: ...

    The wrapper keeps the function's name, docstring and signature (so FastMCP derives the
    same schemas), and is ``async`` (with a sync :class:`~safeagent.Guard` the guard and a
    sync body run in a worker thread, off the server's event loop).

    Args:
        guard: a :class:`~safeagent.Guard` or an :class:`~safeagent.AsyncGuard`.
        scope: a server-level scope (a non-empty ``str``).
        scope_arg: the name of the argument whose value is each call's scope; with
            ``scope`` too, ``scope_arg`` wins.
        exclude: names of volatile arguments left out of the request id and fingerprint.
        namespace: the tenant namespace of the records (default: the guard's).
        name: the tool's name (default: the function's name), used as the action; give
            the same one to ``@server.tool(name=...)``.
        structured_output: give the same value as to
            ``@server.tool(structured_output=...)`` (default ``None``: FastMCP decides from
            the return annotation); results are stored as FastMCP shows them.

    Returns:
        The decorator.

    Raises:
        ConfigurationError: neither ``scope`` nor ``scope_arg``, an unknown
            ``scope_arg`` or ``exclude`` name, not a guard, a function already guarded
            (by ``guarded`` or ``guard.guarded``), or a generator or async generator
            function (calling one runs none of its body). The wrapper is marked as guarded, so
            :func:`guard_server` refuses the tool it becomes.
        InvalidInputError: a ``scope`` that is not a non-empty ``str`` of at most 255
            characters.
        InvalidSignature: (FastMCP's) a return annotation FastMCP refuses, as
            ``@server.tool()`` would.
    """

    def decorate(fn: F) -> F:
        tool_name = name or fn.__name__
        refuse_guarded(f"tool {tool_name!r}", fn)
        refuse_generator(f"tool {tool_name!r}", fn)
        signature = _signature(fn)
        keying = _Keying(tool_name, scope, scope_arg, exclude, signature.parameters)
        context = find_context_parameter(fn)
        metadata = func_metadata(
            fn, skip_names=[context] if context else [], structured_output=structured_output
        )
        call = _wrap(fn, guard, keying, namespace, metadata)
        unseen = sorted(
            field.alias or name  # the parameter's name, where FastMCP renamed its field
            for name, field in metadata.arg_model.model_fields.items()
            if field.default_factory is not None and (field.alias or name) not in keying.exclude
        )
        if unseen:
            warnings.warn(
                f"tool {tool_name!r}: guarded alone cannot see which of {unseen} a client "
                "left to their default_factory; where such a factory mints a new value each "
                "time (uuid4, datetime.now), each retry is a new request that runs again. "
                "Guard the tool with guard_server instead, or name those arguments in "
                "exclude=.",
                RuntimeWarning,
                stacklevel=2,
            )

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return await call(**bound.arguments)

        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        setattr(wrapper, GUARDED_MARKER, True)
        return cast(F, wrapper)

    return decorate


def guard_server(
    server: FastMCP,
    guard: Guard | AsyncGuard,
    *,
    scope: str | None = None,
    scope_arg: str | None = None,
    tools: Collection[str] | None = None,
    exclude: Collection[str] | Mapping[str, Collection[str]] = (),
    namespace: str | None = None,
) -> FastMCP:
    """Guard the tools registered on a FastMCP server, in place.

    Tools registered later are not guarded: call this after the last ``@server.tool()``.

    Args:
        server: a ``mcp.server.fastmcp.FastMCP`` server.
        guard: a :class:`~safeagent.Guard` or an :class:`~safeagent.AsyncGuard`.
        scope: a server-level scope (a non-empty ``str``): the scope of the tools that
            have no ``scope_arg`` argument.
        scope_arg: the name of the argument whose value is each call's scope, in the
            tools that have it.
        tools: the names of the tools to guard (default: all of them; read-only tools
            need no guard).
        exclude: names of volatile arguments left out of request ids and fingerprints
            (each tool leaves out those it has), or a mapping of tool name to names.
        namespace: the tenant namespace of the records (default: the guard's).

    Returns:
        ``server``, whose tools now run through the guard.

    Raises:
        ConfigurationError: an unknown tool name, a tool with neither a ``scope_arg``
            argument nor a server-level ``scope``, a name in ``exclude`` that no guarded
            tool takes (or that the tool a mapping names does not take), a tool already
            guarded (by an earlier ``guard_server``, :func:`guarded` or
            ``guard.guarded``), a generator or async generator function, or a server
            that is not a FastMCP 1.x server. Checked for every tool before any is
            changed.
        InvalidInputError: a ``scope`` that is not a non-empty ``str`` of at most 255
            characters.
    """
    manager = getattr(server, "_tool_manager", None)
    if not isinstance(server, FastMCP) or manager is None:
        raise ConfigurationError(f"server must be an mcp.server.fastmcp.FastMCP, got {server!r}")
    registered = {tool.name: tool for tool in manager.list_tools()}
    names = list(registered) if tools is None else list(tools)
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ConfigurationError(f"no tools named {unknown} on this server")
    parameters = {n: set(registered[n].fn_metadata.arg_model.model_fields) for n in names}
    if isinstance(exclude, Mapping):
        strays = sorted(set(exclude) - set(names))
        if strays:
            raise ConfigurationError(f"exclude names tools that are not guarded here: {strays}")
    elif isinstance(exclude, str):
        raise ConfigurationError(f"exclude must be a collection of argument names: {exclude!r}")
    else:
        unknown = sorted(set(exclude) - set().union(*parameters.values()))
        if unknown:
            raise ConfigurationError(f"no guarded tool has the arguments {unknown} (exclude)")
    keyings: dict[str, _Keying] = {}
    for tool_name in names:  # every check before any tool is changed
        refuse_guarded(f"tool {tool_name!r}", registered[tool_name].fn)
        refuse_generator(f"tool {tool_name!r}", registered[tool_name].fn)
        own: Collection[str] = (
            exclude.get(tool_name, ())
            if isinstance(exclude, Mapping)
            else set(exclude) & parameters[tool_name]
        )
        keyings[tool_name] = _Keying(tool_name, scope, scope_arg, own, parameters[tool_name])
    for tool_name, keying in keyings.items():
        tool = registered[tool_name]
        call = _wrap(tool.fn, guard, keying, namespace, tool.fn_metadata)
        setattr(call, GUARDED_MARKER, True)
        tool.fn = call
        tool.is_async = True
        if getattr(call, _FACTORIES, False):
            tool.fn_metadata = _noting(tool.fn_metadata)
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safeagent.integrations.mcp [--db PATH]``: run :func:`serve`.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status (0).
    """
    parser = argparse.ArgumentParser(
        prog="python -m safeagent.integrations.mcp",
        description="SafeAgent's MCP server (stdio): receipts, in-doubt records, cases.",
    )
    parser.add_argument(
        "--db",
        default=None,
        help="SQLite file or postgresql:// URL (default: $SAFEAGENT_DB, else ./safeagent.db)",
    )
    parser.add_argument("--schema", default=None, help="PostgreSQL schema (with a URL)")
    parser.add_argument(
        "--signal-source",
        default=None,
        help="offer signal_case, its signals recorded as this source (default: no writes)",
    )
    args = parser.parse_args(argv)
    if args.signal_source is not None:
        try:
            check_name("signal source", args.signal_source)
        except InvalidInputError as exc:
            parser.error(str(exc))  # exit 2, as `safeagent mcp`
    serve(args.db, schema=args.schema, signal_source=args.signal_source)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    sys.exit(main())
