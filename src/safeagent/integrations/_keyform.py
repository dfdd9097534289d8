"""The JSON values a tool call's arguments count as, for request ids and fingerprints.

Framework tools (the Agents SDK, LangChain, CrewAI, MCP) hand their functions Python values
that pydantic parsed from the model's JSON. :func:`key_form` turns them back into JSON
values with pydantic's ``to_jsonable_python``, except where that would let one call have
two forms, or two calls one:

- a ``set`` or ``frozenset`` becomes a list in *canonical* order (by the canonical JSON of
  each element), not in its iteration order, which for strings changes with the
  process's hash seed (``PYTHONHASHSEED``): the same call, re-emitted to a restarted
  worker, would otherwise get another request id and run again;
- a ``Decimal`` counts by its number, not its spelling: ``10``, ``10.0``, ``1e1`` and
  ``"10.00"`` are one amount (see :func:`canonical_decimal`); NaN and infinities are
  refused;
- a ``SecretStr``/``SecretBytes`` (masked as ``"**********"`` by pydantic) counts by the
  SHA-256 of its secret (never stored in clear);
- a nested model field its ``default_factory`` filled (the call did not set it) is left
  out when the factory mints a new value per call (``uuid4``, ``datetime.now``): pydantic
  fills it afresh on every retry, which made each retry a new request;
- a pydantic model or dataclass holding any of those, and a model with a field declared
  ``exclude=True`` (left out by pydantic), counts by its fields, by field name (a
  model's fields as its own serializer writes them, see :func:`_model_form`).

Values holding none of those convert exactly as pydantic converts them, so their request
ids do not change. Other types pydantic parses have one form per value already
(``datetime``, ``date``, ``time``, ``timedelta``, ``UUID``, IP addresses, URLs, ``int``,
``float``; canonical JSON then writes ``1.0`` and ``1`` alike).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Collection
from decimal import Decimal
from typing import Any, cast

from safeagent._keys import MAX_DEPTH, canonical_json
from safeagent.errors import InvalidPayloadError

INTEGER_DIGITS = 100
"""An integral ``Decimal`` of at most this many digits is written out in full (``"100"``);
a longer one in scientific notation (``"1E+100"``), so a huge exponent cannot make a huge
text."""


def key_form(value: Any) -> Any:
    """``value`` (a call's bound arguments) as the JSON values its request id and
    fingerprint cover (see the module docstring).

    Raises:
        pydantic_core.PydanticSerializationError: a value pydantic cannot convert.
        InvalidPayloadError: a ``Decimal`` NaN or infinity, a set element that is no JSON
            value, bytes that are not UTF-8 where no model's config writes them, or a
            value nested deeper than the payload limit (or a cycle).
    """
    from pydantic_core import to_jsonable_python  # noqa: PLC0415 - the SDKs bring pydantic

    try:
        return to_jsonable_python(_canonical(value, 0))
    except UnicodeDecodeError as exc:  # bytes that are not UTF-8, outside a model's config
        raise InvalidPayloadError(f"arguments are not JSON values: {exc}") from exc


def canonical_decimal(value: Decimal) -> Decimal:
    """``value`` in the one spelling of its number: trailing zeros dropped and ``-0`` as
    ``0``, so ``str()`` (what pydantic writes) is the same for every spelling of one
    number. An integral value is written out in full (``Decimal("1e1")`` -> ``"10"``) up
    to :data:`INTEGER_DIGITS` digits; any other keeps Python's own notation for its
    digits and exponent (``"10.5"``, ``"1E-7"``, ``"1E+100"``). ``value`` itself (the same
    object) when it is already so spelt, which is how a model usually sends a number.

    Raises:
        InvalidPayloadError: NaN or an infinity, which no request id can hold.
    """
    if not value.is_finite():
        raise InvalidPayloadError(f"Decimal {value} is not a number a request id can hold")
    sign, digits, spelt = value.as_tuple()
    exponent = cast(int, spelt)  # an int for every finite value
    kept = list(digits)
    while len(kept) > 1 and kept[-1] == 0:
        kept.pop()
        exponent += 1
    if kept == [0]:
        canonical = Decimal(0)
    elif exponent > 0 and len(kept) + exponent <= INTEGER_DIGITS:
        canonical = Decimal((sign, (*kept, *([0] * exponent)), 0))
    else:
        canonical = Decimal((sign, tuple(kept), exponent))
    return value if canonical.as_tuple() == value.as_tuple() else canonical


def _secret_digest(value: Any) -> dict[str, str] | None:
    """``{"secret_sha256": ...}`` for a pydantic secret, else ``None``."""
    getter = getattr(value, "get_secret_value", None)
    if getter is None or type(value).__name__ not in ("SecretStr", "SecretBytes"):
        return None
    secret = getter()
    data = secret.encode("utf-8", "surrogatepass") if isinstance(secret, str) else bytes(secret)
    return {"secret_sha256": hashlib.sha256(data).hexdigest()}


def _canonical(value: Any, depth: int) -> Any:
    """``value`` with secrets replaced by their digests, ``Decimal`` values respelt, sets
    turned into canonically ordered lists, and models or dataclasses that hold any of
    those (or, for a model, an excluded field) turned into dicts of every field; ``value``
    itself (the same object) when it holds none, so that pydantic converts it as it
    always did."""
    return _form(value, depth)[0]


def _form(value: Any, depth: int) -> tuple[Any, bool]:
    """(:func:`_canonical` of ``value``, whether it holds a secret, a ``Decimal``, a set
    or a model with an excluded field anywhere: then it is not given to pydantic as it
    is). A model or dataclass holding one is always turned into a dict of its
    fields, whether or not the value needed respelling: a ``Decimal`` already in its one
    spelling must give the same form as another spelling of it, and pydantic's own form
    of a model (a root value, aliases, computed fields, custom serializers) is not a
    dict of its fields."""
    if depth > MAX_DEPTH:
        raise InvalidPayloadError(f"arguments nest deeper than {MAX_DEPTH} levels")
    digest = _secret_digest(value)
    if digest is not None:
        return digest, True
    if isinstance(value, Decimal):
        return canonical_decimal(value), True
    if isinstance(value, (set, frozenset)):
        return _ordered(value, depth), True
    if isinstance(value, type):
        return value, False
    fields = getattr(type(value), "model_fields", None)
    if isinstance(fields, dict):
        return _model_form(value, fields, depth)
    if dataclasses.is_dataclass(value):
        every = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        forms = {k: _form(v, depth + 1) for k, v in every.items()}
        if any(held for _, held in forms.values()):
            return {k: form for k, (form, _) in forms.items()}, True
        return value, False
    if isinstance(value, dict):
        pairs = [(k, _key(k), _form(v, depth + 1)) for k, v in value.items()]
        special = any(isinstance(k, Decimal) or held for k, _, (_, held) in pairs)
        if not special:
            return value, False
        return {new_k: form for _, new_k, (form, _) in pairs}, True
    if isinstance(value, (list, tuple, deque)):
        parts = [_form(v, depth + 1) for v in value]
        if any(held for _, held in parts):
            return [form for form, _ in parts], True
        return value, False
    return value, False


EXTRA_KEY = "__pydantic_extra__"
"""Where a model's extra values go in our form of it (no field can have this name): by
their own names beside the fields, an extra ``unit_price`` beside the field
``unit_price`` (alias ``unitPrice``) would make two calls one."""


def _model_form(value: Any, fields: dict[str, Any], depth: int) -> tuple[Any, bool]:
    """:func:`_form` of a pydantic model: the model itself when no field of it (at any
    depth) needs our form and no extra value sits under a key pydantic writes a field
    under (:func:`_written_names`), else a dict of its fields by name (and its extra
    values, see :data:`EXTRA_KEY`), in which:

    - a field its ``default_factory`` filled (not in ``model_fields_set``) is left out
      when that factory mints a new value per call (:func:`_minting`): its value says
      nothing about the call, and counting it made every retry a new request (not for a
      model with a ``@model_serializer``, whose output need not be a dict of its fields:
      pydantic writes it as it always did);
    - a field holding a secret, a ``Decimal`` or a set counts by our form of it;
    - a field declared ``exclude=True`` (which pydantic leaves out) counts by its value's
      own JSON form, so two calls differing there stay two;
    - every other field counts as the model's own serializer writes it in JSON mode, so
      the model's config and the field's serializers apply as they do for a model
      holding none of the above (``ser_json_bytes``, a custom type's
      ``PlainSerializer``; a masking ``@field_serializer`` too, docs/integrations).
    """
    unset = minted_unset(value, fields)
    every = {name: getattr(value, name) for name in fields if name not in unset}
    extra = getattr(value, "__pydantic_extra__", None) or {}
    forms = {k: _form(v, depth + 1) for k, v in every.items()}
    extra_forms = {k: _form(v, depth + 1) for k, v in extra.items()}
    hidden = {name for name, info in fields.items() if getattr(info, "exclude", None)}
    special = {k for k, (_, held) in forms.items() if held}
    if not (
        unset
        or special
        or hidden
        or any(held for _, held in extra_forms.values())
        or (extra and extra.keys() & _written_names(value, fields))
    ):
        return value, False
    written = _serialized(value, [k for k in every if k not in special | hidden])
    form = {k: written.get(k, f) for k, (f, _) in forms.items()}
    if extra_forms:
        form[EXTRA_KEY] = {k: f for k, (f, _) in extra_forms.items()}
    return form, True


def _written_names(value: Any, fields: dict[str, Any]) -> set[str]:
    """The keys pydantic's own (by-alias) form of model ``value`` writes its fields and
    computed fields under, and :data:`EXTRA_KEY`: an extra value under one of them would
    overwrite a field there (``extra="allow"`` with a ``serialization_alias``, or an
    extra named like a computed field), making two calls one."""
    names = {EXTRA_KEY}
    computed = getattr(type(value), "model_computed_fields", None) or {}
    for name, info in [*fields.items(), *computed.items()]:
        alias = getattr(info, "serialization_alias", None) or getattr(info, "alias", None)
        names.add(alias or name)
    return names


def value_form(value: Any) -> tuple[Any, bool]:
    """(``value``'s form, whether it needed ours): :func:`_form` of one argument (a
    nested value), for an integration that keys a validated model's top level itself."""
    return _form(value, 1)


def _serialized(value: Any, names: list[str]) -> dict[str, Any]:
    """The fields ``names`` of model ``value`` as its own serializer writes them in JSON
    mode, by field name; ``{}`` (each then converted alone) when the model has a
    ``@model_serializer``, whose output need not be a dict of its fields.

    Raises:
        pydantic_core.PydanticSerializationError: a value the serializer cannot write.
    """
    cls = type(value)
    decorators = getattr(cls, "__pydantic_decorators__", None)
    serializer = getattr(cls, "__pydantic_serializer__", None)
    if not names or serializer is None or decorators is None or decorators.model_serializers:
        return {}
    if getattr(value, "__pydantic_extra__", None):  # pydantic writes an extra over its field
        value = _without_extras(value)
    written = serializer.to_python(value, mode="json", include=set(names), by_alias=False)
    return cast(dict[str, Any], written) if isinstance(written, dict) else {}


def _without_extras(value: Any) -> Any:
    """A shallow copy of model ``value`` without its extra values, made without calling
    the model's own copy hooks (a ``__copy__`` that returns ``self`` would have the
    caller's model lose its extras; a ``model_copy`` may refuse)."""
    cls: Any = type(value)
    copy = cls.__new__(cls)
    object.__setattr__(copy, "__dict__", dict(value.__dict__))
    object.__setattr__(copy, "__pydantic_fields_set__", set(value.__pydantic_fields_set__))
    object.__setattr__(copy, "__pydantic_extra__", {})
    object.__setattr__(copy, "__pydantic_private__", getattr(value, "__pydantic_private__", None))
    return copy


def minted_unset(value: Any, fields: dict[str, Any]) -> set[str]:
    """The fields of model ``value`` its ``default_factory`` filled (the call did not
    set them) with a factory that mints a new value per call."""
    given = getattr(value, "model_fields_set", None)
    decorators = getattr(type(value), "__pydantic_decorators__", None)
    if given is None or decorators is None or decorators.model_serializers:
        return set()
    filled = [
        name
        for name, info in fields.items()
        if name not in given and getattr(info, "default_factory", None) is not None
    ]
    if not filled:
        return set()
    minting = _minting(type(value), {name: fields[name] for name in filled})
    return {name for name in filled if minting[name]}


def has_factories(model: Any) -> bool:
    """``True`` when ``model`` is a pydantic v2 model class with a ``default_factory``
    field (a tool's argument schema whose calls :func:`minted_unsent` must look at)."""
    fields = getattr(model, "__pydantic_fields__", None)
    return (
        isinstance(model, type)
        and isinstance(fields, dict)
        and hasattr(model, "model_validate")
        and any(getattr(f, "default_factory", None) is not None for f in fields.values())
    )


def minted_unsent(model: Any, raw: Any) -> frozenset[str]:
    """The top-level fields of pydantic model class ``model`` (a tool's argument schema)
    that a call with the raw arguments ``raw`` (a dict, as the framework validates it)
    leaves to a ``default_factory`` that mints a new value per call (see
    :func:`_minting`): the framework validated the call and filled them afresh, so a
    retry would otherwise be a new request. Field names; empty for anything but a
    pydantic v2 model class and a dict.

    The frameworks hand the function validated values, without pydantic's
    ``model_fields_set``, so ``raw`` is validated here once more and pydantic's own
    answer read (aliases, ``AliasPath``, validators that rename keys: as pydantic sees
    them). Pass a copy the framework's validators cannot have changed. When that
    validation fails, nothing is left out (every value counts, as before).

    Raises:
        Exception: what a factory raised when asked whether it mints (see :func:`_made`).
    """
    if not has_factories(model) or not isinstance(raw, dict):
        return frozenset()
    fields: dict[str, Any] = model.__pydantic_fields__
    try:
        given = model.model_validate(raw).model_fields_set
    except Exception:  # noqa: BLE001 - refused, or a validator that fails now: count all
        return frozenset()
    filled = {
        name: info
        for name, info in fields.items()
        if name not in given and getattr(info, "default_factory", None) is not None
    }
    if not filled:
        return frozenset()
    minting = _minting(model, filled)
    return frozenset(name for name in filled if minting[name])


def payload_form(values: dict[str, Any], unsent: Collection[str] = ()) -> dict[str, Any]:
    """:func:`key_form` of a call's arguments ``values``, where those named in ``unsent``
    (minted by a ``default_factory``: stored with the payload as the value the tool got,
    for a reconcile hook, but no part of the request id or the fingerprint) are each
    converted on their own, and one without a JSON form (random ``bytes``) is left out
    rather than failing the call.

    Raises:
        pydantic_core.PydanticSerializationError, InvalidPayloadError: as :func:`key_form`,
            for the other arguments.
    """
    from pydantic_core import PydanticSerializationError  # noqa: PLC0415 - the SDKs bring it

    if not unsent:
        return cast(dict[str, Any], key_form(values))
    form = cast(dict[str, Any], key_form({k: v for k, v in values.items() if k not in unsent}))
    for name in unsent:
        if name in values:
            try:
                form[name] = key_form(values[name])
            except (PydanticSerializationError, InvalidPayloadError, ValueError, TypeError):
                continue  # no JSON form: not stored
    return form


_FACTORIES: weakref.WeakKeyDictionary[type, dict[str, bool]] = weakref.WeakKeyDictionary()
"""Per model class: for each ``default_factory`` field, whether the factory mints."""

_PROBES: weakref.WeakKeyDictionary[type, threading.RLock] = weakref.WeakKeyDictionary()
"""Per model class, the lock its first probe holds (reentrant: a signal handler in the
probing thread probes again rather than wait for itself); other threads wait for the
answer, never use half of one."""

_PROBES_LOCK = threading.RLock()  # a signal handler may probe while its thread holds it

STABLE_FACTORIES = (list, dict, set, frozenset, tuple, str, int, float, bool, bytes)
"""Factories known to give equal values on every call (no need to call them)."""

CLOCK_STEP = 0.02
"""Seconds between the two calls of a factory that is asked whether it mints: more than a
coarse clock's tick (about 16 ms on Windows), so ``datetime.now`` differs."""

CLOCK_TYPES = (datetime.datetime, datetime.date, datetime.time, uuid.UUID)
"""A factory making one of these counts as minting, whatever two calls give: a constant
would be a ``default=``, and ``date.today`` or a ``datetime`` truncated to the second
gives equal values 20 ms apart but not a second later."""


def _minting(cls: type, fields: dict[str, Any]) -> dict[str, bool]:
    """For each field of ``fields`` (``default_factory`` fields of model class ``cls``
    that a call left to their factory): ``True`` when the factory mints a new value per
    call (``uuid4``, ``datetime.now``, a counter), ``False`` when it gives an equal value
    every time (``list``, ``lambda: ["eu"]``). Asked once per field, class and process,
    and only of a factory validation has just called (one a call left unset): it is
    called twice, :data:`CLOCK_STEP` apart, and the two values' JSON forms (pydantic's)
    compared; a value of a :data:`CLOCK_TYPES` type mints. A factory that takes the
    validated data, or whose values have no JSON form, counts as minting: a field it
    filled is left out, which at worst tells a call that spells its value out apart from
    one that leaves it to the factory; the other error, counting a minted value, makes
    every retry run. A factory that raises fails the call, and nothing is cached (see
    :func:`_made`)."""
    known = _FACTORIES.get(cls)
    if known is not None and all(name in known for name in fields):
        return known
    with _PROBES_LOCK:
        probe = _PROBES.setdefault(cls, threading.RLock())
    with probe:
        known = dict(_FACTORIES.get(cls) or {})
        asked = {}
        for name, info in fields.items():
            if name in known:
                continue
            factory = info.default_factory
            if any(factory is stable for stable in STABLE_FACTORIES):
                known[name] = False
            elif getattr(info, "default_factory_takes_validated_data", False):
                known[name] = True
            else:
                asked[name] = factory
        first = {name: _made(factory) for name, factory in asked.items()}
        if asked:
            time.sleep(CLOCK_STEP)
        for name, factory in asked.items():
            again = _made(factory)
            known[name] = first[name] is _NO_FORM or again is _NO_FORM or first[name] != again
        _FACTORIES[cls] = known  # a new dict: a reader without the lock sees a whole one
        return known


_NO_FORM: Any = object()


def _made(factory: Any) -> Any:
    """pydantic's JSON form of a value ``factory()`` makes, or :data:`_NO_FORM` (the value
    has no JSON form, or is of a :data:`CLOCK_TYPES` type).

    Raises:
        Exception: what the factory raised. Nothing is cached and the call fails before
            it runs: a deadline a signal handler raised there reaches its caller, and a
            factory that fails now and then cannot make one process key a call without
            its field and another with it (a retry on the other would run again). A
            factory of a field a call may leave unset must work outside validation.
    """
    from pydantic_core import (  # noqa: PLC0415 - the SDKs bring pydantic
        PydanticSerializationError,
        to_jsonable_python,
    )

    made = factory()  # its error propagates: see the docstring
    if isinstance(made, CLOCK_TYPES):
        return _NO_FORM
    try:
        return to_jsonable_python(made)
    except (PydanticSerializationError, ValueError, TypeError):  # no JSON form: minting
        return _NO_FORM


def _key(key: Any) -> Any:
    """A dict key: a ``Decimal`` respelt (pydantic writes a key as its ``str()``)."""
    return canonical_decimal(key) if isinstance(key, Decimal) else key


def _ordered(items: set[Any] | frozenset[Any], depth: int) -> list[Any]:
    """A set's elements as JSON values, ordered by their canonical JSON text: the same
    list in every process, whatever the hash seed."""
    from pydantic_core import to_jsonable_python  # noqa: PLC0415 - the SDKs bring pydantic

    forms = [to_jsonable_python(_canonical(item, depth + 1)) for item in items]
    return sorted(forms, key=canonical_json)
