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
from dataclasses import dataclass, field
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
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _sensitive_name(k) else default_redactor(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [default_redactor(v) for v in value]
    if isinstance(value, str):
        value = _CARD_NUMBER.sub(REDACTED, value)
        if "@" in value:
            value = _EMAIL.sub(REDACTED, value)
        return _BEARER.sub(REDACTED, value)
    return value


def no_redaction(value: Any) -> Any:
    """A redaction hook that keeps everything (for tests and trusted logs)."""
    return value
