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

import os
import threading
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from safeagent._audit import AuditEvent
from safeagent.errors import ConfigurationError
from safeagent.stores import _pg_sql as q
from safeagent.stores._base import Clock, EventBuffer, check_durability
from safeagent.stores._rows import CHAIN_SHARDS

try:
    import psycopg
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "the PostgreSQL store needs psycopg 3 and psycopg_pool: pip install -e '.[postgres]' "
        "in a SafeAgent clone"
    ) from exc

# The store's parts, after psycopg's check above (each imports psycopg). PostgresStore
# (below: construction, fork safety, close) is made of them; each module's docstring
# says what it holds:
#   _pg_conn      the pool, connections, errors and lost connections, the clock
#   _pg_events    the write transaction, buffered audit events and the chain heads
#   _pg_schema    the schema name; creating, migrating and checking it at open
#   _pg_fast      the fast path's text fragments (pure functions)
#   _pg_claim     get, look, claim_first, claim_new, claim
#   _pg_complete  complete, resolve, renew, renew_many, take_over
#   _pg_cases     open_case, update_case and the case reads
#   _pg_trail     records, events, verification's reads, anchors, purge
#   _pg_sql       every statement's text and the numbered migrations
from safeagent.stores._pg_cases import _PgCases
from safeagent.stores._pg_claim import CLAIM_FIRST_FOUND_SHARE as CLAIM_FIRST_FOUND_SHARE  # noqa: PLC0414 - re-exported
from safeagent.stores._pg_claim import _PgClaims
from safeagent.stores._pg_complete import _PgCompletions
from safeagent.stores._pg_schema import _check_schema, _PgSchema
from safeagent.stores._pg_trail import _PgTrail

DATABASE_URL_ENV = "SAFEAGENT_DATABASE_URL"
DEFAULT_SCHEMA = "safeagent"


class PostgresStore(_PgClaims, _PgCompletions, _PgCases, _PgTrail, _PgSchema):
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
