"""The developer-facing checks of an integration's options and tools, made before any call
runs: the scope, ``key=``, ``namespace=``, ``replay_marker=`` and ``exclude=`` options
(:func:`settings`, giving :class:`CallSettings`), and the tool functions themselves
(:func:`check_tools`, giving a :class:`ToolSpec` each: a name that can be the guard's
action, no tool already guarded, no generator, a readable signature, ``exclude`` names
the tool takes, the JSON forms of its defaults). A bad option or tool is the developer's
:class:`~safeagent.errors.ConfigurationError` (or ``InvalidInputError``) at once, not
every tool call's. No SDK is imported here.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from safeagent import AsyncGuard, Guard, derive_request_id
from safeagent._decorator import is_guarded
from safeagent._keys import check_name
from safeagent._keys import storable as storable_text
from safeagent.errors import (
    ConfigurationError,
    GuardError,
    InvalidInputError,
    TransportIdWarning,
)
from safeagent.integrations._keyform import key_form

KeyMode = Literal["derived", "tool_call_id"]
"""How a tool call's request id is made: ``"derived"`` (default) or ``"tool_call_id"``."""

Exclude = Collection[str] | Mapping[str, Collection[str]]
"""Volatile argument names left out of request ids and fingerprints: one collection for
every tool, or a mapping of tool name to names."""

ToolFunction = Callable[..., Any]

MAX_NAME = 255


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


def scope_text(value: object, where: str, error: type[GuardError]) -> str:
    """A scope read per call (from a scope callable, or an argument: ``where`` names it):
    a ``str`` as it is, an ``int`` as its decimal digits (an order number), then checked
    by :func:`check_scope`. Anything else is ``error`` before anything runs: its ``str()``
    need not be the same for the same scope read again (an object's default ``repr``
    holds its memory address; a dict's follows its key order), so every retry could get
    a new scope and run again.

    Raises:
        ``error``: a value of another type (``ConfigurationError`` for a scope callable,
            ``InvalidInputError`` for an argument the model gave).
        InvalidInputError: an empty, too long or unstorable ``str``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        # int's own repr: the digits, whatever a subclass's __str__ (an IntEnum's differs
        # between Python 3.10 and 3.11), and a ValueError past Python's digit limit.
        try:
            value = int.__repr__(value)
        except ValueError as exc:
            raise error(f"{where} gave an int too long for a scope: {exc}") from None
    elif isinstance(value, str):
        value = str.__str__(value)  # a plain str: a subclass's __str__ is not the scope
    if not isinstance(value, str):
        raise error(
            f"{where} gave {type(value).__name__} {value!r} as the scope: a scope is a str "
            "(or an int), the id of the run, conversation or order the call belongs to"
        )
    return check_scope(value)


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
