"""PostgreSQL store: configuration, schema versions, failing closed, and many hosts.

"Many hosts" are separate processes, each with its own connection pool, sharing one
database: what a fleet of workers on several machines looks like to PostgreSQL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from safeagent import (
    ActionPolicy,
    ConfigurationError,
    Guard,
    NotExecuted,
    OutcomeUnknownError,
    ReconcileRequest,
    Reconciliation,
    Status,
    StoreError,
)
from safeagent.audit import verify
from safeagent.errors import SchemaVersionError
from safeagent.stores.postgres import PostgresStore
from tests._workers import append_line, child_env, read_lines, wait_until
from tests.conftest import PG_URL, pg_schema

pytestmark = pytest.mark.usefixtures("postgres_available")


@pytest.fixture
def schema() -> Iterator[str]:
    name = pg_schema()
    yield name
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def _store(schema: str, **kwargs: Any) -> Any:
    return PostgresStore(PG_URL, schema=schema, **kwargs)


def test_dsn_comes_from_the_environment(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dsn=, SAFEAGENT_DATABASE_URL is used; without either, a typed error."""
    monkeypatch.setenv("SAFEAGENT_DATABASE_URL", PG_URL)
    with _store_no_dsn(schema) as store:
        assert Guard(store).execute("r", "a", {}, lambda _ctx: 1).result == 1
    monkeypatch.delenv("SAFEAGENT_DATABASE_URL")
    with pytest.raises(ConfigurationError, match="SAFEAGENT_DATABASE_URL"):
        _store_no_dsn(schema)


def _store_no_dsn(schema: str) -> Any:
    return PostgresStore(schema=schema)


def test_a_guard_opens_a_postgres_url(pg_throwaway_database_url: str) -> None:
    """Guard('postgresql://...') uses the PostgreSQL store (default schema 'safeagent')."""
    guard = Guard(pg_throwaway_database_url)
    try:
        assert type(guard.store).__name__ == "PostgresStore"
        assert guard.store.identity.endswith("/safeagent")
    finally:
        guard.close()


def test_a_guard_opens_a_libpq_keyword_string(
    pg_throwaway_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard('host=... dbname=...') is PostgreSQL, as $SAFEAGENT_DATABASE_URL and the CLI
    read it, not an SQLite file named after the string."""
    info = psycopg.conninfo.conninfo_to_dict(pg_throwaway_database_url)
    monkeypatch.chdir(tmp_path)
    for keywords in (
        " ".join(f"{k}={v}" for k, v in info.items()),
        " ".join(f"{k}={v}" for k, v in reversed(list(info.items()))),  # user=... first
    ):
        guard = Guard(keywords)
        try:
            assert type(guard.store).__name__ == "PostgresStore"
            assert guard.execute("kw", "a", {}, lambda _ctx: 1).result == 1
        finally:
            guard.close()
    assert list(tmp_path.iterdir()) == []


def test_a_newer_schema_stops_older_code(schema: str) -> None:
    """A schema whose version is newer than the code raises SchemaVersionError."""
    _store(schema).close()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {schema}.safeagent_meta SET value = '99' WHERE key = 'schema_version'"
        )
    with pytest.raises(SchemaVersionError, match="version 99"):
        _store(schema)


def test_bad_schema_names_are_rejected() -> None:
    """The schema is an identifier, never SQL."""
    with pytest.raises(ConfigurationError):
        _store("safeagent; DROP TABLE x")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("select", "reserved word"),  # reached the server: a syntax error, a StoreError
        ("User", "reserved word"),
        ("left", "reserved word"),
        ("pg_receipts", r"reserved \(pg_\)"),  # the server refuses pg_ schemas
        ("kelvin_\u212a", "ASCII"),  # Python folds the Kelvin sign to k, PostgreSQL does not
        ("caf\u00e9", "ASCII"),
    ],
)
def test_schema_names_the_server_would_refuse_or_share_are_configuration_errors(
    name: str, why: str
) -> None:
    """Refused before connecting, as the docstring promises (a ConfigurationError, exit 2
    in the CLI), not a database error after: reserved words and ``pg_`` names made a
    syntax error on the server, and non-ASCII names could fold to another schema's name
    here but not there (two tenants in one schema)."""
    with pytest.raises(ConfigurationError, match=why):
        PostgresStore("postgresql://postgres@127.0.0.1:1/test", schema=name, timeout=0.1)


def test_a_row_lock_held_elsewhere_fails_closed_after_the_dsns_lock_timeout(
    schema: str,
) -> None:
    """A session left in a transaction holding a lock on a record's row (an ad-hoc psql
    session) makes a write on that row wait, as any PostgreSQL write does; with
    ``lock_timeout`` in the DSN (docs/guide.md) the claim fails closed with StoreError
    after it, and the side effect does not run."""
    url = PG_URL + ("&" if "?" in PG_URL else "?") + "options=-c%20lock_timeout%3D300ms"
    store = PostgresStore(url, schema=schema)
    guard = Guard(store)
    ran: list[str] = []

    def not_sent(_ctx: Any) -> None:
        raise NotExecuted("validation failed before sending")

    with pytest.raises(NotExecuted):
        guard.execute("r", "charge", {}, not_sent)  # RELEASED: the next call claims the row
    with psycopg.connect(PG_URL) as holder:
        holder.execute(f"SELECT 1 FROM {schema}.executions WHERE request_id = 'r' FOR UPDATE")
        started = time.monotonic()
        with pytest.raises(StoreError):
            guard.execute("r", "charge", {}, lambda _ctx: ran.append("r"))
        assert time.monotonic() - started < 5
        holder.rollback()
    assert ran == []
    assert guard.execute("r", "charge", {}, lambda _ctx: ran.append("r")).replay is False
    assert ran == ["r"]
    store.close()


def test_an_unreachable_database_fails_closed() -> None:
    """No server at the address: StoreError at open, nothing runs."""
    with pytest.raises(StoreError, match=r"cannot reach PostgreSQL within 1\.0 s: .*refused"):
        PostgresStore("postgresql://postgres@127.0.0.1:1/test", schema="x", timeout=1.0)


def test_an_exhausted_pool_says_so_and_runs_nothing(schema: str) -> None:
    """Every pooled connection busy for longer than ``timeout``: a StoreError that names
    the wait and the pool size, and fn does not run."""
    store = _store(schema, max_size=1, timeout=0.3)
    guard = Guard(store)
    ran: list[int] = []
    busy = pytest.raises(StoreError, match=r"within 0\.3 s: all 1 pooled connections are busy")
    with store._connection(), busy:  # the pool's one connection, held
        guard.execute("r-1", "a", {}, lambda _ctx: ran.append(1))
    assert ran == []
    assert guard.execute("r-1", "a", {}, lambda _ctx: ran.append(1)).replay is False
    assert ran == [1]
    store.close()


def test_a_lost_connection_fails_closed_and_the_next_call_recovers(schema: str) -> None:
    """The server drops our connections: StoreError, fn not called; then it works again."""
    store = _store(schema, max_size=2)
    guard = Guard(store)
    guard.execute("warm", "a", {}, lambda _ctx: 1)
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (f"safeagent-{schema}",),
        ).fetchone()
    assert killed is not None
    assert killed[0] >= 1
    calls: list[int] = []
    outcomes: list[str] = []
    for attempt in range(3):
        try:
            guard.execute("r", "a", {}, lambda _ctx, n=attempt: calls.append(n) or "done")
            outcomes.append("ok")
            break
        except StoreError:
            outcomes.append("store-error")
    # Either the pool noticed the dead connection before use, or the call failed closed
    # first; never did fn run without a recorded claim, and never twice.
    assert outcomes[-1] == "ok"
    assert len(calls) == 1
    assert guard.get("r").result == "done"  # type: ignore[union-attr]
    guard.close()
    store.close()


def test_claim_durable_mode_commits_the_completion_asynchronously(schema: str) -> None:
    """claim-durable records and replays like durable mode (completion with sync commit off)."""
    store = _store(schema, durability="claim-durable")
    guard = Guard(store)
    calls: list[int] = []
    guard.execute("r", "a", {}, lambda _ctx: calls.append(1) or "ok")
    assert guard.execute("r", "a", {}, lambda _ctx: calls.append(1) or "ok").replay
    assert calls == [1]
    store.close()


def test_leases_are_judged_by_the_database_clock(schema: str) -> None:
    """Lease instants come from the server: the claim time matches the server's clock."""
    store = _store(schema)
    receipt = Guard(store).execute("r", "a", {}, lambda _ctx: 1)
    with psycopg.connect(PG_URL) as conn:
        row = conn.execute(
            "SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint"
        ).fetchone()
    assert row is not None
    assert abs(int(row[0]) - receipt.claimed_at_ms) < 5_000
    store.close()


def _indexes(schema: str) -> set[str]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)
        ).fetchall()
    return {name for (name,) in rows}


def _version_3_schema(schema: str, subjects: list[str]) -> None:
    """A schema as SafeAgent's schema version 3 made it: 16 chains, holding a CONFLICT
    event (it implies no execution record) for each of ``subjects``, chained by 16 as
    that release chained them."""
    from safeagent._audit import AuditEvent, EventKind
    from safeagent.stores import _pg_sql
    from safeagent.stores._rows import GENESIS, chain_rows, shard_of

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(
            f"CREATE TABLE {schema}.safeagent_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        for statements in _pg_sql.MIGRATIONS[:3]:
            for statement in statements:
                conn.execute(statement.replace("{s}", schema))
        conn.execute(f"DELETE FROM {schema}.audit_chain WHERE shard >= 16")  # what it made
        conn.execute(f"INSERT INTO {schema}.safeagent_meta VALUES ('schema_version', '3')")
        heads: dict[int, tuple[int, str]] = dict.fromkeys(range(16), (0, GENESIS))
        for at, subject in enumerate(subjects, 1):
            event = AuditEvent(EventKind.CONFLICT, at, "default", subject, detail={"n": at})
            rows = chain_rows([event], heads, [shard_of("default", subject, 16)])
            conn.execute(_pg_sql.EVENT.replace("{s}", schema), rows[0])


def _previous_release(schema: str) -> None:
    """A schema as the releases before the index was dropped left it: version 3, 16 chains
    holding 20 events, and the audit_events_chain index migration 2 made."""
    _version_3_schema(schema, [f"old-{i}" for i in range(20)])
    assert "audit_events_chain" in _indexes(schema)


def _lock_holders(schema: str) -> list[tuple[Any, ...]]:
    """Other sessions' advisory locks and locks on ``schema``'s tables, with what they run."""
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        return conn.execute(
            "SELECT l.pid, l.locktype, l.mode, l.granted, a.state, a.backend_type,"
            " left(a.query, 80) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid)"
            " WHERE l.pid <> pg_backend_pid() AND (l.locktype = 'advisory' OR l.relation IN"
            " (SELECT oid FROM pg_class WHERE relnamespace = %s::regnamespace))",
            (schema,),
        ).fetchall()


def _schema_version(schema: str) -> str:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT value FROM {schema}.safeagent_meta WHERE key = 'schema_version'"
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_a_new_schema_has_no_chain_index(schema: str) -> None:
    """A schema made by this release has the per-request audit index but not
    audit_events_chain: no event pays for an index entry only verification used."""
    with _store(schema) as store:
        Guard(store).execute("r", "charge", {}, lambda _ctx: 1)
        assert verify(store).ok
    assert "audit_events_subject" in _indexes(schema)
    assert "audit_events_chain" not in _indexes(schema)


def test_opening_drops_the_previous_releases_chain_index_and_keeps_the_version(
    schema: str,
) -> None:
    """A schema of the previous release loses audit_events_chain when opened, its chains
    still verify and grow, and its schema version is unchanged, so the previous release's
    processes sharing it still open it."""
    _previous_release(schema)
    version = _schema_version(schema)
    with _store(schema) as store:
        if "audit_events_chain" in _indexes(schema):
            # Left for a later open, as _drop_indexes documents, when another session held
            # its try-lock or the table past 200 ms (seen once in a full CI run): name the
            # sessions, and open once more, which must drop it.
            holders = _lock_holders(schema)
            _store(schema).close()
            assert "audit_events_chain" not in _indexes(schema), holders
        assert verify(store).ok
        guard = Guard(store)
        for i in range(20):
            guard.execute(f"new-{i}", "charge", {"i": i}, lambda _ctx: 1)
        report = verify(store)
        assert report.ok, report.problems
        assert report.events_checked == 20 + 2 * 20  # the old events; claimed and succeeded
    assert _schema_version(schema) == version == "3"


def test_a_store_already_open_keeps_writing_when_another_drops_the_chain_index(
    schema: str,
) -> None:
    """A process that opened the schema while it had the index (its statements prepared
    with it, as the previous release's are) goes on writing after another process's open
    drops it, and the whole trail verifies."""
    with _store(schema) as old:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"CREATE INDEX audit_events_chain ON {schema}.audit_events (shard, seq)")
        guard = Guard(old)
        for i in range(10):  # psycopg prepares a statement on its 5th use on a connection
            guard.execute(f"before-{i}", "charge", {"i": i}, lambda _ctx: 1)
        _store(schema).close()
        assert "audit_events_chain" not in _indexes(schema)
        for i in range(10):
            guard.execute(f"after-{i}", "charge", {"i": i}, lambda _ctx: 1)
        report = verify(old)
        assert report.ok, report.problems
        assert report.events_checked == 2 * 20


def _open_at_once(
    schema: str, n: int, keep: Callable[[Any], Any]
) -> tuple[list[Any], list[BaseException]]:
    """``n`` stores (each with its own connection, as processes have) opened on ``schema``
    at once, each passed to ``keep``: what ``keep`` returned, and what the opens raised."""
    start = threading.Barrier(n)
    kept: list[Any] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        start.wait()
        try:
            kept.append(keep(_store(schema, min_size=1, max_size=1)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return kept, errors


def test_many_processes_opening_at_once_drop_the_chain_index(schema: str) -> None:
    """Sixteen stores (each with its own connections, as processes have) open a previous
    release's schema at once: every open succeeds and the index is gone."""
    _previous_release(schema)
    opened, errors = _open_at_once(schema, 16, lambda store: store)
    for store in opened:
        store.close()
    assert errors == []
    assert len(opened) == 16
    assert "audit_events_chain" not in _indexes(schema)


def test_a_long_reader_delays_neither_opening_nor_writers(schema: str) -> None:
    """While a long transaction reads the audit table (a verification, pg_dump), an open
    gives up dropping the index after a moment instead of queueing every writer behind its
    table lock; it opens, writes go on, and a later open drops the index."""
    _previous_release(schema)
    opened: list[Any] = []
    with psycopg.connect(PG_URL) as reader:
        reader.execute(f"SELECT count(*) FROM {schema}.audit_events")  # holds its lock
        opening = threading.Thread(target=lambda: opened.append(_store(schema)))
        opening.start()
        opening.join(5.0)
        try:
            assert opened, "the open waited for the long reader"
            assert "audit_events_chain" in _indexes(schema)
            Guard(opened[0]).execute("during", "charge", {}, lambda _ctx: 1)
        finally:
            reader.rollback()  # a stuck open goes on: the test fails instead of hanging
            opening.join()
            for store in opened:
                store.close()
    with _store(schema) as store:
        assert verify(store).ok
    assert "audit_events_chain" not in _indexes(schema)


def test_a_short_statement_timeout_does_not_fail_the_open(schema: str) -> None:
    """A session whose statement_timeout is shorter than the drop's lock wait has its
    DROP INDEX cancelled while a long reader holds the table: the open still succeeds
    (the index is left for a later open), as it did before the index was dropped."""
    _previous_release(schema)
    dsn = psycopg.conninfo.make_conninfo(PG_URL, options="-c statement_timeout=100")
    with psycopg.connect(PG_URL) as reader:
        reader.execute(f"SELECT count(*) FROM {schema}.audit_events")  # holds its lock
        try:
            store = PostgresStore(dsn, schema=schema)
            try:
                assert Guard(store).execute("r", "charge", {}, lambda _ctx: 1).result == 1
            finally:
                store.close()
            assert "audit_events_chain" in _indexes(schema)
        finally:
            reader.rollback()


def test_a_role_that_does_not_own_the_index_still_opens(schema: str) -> None:
    """An application role that may use the tables but does not own them (they were made
    by another role) cannot drop the index: its store opens and works anyway."""
    _previous_release(schema)
    role = schema + "_app"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT CREATE ON DATABASE {admin.info.dbname} TO {role}")
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}")
        admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
        admin.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
    try:
        dsn = psycopg.conninfo.make_conninfo(PG_URL, user=role)
        with PostgresStore(dsn, schema=schema) as store:
            assert Guard(store).execute("app", "charge", {}, lambda _ctx: 1).result == 1
        assert "audit_events_chain" in _indexes(schema)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


HOST = textwrap.dedent(
    """
    import json, os, random, sys, time
    from safeagent import Guard, InProgressError, OutcomeUnknownError
    from safeagent.stores.postgres import PostgresStore
    from tests._workers import append_line

    args = json.loads(sys.argv[1])
    store = PostgresStore(args["url"], schema=args["schema"], max_size=4)
    guard = Guard(store, lease=args["lease"], wait=30)
    ids = list(range(args["n"]))
    random.Random(args["seed"]).shuffle(ids)
    while not os.path.exists(args["go"]):
        time.sleep(0.005)
    seen = {}
    for i in ids:
        rid = f"id-{i}"

        def effect(ctx, rid=rid):
            if args.get("slow_after") is not None and len(seen) >= args["slow_after"]:
                append_line(args["started"], rid)
                time.sleep(60)  # killed here, mid-effect
            append_line(args["ledger"], rid)
            return {"rid": rid}

        try:
            seen[rid] = guard.execute(rid, "effect", {"i": i}, effect).execution_id
        except OutcomeUnknownError:
            seen[rid] = "in-doubt"
    with open(args["out"], "w") as fh:
        json.dump(seen, fh)
    """
)


def _spawn(tmp_path: Path, name: str, schema: str, **extra: Any) -> subprocess.Popen[bytes]:
    args = {
        "url": PG_URL,
        "schema": schema,
        "n": 500,
        "lease": 2.0,
        "go": str(tmp_path / "go"),
        "ledger": str(tmp_path / "ledger.txt"),
        "started": str(tmp_path / "started.txt"),
        "out": str(tmp_path / f"{name}.json"),
        "seed": hash(name) % 1000,
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-c", HOST, json.dumps(args)], env=child_env(), cwd=str(tmp_path)
    )


@pytest.mark.slow
def test_three_hosts_race_over_500_ids_and_one_is_killed(tmp_path: Path, schema: str) -> None:
    """Three processes with their own pools race over 500 shared ids: exactly 500 effects.
    One is SIGKILLed mid-effect: its claim reads in doubt after the lease, and a reconcile
    hook that asks the ledger resolves it; no id ever has two effects."""
    _store(schema).close()  # migrate once up front
    hosts = [_spawn(tmp_path, f"host-{i}", schema) for i in range(2)]
    victim = _spawn(tmp_path, "victim", schema, slow_after=40)
    (tmp_path / "go").touch()
    try:
        assert wait_until(lambda: read_lines(tmp_path / "started.txt") != [], timeout=60)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        for host in hosts:
            assert host.wait(120) == 0
    finally:
        for proc in (*hosts, victim):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    ledger = read_lines(tmp_path / "ledger.txt")
    assert len(ledger) == len(set(ledger)), "an id had two effects"
    killed = read_lines(tmp_path / "started.txt")
    assert len(killed) == 1
    doomed = killed[0]
    assert doomed not in ledger  # killed before its effect
    assert len(ledger) == 499

    def reconcile(req: ReconcileRequest) -> Reconciliation:
        lines = read_lines(tmp_path / "ledger.txt")
        if req.request_id in lines:
            return Reconciliation.happened({"rid": req.request_id})
        return Reconciliation.not_happened(note="no effect in the ledger")

    store = _store(schema)
    plain = Guard(store)
    time.sleep(2.1)  # the victim's lease (2 s) runs out on the database's clock
    with pytest.raises(OutcomeUnknownError) as info:
        plain.execute(doomed, "effect", {"i": int(doomed.split("-")[1])}, lambda _ctx: 1 / 0)
    assert info.value.attempt == 1
    assert doomed in [r.request_id for r in plain.in_doubt()]

    def effect(_ctx: Any) -> dict[str, str]:
        append_line(tmp_path / "ledger.txt", doomed)
        return {"rid": doomed}

    healer = Guard(store, actions={"effect": ActionPolicy(reconcile=reconcile)})
    report = healer.reconcile()
    assert (report.checked, report.not_happened) == (1, 1)
    receipt = healer.execute(doomed, "effect", {"i": int(doomed.split("-")[1])}, effect)
    assert receipt.result == {"rid": doomed}
    ledger = read_lines(tmp_path / "ledger.txt")
    assert sorted(ledger) == sorted(f"id-{i}" for i in range(500))
    assert healer.in_doubt() == []
    store.close()


def test_schema_names_are_limited_to_postgresql_identifier_bytes() -> None:
    """PostgreSQL keeps the first 63 bytes of an identifier: two names that differ only
    after them would share one schema, so one tenant would replay another's receipts.
    Refused before anything is created (names are ASCII, so bytes are characters)."""
    base = "s" * 63
    for name in (base + "_tenant_a", base + "_tenant_b", "x" * 64):
        with pytest.raises(ConfigurationError, match="63"):
            PostgresStore(PG_URL, schema=name)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        made = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE %s", (base[:20] + "%",)
        ).fetchone()
    assert made == (0,)


def test_a_schema_name_of_63_bytes_and_its_case_folding() -> None:
    """At the limit the store works; names are folded to lower case as PostgreSQL folds
    unquoted identifiers, so "Tenant_A" and "tenant_a" are the same schema (documented)."""
    name = pg_schema()[:40]
    name = name + "x" * (63 - len(name))
    assert len(name.encode()) == 63
    store = PostgresStore(PG_URL, schema=name)
    upper = PostgresStore(PG_URL, schema=name.upper())
    try:
        assert upper.schema == store.schema == name
        guard = Guard(store)
        assert guard.execute("r", "a", {}, lambda _ctx: "first").result == "first"
        receipt = Guard(upper).execute("r", "a", {}, lambda _ctx: "second")
        assert (receipt.result, receipt.replay) == ("first", True)
    finally:
        upper.close()
        store.close()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


# -- the number of audit chains ----------------------------------------------------------------


def _meta(schema: str, key: str) -> str | None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT value FROM {schema}.safeagent_meta WHERE key = %s", (key,)
        ).fetchone()
    return None if row is None else str(row[0])


def _event_shards(schema: str) -> set[int]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        rows = conn.execute(f"SELECT DISTINCT shard FROM {schema}.audit_events").fetchall()
    return {int(shard) for (shard,) in rows}


def test_a_new_schema_has_256_chains_and_anchors_them_all(schema: str) -> None:
    """A schema this release makes has NEW_CHAIN_SHARDS (256) chains, stored in
    safeagent_meta: subjects spread over all of them (concurrent writers rarely share a
    head), every head is anchored, and the trail verifies with the key."""
    from safeagent.audit import anchor
    from safeagent.stores._pg_sql import NEW_CHAIN_SHARDS

    with _store(schema) as store:
        assert store.chain_shards == NEW_CHAIN_SHARDS == 256
        guard = Guard(store)
        for i in range(300):
            guard.execute(f"r-{i}", "charge", {"i": i}, lambda _ctx: 1)
        guard.close()
        signed = anchor(store, key=b"k" * 32)
        assert len(signed.heads) == 256
        report = verify(store, key=b"k" * 32)
        assert report.ok, report.problems
        assert report.events_checked == 600
    assert _meta(schema, "chain_shards") == "256"
    shards = _event_shards(schema)
    assert max(shards) < 256
    assert len(shards) > 150  # 300 subjects over 256 chains: ~200 distinct, never <= 16
    with _store(schema) as again:  # another process opening it reads the same number
        assert again.chain_shards == 256


def test_a_schema_made_by_version_3_keeps_its_16_chains_and_its_version(schema: str) -> None:
    """Opening a version 3 schema keeps its 16 chains (moving a subject to another chain
    would make its earlier events look misplaced), so its old events verify and every new
    event is chained by 16 too, as the previous release chains them; its version stays 3
    and nothing is added to safeagent_meta, so the previous release still opens it."""
    from safeagent.stores._rows import shard_of

    old = [f"old-{i}" for i in range(40)]
    assert any(shard_of("default", s, 16) != shard_of("default", s, 256) for s in old)
    _version_3_schema(schema, old)
    with _store(schema) as store:
        assert store.chain_shards == 16
        report = verify(store)
        assert report.ok, report.problems
        assert report.events_checked == 40
        guard = Guard(store)
        for i in range(60):
            guard.execute(f"new-{i}", "charge", {"i": i}, lambda _ctx: 1)
        guard.close()
        report = verify(store)
        assert report.ok, report.problems
        assert report.events_checked == 40 + 120
    assert _event_shards(schema) <= set(range(16))
    assert _meta(schema, "chain_shards") is None
    assert _schema_version(schema) == "3"


@pytest.mark.parametrize("made", ["new", "version 3"])
def test_processes_opening_at_once_agree_on_the_number_of_chains(schema: str, made: str) -> None:
    """Eight stores (each with its own connections, as processes have) open a schema at
    once, a new one or a version 3 one: each gets the same number of chains (256, or 16),
    the head rows are exactly those chains, and the version is 4, or still 3."""
    if made == "version 3":
        _version_3_schema(schema, ["a", "b"])
    expected = 256 if made == "new" else 16

    def number(store: Any) -> int:
        store.close()
        return int(store.chain_shards)

    numbers, errors = _open_at_once(schema, 8, number)
    assert errors == []
    assert numbers == [expected] * 8
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        shards = [r[0] for r in conn.execute(f"SELECT shard FROM {schema}.audit_chain")]
    assert sorted(shards) == list(range(expected))
    assert _schema_version(schema) == ("4" if made == "new" else "3")


# the last: "16" in fullwidth digits, which str.isdigit() accepts
@pytest.mark.parametrize("stored", [None, "", "abc", "0", "-1", "4097", "\uff11\uff16", "9" * 5000])
def test_a_schema_without_a_valid_number_of_chains_is_not_opened(
    schema: str, stored: str | None
) -> None:
    """Without a valid stored number of chains, a store cannot know which chain a subject's
    events go on: opening it raises StoreError (nothing is written), naming the key."""
    with _store(schema):
        pass
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        if stored is None:
            conn.execute(f"DELETE FROM {schema}.safeagent_meta WHERE key = 'chain_shards'")
        else:
            conn.execute(
                f"UPDATE {schema}.safeagent_meta SET value = %s WHERE key = 'chain_shards'",
                (stored,),
            )
    with pytest.raises(StoreError, match="chain_shards"):
        _store(schema)


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE {s}.safeagent_meta SET value = '16' WHERE key = 'chain_shards'",
        "UPDATE {s}.safeagent_meta SET value = '3' WHERE key = 'schema_version'",
        "INSERT INTO {s}.audit_chain VALUES (300, 0, 'x')",
    ],
    ids=["number-lowered", "version-lowered", "head-added"],
)
def test_a_schema_with_a_head_beyond_its_chains_is_read_not_written(schema: str, edit: str) -> None:
    """A 256-chain schema whose stored number of chains (or version, which implies 16) was
    lowered by hand, or with a head added beyond its chains: it opens, verify reports the
    heads beyond (head_mismatch), and every write raises StoreError naming the head before
    anything runs, so no event goes on another chain than its subject's earlier ones."""
    with _store(schema) as store:
        guard = Guard(store)
        for i in range(20):
            guard.execute(f"r-{i}", "charge", {"i": i}, lambda _ctx: 1)
        guard.close()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(edit.replace("{s}", schema))
    ran: list[str] = []
    store = _store(schema)
    report = verify(store)
    assert "head_mismatch" in {p.kind for p in report.problems}, report.problems
    assert not report.ok
    guard = Guard(store)
    with pytest.raises(StoreError, match=r"a chain head for chain (255|300)"):
        guard.execute("new", "charge", {}, lambda _ctx: ran.append("new"))
    assert store.get("default", "new")[0] is None
    assert guard.execute("r-1", "charge", {"i": 1}, lambda _ctx: 2).result == 1  # replay
    # reads go on with the replay's event still buffered, verify included
    assert [e.kind.value for e in guard.audit_trail("r-1")] == ["claimed", "succeeded"]
    assert not verify(store).ok
    record, _ = store.get("default", "r-1")
    assert record is not None
    with pytest.raises(StoreError, match=r"a chain head for chain (255|300)"):
        store.renew("default", "r-1", record.fencing_token, 60_000)
    store._fast_path = True  # the refusal does not hang on the fast path's switch
    with pytest.raises(StoreError, match=r"a chain head for chain (255|300)"):
        guard.execute("new-2", "charge", {}, lambda _ctx: ran.append("new-2"))
    with pytest.raises(StoreError, match=r"a chain head for chain (255|300)"):
        store.close()  # the replay's buffered event cannot be written either
    assert ran == []
    with _store(schema) as again:
        assert again.get("default", "new")[0] is None
        assert again.get("default", "new-2")[0] is None


def test_a_version_3_schema_missing_a_head_still_has_16_chains(schema: str) -> None:
    """The number is the version's, not the rows': a version 3 schema whose chain 15 head
    was deleted by hand opens with 16 chains, and verification reports that one head
    (were it 15 chains, every subject would seem to be on the wrong chain)."""
    from safeagent.stores._rows import shard_of

    subjects = ["b", "c", "d"]
    assert 15 not in {shard_of("default", s, 16) for s in subjects}  # chain 15 is empty
    _version_3_schema(schema, subjects)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DELETE FROM {schema}.audit_chain WHERE shard = 15")
        assert conn.execute(f"SELECT count(*) FROM {schema}.audit_chain").fetchone() == (15,)
    with _store(schema) as store:
        assert store.chain_shards == 16
        report = verify(store)
    assert [(p.kind, p.shard) for p in report.problems] == [("head_mismatch", 15)]


def test_a_schema_without_chains_gets_256_when_they_begin(schema: str) -> None:
    """A version 1 schema (no chains yet) migrated by this release begins its chains with
    256, as a new schema does."""
    from safeagent.stores import _pg_sql

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(
            f"CREATE TABLE {schema}.safeagent_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        for statement in _pg_sql.MIGRATIONS[0]:
            conn.execute(statement.replace("{s}", schema))
        conn.execute(f"INSERT INTO {schema}.safeagent_meta VALUES ('schema_version', '1')")
    with _store(schema) as store:
        assert store.chain_shards == 256
        Guard(store).execute("r", "charge", {}, lambda _ctx: 1)
        report = verify(store)
        assert report.ok, report.problems
    assert _meta(schema, "chain_shards") == "256"


def _read_only(url: str) -> str:
    """``url`` whose sessions begin read-only, as on a hot standby."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    options = "-c default_transaction_read_only=on"
    return make_conninfo("", **{**conninfo_to_dict(url), "options": options})


def test_a_store_opens_on_a_read_only_database_and_fails_closed_on_writes(schema: str) -> None:
    """An up-to-date schema opens without writing (a read-only database, such as a hot
    standby, used to refuse the open: the migration step always ran CREATE SCHEMA):
    reads, replays, listings and verify answer, verify and close after a replay too (its
    event, which the database cannot hold, is not kept); a new call fails closed before
    fn runs, saying why, and its claim is nowhere. A schema still to be created fails the
    open with StoreError."""
    writer = _store(schema)
    guard = Guard(writer)
    guard.execute("paid", "charge", {"amount": 5}, lambda _ctx: "ch_1")
    guard.close()
    events = len(writer.events())

    store = PostgresStore(_read_only(PG_URL), schema=schema)
    try:
        assert store.chain_shards == writer.chain_shards
        record, _ = store.get("default", "paid")
        assert record is not None
        assert record.status is Status.SUCCEEDED
        assert [r.request_id for r in store.records()[0]] == ["paid"]
        assert verify(store).ok
        reader = Guard(store, wait=0)
        for _ in range(3):
            replay = reader.execute("paid", "charge", {"amount": 5}, lambda _ctx: "ch_2")
            assert (replay.replay, replay.result) == (True, "ch_1")
        assert verify(store).ok  # used to raise: the replays' buffered events were flushed
        ran: list[int] = []
        with pytest.raises(StoreError, match="read-only"):
            reader.execute("new", "charge", {"amount": 6}, lambda _ctx: ran.append(1))
        assert ran == []
        assert store.get("default", "new")[0] is None
    finally:
        store.close()  # used to raise: nothing it cannot write is kept
    assert len(writer.events()) == events
    writer.close()
    with pytest.raises(StoreError, match="read-only"):
        PostgresStore(_read_only(PG_URL), schema=schema + "_new")


def test_opening_an_up_to_date_schema_waits_for_no_migration_lock(schema: str) -> None:
    """A schema at the current version opens without taking the migration lock, so
    hosts restarting together do not queue behind one another (nor behind a migrator of
    another schema holding it)."""
    _store(schema).close()
    with psycopg.connect(PG_URL, autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (0x5AFE_A6E7,))
        opened: list[Any] = []

        def open_it() -> None:
            opened.append(_store(schema))

        thread = threading.Thread(target=open_it, daemon=True)
        thread.start()
        thread.join(10)
        while_held = bool(opened)
        holder.execute("ROLLBACK")
        thread.join(10)
    for store in opened:
        store.close()
    assert while_held, "the open waited for the migration lock"
