"""CrewAI: a tool's side effect runs once, however often CrewAI calls the tool.

``pip install -e '.[crewai]'``. CrewAI calls a tool again when it raises: its
``ToolUsage`` retries a failing call up to three times, and tries each attempt twice
(once with the arguments filtered to the schema, once with them as the model gave them),
so a tool that sends an email and then times out on the acknowledgement sends up to six
emails. The model may also re-emit a call that succeeded. :func:`guard_tool` wraps a CrewAI
tool (a :class:`crewai.tools.BaseTool` subclass or a ``@tool`` function) into a
:class:`GuardedTool`, a CrewAI ``BaseTool`` with the same name, description, argument
schema and settings (``result_as_answer``, ``max_usage_count``, ``cache_function``, ...),
whose body runs at most once per request id:

- the first call runs the tool; a success is stored and *the stored value* is returned;
- a failure is stored and the tool's exception re-raised (CrewAI then retries, as usual);
  every re-invocation raises :class:`~safeagent.errors.ReplayedFailureError` with the
  stored type and message, without running the tool (docs/design.md section 2: the first failure
  is the outcome);
- a tool that raises :class:`~safeagent.NotExecuted` (or a type the guard declares
  "not executed") says nothing happened: the claim is released and the next attempt runs
  it again.

**Request ids** (docs/design.md section 6): :func:`safeagent.derive_request_id` over
``(scope, tool name, arguments)``, the arguments validated by the tool's schema (its
defaults applied), minus the volatile ones named in ``exclude``, made from the model
CrewAI's validation made (on ``run``/``arun`` and on the structured tool an agent's calls
invoke), not from the ``model_dump()`` CrewAI hands the body: an argument or nested field
a minting ``default_factory`` filled is left out
(:mod:`~safeagent.integrations._keyform`). Positional arguments (``run("a@example.com")``,
which CrewAI passes on unvalidated) are first bound to the names the tool's body takes
them as (its ``_run`` signature, or its function's for a ``@tool``), so ``run(x)``,
``run(x, "welcome")`` and ``run(to=x)`` are one call with one request id, and the body
gets them by keyword, defaults applied; positional arguments that cannot be bound raise
:class:`~safeagent.errors.InvalidInputError` before anything runs. CrewAI has no
conversation id to borrow, so the **scope** is required: a fixed ``str`` (a run, order or
ticket id known when the crew is built), a callable given the call's arguments (return a
``str``; read a context variable of your own, for example), or ``scope_arg``: the name of
one of the tool's arguments whose value is the scope (``"order_id"``). A call whose scope
is missing raises :class:`~safeagent.errors.MissingKeyError` before anything runs.

**Results**. The stored JSON value is returned (pydantic models dumped). A result that
cannot be stored (a model whose dump fails) leaves the record SUCCEEDED without a result,
and that call and every re-invocation raise
:class:`~safeagent.errors.ResultNotSerializableError`: the tool ran, so it is never
recorded as failed and never runs again.

CrewAI runs tools synchronously, so the guard is a :class:`~safeagent.Guard`; an
``async`` tool (an ``async`` ``_arun``, or a ``@tool`` ``async def``) is awaited through
``arun`` on the caller's loop with the guard in a worker thread, and a sync one runs in
that thread. ``run`` on a tool without a sync body (a ``_run`` that only raises
``NotImplementedError``) raises :class:`~safeagent.errors.ConfigurationError`; the claim
is released, so a later ``arun`` runs it (a stored outcome is still replayed). A body cut
off by the caller's event loop shutting down leaves the record in doubt
(:class:`~safeagent.errors.OutcomeUnknownError` on a retry).

.. versionadded:: 0.3
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar

from crewai.tools import BaseTool
from crewai.tools.base_tool import Tool
from crewai.tools.structured_tool import CrewStructuredTool
from pydantic import ConfigDict, PrivateAttr
from pydantic_core import PydanticSerializationError

from safeagent import ExecutionContext, Guard, NotExecuted, derive_request_id
from safeagent.errors import (
    ConfigurationError,
    InvalidInputError,
    InvalidPayloadError,
    MissingKeyError,
)
from safeagent.integrations._common import storable
from safeagent.integrations._keyform import minted_unset, payload_form, value_form
from safeagent.integrations._loops import in_own_thread, run_on_loop
from safeagent.integrations._toolspec import (
    check_scope,
    is_async_callable,
    is_stub,
    refuse_generator,
    refuse_guarded,
    scope_text,
)

__all__ = ["CrewScope", "GuardedTool", "guard_tool"]

CrewScope = str | Callable[[Mapping[str, Any]], Any]
"""A fixed scope, or a callable given the call's validated arguments that returns the
scope (a non-empty ``str``; ``None`` or ``""`` mean "missing")."""


def guard_tool(
    tool: BaseTool,
    guard: Guard,
    *,
    scope: CrewScope | None = None,
    scope_arg: str | None = None,
    exclude: Collection[str] = (),
    namespace: str | None = None,
) -> GuardedTool:
    """Wrap a CrewAI tool so that its side effect runs at most once per request id.

    Args:
        tool: a ``crewai.tools.BaseTool`` (a subclass instance, or a ``@tool`` function).
            It is not modified; give the agent the returned tool instead.
        guard: a sync :class:`~safeagent.Guard`.
        scope: a fixed scope (``str``), or a callable given the call's arguments (a
            mapping of name to value) that returns it. Exactly one of ``scope`` and
            ``scope_arg``.
        scope_arg: the name of the tool argument whose value is the scope.
        exclude: names of volatile arguments left out of the request id and of the
            fingerprint (they are still passed to the tool and stored).
        namespace: the tenant namespace of the records (default: the guard's).

    Returns:
        A :class:`GuardedTool` with the tool's name, description and schema.

    Raises:
        ConfigurationError: ``tool`` is not a CrewAI ``BaseTool`` or is already guarded
            (a :class:`GuardedTool`, or a ``@tool`` over a guarded function), its
            function (or ``_run``/``_arun``) is a generator or async generator function
            (calling one runs none of its body), ``guard`` is not a
            :class:`~safeagent.Guard`, not exactly one of ``scope`` and ``scope_arg`` is
            given, or ``scope_arg`` or a name in ``exclude`` is not one of the tool's
            arguments.
        InvalidInputError: a fixed ``scope`` that is not a non-empty ``str`` of at most
            255 characters.
    """
    if not isinstance(tool, BaseTool):
        raise ConfigurationError(f"tool must be a crewai.tools.BaseTool, got {tool!r}")
    refuse_guarded(f"tool {tool.name!r}", tool, tool.func if isinstance(tool, Tool) else None)
    refuse_generator(
        f"tool {tool.name!r}",
        tool.func if isinstance(tool, Tool) else None,
        getattr(type(tool), "_run", None),
        getattr(type(tool), "_arun", None),
    )
    if not isinstance(guard, Guard):
        raise ConfigurationError(
            f"guard must be a safeagent.Guard (CrewAI runs tools synchronously), got {guard!r}"
        )
    if (scope is None) == (scope_arg is None):
        raise ConfigurationError(
            f"tool {tool.name!r}: give exactly one of scope= (a str or a callable) and "
            "scope_arg= (the argument holding the scope)"
        )
    if isinstance(scope, str):
        check_scope(scope)
    elif scope is not None and not callable(scope):
        raise ConfigurationError(f"scope must be a str or a callable, got {scope!r}")
    fields = set(getattr(tool.args_schema, "model_fields", {}) or {})
    if scope_arg is not None and scope_arg not in fields:
        raise ConfigurationError(
            f"tool {tool.name!r} has no argument {scope_arg!r} (scope_arg); it has {sorted(fields)}"
        )
    if isinstance(exclude, str) or not all(isinstance(n, str) for n in exclude):
        raise ConfigurationError(f"exclude must be a collection of argument names: {exclude!r}")
    unknown = sorted(set(exclude) - fields)
    if unknown:  # a misspelt volatile name would stay in the request id: every retry runs
        raise ConfigurationError(
            f"tool {tool.name!r} has no arguments {unknown} (exclude); it has {sorted(fields)}"
        )
    guarded = GuardedTool(
        name=tool.name,
        description=tool.description,
        env_vars=tool.env_vars,
        args_schema=tool.args_schema,
        result_schema=tool.result_schema,
        cache_function=tool.cache_function,
        result_as_answer=tool.result_as_answer,
        max_usage_count=tool.max_usage_count,
        tool_failure_policy=tool.tool_failure_policy,
    )
    guarded._inner = tool
    guarded._guard = guard
    guarded._scope = scope
    guarded._scope_arg = scope_arg
    guarded._exclude = frozenset(exclude)
    guarded._namespace = namespace
    guarded._positional = _positional_names(tool)
    return guarded


class _Validations:
    """The models CrewAI's validation made, by the identity of the values of the dump it
    handed on: the dump reaches ``_run`` as keyword arguments (a new dict of the same
    objects), so the model is found again only for exactly those objects. Two calls whose
    dumps hold the very same objects (small ints, ``None``, one-letter strings) are the
    same call, and each takes one of their models. Kept while its dump is (so no id is
    reused meanwhile), at most :data:`VALIDATIONS_KEPT`; a call whose model is not found
    keys on its dump, as a body reached another way does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[tuple[str, int], ...], list[tuple[dict[str, Any], Any]]]
        self._kept = OrderedDict()
        self._count = 0

    @staticmethod
    def _key(values: dict[str, Any]) -> tuple[tuple[str, int], ...]:
        return tuple((name, id(value)) for name, value in values.items())

    def note(self, dumped: dict[str, Any], validated: Any) -> None:
        with self._lock:
            self._kept.setdefault(self._key(dumped), []).append((dumped, validated))
            self._count += 1
            while self._count > VALIDATIONS_KEPT:
                _, dropped = self._kept.popitem(last=False)
                self._count -= len(dropped)

    def take(self, kwargs: dict[str, Any]) -> Any:
        """The model whose dump ``kwargs`` holds, object for object, else ``None`` (the
        key's ids are those very objects: a kept dump and ``kwargs`` both hold theirs
        alive, so no two of them share an id)."""
        key = self._key(kwargs)
        with self._lock:
            entries = self._kept.get(key)
            if not entries:
                return None
            _, validated = entries.pop(0)
            self._count -= 1
            if not entries:
                del self._kept[key]
        return validated


VALIDATIONS_KEPT = 1024
"""Validated models a :class:`GuardedTool` keeps for calls still to reach its body (one
per call between CrewAI's validation and the body, such as structured ``ainvoke`` calls
waiting for the executor; a call stopped between them, by a usage limit, leaves one
behind until it is among the oldest)."""


class GuardedTool(BaseTool):
    """A CrewAI tool whose side effect runs at most once per request id.

    Made by :func:`guard_tool` (see the module docstring). ``inner`` is the wrapped tool.

    .. versionadded:: 0.3
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    __safeagent_guarded__: ClassVar[bool] = True

    _inner: BaseTool = PrivateAttr()
    _guard: Guard = PrivateAttr()
    _scope: CrewScope | None = PrivateAttr(default=None)
    _scope_arg: str | None = PrivateAttr(default=None)
    _exclude: frozenset[str] = PrivateAttr(default=frozenset())
    _namespace: str | None = PrivateAttr(default=None)
    _positional: tuple[str, ...] = PrivateAttr(default=())
    _validations: _Validations = PrivateAttr(default_factory=_Validations)

    @property
    def inner(self) -> BaseTool:
        """The wrapped tool (calling it directly bypasses the guard)."""
        return self._inner

    def _validate_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """CrewAI's validation (``BaseTool.run``/``arun``): the ``model_dump()`` of the
        validated arguments, as CrewAI hands them on; the validated model is kept for the
        request id (:meth:`_request`), which must know which fields the call set."""
        schema = self.args_schema
        if schema is None or not schema.model_fields:
            return super()._validate_kwargs(kwargs)
        try:
            validated = schema.model_validate(kwargs)
        except Exception:  # noqa: BLE001 - CrewAI raises its own error, with its hint
            return super()._validate_kwargs(kwargs)
        dumped = validated.model_dump()
        self._validations.note(dumped, validated)
        return dumped

    def to_structured_tool(self) -> CrewStructuredTool:
        """CrewAI's structured form of this tool (what an agent's tool calls invoke), whose
        argument parsing also keeps the validated model for the request id."""
        structured = super().to_structured_tool()
        with contextlib.suppress(TypeError):  # a CrewAI whose class cannot be swapped: the dump
            structured.__class__ = _StructuredTool
        return structured

    def _note_parsed(self, raw: Any, parsed: dict[str, Any]) -> None:
        """Keep the model the raw arguments of a structured call validate to, for the
        dump ``parsed`` CrewAI made of them (validated once more here: the fields the
        call did not set are the same, and those are what the request id needs)."""
        schema = self.args_schema
        if schema is None or not schema.model_fields:
            return
        try:
            if isinstance(raw, str):
                raw = json.loads(raw)
            validated = schema.model_validate(raw)
        except Exception:  # noqa: BLE001 - CrewAI's parse succeeded; ours falls back to the dump
            return
        self._validations.note(parsed, validated)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = (), self._by_name(args, kwargs)
        request_id, payload, unsent = self._request(kwargs)
        unrunnable = self._unrunnable("call it with arun")

        def fn(_ctx: ExecutionContext) -> Any:
            if unrunnable is not None:  # nothing can run: the claim is released
                raise unrunnable
            return storable(self._run_sync(args, kwargs))

        try:
            receipt = self._guard.execute(
                request_id,
                self.name,
                payload,
                fn,
                namespace=self._namespace,
                exclude=self._exclude | unsent,
            )
        except NotExecuted as exc:
            if exc is unrunnable:
                raise ConfigurationError(str(exc)) from None
            raise
        return receipt.result

    async def _arun(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = (), self._by_name(args, kwargs)
        request_id, payload, unsent = self._request(kwargs)
        loop = asyncio.get_running_loop()
        inner = self._inner
        is_async = _has_async_body(inner)
        unrunnable = None if is_async else self._unrunnable("it has no async body either")

        def fn(_ctx: ExecutionContext) -> Any:
            if is_async:  # the tool body runs on the caller's loop, the guard in a thread
                value = run_on_loop(loop, inner._arun(*args, **kwargs))
            elif unrunnable is not None:
                raise unrunnable
            else:
                value = self._run_sync(args, kwargs)
            return storable(value)  # the tool has run: a conversion error is not its failure

        try:
            # A body on the loop: the guard in a thread of its own, not the loop's bounded
            # executor, which that body may need (in_own_thread).
            receipt = await (in_own_thread if is_async else asyncio.to_thread)(
                self._guard.execute,
                request_id,
                self.name,
                payload,
                fn,
                namespace=self._namespace,
                exclude=self._exclude | unsent,
            )
        except NotExecuted as exc:
            if exc is unrunnable:
                raise ConfigurationError(str(exc)) from None
            raise
        return receipt.result

    def _run_sync(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The tool's sync body, as crewai's ``BaseTool.run`` runs it (a coroutine it
        returns is run to completion)."""
        result = self._inner._run(*args, **kwargs)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return result

    def _unrunnable(self, hint: str) -> NotExecuted | None:
        """What ``fn`` raises when the tool has no sync body (nothing ran, so the guard
        releases the claim and the caller gets a ``ConfigurationError``), else ``None``."""
        if not is_stub(type(self._inner)._run):
            return None
        return NotExecuted(
            f"tool {self.name!r} has no sync body (its _run only raises "
            f"NotImplementedError): nothing ran; {hint}"
        )

    def _by_name(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name: ``kwargs`` as they are when there are no
        positional ones (CrewAI validated them), else ``args`` bound in order to the names
        the tool's body takes them as, merged with ``kwargs`` and validated by the tool's
        schema as CrewAI validates keyword arguments (defaults applied).

        Raises:
            InvalidInputError: more positional arguments than the body takes by name, one
                bound to a name the schema does not declare, or a name given both
                positionally and by keyword. Nothing ran.
            ValueError: (CrewAI's) the arguments do not fit the tool's schema.
        """
        if not args:
            return kwargs
        names = self._positional
        if len(args) > len(names):
            raise InvalidInputError(
                f"tool {self.name!r} got {len(args)} positional arguments but takes at most "
                f"{len(names)} by name {list(names)}; nothing ran: pass keyword arguments"
            )
        bound = dict(zip(names, args, strict=False))
        fields = getattr(self.args_schema, "model_fields", None)
        unknown = [name for name in bound if fields is not None and name not in fields]
        if unknown:  # the schema's validation would drop them: the body would not get them
            raise InvalidInputError(
                f"tool {self.name!r} got positional arguments for {unknown}, which its "
                "schema does not declare; nothing ran: pass keyword arguments"
            )
        twice = sorted(set(bound) & set(kwargs))
        if twice:
            raise InvalidInputError(
                f"tool {self.name!r} got {twice} both positionally and by keyword; nothing ran"
            )
        return self._validate_kwargs({**bound, **kwargs})

    def _request(self, kwargs: dict[str, Any]) -> tuple[str, Any, frozenset[str]]:
        """The request id, the payload (the arguments as JSON values) and the arguments a
        minting ``default_factory`` filled: from the model CrewAI's validation made of
        them when that is known (so such an argument, or a nested field, is left out of
        the request id, :mod:`~safeagent.integrations._keyform`), else from the
        ``model_dump()`` CrewAI hands the tool."""
        validated = self._validations.take(kwargs)
        keyed, unsent = (
            (kwargs, frozenset()) if validated is None else arguments_of(validated, kwargs)
        )
        try:
            payload: dict[str, Any] = payload_form(keyed, unsent)
        except PydanticSerializationError as exc:
            raise InvalidPayloadError(
                f"tool {self.name!r}: arguments are not JSON values: {exc}"
            ) from exc
        if self._scope_arg in unsent:
            raise MissingKeyError(
                f"tool {self.name!r}: argument {self._scope_arg!r} (the scope of its request "
                "ids) was not sent, and its default_factory makes a new value on every call"
            )
        if self._scope_arg is not None:
            value: Any = kwargs.get(self._scope_arg)
            where = f"argument {self._scope_arg!r}"
        elif isinstance(self._scope, str):
            value, where = self._scope, "scope"
        else:
            assert self._scope is not None  # guard_tool checked it
            value, where = self._scope(dict(kwargs)), "the scope callable"
        if value is None or value == "":
            raise MissingKeyError(
                f"tool {self.name!r} has no scope for its request ids: {where} gave {value!r}"
            )
        error = ConfigurationError if where == "the scope callable" else InvalidInputError
        scope = scope_text(value, f"tool {self.name!r}: {where}", error)
        kept = {k: v for k, v in payload.items() if k not in self._exclude and k not in unsent}
        return derive_request_id(scope, self.name, kept), payload, unsent


def _positional_names(tool: BaseTool) -> tuple[str, ...]:
    """The names the tool's body takes positional arguments as, in order: the parameters
    of a ``@tool`` function, else of ``_run`` (of ``_arun`` for an async-only tool) that
    may be passed by position and by keyword, up to the first that may not; ``()`` when
    the signature cannot be read."""
    body: Any
    if isinstance(tool, Tool):
        body = tool.func
    elif is_stub(type(tool)._run) and _has_async_body(tool):
        body = tool._arun
    else:
        body = tool._run
    try:
        parameters = inspect.signature(body).parameters.values()
    except (TypeError, ValueError):
        return ()
    names: list[str] = []
    for parameter in parameters:
        if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        names.append(parameter.name)
    return tuple(names)


def _has_async_body(tool: BaseTool) -> bool:
    """``True`` when ``tool`` has an ``async`` body of its own: an ``async def`` ``@tool``
    function, or an ``_arun`` that does more than raise ``NotImplementedError``. (A sync
    ``@tool`` function has none: crewai's ``Tool._arun`` would run it, then raise.)"""
    if isinstance(tool, Tool):
        return is_async_callable(tool.func)
    arun = type(tool)._arun
    return arun is not BaseTool._arun and not is_stub(arun)


class _StructuredTool(CrewStructuredTool):
    """CrewAI's structured tool of a :class:`GuardedTool`, whose argument parsing also
    hands the guarded tool the validated model (see :meth:`GuardedTool._note_parsed`)."""

    def _parse_args(self, raw_args: str | dict[str, Any]) -> dict[str, Any]:
        parsed = super()._parse_args(raw_args)
        tool = self._original_tool
        if isinstance(tool, GuardedTool):
            tool._note_parsed(raw_args, parsed)
        return parsed


def arguments_of(validated: Any, dumped: dict[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """The arguments to key a call on, from the validated model and the ``model_dump()``
    of it CrewAI hands the body, and the keys of those a minting ``default_factory``
    filled (the request id and the fingerprint leave them out; the payload keeps them):
    each argument as dumped (as before this model was kept), except one whose value needs
    :mod:`~safeagent.integrations._keyform`'s own form (a nested model with a field such
    a factory filled, say), taken from the model. A dump key is a field's name or,
    when the schema sets ``serialize_by_alias``, its alias (as ``model_dump()`` writes
    it); one an extra value wrote over its field (the body gets the extra) counts as
    dumped."""
    fields = type(validated).model_fields
    by_alias = bool(type(validated).model_config.get("serialize_by_alias"))  # model_dump()'s
    by_key = {}
    for name, info in fields.items():
        alias = getattr(info, "serialization_alias", None) or getattr(info, "alias", None)
        by_key[(alias or name) if by_alias else name] = name
    extra = getattr(validated, "__pydantic_extra__", None) or {}
    unset = minted_unset(validated, fields)
    arguments: dict[str, Any] = {}
    unsent: set[str] = set()
    for key, dumped_value in dumped.items():
        name = by_key.get(key)
        if name is None or key in extra:  # not a field's, or the extra's value: as dumped
            arguments[key] = dumped_value
        elif name in unset:
            arguments[key] = dumped_value
            unsent.add(key)
        else:
            form, held = value_form(getattr(validated, name))
            arguments[key] = form if held else dumped_value
    return arguments, frozenset(unsent)
