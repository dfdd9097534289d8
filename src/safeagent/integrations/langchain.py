"""LangChain and LangGraph: any ``BaseTool`` runs its side effect at most once per request.

``pip install -e '.[langchain]'``. :func:`guard_tool` wraps a LangChain
:class:`~langchain_core.tools.BaseTool` (a ``@tool`` function, a ``StructuredTool``, a
subclass, sync or ``async``) into a :class:`GuardedTool`: a ``BaseTool`` with the same
name, description, argument schema (what the model sees, injected arguments included) and
error-handling settings, so it drops into LangGraph's ``ToolNode``, a prebuilt ReAct agent
or ``bind_tools`` unchanged.

**Request ids** (docs/design.md section 6). By default a call's request id is derived from what
the call *is*: :func:`safeagent.derive_request_id` over ``(scope, tool name, arguments)``.
The arguments are the tool's input as LangChain validates it, with the defaults the tool
declares applied (a pydantic schema's; for a subclass without an ``args_schema``, its
``_run`` signature's; for a JSON-schema ``args_schema``, as MCP adapters build, its
``default`` values), as JSON values (``_keyform.key_form``): a ``SecretStr`` or
``SecretBytes`` counts by the SHA-256 of its secret (pydantic masks it as ``"**********"``;
the secret is not stored in clear), and a model holding one, or a field declared
``exclude=True``, counts by every field. Left out are the context LangChain and LangGraph
inject (``InjectedToolCallId``, ``InjectedState``, ``InjectedStore``, ``ToolRuntime``,
callbacks, the ``RunnableConfig``) and the volatile arguments named in ``exclude``. An
argument annotated with a plain ``InjectedToolArg`` (or an application's own subclass) is
hidden from the model but supplied by the caller, so it counts: a charge for another
account is another request. Name it in ``exclude`` when it does not tell calls apart (a
client, a session): it is then left out of the stored payload too, and need not be a JSON
value. Equivalent calls (the same arguments in another key order, a default spelled out
or not, or re-emitted by the model after a retry under a new ``tool_call_id``) get one
request id: the side effect runs once and every other call gets the stored result. A
string input (``tool.invoke("hello")``) stands for its first argument, as LangChain
validates it: it gets the request id of ``{"text": "hello"}``. When that first argument is
the framework's injected context, the string, which LangChain passes to the tool
positionally, is keyed positionally: ``{"args": ["hello"]}``.

The **scope** says which calls are "the same" on purpose. By default it is the
``thread_id`` of the ``RunnableConfig`` (``config={"configurable": {"thread_id": ...}}``,
which LangGraph checkpointers need anyway): one conversation. Pass ``scope="order-42"``
to fix it when the tool is wrapped, or ``scope=lambda config: ...`` to read it from the
config of each call (for example ``config["configurable"]["order_id"]``). A call without a
scope raises :class:`~safeagent.errors.MissingKeyError` before anything runs: a scope-less
derived id would merge two intentional identical purchases into one.

``key="tool_call_id"`` keys calls on the model's ``tool_call_id`` instead (a transport id:
a model that re-emits a call mints a new one, so the retry runs again), and emits
:class:`TransportIdWarning` when the tool is wrapped.

**Results**. The tool's return value is stored as JSON (pydantic models dumped; see
:func:`safeagent.json_default`) and *the stored value* is returned, on the first call and
on every replay, so the ``ToolMessage`` a replay produces is the first one's. With
``response_format="content_and_artifact"`` the ``(content, artifact)`` pair is stored as a
two-item list and returned as a tuple. A returned ``ToolMessage`` is stored as its content,
artifact and status, and rebuilt with the current call's ``tool_call_id``. A result that
cannot be stored (a pydantic model whose dump fails) leaves the record SUCCEEDED without a
result, and that call and every replay raise
:class:`~safeagent.errors.ResultNotSerializableError`: the tool ran, so it is never
recorded as failed. Tools that return a LangGraph ``Command`` are not supported (a state
update is not a result that can be stored and replayed): :func:`guard_tool` refuses a tool
whose return annotation names ``Command``, and a ``Command`` returned anyway is recorded
the same way (SUCCEEDED, no result, ``ResultNotSerializableError``; its update is not
applied, and the tool does not run again).

**Failures**. An exception the tool raises is recorded and re-raised on the call that ran
it; LangChain and LangGraph then handle it as usual (``handle_tool_error``,
``ToolNode(handle_tool_errors=...)``). Later calls raise
:class:`~safeagent.errors.ReplayedFailureError` with the stored type and message, and do
not run the tool; when the stored failure was a ``ToolException`` or a subclass (the
stored type is looked up among the modules already imported, never imported from stored
data; one that is not there counts by its name) they raise :class:`ReplayedToolError`
(both a ``ToolException`` and a ``ReplayedFailureError``, its message the original one),
so ``handle_tool_error`` shows the model the same text again; when it was a pydantic
``ValidationError`` (which a plain ``ToolNode`` shows the model, where it stops the graph
on any other exception) they raise a ``ValidationError`` rebuilt with the stored message,
its ``__cause__`` the ``ReplayedFailureError``. A replayed failure's
``repr`` is the original exception's, rebuilt from the stored type and message
(``ValueError('card declined')``, ``KeyError('k')``, ``RuntimeError()``,
``ConnectionRefusedError(111, 'Connection refused')``), so
``ToolNode(handle_tool_errors=True)``, which shows the model ``repr(error)``, shows the
same text too; only an exception whose ``repr`` its message does not determine (several
arguments, a non-``str`` argument) is shown as ``Type('message')`` on a replay.
``NotExecuted`` (and types the guard declares "not executed") release the claim: the next
call runs the tool again. SafeAgent's own errors (``InProgressError``,
``OutcomeUnknownError``, ``ConflictError``, ``StoreError``, ...) propagate.

**Sync and async**. With a :class:`~safeagent.Guard` the tool works with ``invoke`` and
``ainvoke`` (the guard then runs in a worker thread and an ``async`` tool body on the
caller's event loop). With an :class:`~safeagent.AsyncGuard` it works with ``ainvoke``
(``graph.ainvoke``) only; ``invoke`` raises :class:`~safeagent.errors.ConfigurationError`.
``invoke`` on a tool without a sync body (an ``async``-only ``@tool``, or a ``_run`` that
only raises ``NotImplementedError``) raises ``ConfigurationError`` too, and records
nothing that stays: the claim is released, so the later ``ainvoke`` runs the tool (a
stored outcome is still replayed). A body cut off by the caller's event loop shutting down
leaves the record in doubt (``OutcomeUnknownError`` on a retry).

.. versionadded:: 0.3
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import re
import sys
import typing
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForToolRun,
    CallbackManagerForToolRun,
)
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import (
    BaseTool,
    InjectedToolArg,
    InjectedToolCallId,
    StructuredTool,
    Tool,
    ToolException,
)
from langchain_core.tools.base import get_all_basemodel_annotations
from langchain_core.utils.pydantic import get_fields
from pydantic import ConfigDict, PrivateAttr
from pydantic_core import PydanticCustomError, PydanticSerializationError, ValidationError

from safeagent import AsyncGuard, ExecutionContext, Guard, NotExecuted, derive_request_id
from safeagent.errors import (
    ConfigurationError,
    InvalidInputError,
    InvalidPayloadError,
    MissingKeyError,
    ReplayedFailureError,
    TransportIdWarning,
)
from safeagent.integrations._common import ControlFlow, note_raised, storable
from safeagent.integrations._keyform import has_factories, key_form, minted_unsent, payload_form
from safeagent.integrations._loops import in_own_thread, run_on_loop
from safeagent.integrations._toolspec import (
    check_scope,
    is_stub,
    refuse_generator,
    refuse_guarded,
    scope_text,
)

_Command: type[Any] | None
try:  # langgraph ships with the [langchain] extra; langchain-core alone has no Command
    from langgraph.types import Command as _Command
except ImportError:  # pragma: no cover - langgraph not installed
    _Command = None

__all__ = [
    "GuardedTool",
    "ReplayedToolError",
    "ScopeSource",
    "TransportIdWarning",
    "guard_tool",
    "guard_tools",
]

ScopeSource = str | Callable[[RunnableConfig], Any] | None
"""Where a call's scope comes from: a fixed ``str``; a callable given the call's
``RunnableConfig`` (returning a non-empty ``str``, or ``None`` for "no scope"); or
``None`` for the config's ``configurable.thread_id``."""

KeyMode = Literal["derived", "tool_call_id"]

_CALL_ID_KW = "__safeagent_tool_call_id__"
"""The private keyword that carries the ``tool_call_id`` from input parsing to ``_run``."""

_KEYED_KW = "__safeagent_keyed_input__"
"""The private keyword that carries, for a string input, the ``(args, kwargs)`` of its dict
form from input parsing to ``_run``: the request id is derived from those."""

_UNSENT_KW = "__safeagent_unsent__"
"""The private keyword that carries the names of the arguments a call left to a
``default_factory`` that mints (``uuid4``, ``datetime.now``): they are not keyed."""

_TOOL_MESSAGE = "__langchain_tool_message__"
"""Marks a stored ``ToolMessage`` (its content, artifact and status)."""

_FILTERED_ARGS = frozenset({"run_manager", "callbacks"})
"""The callback arguments LangChain passes to a tool body (``FILTERED_ARGS``)."""

_ERRNO = re.compile(
    r"\[Errno (-?\d+)\] (.*?)"  # OSError.__str__: "[Errno N] strerror[: 'file'[ -> 'file2']]"
    r"(?:: (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"
    r"(?: -> (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"))?)?",
    re.DOTALL,
)


def _original_repr(err: ReplayedFailureError) -> str:
    """``repr`` of the stored failure as the first call's exception printed it, rebuilt
    from the stored type and message (``str(exc)``): ``ValueError('card declined')``,
    ``RuntimeError()`` (no message), ``KeyError('k')`` (its message is ``repr`` of the
    key), ``ConnectionRefusedError(111, 'Connection refused')`` (a builtin ``OSError``
    with an errno). Any other exception whose ``repr`` its message does not determine
    (several arguments, a non-``str`` one) is shown as ``Type('message')``."""
    short = err.error_type.rsplit(".", 1)[-1]
    message = err.error_message
    if not message:
        return f"{short}()"
    builtin = getattr(builtins, err.error_type, None)
    if builtin is KeyError:
        return f"KeyError({message})"
    errno = _ERRNO.fullmatch(message)
    if errno and isinstance(builtin, type) and issubclass(builtin, OSError):
        return f"{short}({errno[1]}, {errno[2]!r})"
    return f"{short}({message!r})"


class ReplayedToolError(ReplayedFailureError, ToolException):
    """A replay of a stored ``ToolException`` (or a subclass, such as an application's
    ``CardDeclined``): the tool did not run again.

    Both a :class:`~safeagent.errors.ReplayedFailureError` (``error_type``,
    ``error_message``, ``receipt``) and a LangChain ``ToolException`` whose message is the
    original one, so the tool's ``handle_tool_error`` renders it as it rendered the first.
    Its ``repr`` is the original exception's (``ToolException('...')``,
    ``CardDeclined('...')``), because ``ToolNode(handle_tool_errors=True)`` shows the model
    ``repr(error)``. It is not an instance of the original subclass (nothing is rebuilt
    from stored data): a ``handle_tool_error`` callable that tells subclasses apart reads
    ``error_type``.

    .. versionadded:: 0.3
    """

    def __repr__(self) -> str:
        return _original_repr(self)


class _ReplayedToolFailureError(ReplayedFailureError):
    """A replay of any other stored failure, raised by a guarded tool: a
    ``ReplayedFailureError`` whose ``repr`` is the original exception's, so a
    ``ToolNode(handle_tool_errors=True)`` shows the model the same text on every call."""

    def __repr__(self) -> str:
        return _original_repr(self)


# -- wrapping --------------------------------------------------------------------------------


def guard_tool(
    tool: BaseTool,
    guard: Guard | AsyncGuard,
    *,
    scope: ScopeSource = None,
    key: KeyMode = "derived",
    exclude: Collection[str] = (),
    namespace: str | None = None,
) -> GuardedTool:
    """Wrap a LangChain tool so that its side effect runs at most once per request id.

    Args:
        tool: any ``BaseTool`` (``@tool`` functions, ``StructuredTool``, subclasses; sync
            or ``async``). It is not modified.
        guard: a :class:`~safeagent.Guard` (``invoke`` and ``ainvoke``) or an
            :class:`~safeagent.AsyncGuard` (``ainvoke`` only).
        scope: where each call's scope comes from (see :data:`ScopeSource`): ``None``
            (default) for ``config["configurable"]["thread_id"]``, a fixed ``str``, or a
            callable given the call's ``RunnableConfig``.
        key: ``"derived"`` (default) or ``"tool_call_id"`` (the model's id for the call;
            emits :class:`TransportIdWarning`).
        exclude: names of volatile arguments left out of the request id and of the
            fingerprint (they are still passed to the tool and stored with the payload;
            a caller-injected ``InjectedToolArg`` named here is not stored).
        namespace: the tenant namespace of the records (default: the guard's).

    Returns:
        A :class:`GuardedTool` with the tool's name, description and schemas.

    Raises:
        ConfigurationError: ``tool`` is not a ``BaseTool`` or is already guarded (a
            :class:`GuardedTool`, or a tool whose function is guarded), its function
            (or ``_run``/``_arun``) is a generator or async generator function, its return
            annotation names a LangGraph ``Command`` (not a result that can be stored),
            ``guard`` is not a guard, a name in ``exclude`` is not one of the tool's
            arguments, or another option is invalid.
        InvalidInputError: a fixed ``scope`` that is not a non-empty ``str`` of at most
            255 characters.
    """
    if not isinstance(tool, BaseTool):
        raise ConfigurationError(f"tool must be a langchain_core BaseTool, got {tool!r}")
    refuse_guarded(
        f"tool {tool.name!r}", tool, getattr(tool, "func", None), getattr(tool, "coroutine", None)
    )
    refuse_generator(
        f"tool {tool.name!r}",
        getattr(tool, "func", None),
        getattr(tool, "coroutine", None),
        getattr(type(tool), "_run", None),
        getattr(type(tool), "_arun", None),
    )
    if _returns_command(tool):
        raise ConfigurationError(
            f"tool {tool.name!r} returns a LangGraph Command: a state update is not a result "
            "SafeAgent can store and replay, so it cannot be guarded. Return the result "
            "(a JSON value, a ToolMessage) and update the state in a graph node"
        )
    if not isinstance(guard, (Guard, AsyncGuard)):
        raise ConfigurationError(f"guard must be a Guard or an AsyncGuard, got {guard!r}")
    if key not in ("derived", "tool_call_id"):
        raise ConfigurationError(f"key must be 'derived' or 'tool_call_id', got {key!r}")
    if isinstance(scope, str):
        check_scope(scope)
    elif scope is not None and not callable(scope):
        raise ConfigurationError(f"scope must be a str, a callable or None, got {scope!r}")
    if isinstance(exclude, str) or not all(isinstance(n, str) for n in exclude):
        raise ConfigurationError(f"exclude must be a collection of argument names: {exclude!r}")
    names = _argument_names(tool)
    unknown = sorted(set(exclude) - names)
    if unknown:  # a misspelt volatile name would stay in the request id: every retry runs
        named = sorted(names - {"args"}) or sorted(names)  # "args": positional input only
        raise ConfigurationError(
            f"tool {tool.name!r} has no arguments {unknown} (exclude); it has {named}"
        )
    if key == "tool_call_id":
        warnings.warn(
            f"tool {tool.name!r}: request ids are keyed on tool-call ids; a model that "
            "re-emits a call after a retry mints a new id, so the retry runs the side "
            "effect again. Use the default key='derived' unless the ids are stable.",
            TransportIdWarning,
            stacklevel=2,
        )
    # Every BaseTool setting the installed LangChain has (name, description, args_schema,
    # return_direct, callbacks, tags, metadata, handle_tool_error, response_format, ...).
    settings = {f: getattr(tool, f) for f in BaseTool.model_fields if hasattr(tool, f)}
    guarded = GuardedTool(**settings)
    guarded._inner = tool
    guarded._guard = guard
    guarded._scope = scope
    guarded._key = key
    guarded._exclude = frozenset(exclude)
    guarded._namespace = namespace
    guarded._caller_injected = _caller_injected(tool)
    guarded._defaults = _declared_defaults(tool)
    guarded._factories = tool.args_schema if has_factories(tool.args_schema) else None
    return guarded


def guard_tools(
    tools: Iterable[BaseTool],
    guard: Guard | AsyncGuard,
    *,
    scope: ScopeSource = None,
    key: KeyMode = "derived",
    exclude: Collection[str] | Mapping[str, Collection[str]] = (),
    namespace: str | None = None,
) -> list[GuardedTool]:
    """:func:`guard_tool` for several tools with the same options.

    Args:
        tools: the tools, in order.
        guard, scope, key, namespace: as for :func:`guard_tool`.
        exclude: volatile argument names (each tool leaves out those it has), or a mapping
            of tool name to names.

    Returns:
        The guarded tools, in the same order.

    Raises:
        ConfigurationError: as :func:`guard_tool`; also a name in ``exclude`` that no tool
            takes, or a mapping entry for a tool that is not there.
        InvalidInputError: as :func:`guard_tool`.
    """
    tools = list(tools)
    if isinstance(exclude, Mapping):
        missing = sorted(set(exclude) - {getattr(t, "name", None) for t in tools})
        if missing:
            raise ConfigurationError(f"exclude names tools that are not there: {missing}")
    elif isinstance(exclude, str):
        raise ConfigurationError(f"exclude must be a collection of argument names: {exclude!r}")
    else:
        taken = set().union(*(_argument_names(t) for t in tools if isinstance(t, BaseTool)))
        unknown = sorted(set(exclude) - taken)
        if unknown:
            raise ConfigurationError(f"no tool has the arguments {unknown} (exclude)")
    result = []
    for tool in tools:
        names: Collection[str]
        if isinstance(exclude, Mapping):
            names = exclude.get(getattr(tool, "name", ""), ())
        elif isinstance(tool, BaseTool):
            names = set(exclude) & _argument_names(tool)
        else:
            names = ()
        result.append(
            guard_tool(tool, guard, scope=scope, key=key, exclude=names, namespace=namespace)
        )
    return result


# -- the tool --------------------------------------------------------------------------------


class GuardedTool(BaseTool):
    """A LangChain tool whose side effect runs at most once per request id.

    Made by :func:`guard_tool`; see the module docstring for the request ids, results and
    failures. ``inner`` is the wrapped tool.

    .. versionadded:: 0.3
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    __safeagent_guarded__: ClassVar[bool] = True

    _inner: BaseTool = PrivateAttr()
    _guard: Guard | AsyncGuard = PrivateAttr()
    _scope: ScopeSource = PrivateAttr(default=None)
    _key: KeyMode = PrivateAttr(default="derived")
    _exclude: frozenset[str] = PrivateAttr(default=frozenset())
    _namespace: str | None = PrivateAttr(default=None)
    _caller_injected: frozenset[str] = PrivateAttr(default=frozenset())
    _defaults: _Defaults | None = PrivateAttr(default=None)
    _factories: Any = PrivateAttr(default=None)  # args_schema, when it has a default_factory

    @property
    def inner(self) -> BaseTool:
        """The wrapped tool (calling it directly bypasses the guard)."""
        return self._inner

    # The schemas are the inner tool's: what the model sees, and what LangGraph's ToolNode
    # reads to inject state, store and runtime arguments.

    def get_input_schema(self, config: RunnableConfig | None = None) -> Any:
        """The wrapped tool's input schema."""
        return self._inner.get_input_schema(config)

    @property
    def tool_call_schema(self) -> Any:
        """The wrapped tool's schema for models (injected arguments left out)."""
        return self._inner.tool_call_schema

    @property
    def _injected_args_keys(self) -> frozenset[str]:
        return self._inner._injected_args_keys

    def _to_args_and_kwargs(
        self, tool_input: str | dict[str, Any], tool_call_id: str | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Parse and validate exactly as the wrapped tool does (injected arguments too);
        # carry the tool_call_id to _run, which needs it only with key="tool_call_id".
        inner = self._inner
        # A copy of the raw input (a validator may change the dict LangChain validates;
        # the values themselves are not copied: injected state or a runtime may refuse)
        raw = (
            dict(tool_input)
            if self._factories is not None and isinstance(tool_input, dict)
            else None
        )
        args, kwargs = inner._to_args_and_kwargs(tool_input, tool_call_id)
        extra: dict[str, Any] = {_CALL_ID_KW: tool_call_id}
        name = _string_argument(inner) if isinstance(tool_input, str) else None
        if name is not None and self._is_context(name):
            # The first argument is injected by LangChain or LangGraph (state, store,
            # tool_call_id): the string, which LangChain passes to the tool positionally,
            # is keyed positionally too, never as {injected: input} (an empty key).
            name = None
        if name is not None:
            # LangChain passes a string input on positionally, but validates it as
            # {first argument: input}: key the call on that dict form, so that
            # invoke("hi") and invoke({"text": "hi"}) are one request.
            keyed_args, keyed_kwargs = inner._to_args_and_kwargs({name: tool_input}, tool_call_id)
            extra[_KEYED_KW] = (tuple(keyed_args), keyed_kwargs)
            raw = {name: tool_input}
        if self._factories is not None and isinstance(raw, dict):
            # LangChain passes the validated input, the values a default_factory filled
            # included: one that mints (uuid4, datetime.now) made every retry a new
            # request. pydantic tells which fields the raw input set; the keys LangChain
            # added to it (an injected tool_call_id) count as given.
            if isinstance(tool_input, dict):
                raw.update((k, v) for k, v in tool_input.items() if k not in raw)
            unsent = minted_unsent(self._factories, raw)
            if unsent:
                extra[_UNSENT_KW] = unsent
        return tuple(args), {**kwargs, **extra}

    # -- running -----------------------------------------------------------------------------

    def _run(
        self,
        *args: Any,
        config: RunnableConfig,
        run_manager: CallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> Any:
        call_id = kwargs.pop(_CALL_ID_KW, None)
        keyed = kwargs.pop(_KEYED_KW, None)
        unsent = kwargs.pop(_UNSENT_KW, frozenset())
        guard = self._guard
        if not isinstance(guard, Guard):
            raise ConfigurationError(
                f"tool {self.name!r} is guarded by an AsyncGuard: call it with ainvoke "
                "(graph.ainvoke / astream), or guard it with a Guard"
            )
        key_args, key_kwargs = keyed or (args, kwargs)
        request_id, payload = self._request(key_args, key_kwargs, config, call_id, unsent)
        raised: list[BaseException] = []
        inner = self._inner
        # Without a sync body nothing can run: the claim is released (a stored outcome is
        # still replayed), and the caller is told to use ainvoke.
        unrunnable = (
            None
            if _has_sync_body(inner)
            else self._unrunnable("sync body: call it with ainvoke (graph.ainvoke)")
        )

        def fn(_ctx: ExecutionContext) -> Any:
            if unrunnable is not None:
                raise unrunnable
            try:
                value = inner._run(*args, **_with_extras(inner._run, kwargs, config, run_manager))
            except BaseException as exc:
                note_raised(exc, raised, _graph_flow())
                raise
            return self._encode(value)  # the tool has run: a conversion error is not its failure

        try:
            receipt = guard.execute(
                request_id,
                self.name,
                payload,
                fn,
                namespace=self._namespace,
                exclude=self._exclude | unsent,
            )
        except ControlFlow as flow:  # LangGraph's interrupt(): the claim was released
            raise flow.original from None
        except (NotExecuted, ReplayedFailureError) as exc:
            error = self._caller_error(exc, raised, unrunnable)
            if error is exc:
                raise
            raise error from error.__cause__  # the replay, for a rebuilt ValidationError
        return self._decode(receipt.result, call_id)

    async def _arun(
        self,
        *args: Any,
        config: RunnableConfig,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> Any:
        call_id = kwargs.pop(_CALL_ID_KW, None)
        keyed = kwargs.pop(_KEYED_KW, None)
        unsent = kwargs.pop(_UNSENT_KW, frozenset())
        key_args, key_kwargs = keyed or (args, kwargs)
        request_id, payload = self._request(key_args, key_kwargs, config, call_id, unsent)
        raised: list[BaseException] = []
        inner = self._inner
        runs_sync = _runs_sync(inner)
        unrunnable = (
            self._unrunnable("body (its _run and _arun only raise NotImplementedError)")
            if runs_sync and not _has_sync_body(inner)
            else None
        )

        def sync_body(_ctx: ExecutionContext) -> Any:
            # A sync tool runs in the guard's worker thread, as BaseTool._arun would run it
            # in an executor (with the sync twin of the callback manager).
            if unrunnable is not None:
                raise unrunnable
            manager = run_manager.get_sync() if run_manager is not None else None
            try:
                value = inner._run(*args, **_with_extras(inner._run, kwargs, config, manager))
            except BaseException as exc:
                note_raised(exc, raised, _graph_flow())
                raise
            return self._encode(value)  # the tool has run: a conversion error is not its failure

        async def async_body(_ctx: ExecutionContext) -> Any:
            try:
                extras = _with_extras(inner._arun, kwargs, config, run_manager)
                value = await inner._arun(*args, **extras)
            except BaseException as exc:
                note_raised(exc, raised, _graph_flow())
                raise
            return self._encode(value)

        guard = self._guard
        try:
            if isinstance(guard, AsyncGuard):  # it awaits async_body, or runs sync_body in a thread
                fn: Callable[[ExecutionContext], Any] = sync_body if runs_sync else async_body
                receipt = await guard.execute(
                    request_id,
                    self.name,
                    payload,
                    fn,
                    namespace=self._namespace,
                    exclude=self._exclude | unsent,
                )
            else:
                loop = asyncio.get_running_loop()

                def on_loop(ctx: ExecutionContext) -> Any:
                    # The sync guard runs in a worker thread; an async tool body on this loop.
                    return run_on_loop(loop, async_body(ctx))

                # A body on the loop: the guard in a thread of its own, not the loop's
                # bounded executor, which that body may need (in_own_thread).
                receipt = await (asyncio.to_thread if runs_sync else in_own_thread)(
                    guard.execute,
                    request_id,
                    self.name,
                    payload,
                    sync_body if runs_sync else on_loop,
                    namespace=self._namespace,
                    exclude=self._exclude | unsent,
                )
        except ControlFlow as flow:  # LangGraph's interrupt(): the claim was released
            raise flow.original from None
        except (NotExecuted, ReplayedFailureError) as exc:
            error = self._caller_error(exc, raised, unrunnable)
            if error is exc:
                raise
            raise error from error.__cause__  # the replay, for a rebuilt ValidationError
        return self._decode(receipt.result, call_id)

    def _unrunnable(self, what: str) -> NotExecuted:
        """What ``fn`` raises for a call the tool has no body for: nothing ran, so the
        guard releases the claim (the caller gets a ``ConfigurationError``)."""
        return NotExecuted(f"tool {self.name!r} has no {what}; nothing ran")

    def _caller_error(
        self,
        exc: NotExecuted | ReplayedFailureError,
        raised: list[BaseException],
        unrunnable: NotExecuted | None,
    ) -> BaseException:
        """The exception the caller gets for ``exc`` from the guard: the tool's own
        exceptions as they are, a replayed failure as :func:`_replayed` makes it (a
        replayed pydantic ``ValidationError`` as :func:`_validation_error` rebuilds it),
        and a call the tool has no body for as a ``ConfigurationError``."""
        if exc is unrunnable:
            return ConfigurationError(str(exc))
        if isinstance(exc, ReplayedFailureError) and not (raised and exc is raised[-1]):
            replayed = _replayed(exc)
            return _validation_error(replayed) or replayed
        return exc

    # -- request ids -------------------------------------------------------------------------

    def _scope_of(self, config: RunnableConfig | None) -> str:
        source = self._scope
        if isinstance(source, str):
            return source
        if source is None:
            configurable = (config or {}).get("configurable") or {}
            value = configurable.get("thread_id")
            where = "config['configurable']['thread_id']"
        else:
            value = source(config or {})
            where = "the scope callable"
        if value is None or value == "":
            raise MissingKeyError(
                f"tool {self.name!r} has no scope for its request ids: {where} gave "
                f"{value!r}. Run it with config={{'configurable': {{'thread_id': ...}}}}, "
                "or wrap it with scope=..."
            )
        error = ConfigurationError if source is not None else InvalidInputError
        return scope_text(value, f"tool {self.name!r}: {where}", error)

    def _request(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        config: RunnableConfig | None,
        call_id: str | None,
        unsent: frozenset[str] = frozenset(),
    ) -> tuple[str, dict[str, Any]]:
        """The request id and the payload: the call's arguments (the defaults the tool
        declares applied, LangChain's and LangGraph's injected context left out) as the
        JSON values :func:`~safeagent.integrations._keyform.key_form` makes of them. The
        request id leaves out ``exclude`` and ``unsent`` (what a minting default_factory
        filled); the payload keeps them (the fingerprint leaves them out)."""
        visible = self._keyed(_with_defaults(self._defaults, args, kwargs))
        try:
            payload: dict[str, Any] = payload_form(visible, unsent)
            if args:
                payload["args"] = key_form(list(args))
        except PydanticSerializationError as exc:
            injected = sorted(set(visible) & self._caller_injected)
            hint = (
                f"; the injected arguments {injected} count toward the request id: name "
                "those that do not tell two calls apart (a client, a session) in exclude=..."
                if injected
                else ""
            )
            raise InvalidPayloadError(
                f"tool {self.name!r}: arguments are not JSON values: {exc}{hint}"
            ) from exc
        if self._key == "tool_call_id":
            if not call_id:
                raise MissingKeyError(
                    f"tool {self.name!r} is keyed on tool-call ids, but was called without "
                    "one (invoke it with a ToolCall, as ToolNode does)"
                )
            return call_id, payload
        kept = {k: v for k, v in payload.items() if k not in self._exclude and k not in unsent}
        return derive_request_id(self._scope_of(config), self.name, kept), payload

    def _is_context(self, name: str) -> bool:
        """``True`` when LangChain or LangGraph inject argument ``name`` themselves."""
        return name not in self._caller_injected and not _without_injected(
            self._inner, {name: None}
        )

    def _keyed(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` without the context LangChain or LangGraph inject (what the request
        id never covers); a caller-injected ``InjectedToolArg`` stays, unless it is named
        in ``exclude`` (then, like the framework's context, it is not stored either: it
        need not be a JSON value)."""
        visible = _without_injected(self._inner, kwargs)
        counted = self._caller_injected - self._exclude
        return {k: v for k, v in kwargs.items() if k in visible or k in counted}

    # -- results -----------------------------------------------------------------------------

    def _encode(self, value: Any) -> Any:
        """The tool's return value as a JSON value to store. It never raises: the tool has
        run, so a value that cannot be converted is handed to the guard as it is, whose
        encoder records the call as succeeded without a result and raises
        ``ResultNotSerializableError``; a LangGraph ``Command`` likewise."""
        if _holds_command(value):
            return _RefusedCommand(self.name)
        if isinstance(value, ToolMessage):
            return {
                _TOOL_MESSAGE: {
                    "content": storable(value.content),
                    "artifact": storable(value.artifact),
                    "status": value.status,
                }
            }
        if self.response_format == "content_and_artifact" and isinstance(value, tuple):
            return [storable(v) for v in value]
        return storable(value)

    def _decode(self, stored: Any, call_id: str | None) -> Any:
        """The stored value as the tool returns it (see the module docstring)."""
        if isinstance(stored, dict) and set(stored) == {_TOOL_MESSAGE}:
            message = stored[_TOOL_MESSAGE]
            return ToolMessage(
                content=message.get("content", ""),
                artifact=message.get("artifact"),
                status=message.get("status", "success"),
                name=self.name,
                tool_call_id=call_id or "",
            )
        if self.response_format == "content_and_artifact" and isinstance(stored, list):
            return tuple(stored)
        return stored


# -- helpers ---------------------------------------------------------------------------------


def _without_injected(tool: BaseTool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without every argument LangChain counts as injected (annotated with
    ``InjectedToolArg`` or a subclass, ``ToolRuntime``, callbacks)."""
    strip = getattr(tool, "_filter_injected_args", None)  # langchain-core 1.x
    if callable(strip):
        return dict(strip(kwargs))
    injected = set(getattr(tool, "_injected_args_keys", ())) | _FILTERED_ARGS
    return {k: v for k, v in kwargs.items() if k not in injected}


def _framework_marks() -> tuple[type[Any], ...]:
    """The annotations of the context LangChain and LangGraph inject themselves: the
    ``tool_call_id``, the graph state, the store, the ``ToolRuntime``."""
    marks: list[type[Any]] = [InjectedToolCallId]
    try:  # langgraph ships with the [langchain] extra
        from langgraph.prebuilt import (  # noqa: PLC0415 - optional, and heavy
            InjectedState,
            InjectedStore,
            ToolRuntime,
        )
    except ImportError:  # pragma: no cover - langgraph not installed
        pass
    else:
        marks += [InjectedState, InjectedStore, ToolRuntime]
    try:  # ToolRuntime's base: an argument injected by its type, not an annotation
        from langchain_core.tools.base import (  # noqa: PLC0415
            _DirectlyInjectedToolArg,
        )
    except ImportError:  # pragma: no cover - older langchain-core
        pass
    else:
        marks.append(_DirectlyInjectedToolArg)
    return tuple(marks)


def _is_mark(value: Any, kinds: type[Any] | tuple[type[Any], ...]) -> bool:
    """``True`` for an instance or a subclass of ``kinds`` (how LangChain reads marks)."""
    if isinstance(value, kinds):
        return True
    try:
        return isinstance(value, type) and issubclass(value, kinds)
    except TypeError:  # a generic alias posing as a type
        return False


def _supplied_by_caller(annotation: Any, framework: tuple[type[Any], ...]) -> bool | None:
    """``True`` when ``annotation`` marks an argument the caller injects (a plain
    ``InjectedToolArg``, or a subclass of the application's own); ``False`` for the
    context the framework injects (``framework``); ``None`` when it is not injected."""
    marks = typing.get_args(annotation)[1:]  # Annotated metadata, as langchain-core reads it
    base = typing.get_args(annotation)[0] if marks else annotation
    for kind in (annotation, typing.get_origin(annotation), base, typing.get_origin(base)):
        if kind is not None and _is_mark(kind, framework):
            return False  # injected by its type: ToolRuntime, ToolRuntime[...]
    if any(_is_mark(m, framework) for m in marks):
        return False
    return True if any(_is_mark(m, InjectedToolArg) for m in marks) else None


def _annotations(tool: BaseTool) -> list[dict[str, Any]]:
    """The argument annotations of ``tool``, from each place LangChain reads injected
    arguments: its input schema and the signatures of its bodies."""
    found: list[dict[str, Any]] = []
    if not isinstance(tool.args_schema, dict):
        try:
            schema = tool.get_input_schema()
            found.append(dict(get_all_basemodel_annotations(schema)))
        except Exception:  # noqa: BLE001 - a schema LangChain cannot build: the bodies tell
            found.append({})
    if isinstance(tool, (StructuredTool, Tool)):
        bodies = [tool.func, tool.coroutine]
    else:
        bodies = [tool._run, tool._arun]
    for body in bodies:
        if body is None:
            continue
        try:
            found.append(typing.get_type_hints(body, include_extras=True))
        except Exception:  # noqa: BLE001 - unresolvable annotations: take the live ones
            try:
                parameters = inspect.signature(body).parameters.values()
            except (TypeError, ValueError):  # pragma: no cover - builtins
                continue
            found.append({p.name: p.annotation for p in parameters})
    return found


def _caller_injected(tool: BaseTool) -> frozenset[str]:
    """The arguments of ``tool`` that are hidden from the model but supplied by the caller
    (annotated with a plain ``InjectedToolArg``, not with the framework's
    ``InjectedToolCallId``, ``InjectedState``, ``InjectedStore`` or ``ToolRuntime``):
    they count toward the request id, since two values are two different calls."""
    framework = _framework_marks()
    verdicts: dict[str, set[bool]] = {}
    for hints in _annotations(tool):
        for name, annotation in hints.items():
            verdict = _supplied_by_caller(annotation, framework)
            if verdict is not None:
                verdicts.setdefault(name, set()).add(verdict)
    return frozenset(
        name
        for name, seen in verdicts.items()
        # ToolNode injects its ToolRuntime into an argument named "runtime" whatever its
        # annotation: the framework's context too.
        if seen == {True} and name not in _FILTERED_ARGS and name != "runtime"
    )


_Defaults = tuple[tuple[str, ...], dict[str, Any]]
"""The argument names a tool takes positionally, in order, and the defaults it declares."""


def _declared_defaults(tool: BaseTool) -> _Defaults | None:
    """The defaults LangChain does not apply to ``tool``'s input, which the request id
    must: the JSON schema's ``default`` values when its ``args_schema`` is a JSON schema
    (as MCP adapters build), the body's signature defaults for a subclass without an
    ``args_schema``. ``None`` when LangChain applies them (a pydantic schema) or the tool
    has none (a single-input ``Tool``)."""
    schema = tool.args_schema
    if isinstance(schema, dict):
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return None
        defaults = {
            name: spec["default"]
            for name, spec in properties.items()
            if isinstance(name, str) and isinstance(spec, dict) and "default" in spec
        }
        return ((), defaults) if defaults else None
    if schema is not None or isinstance(tool, (StructuredTool, Tool)):
        return None
    cls = type(tool)
    body = tool._arun if is_stub(cls._run) and not _runs_sync(tool) else tool._run
    try:
        parameters = inspect.signature(body).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return None
    try:
        hints = typing.get_type_hints(body)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no config parameter known
        hints = {}
    named = [
        p
        for p in parameters
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and p.name not in _FILTERED_ARGS
        and hints.get(p.name) is not RunnableConfig
    ]
    positional = tuple(
        p.name
        for p in named
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    defaults = {
        p.name: p.default
        for p in named
        if p.default is not inspect.Parameter.empty and _is_json_value(p.default)
    }
    return (positional, defaults) if defaults else None


def _is_json_value(value: Any) -> bool:
    """``True`` when ``value`` has a JSON form for a request id (a default that has none,
    a sentinel, is left as LangChain leaves it: unapplied)."""
    try:
        key_form(value)
    except Exception:  # noqa: BLE001 - any conversion failure
        return False
    return True


def _with_defaults(
    declared: _Defaults | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``kwargs`` with the declared defaults of the arguments the call does not give (by
    name, or positionally in ``args``) filled in."""
    if declared is None:
        return kwargs
    positional, defaults = declared
    given = set(kwargs) | set(positional[: len(args)])
    missing = {k: v for k, v in defaults.items() if k not in given}
    return {**kwargs, **missing} if missing else kwargs


def _runs_sync(tool: BaseTool) -> bool:
    """``True`` when ``tool`` has no ``async`` body of its own (its ``_arun`` would run
    ``_run`` in an executor, or only raises ``NotImplementedError``)."""
    if isinstance(tool, (StructuredTool, Tool)):
        return tool.coroutine is None
    arun = type(tool)._arun
    return arun is BaseTool._arun or is_stub(arun)


def _has_sync_body(tool: BaseTool) -> bool:
    """``False`` when ``tool`` surely cannot run synchronously: an async-only ``@tool``
    (no ``func``), or a ``_run`` that only raises ``NotImplementedError``."""
    if isinstance(tool, (StructuredTool, Tool)):
        return tool.func is not None
    return not is_stub(type(tool)._run)


def _string_argument(tool: BaseTool) -> str | None:
    """The argument a string input stands for: the first field of the tool's input
    schema, as ``BaseTool._parse_input`` validates a string; ``None`` when there is none
    (a single-input ``Tool``: the string stays its one positional argument)."""
    try:
        names = list(get_fields(tool.get_input_schema()))
    except Exception:  # noqa: BLE001 - a schema LangChain cannot build: keep the input positional
        return None
    return names[0] if names and names[0] not in ("args", "kwargs") else None


def _returns_command(tool: BaseTool) -> bool:
    """``True`` when a return annotation of ``tool``'s body names a LangGraph ``Command``
    (``Command``, a subclass, ``Command[...]``, or a union or container holding one)."""
    if _Command is None:  # pragma: no cover - langgraph not installed
        return False
    if isinstance(tool, (StructuredTool, Tool)):
        bodies = [tool.func, tool.coroutine]
    else:
        bodies = [type(tool)._run, type(tool)._arun]
    return any(_names_command(_return_hint(body)) for body in bodies if body is not None)


def _return_hint(body: Callable[..., Any]) -> Any:
    """``body``'s return annotation, or ``None`` when it cannot be resolved (the run-time
    check still refuses a returned ``Command``)."""
    try:
        return typing.get_type_hints(body).get("return")
    except Exception:  # noqa: BLE001 - any failure of user annotations
        return None


def _names_command(hint: Any) -> bool:
    """``True`` when the annotation ``hint`` is, or holds, ``Command`` or a subclass."""
    if isinstance(hint, type) and not typing.get_args(hint):
        try:
            return _Command is not None and issubclass(hint, _Command)
        except TypeError:  # pragma: no cover - a generic alias posing as a type
            return False
    parts = (typing.get_origin(hint), *typing.get_args(hint))
    return any(_names_command(part) for part in parts if part is not None)


def _holds_command(value: Any) -> bool:
    """``True`` for a LangGraph ``Command``, or a list or tuple holding one (LangGraph
    applies both)."""
    if _Command is None:  # pragma: no cover - langgraph not installed
        return False
    if isinstance(value, _Command):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_command(v) for v in value)


class _RefusedCommand(dict[str, str]):
    """What a guarded tool that returned a LangGraph ``Command`` hands the guard: a value
    no result encoder can store (``json`` reads a ``dict`` subclass through ``items()``,
    which refuses), so the call is recorded as succeeded without a result and raises
    ``ResultNotSerializableError``, whatever the guard's ``result_encoder``."""

    def __init__(self, tool: str) -> None:
        super().__init__(tool=tool)

    def items(self) -> Any:
        raise TypeError(
            f"tool {self['tool']!r} returned a LangGraph Command, which SafeAgent cannot "
            "store or replay; its state update was not applied"
        )


_RefusedCommand.__name__ = _RefusedCommand.__qualname__ = "Command"  # the record names the type


def _graph_flow() -> tuple[type[BaseException], ...]:
    """LangGraph's ``GraphInterrupt`` (what ``interrupt()`` raises), if LangGraph is
    loaded: raised through a tool, it pauses the graph, which runs the tool again from its
    start on resume, so the claim is released (see ``_common.ControlFlow``). Not the other
    ``GraphBubbleUp``: a ``ParentCommand`` (a subgraph's ``Command`` for the parent graph)
    can come after the tool's work, and the graph moves on without calling it again."""
    errors = sys.modules.get("langgraph.errors")
    interrupt = getattr(errors, "GraphInterrupt", None)
    if isinstance(interrupt, type) and issubclass(interrupt, BaseException):
        return (interrupt,)
    return ()


def _argument_names(tool: BaseTool) -> set[str]:
    """The names of the arguments the model or the caller gives ``tool``: its schema's,
    its caller-injected ones, and ``args`` for positional."""
    try:
        names = set(tool.args)
    except Exception:  # noqa: BLE001 - a schema LangChain cannot render: no names to check
        return set()
    return names | _caller_injected(tool) | {"args"}


def _stored_class(error_type: str) -> type[Any] | None:
    """The class a stored ``module.QualName`` type names, looked up only among the
    modules already imported (nothing is imported, and no module or class attribute hook
    runs, for stored data); ``None`` when it is not there (its module is not loaded, a
    class local to a function, a builtin)."""
    parts = error_type.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is None:
            continue
        found: Any = vars(module).get(parts[cut])
        for part in parts[cut + 1 :]:  # a nested class: Outer.Inner
            if not isinstance(found, type):
                return None
            found = vars(found).get(part)
        return found if isinstance(found, type) else None
    return None


def _replayed(err: ReplayedFailureError) -> ReplayedFailureError:
    """The error a replayed failure raises: a ``ToolException`` when it was one (the
    stored class, when it is imported, is ``ToolException`` or a subclass; otherwise its
    name is ``ToolException``), else the guard's message; either way its ``repr`` is the
    original exception's."""
    stored = _stored_class(err.error_type)
    is_tool_exception = (
        issubclass(stored, ToolException)
        if stored is not None
        else err.error_type.rsplit(".", 1)[-1] == "ToolException"
    )
    return (ReplayedToolError if is_tool_exception else _ReplayedToolFailureError)(
        err.error_message if is_tool_exception else str(err),
        error_type=err.error_type,
        error_message=err.error_message,
        receipt=err.receipt,
    )


def _validation_error(replayed: ReplayedFailureError) -> ValidationError | None:
    """A replayed pydantic ``ValidationError`` (one the tool body raised, parsing an API's
    reply, say) as a ``ValidationError`` again, its one error the stored message and its
    ``__cause__`` the replay (``error_type``, ``receipt``); ``None`` for any other.

    LangGraph's ``ToolNode`` takes a ``ValidationError`` from a tool for bad arguments and
    shows the model an error message by default, where any other exception stops the
    graph: the replay must be one too, or the graph's retry of a call whose first run the
    model was shown as an error would stop it. Its one error is at ``("replayed",)``
    (``ToolNode`` shows only errors with a location): its text is not the original's (the
    errors' details are not stored), and it is not a ``ReplayedFailureError``: its
    ``__cause__`` is."""
    stored = _stored_class(replayed.error_type)
    if stored is None or not issubclass(stored, ValidationError):
        return None
    detail = PydanticCustomError(
        "replayed_failure",
        "{message} (replayed; not run again)",
        {"message": replayed.error_message},
    )
    rebuilt = ValidationError.from_exception_data(
        "replayed tool failure", [{"type": detail, "loc": ("replayed",), "input": None}]
    )
    rebuilt.__cause__ = replayed
    return rebuilt


def _with_extras(
    method: Callable[..., Any],
    kwargs: dict[str, Any],
    config: RunnableConfig,
    run_manager: Any,
) -> dict[str, Any]:
    """``kwargs`` plus the ``run_manager`` and ``RunnableConfig`` parameters that
    ``method`` declares, as ``BaseTool.run`` passes them."""
    extra = dict(kwargs)
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return extra
    if "run_manager" in parameters:
        extra["run_manager"] = run_manager
    try:
        hints = typing.get_type_hints(method)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no config parameter
        hints = {}
    for name, hint in hints.items():
        if hint is RunnableConfig and name in parameters:
            extra[name] = config
            break
    return extra
