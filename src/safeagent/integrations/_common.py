"""What the tool-call integrations share. No SDK is imported here.

**Request ids** (docs/design.md section 6). By default the request id of a tool call is derived
from what the call *is*: :func:`safeagent.derive_request_id` over ``(scope, tool name,
arguments)``, the arguments bound through the tool function's signature with its defaults
applied (a default that is no JSON value as it is, such as an ``Enum`` member or a
``Decimal``, by its JSON form: :class:`ToolSpec`), minus the volatile ones the caller
names in ``exclude``. A model that re-emits the
same call after a retry mints a new tool-call id, but gets the same request id, so the
retry replays instead of running again. With ``key="tool_call_id"`` the tool-call id is the
request id instead, and :class:`TransportIdWarning` is emitted.

**Outcomes**. A call either ran (or replayed) successfully, failed (the stored failure, on
the first call and on every replay), was released (the tool raised ``NotExecuted`` or a
type declared "not executed": the next call runs again), or was rejected before anything
ran or was recorded (an unknown tool, or arguments that are not a JSON object that fits
the function's signature). Everything else propagates: SafeAgent's own errors
(``InProgressError``, ``OutcomeUnknownError``, ``ConflictError``, ``StoreError``,
``ResultNotSerializableError``, ...) and an exception that left the record in doubt (a type
declared "outcome unknown").

**Content** (what the model sees). A ``str`` result as it is, any other result as JSON
(``json.dumps(result, ensure_ascii=False)``); a failure as ``"Error: <Type>: <message>"``
with the short name of the stored exception type. Failures are rendered from the stored
error type and message, so a replay shows the model exactly what the first call showed;
with ``replay_marker`` set, replays are prefixed with it (:data:`REPLAY_MARKER` is the
suggested one).
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import textwrap
import threading
import warnings
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from safeagent import (
    AsyncGuard,
    ErrorInfo,
    ExecutionContext,
    Guard,
    NotExecuted,
    Receipt,
    Status,
    bind_arguments,
    derive_request_id,
)
from safeagent._decorator import is_guarded
from safeagent._keys import MAX_DEPTH, check_name, check_request_id, nested_deeper
from safeagent._keys import storable as storable_text
from safeagent._policy import CASE_PREFIX
from safeagent.errors import (
    ConfigurationError,
    InvalidInputError,
    InvalidRequestIdError,
    ReplayedFailureError,
)
from safeagent.errors import (
    TransportIdWarning as TransportIdWarning,  # noqa: PLC0414 - public home: safeagent.errors
)
from safeagent.integrations._keyform import key_form as key_form  # noqa: PLC0414 - shared here

KeyMode = Literal["derived", "tool_call_id"]
"""How a tool call's request id is made: ``"derived"`` (default) or ``"tool_call_id"``."""

Exclude = Collection[str] | Mapping[str, Collection[str]]
"""Volatile argument names left out of request ids and fingerprints: one collection for
every tool, or a mapping of tool name to names."""

ToolFunction = Callable[..., Any]

REPLAY_MARKER = "[replayed] "
"""A short marker to pass as ``replay_marker=``: replayed content is prefixed with it."""

MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call as the model emitted it, SDK shapes aside.

    Attributes:
        call_id: the transport id (``tool_call_id``, ``call_id``, ``tool_use_id``).
        name: the tool's name.
        arguments: the JSON text (OpenAI) or the parsed object (Anthropic).
        kind: ``"function"``; other kinds (OpenAI custom tools) are rejected.
        extra: SDK fields echoed back with the result (the Responses API ``caller``, an
            Anthropic ``toolset_name``).
    """

    call_id: str
    name: str
    arguments: Any
    kind: str = "function"
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one tool call came to.

    Attributes:
        kind: ``"succeeded"``, ``"failed"`` (a stored failure), ``"released"`` (the tool
            said it did not happen; the next call runs again) or ``"rejected"`` (nothing
            ran and nothing was recorded).
        result: the stored result (a JSON value) when ``kind == "succeeded"``.
        error: the failure's type and message otherwise.
        replay: ``True`` when the tool did not run for this call (a stored outcome).
        receipt: the guard's receipt, when there is one.
        exception: the exception the tool raised, on the call that ran it.
    """

    kind: Literal["succeeded", "failed", "released", "rejected"]
    result: Any = None
    error: ErrorInfo | None = None
    replay: bool = False
    receipt: Receipt | None = None
    exception: BaseException | None = None

    @property
    def is_error(self) -> bool:
        """``True`` unless the call succeeded."""
        return self.kind != "succeeded"

    def content(self, replay_marker: str | None = None) -> str:
        """The text the model is shown (see the module docstring)."""
        if self.kind == "succeeded":
            text = render(self.result)
        else:
            text = error_text(self.error or ErrorInfo("Error", ""))
        if self.replay and replay_marker:
            text = replay_marker + text
        return text


@dataclass(frozen=True, slots=True)
class Prepared:
    """A call ready to run through the guard."""

    func: ToolFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    request_id: str
    action: str
    payload: dict[str, Any]
    exclude: frozenset[str]


@dataclass(frozen=True, slots=True)
class CallSettings:
    """The validated options of one integration call."""

    scope: str
    key: KeyMode
    namespace: str | None
    replay_marker: str | None
    exclude_all: frozenset[str]
    exclude_by_tool: Mapping[str, frozenset[str]]

    def excluded(self, tool: str) -> frozenset[str]:
        """The volatile argument names of ``tool``."""
        return self.exclude_all | self.exclude_by_tool.get(tool, frozenset())


# -- options ---------------------------------------------------------------------------------


def check_scope(scope: object) -> str:
    """Validate a scope: a non-empty ``str`` of at most 255 characters of valid UTF-8
    without NUL (what :func:`safeagent.derive_request_id` takes), so that a bad scope is
    the caller's error before anything runs, not every tool call's.

    Raises:
        InvalidInputError: anything else.
    """
    if not isinstance(scope, str) or not scope or len(scope) > MAX_NAME or not storable_text(scope):
        raise InvalidInputError(
            f"scope must be a non-empty str of at most {MAX_NAME} characters of valid "
            f"UTF-8 without NUL (a run, conversation or order id), got {scope!r}"
        )
    return scope


def check_namespace(namespace: object) -> str | None:
    """Validate ``namespace=``: ``None`` (the guard's) or a guard namespace name.

    Raises:
        InvalidInputError: not a non-empty ``str`` of at most 255 characters of valid
            UTF-8 without NUL.
    """
    return None if namespace is None else check_name("namespace", namespace)


def check_tool_name(name: object) -> str:
    """Validate a tool name, the guard's action: a non-empty ``str`` of at most 255
    characters of valid UTF-8 without NUL.

    Raises:
        ConfigurationError: anything else (a tool so named could never run).
    """
    try:
        return check_name("tool name", name)
    except InvalidInputError as exc:
        raise ConfigurationError(f"{exc}: it is the guard's action") from None


def refuse_generator(what: str, *funcs: object) -> None:
    """Refuse generator and async generator functions (or objects whose ``__call__`` is
    one) as tool bodies: calling one runs none of its body, so the guard would record a
    call as done whose side effect never happened. ``None`` in ``funcs`` is skipped.

    Raises:
        ConfigurationError: one of ``funcs`` is such a function; ``what`` names the tool.
    """
    for func in funcs:
        if func is None:
            continue
        call = getattr(func, "__call__", None)  # noqa: B004 - the method itself
        for candidate in (func, call):
            is_async = inspect.isasyncgenfunction(candidate)
            if is_async or inspect.isgeneratorfunction(candidate):
                kind = "an async generator" if is_async else "a generator"
                raise ConfigurationError(
                    f"{what} is {kind} function: calling it runs none of its body, so the "
                    "guard would record a side effect that never happened; return the "
                    "result (collect what it yields) from a plain function"
                )


def check_key(key: object) -> KeyMode:
    """Validate ``key=``.

    Raises:
        ConfigurationError: not ``"derived"`` or ``"tool_call_id"``.
    """
    if key == "derived":
        return "derived"
    if key == "tool_call_id":
        return "tool_call_id"
    raise ConfigurationError(f"key must be 'derived' or 'tool_call_id', got {key!r}")


def check_marker(replay_marker: object) -> str | None:
    """Validate ``replay_marker=``: ``None`` or a ``str``."""
    if replay_marker is not None and not isinstance(replay_marker, str):
        raise ConfigurationError(f"replay_marker must be a str or None, got {replay_marker!r}")
    return replay_marker


def _names(value: object, what: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{what} must be a collection of argument names, got {value!r}")
    names = frozenset(value)
    if not all(isinstance(n, str) for n in names):
        raise ConfigurationError(f"{what} must hold argument names (str), got {value!r}")
    return names


def exclusions(exclude: Exclude) -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """Split ``exclude=`` into names for every tool and names by tool.

    Raises:
        ConfigurationError: a bare ``str`` or anything but names.
    """
    if isinstance(exclude, Mapping):
        return frozenset(), {str(t): _names(v, f"exclude[{t!r}]") for t, v in exclude.items()}
    return _names(exclude, "exclude"), {}


def warn_transport_ids(what: str, stacklevel: int) -> None:
    """Emit :class:`TransportIdWarning` for ``what`` (a tool or function name)."""
    warnings.warn(
        f"{what}: request ids are keyed on tool-call ids; a model that re-emits a call "
        "after a retry mints a new id, so the retry runs the side effect again. "
        "Use the default key='derived' unless the ids are stable across retries.",
        TransportIdWarning,
        stacklevel=stacklevel + 1,
    )


def settings(
    *,
    scope: str,
    exclude: Exclude,
    key: KeyMode,
    namespace: str | None,
    replay_marker: str | None,
    caller: str,
) -> CallSettings:
    """Validate the options of an integration function named ``caller``; warns when the
    request ids are keyed on tool-call ids (pointing at the caller's caller)."""
    exclude_all, exclude_by_tool = exclusions(exclude)
    checked = CallSettings(
        scope=check_scope(scope),
        key=check_key(key),
        namespace=check_namespace(namespace),
        replay_marker=check_marker(replay_marker),
        exclude_all=exclude_all,
        exclude_by_tool=exclude_by_tool,
    )
    if checked.key == "tool_call_id":
        warn_transport_ids(caller, stacklevel=3)
    return checked


def is_async_callable(func: object) -> bool:
    """``True`` for an ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


@functools.lru_cache(maxsize=256)
def is_stub(method: Callable[..., Any]) -> bool:
    """``True`` when ``method`` surely does nothing but raise ``NotImplementedError``: its
    body (after its docstring) is that ``raise``, optionally after assignments of a
    message (``msg = "..."; raise NotImplementedError(msg)``, the style ruff's EM101 asks
    for), with no call anywhere, so a framework tool whose sync (or async) body is such a
    stub has no body of that kind. Read from the source once per method. ``False`` when
    the source cannot be read, or for a decorated method (its decorator may supply the
    behaviour): the body then runs, and what it raises is recorded as usual."""
    if getattr(method, "__wrapped__", None) is not None:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    except (OSError, TypeError, SyntaxError):
        return False
    func = tree.body[0] if tree.body else None
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or func.decorator_list:
        return False
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not body or not isinstance(body[-1], ast.Raise) or body[-1].cause is not None:
        return False
    for statement in body[:-1]:  # message assignments only
        if not (
            isinstance(statement, ast.Assign)
            and all(isinstance(t, ast.Name) for t in statement.targets)
            and _inert(statement.value)
        ):
            return False
    raised = body[-1].exc
    if isinstance(raised, ast.Call):
        if raised.keywords or not all(_inert(a) for a in raised.args):
            return False
        raised = raised.func
    return isinstance(raised, ast.Name) and raised.id == "NotImplementedError"


def _inert(node: ast.expr) -> bool:
    """An expression that calls nothing: a constant, a name, a ``self.attr``-style
    attribute, or an f-string of those."""
    if isinstance(node, (ast.Constant, ast.Name)):
        return True
    if isinstance(node, ast.Attribute):
        return _inert(node.value)
    if isinstance(node, ast.JoinedStr):
        return all(
            _inert(v.value) if isinstance(v, ast.FormattedValue) else isinstance(v, ast.Constant)
            for v in node.values
        )
    return False


@dataclass(frozen=True, slots=True)
class Parameters:
    """The argument names of a tool function.

    Attributes:
        named: the parameters it names (not ``*args`` or ``**kwargs``).
        var_keyword: the name of its ``**kwargs`` parameter, if it has one: then any other
            name may be an argument too, and lands in that dict.
    """

    named: frozenset[str]
    var_keyword: str | None

    @classmethod
    def of(cls, parameters: Iterable[inspect.Parameter]) -> Parameters:
        """The names of ``parameters`` (a signature's, or part of one)."""
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        listed = list(parameters)
        var_keyword = next(
            (p.name for p in listed if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        return cls(frozenset(p.name for p in listed if p.kind not in variadic), var_keyword)


def parameter_names(name: str, func: ToolFunction) -> Parameters:
    """The argument names tool ``name`` (``func``) takes.

    Raises:
        ConfigurationError: ``func``'s signature cannot be read (some builtins), so its
            arguments cannot be bound for a request id.
    """
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"tool {name!r} has no readable signature ({exc}); wrap it in a def"
        ) from exc
    return Parameters.of(parameters)


def check_excluded(tool: str, names: frozenset[str], accepted: Parameters) -> None:
    """Refuse ``exclude`` names that are no argument of ``tool``: a misspelt volatile
    argument would silently stay in the request id, and every retry would run again. A
    tool that takes ``**kwargs`` accepts any name (it cannot be checked) but the name of
    that parameter itself.

    Raises:
        ConfigurationError: a name the tool does not take, or its ``**kwargs`` parameter.
    """
    unknown = sorted(names - accepted.named) if accepted.var_keyword is None else []
    if unknown:
        raise ConfigurationError(f"exclude names {unknown} that tool {tool!r} does not take")
    if accepted.var_keyword is not None and accepted.var_keyword in names:
        raise ConfigurationError(
            f"exclude names {accepted.var_keyword!r}, the **kwargs parameter of tool {tool!r}: "
            "that would leave every keyword argument in it out of the request id, so two "
            "different calls would be one; name the volatile keys themselves"
        )


def hoist_excluded(
    payload: dict[str, Any], var_keyword: str | None, excluded: Collection[str]
) -> dict[str, Any]:
    """``payload`` (bound arguments) with the excluded names found in its ``**kwargs``
    dict moved up beside the named arguments, so that leaving top-level names out of the
    request id and the fingerprint leaves them out too; the call itself still gets them
    as keyword arguments. ``payload`` is not changed."""
    extra = payload.get(var_keyword) if var_keyword is not None else None
    if not isinstance(extra, dict) or not any(n in extra for n in excluded):
        return payload
    hoisted = dict(payload)
    kept = dict(extra)
    for name in excluded:
        if name in kept and name not in hoisted:
            hoisted[name] = kept.pop(name)
    hoisted[var_keyword] = kept  # type: ignore[index]
    return hoisted


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool of the ``tools`` mapping, checked.

    Attributes:
        func: the tool function.
        accepted: its argument names.
        defaults: by parameter name, what a call that leaves the argument out counts as,
            for each default that is not a JSON value as it is: its JSON form (an ``Enum``
            member by its value, a ``Decimal`` by its number, a ``frozenset`` as a
            sorted list), or :data:`UNAPPLIED` for a default that has none (a sentinel
            ``object()``, a NaN). The function still gets the default itself.
    """

    func: ToolFunction
    accepted: Parameters
    defaults: Mapping[str, Any]


UNAPPLIED: Any = object()
"""A default with no JSON form: a call that leaves its argument out counts without it."""


def default_forms(func: ToolFunction) -> dict[str, Any]:
    """The forms of ``func``'s defaults that are not JSON values as they are (see
    :attr:`ToolSpec.defaults`), made as the Agents SDK path makes its arguments'
    (:func:`key_form`). A default with no JSON form a request id can hold (a sentinel
    marking "not given", a NaN, an integer beyond +-(2**53 - 1)) is left out of the
    request id and the stored payload, as the LangChain integration leaves it unapplied:
    a call that leaves the argument out differs from every call that gives it, so no two
    calls become one, and the tool still runs (it would otherwise be refused on every such
    call)."""
    forms: dict[str, Any] = {}
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for param in inspect.signature(func).parameters.values():
        if param.kind in variadic or param.default is inspect.Parameter.empty:
            continue
        if _counts(param.name, param.default):
            continue  # a JSON value already: counts as it always did
        try:
            form = key_form(param.default)
        except Exception:  # noqa: BLE001 - pydantic's, or ours: either way, no form
            form = UNAPPLIED
        forms[param.name] = form if _counts(param.name, form) else UNAPPLIED
    return forms


def _counts(name: str, value: Any) -> bool:
    """``True`` when argument ``name`` with ``value`` can be part of a request id."""
    try:
        derive_request_id("scope", "tool", {name: value})
    except InvalidInputError:
        return False
    return True


def check_tools(
    tools: Mapping[str, ToolFunction], options: CallSettings, *, allow_async: bool, twin: str
) -> dict[str, ToolSpec]:
    """Validate the tool mapping, and ``exclude`` against it, before any call runs.

    Returns:
        The tools by name, checked.

    Raises:
        ConfigurationError: not a mapping of names to callables; a tool name that cannot be
            an action (empty, over 255 characters, NUL, a lone surrogate); a tool already
            guarded (a function decorated with ``guard.guarded``, ...); a generator or
            async generator function; a tool whose signature cannot be read; an
            ``async`` tool given to a sync function (the message names the async
            ``twin``); an ``exclude`` entry for a tool that is not in
            ``tools``, or naming no argument of its tool(s).
    """
    if not isinstance(tools, Mapping):
        raise ConfigurationError("tools must be a mapping of tool name to function")
    specs: dict[str, ToolSpec] = {}
    for name, func in tools.items():
        if not isinstance(name, str) or not callable(func):
            raise ConfigurationError(f"tools[{name!r}] must map a tool name to a function")
        check_tool_name(name)
        refuse_guarded(f"tool {name!r}", func)
        refuse_generator(f"tool {name!r}", func)
        if not allow_async and is_async_callable(func):
            raise ConfigurationError(
                f"tool {name!r} is async: run it with {twin} and an AsyncGuard"
            )
        specs[name] = ToolSpec(func, parameter_names(name, func), default_forms(func))
    accepted = {name: spec.accepted for name, spec in specs.items()}
    for name, names in options.exclude_by_tool.items():
        if name not in tools:
            raise ConfigurationError(f"exclude names tool {name!r}, which is not in tools")
        check_excluded(name, names, accepted[name])
    if options.exclude_all and tools:
        # Names for every tool must each be a named argument of some tool: one tool's
        # **kwargs must not vouch for a name misspelt for another. A name only a
        # **kwargs tool can take is given for that tool, in the mapping form.
        named = frozenset().union(*(p.named for p in accepted.values()))
        unknown = sorted(options.exclude_all - named)
        if unknown:
            takers = sorted(n for n, p in accepted.items() if p.var_keyword is not None)
            hint = (
                f"; for a tool that takes **kwargs, name them for that tool: "
                f"exclude={{{takers[0]!r}: {unknown}}}"
                if takers
                else ""
            )
            raise ConfigurationError(
                f"exclude names {unknown} that no tool ({', '.join(sorted(tools))}) takes "
                f"as a named argument{hint}"
            )
    return specs


def refuse_guarded(what: str, *objs: object) -> None:
    """Refuse to guard what is already guarded: ``objs`` are the tool (or function) and
    the callables it runs (``None`` is skipped). Two guards would record one call twice,
    and where both derive the same request id the inner one meets the outer one's live
    claim, and its ``InProgressError`` is stored as the tool's failure without the tool
    ever running.

    Raises:
        ConfigurationError: one of ``objs`` is a guarded wrapper SafeAgent made, or wraps
            one (:func:`safeagent._decorator.is_guarded`); ``what`` names it.
    """
    if any(is_guarded(obj) for obj in objs):
        raise ConfigurationError(
            f"{what} is already guarded: guard the plain tool or function once"
        )


def check_guard(guard: object, kind: type[Guard] | type[AsyncGuard], twin: str) -> None:
    """Make sure the sync functions get a :class:`Guard` and the async ones an
    :class:`AsyncGuard`.

    Raises:
        ConfigurationError: the other kind of guard (the message names the ``twin``).
    """
    if not isinstance(guard, kind):
        raise ConfigurationError(f"guard must be a {kind.__name__} here (see {twin})")


# -- preparing a call ------------------------------------------------------------------------


def rejected(error_type: str, message: str) -> Outcome:
    """A call refused before anything ran or was recorded."""
    return Outcome("rejected", error=ErrorInfo(error_type, message))


ARGUMENT_DEPTH = MAX_DEPTH - 1
"""Deepest nesting of a call's arguments (the arguments object is level 1): a derived
request id covers ``[scope, tool, arguments]``, one level more, and canonical JSON takes
at most :data:`safeagent._keys.MAX_DEPTH`."""


def _nested_too_deep() -> Outcome:
    return rejected("InvalidArguments", f"arguments nest deeper than {ARGUMENT_DEPTH} levels")


def parse_arguments(arguments: Any) -> dict[str, Any] | Outcome:
    """The call's arguments as a dict, from JSON text or an already parsed object; or the
    ``InvalidArguments`` rejection. Arguments nested deeper than :data:`ARGUMENT_DEPTH`
    are refused here with one message on every Python version, whether ``json.loads``
    parses them (3.12 and later take thousands of levels) or gives up with
    ``RecursionError`` (3.11 past about a thousand), which would otherwise end the whole
    turn."""
    if isinstance(arguments, (str, bytes, bytearray)):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except RecursionError:
            return _nested_too_deep()
        except ValueError as exc:
            return rejected("InvalidArguments", f"arguments are not valid JSON: {exc}")
    elif arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping) or not all(isinstance(k, str) for k in arguments):
        return rejected("InvalidArguments", "arguments must be a JSON object")
    if nested_deeper(arguments, ARGUMENT_DEPTH):
        return _nested_too_deep()
    return dict(arguments)


def request_id_for(
    scope: str,
    action: str,
    payload: Mapping[str, Any],
    excluded: Collection[str],
    key: KeyMode,
    call_id: str,
) -> str:
    """The request id of a call whose bound arguments are ``payload``.

    Raises:
        InvalidInputError: the arguments are not JSON values (NaN, huge integers, ...).
    """
    derived = derive_request_id(
        scope, action, {k: v for k, v in payload.items() if k not in excluded}
    )
    return call_id if key == "tool_call_id" else derived


def prepare(
    call: ToolCall, tools: Mapping[str, ToolSpec], options: CallSettings
) -> Prepared | Outcome:
    """Resolve the tool, bind its arguments and derive the request id; or the rejection
    the model is shown when that fails (nothing ran, nothing was recorded). A default the
    call leaves to the function counts as its JSON form (:attr:`ToolSpec.defaults`)."""
    if call.kind != "function":
        return rejected(
            "UnsupportedToolCall", f"{call.kind} tool calls are not run here; use function tools"
        )
    spec = tools.get(call.name)
    if spec is None:
        return rejected("UnknownTool", f"no tool named {call.name!r}")
    func = spec.func
    if options.key == "tool_call_id":  # the transport id is the request id: check it here
        try:
            check_request_id(call.call_id)
        except InvalidRequestIdError as exc:
            return rejected("InvalidToolCallId", str(exc))
        if call.call_id.startswith(CASE_PREFIX):
            return rejected(
                "InvalidToolCallId",
                f"tool-call ids starting with {CASE_PREFIX!r} are reserved for case settlement",
            )
    parsed = parse_arguments(call.arguments)
    if isinstance(parsed, Outcome):
        return parsed
    excluded = options.excluded(call.name)
    try:
        payload = bind_arguments(func, (), parsed)
    except InvalidInputError as exc:
        cause = exc.__cause__  # bind_arguments names the function object; the model needs less
        return rejected("InvalidArguments", str(cause if isinstance(cause, TypeError) else exc))
    if spec.defaults:  # the defaults the call leaves to the function, as they count
        given = {k: v for k, v in payload.items() if k in parsed or k not in spec.defaults}
        left = {k: spec.defaults[k] for k in payload if k not in given}
        payload = {**given, **{k: v for k, v in left.items() if v is not UNAPPLIED}}
    if excluded:
        payload = hoist_excluded(payload, spec.accepted.var_keyword, excluded)
    if nested_deeper(payload, ARGUMENT_DEPTH):  # a **kwargs dict is one level more
        return _nested_too_deep()
    try:
        request_id = request_id_for(
            options.scope, call.name, payload, excluded, options.key, call.call_id
        )
    except InvalidInputError as exc:
        return rejected("InvalidArguments", str(exc))
    return Prepared(func, (), parsed, request_id, call.name, payload, excluded)


# -- running a call --------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """``value`` with pydantic models (anything with ``model_dump``) dumped to JSON values,
    at any depth of lists, tuples and dicts; everything else as it is (the guard's
    ``result_encoder`` then applies)."""
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def storable(value: Any) -> Any:
    """What a guarded tool body returns for the guard to store: ``plain(value)``, or
    ``value`` unchanged when dumping it raises. The tool has already run, so a conversion
    that fails is not the tool's failure: the guard's result encoder meets the same value,
    records the call as succeeded without a stored result and raises
    :class:`~safeagent.errors.ResultNotSerializableError` (docs/exceptions.md), so the call
    is never recorded as FAILED, a status an operator may re-run."""
    try:
        return plain(value)
    except Exception:  # noqa: BLE001 - any dump error: the encoder reports it
        return value


def render(value: Any) -> str:
    """A result as the model is shown it: a ``str`` as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def error_text(error: ErrorInfo) -> str:
    """A failure as the model is shown it: ``"Error: <Type>: <message>"``."""
    short = error.type.rsplit(".", 1)[-1]
    return f"Error: {short}: {error.message}" if error.message else f"Error: {short}"


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _after_failure(receipt: Receipt | None, exc: BaseException) -> Outcome | None:
    """Classify the tool's own exception by the record it left; ``None``: re-raise it."""
    if receipt is not None and receipt.status is Status.FAILED and receipt.error is not None:
        return Outcome("failed", error=receipt.error, receipt=receipt, exception=exc)
    if receipt is not None and receipt.status is Status.RELEASED:
        error = ErrorInfo(_type_name(exc), str(exc))
        return Outcome("released", error=error, receipt=receipt, exception=exc)
    return None  # in doubt (or changed under us): the caller must see the exception


def _replayed(err: ReplayedFailureError) -> Outcome:
    error = ErrorInfo(err.error_type, err.error_message)
    return Outcome("failed", error=error, replay=True, receipt=err.receipt)


def execute(guard: Guard, prepared: Prepared, namespace: str | None) -> Outcome:
    """Run one prepared call through a sync guard.

    Raises:
        GuardError: SafeAgent's own errors (in progress, in doubt, conflict, store, ...).
        BaseException: the tool's exception when it left the record in doubt.
    """
    raised: list[BaseException] = []

    def fn(_ctx: ExecutionContext) -> Any:
        try:
            value = prepared.func(*prepared.args, **prepared.kwargs)
        except BaseException as exc:
            raised.append(exc)
            raise
        return storable(value)

    try:
        receipt = guard.execute(
            prepared.request_id,
            prepared.action,
            prepared.payload,
            fn,
            namespace=namespace,
            exclude=prepared.exclude,
        )
    except Exception as exc:
        if raised and exc is raised[-1]:  # the tool's own exception, as the guard recorded it
            outcome = _after_failure(guard.get(prepared.request_id, namespace=namespace), exc)
            if outcome is None:
                raise
            return outcome
        if isinstance(exc, ReplayedFailureError):
            return _replayed(exc)
        raise
    return Outcome("succeeded", result=receipt.result, replay=receipt.replay, receipt=receipt)


async def aexecute(guard: AsyncGuard, prepared: Prepared, namespace: str | None) -> Outcome:
    """Run one prepared call through an async guard: an ``async`` tool is awaited, a sync
    one runs in a worker thread (the guard's rule). Raises as :func:`execute`."""
    raised: list[BaseException] = []
    fn: Callable[[ExecutionContext], Any]

    if is_async_callable(prepared.func):

        async def afn(_ctx: ExecutionContext) -> Any:
            try:
                value = await prepared.func(*prepared.args, **prepared.kwargs)
            except BaseException as exc:
                raised.append(exc)
                raise
            return storable(value)

        fn = afn
    else:

        def sfn(_ctx: ExecutionContext) -> Any:
            try:
                value = prepared.func(*prepared.args, **prepared.kwargs)
            except BaseException as exc:
                raised.append(exc)
                raise
            return storable(value)

        fn = sfn

    try:
        receipt = await guard.execute(
            prepared.request_id,
            prepared.action,
            prepared.payload,
            fn,
            namespace=namespace,
            exclude=prepared.exclude,
        )
    except Exception as exc:
        if raised and exc is raised[-1]:  # the tool's own exception, as the guard recorded it
            outcome = _after_failure(await guard.get(prepared.request_id, namespace=namespace), exc)
            if outcome is None:
                raise
            return outcome
        if isinstance(exc, ReplayedFailureError):
            return _replayed(exc)
        raise
    return Outcome("succeeded", result=receipt.result, replay=receipt.replay, receipt=receipt)


def run_calls(
    calls: Iterable[ToolCall],
    tools: Mapping[str, ToolSpec],
    guard: Guard,
    options: CallSettings,
) -> list[tuple[ToolCall, Outcome]]:
    """Run the calls one after another, in order, through a sync guard."""
    done: list[tuple[ToolCall, Outcome]] = []
    for call in calls:
        prepared = prepare(call, tools, options)
        if isinstance(prepared, Prepared):
            done.append((call, execute(guard, prepared, options.namespace)))
        else:
            done.append((call, prepared))
    return done


async def arun_calls(
    calls: Iterable[ToolCall],
    tools: Mapping[str, ToolSpec],
    guard: AsyncGuard,
    options: CallSettings,
) -> list[tuple[ToolCall, Outcome]]:
    """Run the calls one after another, in order, through an async guard."""
    done: list[tuple[ToolCall, Outcome]] = []
    for call in calls:
        prepared = prepare(call, tools, options)
        if isinstance(prepared, Prepared):
            done.append((call, await aexecute(guard, prepared, options.namespace)))
        else:
            done.append((call, prepared))
    return done


T = TypeVar("T")

_keepers: set[asyncio.Task[None]] = set()  # strong references: the loop keeps weak ones


async def in_own_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a new thread of its own (the context copied, as
    ``asyncio.to_thread`` does), awaited.

    For a sync :class:`~safeagent.Guard` driving an ``async`` tool body on the caller's
    loop: the loop's default executor is bounded (``min(32, CPUs + 4)`` threads), and if
    each of its threads waited on a tool body of this loop that itself needs the executor
    (``getaddrinfo``, ``to_thread``), no call would ever finish.

    If the awaiting task is cancelled, it gets ``CancelledError`` at once and the thread
    runs on: the guarded call records its outcome. A keeper task holds the loop's shutdown
    (``asyncio.run`` cancels every task, then waits for them) until the thread has ended,
    as it would wait for the default executor's threads, so the outcome is recorded before
    ``asyncio.run`` returns and ``asyncio.run`` never closes the loop under the thread (a
    caller closing its own loop is met by :func:`run_on_loop`).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[bool, Any]] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: tuple[bool, Any]) -> None:
        if not done.done():
            done.set_result(outcome)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, context.run(fn, *args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: no one awaits it
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="safeagent-guard").start()
    keeper = loop.create_task(_keep_until(done))
    _keepers.add(keeper)
    keeper.add_done_callback(_keepers.discard)
    ok, value = await asyncio.shield(done)
    if ok:
        return cast(T, value)
    raise value


_LOOP_POLL = 0.5
"""Seconds between checks, while a guard's thread waits for a tool body on a loop, that
the loop has not been closed under the body."""


def run_on_loop(loop: asyncio.AbstractEventLoop, body: Coroutine[Any, Any, T]) -> T:
    """Run ``body`` (a tool's ``async`` body) on ``loop`` from the guard's thread, and wait
    for it. A caller that runs its own loop (``run_until_complete``, then ``close``) may
    close it under the body: a closed loop never finishes it, so the wait checks every
    half second (:data:`_LOOP_POLL`) that the loop is open.

    Raises:
        NotExecuted: the loop was closed before it took ``body``: nothing ran (the claim
            is released; the next call runs).
        concurrent.futures.CancelledError: ``body`` was cancelled, or the loop was closed
            before it finished: it may have begun (the record is in doubt).
        Whatever ``body`` raised.
    """
    try:
        future = asyncio.run_coroutine_threadsafe(body, loop)
    except RuntimeError as exc:  # the loop is closed
        body.close()
        raise NotExecuted(
            "the caller's event loop was closed before the tool body started; nothing ran"
        ) from exc
    while True:
        try:
            return future.result(timeout=_LOOP_POLL)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the body's own TimeoutError
            if loop.is_closed():
                future.cancel()
                raise concurrent.futures.CancelledError(
                    "the caller's event loop was closed before the tool body finished; it "
                    "may have begun"
                ) from None


async def _keep_until(done: asyncio.Future[Any]) -> None:
    """Wait for ``done``, whatever cancels this task (see :func:`in_own_thread`)."""
    while not done.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(done)


def read(obj: Any, name: str) -> Any:
    """``obj[name]`` for a mapping, else ``getattr(obj, name, None)``: SDK objects and the
    plain dicts users build or load from JSON are read alike."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)
