"""Canonical JSON, fingerprints, downstream idempotency keys and input validation.

Canonical JSON follows RFC 8785 (JSON Canonicalization Scheme) through the ``rfc8785``
package: keys sorted by UTF-16 code units, numbers in their shortest ECMAScript form
(so ``1.0`` and ``1`` are the same number), no insignificant whitespace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any

import rfc8785

from safeagent.errors import InvalidInputError, InvalidPayloadError, InvalidRequestIdError

MAX_REQUEST_ID_LENGTH = 255
FINGERPRINT_VERSION = 1
DOWNSTREAM_KEY_PREFIX = "sa1-"


def canonical_json(value: Any) -> bytes:
    """Return the RFC 8785 canonical JSON bytes of ``value``.

    Raises:
        InvalidPayloadError: ``value`` is not a JSON value (NaN, infinities, integers
            beyond +-(2**53 - 1), non-string keys, other types).
    """
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise InvalidPayloadError(f"payload is not a canonical JSON value: {exc}") from exc


def check_request_id(request_id: object) -> str:
    """Validate a request id: a non-empty ``str`` of at most 255 characters.

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
    return request_id


def check_name(kind: str, value: object) -> str:
    """Validate an action or namespace name: a non-empty ``str`` of at most 255 characters."""
    if not isinstance(value, str) or not value or len(value) > MAX_REQUEST_ID_LENGTH:
        raise InvalidInputError(
            f"{kind} must be a non-empty str of at most {MAX_REQUEST_ID_LENGTH} characters, "
            f"got {value!r}"
        )
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
    digest.update(rfc8785.dumps(action))
    digest.update(b',"payload":')
    digest.update(canonical_payload)
    digest.update(b',"v":1}')
    return digest.hexdigest()


def downstream_key(namespace: str, action: str, request_id: str) -> str:
    """The idempotency key handed to the downstream system (DESIGN section 2).

    ``"sa1-"`` + hex SHA-256 of the canonical JSON of ``[namespace, action, request_id]``:
    the same on every attempt and across upgrades, and different for two tenants that
    use the same request id.
    """
    return (
        DOWNSTREAM_KEY_PREFIX
        + hashlib.sha256(rfc8785.dumps([namespace, action, request_id])).hexdigest()
    )


def key_from_value(value: object) -> str | None:
    """Encode a ``key_arg`` value as a request id (DESIGN section 6).

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
    return check_request_id(encoded)


DERIVED_PREFIX = "sa1:"


def derive_request_id(scope: str, action: str, arguments: Mapping[str, Any]) -> str:
    """A request id derived from what the call *is*, for tool calls that models re-emit.

    ``"sa1:"`` + hex SHA-256 of the canonical JSON (RFC 8785) of
    ``[scope, action, arguments]`` (DESIGN section 6). A model that re-emits the same tool
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
    check_name("scope", scope)
    check_name("action", action)
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

    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidInputError(f"arguments do not fit {func!r}: {exc}") from exc
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in exclude}
