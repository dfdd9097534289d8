"""The PostgreSQL store's schema, numbered migrations and statements.

Every statement takes ``%(now)s``: ``NULL`` means "the database's clock" (leases are judged
on it, so hosts with skewed clocks agree), an integer is a test's fake clock. Table names
are qualified with the store's schema when the store is built.
"""

from __future__ import annotations

from safeagent.stores._rows import (
    CASE_COLUMNS,
    CHAIN_COLUMNS,
    CHAIN_SHARDS,
    COLUMNS,
    EVENT_COLUMNS,
    GENESIS,
)

SCHEMA_VERSION = 2

NOW = "COALESCE(%(now)s::bigint, (extract(epoch from clock_timestamp()) * 1000)::bigint)"

# MIGRATIONS[n - 1] takes the schema from version n - 1 to n. "{s}" is the schema.
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
        + f"' FROM generate_series(0, {CHAIN_SHARDS - 1}) AS g",
        "CREATE TABLE {s}.audit_anchors (id BIGSERIAL PRIMARY KEY, at_ms BIGINT NOT NULL,"
        " heads TEXT NOT NULL, mac TEXT NOT NULL)",
    ),
)

GET = (
    f"SELECT {COLUMNS}, {NOW} FROM {{s}}.executions"
    " WHERE namespace = %(ns)s AND request_id = %(rid)s"
)
NOW_ONLY = f"SELECT {NOW}"
CLAIM = f"""
WITH n AS (SELECT {NOW} AS now)
INSERT INTO {{s}}.executions AS e ({COLUMNS})
SELECT %(ns)s, %(rid)s, %(action)s, %(fp)s, 'PENDING', %(payload)s, NULL, NULL, NULL,
       %(exec_id)s, 1, 1, %(owner)s, n.now + %(lease_ms)s, %(dkey)s, n.now, n.now, n.now, NULL,
       NULL
FROM n
ON CONFLICT (namespace, request_id) DO UPDATE SET
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
    completed_at_ms = NULL
WHERE e.status = 'RELEASED'
RETURNING {", ".join("e." + c.strip() for c in COLUMNS.split(","))}, (SELECT now FROM n)
"""
COMPLETE = f"""
WITH n AS (SELECT {NOW} AS now)
UPDATE {{s}}.executions AS e
SET status = %(status)s, result = %(result)s, error_type = %(etype)s,
    error_message = %(emsg)s, updated_at_ms = n.now,
    completed_at_ms = CASE WHEN %(terminal)s THEN n.now END
FROM n
WHERE e.namespace = %(ns)s AND e.request_id = %(rid)s AND e.fencing_token = %(token)s
  AND e.status = 'PENDING'
RETURNING {", ".join("e." + c.strip() for c in COLUMNS.split(","))}, n.now
"""
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
RERUN = f"""
WITH n AS (SELECT {NOW} AS now)
UPDATE {{s}}.executions AS e
SET status = 'RELEASED', updated_at_ms = n.now, fencing_token = e.fencing_token + 1
FROM n
WHERE e.namespace = %(ns)s AND e.request_id = %(rid)s AND e.fencing_token = %(token)s
  AND e.status = 'FAILED'
RETURNING {", ".join("e." + c.strip() for c in COLUMNS.split(","))}, n.now
"""
RENEW = f"""
WITH n AS (SELECT {NOW} AS now)
UPDATE {{s}}.executions AS e
SET lease_expires_at_ms = n.now + %(lease_ms)s, updated_at_ms = n.now
FROM n
WHERE e.namespace = %(ns)s AND e.request_id = %(rid)s AND e.fencing_token = %(token)s
  AND e.status = 'PENDING'
"""
TAKE_OVER = f"""
WITH n AS (SELECT {NOW} AS now)
UPDATE {{s}}.executions AS e
SET status = 'PENDING', fencing_token = e.fencing_token + 1, lease_owner = %(owner)s,
    lease_expires_at_ms = n.now + %(lease_ms)s, updated_at_ms = n.now
FROM n
WHERE e.namespace = %(ns)s AND e.request_id = %(rid)s AND e.fencing_token = %(token)s
  AND (e.status = 'IN_DOUBT' OR (e.status = 'PENDING' AND e.lease_expires_at_ms <= n.now))
RETURNING {", ".join("e." + c.strip() for c in COLUMNS.split(","))}, n.now
"""
EVENT = (
    "INSERT INTO {s}.audit_events (at_ms, kind, namespace, subject, action, actor,"
    " execution_id, fencing_token, detail, shard, seq, prev_hash, hash)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
LOCK_HEADS = (
    "SELECT shard, seq, head FROM {s}.audit_chain WHERE shard = ANY(%s) ORDER BY shard FOR UPDATE"
)
UPDATE_HEAD = "UPDATE {s}.audit_chain SET seq = %s, head = %s WHERE shard = %s"
HEADS = "SELECT shard, seq, head FROM {s}.audit_chain"
CHAIN = (
    f"SELECT {CHAIN_COLUMNS} FROM {{s}}.audit_events WHERE shard IS NOT NULL"
    " ORDER BY shard, seq, id"
)
ADD_ANCHOR = (
    "INSERT INTO {s}.audit_anchors (at_ms, heads, mac)"
    f" SELECT {NOW}, %(heads)s, %(mac)s RETURNING id, at_ms"
)
ANCHORS = "SELECT id, at_ms, heads, mac FROM {s}.audit_anchors ORDER BY id"
PURGE_RELEASED = (
    "DELETE FROM {s}.executions WHERE status = 'RELEASED' AND updated_at_ms < %(cutoff)s"
)
PURGE_FINISHED = f"""
UPDATE {{s}}.executions SET payload = '', result = NULL, error_message = NULL,
    purged_at_ms = {NOW}
WHERE status IN ('SUCCEEDED', 'FAILED') AND purged_at_ms IS NULL
  AND COALESCE(completed_at_ms, updated_at_ms) < %(cutoff)s
"""
KEPT = (
    "SELECT status, count(*) FROM {s}.executions"
    " WHERE status IN ('PENDING', 'IN_DOUBT') GROUP BY status"
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
CASE_SIGNALS = (
    "SELECT source, outcome, confidence, metadata, at_ms, status FROM {s}.signals"
    " WHERE namespace = %(ns)s AND case_id = %(cid)s ORDER BY id"
)
