"""Audit events and the default redaction hook (docs/design.md section 5).

Events are append-only. Those that describe a state change (claimed, succeeded,
failed, released, in-doubt, resolved, late completion) are written in the same
transaction as the change. Replay and in-doubt-read events are buffered and written with
the process's next write, when the buffer holds ``REPLAY_BUFFER_EVENTS`` events, when
``REPLAY_BUFFER_SECONDS`` have passed (checked on the next call; there is no background
thread) and at interpreter exit: a crash loses at most that many of them.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

REPLAY_BUFFER_EVENTS = 256
REPLAY_BUFFER_SECONDS = 1.0


class EventKind(str, enum.Enum):
    """The kinds of audit events."""

    CLAIMED = "claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RELEASED = "released"
    REPLAYED = "replayed"
    CONFLICT = "conflict"
    IN_DOUBT = "in_doubt"
    RECONCILED = "reconciled"
    RESOLVED = "resolved"
    LATE_COMPLETION = "late_completion"
    COMPLETION_REJECTED = "completion_rejected"
    SIGNAL = "signal"
    STATE_CHANGE = "state_change"
    PURGED = "purged"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit event.

    Attributes:
        kind: what happened.
        at_ms: store-clock instant, integer milliseconds since the epoch.
        namespace: the tenant scope.
        subject: the request id (or, for case events, the case id).
        action: the action name, when there is one.
        actor: who caused it: the lease owner of an execution, or an operator's name.
        execution_id: the attempt the event belongs to, when there is one.
        fencing_token: the token in force for that attempt, when there is one.
        detail: JSON object with the redacted payload, outcome, reason, and so on.
        id: the store's sequence number (``None`` until written).
    """

    kind: EventKind
    at_ms: int
    namespace: str
    subject: str
    action: str | None = None
    actor: str | None = None
    execution_id: str | None = None
    fencing_token: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "at_ms": self.at_ms,
            "namespace": self.namespace,
            "subject": self.subject,
            "action": self.action,
            "actor": self.actor,
            "execution_id": self.execution_id,
            "fencing_token": self.fencing_token,
            "detail": dict(self.detail),
        }


# The member descriptors of AuditEvent's slots, in field order (what new_event sets).
_EVENT_SETTERS = tuple(AuditEvent.__dict__[f.name].__set__ for f in fields(AuditEvent))
_new_object = object.__new__


def new_event(
    kind: EventKind,
    at_ms: int,
    namespace: str,
    subject: str,
    action: str | None,
    actor: str | None,
    execution_id: str | None,
    fencing_token: int | None,
    detail: Mapping[str, Any],
    id: int | None = None,
) -> AuditEvent:
    """``AuditEvent(kind, at_ms, ...)``, positional, for the hot path: the frozen
    ``__init__`` goes through ``object.__setattr__`` for each of its 10 fields, which costs
    about twice this (the event is equal: tests/test_receipt.py)."""
    event = _new_object(AuditEvent)
    for setter, value in zip(
        _EVENT_SETTERS,
        (kind, at_ms, namespace, subject, action, actor, execution_id, fencing_token, detail, id),
        strict=True,
    ):
        setter(event, value)
    return event


Redactor = Callable[[Any], Any]
"""A redaction hook: takes a JSON value, returns the JSON value to write to the audit trail."""

REDACTED = "[REDACTED]"

_SENSITIVE_WORDS = frozenset(
    {
        "card",
        "pan",
        "cvv",
        "cvc",
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "apikey",
        "authorization",
        "ssn",
        "iban",
        "email",
        "mail",
        "cookie",
        "credential",
        "credentials",
    }
)
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _sensitive_name(key: str) -> bool:
    known = _name_verdicts.get(key)
    if known is None:
        known = _judge_name(key)
        if len(_name_verdicts) < _MAX_NAME_VERDICTS:  # payload keys repeat: remember them
            _name_verdicts[key] = known
    return known


_name_verdicts: dict[str, bool] = {}
_MAX_NAME_VERDICTS = 4096


def _judge_name(key: str) -> bool:
    words = _WORD_SPLIT.split(_CAMEL.sub("_", key).lower())
    joined = "".join(words)
    return (
        any(w in _SENSITIVE_WORDS for w in words)
        or "apikey" in joined
        or "privatekey" in joined
        or "password" in joined
        or "accountnumber" in joined
        or "routingnumber" in joined
    )


# Linear-time patterns (a redactor runs on every payload, including megabyte strings):
# lookarounds pin a card number to the start of a digit run, and the e-mail local part
# and domain are bounded as RFC 5321 bounds them.
_CARD_NUMBER = re.compile(r"(?<![\d])\d(?:[ -]?\d){12,18}(?![\d])")
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,255}\.[A-Za-z]{2,24}"
)
_BEARER = re.compile(
    r"(?i)\b(?:bearer|basic|token)\s+[A-Za-z0-9\-._~+/]+=*"  # RFC 6750 / 7617 credentials
    r"|\b(?:sk|pk|rk)[_-][A-Za-z0-9_\-]{8,}"  # API keys in the sk_live_... style
    r"|\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"  # bare JWTs
)


def default_redactor(value: Any) -> Any:
    """Redact what should not sit in an audit log, by field name and by pattern.

    Values under keys that name a card, password, secret, token, API key, e-mail address
    and the like become ``"[REDACTED]"``; in other strings, card-like digit runs, e-mail
    addresses and bearer-style secrets are replaced. Returns a new value; never mutates.
    """
    # It runs on every guarded call. The exact built-in types are told apart by type()
    # (far cheaper than the Mapping ABC check); everything else, subclasses included, takes
    # the general path below. tests/test_redaction.py compares it with the plain version.
    kind = type(value)
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is str:
                sensitive = _name_verdicts.get(key)
                if sensitive is None:
                    sensitive = _sensitive_name(key)
            else:
                sensitive = isinstance(key, str) and _sensitive_name(key)
            if sensitive:
                out[key] = REDACTED
            elif (t := type(item)) is str:
                out[key] = _redact_text(item)
            elif t is int or t is float or t is bool or item is None:
                out[key] = item
            else:
                out[key] = default_redactor(item)
        return out
    if kind is str:
        return _redact_text(value)
    if kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is list or kind is tuple:
        return [default_redactor(v) for v in value]
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _sensitive_name(k) else default_redactor(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [default_redactor(v) for v in value]
    if isinstance(value, str):  # a subclass: re.sub returns a plain str, as it always did
        value = _CARD_NUMBER.sub(REDACTED, value)
        if "@" in value:
            value = _EMAIL.sub(REDACTED, value)
        return _BEARER.sub(REDACTED, value)
    return value


# Bytes 0-9 -> "1", every other byte -> "0": ``text.encode().translate(_DIGIT_MARKS).count(49)``
# counts the ASCII digits of an ASCII str in C.
_DIGIT_MARKS = bytes(49 if 48 <= b <= 57 else 48 for b in range(256))
_SHORTEST_MATCH = 6  # "a@b.cc"; a card number takes 13 characters, a credential 7


def _redact_text(text: str) -> str:
    """The three patterns of :func:`default_redactor` over an exact ``str``, in the same
    order, each skipped when a test in C shows it cannot match the text as it stands:
    a card number needs 13 digits, an e-mail address an "@", a credential 7 characters and
    one of its literal words. Non-ASCII text always gets the patterns: there a digit is any
    Unicode digit, and the case-insensitive words also match letters such as U+017F (long
    s) and U+212A (Kelvin sign)."""
    if len(text) < _SHORTEST_MATCH:
        return text
    ascii_only = text.isascii()  # still true after a substitution: "[REDACTED]" is ASCII
    if len(text) >= 13 and (
        not ascii_only or text.encode().translate(_DIGIT_MARKS).count(49) >= 13
    ):
        text = _CARD_NUMBER.sub(REDACTED, text)
    if "@" in text:
        text = _EMAIL.sub(REDACTED, text)
    if len(text) >= 7:
        if ascii_only:
            low = text.lower()  # (?i): in ASCII text, ASCII letters of either case
            if not (
                ("k" in low and ("k_" in low or "k-" in low or "token" in low))
                or ("b" in low and ("bearer" in low or "basic" in low))
                or "eyj" in low
            ):
                return text
        text = _BEARER.sub(REDACTED, text)
    return text


def no_redaction(value: Any) -> Any:
    """A redaction hook that keeps everything (for tests and trusted logs)."""
    return value
