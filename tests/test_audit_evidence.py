"""Tamper evidence (hash chains + HMAC anchors), export, stats, and retention tombstones."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import sqlite3
from contextlib import closing
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeagent import (
    AuditEvent,
    ConfigurationError,
    EventKind,
    FingerprintMismatchError,
    Guard,
    OutcomeUnknownError,
    ReceiptPurgedError,
    SQLiteStore,
    Status,
    StoreError,
)
from safeagent.audit import anchor, export, load_key, stats, verify
from safeagent.retention import purge
from safeagent.stores._rows import CHAIN_SHARDS, COLUMNS, shard_of
from tests.conftest import PG_URL, FakeClock, Ledger, pg_schema, require_postgres

KEY = b"k" * 32


def _busy(guard: Any, n: int = 6) -> None:
    for i in range(n):
        guard.execute(
            f"r-{i}", "charge", {"amount": i, "card": "4242424242424242"}, lambda _ctx: {"ok": True}
        )
        guard.execute(
            f"r-{i}", "charge", {"amount": i, "card": "4242424242424242"}, lambda _ctx: {"ok": True}
        )


def test_an_untouched_trail_verifies(guard: Any) -> None:
    """A fresh trail on any store verifies, and a signed anchor checks out with its key."""
    _busy(guard)
    guard.close()
    report = verify(guard.store)
    assert report.ok, report.problems
    assert report.events_checked >= 18
    anchored = anchor(guard.store, key=KEY)
    assert anchored.heads
    report = verify(guard.store, key=KEY)
    assert report.ok
    assert (report.anchors_checked, report.anchors_unverified) == (1, 0)
    assert verify(guard.store).anchors_unverified == 1


def _sqlite_guard(tmp_path: Any) -> tuple[Guard, str]:
    path = str(tmp_path / "g.db")
    guard = Guard(SQLiteStore(path))
    _busy(guard)
    guard.close()
    with (
        closing(sqlite3.connect(path)) as conn,
        conn,
    ):  # verification reads the chain with no index on it
        assert conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'audit_events_chain'"
        ).fetchone() == (0,)
    return guard, path


def _tamper(path: str, sql: str, *args: Any) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(sql, args)


def _kinds(report: Any) -> set[str]:
    return {p.kind for p in report.problems}


def test_batched_and_single_appends_extend_the_same_chains(tmp_path: Any) -> None:
    """SQLite appends one event after reading its one chain head and a batch of buffered
    replay events after reading every head: interleaved over every
    shard, they still form one unbroken chain per shard, and the stored heads are the
    chains' last events."""
    path = str(tmp_path / "mixed.db")
    guard = Guard(SQLiteStore(path))
    run = lambda _ctx: {"ok": True}  # noqa: E731
    for i in range(60):
        guard.execute(f"m-{i}", "charge", {"n": i}, run)  # single appends
        if i % 7 == 6:  # a batch of replays goes in ahead of the next claim's own event
            for j in range(i - 6, i + 1):
                guard.execute(f"m-{j}", "charge", {"n": j}, run)
    guard.close()
    report = verify(guard.store)
    assert report.ok, report.problems
    with closing(sqlite3.connect(path)) as conn, conn:
        total = conn.execute("SELECT count(*) FROM audit_events").fetchone()[0]
        replays = conn.execute(
            "SELECT count(*) FROM audit_events WHERE kind = 'replayed'"
        ).fetchone()[0]
        last = dict(
            conn.execute(
                "SELECT shard, hash FROM audit_events AS e WHERE seq ="
                " (SELECT max(seq) FROM audit_events WHERE shard = e.shard)"
            ).fetchall()
        )
        heads = {s: h for s, _, h in conn.execute("SELECT shard, seq, head FROM audit_chain")}
    assert report.events_checked == total == 60 * 2 + replays
    assert replays == 56
    assert len(last) == 16  # every shard was used
    assert {s: heads[s] for s in last} == last


def test_a_batch_for_a_missing_chain_head_is_refused_and_kept(tmp_path: Any) -> None:
    """A batch that would extend a chain whose head row is gone (the schema was altered)
    writes nothing, fails the write, and keeps the buffered events for a later one."""
    path = str(tmp_path / "headless.db")
    store = SQLiteStore(path)
    guard = Guard(store)
    run = lambda _ctx: {"ok": True}  # noqa: E731
    for i in range(3):
        guard.execute(f"h-{i}", "charge", {"n": i}, run)
        guard.execute(f"h-{i}", "charge", {"n": i}, run)  # a buffered replay event
    with closing(sqlite3.connect(path)) as conn, conn:
        before = conn.execute("SELECT count(*) FROM audit_events").fetchone()[0]
        conn.execute("DELETE FROM audit_chain")
    with pytest.raises(StoreError, match="chain head missing"):
        store.flush_events()
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT count(*) FROM audit_events").fetchone()[0] == before
    assert store._buffer  # still held
    store._buffer.take()  # (nothing can be written to this file any more)
    store.close()


def test_an_edited_event_is_found(tmp_path: Any) -> None:
    """Changing one event's detail breaks its hash: 'edited', with the event id."""
    guard, path = _sqlite_guard(tmp_path)
    _tamper(path, "UPDATE audit_events SET detail = '{}' WHERE id = 3")
    report = verify(guard.store)
    assert not report.ok
    assert ("edited", 3) in {(p.kind, p.event_id) for p in report.problems}


def test_a_deleted_event_is_found(tmp_path: Any) -> None:
    """Removing an event leaves a gap in its chain: 'deleted'."""
    guard, path = _sqlite_guard(tmp_path)
    _tamper(path, "DELETE FROM audit_events WHERE id = 2")
    assert "deleted" in _kinds(verify(guard.store))


def test_a_deleted_tail_is_found_against_the_anchor(tmp_path: Any) -> None:
    """Deleting the newest events and fixing the head is caught by the anchor."""
    guard, path = _sqlite_guard(tmp_path)
    anchor(guard.store, key=KEY)
    with closing(sqlite3.connect(path)) as conn, conn:
        shard, seq = conn.execute(
            "SELECT shard, max(seq) FROM audit_events GROUP BY shard ORDER BY 2 DESC LIMIT 1"
        ).fetchone()
        conn.execute("DELETE FROM audit_events WHERE shard = ? AND seq = ?", (shard, seq))
        prev = conn.execute(
            "SELECT hash FROM audit_events WHERE shard = ? AND seq = ?", (shard, seq - 1)
        ).fetchone()[0]
        conn.execute(
            "UPDATE audit_chain SET seq = ?, head = ? WHERE shard = ?", (seq - 1, prev, shard)
        )
    report = verify(guard.store, key=KEY)
    assert "deleted" in _kinds(report)


def test_reordered_events_are_found(tmp_path: Any) -> None:
    """Swapping the places of two events of one chain is found."""
    guard, path = _sqlite_guard(tmp_path)
    with closing(sqlite3.connect(path)) as conn, conn:
        (shard,) = conn.execute(
            "SELECT shard FROM audit_events GROUP BY shard HAVING count(*) >= 2 LIMIT 1"
        ).fetchone()
        (a, sa), (b, sb) = conn.execute(
            "SELECT id, seq FROM audit_events WHERE shard = ? ORDER BY seq LIMIT 2", (shard,)
        ).fetchall()
        conn.execute("UPDATE audit_events SET seq = -1 WHERE id = ?", (a,))
        conn.execute("UPDATE audit_events SET seq = ? WHERE id = ?", (sa, b))
        conn.execute("UPDATE audit_events SET seq = ? WHERE id = ?", (sb, a))
    report = verify(guard.store)
    assert _kinds(report) & {"reordered", "edited"}


def test_renumbered_events_are_found(tmp_path: Any) -> None:
    """Swapping the ids of a request's claimed and succeeded events (ids are the trail's
    display order, and not hashed) makes audit_trail show them out of order: verify
    reports it, with or without the anchor key."""
    key = b"k" * 32
    path = tmp_path / "g.db"
    with Guard(str(path)) as guard:
        guard.execute("ord-1", "charge", {"amount": 5}, lambda _ctx: {"charge_id": "ch_1"})
        anchor(guard.store, key=key)
        assert verify(guard.store, key=key).ok
    with closing(sqlite3.connect(path)) as conn, conn:
        a, b = (
            r[0]
            for r in conn.execute(
                "SELECT id FROM audit_events WHERE subject = 'ord-1' ORDER BY id"
            ).fetchall()[:2]
        )
        conn.execute("UPDATE audit_events SET id = -1 WHERE id = ?", (a,))
        conn.execute("UPDATE audit_events SET id = ? WHERE id = ?", (a, b))
        conn.execute("UPDATE audit_events SET id = ? WHERE id = -1", (b,))
    with Guard(str(path)) as guard:
        kinds = [e.kind.value for e in guard.audit_trail("ord-1")]
        assert kinds[:2] == ["succeeded", "claimed"]  # what the edit shows
        for report in (verify(guard.store, key=key), verify(guard.store)):
            assert [p.kind for p in report.problems] == ["reordered"]
            assert report.problems[0].event_id == a


def test_a_rewritten_chain_is_found_only_with_the_anchor(tmp_path: Any) -> None:
    """An attacker who edits an event and recomputes the whole chain passes the chain
    check, but not the anchor signed with a key they do not hold."""
    from safeagent.stores._rows import GENESIS, chain_hash

    guard, path = _sqlite_guard(tmp_path)
    anchor(guard.store, key=KEY)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE audit_events SET detail = '{\"forged\":true}' WHERE id = 1")
        shards = [r[0] for r in conn.execute("SELECT DISTINCT shard FROM audit_events")]
        for shard in shards:
            prev = GENESIS
            rows = conn.execute(
                "SELECT id, seq, at_ms, kind, namespace, subject, action, actor, execution_id,"
                " fencing_token, detail FROM audit_events WHERE shard = ? ORDER BY seq",
                (shard,),
            ).fetchall()
            for row in rows:
                digest = chain_hash(prev, shard, row[1], row[2:])
                conn.execute(
                    "UPDATE audit_events SET prev_hash = ?, hash = ? WHERE id = ?",
                    (prev, digest, row[0]),
                )
                prev = digest
            conn.execute("UPDATE audit_chain SET head = ? WHERE shard = ?", (prev, shard))
    report = verify(guard.store, key=KEY)
    assert _kinds(report) == {"rewritten"}


def test_a_forged_anchor_is_found(tmp_path: Any) -> None:
    """An anchor signed with another key (or edited) fails its HMAC: 'bad_anchor'."""
    guard, _path = _sqlite_guard(tmp_path)
    anchor(guard.store, key=b"x" * 32)
    assert _kinds(verify(guard.store, key=KEY)) == {"bad_anchor"}


def test_the_trail_verifies_on_postgres_after_concurrent_writers(tmp_path: Any) -> None:
    """Chains stay consistent when several threads write on PostgreSQL at once."""
    require_postgres()
    import threading

    from safeagent.stores.postgres import PostgresStore

    store = PostgresStore(PG_URL, schema=pg_schema(), max_size=12)
    try:
        guard = Guard(store)

        def work(t: int) -> None:
            for i in range(25):
                guard.execute(f"t{t}-{i}", "charge", {"i": i}, lambda _ctx: 1)
                guard.execute(f"shared-{i}", "charge", {"i": i}, lambda _ctx: 1)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        anchor(store, key=KEY)
        report = verify(store, key=KEY)
        assert report.ok, report.problems[:3]
        assert report.events_checked >= 6 * 25 * 2 + 25 * 2
    finally:
        store.drop_schema()
        store.close()


def test_reordered_and_deleted_events_are_found_on_postgres() -> None:
    """On PostgreSQL too, where the server sorts the chain for verification (no index
    serves the order), swapping two events of a chain and deleting one are found."""
    require_postgres()
    import psycopg

    from safeagent.stores.postgres import PostgresStore

    schema = pg_schema()
    store = PostgresStore(PG_URL, schema=schema)
    try:
        _busy(Guard(store))
        assert verify(store).ok
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            row = conn.execute(
                f"SELECT shard FROM {schema}.audit_events GROUP BY shard"
                " HAVING count(*) >= 3 LIMIT 1"
            ).fetchone()
            assert row is not None
            (a, sa), (b, sb), (c, _) = conn.execute(
                f"SELECT id, seq FROM {schema}.audit_events WHERE shard = %s ORDER BY seq",
                (row[0],),
            ).fetchall()[:3]
            conn.execute(f"UPDATE {schema}.audit_events SET seq = -1 WHERE id = %s", (a,))
            conn.execute(f"UPDATE {schema}.audit_events SET seq = %s WHERE id = %s", (sa, b))
            conn.execute(f"UPDATE {schema}.audit_events SET seq = %s WHERE id = %s", (sb, a))
            assert _kinds(verify(store)) & {"reordered", "edited"}
            conn.execute(f"UPDATE {schema}.audit_events SET seq = %s WHERE id = %s", (sa, a))
            conn.execute(f"UPDATE {schema}.audit_events SET seq = %s WHERE id = %s", (sb, b))
            assert verify(store).ok
            conn.execute(f"DELETE FROM {schema}.audit_events WHERE id = %s", (c,))
            assert "deleted" in _kinds(verify(store))
    finally:
        store.drop_schema()
        store.close()


def test_load_key_reads_env_or_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key comes from a file or SAFEAGENT_AUDIT_KEY; short or missing keys are refused."""
    key_file = tmp_path / "key"
    key_file.write_bytes(b"0123456789abcdef0123\n")
    assert load_key(path=str(key_file)) == b"0123456789abcdef0123"
    monkeypatch.setenv("SAFEAGENT_AUDIT_KEY", "s" * 20)
    assert load_key() == b"s" * 20
    monkeypatch.setenv("SAFEAGENT_AUDIT_KEY", "short")
    with pytest.raises(ConfigurationError):
        load_key()


def _edit_record(store: Any, request_id: str, **columns: Any) -> None:
    """Change a stored execution record behind the guard's back, as someone with write
    access to the database would (``columns``: column -> value)."""
    if isinstance(store, SQLiteStore):
        sets = ", ".join(f"{c} = ?" for c in columns)
        with closing(sqlite3.connect(store.path)) as conn, conn:
            conn.execute(
                f"UPDATE executions SET {sets} WHERE request_id = ?",
                (*columns.values(), request_id),
            )
    elif type(store).__name__ == "PostgresStore":
        import psycopg

        sets = ", ".join(f"{c} = %s" for c in columns)
        with psycopg.connect(store.dsn, autocommit=True) as conn:
            conn.execute(
                f"UPDATE {store.schema}.executions SET {sets} WHERE request_id = %s",
                (*columns.values(), request_id),
            )
    else:  # MemoryStore
        fields = {"result": "result_json"}
        key = ("default", request_id)
        record = store._records[key]
        changes = {fields.get(c, c): v for c, v in columns.items() if c != "error_message"}
        if "error_message" in columns:
            changes["error"] = type(record.error)(record.error.type, columns["error_message"])
        if "status" in changes:
            changes["status"] = Status(changes["status"])
        store._records[key] = dataclasses.replace(record, **changes)


def _delete_record(store: Any, request_id: str) -> None:
    if isinstance(store, SQLiteStore):
        with closing(sqlite3.connect(store.path)) as conn, conn:
            conn.execute("DELETE FROM executions WHERE request_id = ?", (request_id,))
    elif type(store).__name__ == "PostgresStore":
        import psycopg

        with psycopg.connect(store.dsn, autocommit=True) as conn:
            conn.execute(
                f"DELETE FROM {store.schema}.executions WHERE request_id = %s", (request_id,)
            )
    else:
        del store._records[("default", request_id)]


def test_a_receipt_turned_back_deleted_or_forged_is_found(guard: Any, clock: FakeClock) -> None:
    """Edits that would make a retry charge again, or hand it a made-up receipt: a
    SUCCEEDED record set back to RELEASED (the next call would run fn), a record deleted,
    and an in-doubt record marked SUCCEEDED with a forged result. The last event that
    changed each request says otherwise, and verify reports it."""
    for rid in ("released", "deleted"):
        guard.execute(rid, "charge", {"r": rid}, lambda _ctx: {"charge": "ch_1"})

    def unknown(_ctx: Any) -> None:
        raise TimeoutError("no answer")

    with pytest.raises(TimeoutError):
        guard.execute("doubt", "charge", {}, unknown, outcome_unknown=(TimeoutError,))
    guard.close()
    assert verify(guard.store).ok
    _edit_record(guard.store, "released", status="RELEASED")
    _delete_record(guard.store, "deleted")
    _edit_record(guard.store, "doubt", status="SUCCEEDED", result='{"charge":"ch_FAKE"}')
    report = verify(guard.store)
    assert _kinds(report) == {"receipt_edited"}
    assert {p.detail.split("'")[1] for p in report.problems} == {"released", "deleted", "doubt"}
    assert all(p.event_id is not None for p in report.problems)


def test_a_request_re_run_while_verify_reads_it_again_is_not_reported(tmp_path: Any) -> None:
    """verify's second look at a suspicious request reads the record, its events, then the
    record again: a request re-run and finished just as its events are read (after the
    first record read) is read once more, not reported."""
    guard = Guard(SQLiteStore(str(tmp_path / "again.db")))

    def boom(_ctx: Any) -> None:
        raise ValueError("first try fails")

    with pytest.raises(ValueError, match="first try"):
        guard.execute("r", "charge", {}, boom)
    snapshot = guard.store.audit_chain()  # verify's first read: r FAILED
    guard.resolve("r", "rerun", by="ops", reason="retry")  # records read next: RELEASED
    rerun = []

    class ReRunWhileEventsAreRead:
        def __getattr__(self, name: str) -> Any:
            return getattr(guard.store, name)

        def audit_chain(self) -> Any:
            return snapshot

        def events(self, **kwargs: Any) -> Any:
            if not rerun:  # between _read_again's first record read and its events
                rerun.append(guard.execute("r", "charge", {}, lambda _ctx: {"ok": True}))
            return guard.store.events(**kwargs)

    report = verify(ReRunWhileEventsAreRead())
    assert rerun
    assert report.ok, report.problems


def test_an_edited_receipt_is_found(guard: Any, clock: FakeClock) -> None:
    """The event that stores an outcome carries its digest, so verify finds a stored
    result or error edited in the database, on every store and for every way an outcome
    is stored: a completion, a stored failure, an operator's resolution, a reconcile
    hook's answer, and a re-run's new outcome."""
    guard.execute("paid", "charge", {"a": 1}, lambda _ctx: {"charge": "ch_1"})

    def boom(_ctx: Any) -> None:
        raise ValueError("card declined")

    with pytest.raises(ValueError, match="declined"):
        guard.execute("declined", "charge", {"a": 2}, boom)

    def unknown(_ctx: Any) -> None:
        raise TimeoutError("no answer")

    with pytest.raises(TimeoutError):
        guard.execute("doubt", "charge", {"a": 3}, unknown, outcome_unknown=(TimeoutError,))
    guard.resolve("doubt", "succeeded", by="ops", reason="seen in the PSP", result={"c": 3})
    with pytest.raises(ValueError, match="declined"):
        guard.execute("again", "charge", {"a": 4}, boom)
    guard.resolve("again", "rerun", by="ops", reason="card replaced")
    guard.execute("again", "charge", {"a": 4}, lambda _ctx: {"charge": "ch_4"})
    guard.close()
    report = verify(guard.store)
    assert report.ok, report.problems
    assert (report.receipts_checked, report.receipts_unverified) == (4, 0)

    _edit_record(guard.store, "paid", result='{"charge":"ch_EVIL"}')
    _edit_record(guard.store, "declined", error_message="approved")
    _edit_record(guard.store, "doubt", result='{"c":300}')
    _edit_record(guard.store, "again", result="null")
    report = verify(guard.store)
    assert _kinds(report) == {"receipt_edited"}
    assert len(report.problems) == 4
    assert all(p.event_id is not None for p in report.problems)
    assert {p.detail.split("'")[1] for p in report.problems} == {
        "paid",
        "declined",
        "doubt",
        "again",
    }


def test_receipts_without_a_digest_are_unverified_and_tombstones_are_checked(
    tmp_path: Any, clock: FakeClock
) -> None:
    """A finished record whose chained events hold no outcome digest (as a release before
    digests left it) is counted as unverified, not as tampering; a tombstone retention
    left is compared with its events (status, and the retention pass that covers it)."""
    path = str(tmp_path / "old.db")
    guard = Guard(SQLiteStore(path, clock=clock))
    guard.execute("gone", "charge", {}, lambda _ctx: 3)
    clock.advance(3600)
    guard.execute("old", "charge", {}, lambda _ctx: 1)
    guard.execute("new", "charge", {}, lambda _ctx: 1)
    guard.close()
    with (
        closing(sqlite3.connect(path)) as conn,
        conn,
    ):  # "old": its succeeded event without the digest
        event_id, detail = conn.execute(
            "SELECT id, detail FROM audit_events WHERE subject = 'old' AND kind = 'succeeded'"
        ).fetchone()
        stripped = {k: v for k, v in json.loads(detail).items() if k != "outcome_sha256"}
        conn.execute(
            "UPDATE audit_events SET detail = ? WHERE id = ?",
            (json.dumps(stripped, separators=(",", ":")), event_id),
        )
    _rechain(guard.store)  # as that release chained it
    assert purge(guard.store, older_than=1800).tombstoned == 1
    report = verify(guard.store)
    assert report.ok, report.problems
    assert (report.receipts_checked, report.receipts_unverified) == (2, 1)


def test_a_receipt_finished_while_verifying_is_not_reported(tmp_path: Any) -> None:
    """verify reads the events, then the records: a record re-run and finished in between
    meets an older digest in the events it read; it is read again, not reported."""
    guard = Guard(SQLiteStore(str(tmp_path / "race.db")))

    def boom(_ctx: Any) -> None:
        raise ValueError("first try fails")

    with pytest.raises(ValueError, match="first try"):
        guard.execute("r", "charge", {}, boom)
    snapshot = guard.store.audit_chain()  # what verify's first read sees

    class EventsReadEarlier:
        """The real store, except that its chain read returns the earlier snapshot."""

        def __getattr__(self, name: str) -> Any:
            return getattr(guard.store, name)

        def audit_chain(self) -> Any:
            return snapshot

    guard.resolve("r", "rerun", by="ops", reason="retry")
    guard.execute("r", "charge", {}, lambda _ctx: {"ok": True})
    guard.close()
    report = verify(EventsReadEarlier())
    assert report.ok, report.problems
    assert report.receipts_checked == 1


def test_export_redacts_and_stats_count(guard: Any) -> None:
    """Exports (JSONL and CSV) carry every event with secrets redacted; stats count them."""
    _busy(guard, 3)
    with pytest.raises(FingerprintMismatchError):
        guard.execute("r-0", "charge", {"amount": 99}, lambda _ctx: 1)
    guard.close()
    out = io.StringIO()
    written = export(guard.store, out, fmt="jsonl")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert written == len(lines) == 3 * 3 + 1
    assert "4242424242424242" not in out.getvalue()
    buf = io.StringIO()
    export(guard.store, buf, fmt="csv")
    assert len(list(csv.DictReader(io.StringIO(buf.getvalue())))) == written
    counted = stats(guard.store)
    assert (counted.executions, counted.replays, counted.conflicts) == (3, 3, 1)
    assert counted.per_action["charge"]["replays"] == 3


def test_export_keeps_its_own_ids_and_digests_and_redacts_the_rest(sync_guard: Any) -> None:
    """The export redacted whole details: every fencing token field ("token" in its name)
    and each fingerprint or outcome digest whose hex held 13 decimal digits in a row (a
    "card number"), so the exported trail no longer matched its receipts. SafeAgent's own
    fields are exported as stored; a caller's data (the payload) is still redacted, by the
    default hook or by one of the caller's."""
    for i in range(200):
        sync_guard.execute(f"r-{i}", "charge", {"card": "4242424242424242", "i": i}, lambda _c: 1)

    def timeout(_ctx: Any) -> None:
        raise TimeoutError("sent, no answer")

    with pytest.raises(TimeoutError):
        sync_guard.execute("doubt", "charge", {}, timeout, outcome_unknown=(TimeoutError,))
    sync_guard.resolve("doubt", "failed", by="ops", reason="the provider has no charge")
    sync_guard.store.flush_events()
    out = io.StringIO()
    export(sync_guard.store, out, fmt="jsonl")
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert "4242424242424242" not in out.getvalue()
    claims = {r["subject"]: r["detail"] for r in rows if r["kind"] == "claimed"}
    for i in range(200):
        record = sync_guard.get(f"r-{i}")
        assert claims[f"r-{i}"]["fingerprint"] == record.fingerprint
        assert claims[f"r-{i}"]["payload"]["card"] == "[REDACTED]"
    digests = [r["detail"]["outcome_sha256"] for r in rows if r["kind"] == "succeeded"]
    assert len(digests) == 200
    assert all(len(d) == 64 and "[" not in d for d in digests)
    resolved = next(r["detail"] for r in rows if r["kind"] == "resolved")
    assert resolved["previous_fencing_token"] == 1
    seen: list[Any] = []
    export(sync_guard.store, io.StringIO(), redact=lambda d: seen.append(d) or d)
    assert not any("fingerprint" in d or "outcome_sha256" in d for d in seen)
    assert any("payload" in d for d in seen)


def test_purge_leaves_tombstones_that_still_block_retries(guard: Any, clock: FakeClock) -> None:
    """After purge, a retry of a finished request gets ReceiptPurgedError (never runs),
    another payload a conflict; pending and in-doubt records are kept; released deleted."""
    from safeagent import NotExecuted

    ran: list[str] = []
    guard.execute("done", "charge", {"a": 1}, lambda _ctx: ran.append("done") or {"x": 1})

    def released(_ctx: Any) -> None:
        raise NotExecuted

    with pytest.raises(NotExecuted):
        guard.execute("released", "charge", {"a": 2}, released)

    def doubtful(_ctx: Any) -> None:
        raise TimeoutError("the bank did not answer")

    with pytest.raises(TimeoutError):
        guard.execute("doubt", "charge", {"a": 3}, doubtful, outcome_unknown=(TimeoutError,))
    clock.advance(3600)
    report = purge(guard.store, older_than=60)
    assert (report.tombstoned, report.released, report.kept_in_doubt) == (1, 1, 1)
    cleared = guard.get("released")
    assert cleared is not None
    assert (cleared.payload, cleared.error.message if cleared.error else "") == (None, "")
    with pytest.raises(ReceiptPurgedError) as info:
        guard.execute("done", "charge", {"a": 1}, lambda _ctx: ran.append("again"))
    assert info.value.receipt.status is Status.SUCCEEDED
    assert info.value.receipt.result is None
    assert info.value.receipt.purged_at_ms == clock()  # marked: not a fn that returned None
    tombstone = guard.get("done")
    assert tombstone is not None
    assert tombstone.purged_at_ms == clock()
    assert tombstone.to_dict()["purged_at_ms"] == clock()
    kept = guard.get("doubt")
    assert kept is not None
    assert kept.purged_at_ms is None
    with pytest.raises(FingerprintMismatchError):
        guard.execute("done", "charge", {"a": 9}, lambda _ctx: ran.append("other"))
    assert ran == ["done"]
    with pytest.raises(OutcomeUnknownError):
        guard.execute("doubt", "charge", {"a": 3}, lambda _ctx: ran.append("doubt"))
    guard.execute("released", "charge", {"a": 2}, lambda _ctx: ran.append("released"))
    assert ran == ["done", "released"]
    events = [e for e in guard.audit_trail(all_namespaces=True) if e.kind is EventKind.PURGED]
    assert events
    assert events[0].detail["tombstoned"] == 1


_chain_fields = st.one_of(
    st.none(),
    st.text(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(
    prev=st.text(),
    shard=st.integers(min_value=0, max_value=2**31),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    row=st.lists(_chain_fields, min_size=9, max_size=9),
)
def test_the_chain_text_equals_the_json_encoders(
    prev: str, shard: int, seq: int, row: list[Any]
) -> None:
    """The hand-built text a chain hash covers is byte-identical to the JSON encoder's
    (compact, ensure_ascii) for every field type, hostile strings included: the hash
    format of every stored chain is unchanged."""
    from safeagent.stores._rows import _chain_body, _chain_text

    assert _chain_text(prev, shard, seq, row) == _chain_body([prev, shard, seq, *row])


class _Text(str):
    pass


class _Number(int):
    pass


class _Opaque:
    """Not JSON: the detail encoder writes str() of it."""

    def __str__(self) -> str:
        return "opaque \u00e9 \ud800"


_detail_keys = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans(), st.floats())
_detail_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(),
        st.builds(_Text, st.text(max_size=8)),
        st.builds(_Number, st.integers()),
        st.just(_Opaque()),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(_detail_keys, kids, max_size=4),
    ),
    max_leaves=12,
)
_events = st.builds(
    AuditEvent,
    kind=st.sampled_from(list(EventKind)),
    at_ms=st.integers(min_value=0, max_value=2**62),
    namespace=st.text(max_size=8),
    subject=st.text(max_size=12),
    action=st.one_of(st.none(), st.text(max_size=12)),
    actor=st.one_of(st.none(), st.text(max_size=12)),
    execution_id=st.one_of(st.none(), st.text(max_size=32)),
    fencing_token=st.one_of(st.none(), st.integers(min_value=0, max_value=2**63 - 1)),
    detail=st.dictionaries(st.text(max_size=8), _detail_values, max_size=5),
)


def _plain_chain_rows(events: list[Any], heads: dict[int, tuple[int, str]]) -> list[Any]:
    """chain_rows written plainly: the JSON encoders' own encode() and hashlib."""
    from safeagent.stores._rows import GENESIS, _chain_body, _dumps

    rows = []
    for event in events:
        shard = shard_of(event.namespace, event.subject, CHAIN_SHARDS)
        seq, prev = heads.get(shard, (0, GENESIS))
        seq += 1
        row = (
            event.at_ms,
            event.kind.value,
            event.namespace,
            event.subject,
            event.action,
            event.actor,
            event.execution_id,
            event.fencing_token,
            _dumps(dict(event.detail)),
        )
        body = _chain_body([prev, shard, seq, *row]).encode("ascii")
        digest = hashlib.sha256(body).hexdigest()
        rows.append((*row, shard, seq, prev, digest))
        heads[shard] = (seq, digest)
    return rows


@given(
    events=st.lists(_events, max_size=4),
    heads=st.dictionaries(
        st.integers(min_value=0, max_value=15),
        st.tuples(st.integers(min_value=0, max_value=2**40), st.text(max_size=70)),
    ),
)
def test_event_and_chain_rows_equal_the_plain_encoders(
    events: list[Any], heads: dict[int, tuple[int, str]]
) -> None:
    """event_row and chain_rows, which call the C encoder built once, give byte for byte
    what the JSON encoders' encode() gives, for details of every JSON type, non-str keys,
    NaN, str and int subclasses, values only str() can write, and chain heads of any
    text; and they move the heads the same way."""
    from safeagent.stores._rows import chain_rows, event_row

    plain_heads = dict(heads)
    expected = _plain_chain_rows(events, plain_heads)
    shards = [shard_of(e.namespace, e.subject, CHAIN_SHARDS) for e in events]
    assert chain_rows(events, heads, shards) == expected
    assert heads == plain_heads
    assert [event_row(event) for event in events] == [row[:9] for row in expected]


def test_a_cyclic_value_fails_as_with_the_plain_encoders() -> None:
    """Built once, the C encoder has no circular-reference check: a cycle ends in
    RecursionError and the plain encoder then reports it, as it always did."""
    from safeagent.stores._rows import _chain_text, event_row

    detail: dict[str, Any] = {"a": [1]}
    detail["a"].append(detail)
    event = AuditEvent(kind=EventKind.SIGNAL, at_ms=1, namespace="n", subject="s", detail=detail)
    with pytest.raises(ValueError, match="Circular reference"):
        event_row(event)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        _chain_text("0" * 64, 1, 1, [loop])
    with pytest.raises(TypeError, match="bytes is not JSON serializable"):
        _chain_text("0" * 64, 1, 1, [b"x"])


def test_the_encoders_are_the_plain_ones_where_the_c_encoder_is_missing_or_differs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the C encoder (another interpreter), or with one that writes anything else
    than encode() does, the prebuilt encoder is encode() itself."""
    import json.encoder

    from safeagent.stores._rows import _CHAIN_BODY, _DUMPS, _PROBE, _prebuilt

    value = {"a": [1, 2.5, None, "\u00e9"], "b": _Opaque()}
    for encoder in (_DUMPS, _CHAIN_BODY):
        built = _prebuilt(encoder)
        assert type(built).__name__ == "Encoder"  # the C encoder, on CPython
        assert "".join(built(_PROBE, 0)) == encoder.encode(_PROBE)

    real = json.encoder.c_make_encoder
    for make in (None, lambda *args: lambda value, level: ["[]"], real):
        monkeypatch.setattr(json.encoder, "c_make_encoder", make)
        built = _prebuilt(_DUMPS)
        assert (type(built).__name__ == "Encoder") is (make is real)
        assert "".join(built(value, 0)) == _DUMPS.encode(value)


def test_purging_a_released_record_never_sends_its_fencing_token_back(
    guard: Any, clock: FakeClock
) -> None:
    """A released record's row outlives retention: the next claim of its id goes on from
    its fencing token, so a stalled worker still holding an old token cannot complete the
    new attempt (deleting the row restarted the token at 1, and the stale completion was
    accepted)."""
    from safeagent._flow import claim_request
    from safeagent.stores._base import Completion

    store = guard.store
    ns = guard.namespace

    def request() -> Any:
        call = guard._prepare("z", "charge", {"a": 1}, None, (), None, 1, None, None)
        return claim_request(call, guard._settings())

    def completion(req: Any, token: int, status: Status, result: str | None) -> Completion:
        return Completion(
            ns,
            "z",
            token,
            status,
            result,
            None,
            actor=req.owner,
            action=req.action,
            execution_id=req.execution_id,
        )

    stalled = request()
    first = store.claim(stalled)
    assert first.won
    clock.advance(5)  # the stalled worker's lease runs out: in doubt
    taken = store.take_over(ns, "z", first.record.fencing_token, "operator", 1000)
    assert taken.accepted
    assert store.complete(
        completion(stalled, taken.record.fencing_token, Status.RELEASED, None)
    ).accepted
    clock.advance(3600)
    assert purge(store, older_than=60).released == 1
    purged = guard.get("z")
    assert purged is not None
    assert (purged.status, purged.payload) == (Status.RELEASED, None)
    fresh = request()
    again = store.claim(fresh)
    assert again.won
    assert again.record.fencing_token > taken.record.fencing_token
    assert again.record.purged_at_ms is None
    assert again.record.payload_json == fresh.payload_json
    late = store.complete(completion(stalled, first.record.fencing_token, Status.SUCCEEDED, '"z"'))
    assert not late.accepted
    done = store.complete(
        completion(fresh, again.record.fencing_token, Status.SUCCEEDED, '"fresh"')
    )
    assert done.accepted
    receipt = guard.get("z")
    assert receipt is not None
    assert (receipt.result, receipt.execution_id) == ("fresh", fresh.execution_id)
    assert receipt.payload == {"a": 1}


def test_edited_facts_of_the_attempt_in_doubt_are_found(guard: Any, clock: FakeClock) -> None:
    """The owner and end of the attempt in doubt decide when a reconcile hook may answer
    "did not happen": moved earlier behind the guard's back, a hook could settle too soon.
    Each take-over event records them in the chain, and verify compares the record with
    it; facts on a record no take-over ever touched are reported too."""
    from safeagent import ActionPolicy, Reconciliation

    store = guard.store
    hooked = Guard(
        store,
        wait=0,
        owner="worker-A",
        outcome_unknown=(TimeoutError,),
        actions={"charge": ActionPolicy(reconcile=lambda _req: Reconciliation.unknown())},
    )

    def timeout(_ctx: Any) -> None:
        raise TimeoutError("no answer")

    for rid in ("doubt", "never-taken-over"):
        with pytest.raises(TimeoutError):
            hooked.execute(rid, "charge", {"r": rid}, timeout)
    for _ in range(2):  # two reconcile rounds, both unknown
        with pytest.raises(OutcomeUnknownError):
            hooked.execute("doubt", "charge", {"r": "doubt"}, timeout)
        clock.advance(5)
    hooked.close()
    assert verify(store).ok
    record, _ = store.get("default", "doubt")
    assert record is not None
    assert record.attempt_owner == "worker-A"
    assert record.attempt_ended_at_ms is not None
    _edit_record(store, "doubt", attempt_ended_at_ms=record.attempt_ended_at_ms - 3_600_000)
    _edit_record(
        store, "never-taken-over", attempt_owner="x", attempt_ended_at_ms=1, ended_attempt=1
    )
    report = verify(store)
    assert _kinds(report) == {"receipt_edited"}
    details = {p.detail.split("'")[1]: p.detail for p in report.problems}
    assert set(details) == {"doubt", "never-taken-over"}
    assert "owner or end of the attempt in doubt differs" in details["doubt"]
    assert "no take-over event recorded" in details["never-taken-over"]


# -- raw SQL on SQLite and PostgreSQL: the holes a database writer could use ----------------


def _sql(store: Any, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run ``statement`` on the store's database behind its back, as someone with write
    access would: ``{s}.`` prefixes a table (the PostgreSQL schema), ``%s`` a parameter."""
    if not hasattr(store, "dsn"):  # an SQLite store, or the path of its file
        conn = sqlite3.connect(store.path)
        try:
            with conn:
                cur = conn.execute(statement.replace("{s}.", "").replace("%s", "?"), args)
                return [tuple(r) for r in cur.fetchall()]
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(store.dsn, autocommit=True) as pg:
        cur = pg.execute(statement.replace("{s}", store.schema), args)  # type: ignore[arg-type]
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


_EVENT_INSERT = (
    "INSERT INTO {s}.audit_events (at_ms, kind, namespace, subject, action, actor,"
    " execution_id, fencing_token, detail, shard, seq, prev_hash, hash)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"
)


def _forge_event(store: Any, subject: str, kind: str, detail: dict[str, Any], *chain: Any) -> int:
    """Insert an event row for ``subject``; ``chain``: (shard, seq, prev_hash, hash), all
    NULL by default (an unchained row). Returns its id."""
    row = (1, kind, "default", subject, "charge", "mallory", None, None, json.dumps(detail))
    return int(_sql(store, _EVENT_INSERT, *row, *(chain or (None,) * 4))[0][0])


def _append_chained(store: Any, shard: int, subject: str, kind: str, detail: Any) -> int:
    """Append an event for ``subject`` to chain ``shard`` consistently (its hash and the
    head moved), as a writer who knows the hash format can. Returns its id."""
    from safeagent.stores._rows import chain_hash

    ((seq, head),) = _sql(store, "SELECT seq, head FROM {s}.audit_chain WHERE shard = %s", shard)
    row = (2, kind, "default", subject, "charge", "mallory", None, None, json.dumps(detail))
    digest = chain_hash(head, shard, seq + 1, row)
    event_id = int(_sql(store, _EVENT_INSERT, *row, shard, seq + 1, head, digest)[0][0])
    _sql(
        store,
        "UPDATE {s}.audit_chain SET seq = %s, head = %s WHERE shard = %s",
        seq + 1,
        digest,
        shard,
    )
    return event_id


def _rechain(store: Any) -> None:
    """Recompute every chain's hashes and heads from the stored fields (a consistent
    rewrite of the whole trail, which only an anchor can expose)."""
    from safeagent.stores._rows import GENESIS, chain_hash

    for (shard,) in _sql(
        store, "SELECT DISTINCT shard FROM {s}.audit_events WHERE shard IS NOT NULL"
    ):
        prev = GENESIS
        for row in _sql(
            store,
            "SELECT id, seq, at_ms, kind, namespace, subject, action, actor, execution_id,"
            " fencing_token, detail FROM {s}.audit_events WHERE shard = %s ORDER BY seq",
            shard,
        ):
            digest = chain_hash(prev, shard, row[1], row[2:])
            _sql(
                store,
                "UPDATE {s}.audit_events SET prev_hash = %s, hash = %s WHERE id = %s",
                prev,
                digest,
                row[0],
            )
            prev = digest
        _sql(store, "UPDATE {s}.audit_chain SET head = %s WHERE shard = %s", prev, shard)


def _named(report: Any, kind: str = "receipt_edited") -> set[str]:
    """The request ids the problems of ``kind`` name."""
    return {p.detail.split("'")[1] for p in report.problems if p.kind == kind}


def _normal_use(store: Any, clock: FakeClock) -> tuple[Guard, Any]:
    """Everything a trail holds under normal use: executions and replays, a stored failure,
    a release, an operator's resolutions (succeeded, rerun), a reconcile hook's answer,
    finality-gate decisions (_gate_decisions) and settlements (one released first, one
    in doubt resolved by an operator, one in doubt answered by a reconcile hook), a
    retention pass over all of it, and activity after it; anchored twice. Returns the
    guard and the last anchor."""
    from safeagent import ActionPolicy, FinalityGate, NotExecuted, Reconciliation

    guard = Guard(
        store,
        wait=0,
        lease=30.0,
        owner="worker-A",
        outcome_unknown=(TimeoutError,),
        actions={"lookup": ActionPolicy(reconcile=lambda _req: Reconciliation.happened(7))},
    )

    def boom(_ctx: Any) -> None:
        raise ValueError("card declined")

    def not_sent(_ctx: Any) -> None:
        raise NotExecuted

    def unknown(_ctx: Any) -> None:
        raise TimeoutError("no answer")

    for _ in range(2):
        guard.execute("paid", "charge", {"a": 1}, lambda _ctx: {"charge": "ch_1"})
    with pytest.raises(ValueError, match="declined"):
        guard.execute("declined", "charge", {"a": 2}, boom)
    with pytest.raises(NotExecuted):
        guard.execute("released", "charge", {"a": 3}, not_sent)
    with pytest.raises(TimeoutError):
        guard.execute("doubt", "charge", {"a": 4}, unknown)
    guard.resolve("doubt", "succeeded", by="ops", reason="seen in the PSP", result={"c": 4})
    with pytest.raises(ValueError, match="declined"):
        guard.execute("rerun", "charge", {"a": 5}, boom)
    guard.resolve("rerun", "rerun", by="ops", reason="card replaced")
    guard.execute("rerun", "charge", {"a": 5}, lambda _ctx: {"charge": "ch_5"})
    with pytest.raises(TimeoutError):
        guard.execute("looked-up", "lookup", {"a": 6}, unknown)
    assert guard.execute("looked-up", "lookup", {"a": 6}, unknown).result == 7  # the hook
    gate = FinalityGate(guard)
    gate.signal("case-1", "model", "approve", 1.0)
    gate.settle("case-1", "pay", lambda outcome, _ctx: outcome)
    gate.signal("case-2", "model", "approve", 1.0)
    with pytest.raises(NotExecuted):
        gate.settle("case-2", "pay", lambda _outcome, _ctx: not_sent(_ctx))
    gate.settle("case-2", "pay", lambda outcome, _ctx: outcome)
    _gate_decisions(gate)
    anchor(store, key=KEY)
    clock.advance(3600)
    report = purge(store, older_than=60)
    assert (report.tombstoned, report.released) == (7, 1)
    with pytest.raises(ReceiptPurgedError):
        guard.execute("paid", "charge", {"a": 1}, lambda _ctx: {"charge": "ch_2"})
    guard.execute("released", "charge", {"a": 3}, lambda _ctx: "now sent")
    for i in range(4):
        guard.execute(f"fresh-{i}", "charge", {"i": i}, lambda _ctx: {"charge": "ch_f"})
    gate.signal("case-3", "model", "approve", 1.0)
    gate.settle("case-3", "pay", lambda outcome, _ctx: outcome)
    for case_id in ("refund-7", "refund-8"):
        gate.settle(case_id, "pay", lambda outcome, _ctx: outcome)
    gate.signal("refund-7", "audit-bot", "reject", 1.0)  # late, after SETTLED
    with pytest.raises(TimeoutError):
        gate.settle("refund-9", "pay", lambda _outcome, ctx: unknown(ctx))  # in doubt
    guard.resolve("case:refund-9", "succeeded", by="ops", reason="paid", result="approve")
    with pytest.raises(TimeoutError):
        gate.settle("refund-10", "lookup", lambda _outcome, ctx: unknown(ctx))
    assert gate.settle("refund-10", "lookup", lambda _o, ctx: unknown(ctx)).result == 7
    guard.close()
    return guard, anchor(store, key=KEY)


def _gate_decisions(gate: Any) -> None:
    """Cases in every state, through every path the gate has: consensus with a quorum
    (docs/guide.md's worked example), a conflict, a source replacing its signal, an
    operator's resolution from IN_RECONCILIATION and from RESOLVED_PROVISIONAL, signals
    after FINAL (late), a case only opened, and one in another namespace."""
    from safeagent import ConsensusPolicy

    gate.open("refund-7", policy=ConsensusPolicy(0.7, 2))
    gate.signal("refund-7", "A", "approve", 0.9)  # RESOLVED_PROVISIONAL
    gate.signal("refund-7", "C", "reject", 0.6)  # IN_RECONCILIATION
    gate.signal("refund-7", "B", "approve", 0.8, metadata={"note": "second look"})
    assert gate.signal("refund-7", "C", "approve", 0.5).state.value == "FINAL"
    gate.signal("refund-7", "D", "reject", 0.9)  # late
    gate.signal("refund-8", "model", "approve", 0.5)
    gate.signal("refund-8", "rules", "reject", 0.5)  # a conflict
    gate.resolve("refund-8", "reject", by="alice", reason="manual review")
    gate.signal("refund-8", "model", "approve", 1.0)  # late
    gate.signal("refund-9", "model", "approve", 0.5)
    gate.resolve("refund-9", "approve", by="bob", reason="low risk")  # from provisional
    gate.signal("refund-10", "model", "approve", 1.0)  # FINAL at once
    gate.signal("pending", "model", "approve", 0.4)
    gate.signal("pending", "model", "approve", 0.6)  # replaces, still provisional
    gate.signal("pending", "rules", "approve", 0.5)
    gate.signal("split", "model", "approve", 0.5)
    gate.signal("split", "rules", "reject", 0.5)  # stays IN_RECONCILIATION
    gate.open("opened")
    gate.signal("decided", "model", "reject", 0.9)  # FINAL, not settled
    gate.signal("eu-1", "model", "approve", 0.3, namespace="eu")


def test_a_trail_of_normal_use_verifies_with_no_problem(store: Any, clock: FakeClock) -> None:
    """Executions, replays, failures, releases, operator resolutions, a reconcile hook's
    answer, gate settlements, a retention pass and anchors: on every store the trail
    verifies with the key and the last anchor pinned, every record checked against its
    events (the tombstones too), none unverified and nothing legacy."""
    _, last = _normal_use(store, clock)
    report = verify(store, key=KEY, last_anchor=last)
    assert report.ok, report.problems
    records, _ = store.records()
    assert (report.receipts_checked, report.receipts_unverified) == (len(records), 0)
    assert sum(1 for r in records if r.purged_at_ms is not None) == 7  # "released" re-ran
    assert (report.anchors_checked, report.events_legacy) == (2, 0)
    cases = store.cases()
    assert {c.state.value for c in cases} == {
        "OPEN",
        "RESOLVED_PROVISIONAL",
        "IN_RECONCILIATION",
        "FINAL",
        "SETTLED",
    }
    assert (report.cases_checked, report.cases_unverified) == (len(cases), 0)
    signals = [s for c in cases for s in store.case_signals(c.namespace, c.case_id)]
    assert {status for _, status in signals} == {"live", "replaced", "late"}
    assert report.signals_checked == len(signals)
    assert verify(store, key=KEY, last_anchor=last.pin).ok
    assert verify(store, last_anchor=(last.id, last.mac)).ok


def test_a_tombstone_keeps_its_status_and_needs_the_retention_pass(
    db_store: Any, clock: FakeClock
) -> None:
    """purged_at_ms no longer hides a record from verify: a tombstone keeps its final
    status (a SUCCEEDED charge marked purged and RELEASED would run again), holds nothing
    retention clears, and is covered by a chained retention pass whose cutoff is after
    its last change. Each edit below is a receipt_edited naming its request."""
    _normal_use(db_store, clock)
    assert verify(db_store).ok
    # the reviewer's edit: a charge turned into a released claim, hidden as purged
    _sql(
        db_store,
        "UPDATE {s}.executions SET status = 'RELEASED', purged_at_ms = 1"
        " WHERE request_id = 'fresh-0'",
    )
    _sql(
        db_store,
        "UPDATE {s}.executions SET status = 'IN_DOUBT', purged_at_ms = 1"
        " WHERE request_id = 'fresh-1'",
    )
    _sql(
        db_store,
        "UPDATE {s}.executions SET result = '{\"c\":0}', purged_at_ms = 1"
        " WHERE request_id = 'fresh-2'",
    )
    # a tombstone made by hand, as retention would have left it, but no pass covers it
    _sql(
        db_store,
        "UPDATE {s}.executions SET payload = '', result = NULL, purged_at_ms = %s"
        " WHERE request_id = 'fresh-3'",
        clock(),
    )
    # real tombstones edited: a status, a settlement released, a result put back
    _sql(db_store, "UPDATE {s}.executions SET status = 'RELEASED' WHERE request_id = 'paid'")
    _sql(db_store, "UPDATE {s}.executions SET status = 'RELEASED' WHERE request_id = 'case:case-1'")
    _sql(db_store, "UPDATE {s}.executions SET result = '\"x\"' WHERE request_id = 'doubt'")
    report = verify(db_store)
    assert _kinds(report) == {"receipt_edited"}
    assert _named(report) == {
        "fresh-0",
        "fresh-1",
        "fresh-2",
        "fresh-3",
        "paid",
        "case:case-1",
        "doubt",
    }
    details = {p.detail.split("'")[1]: p.detail for p in report.problems}
    assert "left it SUCCEEDED (and it is marked purged)" in details["fresh-0"]
    assert "no retention pass in the chains covers it" in details["fresh-3"]
    assert "still holds a payload, result or error message" in details["doubt"]


def test_events_outside_the_chains_are_reported_and_never_trusted(
    db_store: Any, clock: FakeClock
) -> None:
    """An event row with no shard, seq or hash, a shard outside 0-15, or a consistent
    append to another subject's chain is an unchained_event, and verify never takes it as
    a request's last state: a forged 'released' event does not excuse a SUCCEEDED record
    turned RELEASED (which the next retry would run again)."""
    guard = Guard(db_store)
    guard.execute("paid", "charge", {"a": 1}, lambda _ctx: {"charge": "ch_1"})
    guard.close()
    anchor(db_store, key=KEY)
    assert verify(db_store, key=KEY).ok
    _sql(db_store, "UPDATE {s}.executions SET status = 'RELEASED' WHERE request_id = 'paid'")
    released = {"status": "RELEASED"}
    unchained = _forge_event(db_store, "paid", "released", released)
    report = verify(db_store, key=KEY)
    assert [(p.kind, p.event_id) for p in report.problems if p.kind != "receipt_edited"] == [
        ("unchained_event", unchained)
    ]
    assert _named(report) == {"paid"}  # still reported: the unchained event is not trusted
    from safeagent.stores._rows import GENESIS, chain_hash

    chains = db_store.chain_shards
    shard = shard_of("default", "paid", chains)
    fields = (1, "released", "default", "paid", "charge", "mallory", None, None, "{}")
    beyond = chains  # the first shard past the store's chains
    out_of_range = _forge_event(
        db_store,
        "paid",
        "released",
        released,
        beyond,
        1,
        GENESIS,
        chain_hash(GENESIS, beyond, 1, fields),
    )
    no_seq = _forge_event(db_store, "paid", "released", released, -1, None, None, None)
    elsewhere = _append_chained(db_store, (shard + 1) % chains, "paid", "released", released)
    report = verify(db_store, key=KEY)
    assert _kinds(report) == {"unchained_event", "receipt_edited"}
    assert {p.event_id for p in report.problems if p.kind == "unchained_event"} == {
        unchained,
        out_of_range,
        no_seq,
        elsewhere,
    }
    assert _named(report) == {"paid"}


def test_events_written_before_the_chains_are_legacy_not_problems(
    db_store: Any, clock: FakeClock
) -> None:
    """A database created by a pre-chain schema (SQLite version 2, PostgreSQL version 1)
    and migrated keeps its old events, with every chain column NULL and ids below every
    chained one: counted as events_legacy, and a record whose events are all legacy is
    unverified, not forged; so is a case opened before the chains, even once it has
    chained events too (its history starts before them). A row outside the chains
    written after the first chained one is still an unchained_event."""
    from safeagent._keys import canonical_json, downstream_key, fingerprint

    legacy_store = _pre_chain_store(db_store, clock)
    payload = {"a": 1}
    body = canonical_json(payload).decode()
    record = (
        "default", "old", "charge", fingerprint("charge", canonical_json(payload)), "SUCCEEDED",
        body, '{"charge":"ch_0"}', None, None, "exec-old", 1, 1, "worker", 1,
        downstream_key("default", "charge", "old"), 1, 1, 2, 2,
    )  # fmt: skip
    legacy_store.exec_(
        "INSERT INTO {s}.executions (namespace, request_id, action, fingerprint, status,"
        " payload, result, error_type, error_message, execution_id, attempt, fencing_token,"
        " lease_owner, lease_expires_at_ms, downstream_key, created_at_ms, claimed_at_ms,"
        " updated_at_ms, completed_at_ms)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        *record,
    )
    for kind, detail in (("claimed", {"attempt": 1}), ("succeeded", {"status": "SUCCEEDED"})):
        legacy_store.exec_(
            "INSERT INTO {s}.audit_events (at_ms, kind, namespace, subject, action, actor,"
            " execution_id, fencing_token, detail) VALUES (1, %s, 'default', 'old', 'charge',"
            " 'worker', 'exec-old', 1, %s)",
            kind,
            json.dumps(detail),
        )
    legacy_store.exec_(
        "INSERT INTO {s}.cases (namespace, case_id, state, provisional_outcome, outcome,"
        " threshold, quorum, version, created_at_ms, updated_at_ms, resolved_by) VALUES"
        " ('default', 'old-case', 'RESOLVED_PROVISIONAL', 'approve', NULL, 0.8, 1, 2, 1, 1,"
        " NULL)"
    )
    legacy_store.exec_(
        "INSERT INTO {s}.signals (namespace, case_id, source, outcome, confidence, metadata,"
        " at_ms, status) VALUES ('default', 'old-case', 'model-a', 'approve', 0.5, '{}', 1,"
        " 'live')"
    )
    for kind, actor, detail in (
        ("state_change", "safeagent", {"from": None, "to": "OPEN", "outcome": None}),
        ("signal", "model-a", {"outcome": "approve", "confidence": 0.5, "late": False}),
        (
            "state_change",
            "model-a",
            {"from": "OPEN", "to": "RESOLVED_PROVISIONAL", "outcome": "approve"},
        ),
    ):
        legacy_store.exec_(
            "INSERT INTO {s}.audit_events (at_ms, kind, namespace, subject, actor, detail)"
            " VALUES (1, %s, 'default', 'old-case', %s, %s)",
            kind,
            actor,
            json.dumps(detail),
        )
    store = legacy_store.open()  # migrated to the current schema
    guard = Guard(store)
    assert guard.execute("old", "charge", payload, lambda _ctx: 0).result == {"charge": "ch_0"}
    guard.execute("new", "charge", {"a": 2}, lambda _ctx: 1)
    from safeagent import FinalityGate

    gate = FinalityGate(guard)
    assert gate.signal("old-case", "model-b", "approve", 0.5).version == 3  # still provisional
    gate.signal("new-case", "model-a", "approve", 1.0)
    guard.close()
    report = verify(store)
    assert report.ok, report.problems
    assert (report.events_legacy, report.receipts_unverified, report.receipts_checked) == (
        5,
        1,
        1,
    )
    assert (report.cases_checked, report.cases_unverified) == (1, 1)
    late = _forge_event(store, "old", "resolved", {"status": "SUCCEEDED"})
    report = verify(store)
    assert [(p.kind, p.event_id) for p in report.problems] == [("unchained_event", late)]
    store.close()


def test_a_legacy_receipt_purged_after_the_upgrade_stays_unverified(
    db_store: Any, clock: FakeClock
) -> None:
    """Receipts from before the chains, purged by retention after the upgrade: retention
    stamps the tombstone and audits the pass on its own subject, so the record's only
    change after the chains began is covered by that pass. Verify reported each such
    receipt as written behind the guard's back (every upgraded database running retention
    read TAMPERED for good); it is unverified, as before the purge. A tombstone no pass
    covers, or one stamped before the record's last change, is still reported."""
    from safeagent._keys import canonical_json, downstream_key, fingerprint

    legacy_store = _pre_chain_store(db_store, clock)
    payload = {"a": 1}
    for rid in ("old-1", "old-2"):
        legacy_store.exec_(
            "INSERT INTO {s}.executions (namespace, request_id, action, fingerprint, status,"
            " payload, result, execution_id, attempt, fencing_token, lease_owner,"
            " lease_expires_at_ms, downstream_key, created_at_ms, claimed_at_ms,"
            " updated_at_ms, completed_at_ms) VALUES ('default', %s, 'charge', %s,"
            " 'SUCCEEDED', %s, '{\"charge\":\"ch_0\"}', %s, 1, 1, 'worker', 1, %s, 1, 1,"
            " 2, 2)",
            rid,
            fingerprint("charge", canonical_json(payload)),
            canonical_json(payload).decode(),
            f"exec-{rid}",
            downstream_key("default", "charge", rid),
        )
        for kind in ("claimed", "succeeded"):
            legacy_store.exec_(
                "INSERT INTO {s}.audit_events (at_ms, kind, namespace, subject, action,"
                " actor, execution_id, fencing_token, detail) VALUES (1, %s, 'default', %s,"
                " 'charge', 'worker', %s, 1, '{}')",
                kind,
                rid,
                f"exec-{rid}",
            )
    store = legacy_store.open()  # migrated to the current schema
    guard = Guard(store)
    guard.execute("new", "charge", {"a": 2}, lambda _ctx: 1)
    guard.close()
    assert (verify(store).ok, verify(store).receipts_unverified) == (True, 2)
    clock.advance(60)
    assert purge(store, before_ms=100).tombstoned == 2  # both legacy receipts, not "new"
    report = verify(store)
    assert report.ok, report.problems
    assert (report.receipts_unverified, report.receipts_checked) == (2, 1)
    # A tombstone stamped by hand after the pass: no pass written since covers it.
    clock.advance(60)
    _sql(store, "UPDATE {s}.executions SET purged_at_ms = %s WHERE request_id = 'old-1'", clock())
    report = verify(store)
    assert [p.detail.split("'")[1] for p in report.problems] == ["old-1"]
    assert "no retention pass in the chains covers it" in report.problems[0].detail
    store.close()


class _PreChain:
    """A database at the last schema version without hash chains, written by hand."""

    def __init__(self, store: Any, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock

    def exec_(self, statement: str, *args: Any) -> None:
        _sql(self.store, statement, *args)

    def open(self) -> Any:
        if not hasattr(self.store, "dsn"):
            return SQLiteStore(self.store.path, clock=self.clock)
        from safeagent.stores.postgres import PostgresStore

        return PostgresStore(PG_URL, schema=self.store.schema, clock=self.clock)


def _pre_chain_store(db_store: Any, clock: FakeClock) -> _PreChain:
    """Empty ``db_store``'s database and rebuild it at the pre-chain schema version."""
    if isinstance(db_store, SQLiteStore):
        from safeagent.stores import sqlite as module

        path = db_store.path
        db_store.close()
        os.remove(path)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("CREATE TABLE safeagent_meta (key TEXT PRIMARY KEY, value TEXT)")
            for statements in module.MIGRATIONS[:2]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("INSERT INTO safeagent_meta VALUES ('schema_version', '2')")
        return _PreChain(SimpleNamespace(path=path), clock)
    import psycopg

    from safeagent.stores import _pg_sql as module

    schema = db_store.schema
    db_store.drop_schema()
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")  # type: ignore[arg-type]
        conn.execute(
            f"CREATE TABLE {schema}.safeagent_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"  # type: ignore[arg-type]
        )
        for statement in module.MIGRATIONS[0]:
            conn.execute(statement.replace("{s}", schema))  # type: ignore[arg-type]
        conn.execute(f"INSERT INTO {schema}.safeagent_meta VALUES ('schema_version', '1')")  # type: ignore[arg-type]
    return _PreChain(SimpleNamespace(dsn=PG_URL, schema=schema), clock)


def test_a_record_no_chained_event_names_is_forged(db_store: Any, clock: FakeClock) -> None:
    """Every writer appends a claim's event in the claim's transaction, so a record with
    no chained event at all was written by hand: a forged SUCCEEDED receipt (which a
    retry would replay) and a forged IN_DOUBT record (which would block the request) are
    receipt_edited, not "written before digests"."""
    guard = Guard(db_store)
    guard.execute("paid", "charge", {"a": 1}, lambda _ctx: {"charge": "ch_1"})
    guard.close()
    columns = [c.strip() for c in COLUMNS.split(",")]

    def copy_as(request_id: str, status: str) -> None:
        given = {"request_id": request_id, "status": status}
        picked = ", ".join("%s" if c in given else c for c in columns)
        _sql(
            db_store,
            f"INSERT INTO {{s}}.executions ({', '.join(columns)}) SELECT {picked}"
            " FROM {s}.executions WHERE request_id = 'paid'",
            *(given[c] for c in columns if c in given),
        )

    copy_as("forged-paid", "SUCCEEDED")
    copy_as("forged-doubt", "IN_DOUBT")
    report = verify(db_store)
    assert _kinds(report) == {"receipt_edited"}
    assert _named(report) == {"forged-paid", "forged-doubt"}
    assert all("no chained event records its claim" in p.detail for p in report.problems)
    assert report.receipts_unverified == 0


def test_a_chain_head_moved_back_or_removed_is_a_head_mismatch(db_store: Any) -> None:
    """The stored head must be its chain's last event: set back to the event before it
    (seq and hash), or gone (even that of a chain with no event yet), it is a
    head_mismatch for that chain."""
    guard = Guard(db_store)
    for _ in range(3):
        guard.execute("r", "charge", {}, lambda _ctx: 1)  # claimed, succeeded, 2 replays
    guard.close()
    shard = shard_of("default", "r", db_store.chain_shards)
    ((seq,),) = _sql(db_store, "SELECT seq FROM {s}.audit_chain WHERE shard = %s", shard)
    assert seq == 4
    _sql(
        db_store,
        "UPDATE {s}.audit_chain SET seq = seq - 1, head = (SELECT prev_hash FROM"
        " {s}.audit_events AS e WHERE e.shard = %s AND e.seq = %s) WHERE shard = %s",
        shard,
        seq,
        shard,
    )
    report = verify(db_store)
    assert [(p.kind, p.shard, p.seq) for p in report.problems] == [("head_mismatch", shard, 3)]
    _sql(db_store, "DELETE FROM {s}.audit_chain WHERE shard = %s", shard)
    report = verify(db_store)
    assert [(p.kind, p.shard, p.seq) for p in report.problems] == [("head_mismatch", shard, 4)]
    empty = (
        shard + 1
    ) % db_store.chain_shards  # a chain with no event yet: without its head, no writer
    _sql(db_store, "DELETE FROM {s}.audit_chain WHERE shard = %s", empty)  # can chain to it
    report = verify(db_store)
    assert {(p.kind, p.shard) for p in report.problems} == {
        ("head_mismatch", shard),
        ("head_mismatch", empty),
    }


def _anchored_thrice(store: Any) -> list[Any]:
    guard = Guard(store)
    made = []
    for i in range(3):
        guard.execute(f"r-{i}", "charge", {"i": i}, lambda _ctx: 1)
        guard.close()
        made.append(anchor(store, key=KEY))
    assert [a.id for a in made] == [1, 2, 3]
    assert verify(store, key=KEY).ok
    return made


def test_a_deleted_or_renumbered_middle_anchor_is_found(db_store: Any) -> None:
    """Each anchor signs the one stored before it, so an anchor deleted from between two
    others is a missing_anchor: by the gap in the ids, and when the later ones are
    renumbered to close the gap, by the predecessor the next one names."""
    _anchored_thrice(db_store)
    _sql(db_store, "DELETE FROM {s}.audit_anchors WHERE id = 2")
    report = verify(db_store, key=KEY)
    assert [p.kind for p in report.problems] == ["missing_anchor"]
    _sql(db_store, "UPDATE {s}.audit_anchors SET id = 2 WHERE id = 3")
    report = verify(db_store, key=KEY)
    assert [p.kind for p in report.problems] == ["missing_anchor"]
    assert "signed right after anchor 2" in report.problems[0].detail


def test_ids_the_database_skipped_between_anchors_are_no_alarm() -> None:
    """PostgreSQL skips sequence values (a failed or lost write, a crash): an anchor that
    names the one before it as its predecessor explains the gap."""
    require_postgres()
    from safeagent.stores.postgres import PostgresStore

    store = PostgresStore(PG_URL, schema=pg_schema())
    try:
        Guard(store).execute("r", "charge", {}, lambda _ctx: 1)
        _sql(store, "SELECT nextval('{s}.audit_anchors_id_seq')")  # before the first
        first = anchor(store, key=KEY)
        for _ in range(3):
            _sql(store, "SELECT nextval('{s}.audit_anchors_id_seq')")
        last = anchor(store, key=KEY)
        assert (first.id, last.id) == (2, 6)
        assert verify(store, key=KEY, last_anchor=last).ok
    finally:
        store.drop_schema()
        store.close()


def test_with_a_key_a_trail_no_anchor_signs_is_reported(db_store: Any) -> None:
    """With the key, events and no anchor at all (every anchor deleted looks the same) is
    a no_anchor problem, unless the caller allows a trail never anchored; without a key,
    or with no events, there is nothing to say."""
    assert verify(db_store, key=KEY).ok  # no events yet
    _anchored_thrice(db_store)
    _sql(db_store, "DELETE FROM {s}.audit_anchors")
    report = verify(db_store, key=KEY)
    assert [p.kind for p in report.problems] == ["no_anchor"]
    assert "no anchor signs this trail" in report.problems[0].detail
    assert verify(db_store, key=KEY, allow_unanchored=True).ok
    assert verify(db_store).ok


def test_the_last_anchor_kept_outside_bounds_deleting_the_newest(
    db_store: Any, clock: FakeClock
) -> None:
    """Deleting the newest anchor and rewriting the events only it signed (a charge
    turned into a released claim, its events re-chained to match) passes every check
    that reads only the database. The anchor recorded outside it exposes the deletion,
    also once its id has been used again by a later anchor."""
    guard = Guard(db_store)
    guard.execute("order-0", "charge", {"a": 0}, lambda _ctx: {"charge": "ch_0"})
    guard.close()
    anchor(db_store, key=KEY)
    guard.execute("order-1", "charge", {"a": 1}, lambda _ctx: {"charge": "ch_1"})
    guard.close()
    kept = anchor(db_store, key=KEY)
    assert verify(db_store, key=KEY, last_anchor=kept.pin).ok
    _sql(db_store, "DELETE FROM {s}.audit_anchors WHERE id = %s", kept.id)
    _sql(
        db_store,
        "UPDATE {s}.executions SET status = 'RELEASED', result = NULL,"
        " completed_at_ms = NULL WHERE request_id = 'order-1'",
    )
    _sql(
        db_store,
        "UPDATE {s}.audit_events SET kind = 'released', detail = '{\"status\":\"RELEASED\"}'"
        " WHERE subject = 'order-1' AND kind = 'succeeded'",
    )
    _rechain(db_store)
    assert verify(db_store, key=KEY).ok  # what cannot be seen from inside the database
    report = verify(db_store, key=KEY, last_anchor=kept)
    assert [p.kind for p in report.problems] == ["missing_anchor"]
    anchor(db_store, key=KEY)  # SQLite gives it the deleted anchor's id again
    report = verify(db_store, key=KEY, last_anchor=(kept.id, kept.mac))
    assert [p.kind for p in report.problems] == ["missing_anchor"]


def test_an_anchor_pin_round_trips_and_a_bad_one_is_refused(db_store: Any) -> None:
    """Anchor.pin is '<id>:<mac>'; parse_pin reads it back; anything else given as
    last_anchor is a ConfigurationError before anything is read."""
    from safeagent.audit import parse_pin

    Guard(db_store).execute("r", "charge", {}, lambda _ctx: 1)
    made = anchor(db_store, key=KEY)
    assert made.pin == f"{made.id}:{made.mac}"
    assert parse_pin(f" {made.pin.upper()}\n") == (made.id, made.mac)
    for bad in ("1", "0:" + "a" * 64, "1:" + "g" * 64, "x:" + "a" * 64, 1):
        with pytest.raises(ConfigurationError):
            verify(db_store, last_anchor=bad)  # type: ignore[arg-type]


def test_a_claim_or_completion_whose_chain_head_is_gone_is_not_written(
    db_store: Any, ledger: Ledger
) -> None:
    """A claim whose event cannot be chained (its shard's head row was deleted) fails
    closed on every store, PostgreSQL's one-statement path included (it used to commit the
    record with no event): StoreError, ``fn`` not run, no record. A completion whose head
    vanished after the claim is refused the same way: the record stays PENDING (then in
    doubt), never SUCCEEDED without its event."""
    guard = Guard(db_store, wait=0)
    shard = shard_of("default", "r-1", db_store.chain_shards)
    _sql(db_store, "DELETE FROM {s}.audit_chain WHERE shard = %s", shard)
    with pytest.raises(StoreError, match="chain head"):
        guard.execute("r-1", "charge", {"n": 1}, lambda ctx: ledger.append(ctx.request_id))
    assert ledger.count() == 0
    assert guard.get("r-1") is None

    rid = next(
        f"r-{i}"
        for i in range(2, 200)
        if shard_of("default", f"r-{i}", db_store.chain_shards) != shard
    )

    def charge_then_lose_the_head(ctx: Any) -> str:
        ledger.append(ctx.request_id)
        _sql(
            db_store,
            "DELETE FROM {s}.audit_chain WHERE shard = %s",
            shard_of("default", ctx.request_id, db_store.chain_shards),
        )
        return "charged"

    with pytest.raises(StoreError):
        guard.execute(rid, "charge", {"n": 2}, charge_then_lose_the_head)
    receipt = guard.get(rid)
    assert receipt is not None
    assert receipt.status is Status.PENDING
    assert ledger.count() == 1


# -- finality-gate cases and signals against their events -----------------------------------


def _decided(store: Any) -> Any:
    """A gate history on ``store`` (policy 0.9, quorum 2), verified clean: ``split`` IN_
    RECONCILIATION, ``agreed`` RESOLVED_PROVISIONAL (its source replaced its signal),
    ``paid`` SETTLED with a late signal after it, ``ruled`` FINAL by an operator. Returns
    the gate."""
    from safeagent import ConsensusPolicy, FinalityGate

    guard = Guard(store, wait=0)
    gate = FinalityGate(guard, policy=ConsensusPolicy(0.9, 2))
    gate.signal("split", "model-a", "approve", 0.9)
    gate.signal("split", "model-b", "reject", 0.9)
    gate.signal("agreed", "model-a", "approve", 0.6)
    gate.signal("agreed", "model-a", "approve", 0.7)
    gate.signal("paid", "model-a", "approve", 1.0)
    gate.signal("paid", "model-b", "approve", 1.0)
    gate.settle("paid", "pay", lambda outcome, _ctx: outcome)
    gate.signal("paid", "model-c", "reject", 1.0)
    gate.signal("ruled", "model-a", "approve", 0.9)
    gate.signal("ruled", "model-b", "reject", 0.9)
    gate.resolve("ruled", "reject", by="alice", reason="manual review")
    guard.close()
    states = {c.case_id: c.state.value for c in gate.cases()}
    assert states == {
        "split": "IN_RECONCILIATION",
        "agreed": "RESOLVED_PROVISIONAL",
        "paid": "SETTLED",
        "ruled": "FINAL",
    }
    report = verify(store)
    assert report.ok, report.problems
    assert (report.cases_checked, report.cases_unverified, report.signals_checked) == (4, 0, 9)
    return gate


_SIGNAL_INSERT = (
    "INSERT INTO {s}.signals (namespace, case_id, source, outcome, confidence, metadata,"
    " at_ms, status) VALUES ('default', %s, %s, 'approve', 1.0, '{}', %s, %s)"
)

_CASE_TAMPERS = {
    # the reviewer's edit: a decision nobody made, which settle would carry out
    "a conflict made FINAL": (
        ["UPDATE {s}.cases SET state = 'FINAL', outcome = 'approve' WHERE case_id = 'split'"],
        "split",
        "its state is 'FINAL', though its events left 'IN_RECONCILIATION'",
    ),
    "SETTLED turned back into FINAL": (
        ["UPDATE {s}.cases SET state = 'FINAL' WHERE case_id = 'paid'"],
        "paid",
        "its state is 'FINAL', though its events left 'SETTLED'",
    ),
    "an operator's outcome edited": (
        ["UPDATE {s}.cases SET outcome = 'approve' WHERE case_id = 'ruled'"],
        "ruled",
        "its outcome is 'approve', though its events left 'reject'",
    ),
    "a provisional outcome edited": (
        ["UPDATE {s}.cases SET provisional_outcome = 'reject' WHERE case_id = 'agreed'"],
        "agreed",
        "its provisional outcome is 'reject', though its events left 'approve'",
    ),
    "the resolver edited": (
        ["UPDATE {s}.cases SET resolved_by = 'mallory' WHERE case_id = 'ruled'"],
        "ruled",
        "its resolver is 'mallory', though its events left 'alice'",
    ),
    "the version edited": (
        ["UPDATE {s}.cases SET version = version + 5 WHERE case_id = 'agreed'"],
        "agreed",
        "its version is 8, though its events left 3",
    ),
    "a case deleted": (
        ["DELETE FROM {s}.cases WHERE case_id = 'ruled'"],
        "ruled",
        "the case is gone, though its events left it FINAL",
    ),
    "a case forged": (
        [
            "INSERT INTO {s}.cases (namespace, case_id, state, provisional_outcome, outcome,"
            " threshold, quorum, version, created_at_ms, updated_at_ms, resolved_by)"
            " VALUES ('default', 'forged', 'FINAL', NULL, 'approve', 0.9, 2, 3, 1, 1, NULL)"
        ],
        "forged",
        "no chained event records its opening or any change to it",
    ),
    "a policy loosened": (
        ["UPDATE {s}.cases SET threshold = 0.5, quorum = 1 WHERE case_id = 'agreed'"],
        "agreed",
        "but its stored policy (threshold 0.5, quorum 1) over the signals its events record "
        "gives RESOLVED_PROVISIONAL 'approve', FINAL 'approve'",
    ),
    "a policy loosened, against its opening": (
        ["UPDATE {s}.cases SET threshold = 0.5 WHERE case_id = 'agreed'"],
        "agreed",
        "its policy is threshold 0.5, quorum 2, though it was opened with threshold 0.9, quorum 2",
    ),
    "a policy no gate accepts": (
        ["UPDATE {s}.cases SET threshold = 0 WHERE case_id = 'split'"],
        "split",
        "its policy (threshold 0.0, quorum 2) is not one any gate opens a case with",
    ),
    "a signal's confidence edited": (
        ["UPDATE {s}.signals SET confidence = 0.1 WHERE case_id = 'split' AND source = 'model-b'"],
        "split",
        "the signal of 'model-b' at",
    ),
    "a signal's outcome edited": (
        [
            "UPDATE {s}.signals SET outcome = 'reject'"
            " WHERE case_id = 'ruled' AND source = 'model-a'"
        ],
        "ruled",
        "holds 'reject' at confidence 0.9, live, though its event recorded 'approve' at "
        "confidence 0.9, live",
    ),
    "a replaced signal made live again": (
        ["UPDATE {s}.signals SET status = 'live' WHERE case_id = 'agreed' AND status = 'replaced'"],
        "agreed",
        "holds 'approve' at confidence 0.6, live, though its event recorded 'approve' at "
        "confidence 0.6, replaced",
    ),
    "a signal deleted": (
        ["DELETE FROM {s}.signals WHERE case_id = 'paid' AND source = 'model-c'"],
        "paid",
        "the signal of 'model-c' at",
    ),
    "a signal forged": (
        [_SIGNAL_INSERT.replace("%s", "'split'", 1).replace("%s", "'model-z'", 1)],
        "split",
        "a signal row of 'model-z' ('approve' at confidence 1.0, live, at",
    ),
}


@pytest.mark.parametrize("tamper", sorted(_CASE_TAMPERS))
def test_an_edited_deleted_or_forged_case_or_signal_is_found(
    db_store: Any, clock: FakeClock, tamper: str
) -> None:
    """verify compares every case row and every signal row with the case's chained
    events, replayed: each edit made behind the gate's back is one case_edited naming the
    case, and saying what differs."""
    _decided(db_store)
    statements, case_id, says = _CASE_TAMPERS[tamper]
    for statement in statements:  # the forged signal's instant and status, if it has them
        _sql(db_store, statement.replace("%s", str(clock()), 1).replace("%s", "'live'", 1))
    report = verify(db_store)
    assert _kinds(report) == {"case_edited"}, report.problems
    assert _named(report, "case_edited") == {case_id}
    (problem,) = report.problems
    assert says in problem.detail, problem.detail
    assert problem.shard == shard_of("default", case_id, db_store.chain_shards)


def test_a_case_edited_to_final_and_settled_stays_found(db_store: Any, clock: FakeClock) -> None:
    """The reviewer's finding: a case in reconciliation set to FINAL in the database, then
    settled (the side effect runs on a decision nobody made). Before the settlement the
    case differs from its events; after it, the settlement's own event says it was settled
    from FINAL though the case's events left it in reconciliation. An outcome edited on a
    FINAL case before its settlement is found the same way."""
    gate = _decided(db_store)
    _sql(
        db_store,
        "UPDATE {s}.cases SET state = 'FINAL', outcome = 'approve' WHERE case_id = 'split'",
    )
    report = verify(db_store)
    assert _named(report, "case_edited") == {"split"}
    ran: list[str] = []
    gate.settle("split", "pay", lambda outcome, _ctx: ran.append(outcome))
    assert ran == ["approve"]
    assert gate.get("split").state.value == "SETTLED"
    report = verify(db_store)
    assert _kinds(report) == {"case_edited"}
    (problem,) = report.problems
    assert "settled from FINAL, though its events left it IN_RECONCILIATION" in problem.detail
    settled = [e for e in gate.guard.audit_trail("split") if e.kind is EventKind.STATE_CHANGE]
    assert problem.event_id == settled[-1].id  # the settlement's event is named
    _sql(db_store, "UPDATE {s}.cases SET outcome = 'approve' WHERE case_id = 'ruled'")
    gate.settle("ruled", "pay", lambda outcome, _ctx: outcome)
    report = verify(db_store)
    assert _named(report, "case_edited") == {"split", "ruled"}
    ruled = next(p for p in report.problems if "'ruled'" in p.detail)
    assert "settled with outcome 'approve', though it went FINAL with 'reject'" in ruled.detail


def test_signals_edited_then_used_are_found_by_the_events_after_them(
    db_store: Any, clock: FakeClock
) -> None:
    """A signal edited in the database and then replaced by its source leaves a
    ``replaced`` event recording the edited values; a live signal forged to tip the
    consensus and deleted once it did leaves transitions the events' own signals do not
    give. Both are case_edited, though the rows hold nothing odd any more."""
    from safeagent import ConsensusPolicy

    gate = _decided(db_store)
    _sql(
        db_store,
        "UPDATE {s}.signals SET confidence = 0.2 WHERE case_id = 'agreed' AND status = 'live'",
    )
    gate.signal("agreed", "model-a", "approve", 0.8)  # replaces the edited one
    _sql(  # and the edit undone: the replaced row holds what its event recorded again
        db_store,
        "UPDATE {s}.signals SET confidence = 0.7 WHERE case_id = 'agreed' AND confidence = 0.2",
    )
    report = verify(db_store)
    assert _named(report, "case_edited") == {"agreed"}
    (problem,) = report.problems
    assert "replaced a live one holding ('approve', 0.2), though its events left" in problem.detail
    gate.open("tipped", policy=ConsensusPolicy(0.6, 1))
    gate.signal("tipped", "model-a", "approve", 0.5)
    gate.signal("tipped", "model-b", "reject", 0.5)
    _sql(db_store, _SIGNAL_INSERT, "tipped", "model-z", clock(), "live")
    assert gate.signal("tipped", "model-a", "approve", 1.0).state.value == "FINAL"
    _sql(db_store, "DELETE FROM {s}.signals WHERE source = 'model-z'")
    report = verify(db_store)
    assert _named(report, "case_edited") == {"agreed", "tipped"}
    tipped = next(p for p in report.problems if "'tipped'" in p.detail)
    assert "a signal led to FINAL 'approve', but its stored policy" in tipped.detail
    assert "gives no transition" in tipped.detail


def test_cases_changing_while_verify_reads_them_are_not_reported(tmp_path: Any) -> None:
    """verify reads the events, then the cases and their signals: every kind of case
    write landing in between (a signal, a consensus, a settlement, a late signal, an
    operator's resolution, a new case) meets older events; the case is read again, not
    reported. A case changing again during that second read (after its first row read,
    before its events) is read once more."""
    from safeagent import ConsensusPolicy, FinalityGate

    guard = Guard(SQLiteStore(str(tmp_path / "cases.db")), wait=0)
    gate = FinalityGate(guard, policy=ConsensusPolicy(0.9, 2))
    gate.signal("c", "model-a", "approve", 0.9)
    gate.signal("r", "model-a", "approve", 0.9)
    gate.signal("r", "model-b", "reject", 0.9)
    snapshot = guard.store.audit_chain()  # what verify's first read sees
    gate.signal("c", "model-b", "approve", 1.0)  # FINAL
    gate.settle("c", "pay", lambda outcome, _ctx: outcome)
    gate.signal("c", "model-c", "reject", 1.0)  # late
    gate.resolve("r", "reject", by="alice", reason="manual review")
    gate.signal("new", "model-a", "approve", 0.5)
    changed = []

    class ChangingWhileRead:
        """The real store, whose chain read returns the earlier snapshot, and whose first
        read of case r's events is preceded by a late signal on it."""

        def __getattr__(self, name: str) -> Any:
            return getattr(guard.store, name)

        def audit_chain(self) -> Any:
            return snapshot

        def events(self, **kwargs: Any) -> Any:
            if kwargs.get("subject") == "r" and not changed:
                changed.append(gate.signal("r", "model-c", "approve", 1.0))
            return guard.store.events(**kwargs)

    guard.close()
    report = verify(ChangingWhileRead())
    assert changed
    assert report.ok, report.problems
    assert (report.cases_checked, report.signals_checked) == (3, 7)


def test_verify_running_beside_gate_writers_finds_nothing(db_store: Any) -> None:
    """verify run over and over while threads send signals, resolve and settle cases:
    never a false alarm, on SQLite and PostgreSQL."""
    import threading

    from safeagent import ConsensusPolicy, FinalityGate

    guard = Guard(db_store, wait=0)
    gate = FinalityGate(guard, policy=ConsensusPolicy(0.9, 2))
    failures: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(12):
                case_id = f"w{worker}-{i}"
                gate.signal(case_id, "model-a", "approve", 0.9)
                gate.signal(case_id, "model-b", "reject" if i % 3 == 0 else "approve", 0.9)
                if i % 3 == 0:
                    gate.resolve(case_id, "reject", by="ops", reason="conflict")
                gate.settle(case_id, "pay", lambda outcome, _ctx: outcome)
                gate.signal(case_id, "model-c", "approve", 0.5)  # late
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    writers = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for thread in writers:
        thread.start()
    reports = []
    while any(t.is_alive() for t in writers) or not reports:
        reports.append(verify(db_store))
    for thread in writers:
        thread.join()
    guard.close()
    assert not failures, failures
    assert all(r.ok for r in reports), [r.problems for r in reports if not r.ok][:1]
    final = verify(db_store)
    assert final.ok, final.problems
    assert (final.cases_checked, final.signals_checked) == (36, 108)


# -- false alarms under concurrent purges, and holes found by review -------------------------


def test_a_record_purged_while_verify_reads_it_again_is_not_reported(
    db_store: Any, clock: FakeClock
) -> None:
    """Two requests finish after verify read the chains (their records meet no event, and
    are read again), and a retention pass purges both right after verify read the
    retention passes for the first of them: the second is read again as a tombstone whose
    pass the earlier read lacks; the passes are read again, and nothing is reported."""
    guard = Guard(db_store)
    guard.execute("warm", "charge", {}, lambda _ctx: 1)
    purged: list[Any] = []

    class PurgedWhileRead:
        def __getattr__(self, name: str) -> Any:
            return getattr(db_store, name)

        def records(self, **kwargs: Any) -> Any:
            if kwargs.get("limit") != 0 and not purged:
                for rid in ("x", "y"):
                    guard.execute(rid, "charge", {"r": rid}, lambda _ctx: {"ok": True})
            return db_store.records(**kwargs)

        def events(self, **kwargs: Any) -> Any:
            found = db_store.events(**kwargs)
            if kwargs.get("subject") == "*retention*" and not purged:
                clock.advance(5)
                purged.append(purge(db_store, older_than=1))
            return found

    report = verify(PurgedWhileRead())
    assert purged
    assert purged[0].tombstoned == 3
    assert report.ok, report.problems
    guard.close()
    assert verify(db_store).ok


def _shift_ids_and_add_a_legacy_row(store: Any, subject: str, kind: str) -> None:
    """What a database writer can do, since ids are not hashed: move every event's id up,
    and put a row with every chain column NULL below them all, as a pre-chain schema's
    event would be."""
    _sql(store, "UPDATE {s}.audit_events SET id = id + 100000")
    _sql(
        store,
        "INSERT INTO {s}.audit_events (id, at_ms, kind, namespace, subject, detail)"
        " VALUES (1, 0, %s, 'default', %s, '{}')",
        kind,
        subject,
    )


def test_a_legacy_row_added_by_hand_hides_no_chained_subject(
    db_store: Any, clock: FakeClock
) -> None:
    """A case with chained events is judged on them, whatever rows outside the chains
    claim to be its earlier history: edited to FINAL behind one hand-made "legacy" row, it
    is still a case_edited. A record forged with no chained event behind such a row was
    changed after the chains began, which no record written before them was: a
    receipt_edited, not an unverified legacy record."""
    from safeagent import ConsensusPolicy, FinalityGate

    guard = Guard(db_store)
    gate = FinalityGate(guard, policy=ConsensusPolicy(threshold=0.7, quorum=2))
    gate.signal("refund-1", "fraud", "approve", 0.9)
    clock.advance(1)
    gate.signal("refund-1", "policy", "reject", 0.9)  # IN_RECONCILIATION
    clock.advance(1)
    guard.execute("paid", "charge", {"a": 1}, lambda _ctx: {"charge": "ch_1"})
    guard.close()
    assert verify(db_store).ok
    _shift_ids_and_add_a_legacy_row(db_store, "refund-1", "signal")
    _sql(
        db_store,
        "UPDATE {s}.cases SET state = 'FINAL', outcome = 'approve', provisional_outcome = NULL"
        " WHERE case_id = 'refund-1'",
    )
    report = verify(db_store)
    assert report.events_legacy == 1
    assert _kinds(report) == {"case_edited"}
    assert _named(report, "case_edited") == {"refund-1"}
    assert report.cases_unverified == 0
    columns = [c.strip() for c in COLUMNS.split(",")]
    picked = ", ".join("%s" if c == "request_id" else c for c in columns)
    _sql(
        db_store,
        f"INSERT INTO {{s}}.executions ({', '.join(columns)}) SELECT {picked}"
        " FROM {s}.executions WHERE request_id = 'paid'",
        "order-9",
    )
    _sql(
        db_store,
        "INSERT INTO {s}.audit_events (id, at_ms, kind, namespace, subject, detail)"
        " VALUES (2, 0, 'claimed', 'default', 'order-9', '{}')",
    )
    report = verify(db_store)
    assert _named(report) == {"order-9"}
    assert "after the chains began" in next(
        p.detail for p in report.problems if p.kind == "receipt_edited"
    )
    assert report.receipts_unverified == 0


def _in_doubt_guard(store: Any, hook: Any = None) -> Guard:
    from safeagent import ActionPolicy

    actions = {} if hook is None else {"charge": ActionPolicy(reconcile=hook)}
    return Guard(store, wait=0, owner="worker-A", outcome_unknown=(TimeoutError,), actions=actions)


def _timeout(_ctx: Any) -> None:
    raise TimeoutError("no answer")


def test_facts_of_the_attempt_in_doubt_cleared_after_a_take_over_are_found(
    db_store: Any, clock: FakeClock
) -> None:
    """After a reconcile take-over recorded the attempt's facts, clearing ended_attempt
    (so a hook is told the record's own owner and end, moved an hour back) is a
    receipt_edited: the record no longer holds what the take-over recorded."""
    from safeagent import Reconciliation

    guard = _in_doubt_guard(db_store, lambda _req: Reconciliation.unknown())
    with pytest.raises(TimeoutError):
        guard.execute("pay-2", "charge", {}, _timeout)
    clock.advance(5)
    with pytest.raises(OutcomeUnknownError):
        guard.execute("pay-2", "charge", {}, _timeout)  # taken over, the hook: unknown
    guard.close()
    assert verify(db_store).ok
    _sql(
        db_store,
        "UPDATE {s}.executions SET ended_attempt = NULL, updated_at_ms = updated_at_ms -"
        " 3600000 WHERE request_id = 'pay-2'",
    )
    report = verify(db_store)
    assert _named(report) == {"pay-2"}
    assert "differs from what its take-over event recorded" in report.problems[0].detail


def test_the_owner_or_end_of_an_attempt_in_doubt_moved_before_a_take_over_is_found(
    db_store: Any, clock: FakeClock
) -> None:
    """Before any take-over, a hook is told the in-doubt record's lease owner and its
    last change: the owner of its claim and the instant of the event that left it
    IN_DOUBT. Either moved (the end by more than a second) is a receipt_edited."""
    guard = _in_doubt_guard(db_store)
    for rid in ("owner", "end"):
        with pytest.raises(TimeoutError):
            guard.execute(rid, "charge", {}, _timeout)
    guard.close()
    assert verify(db_store).ok
    _sql(db_store, "UPDATE {s}.executions SET lease_owner = 'someone' WHERE request_id = 'owner'")
    _sql(
        db_store,
        "UPDATE {s}.executions SET updated_at_ms = updated_at_ms - 3600000"
        " WHERE request_id = 'end'",
    )
    report = verify(db_store)
    assert _named(report) == {"owner", "end"}
    details = {p.detail.split("'")[1]: p.detail for p in report.problems}
    assert "though its claim was 'worker-A'" in details["owner"]
    assert "though the event that left it IN_DOUBT is at" in details["end"]


def test_a_deleted_released_record_is_reported_unless_an_old_retention_pass_covers_it(
    db_store: Any, clock: FakeClock
) -> None:
    """Releases before retention kept released rows deleted them (their passes count
    them as "deleted"): a released record deleted is no alarm when such a pass, with a
    cutoff after its release, is in the chains; otherwise (its fencing tokens would start
    again at 1) it is a receipt_edited, and so is a pending claim deleted."""
    from safeagent import NotExecuted
    from safeagent.stores._base import purged_event

    guard = Guard(db_store)

    def not_sent(_ctx: Any) -> None:
        raise NotExecuted

    for _ in range(3):
        with pytest.raises(NotExecuted):
            guard.execute("released", "charge", {}, not_sent)

    def crash_midway(_ctx: Any) -> None:
        raise KeyboardInterrupt  # leaves the record in doubt, as a crash would

    with pytest.raises(KeyboardInterrupt):
        guard.execute("claimed", "charge", {}, crash_midway)
    guard.close()
    _sql(db_store, "DELETE FROM {s}.executions WHERE request_id = 'released'")
    report = verify(db_store)
    assert _named(report) == {"released"}
    assert "no retention pass that deleted released records" in report.problems[0].detail
    clock.advance(10)
    # this release's pass (it keeps released rows, and counts them as "released")
    purge(db_store, older_than=1)
    assert _named(verify(db_store)) == {"released"}
    counts = {"tombstoned": 0, "deleted": 1, "kept_pending": 1, "kept_in_doubt": 0}
    db_store.record_event(purged_event(clock(), clock() - 1000, "old", counts))
    assert verify(db_store).ok
    _sql(db_store, "DELETE FROM {s}.executions WHERE request_id = 'claimed'")
    assert _named(verify(db_store)) == {"claimed"}


@pytest.mark.parametrize(
    "detail",
    [
        {},
        {"status": "SUCCEEDED"},
        {"error": None, "status": "FAILED", "n": -(2**70), "t": '\u00e9"\\\n\ud800\U0001f600'},
        {"nested": {"a": [1, 2.5, None]}, "flag": True},
        {1: "int key", None: "none key"},
    ],
)
def test_event_row_detail_text_is_the_checked_encoders(detail: dict) -> None:
    """A flat detail takes the encoder built once; its text is the checked encoder's."""
    from safeagent._audit import EventKind, new_event
    from safeagent.stores._rows import _DUMPS, event_row

    event = new_event(EventKind.REPLAYED, 1, "ns", "rid", None, None, None, None, detail)
    assert event_row(event)[-1] == _DUMPS.encode(detail)
