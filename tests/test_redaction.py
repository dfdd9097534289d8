"""The default redaction hook: secrets never reach the audit trail in clear."""

from __future__ import annotations

import pytest

from safeagent import default_redactor, no_redaction

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


@pytest.mark.parametrize(
    "key",
    [
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
    ],
)
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
