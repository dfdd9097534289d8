"""SafeAgent: an execution guard for AI agents.

Every side-effecting tool call carries a request id (an idempotency key). The first call
records a durable claim, runs the side effect once and stores a receipt; every retry gets
the stored receipt back and the side effect does not run again.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from safeagent._aguard import AsyncGuard
from safeagent._audit import AuditEvent, EventKind, default_redactor, no_redaction
from safeagent._case_view import Case
from safeagent._cases import CaseState, ConsensusPolicy, Signal, Tally
from safeagent._core import ReconcileReport
from safeagent._decorator import AsyncGuardedFunction, GuardedFunction
from safeagent._gate import AsyncFinalityGate, FinalityGate
from safeagent._guard import Guard
from safeagent._keys import bind_arguments, derive_request_id
from safeagent._policy import (
    DEFAULT_LEASE,
    DEFAULT_WAIT,
    ActionPolicy,
    ReconcileRequest,
    Reconciliation,
    json_default,
)
from safeagent._receipt import ErrorInfo, ExecutionContext, Receipt, Status, current_context
from safeagent.errors import (
    ActionMismatchError,
    ConfigurationError,
    ConflictError,
    FingerprintMismatchError,
    GuardError,
    InProgressError,
    InvalidInputError,
    InvalidPayloadError,
    InvalidRequestIdError,
    InvalidTransitionError,
    LeaseLostError,
    MissingKeyError,
    NotExecuted,
    NotFinalError,
    OutcomeUnknownError,
    ReceiptPurgedError,
    ReplayedFailureError,
    ResultNotSerializableError,
    SchemaVersionError,
    StoreError,
    TransportIdWarning,
)
from safeagent.stores import MemoryStore, ReceiptStore, SQLiteStore

try:
    __version__ = _version("safeagent")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [  # noqa: RUF022 - plain sorted(), checked by test_packaging
    "ActionMismatchError",
    "ActionPolicy",
    "AsyncFinalityGate",
    "AsyncGuard",
    "AsyncGuardedFunction",
    "AuditEvent",
    "Case",
    "CaseState",
    "ConfigurationError",
    "ConflictError",
    "ConsensusPolicy",
    "DEFAULT_LEASE",
    "DEFAULT_WAIT",
    "ErrorInfo",
    "EventKind",
    "ExecutionContext",
    "FinalityGate",
    "FingerprintMismatchError",
    "Guard",
    "GuardError",
    "GuardedFunction",
    "InProgressError",
    "InvalidInputError",
    "InvalidPayloadError",
    "InvalidRequestIdError",
    "InvalidTransitionError",
    "LeaseLostError",
    "MemoryStore",
    "MissingKeyError",
    "NotExecuted",
    "NotFinalError",
    "OutcomeUnknownError",
    "Receipt",
    "ReceiptPurgedError",
    "ReceiptStore",
    "ReconcileReport",
    "ReconcileRequest",
    "Reconciliation",
    "ReplayedFailureError",
    "ResultNotSerializableError",
    "SQLiteStore",
    "SchemaVersionError",
    "Signal",
    "Status",
    "StoreError",
    "Tally",
    "TransportIdWarning",
    "__version__",
    "bind_arguments",
    "current_context",
    "default_redactor",
    "derive_request_id",
    "json_default",
    "no_redaction",
]
