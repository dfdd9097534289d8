"""The PostgreSQL store's schema, numbered migrations and statements.

Every statement that needs the time takes ``now`` (``%(now)s``, or the first ``%s`` of the
positional hot-path statements): ``NULL`` means "the database's clock" (leases are judged
on it, so hosts with skewed clocks agree), an integer is a test's fake clock. Table names
are qualified with the store's schema when the store is built.

The hot paths (``GET``, ``CLAIM``, ``COMPLETE``, ``CLAIM_FAST``, ``COMPLETE_FAST``,
``RENEW``, ``EVENT``, ``EVENT_ROWS``) take positional parameters, so a call passes a tuple
instead of building a dict, and each is shaped to cost one round trip: a read returns the
database clock with the row; ``CLAIM_FAST`` and ``COMPLETE_FAST`` are a whole claim or
completion with its audit event, alone in their transaction; on the general path a claim or
a completion locks its audit chain heads in the same statement, and a transaction's events
and chain heads are written by one statement.
"""

from __future__ import annotations

from safeagent.stores._rows import (
    CASE_COLUMNS,
    CHAIN_COLUMNS,
    COLUMNS,
    EVENT_COLUMNS,
    GENESIS,
)

SCHEMA_VERSION = 4
"""The newest schema version this release opens. Versions 1-3 are MIGRATIONS' results;
version 4 is a schema whose audit chains began under this release (migration 2 ran now):
NEW_CHAIN_SHARDS chains, their number stored in ``safeagent_meta.chain_shards``. Older
SafeAgent, which chains by 16, refuses it. A schema whose chains began at version 2 or 3
keeps its 16 chains and its version (3), so the previous release still opens it during a
rolling upgrade: a subject never changes chain."""

NEW_CHAIN_SHARDS = 256
"""The number of audit chains of a schema whose chains this release begins (made new, or
migrated from version 1, which had none): with 16, concurrent writers wait on each
other's chain head (held through the commit's WAL flush) about as often as two of them
draw the same of 16; with 256, a sixteenth as often (BENCHMARKS.md, round 11)."""
CHAIN_SHARDS_KEY = "chain_shards"
MAX_CHAIN_SHARDS = 4096
# (number of chains as text) -> stored once, when the chains begin (schema version 4)
SET_CHAIN_SHARDS = (
    "INSERT INTO {s}.safeagent_meta (key, value) VALUES ('"
    + CHAIN_SHARDS_KEY
    + "', %s) ON CONFLICT (key) DO NOTHING"
)
GET_CHAIN_SHARDS = "SELECT value FROM {s}.safeagent_meta WHERE key = '" + CHAIN_SHARDS_KEY + "'"
# -> the highest shard with a head row (NULL when there is none)
TOP_HEAD = "SELECT max(shard) FROM {s}.audit_chain"

NOW = "COALESCE(%(now)s::bigint, (extract(epoch from clock_timestamp()) * 1000)::bigint)"
NOW_AT = NOW.replace("%(now)s", "%s")  # the same, for the positional statements
E_COLUMNS = ", ".join("e." + c.strip() for c in COLUMNS.split(","))

# MIGRATIONS[n - 1] takes the schema from version n - 1 to n. "{s}" is the schema. Migration
# 2 begins the chains with NEW_CHAIN_SHARDS heads (the release that wrote it made 16), so
# the opener that runs it makes the schema version 4 (SCHEMA_VERSION).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE {s}.executions (
            namespace TEXT NOT NULL,
            request_id TEXT NOT NULL,
            action TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            status TEXT NOT NULL,
            payload TEXT NOT NULL,
            result TEXT,
            error_type TEXT,
            error_message TEXT,
            execution_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            fencing_token BIGINT NOT NULL,
            lease_owner TEXT,
            lease_expires_at_ms BIGINT,
            downstream_key TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            claimed_at_ms BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL,
            completed_at_ms BIGINT,
            PRIMARY KEY (namespace, request_id)
        )
        """,
        """
        CREATE TABLE {s}.audit_events (
            id BIGSERIAL PRIMARY KEY,
            at_ms BIGINT NOT NULL,
            kind TEXT NOT NULL,
            namespace TEXT NOT NULL,
            subject TEXT NOT NULL,
            action TEXT,
            actor TEXT,
            execution_id TEXT,
            fencing_token BIGINT,
            detail TEXT NOT NULL
        )
        """,
        "CREATE INDEX audit_events_subject ON {s}.audit_events (namespace, subject, id)",
        """
        CREATE TABLE {s}.cases (
            namespace TEXT NOT NULL,
            case_id TEXT NOT NULL,
            state TEXT NOT NULL,
            provisional_outcome TEXT,
            outcome TEXT,
            threshold DOUBLE PRECISION NOT NULL,
            quorum INTEGER NOT NULL,
            version BIGINT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL,
            resolved_by TEXT,
            PRIMARY KEY (namespace, case_id)
        )
        """,
        """
        CREATE TABLE {s}.signals (
            id BIGSERIAL PRIMARY KEY,
            namespace TEXT NOT NULL,
            case_id TEXT NOT NULL,
            source TEXT NOT NULL,
            outcome TEXT NOT NULL,
            confidence DOUBLE PRECISION NOT NULL,
            metadata TEXT NOT NULL,
            at_ms BIGINT NOT NULL,
            status TEXT NOT NULL
        )
        """,
        "CREATE INDEX signals_case ON {s}.signals (namespace, case_id, status)",
    ),
    (
        "ALTER TABLE {s}.executions ADD COLUMN purged_at_ms BIGINT",
        "ALTER TABLE {s}.audit_events ADD COLUMN shard INTEGER",
        "ALTER TABLE {s}.audit_events ADD COLUMN seq BIGINT",
        "ALTER TABLE {s}.audit_events ADD COLUMN prev_hash TEXT",
        "ALTER TABLE {s}.audit_events ADD COLUMN hash TEXT",
        "CREATE INDEX audit_events_chain ON {s}.audit_events (shard, seq)",
        "CREATE TABLE {s}.audit_chain (shard INTEGER PRIMARY KEY, seq BIGINT NOT NULL,"
        " head TEXT NOT NULL)",
        "INSERT INTO {s}.audit_chain (shard, seq, head) SELECT g, 0, '"
        + GENESIS
        + f"' FROM generate_series(0, {NEW_CHAIN_SHARDS - 1}) AS g",
        "CREATE TABLE {s}.audit_anchors (id BIGSERIAL PRIMARY KEY, at_ms BIGINT NOT NULL,"
        " heads TEXT NOT NULL, mac TEXT NOT NULL)",
    ),
    (
        # The facts of the attempt that ran fn (owner, end, attempt number), which a reconcile
        # take-over records once and keeps (Record.attempt_facts): the take-over overwrites
        # lease_owner and lease_expires_at_ms with its own. NULL in rows written before;
        # adding a nullable column without a default rewrites no row. Numbered, so the
        # previous release refuses to open the schema; its processes already running go on
        # (they name their columns), and their claims, which do not clear these, cannot
        # leave stale facts: ended_attempt is checked.
        "ALTER TABLE {s}.executions ADD COLUMN attempt_owner TEXT,"
        " ADD COLUMN attempt_ended_at_ms BIGINT, ADD COLUMN ended_attempt INTEGER",
    ),
)

# Indexes the numbered migrations made that the schema no longer has: after migrating,
# every open drops those that still exist (PostgresStore._drop_indexes). Not a numbered
# migration, because that would raise the stored schema_version, which older SafeAgent
# processes still sharing the schema during a rolling upgrade refuse to open; dropping an
# index changes nothing they read or write.
# - audit_events_chain (shard, seq), made by migration 2: only verification's ORDER BY
#   used it (the chain heads are in audit_chain), and every audit event paid for an entry.
DROPPED_INDEXES = ("audit_events_chain",)

# Whether an event is in the trail, by its chain hash (unique) under its subject's index.
EVENT_BY_HASH = (
    "SELECT 1 FROM {s}.audit_events WHERE namespace = %s AND subject = %s AND hash = %s LIMIT 1"
)
# (namespace, subject, kind, execution id or NULL, fencing token or NULL) -> the details of
# the events of that kind under the subject's index: where a claim's or a completion's own
# event would be (PostgresStore._witnessed).
EVENTS_OF_WRITE = (
    "SELECT detail FROM {s}.audit_events WHERE namespace = %s AND subject = %s AND kind = %s"
    " AND execution_id = coalesce(%s, execution_id)"
    " AND fencing_token = coalesce(%s::bigint, fencing_token)"
)

# (now, namespace, request_id) -> always one row: the record's columns (all NULL when there
# is no record) and the clock. A miss costs the same single round trip as a hit.
GET = f"""
SELECT {E_COLUMNS}, n.now
FROM (SELECT {NOW_AT} AS now) AS n
LEFT JOIN {{s}}.executions AS e ON e.namespace = %s AND e.request_id = %s
"""
NOW_ONLY = f"SELECT {NOW}"
# The chain heads a claim or completion writes to, locked in the same statement as its
# change and only when that change was made ("won": the name of the CTE holding it):
# - the change's row lock comes first: EXISTS (SELECT FROM won) runs the data-modifying CTE
#   before any head is locked, whatever plan is chosen, which is the order every other
#   writer takes (row, then heads), so no two writers wait on each other in a cycle;
# - the heads are locked in shard order (LockRows sits above the sort), like LOCK_HEADS;
# - %s::int[] is a text literal ("{3,11}"): one string is much cheaper for psycopg to adapt
#   than a Python list.
_LOCK_WON_HEADS = """
    SELECT shard, seq, head FROM {s}.audit_chain
    WHERE shard = ANY(%s::int[]) AND EXISTS (SELECT FROM won)
    ORDER BY shard FOR UPDATE
"""
# (now, ns, rid, action, fp, payload, exec_id, owner, lease_ms, dkey): the clock, and the
# claim as a CTE "won" holding the record's columns when the claim was won (a new row, or a
# RELEASED one taken over: attempt and fencing token go on from it), empty when it lost.
_CLAIM_INSERT = f"""
WITH n AS MATERIALIZED (SELECT {NOW_AT} AS now<extra>),
won AS (
    INSERT INTO {{s}}.executions AS e ({COLUMNS})
    SELECT %s, %s, %s, %s, 'PENDING', %s, NULL, NULL, NULL,
           %s, 1, 1, %s, n.now + %s, %s, n.now, n.now, n.now, NULL, NULL, NULL, NULL, NULL
    FROM n
    ON CONFLICT (namespace, request_id) DO"""
_CLAIM_WON = f"""{_CLAIM_INSERT.replace("<extra>", "")} UPDATE SET
        action = excluded.action,
        fingerprint = excluded.fingerprint,
        status = 'PENDING',
        payload = excluded.payload,
        result = NULL,
        error_type = NULL,
        error_message = NULL,
        execution_id = excluded.execution_id,
        attempt = e.attempt + 1,
        fencing_token = e.fencing_token + 1,
        lease_owner = excluded.lease_owner,
        lease_expires_at_ms = excluded.lease_expires_at_ms,
        downstream_key = excluded.downstream_key,
        claimed_at_ms = excluded.claimed_at_ms,
        updated_at_ms = excluded.updated_at_ms,
        completed_at_ms = NULL,
        purged_at_ms = NULL,
        attempt_owner = NULL,
        attempt_ended_at_ms = NULL,
        ended_attempt = NULL
    WHERE e.status = 'RELEASED'
    RETURNING {E_COLUMNS}
)"""
# The same, for a claim made before the record is read (CLAIM_NEW_FAST): only a new row is
# won. On a conflict DO NOTHING neither locks nor writes the row that is there (DO UPDATE
# would lock it even when its WHERE refuses the update), so a replay that goes through this
# statement takes no lock and writes nothing. It does wait for a transaction still changing
# that row (a completion, or a purge of many records), which a plain read never does: the
# statement's lock_timeout (set_config(..., true), for its own transaction, as SET LOCAL
# would: CLAIM_NEW_LOCK_TIMEOUT, or the session's own when that is shorter) bounds the
# wait, and the caller then reads instead (PostgresStore.claim_new).
CLAIM_NEW_LOCK_TIMEOUT = "100ms"
_SESSION_LOCK_TIMEOUT = "current_setting('lock_timeout')"
_CLAIM_NEW_WAIT = (
    f", set_config('lock_timeout', CASE WHEN {_SESSION_LOCK_TIMEOUT}::interval > '0'"
    f" AND {_SESSION_LOCK_TIMEOUT}::interval < '{CLAIM_NEW_LOCK_TIMEOUT}'"
    f" THEN {_SESSION_LOCK_TIMEOUT} ELSE '{CLAIM_NEW_LOCK_TIMEOUT}' END, true) AS wait"
)
_CLAIM_NEW = f"""{_CLAIM_INSERT.replace("<extra>", _CLAIM_NEW_WAIT)} NOTHING
    RETURNING {E_COLUMNS}
)"""
# (now, ns, rid, action, fp, payload, exec_id, owner, lease_ms, dkey, shards) -> no row
# when the claim lost (the record is someone else's); otherwise one row per locked head:
# the record's columns, the clock, and (shard, seq, head) of a chain head now locked.
CLAIM = f"""{_CLAIM_WON},
h AS ({_LOCK_WON_HEADS})
SELECT won.*, n.now, h.shard, h.seq, h.head FROM won CROSS JOIN n LEFT JOIN h ON TRUE
"""


def _completion_won(sync: str, where: str) -> str:
    """The clock (``n``, with ``sync`` appended to its columns) and the completion as a CTE
    "won": (now, status, result, etype, emsg, terminal, ns, rid, token, *where's params) ->
    the record's columns when the PENDING record under that token was updated (and
    ``where`` held), empty otherwise."""
    return f"""WITH n AS MATERIALIZED (SELECT {NOW_AT} AS now{sync}),
won AS (
    UPDATE {{s}}.executions AS e
    SET status = %s, result = %s, error_type = %s, error_message = %s, updated_at_ms = n.now,
        completed_at_ms = CASE WHEN %s THEN n.now END
    FROM n
    WHERE e.namespace = %s AND e.request_id = %s AND e.fencing_token = %s
      AND e.status = 'PENDING'{where}
    RETURNING {E_COLUMNS}
)"""


# The fast completion's extra conditions: in time (a late one writes a second event), and
# the attempt the client named (its action and execution id: (action, exec_id) params).
_ON_TIME_AND_NAMED = """ AND e.lease_expires_at_ms > n.now
      AND e.action = %s AND e.execution_id = %s"""


def _complete(sync: str) -> str:
    """(now, status, result, etype, emsg, terminal, ns, rid, token, shards) -> one row per
    locked head, as CLAIM; when the fencing check refused the completion, one row whose
    record columns are NULL. ``n`` is the preserved side of the outer join, so it is always
    evaluated: in COMPLETE_ASYNC it also turns synchronous_commit off for the transaction,
    refused or not, as ``SET LOCAL`` would, without a round trip of its own."""
    return f"""
{_completion_won(sync, "")},
h AS ({_LOCK_WON_HEADS})
SELECT won.*, n.now, h.shard, h.seq, h.head FROM n LEFT JOIN won ON TRUE LEFT JOIN h ON TRUE
"""


_EVENT_COLUMNS = (
    "at_ms, kind, namespace, subject, action, actor, execution_id, fencing_token, detail,"
    " shard, seq, prev_hash, hash"
)
COMPLETE = _complete("")
_SYNC_OFF = ", set_config('synchronous_commit', 'off', true) AS sync"
COMPLETE_ASYNC = _complete(_SYNC_OFF)

# -- the fast path: a claim or a completion and its one audit event in ONE statement --------
# Sent alone in autocommit (its own transaction: no BEGIN, no COMMIT, one round trip). The
# event's chain hash is computed here, by sha256 over the same ASCII text chain_hash() hashes:
#   ["<prev hash>",<shard>,<seq>,<at_ms>,"<kind>",...,<fencing token>,"<detail, escaped>"]
# The client sends every string already JSON-encoded (fragments cut from the text its own
# encoders make: _claim_fragments and _completion_fragments in _pg_fast.py); this statement
# only joins them with the integers only the database knows (the head it locks, the clock,
# the token, the attempt). The general path's statements (CLAIM, COMPLETE) stay as they are.
# The database never JSON-encodes a string. convert_to, not ::bytea, turns the text into
# bytes (::bytea would read its backslashes as escapes).
# Locks: the change's row first (EXISTS (SELECT FROM won) runs the data-modifying CTE before
# the head is locked), then the ONE chain head its event goes to (h); the head row locked in
# h is moved by the same statement (mv): an UPDATE that meets a row version newer than its
# snapshot, locked by this very transaction, follows it and updates that newest version,
# whose values h returned. When ``won`` is empty (a lost claim, a completion the fencing
# or lease check refused) nothing is locked, inserted or moved.
_CHAIN_TEXT = "'[\"' || h.head || '\",' || h.shard || ',' || (h.seq + 1) || ',' || n.now"
_FAST_HEAD = """
h AS (
    SELECT shard, seq, head FROM {s}.audit_chain
    WHERE shard = %s AND EXISTS (SELECT FROM won)
    FOR UPDATE
),"""
_MOVE_AND_SELECT = """
mv AS (
    UPDATE {s}.audit_chain SET seq = (SELECT seq FROM ev), head = (SELECT hash FROM ev)
    WHERE shard = (SELECT shard FROM ev)
)
SELECT <lead>won.*, n.now FROM won CROSS JOIN n
WHERE CASE WHEN EXISTS (SELECT FROM ev) THEN true ELSE won.fencing_token / 0 > 0 END
"""
_FAST_MOVE = _MOVE_AND_SELECT.replace("<lead>", "")
# The WHERE fails the whole statement (division by zero: CHAIN_HEAD_MISSING) when the
# claim or completion was won but its event was not chained, because the shard's head row
# is missing: the write is undone with it, never committed without its event. When
# nothing was won, no row reaches the WHERE and nothing fails. (It names a column of won
# on purpose: a condition on ev alone would be planned as a one-time filter, run before
# the join, and fail every lost claim too.)
CHAIN_HEAD_MISSING = "22012"  # SQLSTATE division_by_zero, raised only by that WHERE here
# (now, ns, rid, action, fp, payload, exec_id, owner, lease_ms, dkey, shard, kind,
#  detail before the attempt, detail after it,
#  text after at_ms, text after the token, text after the attempt)
# -> the record's columns and the clock when the claim was won and its claimed event
# chained; no row when it lost (nothing changed).
# The event's namespace, subject, action, actor (the owner) and execution id are the row's,
# which are the claim's parameters (the client checks that the event it encoded has those
# very values); its fencing token and attempt are the row's; its detail is the client's
# text with the attempt in the middle.
_CLAIMED_EV = f"""
ev AS (
    INSERT INTO {{s}}.audit_events ({_EVENT_COLUMNS})
    SELECT n.now, %s, won.namespace, won.request_id, won.action, won.lease_owner,
           won.execution_id, won.fencing_token,
           %s::text || won.attempt || %s::text,
           h.shard, h.seq + 1, h.head,
           encode(sha256(convert_to({_CHAIN_TEXT} || %s::text || won.fencing_token
               || %s::text || won.attempt || %s::text, 'UTF8')), 'hex')
    FROM won, h, n<where>
    RETURNING shard, seq, hash
),"""
_CLAIMED_EVENT = _FAST_HEAD + _CLAIMED_EV.replace("<where>", "")
CLAIM_FAST = f"""{_CLAIM_WON},{_CLAIMED_EVENT}{_FAST_MOVE}"""

MAX_CARRIED = 8
"""The most buffered audit events CLAIM_FAST_CARRYING carries; with more, or with two of
them (or one and the claim's own) on one chain, the claim takes the general path, which
carries any number."""
# CLAIM_FAST that also writes buffered audit events (docs/design.md section 5: they go
# with the process's next write), each on a chain of its own and none on the claim's, in
# its one autocommit statement, where the general path takes a transaction of two round
# trips. (CLAIM_FAST's claim parameters, the shards as a text literal (as
# _LOCK_WON_HEADS), the claimed event's fragments (kind, detail before and after the
# attempt, chain text after the clock, the token and the attempt), its shard, the carried
# events as one JSON array of rows (at_ms, kind, ns, subject, action, actor, exec_id,
# token, detail, the chain text after the seq, shard), and their number) -> as CLAIM_FAST.
# One statement text whatever the number carried, so each connection plans it once (as
# EVENT_ROWS, one JSON text is also cheaper to send than a parameter per field). Every
# field of a carried event is the client's (stamped when it was buffered); only the
# previous hash and the seq are the database's, from the head h locked for its chain.
# Locks: the claim's row, then every head in shard order, as the general CLAIM. The claim
# runs to its end (counted whole in k, not tested by EXISTS, which stops at its first row)
# before a head is locked, and the new heads are read whole into x (the main query counts
# them) before mv moves them: locking a head another writer moved meanwhile makes
# PostgreSQL recheck what the statement read (EvalPlanQual), and a recheck that had to
# run the rest of an inserting CTE fails ("ModifyTable should not be called during
# EvalPlanQual"). The carried events are inserted first, in their order, then the claimed
# one, as on the general path: ids follow the order the events happened in. When the
# claim is lost nothing is locked, inserted or moved, and the carried events go back to
# the buffer. COMPLETE_FAST_CARRYING does the same for a completion.
_CARRY_HEADS = """
k AS MATERIALIZED (SELECT count(*) AS won FROM won),
h AS (
    SELECT shard, seq, head FROM {s}.audit_chain
    WHERE shard = ANY(%s::int[]) AND (SELECT won FROM k) > 0
    ORDER BY shard FOR UPDATE
),"""
_CARRY_EVENTS = f"""
b AS (
    INSERT INTO {{s}}.audit_events ({_EVENT_COLUMNS})
    SELECT (r->>0)::bigint, r->>1, r->>2, r->>3, r->>4, r->>5, r->>6, (r->>7)::bigint, r->>8,
           h.shard, h.seq + 1, h.head,
           encode(sha256(convert_to('["' || h.head || '",' || h.shard || ',' || (h.seq + 1)
               || (r->>9), 'UTF8')), 'hex')
    FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS c(r, i)
    JOIN h ON h.shard = (r->>10)::int
    ORDER BY c.i
    RETURNING shard, seq, hash
),
x AS MATERIALIZED (SELECT shard, seq, hash FROM b UNION ALL SELECT shard, seq, hash FROM ev),
mv AS (
    UPDATE {{s}}.audit_chain AS a SET seq = x.seq, head = x.hash FROM x WHERE a.shard = x.shard
)
SELECT <lead>won.*, n.now FROM won CROSS JOIN n
WHERE CASE WHEN (SELECT count(*) FROM x) = %s::int + 1 THEN true
    ELSE won.fencing_token / 0 > 0 END
"""
_CLAIMED_CARRYING = f"{_CARRY_HEADS}{_CLAIMED_EV.replace('<where>', ' WHERE h.shard = %s')}"
CLAIM_FAST_CARRYING = f"{_CLAIM_WON},{_CLAIMED_CARRYING}{_CARRY_EVENTS.replace('<lead>', '')}"
# CLAIM_FAST's parameters, then (ns, rid) again -> one row: a leading boolean, then the
# record's columns and the clock. True: the claim was won (a new row) and its claimed event
# chained, as CLAIM_FAST. False: the request id has a record, left as it is, and the row is
# that record as the statement's snapshot saw it, or all NULL when the conflicting row was
# committed after the statement began (the caller then reads it with a statement of its
# own). A RELEASED record is returned, not taken over: the caller decides, then claims it
# with CLAIM_FAST. The guard's first step on PostgreSQL while it pays
# (PostgresStore.claim_new, claim_first): a first execution's claim needs no read before
# it, a replay's read is this statement.
_NOT_NEW = f"""UNION ALL
SELECT false, {E_COLUMNS}, n.now
FROM n LEFT JOIN {{s}}.executions AS e ON e.namespace = %s AND e.request_id = %s
WHERE NOT EXISTS (SELECT FROM won)
"""
CLAIM_NEW_FAST = (
    f"{_CLAIM_NEW},{_CLAIMED_EVENT}{_MOVE_AND_SELECT.replace('<lead>', 'true, ')}{_NOT_NEW}"
)
# CLAIM_NEW_FAST that also writes buffered audit events, as CLAIM_FAST_CARRYING does, when
# the claim is won: CLAIM_FAST_CARRYING's parameters, then (ns, rid) -> as CLAIM_NEW_FAST.
# A replay's read through it locks, inserts and moves nothing (k counts no row won), and
# the carried events go back to the buffer.
CLAIM_NEW_FAST_CARRYING = (
    f"{_CLAIM_NEW},{_CLAIMED_CARRYING}{_CARRY_EVENTS.replace('<lead>', 'true, ')}{_NOT_NEW}"
)


def _complete_fast(sync: str) -> str:
    """(now, status, result, etype, emsg, terminal, ns, rid, token, action, exec_id, shard,
    kind, actor, detail, text after at_ms) -> the record's columns and the clock when the
    completion was accepted on time and its one event chained; no row (nothing changed)
    when the record is not PENDING under that token and execution (action and execution
    id: the client's own claim), or its lease has expired (a late completion writes a
    second event: the general path's). The event's namespace, subject, action, execution
    id and fencing token are the row's, equal to the parameters the WHERE compared them
    with (the client checks that the event it encoded has those very values)."""
    return f"""
{_completion_won(sync, _ON_TIME_AND_NAMED)},{_FAST_HEAD}{_COMPLETED_EV.replace("<where>", "")}{
        _FAST_MOVE
    }"""


_COMPLETED_EV = f"""
ev AS (
    INSERT INTO {{s}}.audit_events ({_EVENT_COLUMNS})
    SELECT n.now, %s, won.namespace, won.request_id, won.action, %s, won.execution_id,
           won.fencing_token, %s, h.shard, h.seq + 1, h.head,
           encode(sha256(convert_to({_CHAIN_TEXT} || %s::text, 'UTF8')), 'hex')
    FROM won, h, n<where>
    RETURNING shard, seq, hash
),"""


def _complete_fast_carrying(sync: str) -> str:
    """COMPLETE_FAST that also writes buffered audit events, as CLAIM_FAST_CARRYING does for
    a claim: (COMPLETE_FAST's parameters up to the execution id, the shards as a text
    literal, the event's kind, actor, detail and chain text after at_ms, its shard, the
    carried events as one JSON array of rows, their number) -> as COMPLETE_FAST. When the
    completion is not accepted in time nothing is written (the carried events go back to
    the buffer, and the general path follows, carrying them)."""
    return (
        f"{_completion_won(sync, _ON_TIME_AND_NAMED)},{_CARRY_HEADS}"
        f"{_COMPLETED_EV.replace('<where>', ' WHERE h.shard = %s')}"
        f"{_CARRY_EVENTS.replace('<lead>', '')}"
    )


COMPLETE_FAST = _complete_fast("")
COMPLETE_FAST_ASYNC = _complete_fast(_SYNC_OFF)
COMPLETE_FAST_CARRYING = _complete_fast_carrying("")
COMPLETE_FAST_CARRYING_ASYNC = _complete_fast_carrying(_SYNC_OFF)
RESOLVE = f"""
WITH n AS (SELECT {NOW} AS now)
UPDATE {{s}}.executions AS e
SET status = %(status)s, result = %(result)s, error_type = %(etype)s,
    error_message = %(emsg)s, updated_at_ms = n.now,
    completed_at_ms = CASE WHEN %(terminal)s THEN n.now END,
    fencing_token = e.fencing_token + 1
FROM n
WHERE e.namespace = %(ns)s AND e.request_id = %(rid)s AND e.fencing_token = %(token)s
  AND (e.status = 'IN_DOUBT' OR (e.status = 'PENDING' AND e.lease_expires_at_ms <= n.now))
RETURNING {", ".join("e." + c.strip() for c in COLUMNS.split(","))}, n.now
"""
# A rerun re-opens a FAILED record, a retention tombstone too: it is no tombstone after.
RERUN = f"""
WITH n AS (SELECT {NOW} AS now)
UPDATE {{s}}.executions AS e
SET status = 'RELEASED', updated_at_ms = n.now, fencing_token = e.fencing_token + 1,
    purged_at_ms = NULL
FROM n
WHERE e.namespace = %(ns)s AND e.request_id = %(rid)s AND e.fencing_token = %(token)s
  AND e.status = 'FAILED'
RETURNING {", ".join("e." + c.strip() for c in COLUMNS.split(","))}, n.now
"""
# (now, lease_ms, ns, rid, token) -> rowcount 1 if renewed
RENEW = f"""
WITH n AS (SELECT {NOW_AT} AS now)
UPDATE {{s}}.executions AS e
SET lease_expires_at_ms = n.now + %s, updated_at_ms = n.now
FROM n
WHERE e.namespace = %s AND e.request_id = %s AND e.fencing_token = %s
  AND e.status = 'PENDING'
"""
# (now, namespaces[], request ids[], tokens[], lease_ms[]) -> the (namespace, request id,
# token) of each lease renewed: RENEW for many leases, one statement
RENEW_MANY = f"""
WITH n AS (SELECT {NOW_AT} AS now),
v AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[])
      AS v(namespace, request_id, token, lease_ms))
UPDATE {{s}}.executions AS e
SET lease_expires_at_ms = n.now + v.lease_ms, updated_at_ms = n.now
FROM n, v
WHERE e.namespace = v.namespace AND e.request_id = v.request_id
  AND e.fencing_token = v.token AND e.status = 'PENDING'
RETURNING e.namespace, e.request_id, e.fencing_token
"""
# The first take-over of an attempt records its facts from the row as it was (every
# right-hand side reads the old row); later ones keep them: Record.attempt_facts.
TAKE_OVER = f"""
WITH n AS (SELECT {NOW} AS now)
UPDATE {{s}}.executions AS e
SET status = 'PENDING', fencing_token = e.fencing_token + 1, lease_owner = %(owner)s,
    lease_expires_at_ms = n.now + %(lease_ms)s, updated_at_ms = n.now,
    attempt_owner = CASE WHEN e.ended_attempt = e.attempt THEN e.attempt_owner
        ELSE e.lease_owner END,
    attempt_ended_at_ms = CASE WHEN e.ended_attempt = e.attempt THEN e.attempt_ended_at_ms
        WHEN e.status = 'IN_DOUBT' THEN e.updated_at_ms ELSE e.lease_expires_at_ms END,
    ended_attempt = e.attempt
FROM n
WHERE e.namespace = %(ns)s AND e.request_id = %(rid)s AND e.fencing_token = %(token)s
  AND (e.status = 'IN_DOUBT' OR (e.status = 'PENDING' AND e.lease_expires_at_ms <= n.now))
RETURNING {", ".join("e." + c.strip() for c in COLUMNS.split(","))}, n.now
"""
# One chained event row (chain_rows) -> the event inserted and its chain's head moved to it,
# in one statement: the new head is the row itself, so it is not sent twice.
EVENT = f"""
WITH ev AS (
    INSERT INTO {{s}}.audit_events ({_EVENT_COLUMNS})
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    RETURNING shard, seq, hash
)
UPDATE {{s}}.audit_chain AS a SET seq = ev.seq, head = ev.hash FROM ev WHERE a.shard = ev.shard
"""
# Any number of chained rows, as one JSON array of arrays -> the same, in one statement.
# One JSON text is far cheaper for the client to build and psycopg to adapt than a
# parameter per column (a Python list per column costs psycopg microseconds per element);
# jsonb is parsed once, so taking each field out is cheap. Rows are inserted in array order,
# so ids (the write order) follow the chain order; each touched chain's new head is its row
# with the highest seq.
EVENT_ROWS = f"""
WITH ev AS (
    INSERT INTO {{s}}.audit_events ({_EVENT_COLUMNS})
    SELECT (r->>0)::bigint, r->>1, r->>2, r->>3, r->>4, r->>5, r->>6, (r->>7)::bigint, r->>8,
           (r->>9)::int, (r->>10)::bigint, r->>11, r->>12
    FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS x(r, i)
    ORDER BY i
    RETURNING shard, seq, hash
)
UPDATE {{s}}.audit_chain AS a SET seq = x.seq, head = x.hash
FROM (SELECT DISTINCT ON (shard) shard, seq, hash FROM ev ORDER BY shard, seq DESC) AS x
WHERE a.shard = x.shard
"""
# (shards as a text literal, see _LOCK_WON_HEADS) -> the heads, locked in shard order
LOCK_HEADS = (
    "SELECT shard, seq, head FROM {s}.audit_chain WHERE shard = ANY(%s::int[])"
    " ORDER BY shard FOR UPDATE"
)
HEADS = "SELECT shard, seq, head FROM {s}.audit_chain"
# Every event row, those outside the chains (NULL shard) too: verification reports them.
CHAIN = f"SELECT {CHAIN_COLUMNS} FROM {{s}}.audit_events ORDER BY shard, seq, id"
ADD_ANCHOR = (
    "INSERT INTO {s}.audit_anchors (at_ms, heads, mac)"
    f" SELECT {NOW}, %(heads)s, %(mac)s RETURNING id, at_ms"
)
ANCHORS = "SELECT id, at_ms, heads, mac FROM {s}.audit_anchors ORDER BY id"
ANCHORS_LAST = (
    "SELECT * FROM (SELECT id, at_ms, heads, mac FROM {s}.audit_anchors"
    " ORDER BY id DESC LIMIT %(last)s) AS a ORDER BY id"
)
PURGE_RELEASED = f"""
UPDATE {{s}}.executions SET payload = '', result = NULL, error_message = NULL,
    purged_at_ms = {NOW}
WHERE status = 'RELEASED' AND purged_at_ms IS NULL AND updated_at_ms < %(cutoff)s
"""
PURGE_FINISHED = f"""
UPDATE {{s}}.executions SET payload = '', result = NULL, error_message = NULL,
    purged_at_ms = {NOW}
WHERE status IN ('SUCCEEDED', 'FAILED') AND purged_at_ms IS NULL
  AND COALESCE(completed_at_ms, updated_at_ms) < %(cutoff)s
"""
KEPT = (  # as read at now: an expired PENDING lease is in doubt
    "SELECT CASE WHEN status = 'PENDING' AND (lease_expires_at_ms IS NULL"
    " OR lease_expires_at_ms > %(now)s) THEN 'PENDING' ELSE 'IN_DOUBT' END AS seen,"
    " count(*) FROM {s}.executions WHERE status IN ('PENDING', 'IN_DOUBT') GROUP BY seen"
)
EVENTS = f"SELECT {EVENT_COLUMNS} FROM {{s}}.audit_events WHERE id > %(after)s"
RECORDS = f"SELECT {COLUMNS} FROM {{s}}.executions WHERE TRUE"

GET_CASE = f"SELECT {CASE_COLUMNS} FROM {{s}}.cases WHERE namespace = %(ns)s AND case_id = %(cid)s"
LOCK_CASE = GET_CASE + " FOR UPDATE"
OPEN_CASE = f"""
WITH n AS (SELECT {NOW} AS now)
INSERT INTO {{s}}.cases ({CASE_COLUMNS})
SELECT %(ns)s, %(cid)s, 'OPEN', NULL, NULL, %(threshold)s, %(quorum)s, 1, n.now, n.now, NULL
FROM n
ON CONFLICT (namespace, case_id) DO NOTHING
RETURNING {CASE_COLUMNS}, (SELECT now FROM n)
"""
LIVE_SIGNALS = (
    "SELECT source, outcome, confidence, metadata, at_ms FROM {s}.signals"
    " WHERE namespace = %(ns)s AND case_id = %(cid)s AND status = 'live' ORDER BY id"
)
REPLACE_SIGNAL = (
    "UPDATE {s}.signals SET status = 'replaced' WHERE namespace = %(ns)s"
    " AND case_id = %(cid)s AND source = %(source)s AND status = 'live'"
)
INSERT_SIGNAL = (
    "INSERT INTO {s}.signals (namespace, case_id, source, outcome, confidence, metadata,"
    " at_ms, status) VALUES (%(ns)s, %(cid)s, %(source)s, %(outcome)s, %(confidence)s,"
    " %(metadata)s, %(at)s, %(status)s)"
)
UPDATE_CASE = f"""
UPDATE {{s}}.cases SET state = %(state)s, provisional_outcome = %(provisional)s,
    outcome = %(outcome)s, version = version + 1, updated_at_ms = %(at)s,
    resolved_by = COALESCE(%(by)s, resolved_by)
WHERE namespace = %(ns)s AND case_id = %(cid)s
RETURNING {CASE_COLUMNS}
"""
SETTLE_CASE = f"""
UPDATE {{s}}.cases SET state = 'SETTLED', version = version + 1, updated_at_ms = %(at)s
WHERE namespace = %(ns)s AND case_id = %(cid)s AND state = 'FINAL'
RETURNING {CASE_COLUMNS}
"""
CASES = f"SELECT {CASE_COLUMNS} FROM {{s}}.cases WHERE TRUE"
# Cases with their live signals in one statement (one snapshot, even at READ COMMITTED): a
# case's columns, then one live signal's (NULL for a case without any), a row per signal.
CASES_LIVE = (
    "SELECT "
    + ", ".join("c." + name.strip() for name in CASE_COLUMNS.split(","))
    + ", s.source, s.outcome, s.confidence, s.metadata, s.at_ms FROM {s}.cases c"
    " LEFT JOIN {s}.signals s ON s.namespace = c.namespace AND s.case_id = c.case_id"
    " AND s.status = 'live' WHERE TRUE"
)
GET_CASE_LIVE = CASES_LIVE + " AND c.namespace = %(ns)s AND c.case_id = %(cid)s ORDER BY s.id"
CASE_SIGNALS = (
    "SELECT source, outcome, confidence, metadata, at_ms, status FROM {s}.signals"
    " WHERE namespace = %(ns)s AND case_id = %(cid)s ORDER BY id"
)
