"""The PostgreSQL store's schema: its name, creation, migration and checks at open.

``_check_schema`` (the schema name as PostgreSQL will fold it), and ``_PgSchema``: what
``PostgresStore.__init__`` runs to open a schema (``_migrate``): the stored version
read (a newer one refused), the numbered migrations of :mod:`safeagent.stores._pg_sql`
run under an advisory lock when needed, the number of audit chains read and checked,
a read-only database or a chain head beyond the chains noted (the store then writes
nothing), and obsolete indexes dropped without holding up writers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from safeagent.errors import ConfigurationError, SchemaVersionError, StoreError
from safeagent.stores import _pg_sql as q
from safeagent.stores._base import stored_number, stored_version
from safeagent.stores._pg_events import _PgEvents
from safeagent.stores._rows import CHAIN_SHARDS

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


def _read_only(cur: psycopg.Cursor[Any]) -> bool:
    """Whether this session's transactions are read-only (a hot standby, or
    ``default_transaction_read_only``)."""
    cur.execute("SHOW transaction_read_only")
    row = cur.fetchone()
    return row is not None and row[0] == "on"


class _PgSchema(_PgEvents):
    """Opening the schema: create or migrate it, and check it (module docstring)."""

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
