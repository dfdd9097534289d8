"""The SQLite store's schema, numbered migrations and statements.

``SCHEMA_VERSION`` and ``MIGRATIONS`` (``MIGRATIONS[n - 1]`` takes a file from version
``n - 1`` to ``n``), ``DROPPED_INDEXES`` (dropped on every open), the text of every
statement of :class:`~safeagent.stores.sqlite.SQLiteStore` (``SQL_*``), and
``_check_head``, which refuses to extend an audit chain head of the wrong type or range.
Constants and one pure function: no connection, no state.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from safeagent.stores._rows import CASE_COLUMNS, CHAIN_SHARDS, COLUMNS, GENESIS

SCHEMA_VERSION = 5

# Numbered migrations: MIGRATIONS[n - 1] takes the schema from version n - 1 to n.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE executions (
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
            fencing_token INTEGER NOT NULL,
            lease_owner TEXT,
            lease_expires_at_ms INTEGER,
            downstream_key TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL,
            claimed_at_ms INTEGER NOT NULL,
            updated_at_ms INTEGER NOT NULL,
            completed_at_ms INTEGER,
            PRIMARY KEY (namespace, request_id)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE audit_events (
            id INTEGER PRIMARY KEY,
            at_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            namespace TEXT NOT NULL,
            subject TEXT NOT NULL,
            action TEXT,
            actor TEXT,
            execution_id TEXT,
            fencing_token INTEGER,
            detail TEXT NOT NULL
        )
        """,
        "CREATE INDEX audit_events_subject ON audit_events (namespace, subject, id)",
    ),
    (
        """
        CREATE TABLE cases (
            namespace TEXT NOT NULL,
            case_id TEXT NOT NULL,
            state TEXT NOT NULL,
            provisional_outcome TEXT,
            outcome TEXT,
            threshold REAL NOT NULL,
            quorum INTEGER NOT NULL,
            version INTEGER NOT NULL,
            created_at_ms INTEGER NOT NULL,
            updated_at_ms INTEGER NOT NULL,
            resolved_by TEXT,
            PRIMARY KEY (namespace, case_id)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE signals (
            id INTEGER PRIMARY KEY,
            namespace TEXT NOT NULL,
            case_id TEXT NOT NULL,
            source TEXT NOT NULL,
            outcome TEXT NOT NULL,
            confidence REAL NOT NULL,
            metadata TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            status TEXT NOT NULL
        )
        """,
        "CREATE INDEX signals_case ON signals (namespace, case_id, status)",
    ),
    (
        "ALTER TABLE executions ADD COLUMN purged_at_ms INTEGER",
        "ALTER TABLE audit_events ADD COLUMN shard INTEGER",
        "ALTER TABLE audit_events ADD COLUMN seq INTEGER",
        "ALTER TABLE audit_events ADD COLUMN prev_hash TEXT",
        "ALTER TABLE audit_events ADD COLUMN hash TEXT",
        "CREATE INDEX audit_events_chain ON audit_events (shard, seq)",
        "CREATE TABLE audit_chain (shard INTEGER PRIMARY KEY, seq INTEGER NOT NULL,"
        " head TEXT NOT NULL)",
        "INSERT INTO audit_chain (shard, seq, head) SELECT value, 0, '"
        + GENESIS
        + "' FROM (WITH RECURSIVE n(value) AS (SELECT 0 UNION ALL SELECT value + 1 FROM n"
        f" WHERE value < {CHAIN_SHARDS - 1}) SELECT value FROM n)",
        "CREATE TABLE audit_anchors (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL,"
        " heads TEXT NOT NULL, mac TEXT NOT NULL)",
    ),
    (
        # The chain head follows every chained insert inside SQLite: appending an event is
        # read head, insert (SQL_HEAD, SQL_APPEND), with no statement to move the head.
        "CREATE TRIGGER audit_chain_advance AFTER INSERT ON audit_events"
        " WHEN NEW.shard IS NOT NULL"
        " BEGIN UPDATE audit_chain SET seq = NEW.seq, head = NEW.hash"
        " WHERE shard = NEW.shard; END",
    ),
    (
        # The facts of the attempt that ran fn (owner, end, attempt number), which a reconcile
        # take-over records once and keeps (Record.attempt_facts): the take-over overwrites
        # lease_owner and lease_expires_at_ms with its own. NULL in rows written before.
        # Numbered (the file is version 5 now), so the previous release refuses to open it;
        # its processes already running go on (they name their columns), and their claims,
        # which do not clear these, cannot leave stale facts: ended_attempt is checked.
        "ALTER TABLE executions ADD COLUMN attempt_owner TEXT",
        "ALTER TABLE executions ADD COLUMN attempt_ended_at_ms INTEGER",
        "ALTER TABLE executions ADD COLUMN ended_attempt INTEGER",
    ),
)

# Indexes the numbered migrations made that the schema no longer has: _migrate drops them
# (DROP INDEX IF EXISTS) on every open, after the numbered migrations. Not a numbered
# migration, because that would raise the stored schema_version, which older SafeAgent
# processes still sharing the file during a rolling upgrade refuse to open; dropping an
# index changes nothing they read or write.
# - audit_events_chain (shard, seq), made by migration 3: only verification's ORDER BY
#   used it (the chain heads are in audit_chain), and it cost every audit event an extra
#   index entry: about one more WAL page per commit.
DROPPED_INDEXES = ("audit_events_chain",)

SQL_GET_CASE = f"SELECT {CASE_COLUMNS} FROM cases WHERE namespace = ? AND case_id = ?"
SQL_OPEN_CASE = f"""
INSERT INTO cases ({CASE_COLUMNS}) VALUES (?, ?, 'OPEN', NULL, NULL, ?, ?, 1, ?, ?, NULL)
ON CONFLICT (namespace, case_id) DO NOTHING
RETURNING {CASE_COLUMNS}
"""
SQL_LIVE_SIGNALS = (
    "SELECT source, outcome, confidence, metadata, at_ms FROM signals"
    " WHERE namespace = ? AND case_id = ? AND status = 'live' ORDER BY id"
)
_N_CASE_COLUMNS = CASE_COLUMNS.count(",") + 1
# Cases with their live signals in one statement (one snapshot): a case's columns, then one
# live signal's (NULL for a case without any), a row per live signal, oldest first.
SQL_CASES_LIVE = (
    "SELECT "
    + ", ".join("c." + name.strip() for name in CASE_COLUMNS.split(","))
    + ", s.source, s.outcome, s.confidence, s.metadata, s.at_ms FROM cases c"
    " LEFT JOIN signals s ON s.namespace = c.namespace AND s.case_id = c.case_id"
    " AND s.status = 'live' WHERE 1 = 1"
)
SQL_SETTLE_CASE = f"""
UPDATE cases SET state = 'SETTLED', version = version + 1, updated_at_ms = ?
WHERE namespace = ? AND case_id = ? AND state = 'FINAL'
RETURNING {CASE_COLUMNS}
"""

SQL_GET = f"SELECT {COLUMNS} FROM executions WHERE namespace = ? AND request_id = ?"
SQL_CLAIM = f"""
INSERT INTO executions ({COLUMNS})
VALUES (?, ?, ?, ?, 'PENDING', ?, NULL, NULL, NULL, ?, 1, 1, ?, ?, ?, ?, ?, ?, NULL, NULL,
    NULL, NULL, NULL)
ON CONFLICT (namespace, request_id) DO UPDATE SET
    action = excluded.action,
    fingerprint = excluded.fingerprint,
    status = 'PENDING',
    payload = excluded.payload,
    result = NULL,
    error_type = NULL,
    error_message = NULL,
    execution_id = excluded.execution_id,
    attempt = executions.attempt + 1,
    fencing_token = executions.fencing_token + 1,
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
WHERE executions.status = 'RELEASED'
RETURNING {COLUMNS}
"""
SQL_COMPLETE = f"""
UPDATE executions
SET status = ?, result = ?, error_type = ?, error_message = ?, updated_at_ms = ?,
    completed_at_ms = ?
WHERE namespace = ? AND request_id = ? AND fencing_token = ? AND status = 'PENDING'
RETURNING {COLUMNS}
"""
SQL_RESOLVE = f"""
UPDATE executions
SET status = ?, result = ?, error_type = ?, error_message = ?, updated_at_ms = ?,
    completed_at_ms = ?, fencing_token = fencing_token + 1
WHERE namespace = ? AND request_id = ? AND fencing_token = ?
  AND (status = 'IN_DOUBT' OR (status = 'PENDING' AND lease_expires_at_ms <= ?))
RETURNING {COLUMNS}
"""
# A rerun re-opens a FAILED record, a retention tombstone too: it is no tombstone after.
SQL_RERUN = f"""
UPDATE executions
SET status = 'RELEASED', updated_at_ms = ?, fencing_token = fencing_token + 1,
    purged_at_ms = NULL
WHERE namespace = ? AND request_id = ? AND fencing_token = ? AND status = 'FAILED'
RETURNING {COLUMNS}
"""
SQL_RENEW = """
UPDATE executions SET lease_expires_at_ms = ?, updated_at_ms = ?
WHERE namespace = ? AND request_id = ? AND fencing_token = ? AND status = 'PENDING'
"""
# The first take-over of an attempt records its facts from the row as it was (every
# right-hand side reads the old row); later ones keep them: Record.attempt_facts.
SQL_TAKE_OVER = f"""
UPDATE executions
SET status = 'PENDING', fencing_token = fencing_token + 1, lease_owner = ?,
    lease_expires_at_ms = ?, updated_at_ms = ?,
    attempt_owner = CASE WHEN ended_attempt = attempt THEN attempt_owner ELSE lease_owner END,
    attempt_ended_at_ms = CASE WHEN ended_attempt = attempt THEN attempt_ended_at_ms
        WHEN status = 'IN_DOUBT' THEN updated_at_ms ELSE lease_expires_at_ms END,
    ended_attempt = attempt
WHERE namespace = ? AND request_id = ? AND fencing_token = ?
  AND (status = 'IN_DOUBT' OR (status = 'PENDING' AND lease_expires_at_ms <= ?))
RETURNING {COLUMNS}
"""
# Events are appended to their shards' chains under the write lock (no one interleaves):
# the heads are read, the events hashed in Python (chain_rows) and inserted as they are,
# and the trigger audit_chain_advance moves each head. (Releases before 0.9 hashed a
# single event inside its INSERT through a function registered on each connection;
# calling into Python from SQLite cost more than reading the one head does.)
SQL_HEAD = "SELECT seq, head FROM audit_chain WHERE shard = ?"
SQL_HEADS = "SELECT shard, seq, head FROM audit_chain"
SQL_APPEND = """
INSERT INTO audit_events (at_ms, kind, namespace, subject, action, actor, execution_id,
    fencing_token, detail, shard, seq, prev_hash, hash)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


_MAX_SEQ = 2**63 - 2  # the next seq must still fit SQLite's INTEGER


def _check_head(shard: int, seq: Any, head: Any) -> None:
    """Refuse to extend a chain head of the wrong type or range (the table was edited):
    a store failure (DatabaseError, so the caller gets StoreError), nothing written."""
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ or type(head) is not str:
        raise sqlite3.DatabaseError(
            f"audit chain head of shard {shard} unusable (seq {seq!r}, head {head!r:.80}); "
            "events not written"
        )
