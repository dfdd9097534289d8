"""The fast path's text fragments for the PostgreSQL store.

A claim or a completion in one statement (``CLAIM_FAST``, ``COMPLETE_FAST`` and their
carrying forms in :mod:`safeagent.stores._pg_sql`) has the database compute its audit
event's chain hash: these functions cut, from the text the general path's encoders write,
the fragments around the values only the database knows (``_claim_fragments``,
``_completion_fragments``, and ``_carried_rows`` for the buffered events a statement
carries). Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from safeagent._audit import AuditEvent
from safeagent._receipt import Record
from safeagent.stores._base import ClaimRequest, Completion, claimed_event, completion_events
from safeagent.stores._rows import _chain_body, event_row, shard_of

# -- the fast path's text fragments -------------------------------------------------------
# Integers standing, while a fast statement's fragments are made, for the values only the
# database knows: the clock, the fencing token and the attempt. The event is built by the
# function the general path uses (claimed_event, completion_events) and encoded by the
# encoders the general path uses (event_row, and chain_hash's body); each stand-in is then
# cut out of that text, which must hold it exactly once, so the fragments around it are
# exactly what those encoders write, whatever the strings hold. Anything else (a stand-in
# met twice, an event that is not the one expected) takes the general path.
_AT = 7_306_147_209_152_331_849
_TOKEN = 7_306_147_209_152_331_861
_ATTEMPT = 7_306_147_209_152_331_873
_AT_OPEN, _TOKEN_TEXT, _ATTEMPT_TEXT = f"[{_AT}", str(_TOKEN), str(_ATTEMPT)


class _Known:
    """What claimed_event and completion_events read of a record, before it exists."""

    __slots__ = ("action", "attempt", "execution_id", "fencing_token", "lease_expires_at_ms")

    def __init__(self, action: str, execution_id: str) -> None:
        self.action = action
        self.execution_id = execution_id
        self.fencing_token = _TOKEN
        self.attempt = _ATTEMPT
        self.lease_expires_at_ms = None  # not late: the fast statement requires it


def _cut(text: str, mark: str) -> tuple[str, str] | None:
    """``text`` split around ``mark``, which must occur exactly once (else None)."""
    head, found, tail = text.partition(mark)
    if not found or mark in tail:
        return None
    return head, tail


def _chain_tail(row: tuple[Any, ...]) -> str | None:
    """The text chain_hash hashes for ``row`` (an event_row stamped _AT), after
    ``["<prev>",<shard>,<seq>,<at_ms>``: the statement writes that start itself."""
    body = _chain_body(list(row))  # chain_hash's body is _chain_body([prev, shard, seq, *row])
    if row[0] != _AT or not body.startswith(_AT_OPEN):
        return None
    return body[len(_AT_OPEN) :]


def _claim_fragments(request: ClaimRequest, chains: int) -> tuple[Any, ...] | None:
    """CLAIM_FAST's event parameters: (shard, kind, detail before the attempt, detail after
    it, chain text after the clock, after the token, after the attempt); None when they
    cannot be cut cleanly. The statement takes the event's other fields from the row it
    wrote, so they must be the claim's own."""
    known = _Known(request.action, request.execution_id)
    try:
        row = event_row(claimed_event(request, cast(Record, known), _AT))
    except (TypeError, ValueError):  # unencodable detail: the general path reports it
        return None
    if row[2:8] != (
        request.namespace,
        request.request_id,
        request.action,
        request.owner,
        request.execution_id,
        _TOKEN,
    ):
        return None
    tail = _chain_tail(row)
    detail = _cut(row[8], _ATTEMPT_TEXT)
    if tail is None or detail is None:
        return None
    at_token = _cut(tail, _TOKEN_TEXT)
    if at_token is None:
        return None
    at_attempt = _cut(at_token[1], _ATTEMPT_TEXT)
    if at_attempt is None:
        return None
    return (shard_of(row[2], row[3], chains), row[1], *detail, at_token[0], *at_attempt)


def _carried_rows(events: Sequence[AuditEvent], chains: int) -> tuple[set[int], list[Any]] | None:
    """The shards of buffered ``events`` and their rows for CLAIM_FAST_CARRYING (each
    event_row, the chain text after its seq, its shard); None when one cannot be encoded
    or cut cleanly, or two share a chain (the general path then carries them)."""
    shards: set[int] = set()
    rows: list[Any] = []
    for event in events:
        try:
            row = event_row(event)
        except (TypeError, ValueError):  # an unencodable detail: the general path reports it
            return None
        shard = shard_of(row[2], row[3], chains)
        # chain_hash's text is _chain_body([prev, shard, seq, *row]): the statement writes
        # the start, up to the seq, from the head it locks; the rest is cut from this one
        start = f'["",{shard},0'
        body = _chain_body(["", shard, 0, *row])
        if shard in shards or not body.startswith(start):
            return None
        shards.add(shard)
        rows.append([*row, body[len(start) :], shard])
    return shards, rows


def _completion_fragments(
    completion: Completion, action: str, execution_id: str, chains: int
) -> tuple[Any, ...] | None:
    """COMPLETE_FAST's event parameters: (shard, kind, actor, detail, chain text after the
    clock): the one event completion_events writes for a completion accepted in time. The
    statement takes the event's other fields from the row, so they must be the ones its
    WHERE compares with the completion's and the claim's."""
    try:
        events = completion_events(
            completion, None, cast(Record, _Known(action, execution_id)), _AT
        )
        if len(events) != 1:
            return None
        row = event_row(events[0])
    except (TypeError, ValueError):
        return None
    if (row[2], row[3], row[4], row[6], row[7]) != (
        completion.namespace,
        completion.request_id,
        action,
        execution_id,
        completion.fencing_token,
    ):
        return None
    tail = _chain_tail(row)
    if tail is None:
        return None
    return (shard_of(row[2], row[3], chains), row[1], row[5], row[8], tail)
