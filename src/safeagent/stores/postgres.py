"""The PostgreSQL store: every guarantee across many hosts sharing one database.

psycopg 3 with a ``psycopg_pool`` connection pool. Claims are one atomic
``INSERT ... ON CONFLICT DO UPDATE ... WHERE status = 'RELEASED' RETURNING`` statement;
fencing is checked in the statement that completes; lease expiry is judged by the
database's clock (``clock_timestamp()``), so hosts with skewed clocks agree; the namespace
is part of every key; audit events are written in the same transaction as the change.

Durability: ``"durable"`` commits claim and completion with the server's
``synchronous_commit`` (on, by default); ``"claim-durable"`` commits the completion with
``synchronous_commit`` off for its transaction (``SET LOCAL``, done by the completing
statement itself): a server crash can turn a recent receipt back into a claim that reads as
in doubt, never a duplicate.

Round trips: a read is one statement, which also reads the clock. A claim, and a
completion that names its attempt's action and execution id (the guard's always do), are
usually ONE statement each, sent in autocommit (its own transaction, no BEGIN or COMMIT):
it makes the change, locks the audit chain head of its one event, writes the event with
its chain hash computed by the database (sha256 over the text chain_hash() hashes, from
fragments the client JSON-encoded), and moves the head. It changes nothing when its
assumptions do not hold, and the general path follows: two round trips (with libpq 14 or
later; four without pipeline mode): BEGIN and the statement that makes the change and
locks its audit chain heads, then the statement that writes the events and moves the
heads, and COMMIT. Buffered audit events go with the next write: a claim carries up to
``MAX_CARRIED`` (8) of them in its one statement, each on a chain of its own and none on
the claim's (``CLAIM_FAST_CARRYING``), and takes the general path with more. The general
path also takes a completion while buffered events wait, and one that settles a case, is
late (a second event), is refused by the fencing check (a rejection event), or does not
name its attempt (or names another: the statement checks both against the row).

The guard claims before it reads here (``claim_first``, :meth:`PostgresStore.claim_new`)
while fewer than a quarter of the recent calls' first steps found a record: its first
statement for a call inserts the record only if there is none (``ON CONFLICT DO
NOTHING``, which neither locks nor writes the row that is there), with the buffered audit
events when it does, and otherwise returns that row. A first execution is then two round trips, the
claim and the completion; a replay is still one, but a statement about twice a read's
CPU on both sides, so a store whose calls are mostly replays reads first (BENCHMARKS.md,
round 12).

A lost connection (the server restarted, the backend was terminated, a proxy dropped it)
drains the pool (every idle connection closed and replaced: after a failover they are all
dead), and the calls whose second try is provably safe run once more, on a connection the
pool has just opened: a read, a claim, a completion, the opening of a case. The claim and
the completion recognise their own write when the lost try did commit (the reply was lost,
not the commit): see :class:`PostgresStore`. Any other failure, a lost connection under
another write, and a second lost connection fail closed: the call raises
:class:`~safeagent.errors.StoreError`, and a claim that could not be committed means ``fn``
does not run. Audit events whose write's fate is unknown are kept and looked up by the
next write, by the write's own event or their chain hash: each is written once.

Install with ``pip install -e '.[postgres]'``.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar, cast

from safeagent._audit import AuditEvent
from safeagent._cases import CaseRow, CaseState, Signal
from safeagent._receipt import Record, Status
from safeagent.errors import (
    ConfigurationError,
    InvalidTransitionError,
    SchemaVersionError,
    StoreError,
)
from safeagent.stores import _pg_sql as q
from safeagent.stores._base import (
    CaseMutation,
    CaseUpdate,
    ClaimRequest,
    ClaimResult,
    Clock,
    Completion,
    EventBuffer,
    Lease,
    Resolution,
    WriteResult,
    case_events,
    check_durability,
    claimed_event,
    completion_events,
    completion_kind,
    purged_event,
    resolved_event,
    settled_event,
    stamped,
    state_change_event,
    stored_number,
    stored_version,
    take_over_event,
)
from safeagent.stores._rows import (
    CASE_COLUMNS,
    CHAIN_SHARDS,
    N_COLUMNS,
    Heads,
    _chain_body,
    chain_rows,
    dumps,
    event_row,
    row_to_case,
    row_to_event,
    row_to_record,
    row_to_signal,
    shard_of,
)

try:
    import psycopg
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "the PostgreSQL store needs psycopg 3 and psycopg_pool: pip install -e '.[postgres]' "
        "in a SafeAgent clone"
    ) from exc

T = TypeVar("T")

DATABASE_URL_ENV = "SAFEAGENT_DATABASE_URL"
DEFAULT_SCHEMA = "safeagent"
_MIGRATION_LOCK = 0x5AFE_A6E7  # pg_advisory_xact_lock key: one migrator at a time
_DROP_LOCK = _MIGRATION_LOCK + 1  # pg_try_advisory_xact_lock key: one index dropper
_DROP_LOCK_TIMEOUT = "200ms"  # the longest a drop may hold up the audit table's writers


# PostgreSQL's reserved key words (pg_get_keywords() categories R and T, PostgreSQL 15,
# and system_user, reserved since 16): none can be an unquoted schema name.
_RESERVED = frozenset(
    """all analyse analyze and any array as asc asymmetric authorization binary both case
    cast check collate collation column concurrently constraint create cross
    current_catalog current_date current_role current_schema current_time
    current_timestamp current_user default deferrable desc distinct do else end except
    false fetch for foreign freeze from full grant group having ilike in initially inner
    intersect into is isnull join lateral leading left like limit localtime
    localtimestamp natural not notnull null offset on only or order outer overlaps
    placing primary references returning right select session_user similar some
    symmetric system_user table tablesample then to trailing true union unique user using
    variadic verbose when where window with""".split()  # noqa: SIM905 - as pg_get_keywords() lists them
)


def _check_schema(name: str) -> str:
    """``name`` as PostgreSQL will name the schema: an unquoted identifier of ASCII letters,
    digits and ``_``, folded to lower case, neither a reserved key word nor starting with
    ``pg_`` (the server's own). ASCII only: PostgreSQL folds only ASCII letters, Python's
    ``lower()`` every letter, so two non-ASCII names (the Kelvin sign and ``k``) could
    share one schema, one tenant replaying another's receipts. The limit is
    NAMEDATALEN - 1 = 63 bytes: the server silently cuts a longer name, and two names that
    differ only after the cut would share a schema too."""
    if (
        not isinstance(name, str)
        or not name
        or not name.isascii()
        or not name.replace("_", "").isalnum()
        or name[0].isdigit()
    ):
        raise ConfigurationError(
            f"schema must be a plain identifier (ASCII letters, digits, _), got {name!r}"
        )
    folded = name.lower()
    if folded in _RESERVED or folded.startswith("pg_"):
        raise ConfigurationError(
            f"schema {name!r} is "
            + ("a reserved word in PostgreSQL" if folded in _RESERVED else "reserved (pg_)")
            + ": choose another name"
        )
    size = len(folded.encode("utf-8"))
    if size > 63:
        raise ConfigurationError(
            f"schema {name!r} is {size} bytes in UTF-8; PostgreSQL keeps only the first 63 "
            "of an identifier, so a longer name could share a schema with another"
        )
    return folded


_ROWS_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_PIPELINE = psycopg.capabilities.has_pipeline()  # libpq 14 or later


@contextmanager
def _pipelined_transaction(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Cursor[Any]]:
    """A transaction in pipeline mode, BEGIN and COMMIT sent as statements: BEGIN goes out
    with the first statement, COMMIT with the last, and the body waits only where it
    fetches a result. A claim (BEGIN + claim | events + COMMIT) is then two round trips
    instead of four. (``conn.transaction()`` syncs the pipeline as it enters and as it
    leaves: a round trip each.) Any failure rolls back; if the connection is broken, the
    pool discards it."""
    try:
        with conn.pipeline(), conn.cursor() as cur:
            cur.execute("BEGIN", prepare=False)
            yield cur
            cur.execute("COMMIT", prepare=False)
        # leaving the pipeline waits for every result: an error of any statement, the
        # COMMIT's included, is raised here
    except BaseException:
        with suppress(psycopg.Error):
            conn.rollback()
        raise


def _int_array(values: set[int]) -> str:
    """An int[] as its text literal (the statements cast it): psycopg adapts one string
    several times faster than a Python list."""
    return "{" + ",".join(map(str, values)) + "}"


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


# The failures of CLAIM_NEW_FAST after which claim_new reads instead (the statement
# failed whole: nothing was written): a read-only transaction (a database turned
# read-only, a standby), the statement's lock_timeout (CLAIM_NEW_LOCK_TIMEOUT, or the
# session's when shorter), and a cancel (the session's own statement_timeout, shorter).
_READ_INSTEAD = (
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,
)


CLAIM_FIRST_FOUND_SHARE = 0.25
"""A store claims first (PostgresStore.claim_first) while less than this share of the
recent first steps of calls (claim_new's answers, and look's when a call read first)
found a record."""
_LOOK_WEIGHT = 1 / 16  # each answer's weight in that share (an exponential average)


def _found(row: Sequence[Any] | None) -> tuple[Record | None, int]:
    """GET's one row -> (the record, or None when its columns are NULL; the clock)."""
    if row is None:  # pragma: no cover - GET always returns its one row
        return None, 0
    return (None if row[0] is None else row_to_record(row)), int(row[N_COLUMNS])


_N_CASE_COLUMNS = CASE_COLUMNS.count(",") + 1


def _with_live(rows: Sequence[Sequence[Any]]) -> list[tuple[CaseRow, list[Signal]]]:
    """CASES_LIVE's rows (a case's columns, then one live signal's or NULLs; a case's
    rows together) -> each case with its live signals, in order."""
    out: list[tuple[CaseRow, list[Signal]]] = []
    for row in rows:
        if not out or (out[-1][0].namespace, out[-1][0].case_id) != (row[0], row[1]):
            out.append((row_to_case(row), []))
        if row[_N_CASE_COLUMNS] is not None:  # a live signal (source is NOT NULL)
            out[-1][1].append(row_to_signal(row[_N_CASE_COLUMNS:]))
    return out


# -- lost connections ------------------------------------------------------------------------


def _connection_lost(exc: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    """``conn`` died under the call: the server went away (a restart, a failover, the
    backend terminated, a proxy or the network dropped it). Judged by the connection's
    state after the error, while the connection is still the caller's (the pool may close
    a healthy one it takes back), not by the error: psycopg marks ``broken`` only where it
    met the failure itself; in pipeline mode a FATAL from the server (57P01, as
    ``pg_terminate_backend`` sends) or a socket closed after COMMIT surfaces as "cannot
    exit pipeline mode while busy" on a connection still busy, not yet marked broken. A
    lock timeout, a cancelled statement, a serialization failure or a deadlock leave the
    connection open and idle (status OK): they are not this."""
    if conn is None or not isinstance(exc, psycopg.Error):
        return False
    if conn.broken or conn.closed:
        return True
    pgconn = conn.pgconn
    # A status other than OK: BAD (closed), or mid-(re)connection. A connection the error
    # left busy (a pipeline cut off mid-flight: the server's FATAL may not even have been
    # read yet) can never be used again, and the server may be gone: lost too. A lock
    # timeout or a cancel leaves it idle or in a failed transaction, not busy.
    return (
        pgconn.status != psycopg.pq.ConnStatus.OK
        or pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
    )


def _lost(err: StoreError) -> bool:
    """``err`` is a lost connection (see PostgresStore._failed)."""
    return getattr(err, "connection_lost", False) is True


# (namespace, subject, kind, execution id or None, fencing token or None): where the event a
# claim or completion writes of its own is found in the trail (EVENTS_OF_WRITE).
Witness = tuple[str, str, str, str | None, int | None]


def _claim_witness(request: ClaimRequest) -> Witness:
    """The claimed event of ``request``'s claim: its execution id is fresh (no other claim
    writes it), so an event under it proves the claim committed."""
    return (request.namespace, request.request_id, "claimed", request.execution_id, None)


def _completion_witness(completion: Completion) -> Witness:
    """The outcome event of ``completion`` accepted: fencing accepts one completion per
    token, so its kind under that token (and its execution id, when named) proves it
    committed. Observations of an expired lease share the in-doubt kind and the token; they
    are told apart by their detail (_witnessed)."""
    kind = completion_kind(completion)._value_
    return (
        completion.namespace,
        completion.request_id,
        kind,
        completion.execution_id,
        completion.fencing_token,
    )


def _observed(detail: str) -> bool:
    """An event ``detail`` (JSON text) is an observation of an expired lease. A detail that
    is not a JSON object (edited in the database: audit.verify reports it) is not."""
    try:
        value = json.loads(detail)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("observed") is True


def _claimed_by(record: Record, request: ClaimRequest, now: int) -> bool:
    """``record`` is the claim ``request`` made, untouched since, its lease live at ``now``:
    what a second try of a claim finds when its lost first try did commit.

    No other claim writes this execution id (a fresh one per request). Nothing changed the
    row since: every statement that changes a PENDING row sets updated_at_ms to its clock
    (the completion, renew, resolve, take-over) or leaves it PENDING no more, and a
    take-over needs the lease expired, so its clock is past claimed_at_ms + lease_ms > the
    claim's. The fencing token and the attempt are then the ones the claim set. A lease
    expired meanwhile is not won: anyone may take the record over (it reads as in doubt),
    so it is reported as found."""
    return (
        record.status is Status.PENDING
        and record.execution_id == request.execution_id
        and record.lease_owner == request.owner
        and request.lease_ms > 0
        and record.updated_at_ms == record.claimed_at_ms
        and record.lease_expires_at_ms == record.claimed_at_ms + request.lease_ms
        and now < record.lease_expires_at_ms
    )


def _carries(record: Record, completion: Completion) -> bool:
    """``record`` holds exactly what ``completion`` writes: its status, result and error
    under its fencing token (and the action and execution id it names). Only a completion
    holding that token writes under it, and fencing accepts only the first one: this is
    ``completion``'s own write, committed by a try whose reply was lost."""
    return (
        record.fencing_token == completion.fencing_token
        and record.status is completion.status
        and record.result_json == completion.result_json
        and record.error == completion.error
        and completion.action in (None, record.action)
        and completion.execution_id in (None, record.execution_id)
    )


def _released_then_claimed(record: Record, completion: Completion) -> bool:
    """``record`` proves that ``completion``, a release (RELEASED), committed, although
    another claim has since replaced it: the record holds another execution id under the
    very next fencing token.

    The execution id changes only when a claim takes a RELEASED record over, raising the
    token by one; nothing else raises it without keeping the execution id (a take-over)
    or leaving the record RELEASED (a resolution, a re-run: no). So the one claim that
    raised ``completion``'s token found the record RELEASED under that token, still this
    attempt's (still its execution id), and only a completion holding the token, this
    attempt's own, releases it: this completion. A token further on proves nothing (a
    take-over, then a release by the new holder, then a claim looks the same); an
    in-doubt completion taken over since is not told from a lease that expired."""
    return (
        completion.status is Status.RELEASED
        and completion.execution_id is not None
        and record.execution_id != completion.execution_id
        and record.fencing_token == completion.fencing_token + 1
    )


def _read_only(cur: psycopg.Cursor[Any]) -> bool:
    """Whether this session's transactions are read-only (a hot standby, or
    ``default_transaction_read_only``)."""
    cur.execute("SHOW transaction_read_only")
    row = cur.fetchone()
    return row is not None and row[0] == "on"


class PostgresStore:
    """Execution records, cases and the audit trail in PostgreSQL.

    Args:
        dsn: a libpq connection string or URL; ``None`` reads ``$SAFEAGENT_DATABASE_URL``.
        schema: the schema holding the tables (created if missing; default ``"safeagent"``):
            ASCII letters, digits and ``_``, at most 63 bytes (PostgreSQL's identifier
            limit), not a reserved word nor ``pg_...``, folded to lower case as PostgreSQL
            folds unquoted names, so
            ``"Tenant_A"`` and ``"tenant_a"`` are one schema. Two stores on one database
            with different schemas never see each other.
        durability: ``"durable"`` (default) or ``"claim-durable"`` (module docstring).
        min_size, max_size: connection pool bounds (default 1 and 10).
        timeout: seconds to wait for a connection (from the pool or a new one) before
            failing closed with :class:`~safeagent.errors.StoreError` (default 5.0).
        clock: integer ms since the epoch, for tests only; by default leases are judged by
            the database's clock.

    Lost connections: a pooled connection is not checked when it is taken (that would be
    a round trip on every call). A call whose connection turns out dead (psycopg raised
    and the connection is now closed or broken: the server restarted, the backend was
    terminated, a proxy dropped it; see _connection_lost) drains the pool, so the calls
    after it get new connections, and, where a second try is provably safe, tries once
    more on a connection the pool has just opened:

    - reads (``get``, ``records``, ``events``, ``get_case``, ``cases``, ...): they change
      nothing;
    - ``claim``: it carries a fresh execution id, so if the lost attempt did commit, the
      second try finds the record PENDING under that execution id and owner, unchanged
      since (updated when claimed, its lease the claim's own) and its lease live: that is
      this claim, reported won, and ``fn`` runs once. (Were its lease to have expired
      meanwhile, the record is reported as found: in doubt, never run twice.) The audit
      events the lost attempt carried are written once either way;
    - ``complete``: fencing refuses a second write, so if the lost attempt did commit, the
      record already holds exactly this completion (its status, result and error under
      its fencing token, action and execution id): reported accepted, no rejection
      audited. A release (RELEASED) whose record another claim has taken since is
      recognised too: another execution id under the very next fencing token proves it
      (_released_then_claimed);
    - ``open_case``: it inserts the case only if absent, and audits only what it inserted.

    Not retried, because a lost attempt may have committed and nothing tells its write
    from another's, or a second one would add to it: ``resolve``, ``take_over`` (neither
    writes anything unique to the attempt), ``renew`` (the heartbeat retries a failed
    renewal itself, within 50 ms), ``update_case`` (a signal would be stored twice),
    ``record_event``, ``flush_events``, ``add_anchor`` and ``purge``. They, and a second
    try that fails too, raise :class:`~safeagent.errors.StoreError`; its
    ``connection_lost`` attribute is ``True`` when the connection was lost. (An audit
    event ``record_event`` built its statement for is kept instead, for the next write to
    settle: see there.)

    Raises:
        ConfigurationError: no DSN, a bad schema name or durability mode.
        StoreError: the database cannot be reached or migrated.
        SchemaVersionError: the schema was written by a newer SafeAgent.
    """

    durable = True
    _fast_path = True  # tests turn it off on an instance to compare with the general path

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = DEFAULT_SCHEMA,
        durability: str = "durable",
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        dsn = dsn or os.environ.get(DATABASE_URL_ENV)
        if not dsn:
            raise ConfigurationError(f"no PostgreSQL DSN: pass dsn= or set ${DATABASE_URL_ENV}")
        self.dsn = dsn
        self.schema = _check_schema(schema)
        self.durability = check_durability(durability)
        self.timeout = float(timeout)
        self._clock = clock
        self._sizes = (min_size, max_size)
        self._sql: dict[str, str] = {
            name: getattr(q, name).replace("{s}", self.schema)
            for name in dir(q)
            if name.isupper() and isinstance(getattr(q, name), str) and name != "NOW"
        }
        # claim-durable: the completion's own statement turns synchronous_commit off for its
        # transaction (no SET LOCAL round trip)
        self._complete_sql = self._sql[
            "COMPLETE_ASYNC" if self.durability == "claim-durable" else "COMPLETE"
        ]
        self._complete_fast_sql = self._sql[
            "COMPLETE_FAST_ASYNC" if self.durability == "claim-durable" else "COMPLETE_FAST"
        ]
        self._complete_carrying_sql = self._sql[
            "COMPLETE_FAST_CARRYING_ASYNC"
            if self.durability == "claim-durable"
            else "COMPLETE_FAST_CARRYING"
        ]
        self._lock = threading.Lock()
        # this thread's transaction: .pending, the audit events it emits; .buffered, the
        # buffered events it writes too; .locked, the chain heads its claim or completion
        # statement already locked, as (shards, heads)
        self._tx = threading.local()
        # batches of buffered events a write carried without learning whether it committed:
        # each with how the next write holding it learns (_unwritten)
        self._uncertain: list[tuple[list[AuditEvent], Callable[[psycopg.Cursor[Any]], bool]]] = []
        self._uncertain_lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._pid = 0
        self._closed = False
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        where = f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
        self._identity = f"postgresql:{where}/{self.schema}"  # on every call's hot path
        self._buffer = EventBuffer(self.flush_events)
        self._found = 0.0  # the share of recent first steps that found a record (claim_first)
        # the number of audit chains (set by _migrate): 16 in a schema whose chains began
        # before version 4, else as the schema stores it (q.NEW_CHAIN_SHARDS)
        self.chain_shards = CHAIN_SHARDS
        # why this store must not write (a head beyond its chains, found at open), or None
        self._unwritable: str | None = None
        self._read_only = False  # the database was read-only when the store opened
        _live_stores.add(self)  # last: a fork's handler reads what is set above
        try:
            self._migrate()
        except BaseException:
            self._closed = True  # a store that cannot open leaves no pool (or threads) behind
            self._buffer.detach()
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            raise

    @property
    def identity(self) -> str:
        return self._identity

    def _forget_in_child(self) -> None:
        """In a forked child, before any other of its code runs: new locks (a thread of the
        parent may have held one at the fork, and it does not exist here), and no pool. The
        parent's pool is not this process's: marked closed, it is never used or closed here
        (its __del__ would stop the parent's worker threads, taking locks one of them may
        have held at the fork; psycopg never closes an inherited connection either). The
        first call opens a pool of the child's own. Uncertain marks name events of the
        parent's buffer, which the child forgot (EventBuffer)."""
        self._lock = threading.Lock()
        self._uncertain_lock = threading.Lock()
        self._uncertain = []
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._closed = True

    # -- connections and transactions ------------------------------------------------------

    def _get_pool(self) -> ConnectionPool:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._closed:
                raise StoreError("the PostgreSQL store is closed")
            if self._pool is None or self._pid != os.getpid():
                # first use, or a forked child: never share the parent's connections
                self._pool = ConnectionPool(
                    self.dsn,
                    min_size=self._sizes[0],
                    max_size=self._sizes[1],
                    timeout=self.timeout,
                    kwargs={
                        "autocommit": True,
                        "connect_timeout": max(1, int(self.timeout)),
                        "application_name": f"safeagent-{self.schema}",
                    },
                    open=True,
                    name=f"safeagent-{self.schema}",
                )
                self._pid = os.getpid()
            return self._pool

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for the block. An error the block raises is judged while
        the connection is still ours (_failed): once the pool takes it back, it may close
        it for reasons of its own (past ``max_lifetime``, or opened before a drain), and a
        closed connection would pass for a lost one."""
        try:
            with self._get_pool().connection() as conn:
                try:
                    yield conn
                except psycopg.Error as exc:
                    raise self._failed(exc, conn) from exc
        except PoolTimeout as exc:  # an OperationalError too: before the generic branch
            raise self._no_connection(exc) from exc
        except psycopg.Error as exc:  # handing the connection out or back (PoolClosed)
            raise StoreError(f"PostgreSQL failed: {exc}", connection_lost=False) from exc

    def _no_connection(self, exc: PoolTimeout) -> StoreError:
        """The error for a pool that gave no connection within ``timeout``: one direct
        connection attempt (only on this failure path) tells a server that cannot be
        reached, with libpq's reason, from a pool whose connections are all busy."""
        try:
            with psycopg.connect(self.dsn, connect_timeout=max(1, round(self.timeout))):
                pass
        except psycopg.Error as cause:
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)
            return StoreError(f"cannot reach PostgreSQL within {self.timeout} s: {reason}")
        return StoreError(
            f"no PostgreSQL connection within {self.timeout} s: all {self._sizes[1]} pooled "
            f"connections are busy ({exc})"
        )

    def _failed(self, exc: psycopg.Error, conn: psycopg.Connection[Any] | None) -> StoreError:
        """The StoreError for ``exc``, which ``conn`` raised. When the connection was lost
        (_connection_lost), it says so (``connection_lost=True``: the calls that may, try
        once more) and the pool is drained: after a server restart or a failover every
        idle connection is dead too, and each would fail a call of its own. Draining closes
        them (no round trip) and has new ones opened; a connection in use is closed when
        it is returned. Every connection the pool hands out after this was opened after
        the drain began. (psycopg_pool before 3.3 has no drain(): check() tests each idle
        connection instead, a round trip each, only after a loss.)"""
        if not _connection_lost(exc, conn):
            if getattr(exc, "sqlstate", None) == q.CHAIN_HEAD_MISSING:
                return StoreError(
                    "PostgreSQL write refused: the audit chain head of its event is missing "
                    "(a row of audit_chain was deleted?), so the event cannot be chained; "
                    "nothing was written (run `safeagent audit verify`)",
                    connection_lost=False,
                )
            return StoreError(f"PostgreSQL failed: {exc}", connection_lost=False)
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            drain = getattr(pool, "drain", None)
            with suppress(Exception):  # a pool closing meanwhile: the retry reports it
                if drain is not None:
                    drain()
                else:  # psycopg_pool before 3.3
                    pool.check()
        return StoreError(f"PostgreSQL failed: {exc}", connection_lost=True)

    def _one(self, sql: str, params: Sequence[Any]) -> Any:
        """One statement alone in autocommit (its own transaction) and its first row (None
        if it returned none): what _connection does, without its two context managers (the
        hot paths run this twice or three times per execution)."""
        pool = self._get_pool()
        try:
            conn = pool.getconn()
        except PoolTimeout as exc:
            raise self._no_connection(exc) from exc
        except psycopg.Error as exc:  # PoolClosed
            raise StoreError(f"PostgreSQL failed: {exc}") from exc
        try:
            return conn.execute(sql, params).fetchone()
        except psycopg.Error as exc:
            raise self._failed(exc, conn) from exc
        finally:
            pool.putconn(conn)  # a broken connection is discarded, not pooled

    @contextmanager
    def _write(
        self,
        *,
        pipelined: bool = False,
        hold: bool = False,
        carry: list[AuditEvent] | None = None,
        witness: Witness | None = None,
    ) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction. Its audit events (buffered ones first, then those the body
        emits) are chained at the end, after the body's row locks, taking the chain-head
        locks in shard order: two writers never wait on each other in a cycle. (A claim or
        completion takes them at the end of its own statement instead: see _lock_for.)

        ``pipelined``: BEGIN travels with the body's first statement and COMMIT with the
        event statement (see _pipelined_transaction), for a body that only executes and
        fetches (``rowcount`` is not known before the results are).

        The buffered events go back to the buffer if the transaction fails. Where it may
        have committed (the connection was lost, or an interrupt came), they go back
        marked, and the write that takes them next looks them up first (_unwritten): by
        ``witness``, the claim's or completion's own event, which they are written with or
        not at all (_unclaimed); else by the chain hash of the last of them, once they were
        sent. With ``hold``, a lost connection leaves them in ``self._tx.held`` instead,
        for the caller's second try (_held), which passes them as ``carry`` (written
        instead of the buffer's) and learns whether its first try committed them; a second
        try that finds they were clears ``self._tx.buffered``."""
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        buffered = carry if carry is not None else self._buffer.take() if self._buffer else []
        if self._uncertain and buffered and carry is None:
            buffered = self._unwritten(buffered)
        pending: list[AuditEvent] = []
        tx = self._tx
        tx.pending, tx.buffered, tx.locked, tx.rows = pending, buffered, None, None
        try:
            with self._connection() as conn:
                if pipelined and _PIPELINE:
                    with _pipelined_transaction(conn) as cur:
                        yield cur
                        self._insert_events(cur, [*buffered, *pending] if buffered else pending)
                else:
                    with conn.transaction(), conn.cursor() as cur:
                        yield cur
                        self._insert_events(cur, [*buffered, *pending] if buffered else pending)
        except BaseException as exc:
            self._give_back(buffered, exc, hold, witness)
            raise
        finally:
            tx.pending = tx.buffered = tx.locked = None

    def _give_back(
        self,
        buffered: list[AuditEvent],
        exc: BaseException,
        hold: bool,
        witness: Witness | None,
    ) -> None:
        """Where the buffered events a failed write took go (see _write)."""
        store_error = isinstance(exc, StoreError)
        lost = isinstance(exc, StoreError) and _lost(exc)
        if hold and lost:
            self._tx.held = buffered  # committed or not: the second try tells
        elif not buffered:
            return
        elif store_error and not lost and (hold or witness is None):
            self._buffer.put_back(buffered)  # refused: the server rolled it back
        elif witness is not None:
            # a second try, however it failed (its first try may have committed them), or
            # an interrupt, perhaps after the COMMIT was sent
            self._mark(buffered, self._witnessed(witness))
        elif (rows := self._tx.rows) is not None:
            # sent, perhaps with a COMMIT whose reply was lost
            last = rows[len(buffered) - 1]
            self._mark(buffered, self._by_hash((last[2], last[3], last[-1])))
        else:
            self._buffer.put_back(buffered)  # never sent

    def _mark(self, events: list[AuditEvent], found: Callable[[psycopg.Cursor[Any]], bool]) -> None:
        """Put ``events`` back in the buffer, marked: whether they are in the trail is
        ``found``'s answer, asked by the next write that takes them (_unwritten)."""
        with self._uncertain_lock:
            self._uncertain.append((events, found))
        self._buffer.put_back(events)

    def _by_hash(self, last: tuple[str, str, str]) -> Callable[[psycopg.Cursor[Any]], bool]:
        """Whether the event with chain hash ``last`` (namespace, subject, hash) is in the
        trail: a chain hash is unique."""
        sql = self._sql["EVENT_BY_HASH"]
        return lambda cur: cur.execute(sql, last).fetchone() is not None

    def _witnessed(self, witness: Witness) -> Callable[[psycopg.Cursor[Any]], bool]:
        """Whether the claim's or completion's own event that ``witness`` names is in the
        trail, and so the buffered events it carried (EVENTS_OF_WRITE; an observation of
        an expired lease, which shares an in-doubt completion's kind and token, is not)."""
        sql = self._sql["EVENTS_OF_WRITE"]

        def found(cur: psycopg.Cursor[Any]) -> bool:
            return any(not _observed(row[0]) for row in cur.execute(sql, witness).fetchall())

        return found

    def _unclaimed(self, cur: psycopg.Cursor[Any], witness: Witness | None) -> None:
        """A claim that was lost, or a completion that was refused: no event of its own
        (its witness) is written, so no buffered event either. On a second try
        (``witness``), those its first try committed are dropped; the rest go back to the
        buffer, unmarked: nothing wrote them."""
        buffered = self._tx.buffered
        if not buffered:
            return
        if witness is None or not self._witnessed(witness)(cur):
            self._buffer.put_back(list(buffered))
        buffered.clear()

    def _unwritten(self, buffered: list[AuditEvent]) -> list[AuditEvent]:
        """``buffered`` without the batches a write that may have committed carried and
        did commit (see _write): one read per marked batch, only after a lost connection
        or an interrupt. A mark stays in ``_uncertain`` until the write holding its events
        has checked it (others see it meanwhile); a batch whose look-up fails goes back to
        the buffer, still marked, and an interrupt puts back every event not yet settled."""
        with self._uncertain_lock:
            batches = list(self._uncertain)
        taken = {id(event) for event in buffered}
        for batch in batches:
            events, found = batch
            if not all(id(event) in taken for event in events):
                continue  # another write holds them: its own check settles this mark
            try:
                written = self._read(found)
            except StoreError:
                # unknown still: keep them aside, marked, for a later write
                ids = {id(event) for event in events}
                buffered = [event for event in buffered if id(event) not in ids]
                self._buffer.put_back(events)
                continue
            except BaseException:
                self._buffer.put_back(buffered)  # this batch and the rest still marked
                raise
            with self._uncertain_lock:
                self._uncertain = [b for b in self._uncertain if b is not batch]
            if written:  # by the write that may have committed: not again
                ids = {id(event) for event in events}
                buffered = [event for event in buffered if id(event) not in ids]
        return buffered

    def _held(self) -> list[AuditEvent]:
        """The buffered events a write with ``hold`` carried when it lost its connection
        (none if it never took any), for its second try to carry."""
        tx = self._tx
        held: list[AuditEvent] | None = getattr(tx, "held", None)
        tx.held = None
        return [] if held is None else held

    def _again(self, call: Callable[[], T]) -> T:
        """``call`` (a read, or a write a second try cannot double), and once more if its
        connection was lost: the pool was drained (_failed), so on a connection it has
        just opened. Only once: a second failure is raised."""
        try:
            return call()
        except StoreError as err:
            if not _lost(err):
                raise
        return call()

    def _emit(self, events: Sequence[AuditEvent]) -> None:
        """Audit events of the current transaction, written when it commits."""
        self._tx.pending.extend(events)

    def _lock_for(self, namespace: str, subject: str) -> tuple[set[int], str]:
        """The chain heads a claim or completion on ``subject`` writes to (its own and those
        of the buffered events written with it): the shards, and the text literal its
        statement locks them by. Only for a body whose every event is on ``subject``: a
        head taken later, after these, could break the shard order."""
        chains = self.chain_shards
        shards = {shard_of(namespace, subject, chains)}
        for event in self._tx.buffered:
            shards.add(shard_of(event.namespace, event.subject, chains))
        return shards, _int_array(shards)

    def _locked(self, shards: set[int], rows: list[Any]) -> None:
        """Keep the heads a claim or completion statement locked (the three columns after
        the record's and the clock in each of its rows) for _insert_events."""
        i = N_COLUMNS + 1
        self._tx.locked = (shards, {r[i]: (r[i + 1], r[i + 2]) for r in rows if r[i] is not None})

    def _insert_events(self, cur: psycopg.Cursor[Any], events: Sequence[AuditEvent]) -> None:
        """Chain ``events`` and write them with their new chain heads: one statement, plus
        one to lock the heads unless the body's claim or completion already did."""
        if not events:
            return
        chains = self.chain_shards
        each = [shard_of(e.namespace, e.subject, chains) for e in events]
        shards = set(each)
        locked = self._tx.locked
        if locked is not None and shards <= locked[0]:
            heads: Heads = locked[1]
        else:
            cur.execute(self._sql["LOCK_HEADS"], (_int_array(shards),))
            heads = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
        rows = chain_rows(events, heads, each)
        self._tx.rows = rows
        if len(rows) == 1:
            cur.execute(self._sql["EVENT"], rows[0])
        else:  # one statement however many rows (JSON, ensure_ascii=False: text psycopg
            # would refuse as a parameter, it refuses the same way inside the JSON)
            cur.execute(self._sql["EVENT_ROWS"], (_ROWS_JSON(rows),))

    def _read(self, fn: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """``fn``, which only reads, on a cursor (once more if the connection was lost)."""

        def once() -> T:
            with self._connection() as conn, conn.cursor() as cur:
                return fn(cur)

        return self._again(once)

    def _p(self, **params: Any) -> dict[str, Any]:
        params["now"] = None if self._clock is None else self._clock()
        return params

    def _at(self) -> int | None:
        """The ``now`` parameter of the positional statements: None (the database's clock)
        or the test clock's reading."""
        return None if self._clock is None else self._clock()

    def _record_at(
        self, cur: psycopg.Cursor[Any], namespace: str, request_id: str
    ) -> tuple[Record | None, int]:
        """The record (or None) and the clock, read in one statement."""
        cur.execute(self._sql["GET"], (self._at(), namespace, request_id))
        return _found(cur.fetchone())

    def _schema_version(self, cur: psycopg.Cursor[Any]) -> int | None:
        """The schema's stored version, or None if it has no version table or row yet.

        Raises:
            SchemaVersionError: a version newer than this release understands.
        """
        cur.execute("SELECT to_regclass(%s)", (f"{self.schema}.safeagent_meta",))
        row = cur.fetchone()
        if row is None or row[0] is None:
            return None
        cur.execute(f"SELECT value FROM {self.schema}.safeagent_meta WHERE key = 'schema_version'")
        row = cur.fetchone()
        version = None if row is None else stored_version(row[0], f"schema {self.schema}")
        if version is not None and version > q.SCHEMA_VERSION:
            raise SchemaVersionError(
                f"schema {self.schema} has version {version}, but this SafeAgent "
                f"understands up to {q.SCHEMA_VERSION}: upgrade SafeAgent to use it",
                found=version,
                supported=q.SCHEMA_VERSION,
            )
        return version

    def _chains_of(self, cur: psycopg.Cursor[Any], version: int) -> tuple[int, int | None]:
        """(the schema's number of audit chains, its highest chain head's shard or None)."""
        if version < q.SCHEMA_VERSION:
            chains = CHAIN_SHARDS
        else:
            cur.execute(self._sql["GET_CHAIN_SHARDS"])
            chains = self._stored_chain_shards(cur.fetchone())
        cur.execute(self._sql["TOP_HEAD"])
        (top,) = cur.fetchone() or (None,)
        return chains, top

    def _up_to_date(self, cur: psycopg.Cursor[Any]) -> tuple[int, int | None] | None:
        """:meth:`_chains_of` a schema that needs no migration, read without writing (so
        a store opens on a read-only database, such as a hot standby, and an open of an
        up-to-date schema takes no lock); None if it must be created or migrated."""
        version = self._schema_version(cur)
        if version is None or version < max(2, len(q.MIGRATIONS)):
            return None
        return self._chains_of(cur, version)

    def _migrate(self) -> None:
        current = self._read(self._up_to_date)
        read_only = self._read_only = current is not None and self._read(_read_only)
        if current is None:
            current = self._migrate_now()
        self.chain_shards, top = current
        if read_only:
            self._unwritable = (
                f"the database of schema {self.schema} is read-only (a hot standby or a "
                "replica, or default_transaction_read_only is on): this store reads, "
                "replays and verifies, and writes nothing (a new call fails closed, a "
                "replay is not audited); open a store on a writable database for that"
            )
        if top is not None and top >= self.chain_shards:
            # Written to, its events would go on other chains than their subjects' earlier
            # ones; read, it shows verify what was done (head_mismatch). claim, complete,
            # renew and _write (every other write) refuse; the migrations above are done.
            self._unwritable = (
                f"schema {self.schema} holds a chain head for chain {top}, but has "
                f"{self.chain_shards} chains (0 to {self.chain_shards - 1}): its number of "
                f"chains (safeagent_meta.{q.CHAIN_SHARDS_KEY}, or its schema_version) was "
                "lowered, or a head added, by hand. Nothing is written to it until that is "
                "undone; safeagent audit verify reports it"
            )
        self._drop_indexes()

    def _migrate_now(self) -> tuple[int, int | None]:
        """Create or migrate the schema, under the migration lock; :meth:`_chains_of` it."""
        with self._write() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self.schema}.safeagent_meta"
                " (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            version = self._schema_version(cur) or 0
            for number in range(version + 1, len(q.MIGRATIONS) + 1):
                for statement in q.MIGRATIONS[number - 1]:
                    cur.execute(statement.replace("{s}", self.schema))
            # Migration 2 ran just now: the chains begin, with NEW_CHAIN_SHARDS heads, and
            # the schema is version 4. One whose chains began at version 2 or 3 keeps its
            # 16 and its version, which the previous release still opens.
            began_now = version < 2
            target = q.SCHEMA_VERSION if began_now else max(version, len(q.MIGRATIONS))
            if began_now:
                cur.execute(self._sql["SET_CHAIN_SHARDS"], (str(q.NEW_CHAIN_SHARDS),))
            if version != target:
                cur.execute(
                    f"INSERT INTO {self.schema}.safeagent_meta VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(target),),
                )
            return self._chains_of(cur, target)

    def _stored_chain_shards(self, row: Sequence[Any] | None) -> int:
        """The number of chains ``safeagent_meta`` stores; a schema without a valid one
        cannot be written: its events would land on chains verification does not expect."""
        text = None if row is None else row[0]
        number = stored_number(text)
        if number is not None and 1 <= number <= q.MAX_CHAIN_SHARDS:
            return number
        raise StoreError(
            f"schema {self.schema} (version {q.SCHEMA_VERSION}) stores no valid number of "
            f"audit chains (safeagent_meta.{q.CHAIN_SHARDS_KEY} = {text!r}): it was edited "
            f"by hand; restore it (the number of rows of {self.schema}.audit_chain, "
            f"{q.NEW_CHAIN_SHARDS} unless those were edited too) and run safeagent audit verify"
        )

    def _drop_indexes(self) -> None:
        """Drop the indexes of ``DROPPED_INDEXES`` that still exist, never holding up the
        writers of the fleet for long, nor failing the open.

        ``DROP INDEX`` locks the whole table (ACCESS EXCLUSIVE): while it waits for a long
        reader (a verification, pg_dump), every writer of the table queues behind it. So:

        - the catalog is read first: an open that finds nothing to drop takes no lock on
          the table;
        - it runs after the migration's transaction, and one process at a time drops
          (a try-lock: the others go on at once), so openers never queue one behind
          another on a drop;
        - it waits at most _DROP_LOCK_TIMEOUT for the table, then gives up: the longest a
          writer queues behind it. It holds no other lock anyone waits for, so it is never
          part of a deadlock.

        An index that cannot be dropped now (a long transaction holds its table past the
        lock timeout or the session's statement_timeout, or this role does not own it) is
        left for a later open: it only costs writes time.
        """
        with self._connection() as conn:
            present = conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND indexname = ANY(%s)",
                (self.schema, list(q.DROPPED_INDEXES)),
            ).fetchall()
            if not present:
                return
            try:
                with conn.transaction():
                    row = conn.execute(
                        "SELECT pg_try_advisory_xact_lock(%s)", (_DROP_LOCK,)
                    ).fetchone()
                    if not (row and row[0]):
                        return  # another process is dropping them
                    conn.execute(f"SET LOCAL lock_timeout = '{_DROP_LOCK_TIMEOUT}'")
                    for (name,) in present:
                        conn.execute(f"DROP INDEX IF EXISTS {self.schema}.{name}")
            except (
                psycopg.errors.LockNotAvailable,  # lock_timeout
                psycopg.errors.QueryCanceled,  # the session's own, shorter statement_timeout
                psycopg.errors.InsufficientPrivilege,
            ):
                pass

    def _maybe_flush(self) -> None:
        if self._buffer.due():
            with suppress(StoreError):  # kept for the next write
                self.flush_events()

    # -- executions --------------------------------------------------------------------------

    def get(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        if self._buffer:
            self._maybe_flush()
        params = (self._at(), namespace, request_id)
        try:
            return _found(self._one(self._sql["GET"], params))
        except StoreError as err:
            if not _lost(err):
                raise
        return _found(self._one(self._sql["GET"], params))  # _again, inline (the hot path)

    def claim(self, request: ClaimRequest) -> ClaimResult:
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        try:
            if self._fast_path:
                fragments = _claim_fragments(request, self.chain_shards)
                if fragments is not None:
                    if not self._buffer:
                        return self._claim_fast(request, fragments)
                    done = self._claim_carrying(request, fragments)
                    if done is not None:
                        return done
            return self._claim_general(request)
        except StoreError as err:
            if not _lost(err):
                raise
        # The connection was lost, perhaps after the claim was committed: once more, on a
        # connection the pool has just opened (_failed), which recognises the claim's own
        # row (_claimed_by) and writes the events the first try carried only if it did not
        return self._claim_general(request, self._held())

    def look(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        """:meth:`get`, as a guard's first step for a call (it read first): whether it
        found a record counts in :attr:`claim_first`'s share, as claim_new's answers do.
        Other reads (a caller's receipt look-ups, a waiting call's polls) do not."""
        found = self.get(namespace, request_id)
        self._found += ((found[0] is not None) - self._found) * _LOOK_WEIGHT
        return found

    @property
    def claim_first(self) -> bool:
        """Whether a guard's next call should begin with :meth:`claim_new` (its one
        statement) rather than :meth:`get`; read once per call. Not while
        ``CLAIM_FIRST_FOUND_SHARE`` or more of the recent first steps (claim_new's
        answers and :meth:`look`'s, weighted over about the last 16) found a record, since
        a replay through claim_new costs about twice a read's CPU on both sides
        (BENCHMARKS.md, round 12)."""
        return (
            self._found < CLAIM_FIRST_FOUND_SHARE and self._fast_path and self._unwritable is None
        )

    def claim_new(self, request: ClaimRequest) -> ClaimResult:
        """Claim ``request``'s id only if it has no record; when it has one, change
        nothing and return it, not won (a RELEASED record too: the caller decides, then
        claims it with :meth:`claim`). The guard's first step here (``claim_first``): a
        first execution needs no read before its claim, one round trip fewer, while a
        replay's read is this statement, which on a conflict neither locks nor writes.
        It reads instead, as :meth:`get` does, where its one statement cannot serve: a
        database that turned read-only after the store opened, a wait longer than
        ``CLAIM_NEW_LOCK_TIMEOUT`` (100 ms, or the session's shorter ``lock_timeout``) on a
        transaction still changing the row, a statement cancelled (the session's
        ``statement_timeout``), buffered audit events it cannot carry (see
        :meth:`claim`), an event the statement cannot encode. Buffered events it can carry
        are written with the claim when it wins, and wait for the next write when it does
        not.

        Raises:
            StoreError: as :meth:`claim`; nothing was claimed, or a lost connection's
                second try could not tell.
        """
        if self._unwritable is not None or not self._fast_path:
            return self._read_then_claim(request)
        fragments = _claim_fragments(request, self.chain_shards)
        if fragments is None:
            return self._read_then_claim(request)
        try:
            if not self._buffer:
                return self._claim_new_fast(request, fragments)
            done = self._claim_new_carrying(request, fragments)
        except StoreError as err:
            if not _lost(err):
                if not isinstance(err.__cause__, _READ_INSTEAD):
                    raise
                # Nothing was written (the statement failed whole): a database that turned
                # read-only still answers replays, and a wait on a transaction changing the
                # row (CLAIM_NEW_LOCK_TIMEOUT) gives way to a read, which never waits.
                return self._read_then_claim(request)
            # Perhaps committed: the general claim's second try recognises its own row
            # (_claimed_by). It would also take over a RELEASED record, which is what the
            # caller does next with one (decide: a released record is claimed).
            return self._claim_general(request, self._held())
        return done if done is not None else self._read_then_claim(request)

    def _claim_new_fast(self, request: ClaimRequest, fragments: tuple[Any, ...]) -> ClaimResult:
        """:meth:`claim_new` in one autocommit statement (CLAIM_NEW_FAST): one round trip,
        two when the record it met was committed after the statement began."""
        params = (*self._claim_params(request), *fragments, request.namespace, request.request_id)
        return self._claim_new_answer(request, self._one(self._sql["CLAIM_NEW_FAST"], params))

    def _claim_new_carrying(
        self, request: ClaimRequest, fragments: tuple[Any, ...]
    ) -> ClaimResult | None:
        """:meth:`_claim_new_fast` that also writes the buffered audit events when the
        claim is won (CLAIM_NEW_FAST_CARRYING), as :meth:`_claim_carrying` does; None when
        it cannot carry them (_carrying). A record there: nothing is written, and the
        events go back to the buffer for the next write."""

        def run(shards: str, rows: str, count: int) -> Any:
            params = (*self._claim_params(request), shards, *fragments[1:], fragments[0])
            sql = self._sql["CLAIM_NEW_FAST_CARRYING"]
            return self._one(sql, (*params, rows, count, request.namespace, request.request_id))

        done = self._carrying(fragments[0], run, _claim_witness(request))
        if done is None:
            return None
        events, row = done
        if row is None or not row[0]:
            self._buffer.put_back(events)
        return self._claim_new_answer(request, row)

    def _claim_new_answer(self, request: ClaimRequest, row: Any) -> ClaimResult:
        """What CLAIM_NEW_FAST (or its carrying form) returned, as claim_new's answer."""
        if row is None:  # pragma: no cover - the statement always returns one row
            raise StoreError("the claim returned no row")
        self._found += ((not row[0]) - self._found) * _LOOK_WEIGHT
        if row[0] or row[1] is not None:  # won, or the record the snapshot saw
            return ClaimResult(bool(row[0]), row_to_record(row[1:]), int(row[1 + N_COLUMNS]))
        # The conflicting row was committed after the statement's snapshot: read it with a
        # statement of its own, whose snapshot sees it.
        existing, now = self.get(request.namespace, request.request_id)
        if existing is None:  # pragma: no cover - the conflicting row is committed
            raise StoreError("claim conflicted with a row that then vanished")
        return ClaimResult(False, existing, now)

    def _read_then_claim(self, request: ClaimRequest) -> ClaimResult:
        """:meth:`claim_new` in two steps, where its one statement is not used (buffered
        events it cannot carry, an unencodable event, a read-only schema, a wait too long):
        the record if there is one (read as :meth:`look`, counted in ``claim_first``'s
        share, as the statement's answer would have been), else the claim."""
        existing, now = self.look(request.namespace, request.request_id)
        if existing is not None:
            return ClaimResult(False, existing, now)
        return self.claim(request)

    def _claim_params(self, request: ClaimRequest) -> tuple[Any, ...]:
        """(now, ns, rid, action, fp, payload, exec_id, owner, lease_ms, dkey): the
        parameters the general and the fast claim statements begin with."""
        return (
            self._at(),
            request.namespace,
            request.request_id,
            request.action,
            request.fingerprint,
            request.payload_json,
            request.execution_id,
            request.owner,
            request.lease_ms,
            request.downstream_key,
        )

    def _claim_fast(self, request: ClaimRequest, fragments: tuple[Any, ...]) -> ClaimResult:
        """The claim and its claimed event in one autocommit statement: one round trip (two
        when the claim is lost: the winner's row is read by a statement of its own, whose
        snapshot sees it even when it was committed after the claim began)."""
        row = self._one(self._sql["CLAIM_FAST"], (*self._claim_params(request), *fragments))
        if row is None:
            return self._lost_to(request)
        return ClaimResult(True, row_to_record(row), int(row[N_COLUMNS]))

    def _lost_to(self, request: ClaimRequest) -> ClaimResult:
        """A fast claim that was lost: the winner's row, read by a statement of its own,
        whose snapshot sees it even when it was committed after the claim began."""
        existing, now = _found(
            self._one(self._sql["GET"], (self._at(), request.namespace, request.request_id))
        )
        if existing is None:  # pragma: no cover - the conflicting row is committed
            raise StoreError("claim conflicted with a row that then vanished")
        return ClaimResult(False, existing, now)

    def _carrying(
        self, shard: int, run: Callable[[str, str, int], Any], witness: Witness
    ) -> tuple[list[AuditEvent], Any] | None:
        """Take the buffered audit events and ``run(shards literal, ..., rows JSON, count)``
        the carrying statement of a write whose own event goes to chain ``shard``: its
        events, and the row it returned. None, having taken nothing, when the statement
        cannot carry them: over MAX_CARRIED events, two on one chain or one on ``shard``,
        a batch a lost connection left uncertain (_unwritten), an event it cannot encode.
        Its failure puts the events back, but a lost connection's, which leaves them to
        the caller's second try (_held): it carries them unless it finds its own write,
        committed with them; an interrupt, perhaps after the statement was sent, puts them
        back marked by the write's own event, its ``witness`` (_write)."""
        events = self._buffer.take()
        try:
            # Checked after the take: a write whose reply was lost marks its batch and puts
            # it back (_write), maybe just before the take, and a marked batch is looked up
            # before it is written (_unwritten), which only the general path does.
            carried = (
                _carried_rows(events, self.chain_shards)
                if 0 < len(events) <= q.MAX_CARRIED and not self._uncertain
                else None
            )
        except Exception:  # noqa: BLE001 - an event no write can encode: the general path says so
            carried = None
        except BaseException:
            self._buffer.put_back(events)
            raise
        if carried is None or shard in carried[0]:
            self._buffer.put_back(events)
            return None
        shards, rows = carried
        shards.add(shard)
        self._tx.held = None
        try:
            return events, run(_int_array(shards), _ROWS_JSON(rows), len(rows))
        except StoreError as err:
            if _lost(err):
                self._tx.held = events  # committed with the write or not: its caller tells
            else:
                self._buffer.put_back(events)
            raise
        except BaseException:
            self._mark(events, self._witnessed(witness))
            raise

    def _claim_carrying(
        self, request: ClaimRequest, fragments: tuple[Any, ...]
    ) -> ClaimResult | None:
        """:meth:`_claim_fast` that also writes the buffered audit events (they go with the
        process's next write, docs/design.md section 5) in its one statement
        (CLAIM_FAST_CARRYING), where the general path takes two round trips; None when it
        cannot (_carrying). A lost claim writes none of them: they go back to the buffer."""

        def run(shards: str, rows: str, count: int) -> Any:
            sql = self._sql["CLAIM_FAST_CARRYING"]
            params = (*self._claim_params(request), shards, *fragments[1:], fragments[0])
            return self._one(sql, (*params, rows, count))

        done = self._carrying(fragments[0], run, _claim_witness(request))
        if done is None:
            return None
        events, row = done
        if row is None:  # lost: nothing was written; the events wait for the next write
            self._buffer.put_back(events)
            return self._lost_to(request)
        return ClaimResult(True, row_to_record(row), int(row[N_COLUMNS]))

    def _claim_general(
        self, request: ClaimRequest, carried: list[AuditEvent] | None = None
    ) -> ClaimResult:
        """``carried``: this is the second try of a claim whose connection was lost, with
        the buffered events its first try carried (claim). A claim carries buffered events
        only if it is won: its claimed event then tells a later write whether they were
        committed (_write)."""
        # BEGIN + the claim, its chain heads locked | the events, the heads moved + COMMIT:
        # two round trips
        witness = _claim_witness(request)
        first = carried is None
        with self._write(pipelined=True, hold=first, carry=carried, witness=witness) as cur:
            shards, literal = self._lock_for(request.namespace, request.request_id)
            cur.execute(self._sql["CLAIM"], (*self._claim_params(request), literal))
            rows = cur.fetchall()
            if not rows:
                # Lost: read the winner's row in a statement of its own, whose snapshot sees
                # the conflicting row even when it was committed after this statement began.
                existing, now = self._record_at(cur, request.namespace, request.request_id)
                if existing is None:  # pragma: no cover - the conflicting row is committed
                    raise StoreError("claim conflicted with a row that then vanished")
                if not first and existing.execution_id == request.execution_id:
                    # The first try committed (no other claim writes this execution id),
                    # and with it the events it carried: they are not written again.
                    self._tx.buffered.clear()
                    return ClaimResult(_claimed_by(existing, request, now), existing, now)
                self._unclaimed(cur, None if first else witness)
                return ClaimResult(False, existing, now)
            self._locked(shards, rows)
            record, now = row_to_record(rows[0]), int(rows[0][N_COLUMNS])
            self._emit([claimed_event(request, record, now)])
        return ClaimResult(True, record, now)

    def complete(self, completion: Completion) -> WriteResult:
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        terminal = completion.status in (Status.SUCCEEDED, Status.FAILED)
        settle = completion.settle_case if terminal else None
        action, execution_id = completion.action, completion.execution_id
        known = None if action is None or execution_id is None else (action, execution_id)
        try:
            if known is not None and settle is None and self._fast_path:
                fragments = _completion_fragments(completion, *known, self.chain_shards)
                if fragments is not None:
                    if not self._buffer:
                        done = self._complete_fast(completion, terminal, known, fragments)
                    else:
                        done = self._complete_carrying(completion, terminal, known, fragments)
                    if done is not None:
                        return done
            return self._complete_general(completion, terminal, settle)
        except StoreError as err:
            if not _lost(err):
                raise
        # The connection was lost, perhaps after the completion was committed: once more, on
        # a connection the pool has just opened (_failed). Fencing refuses a second write;
        # the refusal then finds this very completion stored (_carries) and reports it.
        return self._complete_general(completion, terminal, settle, self._held())

    def _completion_params(self, completion: Completion, terminal: bool) -> tuple[Any, ...]:
        """(now, status, result, etype, emsg, terminal, ns, rid, token): the parameters the
        general and the fast completion statements begin with."""
        error = completion.error
        return (
            self._at(),
            completion.status.value,
            completion.result_json,
            None if error is None else error.type,
            None if error is None else error.message,
            terminal,
            completion.namespace,
            completion.request_id,
            completion.fencing_token,
        )

    def _complete_fast(
        self,
        completion: Completion,
        terminal: bool,
        known: tuple[str, str],
        fragments: tuple[Any, ...],
    ) -> WriteResult | None:
        """The completion of the attempt it names, and its one event, in one autocommit
        statement: one round trip. None (nothing changed) unless it was accepted in time:
        the general path then writes what it must (a rejection, a late completion)."""
        row = self._one(
            self._complete_fast_sql,
            (*self._completion_params(completion, terminal), *known, *fragments),
        )
        if row is None:
            return None
        return WriteResult(accepted=True, record=row_to_record(row))

    def _complete_carrying(
        self,
        completion: Completion,
        terminal: bool,
        known: tuple[str, str],
        fragments: tuple[Any, ...],
    ) -> WriteResult | None:
        """:meth:`_complete_fast` that also writes the buffered audit events in its one
        statement (COMPLETE_FAST_CARRYING); None when it cannot (_carrying), or when the
        completion was not accepted in time: nothing was written, the events go back to
        the buffer, and the general path follows, carrying them."""

        def run(shards: str, rows: str, count: int) -> Any:
            params = (*self._completion_params(completion, terminal), *known, shards)
            return self._one(
                self._complete_carrying_sql,
                (*params, *fragments[1:], fragments[0], rows, count),
            )

        done = self._carrying(fragments[0], run, _completion_witness(completion))
        if done is None:
            return None
        events, row = done
        if row is None:
            self._buffer.put_back(events)
            return None
        return WriteResult(accepted=True, record=row_to_record(row))

    def _complete_general(
        self,
        completion: Completion,
        terminal: bool,
        settle: str | None,
        carried: list[AuditEvent] | None = None,
    ) -> WriteResult:
        """``carried``: this is the second try of a completion whose connection was lost,
        with the buffered events its first try carried (complete). A completion carries
        buffered events only if it is accepted: its outcome event then tells a later write
        whether they were committed (_write)."""
        witness = _completion_witness(completion)
        first = carried is None
        with self._write(pipelined=True, hold=first, carry=carried, witness=witness) as cur:
            # A completion that settles a case locks the case row after its own: its chain
            # heads are then taken at the end (after the case), not by this statement.
            shards, literal = (
                (set(), "{}")
                if settle is not None
                else self._lock_for(completion.namespace, completion.request_id)
            )
            cur.execute(
                self._complete_sql, (*self._completion_params(completion, terminal), literal)
            )
            rows = cur.fetchall()
            if rows[0][0] is None:  # refused by the fencing check: report what is there
                return self._refused(cur, completion, first, witness)
            self._locked(shards, rows)
            after, now = row_to_record(rows[0]), int(rows[0][N_COLUMNS])
            events = completion_events(completion, after, after, now)
            if settle is not None:
                events += self._settle(cur, after, settle, completion.actor, now)
            self._emit(events)
        late = after.lease_expires_at_ms is not None and now >= after.lease_expires_at_ms
        return WriteResult(accepted=True, record=after, late=late)

    def _refused(
        self, cur: psycopg.Cursor[Any], completion: Completion, first: bool, witness: Witness
    ) -> WriteResult:
        """A completion the fencing check refused: the record there, and a rejection
        audited, with none of the buffered events (_unclaimed). A second try (not
        ``first``) first looks for what its lost first try committed: the completion
        itself (accepted: nothing written again), or its rejection (audited once)."""
        ns, rid = completion.namespace, completion.request_id
        before, now = self._record_at(cur, ns, rid)
        if not first:
            if before is not None and _carries(before, completion):
                # The first try committed, and with it its events and those it carried:
                # accepted, nothing written again, no rejection audited.
                self._tx.buffered.clear()
                expiry = before.lease_expires_at_ms
                late = expiry is not None and before.updated_at_ms >= expiry
                return WriteResult(accepted=True, record=before, late=late)
            if (before is not None and _released_then_claimed(before, completion)) or (
                self._witnessed(witness)(cur)
            ):
                # The first try committed (its own event is in the trail), and the record
                # moved on since: a release claimed again, an in-doubt outcome taken over by
                # a reconcile round. Accepted, as it was, nothing written again; the record
                # is the one there now.
                self._tx.buffered.clear()
                return WriteResult(accepted=True, record=before)
        self._unclaimed(cur, None)
        rejected = (ns, rid, "completion_rejected", None, completion.fencing_token)
        if not first and self._witnessed(rejected)(cur):
            return WriteResult(accepted=False, record=before)  # the first try's, committed
        if before is None:
            now = 0  # no record: the rejection is stamped 0, as this store always has
        self._emit(completion_events(completion, before, None, now))
        return WriteResult(accepted=False, record=before)

    def resolve(self, resolution: Resolution) -> WriteResult:
        # Not tried again on a lost connection (StoreError): a resolution writes nothing
        # unique to itself (the token goes up by one, whoever resolved), so a second try
        # could not tell a first that committed from an identical resolution by another
        # operator, and a re-run's RELEASED record may be claimed again meanwhile.
        terminal = resolution.status in (Status.SUCCEEDED, Status.FAILED)
        error = resolution.error
        with self._write() as cur:
            if resolution.rerun:
                cur.execute(
                    self._sql["RERUN"],
                    self._p(
                        ns=resolution.namespace,
                        rid=resolution.request_id,
                        token=resolution.expected_token,
                    ),
                )
            else:
                cur.execute(
                    self._sql["RESOLVE"],
                    self._p(
                        status=resolution.status.value,
                        result=resolution.result_json,
                        etype=None if error is None else error.type,
                        emsg=None if error is None else error.message,
                        terminal=terminal,
                        ns=resolution.namespace,
                        rid=resolution.request_id,
                        token=resolution.expected_token,
                    ),
                )
            row = cur.fetchone()
            if row is None:
                return WriteResult(accepted=False, record=self._current(cur, resolution))
            record, now = row_to_record(row), int(row[-1])
            events = [resolved_event(resolution, record, now)]
            if terminal and resolution.settle_case is not None:
                events += self._settle(cur, record, resolution.settle_case, resolution.actor, now)
            self._emit(events)
        return WriteResult(accepted=True, record=record)

    def _current(self, cur: psycopg.Cursor[Any], resolution: Resolution) -> Record | None:
        return self._record_at(cur, resolution.namespace, resolution.request_id)[0]

    def _settle(
        self, cur: psycopg.Cursor[Any], record: Record, case_id: str, actor: str, now: int
    ) -> list[AuditEvent]:
        cur.execute(self._sql["SETTLE_CASE"], {"at": now, "ns": record.namespace, "cid": case_id})
        row = cur.fetchone()
        if row is None:
            return []
        return [settled_event(row_to_case(row), record.execution_id, actor, now)]

    def renew(self, namespace: str, request_id: str, fencing_token: int, lease_ms: int) -> bool:
        # Not tried again on a lost connection (StoreError): the heartbeat tries a failed
        # renewal again itself within 50 ms, on a connection opened after the drain.
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        params = (self._at(), lease_ms, namespace, request_id, fencing_token)
        if self._buffer:  # buffered events go with the next write, so this one is a transaction
            with self._write() as cur:
                cur.execute(self._sql["RENEW"], params)
                return cur.rowcount == 1
        # otherwise the renewal is a single statement: its own transaction, one round trip
        with self._connection() as conn:
            return conn.execute(self._sql["RENEW"], params).rowcount == 1

    def renew_many(self, leases: Sequence[Lease]) -> list[bool]:
        # As renew: not tried again on a lost connection; the heartbeat tries again soon.
        if self._unwritable is not None:
            raise StoreError(self._unwritable)
        params = (
            self._at(),
            [lease[0] for lease in leases],
            [lease[1] for lease in leases],
            [lease[2] for lease in leases],
            [lease[3] for lease in leases],
        )
        if self._buffer:  # buffered events go with the next write, so this one is a transaction
            with self._write() as cur:
                cur.execute(self._sql["RENEW_MANY"], params)
                renewed = set(cur.fetchall())
        else:  # one statement: its own transaction, one round trip
            with self._connection() as conn:
                renewed = set(conn.execute(self._sql["RENEW_MANY"], params).fetchall())
        return [(ns, rid, token) in renewed for ns, rid, token, _ in leases]

    def take_over(
        self, namespace: str, request_id: str, expected_token: int, owner: str, lease_ms: int
    ) -> WriteResult:
        # Not tried again on a lost connection (StoreError): a take-over keeps the execution
        # id and writes nothing unique to itself, so a second try could not tell its own
        # committed take-over from that of another caller with the same owner name (threads
        # of one guard), and both would then run the reconcile hook, or fn.
        with self._write() as cur:
            cur.execute(
                self._sql["TAKE_OVER"],
                self._p(
                    ns=namespace,
                    rid=request_id,
                    token=expected_token,
                    owner=owner,
                    lease_ms=lease_ms,
                ),
            )
            row = cur.fetchone()
            if row is None:
                return WriteResult(
                    accepted=False, record=self._record_at(cur, namespace, request_id)[0]
                )
            record, now = row_to_record(row), int(row[-1])
            self._emit([take_over_event(record, owner, now)])
        return WriteResult(accepted=True, record=record)

    # -- audit -------------------------------------------------------------------------------

    def _now(self) -> int:
        if self._clock is not None:
            return self._clock()

        def read(cur: psycopg.Cursor[Any]) -> int:
            cur.execute(self._sql["NOW_ONLY"], self._p())
            row = cur.fetchone()
            return int(row[0]) if row else 0

        return self._read(read)

    def record_event(self, event: AuditEvent, *, buffered: bool = False) -> None:
        """:meth:`ReceiptStore.record_event`. Not tried again on a lost connection, nor
        flush_events, add_anchor and purge: an append a lost try may have committed would
        be written twice. When the connection is lost once the event's statement was built
        (sent or about to be: the client cannot tell), the event is kept, as a buffered
        one is, marked by its chain hash: the process's next write (or :meth:`close`)
        looks it up and writes it only if it is missing, and the call returns. Until then
        it lives in this process only, like the buffered events (docs/design.md
        section 5). A store opened on a read-only database keeps no buffered event (a
        replay's): the database can never hold it.

        Raises:
            StoreError: the event was not written and is not kept: the server refused it
                (rolled back), or the connection was lost before its statement was built.
        """
        if buffered:
            if self._read_only:
                return  # a read-only database can never hold it: not kept (not audited)
            self._buffer.add(event if event.at_ms else stamped(event, self._now()))
            self._maybe_flush()
            return
        event = stamped(event, event.at_ms or self._now())
        self._tx.rows = None
        try:
            with self._write(pipelined=True):
                self._emit([event])
        except StoreError as err:
            rows = self._tx.rows
            if not _lost(err) or rows is None:
                raise  # refused (rolled back), or never sent: not written
            # Sent, with a COMMIT whose reply was lost: kept, marked by its chain hash, for
            # the next write, which writes it only if it is not in the trail (_unwritten).
            # Recorded either way, once: raising would have the caller keep it a second time.
            last = rows[-1]
            self._mark([event], self._by_hash((last[2], last[3], last[-1])))

    def _flush_for_read(self) -> None:
        """Write the buffered events before a read of the trail, once more if the
        connection was lost (the pool was drained): the events that write carried were
        marked, and the second write checks them by chain hash (_unwritten), so each is
        written once either way. A store that must not write reads without them."""
        if self._unwritable is not None:
            return
        try:
            self.flush_events()
        except StoreError as err:
            if not _lost(err):
                raise
            self.flush_events()

    def flush_events(self) -> None:
        if self._buffer and not self._closed:
            # _write writes the buffer inside its transaction: BEGIN + the heads locked |
            # the events, the heads moved + COMMIT
            with self._write(pipelined=True):
                pass

    def _rows_as_stored(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of the read-only ``sql`` as stored, unparsed: for reading rows one by
        one when a parser refuses one of them (``safeagent.stores._as_stored``). Tables
        are written ``{t}executions`` (this store's schema is put in); parameters ``?``.

        Raises:
            StoreError: the read failed.
        """
        text = sql.format(t=self.schema + ".").replace("?", "%s")

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(text, list(args))
            return [tuple(row) for row in cur.fetchall()]

        return self._read(read)

    def events(
        self,
        *,
        namespace: str | None = None,
        subject: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        self._flush_for_read()
        sql = self._sql["EVENTS"]
        params: dict[str, Any] = {"after": after_id}
        if namespace is not None:
            sql += " AND namespace = %(ns)s"
            params["ns"] = namespace
        if subject is not None:
            sql += " AND subject = %(subject)s"
            params["subject"] = subject
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT %(limit)s"
            params["limit"] = limit

        def read(cur: psycopg.Cursor[Any]) -> list[AuditEvent]:
            cur.execute(sql, params)
            return [row_to_event(r) for r in cur.fetchall()]

        return self._read(read)

    def records(
        self,
        *,
        namespace: str | None = None,
        statuses: Sequence[Status] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Record], int]:
        sql = self._sql["RECORDS"]
        params: dict[str, Any] = {}
        if namespace is not None:
            sql += " AND namespace = %(ns)s"
            params["ns"] = namespace
        if statuses is not None:
            sql += " AND status = ANY(%(statuses)s)"
            params["statuses"] = [s.value for s in statuses]
        sql += " ORDER BY created_at_ms, namespace, request_id"
        if limit is not None:
            sql += " LIMIT %(limit)s"
            params["limit"] = limit

        def read(cur: psycopg.Cursor[Any]) -> list[Record]:
            cur.execute(sql, params)
            return [row_to_record(r) for r in cur.fetchall()]

        records = self._read(read)
        return records, self._now()

    # -- cases -------------------------------------------------------------------------------

    def get_case(self, namespace: str, case_id: str) -> tuple[CaseRow | None, list[Signal]]:
        """The case and its live signals, read in one statement: one snapshot (two
        statements, even in one transaction, each see their own at READ COMMITTED: a
        signal committed between them came with the row before it)."""

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(self._sql["GET_CASE_LIVE"], {"ns": namespace, "cid": case_id})
            return cur.fetchall()

        found = _with_live(self._read(read))
        return (None, []) if not found else found[0]

    def _open_case(
        self,
        cur: psycopg.Cursor[Any],
        namespace: str,
        case_id: str,
        policy: tuple[float, int],
        events: list[AuditEvent],
    ) -> CaseRow:
        cur.execute(
            self._sql["OPEN_CASE"],
            self._p(ns=namespace, cid=case_id, threshold=policy[0], quorum=policy[1]),
        )
        row = cur.fetchone()
        if row is not None:
            case = row_to_case(row)
            events.append(
                state_change_event(case, None, CaseState.OPEN, None, "safeagent", {}, int(row[-1]))
            )
        cur.execute(self._sql["LOCK_CASE"], {"ns": namespace, "cid": case_id})
        locked = cur.fetchone()
        if locked is None:  # pragma: no cover - inserted or present just above
            raise StoreError(f"case {case_id!r} vanished while opening it")
        return row_to_case(locked)

    def open_case(self, namespace: str, case_id: str, threshold: float, quorum: int) -> CaseRow:
        def once() -> CaseRow:
            events: list[AuditEvent] = []
            with self._write() as cur:
                case = self._open_case(cur, namespace, case_id, (threshold, quorum), events)
                self._emit(events)
            return case

        # Once more if the connection was lost: the case is inserted only if absent, and
        # audited only by the statement that inserted it, so a second try adds nothing to a
        # first that committed; either way it returns the case as stored.
        return self._again(once)

    def update_case(
        self,
        namespace: str,
        case_id: str,
        mutate: CaseMutation,
        *,
        signal: Signal | None,
        actor: str,
        detail: dict[str, Any],
        open_with: tuple[float, int] | None = None,
    ) -> CaseUpdate:
        # Not tried again on a lost connection (StoreError): a second try after a first that
        # committed would store the signal again (replacing the first) and ask ``mutate``
        # about a case that has already changed.
        events: list[AuditEvent] = []
        with self._write() as cur:
            if open_with is not None:
                case = self._open_case(cur, namespace, case_id, open_with, events)
            else:
                cur.execute(self._sql["LOCK_CASE"], {"ns": namespace, "cid": case_id})
                row = cur.fetchone()
                if row is None:
                    raise InvalidTransitionError(
                        f"no case {case_id!r} in namespace {namespace!r}", case_id=case_id
                    )
                case = row_to_case(row)
            cur.execute(self._sql["LIVE_SIGNALS"], {"ns": namespace, "cid": case_id})
            live = [row_to_signal(r) for r in cur.fetchall()]
            change = mutate(case, live)
            now = self._clock() if self._clock is not None else self._db_now(cur)
            if signal is not None:
                signal = Signal(
                    signal.source, signal.outcome, signal.confidence, signal.metadata, now
                )
                if not change.late:
                    cur.execute(
                        self._sql["REPLACE_SIGNAL"],
                        {"ns": namespace, "cid": case_id, "source": signal.source},
                    )
                    live = [s for s in live if s.source != signal.source] + [signal]
                cur.execute(
                    self._sql["INSERT_SIGNAL"],
                    {
                        "ns": namespace,
                        "cid": case_id,
                        "source": signal.source,
                        "outcome": signal.outcome,
                        "confidence": signal.confidence,
                        "metadata": dumps(dict(signal.metadata)),
                        "at": now,
                        "status": "late" if change.late else "live",
                    },
                )
            after = case
            if change.path or (signal is not None and not change.late):
                state = change.path[-1] if change.path else case.state
                cur.execute(
                    self._sql["UPDATE_CASE"],
                    {
                        "state": state.value,
                        "provisional": change.stored_provisional(state),
                        "outcome": change.outcome,
                        "at": now,
                        "by": detail.get("by"),
                        "ns": namespace,
                        "cid": case_id,
                    },
                )
                updated = cur.fetchone()
                if updated is not None:
                    after = row_to_case(updated)
            events += case_events(case, change, signal, actor, detail, now)
            self._emit(events)
        return CaseUpdate(case=after, live=live, change=change)

    def _db_now(self, cur: psycopg.Cursor[Any]) -> int:
        cur.execute(self._sql["NOW_ONLY"], {"now": None})
        row = cur.fetchone()
        return int(row[0]) if row else 0

    def cases(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[CaseRow]:
        sql = self._sql["CASES"]
        params: dict[str, Any] = {}
        if namespace is not None:
            sql += " AND namespace = %(ns)s"
            params["ns"] = namespace
        if states is not None:
            sql += " AND state = ANY(%(states)s)"
            params["states"] = [s.value for s in states]
        sql += " ORDER BY created_at_ms, namespace, case_id"

        def read(cur: psycopg.Cursor[Any]) -> list[CaseRow]:
            cur.execute(sql, params)
            return [row_to_case(r) for r in cur.fetchall()]

        return self._read(read)

    def cases_with_live(
        self, *, namespace: str | None = None, states: Sequence[CaseState] | None = None
    ) -> list[tuple[CaseRow, list[Signal]]]:
        """:meth:`cases`, each with its live signals (oldest first), read in one statement:
        one snapshot, so no case's row is of one moment and its signals of another."""
        sql = self._sql["CASES_LIVE"]
        params: dict[str, Any] = {}
        if namespace is not None:
            sql += " AND c.namespace = %(ns)s"
            params["ns"] = namespace
        if states is not None:
            sql += " AND c.state = ANY(%(states)s)"
            params["states"] = [s.value for s in states]
        sql += " ORDER BY c.created_at_ms, c.namespace, c.case_id, s.id"

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(sql, params)
            return cur.fetchall()

        return _with_live(self._read(read))

    def case_signals(self, namespace: str, case_id: str) -> list[tuple[Signal, str]]:
        def read(cur: psycopg.Cursor[Any]) -> list[tuple[Signal, str]]:
            cur.execute(self._sql["CASE_SIGNALS"], {"ns": namespace, "cid": case_id})
            return [(row_to_signal(r), r[5]) for r in cur.fetchall()]

        return self._read(read)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Write buffered audit events and close the pool."""
        if self._closed:
            return
        try:
            self.flush_events()
        finally:
            with self._lock:
                self._closed = True
                self._buffer.detach()
                pool, self._pool = self._pool, None
            if pool is not None and self._pid == os.getpid():
                pool.close()

    # -- tamper evidence and retention -------------------------------------------------

    def audit_chain(self) -> tuple[list[tuple[Any, ...]], Heads]:
        """Every event row (by shard and seq; rows outside the chains, with a NULL shard,
        come too, so verification can report them) and the chain heads as stored. No
        index serves the order: the server sorts the events, which an offline
        verification can afford."""
        self._flush_for_read()

        def read() -> tuple[list[tuple[Any, ...]], Heads]:
            with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur.execute(self._sql["CHAIN"])
                rows = [tuple(r) for r in cur.fetchall()]
                cur.execute(self._sql["HEADS"])
                heads = {r[0]: (int(r[1]), r[2]) for r in cur.fetchall()}
            return rows, heads

        return self._again(read)

    def subject_snapshot(
        self, namespace: str, subject: str
    ) -> tuple[Record | None, CaseRow | None, list[tuple[Signal, str]], list[tuple[Any, ...]]]:
        """One subject as one snapshot, for verification to read again what looked wrong:
        the execution record with request id ``subject``, the case with case id ``subject``
        and its signals (as :meth:`case_signals`), and the subject's event rows by id
        (``EVENT_COLUMNS`` order, unparsed), all in one REPEATABLE READ transaction."""
        self._flush_for_read()
        named = {"ns": namespace, "cid": subject, "subject": subject, "after": 0}

        def read() -> tuple[Any, ...]:
            with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                record = cur.execute(self._sql["GET"], (self._at(), namespace, subject)).fetchone()
                case = cur.execute(self._sql["GET_CASE"], named).fetchone()
                signals = cur.execute(self._sql["CASE_SIGNALS"], named).fetchall()
                events = cur.execute(
                    self._sql["EVENTS"]
                    + " AND namespace = %(ns)s AND subject = %(subject)s ORDER BY id",
                    named,
                ).fetchall()
            return record, case, signals, events

        record, case, signals, events = self._again(read)
        return (
            _found(record)[0],
            None if case is None else row_to_case(case),
            [(row_to_signal(r), r[5]) for r in signals],
            [tuple(r) for r in events],
        )

    def chain_heads(self) -> Heads:
        """The current head of every chain: shard -> (seq, hash)."""
        self._flush_for_read()

        def read(cur: psycopg.Cursor[Any]) -> Heads:
            cur.execute(self._sql["HEADS"])
            return {r[0]: (int(r[1]), r[2]) for r in cur.fetchall()}

        return self._read(read)

    def add_anchor(self, heads_json: str, mac: str) -> tuple[int, int]:
        """Store an anchor of the chain heads; returns ``(id, at_ms)``."""
        with self._write() as cur:
            cur.execute(self._sql["ADD_ANCHOR"], self._p(heads=heads_json, mac=mac))
            row = cur.fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

    def anchors(self, *, last: int | None = None) -> list[tuple[int, int, str, str]]:
        """Every anchor ``(id, at_ms, heads_json, mac)``, oldest first; with ``last``,
        only the newest ``last`` of them."""

        def read(cur: psycopg.Cursor[Any]) -> list[tuple[int, int, str, str]]:
            if last is None:
                cur.execute(self._sql["ANCHORS"])
            else:
                cur.execute(self._sql["ANCHORS_LAST"], {"last": last})
            return [(int(r[0]), int(r[1]), r[2], r[3]) for r in cur.fetchall()]

        return self._read(read)

    def purge(self, cutoff_ms: int, actor: str) -> dict[str, int]:
        """Retention; see :meth:`SQLiteStore.purge` (an expired PENDING lease counts as
        in doubt, at the store's clock)."""
        with self._write() as cur:
            cur.execute(self._sql["PURGE_RELEASED"], self._p(cutoff=cutoff_ms))
            released = cur.rowcount
            cur.execute(self._sql["PURGE_FINISHED"], self._p(cutoff=cutoff_ms))
            tombstoned = cur.rowcount
            now = self._clock() if self._clock is not None else self._db_now(cur)
            cur.execute(self._sql["KEPT"], {"now": now})
            kept = {r[0]: int(r[1]) for r in cur.fetchall()}
            counts = {
                "tombstoned": tombstoned,
                "released": released,
                "kept_pending": kept.get("PENDING", 0),
                "kept_in_doubt": kept.get("IN_DOUBT", 0),
            }
            self._emit([purged_event(now, cutoff_ms, actor, counts)])
        return counts

    def drop_schema(self) -> None:
        """Drop this store's schema and everything in it (for tests and tear-downs).
        Buffered audit events are discarded with it."""
        self._buffer.take()
        with self._connection() as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_live_stores: weakref.WeakSet[PostgresStore] = weakref.WeakSet()


def _forget_all_in_child() -> None:
    for store in list(_live_stores):
        with suppress(Exception):  # one store cannot keep the others unhandled
            store._forget_in_child()


# Run only at a fork, never on a call (tests/test_fork_safety.py).
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)
