"""The default redaction hook: secrets never reach the audit trail in clear."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeagent import default_redactor, no_redaction
from safeagent._audit import _BEARER, _CARD_NUMBER, _EMAIL, REDACTED, _sensitive_name

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
        (f"bearer {JWT}", "eyJzdWIiOiIxIn0"),
        ("Bearer abc", "abc"),
        ("token sk_live_1234567890abcdef in the logs", "1234567890abcdef"),
        (f"raw {JWT} jwt", "c2lnbmF0dXJl"),
        ("card 4242 4242 4242 4242 declined", "4242 4242"),
        ("card 4242-4242-4242-4242", "4242-4242"),
        ("mail bob@example.com now", "bob@example.com"),
    ],
)
def test_secrets_inside_strings_are_masked(text: str, secret: str) -> None:
    """Bearer/basic credentials, API keys, JWTs, card numbers and e-mails are masked."""
    assert secret not in default_redactor(text)
    assert "[REDACTED]" in default_redactor(text)


def test_masking_keeps_the_surrounding_text() -> None:
    """Only the secret goes: the words around it, and their spaces, stay."""
    assert default_redactor("pay 4242424242424242 for order 12345") == (
        "pay [REDACTED] for order 12345"
    )


SENSITIVE_KEYS = [
    "card_number",
    "cardNumber",
    "cvv",
    "password",
    "api_key",
    "apiKey",
    "client_secret",
    "access_token",
    "Authorization",
    "email",
    "account_number",
    "iban",
    "private_key",
]


@pytest.mark.parametrize("key", SENSITIVE_KEYS)
def test_sensitive_field_names_are_masked(key: str) -> None:
    """Values under sensitive field names are masked whatever they hold."""
    assert default_redactor({key: "x", "nested": [{key: 1}]}) == {
        key: "[REDACTED]",
        "nested": [{key: "[REDACTED]"}],
    }


@pytest.mark.parametrize("key", ["company", "author", "amount_cents", "account_id", "title"])
def test_ordinary_field_names_are_kept(key: str) -> None:
    """Field names that merely contain a sensitive word's letters are not masked."""
    assert default_redactor({key: "value"}) == {key: "value"}


def test_no_redaction_keeps_everything() -> None:
    """no_redaction is the identity."""
    value = {"password": "hunter2"}
    assert no_redaction(value) is value


# -- the fast paths change nothing ------------------------------------------------------------


def reference_redactor(value: Any) -> Any:
    """default_redactor as it was before its fast paths, kept verbatim as the reference."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _sensitive_name(k) else reference_redactor(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [reference_redactor(v) for v in value]
    if isinstance(value, str):
        value = _CARD_NUMBER.sub(REDACTED, value)
        if "@" in value:
            value = _EMAIL.sub(REDACTED, value)
        return _BEARER.sub(REDACTED, value)
    return value


class _Str(str):
    pass


class _Int(int):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


class _List(list):  # type: ignore[type-arg]
    pass


class _Map(Mapping[Any, Any]):
    """A Mapping that is not a dict."""

    def __init__(self, items: dict[Any, Any]) -> None:
        self._items = items

    def __getitem__(self, key: Any) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


_SECRET_PIECES = [
    "4242 4242 4242 4242",
    "4242-4242-4242-4242",
    "4242424242424242",
    "424242424242",  # 12 digits: one short of a card number
    "4242424242424",  # 13
    "12345678901234567890",  # 20: longer than a card number
    "\u0663" * 13,  # Arabic-Indic digits: \d takes them
    "\uff14" * 16,  # fullwidth digits
    "bob@example.com",
    "a@b.cc",
    "x@y",
    "@",
    "Bearer abc.def.ghi",
    "bearer\tXYZ==",
    "BASIC dXNlcjpwYXNz",
    "basic",
    "token sk_live_1234567890abcdef",
    "Token ",
    "sk_live_1234567890abcdef",
    "SK-TEST-abcdefgh",
    "pk_test_1234",
    "rk-12345678",
    "k_",
    "k-",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    "EYJa.b.",  # the shortest JWT-like match: 7 characters
    "token x",  # the shortest credential
    "basic\u2003Y",  # an em space: \s takes it
    "eyj",
    "ba\u017fic abc",  # long s: (?i) matches it as "s"
    "to\u212aen abc",  # Kelvin sign: (?i) matches it as "k"
    "bas\u0131c abc",  # dotless i
    "\u017fk_12345678",
    "\ud800",  # a lone surrogate
    "\x7f",
    "[REDACTED]",
    "caf\u00e9",
    "cus_123",
    "usd",
    "x" * 40,
]
_texts = st.lists(
    st.one_of(
        st.sampled_from(_SECRET_PIECES),
        st.sampled_from([" ", "", "-", "_", ".", "\n", "x", "1", "9", "\u00a0"]),
        st.text(max_size=8),
        st.text(alphabet="0123456789 -", max_size=24),
    ),
    max_size=6,
).map("".join)
_key_names = st.sampled_from(
    [*SENSITIVE_KEYS, "company", "amount", "memo", "customer", "currency", ""]
)
_keys = st.one_of(
    _key_names,
    _texts,
    st.builds(_Str, _key_names),
    st.integers(),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
)
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.builds(_Int, st.integers()),
    _texts,
    st.builds(_Str, _texts),
    st.binary(max_size=4),
)
_values = st.recursive(
    _leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.lists(kids, max_size=4).map(_List),
        st.dictionaries(_keys, kids, max_size=5),
        st.dictionaries(_keys, kids, max_size=5).map(_Dict),
        st.dictionaries(_keys, kids, max_size=5).map(_Map),
    ),
    max_leaves=16,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (and NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or repr(a) == repr(b)
    return bool(a == b)


@settings(max_examples=500)
@given(value=_values)
def test_default_redactor_equals_the_plain_version(value: Any) -> None:
    """The fast paths (exact types first, a pattern skipped when it cannot match) give what
    the plain walk gives, types included, for every JSON-like value: subclasses of dict,
    str and list, Mappings that are not dicts, tuples, non-str keys, Unicode digits, letters
    that fold to ASCII, lone surrogates."""
    assert _same(default_redactor(value), reference_redactor(value))


@given(text=_texts)
def test_default_redactor_masks_strings_as_the_plain_version(text: str) -> None:
    """Strings alone, and under a key and in a list, plain and as a str subclass."""
    for value in (text, _Str(text), {"memo": text}, [text, _Str(text)]):
        assert _same(default_redactor(value), reference_redactor(value))


@pytest.mark.parametrize("text", _SECRET_PIECES)
def test_every_secret_piece_is_masked_as_the_plain_version(text: str) -> None:
    """Each piece the property tests build from, padded to defeat the length checks."""
    for value in (text, f"{text} " * 3, f"id {text}.", "x" * 20 + text):
        assert default_redactor(value) == reference_redactor(value)
