"""The SQLite store: the embedded, durable default.

One connection per thread (and per process: a forked child opens its own), WAL journal,
a busy timeout, and every write in a ``BEGIN IMMEDIATE`` transaction, so many threads
and many processes on one host can share one file. The claim is one atomic
``INSERT ... ON CONFLICT DO UPDATE ... WHERE status = 'RELEASED' RETURNING`` statement.

Durability (DESIGN section 3):

- ``"durable"`` (default): claim and completion commit with ``synchronous=FULL``; in WAL
  mode every commit is fsynced before ``execute`` returns.
- ``"claim-durable"``: the claim commits with ``synchronous=FULL``, the completion with
  ``synchronous=NORMAL`` (no fsync). A power loss can turn a recent receipt back into a
  PENDING claim, read as in doubt after its lease: never a duplicate.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from safeagent._audit import AuditEvent, EventKind
from safeagent._receipt import ErrorInfo, Record, Status
from safeagent.errors import SchemaVersionError, StoreError
from safeagent.stores._base import (
    ClaimRequest,
    ClaimResult,
    Clock,
    Completion,
    EventBuffer,
    Resolution,
    WriteResult,
    check_durability,
    claimed_event,
    completion_events,
    resolved_event,
    stamped,
    system_clock_ms,
)

T = TypeVar("T")

DEFAULT_DB_FILENAME = "safeagent.db"
DB_ENV_VAR = "SAFEAGENT_DB"
DEFAULT_BUSY_TIMEOUT = 5.0

SCHEMA_VERSION = 1

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
)

COLUMNS = (
    "namespace, request_id, action, fingerprint, status, payload, result, error_type, "
    "error_message, execution_id, attempt, fencing_token, lease_owner, lease_expires_at_ms, "
    "downstream_key, created_at_ms, claimed_at_ms, updated_at_ms, completed_at_ms"
)
SQL_GET = f"SELECT {COLUMNS} FROM executions WHERE namespace = ? AND request_id = ?"
SQL_CLAIM = f"""
INSERT INTO executions ({COLUMNS})
VALUES (?, ?, ?, ?, 'PENDING', ?, NULL, NULL, NULL, ?, 1, 1, ?, ?, ?, ?, ?, ?, NULL)
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
    claimed_at_ms = excluded.claimed_at_ms,
    updated_at_ms = excluded.updated_at_ms,
    completed_at_ms = NULL
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
SQL_EVENT = (
    "INSERT INTO audit_events (at_ms, kind, namespace, subject, action, actor, execution_id,"
    " fencing_token, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def default_path() -> str:
    """The default database file: ``$SAFEAGENT_DB``, else ``safeagent.db`` in the cwd."""
    return os.environ.get(DB_ENV_VAR) or DEFAULT_DB_FILENAME


def _row_to_record(row: Sequence[Any]) -> Record:
    return Record(
        namespace=row[0],
        request_id=row[1],
        action=row[2],
        fingerprint=row[3],
        status=Status(row[4]),
        payload_json=row[5],
        result_json=row[6],
        error=None if row[7] is None else ErrorInfo(row[7], row[8] or ""),
        execution_id=row[9],
        attempt=row[10],
        fencing_token=row[11],
        lease_owner=row[12],
        lease_expires_at_ms=row[13],
        downstream_key=row[14],
        created_at_ms=row[15],
        claimed_at_ms=row[16],
        updated_at_ms=row[17],
        completed_at_ms=row[18],
    )


def _event_row(event: AuditEvent) -> tuple[Any, ...]:
    return (
        event.at_ms,
        event.kind.value,
        event.namespace,
        event.subject,
        event.action,
        event.actor,
        event.execution_id,
        event.fencing_token,
        json.dumps(dict(event.detail), separators=(",", ":"), ensure_ascii=False, default=str),
    )


class SQLiteStore:
    """Execution records and the audit trail in one SQLite file.

    Args:
        path: the database file. ``None`` means ``$SAFEAGENT_DB``, else ``safeagent.db`` in
            the current working directory. Its folder must exist.
        durability: ``"durable"`` (default) or ``"claim-durable"`` (module docstring).
        busy_timeout: seconds a write waits for another writer's lock before failing
            closed with :class:`~safeagent.errors.StoreError` (default 5.0).
        clock: integer milliseconds since the epoch; the system clock by default. Leases
            are judged on it; pass a fake one in tests only.

    Raises:
        ConfigurationError: an unknown durability mode.
        StoreError: the file cannot be opened or migrated.
        SchemaVersionError: the file was written by a newer SafeAgent.
    """

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        durability: str = "durable",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        self.durability = check_durability(durability)
        self.path = str(Path(path if path is not None else default_path()))
        self.busy_timeout = float(busy_timeout)
        self._clock = clock or system_clock_ms
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._buffer = EventBuffer(self.flush_events)
        self._migrate()

    @property
    def identity(self) -> str:
        return "sqlite:" + os.path.abspath(self.path)

    # -- connections and transactions ------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        pid = os.getpid()
        if conn is not None and self._local.pid == pid:
            return conn
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._local.conn, self._local.pid = conn, pid
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    @contextmanager
    def _write(self, *, synchronous: str = "FULL") -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction that also writes buffered audit events."""
        conn = self._conn()
        switch = synchronous != "FULL"
        events = self._buffer.take() if self._buffer else []
        try:
            if switch:
                conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                if events:
                    conn.executemany(SQL_EVENT, [_event_row(e) for e in events])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._buffer.put_back(events)
            raise StoreError(f"SQLite write failed on {self.path}: {exc}") from exc
        except BaseException:
            self._buffer.put_back(events)
            raise
        finally:
            if switch:
                try:
                    conn.execute("PRAGMA synchronous = FULL")
                except sqlite3.Error:  # the connection is unusable; the next call reconnects
                    self._local.conn = None

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn())
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read failed on {self.path}: {exc}") from exc

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS safeagent_meta (key TEXT PRIMARY KEY, value TEXT)"
            )
            row = conn.execute(
                "SELECT value FROM safeagent_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path} has schema version {version}, but this SafeAgent "
                    f"understands up to {SCHEMA_VERSION}: upgrade SafeAgent to use it",
                    found=version,
                    supported=SCHEMA_VERSION,
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number - 1]:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(
                    "INSERT OR REPLACE INTO safeagent_meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    def _maybe_flush(self) -> None:
        """Write the buffer if it is due; a failure keeps the events for the next write
        rather than failing the read or replay that triggered it."""
        if self._buffer.due():
            with suppress(StoreError):
                self.flush_events()

    # -- the store interface ---------------------------------------------------------

    def get(self, namespace: str, request_id: str) -> tuple[Record | None, int]:
        if self._buffer:
            self._maybe_flush()
        row = self._read(lambda c: c.execute(SQL_GET, (namespace, request_id)).fetchone())
        return (None if row is None else _row_to_record(row)), self._clock()

    def claim(self, request: ClaimRequest) -> ClaimResult:
        with self._write() as conn:
            now = self._clock()
            row = conn.execute(
                SQL_CLAIM,
                (
                    request.namespace,
                    request.request_id,
                    request.action,
                    request.fingerprint,
                    request.payload_json,
                    request.execution_id,
                    request.owner,
                    now + request.lease_ms,
                    request.downstream_key,
                    now,
                    now,
                    now,
                ),
            ).fetchone()
            if row is None:
                existing = conn.execute(SQL_GET, (request.namespace, request.request_id)).fetchone()
                return ClaimResult(won=False, record=_row_to_record(existing), now_ms=now)
            record = _row_to_record(row)
            conn.execute(SQL_EVENT, _event_row(claimed_event(request, record, now)))
        return ClaimResult(won=True, record=record, now_ms=now)

    def complete(self, completion: Completion) -> WriteResult:
        sync = "NORMAL" if self.durability == "claim-durable" else "FULL"
        terminal = completion.status in (Status.SUCCEEDED, Status.FAILED)
        error = completion.error
        with self._write(synchronous=sync) as conn:
            now = self._clock()
            before_row = conn.execute(
                SQL_GET, (completion.namespace, completion.request_id)
            ).fetchone()
            before = None if before_row is None else _row_to_record(before_row)
            row = conn.execute(
                SQL_COMPLETE,
                (
                    completion.status.value,
                    completion.result_json,
                    None if error is None else error.type,
                    None if error is None else error.message,
                    now,
                    now if terminal else None,
                    completion.namespace,
                    completion.request_id,
                    completion.fencing_token,
                ),
            ).fetchone()
            after = None if row is None else _row_to_record(row)
            conn.executemany(
                SQL_EVENT,
                [_event_row(e) for e in completion_events(completion, before, after, now)],
            )
        if after is None:
            return WriteResult(accepted=False, record=before)
        late = after.lease_expires_at_ms is not None and now >= after.lease_expires_at_ms
        return WriteResult(accepted=True, record=after, late=late)

    def resolve(self, resolution: Resolution) -> WriteResult:
        terminal = resolution.status in (Status.SUCCEEDED, Status.FAILED)
        error = resolution.error
        with self._write() as conn:
            now = self._clock()
            row = conn.execute(
                SQL_RESOLVE,
                (
                    resolution.status.value,
                    resolution.result_json,
                    None if error is None else error.type,
                    None if error is None else error.message,
                    now,
                    now if terminal else None,
                    resolution.namespace,
                    resolution.request_id,
                    resolution.expected_token,
                    now,
                ),
            ).fetchone()
            if row is None:
                current = conn.execute(
                    SQL_GET, (resolution.namespace, resolution.request_id)
                ).fetchone()
                return WriteResult(
                    accepted=False, record=None if current is None else _row_to_record(current)
                )
            record = _row_to_record(row)
            conn.execute(SQL_EVENT, _event_row(resolved_event(resolution, record, now)))
        return WriteResult(accepted=True, record=record)

    def record_event(self, event: AuditEvent, *, buffered: bool = False) -> None:
        if buffered:
            self._buffer.add(stamped(event, self._clock()))
            self._maybe_flush()
            return
        with self._write() as conn:
            conn.execute(SQL_EVENT, _event_row(stamped(event, self._clock())))

    def flush_events(self) -> None:
        if self._buffer and not self._closed:
            with self._write():
                pass  # _write writes the buffer inside its transaction

    def events(
        self,
        *,
        namespace: str | None = None,
        subject: str | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        self.flush_events()
        sql = (
            "SELECT id, at_ms, kind, namespace, subject, action, actor, execution_id,"
            " fencing_token, detail FROM audit_events WHERE id > ?"
        )
        args: list[Any] = [after_id]
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if subject is not None:
            sql += " AND subject = ?"
            args.append(subject)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._read(lambda c: c.execute(sql, args).fetchall())
        return [
            AuditEvent(
                id=r[0],
                at_ms=r[1],
                kind=EventKind(r[2]),
                namespace=r[3],
                subject=r[4],
                action=r[5],
                actor=r[6],
                execution_id=r[7],
                fencing_token=r[8],
                detail=json.loads(r[9]),
            )
            for r in rows
        ]

    def records(
        self,
        *,
        namespace: str | None = None,
        statuses: Sequence[Status] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Record], int]:
        sql = f"SELECT {COLUMNS} FROM executions WHERE 1 = 1"
        args: list[Any] = []
        if namespace is not None:
            sql += " AND namespace = ?"
            args.append(namespace)
        if statuses is not None:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args.extend(s.value for s in statuses)
        sql += " ORDER BY created_at_ms, namespace, request_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._read(lambda c: c.execute(sql, args).fetchall())
        return [_row_to_record(r) for r in rows], self._clock()

    def close(self) -> None:
        """Write buffered audit events and close every connection this store opened."""
        if self._closed:
            return
        try:
            self.flush_events()
        finally:
            self._closed = True
            self._buffer.detach()
            with self._conns_lock:
                conns, self._conns = self._conns, []
            for conn in conns:
                with suppress(sqlite3.Error):
                    conn.close()
            self._local = threading.local()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
