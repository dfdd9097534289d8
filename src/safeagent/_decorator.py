"""The decorator form: a function whose calls run through the guard.

The payload is the function's arguments bound through its signature with defaults
applied; the request id comes from the caller (``.call(request_id, ...)``) or from one
argument (``key_arg=``), encoded as canonical JSON (docs/design.md section 6).

Every guarded wrapper SafeAgent makes (this module's, and the integrations') carries
:data:`GUARDED_MARKER`; :func:`is_guarded` finds it, and guarding such a wrapper again is
refused: two guards would record one call twice, and where both derive the same request
id the inner one meets the outer one's live claim, and its ``InProgressError`` is stored
as the call's failure without the function ever running.

A guarded ``classmethod`` or ``staticmethod`` object (``@guarded`` above the built-in
decorator) is read through its class as that built-in would: a staticmethod is the
guarded function itself, through the class or an instance; a classmethod is bound to the
class and keyed without ``cls``, as a method is keyed without ``self``. ``@classmethod``
above ``@guarded`` works the same before Python 3.13 (a classmethod then reads what it
wraps through ``__get__``); from 3.13 a call through it is refused, as it would pass
``cls`` into the payload.

A guarded function pickles by reference, as a function does: its ``module.qualname``
(the wrapped function's) must name it, so a module-level guarded function crosses to a
``ProcessPoolExecutor`` worker, which imports its module and meets that module's guard;
``copy.copy`` and ``copy.deepcopy`` return the guarded function itself.
"""

from __future__ import annotations

import functools
import inspect
import pickle
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar

from safeagent._keys import check_name, key_from_value
from safeagent._policy import Seconds
from safeagent.errors import ConfigurationError, InvalidInputError, MissingKeyError

if TYPE_CHECKING:
    from safeagent._aguard import AsyncGuard
    from safeagent._guard import Guard

P = ParamSpec("P")
R = TypeVar("R")
B = TypeVar("B", bound="_Bound")

Binding = Literal["class", "static"]
"""How a class binds a guarded ``classmethod`` (``"class"``) or ``staticmethod``
(``"static"``) object; ``None`` for anything else."""

_CLASSMETHOD_CALLS_GET = sys.version_info < (3, 13)
"""Before Python 3.13 a ``classmethod`` reads what it wraps through that object's
``__get__`` (so ``@classmethod`` above ``@guarded`` binds the class as a guarded
classmethod does); from 3.13 it binds it as a plain callable, ``cls`` first."""

GUARDED_MARKER = "__safeagent_guarded__"
"""The attribute (``True``) every guarded wrapper SafeAgent makes carries."""


def is_guarded(obj: object) -> bool:
    """``True`` when ``obj`` is a guarded wrapper SafeAgent made, or wraps one: followed
    through ``__wrapped__`` (``functools.wraps``), ``functools.partial`` and bound
    methods, at most 100 levels deep."""
    seen: set[int] = set()
    todo = [obj]
    while todo and len(seen) < 100:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if getattr(item, GUARDED_MARKER, False) is True:
            return True
        todo.append(getattr(item, "__wrapped__", None))
        todo.append(getattr(item, "__func__", None))  # a bound method
        if isinstance(item, functools.partial):
            todo.append(item.func)
    return False


def _label(func: object) -> str:
    """A name of ``func`` for messages (any callable)."""
    name = getattr(func, "__qualname__", None)
    return name if isinstance(name, str) else repr(func)


def _default_action(func: Callable[..., Any]) -> str:
    """The action name of ``func`` when ``action=`` is not given: ``module.qualname`` of
    a function, or of the function under a ``functools.partial`` that fixes only keyword
    arguments (they are parameters with defaults, so in the payload).

    Raises:
        ConfigurationError: ``func`` is a partial fixing positional arguments or a callable
            object (what tells two of them apart, the fixed arguments or the object's
            state, is in no payload: two calls under one key would replay each other's
            receipt), or its name is no valid action (not a non-empty ``str`` of at most
            255 characters): pass ``action=``.
    """
    target: Any = func
    while isinstance(target, functools.partial):
        if target.args:
            raise ConfigurationError(
                f"{_label(func)} is a functools.partial with positional arguments, which "
                "no payload holds: pass action= (one per distinct partial)"
            )
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isbuiltin(target)):
        raise ConfigurationError(
            f"{_label(func)} is a callable object, whose state no payload holds: pass "
            "action= (one per distinct object)"
        )
    default = f"{getattr(target, '__module__', None)}.{target.__qualname__}"
    try:
        return check_name("action", default)
    except InvalidInputError as exc:
        raise ConfigurationError(
            f"{_label(func)} has no usable default action name ({exc}); pass action="
        ) from None


def _unwrap_descriptor(func: Any) -> tuple[Any, Binding | None]:
    """The callable under a ``classmethod`` or ``staticmethod`` object and how a class
    binds it: ``(function, "class")``, ``(function, "static")``; anything else is
    ``(func, None)``."""
    if isinstance(func, classmethod):
        return func.__func__, "class"
    if isinstance(func, staticmethod):
        return func.__func__, "static"
    return func, None


def _wrap(wrapper: Any, func: Any) -> None:
    """``functools.update_wrapper`` without what would hide the wrapper's own attributes:
    a function's ``__dict__`` entries are copied only where the wrapper's class has no
    attribute of that name (``call``, ``payload``, ...), and a callable object's state
    not at all."""
    functools.update_wrapper(wrapper, func, updated=())
    if inspect.isfunction(func):
        for name, value in vars(func).items():
            if not hasattr(type(wrapper), name) and name not in vars(wrapper):
                setattr(wrapper, name, value)


class _Bound:
    """Binding of arguments to a payload and a request id; shared by both flavours.

    ``func`` is a function, a callable object, or a ``classmethod`` or ``staticmethod``
    object over one (see :meth:`_access`).

    Raises:
        ConfigurationError: ``func`` is not callable or already guarded (see
            :func:`is_guarded`), it has no default action name and ``action`` is not
            given, or a bad ``key_arg`` or ``exclude``.
    """

    __safeagent_guarded__ = True

    def __init__(
        self,
        func: Callable[..., Any],
        action: str | None,
        key_arg: str | None,
        exclude: Collection[str],
        allow_missing_key: bool,
        options: dict[str, Any],
    ) -> None:
        func, self.binding = _unwrap_descriptor(func)
        if not callable(func):
            raise ConfigurationError(f"{_label(func)} is not callable: guard a function")
        if is_guarded(func):
            raise ConfigurationError(
                f"{_label(func)} is already guarded: guard the plain function once"
            )
        _wrap(self, func)
        self.func = func
        # The module keeps two tools named `refund` in two modules apart.
        self.action = check_name("action", action) if action else _default_action(func)
        self.signature = inspect.signature(func)
        if key_arg is not None and key_arg not in self.signature.parameters:
            raise ConfigurationError(f"key_arg {key_arg!r} is not a parameter of {func}")
        if isinstance(exclude, str):
            raise ConfigurationError("exclude must be a collection of parameter names")
        parameters = self.signature.parameters.values()
        self.var_keyword = next(
            (p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        if self.var_keyword is not None and self.var_keyword in set(exclude):
            raise ConfigurationError(
                f"exclude names {self.var_keyword!r}, the **kwargs parameter of {func}: that "
                "would leave every keyword argument in it out of the fingerprint; name the "
                "volatile keys themselves"
            )
        unknown = sorted(set(exclude) - set(self.signature.parameters))
        if unknown and self.var_keyword is None:
            # A misspelt volatile name would stay in the fingerprint: every retry with a
            # new value would be refused as another request. Names a **kwargs parameter
            # may receive cannot be checked.
            raise ConfigurationError(f"exclude names {unknown} that {func} does not take")
        self.key_arg = key_arg
        self.exclude = frozenset(exclude)
        self.allow_missing_key = allow_missing_key
        self.options = options

    def payload(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The payload a call with these arguments is fingerprinted on."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"{self.action}: {exc}") from exc
        bound.apply_defaults()
        skip = self.exclude | ({self.key_arg} if self.key_arg else set())
        payload = {k: v for k, v in bound.arguments.items() if k not in skip}
        var_keyword = self.var_keyword
        extra = payload.get(var_keyword) if var_keyword is not None else None
        if var_keyword is not None and isinstance(extra, dict) and not skip.isdisjoint(extra):
            payload[var_keyword] = {k: v for k, v in extra.items() if k not in skip}  # **kwargs
        return payload

    def request_id_for(self, key: object) -> str:
        """The request id a key value stands for: its canonical JSON (docs/design.md section 6), so
        ``0``, ``False`` and ``"0"`` differ, and ``"k-1"`` is stored as ``'"k-1"'``. Use it
        to look a call up with ``guard.get``.

        Raises:
            MissingKeyError: ``None`` or ``""``.
        """
        request_id = key_from_value(key)
        if request_id is None:
            raise MissingKeyError(f"{self.action}: the idempotency key is missing; nothing ran")
        return request_id

    def _access(self, obj: Any, objtype: Any) -> Any:
        """What reading the guarded function as an attribute gives (``__get__``): a guarded
        staticmethod is itself, through the class or an instance; a guarded classmethod is
        bound to the class (``objtype``, or the instance's class); a function is a method
        of an instance (:meth:`_bind_self`), and through a class :class:`_ClassAccess`."""
        if self.binding == "static":
            return self
        if self.binding == "class":
            return self._bind_self(type(obj) if objtype is None else objtype)
        return self._through_class(objtype) if obj is None else self._bind_self(obj)

    def _through_class(self, owner: Any) -> Any:
        """What reading the function from a class gives (see :class:`_ClassAccess`)."""
        return _ClassAccess(self, owner) if isinstance(owner, type) else self

    def _bind_self(self, obj: Any) -> Any:
        """A copy for use as a method of ``obj`` (an instance, or the class of a
        classmethod): the first parameter, ``self`` or ``cls``, is bound and left out of
        the payload (it is the object, not the request)."""
        bound = object.__new__(type(self))  # not copy.copy: that returns self, as below
        bound.__dict__.update(vars(self))
        first = next(iter(self.signature.parameters), None)
        if first is not None:
            bound.exclude = self.exclude | {first}
        return _Method(bound, obj)

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The request id from ``key_arg``, or ``None`` when it is missing.

        Raises:
            ConfigurationError: see :meth:`_refuse_outer_classmethod`.
            MissingKeyError: no ``key_arg``, or its value is missing and
                ``allow_missing_key`` is not set.
            InvalidInputError: the arguments do not fit the signature.
        """
        self._refuse_outer_classmethod(args)
        if self.key_arg is None:
            raise MissingKeyError(
                f"{self.action} has no key_arg: call it as .call(request_id, ...)"
            )
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"{self.action}: {exc}") from exc
        bound.apply_defaults()
        request_id = key_from_value(bound.arguments.get(self.key_arg))
        if request_id is None and not self.allow_missing_key:
            raise MissingKeyError(
                f"{self.action}: the idempotency key argument {self.key_arg!r} is missing "
                "(None or empty); nothing ran"
            )
        return request_id

    def _refuse_outer_classmethod(self, args: tuple[Any, ...]) -> None:
        """On Python 3.13+, refuse a call through ``@classmethod`` placed above
        ``@guarded``: that classmethod passes ``cls`` as a plain first argument (into the
        payload), and ``.call`` / ``.payload`` read through it get no ``cls`` at all.

        Args:
            args: the call's positional arguments; only a class first is looked at, for
                a ``classmethod`` object in its MRO wrapping this guarded function.

        Raises:
            ConfigurationError: it is such a call; nothing ran.
        """
        if _CLASSMETHOD_CALLS_GET or not args or not isinstance(args[0], type):
            return
        me: object = self
        for klass in args[0].__mro__:
            if any(
                isinstance(attr, classmethod) and attr.__func__ is me
                for attr in vars(klass).values()
            ):
                raise ConfigurationError(
                    f"{self.action}: @classmethod above @guarded does not bind the class on "
                    "Python 3.13+; put @guarded above @classmethod; nothing ran"
                )

    def __reduce__(self) -> str:
        """Pickle by reference, as a function: the name ``module.qualname`` of the wrapped
        function, which unpickling looks up (the guard, with its live store, is never
        pickled).

        Raises:
            pickle.PicklingError: a guarded callable object or partial (no such name).
                Pickle raises its own error (``PicklingError`` or ``AttributeError``)
                when the name leads elsewhere: a guarded lambda, local function or
                method, or a function guarded under another name.
        """
        name = getattr(self, "__qualname__", None)
        if not isinstance(name, str):
            raise pickle.PicklingError(
                f"cannot pickle guarded {self.action!r}: only a guarded function pickles "
                "(by its module-level name), not a guarded callable object or partial"
            )
        return name

    def __copy__(self: B) -> B:
        """The guarded function itself, as ``copy.copy`` gives for a function."""
        return self

    def __deepcopy__(self: B, memo: dict[int, Any]) -> B:
        """The guarded function itself, as ``copy.deepcopy`` gives for a function (its
        guard and store are shared, never copied)."""
        return self


class GuardedFunction(_Bound, Generic[P, R]):
    """A function whose calls run through :meth:`Guard.execute`. Made by
    :meth:`Guard.guarded`; keeps the wrapped function's name, docstring and signature.
    Calling it returns the stored result (the same value on the first call and replays).
    As a method it is keyed without ``self``, through the instance or the class
    (:class:`_ClassAccess`); over a ``classmethod`` without ``cls``, and over a
    ``staticmethod`` it is the same function through the class or an instance. A
    module-level one pickles by reference (``copy`` returns it)."""

    def __init__(self, guard: Guard, func: Callable[P, R], *args: Any) -> None:
        if _is_async(_unwrap_descriptor(func)[0]):
            raise ConfigurationError(f"{_label(func)} is async; guard it with AsyncGuard.guarded")
        super().__init__(func, *args)
        self.guard = guard

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        request_id = self.key(args, kwargs)
        if request_id is None:
            return self.func(*args, **kwargs)  # type: ignore[no-any-return]
        return self._execute(request_id, args, kwargs)

    def call(self, key: object, /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call with an explicit idempotency key, encoded exactly like a ``key_arg`` value
        (so both call forms name the same record)."""
        return self._execute(self.request_id_for(key), args, kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self._access(obj, objtype)

    def _execute(self, request_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        payload = self.payload(*args, **kwargs)
        receipt = self.guard.execute(
            request_id,
            self.action,
            payload,
            lambda _ctx: self.func(*args, **kwargs),
            **self.options,
        )
        return receipt.result  # type: ignore[no-any-return]


class AsyncGuardedFunction(_Bound, Generic[P, R]):
    """An ``async def`` function (or an object whose ``__call__`` is one) whose calls run
    through :meth:`AsyncGuard.execute`. Made by :meth:`AsyncGuard.guarded`. Awaiting it
    returns the stored result. Methods as for :class:`GuardedFunction`."""

    def __init__(self, guard: AsyncGuard, func: Callable[P, Awaitable[R]], *args: Any) -> None:
        if not _is_async(_unwrap_descriptor(func)[0]):
            raise ConfigurationError(f"{_label(func)} is not async; guard it with Guard.guarded")
        super().__init__(func, *args)
        self.guard = guard

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        request_id = self.key(args, kwargs)
        if request_id is None:
            return await self.func(*args, **kwargs)  # type: ignore[no-any-return]
        return await self._execute(request_id, args, kwargs)

    async def call(self, key: object, /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call with an explicit idempotency key, encoded exactly like a ``key_arg`` value
        (so both call forms name the same record)."""
        return await self._execute(self.request_id_for(key), args, kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self._access(obj, objtype)

    async def _execute(self, request_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        payload = self.payload(*args, **kwargs)

        async def run(_ctx: Any) -> Any:
            return await self.func(*args, **kwargs)

        receipt = await self.guard.execute(request_id, self.action, payload, run, **self.options)
        return receipt.result  # type: ignore[no-any-return]


class _Method:
    """A guarded function bound to an object, as a method."""

    __safeagent_guarded__ = True

    def __init__(self, guarded: Any, obj: Any) -> None:
        _wrap(self, guarded.func)
        self._guarded = guarded
        self._obj = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded(self._obj, *args, **kwargs)

    def call(self, key: object, /, *args: Any, **kwargs: Any) -> Any:
        return self._guarded.call(key, self._obj, *args, **kwargs)

    def payload(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._guarded.payload(self._obj, *args, **kwargs)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        """Every other attribute is the guarded function's (``action``, ``guard``,
        ``request_id_for``, ...), as through the class."""
        if name == "_guarded":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._guarded, name)


class _ClassAccess:
    """A guarded function read from its class (``Svc.do``, or ``Base.do`` from a subclass).

    Called with an instance of that class first, it runs as that instance's method:
    ``Svc.do(obj, k, v)`` is ``obj.do(k, v)`` (the same request id and payload, without
    ``self``), so the two forms share one record and run once. Called with anything else
    first, it is the plain function (a function kept in a class body that takes no
    ``self``). Every other attribute is the guarded function's.
    """

    __safeagent_guarded__ = True

    def __init__(self, guarded: Any, owner: type) -> None:
        _wrap(self, guarded.func)
        self._guarded = guarded
        self._owner = owner

    def _target(self, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        if args and isinstance(args[0], self._owner):
            return self._guarded._bind_self(args[0]), args[1:]
        return self._guarded, args

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target, rest = self._target(args)
        return target(*rest, **kwargs)

    def call(self, key: object, /, *args: Any, **kwargs: Any) -> Any:
        target, rest = self._target(args)
        return target.call(key, *rest, **kwargs)

    def payload(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        target, rest = self._target(args)
        return target.payload(*rest, **kwargs)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        if name == "_guarded":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._guarded, name)


def _is_async(func: object) -> bool:
    """``True`` for an ``async def`` function (under any ``functools.partial``), or an
    object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


def decorator_options(
    namespace: str | None,
    wait: Seconds | None,
    lease: Seconds | None,
    not_executed: Collection[type[BaseException]] | None,
    outcome_unknown: Collection[type[BaseException]] | None,
) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "wait": wait,
        "lease": lease,
        "not_executed": not_executed,
        "outcome_unknown": outcome_unknown,
    }
