"""Canonical JSON, fingerprints, downstream idempotency keys and input validation.

Canonical JSON follows RFC 8785 (JSON Canonicalization Scheme), byte for byte as the
``rfc8785`` package writes it (property tests compare them), which formats the floats:
keys sorted by UTF-16 code units, numbers in their shortest ECMAScript form (so ``1.0``
and ``1`` are the same number), no insignificant whitespace.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, cast

import rfc8785

from safeagent.errors import InvalidInputError, InvalidPayloadError, InvalidRequestIdError

MAX_REQUEST_ID_LENGTH = 255
FINGERPRINT_VERSION = 1
DOWNSTREAM_KEY_PREFIX = "sa1-"


MAX_DEPTH = 100
"""Deepest nesting of arrays and objects accepted in a payload."""
MAX_SAFE_INTEGER = 2**53 - 1


def nested_deeper(value: Any, limit: int) -> bool:
    """``True`` when ``value`` nests objects (mappings) and arrays (lists, tuples) more
    than ``limit`` levels deep (a top-level object is level 1). Walked without
    recursion, so any depth is answered, and the same on every Python (how deep
    ``json.loads`` itself goes differs: 3.12 and later parse thousands of levels that
    3.11 refuses)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# The C string escaper behind JSONEncoder(ensure_ascii=False), called directly.
_encode_str: Callable[[str], str] = json.encoder.encode_basestring
_join = "".join


def canonical_json(value: Any) -> bytes:
    """Return the RFC 8785 canonical JSON bytes of ``value``.

    Written for the hot path, byte-identical to the ``rfc8785`` package (property tests
    compare them): strings are escaped as ECMAScript's ``JSON.stringify`` does (which is
    what Python's encoder does without ``ensure_ascii``), object keys sorted by UTF-16
    code units, and floats delegated to ``rfc8785`` for ECMAScript number formatting.
    Tuples are arrays. A payload of exact dicts with ASCII keys, lists, tuples, strings,
    booleans, ``None`` and safe integers (no float, no subclass: most payloads) is
    written by Python's C encoder from a checked private copy (:func:`_plain`); any other
    goes through :func:`_canon`, value by value.

    Raises:
        InvalidPayloadError: ``value`` is not a JSON value (NaN, infinities, integers
            beyond +-(2**53 - 1), non-string keys, lone surrogates, other types), or it
            nests deeper than :data:`MAX_DEPTH`.
    """
    if _encode_plain is not None:
        plain = _plain(value, 0)
        if plain is not _NOT_PLAIN:
            try:
                return _join(_encode_plain(plain, 0)).encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidPayloadError(f"payload is not valid UTF-8 text: {exc}") from exc
            except RecursionError:
                pass  # a call already deep in the stack: the checked path decides
    parts: list[str] = []
    try:
        _canon(value, parts, 0)
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPayloadError(f"payload is not valid UTF-8 text: {exc}") from exc
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidPayloadError(f"payload is not a canonical JSON value: {exc}") from exc


_NOT_PLAIN: Any = object()


def _plain(value: Any, depth: int) -> Any:
    """A private copy of ``value`` that Python's C encoder (sorted keys, no ASCII
    escaping) writes exactly as RFC 8785 does, or ``_NOT_PLAIN``. Plain is: exact dicts
    whose keys are exact ASCII ``str`` (code point order is then UTF-16 order), exact
    lists and tuples (copied as lists), exact ``str``, ``None``, booleans and exact
    ``int`` in the safe range, nested at most :data:`MAX_DEPTH` deep. No float (ECMAScript
    formats numbers its own way), no subclass (it may encode itself otherwise): anything
    else takes :func:`_canon`, which also reports what is wrong.

    Each container is copied in one C call before its items are checked, so the copy is
    a tree nobody else holds: another thread (or a ``__del__``) that changes the payload
    meanwhile cannot slip an unchecked value, a loop or a freed object into what the
    encoder, which has no circular-reference check, then reads (a loop is nested too
    deep, so it is not plain)."""
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DEPTH:
            return _NOT_PLAIN
        copy = value.copy()
        for key, item in copy.items():
            if type(key) is not str or not key.isascii():
                return _NOT_PLAIN
            kind = type(item)
            if kind is str or item is None or kind is bool:
                continue
            if kind is int:
                if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    return _NOT_PLAIN
                continue
            inner = _plain(item, depth + 1)
            if inner is _NOT_PLAIN:
                return _NOT_PLAIN
            copy[key] = inner  # a value replaced, no key added: the iteration goes on
        return copy
    if kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            return _NOT_PLAIN
        items = list(value)
        for n, item in enumerate(items):
            kind = type(item)
            if kind is str or item is None or kind is bool:
                continue
            if kind is int:
                if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    return _NOT_PLAIN
                continue
            inner = _plain(item, depth + 1)
            if inner is _NOT_PLAIN:
                return _NOT_PLAIN
            items[n] = inner
        return items
    if kind is str or value is None or kind is bool:
        return value
    if kind is int and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return value
    return _NOT_PLAIN


def _plain_encoder() -> Callable[[Any, int], Sequence[str]] | None:
    """Python's C JSON encoder, built once, for :func:`_plain` values: compact separators,
    keys sorted, no ASCII escaping (``json.dumps(value, ensure_ascii=False,
    separators=(",", ":"), sort_keys=True)`` without its per-call set-up), called as
    ``"".join(encode(value, 0))``. It has no circular-reference check: it is given only
    _plain's copies, private trees. None where the C encoder is missing or writes other bytes than
    :func:`_canon` on a probe (another interpreter or version): _canon serves alone."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    probe: dict[str, Any] = {
        "b": [0, -(2**53 - 1), 2**53 - 1, True, False, None, ("t", [])],
        "a": {"": '\u00e9"\\\n\r\t\b\f\x00\x1f\x7f\u2028\U0001f600', "A": {}},
        "": "",
    }
    try:
        encode = make(None, None, _encode_str, None, ":", ",", True, False, False)
        expected: list[str] = []
        _canon(probe, expected, 0)
        if _join(encode(_plain(probe, 0), 0)) == _join(expected):
            return cast(Callable[[Any, int], Sequence[str]], encode)
    except Exception:  # noqa: BLE001, S110 - any surprise: _canon alone
        pass
    return None


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _canon(value: Any, out: list[str], depth: int) -> None:
    if isinstance(value, str):
        value.encode("utf-8")  # lone surrogates are not JSON text
        out.append(_encode_str(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise ValueError(f"{value} exceeds the safe integer range +-(2**53 - 1)")
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(rfc8785.dumps(value).decode("ascii"))
    elif isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        out.append("[")
        for n, item in enumerate(value):
            if n:
                out.append(",")
            _canon(item, out, depth + 1)
        out.append("]")
    elif isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if type(value) is not dict:
            # a dict subclass is copied as rfc8785 copies it (dict(value), which reads the
            # dict's own entries); another Mapping (rfc8785 refuses those) through items()
            value = dict(value) if isinstance(value, dict) else dict(value.items())
        ascii_keys = True
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, got {type(key).__name__}")
            # exact str only: a subclass may order itself its own way
            if ascii_keys and not (type(key) is str and key.isascii()):
                ascii_keys = False
        out.append("{")
        # ASCII keys sort the same by code point as by UTF-16 code unit (the usual case)
        keys = sorted(value) if ascii_keys else sorted(value, key=_utf16_key)
        for n, key in enumerate(keys):
            if n:
                out.append(",")
            if not ascii_keys:
                key.encode("utf-8")
            out.append(_encode_str(key))
            out.append(":")
            _canon(value[key], out, depth + 1)
        out.append("}")
    else:
        raise TypeError(f"{type(value).__name__} is not a JSON value")


_encode_plain = _plain_encoder()


def check_request_id(request_id: object) -> str:
    """Validate a request id: a non-empty ``str`` of at most 255 characters, returned as
    a plain ``str`` (a subclass, such as a ``(str, Enum)`` member, by its characters).

    Raises:
        InvalidRequestIdError: anything else.
    """
    if not isinstance(request_id, str):
        raise InvalidRequestIdError(
            f"request id must be a str, got {type(request_id).__name__}",
            request_id=request_id,
        )
    if not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequestIdError(
            f"request id must be 1 to {MAX_REQUEST_ID_LENGTH} characters, got {len(request_id)}",
            request_id=request_id,
        )
    if not storable(request_id):
        raise InvalidRequestIdError(
            f"request id must be valid UTF-8 text without NUL, got {request_id!r}",
            request_id=request_id,
        )
    # A str subclass (a ``(str, Enum)`` member, say) is kept as its characters: its
    # __str__/__format__ may say something else ("Tenant.ACME"), and every store, key and
    # chain text must see one spelling.
    return request_id if type(request_id) is str else str.__str__(request_id)


def storable(text: str) -> bool:
    """Whether every store can hold ``text``: UTF-8 encodable (no lone surrogates), no NUL."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable_text(text: str) -> str:
    """``text`` with lone surrogates and NUL turned into backslash escapes.

    For free text SafeAgent records but never compares (exception messages), so a message
    from an undecodable file name cannot stop an outcome from being recorded.
    """
    if storable(text):
        return text
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped.replace("\x00", "\\x00")


def check_name(kind: str, value: object) -> str:
    """Validate a name (action, namespace, actor): a non-empty ``str`` of at most 255
    characters of valid UTF-8 without NUL, returned as a plain ``str`` (as
    :func:`check_request_id`).

    Raises:
        InvalidInputError: anything else.
    """
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_REQUEST_ID_LENGTH
        or not storable(value)
    ):
        raise InvalidInputError(
            f"{kind} must be a non-empty str of at most {MAX_REQUEST_ID_LENGTH} characters "
            f"of valid UTF-8 without NUL, got {value!r}"
        )
    return value if type(value) is str else str.__str__(value)  # as check_request_id


def check_text(kind: str, value: object, *, blank: bool = False) -> str:
    """Validate an operator's free text (a reason, an error type or message): a ``str`` of
    valid UTF-8 without NUL, not blank unless ``blank``. It is kept in the record and the
    audit trail, which every store holds and exports as UTF-8 text.

    Raises:
        InvalidInputError: anything else.
    """
    if not isinstance(value, str) or (not blank and not value.strip()):
        raise InvalidInputError(f"{kind} must be a non-empty str")
    if not storable(value):
        raise InvalidInputError(f"{kind} must be valid UTF-8 text without NUL, got {value!r}")
    return value


def fingerprint_payload(payload: Any, exclude: Collection[str] = ()) -> Any:
    """Return the part of ``payload`` that the fingerprint covers.

    ``exclude`` names top-level fields to leave out (volatile fields such as timestamps);
    it needs a mapping payload.
    """
    if not exclude:
        return payload
    if not isinstance(payload, Mapping):
        raise InvalidPayloadError("exclude= needs a payload that is a JSON object")
    return {k: v for k, v in payload.items() if k not in exclude}


def fingerprint(action: str, canonical_payload: bytes) -> str:
    """Return the hex SHA-256 of the canonical ``{"action", "payload", "v": 1}`` object.

    ``canonical_payload`` must already be canonical JSON. The object is assembled
    byte by byte: its three keys are already in RFC 8785 order ("action" < "payload" < "v"),
    so the result equals ``sha256(rfc8785.dumps({"v": 1, "action": a, "payload": p}))``.
    """
    digest = hashlib.sha256(b'{"action":')
    digest.update(_canonical_str(action))
    digest.update(b',"payload":')
    digest.update(canonical_payload)
    digest.update(b',"v":1}')
    return digest.hexdigest()


def downstream_key(namespace: str, action: str, request_id: str) -> str:
    """The idempotency key handed to the downstream system (docs/design.md section 2).

    ``"sa1-"`` + hex SHA-256 of the canonical JSON of ``[namespace, action, request_id]``:
    the same on every attempt and across upgrades, and different for two tenants that
    use the same request id.
    """
    text = f"[{_encode_str(namespace)},{_encode_str(action)},{_encode_str(request_id)}]"
    return DOWNSTREAM_KEY_PREFIX + hashlib.sha256(_utf8(text)).hexdigest()


def new_execution_id() -> str:
    """A fresh execution id: 32 lowercase hex digits of a random version-4 UUID (RFC 4122
    variant), the format of ``uuid.uuid4().hex``, made from ``os.urandom(16)`` as uuid4 makes
    it but without building the UUID object (a third of the cost)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # variant 10xx: RFC 4122
    return raw.hex()


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPayloadError(f"payload is not valid UTF-8 text: {exc}") from exc


def _canonical_str(value: str) -> bytes:
    """``canonical_json(value)`` for a str, without the generic walk."""
    return _utf8(_encode_str(value))


def key_from_value(value: object) -> str | None:
    """Encode a ``key_arg`` value as a request id (docs/design.md section 6).

    The value is encoded as canonical JSON, so ``0``, ``False`` and ``"0"`` are three
    different ids. ``None`` and ``""`` are a missing key: returns ``None``.

    Raises:
        InvalidRequestIdError: the encoding is not JSON or is longer than 255 characters.
    """
    if value is None or value == "":
        return None
    try:
        encoded = rfc8785.dumps(value).decode()  # type: ignore[arg-type]
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidRequestIdError(
            f"key value {value!r} cannot be encoded as canonical JSON: {exc}"
        ) from exc
    if len(encoded) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequestIdError(
            f"key value of {len(value) if isinstance(value, str) else len(encoded)} "
            f"characters encodes as a request id of {len(encoded)} (canonical JSON: a string "
            f"keeps its quotes and escapes), more than {MAX_REQUEST_ID_LENGTH}",
            request_id=encoded,
        )
    return check_request_id(encoded)


DERIVED_PREFIX = "sa1:"


def derive_request_id(scope: str, action: str, arguments: Mapping[str, Any]) -> str:
    """A request id derived from what the call *is*, for tool calls that models re-emit.

    ``"sa1:"`` + hex SHA-256 of the canonical JSON (RFC 8785) of
    ``[scope, action, arguments]`` (docs/design.md section 6). A model that re-emits the same tool
    call after a retry mints a new tool-call id, but the same scope, action and arguments
    give the same request id, so the retry replays instead of running again.

    Args:
        scope: the business key the call belongs to: a run, conversation, order or
            ticket id. Required: without it, two intentional identical purchases in two
            conversations would collapse into one.
        action: the tool's name.
        arguments: the bound arguments (see :func:`bind_arguments`), a JSON object.

    Raises:
        InvalidInputError: an empty scope or action.
        InvalidPayloadError: arguments that are not a JSON object.
    """
    scope = check_name("scope", scope)
    action = check_name("action", action)
    if not isinstance(arguments, Mapping):
        raise InvalidPayloadError("arguments must be a JSON object (a mapping of names)")
    body = canonical_json([scope, action, dict(arguments)])
    return DERIVED_PREFIX + hashlib.sha256(body).hexdigest()


def bind_arguments(
    func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], exclude: Collection[str] = ()
) -> dict[str, Any]:
    """Bind a call's arguments through ``func``'s signature, defaults applied, minus the
    volatile ones named in ``exclude``: the arguments a derived request id covers.

    Raises:
        InvalidInputError: the arguments do not fit the signature.
    """
    import inspect  # noqa: PLC0415 - only the derivation path needs it

    name = getattr(func, "__qualname__", type(func).__name__)
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:  # ValueError: a builtin without a signature
        raise InvalidInputError(f"arguments do not fit {name}: {exc}") from exc
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in exclude}
