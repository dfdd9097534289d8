"""Compatibility with the original package's quickstart (docs/design.md section 7).

    from settlement.settlement_requests import SettlementRequestRegistry

    registry = SettlementRequestRegistry()            # durable: $SAFEAGENT_DB or ./safeagent.db
    receipt = registry.execute(request_id="r-1", action="send_email",
                               payload={"to": "a@example.com"}, execute_fn=send)

``execute`` never raises for a failure of ``execute_fn``: it returns a receipt dict whose
``ok`` and ``reason`` say what happened. Bad arguments that are not a missing request id
(a payload that is not JSON, say) still raise a typed :mod:`safeagent.errors` error. This
module is a thin shell over :class:`safeagent.Guard`; all behaviour lives there.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable, Collection
from typing import Any

from safeagent._decide import classify_exception
from safeagent._guard import Guard
from safeagent._receipt import ExecutionContext, Receipt, Status
from safeagent.errors import (
    ActionMismatchError,
    FingerprintMismatchError,
    InProgressError,
    OutcomeUnknownError,
    ReceiptPurgedError,
    ReplayedFailureError,
    ResultNotSerializableError,
)
from safeagent.stores._base import ReceiptStore
from safeagent.stores.sqlite import SQLiteStore

__all__ = ["SettlementRequestRegistry"]


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    instant = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class SettlementRequestRegistry:
    """The original package's registry, on SafeAgent's durable guard.

    Args:
        sqlite_path: the SQLite file; ``None`` means ``$SAFEAGENT_DB``, else
            ``safeagent.db`` in the working directory (durable by default, unlike the
            original's in-memory default).
        postgres_dsn: a PostgreSQL DSN: use the PostgreSQL store instead (needs
            ``pip install -e '.[postgres]'``).
        pending_ttl_seconds: the lease length in seconds (default 60): a claim whose process
            died reads as in doubt once it expires.
        wait_seconds: how long a concurrent duplicate waits for the first call's receipt
            before answering ``claim_pending`` (default 10; 0 answers at once).
        not_executed / outcome_unknown: exception types that release the claim / leave the
            record in doubt (see :class:`safeagent.Guard`).
        namespace: the tenant scope (default ``"default"``).
    """

    def __init__(
        self,
        sqlite_path: str | None = None,
        postgres_dsn: str | None = None,
        pending_ttl_seconds: float = 60.0,
        *,
        wait_seconds: float = 10.0,
        not_executed: Collection[type[BaseException]] = (),
        outcome_unknown: Collection[type[BaseException]] = (),
        namespace: str = "default",
    ) -> None:
        store: ReceiptStore
        if postgres_dsn is not None:
            from safeagent.stores.postgres import PostgresStore  # noqa: PLC0415 - optional

            store = PostgresStore(postgres_dsn)
        else:
            store = SQLiteStore(sqlite_path)
        self.guard = Guard(
            store,
            namespace=namespace,
            lease=pending_ttl_seconds,
            wait=wait_seconds,
            not_executed=not_executed,
            outcome_unknown=outcome_unknown,
        )

    def execute(
        self,
        request_id: str,
        action: str,
        payload: Any,
        execute_fn: Callable[..., Any],
    ) -> dict[str, Any]:
        """Run ``execute_fn`` at most once for ``request_id``; return the receipt dict.

        A zero-argument ``execute_fn`` is called with nothing, a one-argument one with the
        payload. Reasons: ``executed``, ``dedup_same_request_id``,
        ``execute_failed:<ExceptionType>``, ``released``, ``conflict_payload_mismatch``,
        ``conflict_action_mismatch``, ``claim_pending``, ``in_doubt``,
        ``receipt_purged``, ``missing_request_id``.
        """
        base: dict[str, Any] = {
            "request_id": request_id,
            "execution_id": None,
            "action": action,
            "payload": payload,
            "timestamp_utc": None,
            "result": None,
            "error": None,
        }
        if request_id is None or request_id == "":
            return {"ok": False, "reason": "missing_request_id", **base}
        fn, raised = self._adapt(execute_fn, payload)
        try:
            receipt = self.guard.execute(request_id, action, payload, fn)
        except Exception as exc:  # noqa: BLE001 - the original API never raises for fn
            if raised and exc is raised[0]:  # execute_fn's own exception
                return self._failed(request_id, action, payload, exc)
            return self._guard_answer(exc, base, payload)
        reason = "dedup_same_request_id" if receipt.replay else "executed"
        return self._dict(receipt, True, reason, payload)

    def _guard_answer(self, exc: Exception, base: dict[str, Any], payload: Any) -> dict[str, Any]:
        """Translate the guard's own answer (not an exception of execute_fn)."""
        if isinstance(exc, FingerprintMismatchError):
            return {"ok": False, "reason": "conflict_payload_mismatch", **base}
        if isinstance(exc, ActionMismatchError):
            return {"ok": False, "reason": "conflict_action_mismatch", **base}
        if isinstance(exc, InProgressError):
            return self._dict(exc.receipt, False, "claim_pending", payload)
        if isinstance(exc, OutcomeUnknownError):
            return self._dict(exc.receipt, False, "in_doubt", payload)
        if isinstance(exc, ReplayedFailureError):
            return self._dict(exc.receipt, False, "dedup_same_request_id", payload)
        if isinstance(exc, ReceiptPurgedError):
            # It ran, and retention kept only a tombstone: no result to return, and the
            # side effect is not run again. ``ok`` is the outcome's, as on any replay (a
            # caller reading ok=False as "it failed" would try again under a new id and
            # charge twice); ``error`` is None for a success, the failure's type (its
            # message purged) for a failure.
            succeeded = exc.receipt.status is Status.SUCCEEDED
            return self._dict(exc.receipt, succeeded, "receipt_purged", payload)
        if isinstance(exc, ResultNotSerializableError):
            reason = (
                "dedup_same_request_id"
                if exc.receipt.replay
                else "execute_failed:ResultNotSerializableError"
            )
            return self._dict(exc.receipt, False, reason, payload)
        raise exc  # bad input (a too-long request id, a non-JSON payload) or a broken store

    def close(self) -> None:
        """Write buffered audit events and close the database."""
        self.guard.close()

    def _failed(self, request_id: str, action: str, payload: Any, exc: Exception) -> dict[str, Any]:
        # The reason comes from the same exception policy the guard applied, not from
        # reading the record again: another caller may already have claimed it anew.
        status = classify_exception(exc, self.guard.not_executed, self.guard.outcome_unknown)
        receipt = self.guard.get(request_id)
        mine = (
            receipt is not None
            and receipt.action == action
            and (receipt.status is status or status is Status.FAILED)
        )
        out = (
            self._dict(receipt, False, "", payload)  # type: ignore[arg-type]
            if mine
            else {
                "request_id": request_id,
                "execution_id": None,
                "action": action,
                "payload": payload,
                "timestamp_utc": None,
                "result": None,
            }
        )
        out["error"] = {"type": type(exc).__name__, "message": str(exc)}
        out["reason"] = {
            Status.RELEASED: "released",
            Status.IN_DOUBT: "in_doubt",
        }.get(status, f"execute_failed:{type(exc).__name__}")
        out["ok"] = False
        return out

    @staticmethod
    def _adapt(
        execute_fn: Callable[..., Any], payload: Any
    ) -> tuple[Callable[[ExecutionContext], Any], list[BaseException]]:
        """Wrap ``execute_fn`` for the guard and remember what it raised, so that an error
        of ``execute_fn`` is never mistaken for the guard's answer about this request."""
        try:
            takes_payload = bool(inspect.signature(execute_fn).parameters)
        except (TypeError, ValueError):  # builtins without a signature: give the payload
            takes_payload = True
        raised: list[BaseException] = []

        def fn(_ctx: ExecutionContext) -> Any:
            try:
                return execute_fn(payload) if takes_payload else execute_fn()
            except BaseException as exc:
                raised.append(exc)
                raise

        return fn, raised

    @staticmethod
    def _dict(receipt: Receipt, ok: bool, reason: str, payload: Any) -> dict[str, Any]:
        error = receipt.error
        return {
            "ok": ok,
            "reason": reason,
            "request_id": receipt.request_id,
            "execution_id": receipt.execution_id,
            "action": receipt.action,
            "payload": payload,
            "timestamp_utc": _iso(receipt.claimed_at_ms),
            "result": receipt.result,
            "error": None
            if error is None
            else {"type": _short_type(error.type), "message": error.message},
        }
