"""The public exception hierarchy.

Every error SafeAgent raises on its own account derives from :class:`GuardError`::

    GuardError
    ├── ConfigurationError          a setting is invalid (raised at construction)
    ├── InvalidInputError           bad input, rejected before anything is recorded or run
    │   ├── InvalidRequestIdError   not a non-empty string of at most 255 characters
    │   ├── InvalidPayloadError     not a JSON value (NaN, Infinity, |int| > 2**53 - 1, ...)
    │   └── MissingKeyError         the idempotency key argument is None or ""
    ├── ConflictError               same request id, other request: nothing ran
    │   ├── ActionMismatchError     ... under another action
    │   └── FingerprintMismatchError ... with another payload
    ├── InProgressError             a live claim is held elsewhere (.retry_after seconds)
    ├── OutcomeUnknownError         the record is in doubt: it may or may not have happened
    ├── ReplayedFailureError        the stored failure of an earlier execution, replayed
    ├── ReceiptPurgedError          it ran; retention removed its receipt (a tombstone)
    ├── ResultNotSerializableError  fn succeeded but its return value could not be stored
    ├── LeaseLostError              fn finished but its fencing token is no longer current
    ├── InvalidTransitionError      a state change that the state machine does not allow
    ├── NotFinalError               a case's side effect was asked for before it is FINAL
    ├── NotExecuted                 raised *by fn* to say "nothing happened": releases the claim
    └── StoreError                  the store failed; always chained (``raise ... from exc``)
        └── SchemaVersionError      the database was written by a newer SafeAgent

Errors carry their facts as keyword attributes (``request_id``, ``receipt``, ...) and
pickle cleanly, so they can cross process boundaries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safeagent._receipt import Receipt

__all__ = [
    "ActionMismatchError",
    "ConfigurationError",
    "ConflictError",
    "FingerprintMismatchError",
    "GuardError",
    "InProgressError",
    "InvalidInputError",
    "InvalidPayloadError",
    "InvalidRequestIdError",
    "InvalidTransitionError",
    "LeaseLostError",
    "MissingKeyError",
    "NotExecuted",
    "NotFinalError",
    "OutcomeUnknownError",
    "ReceiptPurgedError",
    "ReplayedFailureError",
    "ResultNotSerializableError",
    "SchemaVersionError",
    "StoreError",
    "TransportIdWarning",
]


class GuardError(Exception):
    """Base class of every error SafeAgent raises on its own account."""

    def __init__(self, message: str | None = None, **attrs: Any) -> None:
        if message is None:  # `raise NotExecuted` with no message: the class says what it is
            doc = (type(self).__doc__ or type(self).__name__).strip().splitlines()[0]
            message = doc.replace("``", "")
        super().__init__(message)
        self.message = message
        self._attrs = attrs
        for name, value in attrs.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._attrs))


def _rebuild(cls: type[GuardError], message: str | None, attrs: dict[str, Any]) -> GuardError:
    err = cls.__new__(cls)
    GuardError.__init__(err, message, **attrs)
    return err


class ConfigurationError(GuardError, ValueError):
    """A setting is invalid. Raised when the guard or store is built, before any call."""


class InvalidInputError(GuardError, ValueError):
    """Bad input to a call; nothing was recorded and nothing ran."""


class InvalidRequestIdError(InvalidInputError):
    """The request id is not a non-empty string of at most 255 characters."""


class InvalidPayloadError(InvalidInputError):
    """The payload is not a JSON value that canonicalizes under RFC 8785.

    Rejected: NaN and infinities, integers outside +-(2**53 - 1), non-string object
    keys, and objects that are not dicts, lists, tuples, strings, numbers, booleans or None.
    """


class MissingKeyError(InvalidInputError):
    """The idempotency key argument is ``None`` or ``""`` (docs/design.md section 6)."""


class ConflictError(GuardError):
    """The request id is already used by another request. Nothing ran.

    Attributes: ``request_id``, ``namespace``, ``receipt`` (the stored record's receipt).
    """

    request_id: str
    namespace: str
    receipt: Receipt


class ActionMismatchError(ConflictError):
    """The request id is already used under another action."""


class FingerprintMismatchError(ConflictError):
    """The request id is already used with another payload (another fingerprint)."""


class InProgressError(GuardError):
    """Another caller holds a live claim on this request id, and the wait bound passed.

    Attributes: ``request_id``, ``namespace``, ``retry_after`` (seconds of lease left,
    a float), ``receipt`` (the pending record).
    """

    request_id: str
    namespace: str
    retry_after: float
    receipt: Receipt


class OutcomeUnknownError(GuardError):
    """The record is in doubt: the side effect may or may not have happened.

    Raised instead of running ``fn`` again. Resolve it with ``Guard.resolve`` (an
    operator) or a reconcile hook. Attributes: ``request_id``, ``namespace``,
    ``owner`` (lease owner of the attempt in doubt), ``claimed_at_ms``, ``attempt``,
    ``receipt``.
    """

    request_id: str
    namespace: str
    owner: str | None
    claimed_at_ms: int
    attempt: int
    receipt: Receipt


class ReplayedFailureError(GuardError):
    """A replay of a stored failure: ``fn`` is not run again.

    Attributes: ``error_type`` and ``error_message`` (as stored; the original exception
    is never unpickled), ``receipt``.
    """

    error_type: str
    error_message: str
    receipt: Receipt


class ReceiptPurgedError(GuardError):
    """The request ran, but retention purged its receipt and left a tombstone; the side
    effect is not run again. Attributes: ``receipt`` (status and fingerprint, no result)."""

    receipt: Receipt


class ResultNotSerializableError(GuardError):
    """``fn`` succeeded, but its return value could not be stored as JSON.

    The record is SUCCEEDED with no result, so the side effect never runs again; the
    first call and every replay raise this error. Attributes: ``receipt``.
    """

    receipt: Receipt


class LeaseLostError(GuardError):
    """``fn`` finished after its fencing token stopped being current.

    Someone (an operator, or a caller taking over a released record) changed the record
    in the meantime; the late completion was rejected and audited. Attributes:
    ``request_id``, ``namespace``, ``fencing_token`` (ours), ``receipt`` (the record as
    it is now).
    """

    request_id: str
    namespace: str
    fencing_token: int
    receipt: Receipt | None


class InvalidTransitionError(GuardError):
    """The requested state change is not allowed from the current state. Nothing changed."""


class NotFinalError(GuardError):
    """A case's settlement was asked for before the case is FINAL. Nothing ran.

    Attributes: ``case_id``, ``namespace``, ``state`` (a ``CaseState``, or ``None`` when
    the case does not exist), ``tally`` (the live signals' ``Tally``, or ``None``).
    """

    case_id: str
    namespace: str
    state: Any
    tally: Any


class NotExecuted(GuardError):  # noqa: N818 - the name states the fact, as docs/design.md names it
    """Raise this from ``fn`` to say the side effect surely did not happen.

    The claim is released and the next call with the same request id runs ``fn``.
    """


class TransportIdWarning(UserWarning):
    """A side-effecting tool is keyed on a transport id (a tool-call, JSON-RPC or session
    id). Models re-emit the same call after a retry with a *new* id, so such a key does
    not recognise the retry (docs/design.md section 6); key on scope and arguments instead."""


class StoreError(GuardError):
    """The store could not do what was asked. Always chained to the driver's exception.

    When raised before ``fn`` started (a claim could not be recorded), ``fn`` did not run.
    """


class SchemaVersionError(StoreError):
    """The database schema is newer than this version of SafeAgent understands."""
