"""SafeAgent's own MCP server: receipts, in-doubt records, audit trail and cases.

The implementation behind :func:`safeagent.integrations.mcp.serve` and
:func:`safeagent.integrations.mcp.build_server` (documented there); import it from
``safeagent.integrations.mcp``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

import anyio
import anyio.to_thread
from mcp.server.fastmcp import FastMCP

from safeagent import CaseState, FinalityGate, Guard, Receipt, Status
from safeagent._keys import check_name
from safeagent.errors import ConfigurationError, InvalidInputError

__all__ = ["build_server", "serve"]

_STATUSES = {s.value.lower(): s for s in Status}
_STATES = {s.value.lower(): s for s in CaseState}


def _receipt_dict(receipt: Receipt, redact: Callable[[Any], Any]) -> dict[str, Any]:
    data = receipt.to_dict()
    data.pop("replay", None)  # meaningless here: nothing ran
    data["payload"] = redact(data.get("payload"))
    data["result"] = redact(data.get("result"))
    return data


def build_server(
    guard: Guard, *, name: str = "safeagent", signal_source: str | None = None
) -> FastMCP:
    """SafeAgent's MCP server over ``guard``'s store (see the module docstring).

    Args:
        guard: the :class:`~safeagent.Guard` whose store is shown; its ``redact`` hook is
            applied to payloads, results and signal metadata.
        name: the server name reported to clients.
        signal_source: the source every signal sent through this server is recorded as
            (1 to 255 characters: the agent or model this server is configured for).
            ``None`` (default): the server has no ``signal_case`` tool and writes
            nothing. A client never names the source itself: it could otherwise replace
            another source's live signal (a human reviewer's) with its own.

    Returns:
        A ``FastMCP`` server; run it with ``server.run("stdio")``.

    Raises:
        ConfigurationError: ``guard`` is not a :class:`~safeagent.Guard`.
        InvalidInputError: a ``signal_source`` that is not a valid source name.
    """
    if not isinstance(guard, Guard):
        raise ConfigurationError(f"guard must be a safeagent.Guard, got {guard!r}")
    if signal_source is not None:
        signal_source = check_name("signal_source", signal_source)
    gate = FinalityGate(guard)
    redact = guard.redact
    server = FastMCP(
        name,
        instructions=(
            "Read SafeAgent's execution receipts, in-doubt records, audit trail and "
            "decision cases from the local store"
            + (
                ""
                if signal_source is None
                else f", and send signals about cases as {signal_source!r}"
            )
            + ". Nothing here re-runs or resolves a side effect."
        ),
    )

    async def off_loop(fn: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(fn)

    def receipts(
        namespace: str | None, status: str | None, action: str | None, limit: int
    ) -> dict[str, Any]:
        status = None if status is None else status.lower()
        if status is not None and status not in _STATUSES:
            raise InvalidInputError(f"status must be one of {sorted(_STATUSES)}, got {status!r}")
        if not 1 <= limit <= 1000:
            raise InvalidInputError(f"limit must be between 1 and 1000, got {limit}")
        stored = None
        if status is not None:  # an expired PENDING lease reads as IN_DOUBT
            wanted = _STATUSES[status]
            stored = (Status.PENDING, Status.IN_DOUBT) if wanted is Status.IN_DOUBT else (wanted,)
        records, now = guard.store.records(namespace=namespace, statuses=stored)
        found = [
            Receipt.from_record(r, replay=False, now_ms=now)
            for r in records
            if action is None or r.action == action
        ]
        if status is not None:
            found = [r for r in found if r.status is _STATUSES[status]]
        newest = sorted(found, key=lambda r: r.created_at_ms, reverse=True)[:limit]
        return {
            "count": len(found),
            "receipts": [_receipt_dict(r, redact) for r in newest],
        }

    @server.tool()
    async def list_receipts(
        namespace: str | None = None,
        status: str | None = None,
        action: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        """List execution receipts, newest first.

        Args:
            namespace: only this namespace (default: every namespace).
            status: only this status as read now: pending, succeeded, failed, released
                or in_doubt (a pending record whose lease expired reads as in_doubt).
            action: only this action (tool name).
            limit: at most this many receipts (1 to 1000, default 50); ``count`` is the
                number that matched.
        """
        return cast(
            dict[str, Any],
            await off_loop(lambda: receipts(namespace, status, action, limit)),
        )

    def one_receipt(request_id: str, namespace: str) -> dict[str, Any] | None:
        receipt = guard.get(request_id, namespace=namespace)
        return None if receipt is None else _receipt_dict(receipt, redact)

    @server.tool()
    async def get_receipt(request_id: str, namespace: str = "default") -> dict[str, Any] | None:
        """The receipt of one request id (null when there is none).

        Args:
            request_id: the idempotency key (derived ids start with ``sa1:``).
            namespace: its namespace (default ``"default"``).
        """
        return cast(
            "dict[str, Any] | None", await off_loop(lambda: one_receipt(request_id, namespace))
        )

    def in_doubt(namespace: str | None) -> dict[str, Any]:
        found = (
            guard.in_doubt(all_namespaces=True)
            if namespace is None
            else guard.in_doubt(namespace=namespace)
        )
        return {"count": len(found), "receipts": [_receipt_dict(r, redact) for r in found]}

    @server.tool()
    async def list_in_doubt(namespace: str | None = None) -> dict[str, Any]:
        """Records in doubt: the side effect may or may not have happened. Each needs an
        operator (or a reconcile hook) to say what happened; nothing re-runs them.

        Args:
            namespace: only this namespace (default: every namespace).
        """
        return cast(dict[str, Any], await off_loop(lambda: in_doubt(namespace)))

    def events(subject: str | None, namespace: str | None, limit: int) -> dict[str, Any]:
        if not 1 <= limit <= 1000:
            raise InvalidInputError(f"limit must be between 1 and 1000, got {limit}")
        found = guard.audit_trail(subject, namespace=namespace, all_namespaces=namespace is None)
        items = [e.to_dict() for e in found[-limit:]]
        return {"count": len(found), "events": items}

    @server.tool()
    async def audit_trail(
        subject: str | None = None, namespace: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """Audit events in write order (the last ``limit`` of them).

        Args:
            subject: only the events of this request id or case id.
            namespace: only this namespace (default: every namespace).
            limit: at most this many events (1 to 1000, default 100).
        """
        return cast(dict[str, Any], await off_loop(lambda: events(subject, namespace, limit)))

    def case_dict(case: Any) -> dict[str, Any]:
        data = cast(dict[str, Any], case.to_dict())
        for signal in data.get("signals", []):
            signal["metadata"] = redact(signal.get("metadata"))
        return data

    def cases(namespace: str | None, state: str | None) -> dict[str, Any]:
        state = None if state is None else state.lower()
        if state is not None and state not in _STATES:
            raise InvalidInputError(f"state must be one of {sorted(_STATES)}, got {state!r}")
        found = gate.cases(
            namespace=namespace,
            all_namespaces=namespace is None,  # the tool lists every namespace by default
            states=None if state is None else [_STATES[state]],
        )
        return {"count": len(found), "cases": [case_dict(c) for c in found]}

    @server.tool()
    async def list_cases(namespace: str | None = None, state: str | None = None) -> dict[str, Any]:
        """Decision cases, oldest first.

        Args:
            namespace: only this namespace (default: every namespace).
            state: only this state: OPEN, RESOLVED_PROVISIONAL, IN_RECONCILIATION, FINAL
                or SETTLED.
        """
        return cast(dict[str, Any], await off_loop(lambda: cases(namespace, state)))

    def one_case(case_id: str, namespace: str) -> dict[str, Any] | None:
        case = gate.get(case_id, namespace=namespace)
        if case is None:
            return None
        data = case_dict(case)
        data["history"] = [
            {**signal.to_dict(), "metadata": redact(dict(signal.metadata)), "status": status}
            for signal, status in gate.history(case_id, namespace=namespace)
        ]
        return data

    @server.tool()
    async def get_case(case_id: str, namespace: str = "default") -> dict[str, Any] | None:
        """One case with its tally, live signals and full signal history (null when
        there is none).

        Args:
            case_id: the case id.
            namespace: its namespace (default ``"default"``).
        """
        return cast("dict[str, Any] | None", await off_loop(lambda: one_case(case_id, namespace)))

    if signal_source is not None:
        _add_signal_tool(server, gate, signal_source, case_dict, off_loop)

    @server.resource("safeagent://in-doubt", mime_type="application/json")
    async def in_doubt_resource() -> str:
        """Every record in doubt, in every namespace (JSON)."""
        return json.dumps(await off_loop(lambda: in_doubt(None)), ensure_ascii=False)

    @server.resource("safeagent://receipts/{namespace}/{request_id}", mime_type="application/json")
    async def receipt_resource(namespace: str, request_id: str) -> str:
        """One receipt (JSON; ``null`` when there is none)."""
        found = await off_loop(lambda: one_receipt(unquote(request_id), unquote(namespace)))
        return json.dumps(found, ensure_ascii=False)

    @server.resource("safeagent://cases/{namespace}/{case_id}", mime_type="application/json")
    async def case_resource(namespace: str, case_id: str) -> str:
        """One case with its signal history (JSON; ``null`` when there is none)."""
        found = await off_loop(lambda: one_case(unquote(case_id), unquote(namespace)))
        return json.dumps(found, ensure_ascii=False)

    return server


def _add_signal_tool(
    server: FastMCP,
    gate: FinalityGate,
    source: str,
    case_dict: Callable[[Any], dict[str, Any]],
    off_loop: Callable[[Callable[[], Any]], Any],
) -> None:
    """The server's one write: ``signal_case``, its signals recorded as ``source``."""

    def signal(
        case_id: str,
        outcome: str,
        confidence: float,
        metadata: dict[str, Any] | None,
        namespace: str,
    ) -> dict[str, Any]:
        case = gate.signal(
            case_id,
            source,
            outcome,
            confidence,
            metadata=metadata,
            namespace=namespace,
            open_absent=False,
        )
        return case_dict(case)

    @server.tool(
        description=(
            f"Send a signal, as {source!r}, about a decision case the application has "
            "opened (a case that does not exist is refused). This server has one live "
            "signal per case: a newer one replaces it. Returns the case as it stands after "
            "the signal. Args: case_id; outcome: the outcome it votes for; confidence: "
            "between 0 and 1; metadata: a JSON object kept with the signal; namespace: the "
            'case\'s namespace (default "default").'
        )
    )
    async def signal_case(
        case_id: str,
        outcome: str,
        confidence: float,
        metadata: dict[str, Any] | None = None,
        namespace: str = "default",
    ) -> dict[str, Any]:
        return cast(
            dict[str, Any],
            await off_loop(lambda: signal(case_id, outcome, confidence, metadata, namespace)),
        )


def serve(
    db: str | os.PathLike[str] | None = None,
    *,
    schema: str | None = None,
    signal_source: str | None = None,
) -> None:
    """Run SafeAgent's MCP server over stdio until the client disconnects.

    ``safeagent mcp`` calls this. Configure it in an MCP client as the command
    ``safeagent mcp --db PATH`` (or ``python -m safeagent.integrations.mcp --db PATH``).

    Args:
        db: the store: an SQLite file path or a ``postgresql://`` URL. ``None`` uses the
            same rule as everywhere else: ``$SAFEAGENT_DB``, else ``safeagent.db`` in the
            working directory.
        schema: the PostgreSQL schema (default: the store's default schema); only with a
            ``postgresql://`` URL.
        signal_source: the source the server's signals are recorded as (see
            :func:`build_server`); ``None``: no ``signal_case`` tool.

    Raises:
        ConfigurationError: ``schema`` without a PostgreSQL URL.
        InvalidInputError: a ``signal_source`` that is not a valid source name.
        StoreError: the store cannot be opened.
    """
    if signal_source is not None:
        check_name("signal_source", signal_source)  # before the store is opened
    target: Any = db
    if schema is not None:
        if not (isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))):
            raise ConfigurationError("schema= needs a postgresql:// URL as db")
        from safeagent.stores.postgres import PostgresStore  # noqa: PLC0415 - optional extra

        target = PostgresStore(db, schema=schema)
    guard = Guard(target)
    try:
        build_server(guard, signal_source=signal_source).run("stdio")
    finally:
        guard.close()
        if target is not db:
            target.close()
