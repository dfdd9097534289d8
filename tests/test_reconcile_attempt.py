"""Every reconcile round is told about the attempt in doubt, never about a reconciler.

A reconcile take-over overwrites the record's lease owner and lease expiry with the
reconciler's own. The facts of the attempt that ran ``fn`` (its owner, and when it ended:
its lease expiry if it died, or the instant it recorded the in-doubt outcome itself) are
recorded by the first take-over of that attempt and kept by the later ones, so
``ReconcileRequest.owner`` and ``.lease_expired_at_ms``, ``OutcomeUnknownError`` and the
in-doubt listings name that attempt in every round: after a hook answered unknown, raised,
timed out or returned junk, and after a reconciler died inside its hook.

Runs on the memory store, SQLite files and the PostgreSQL server (conftest's
``store_kind``), on the fake clock; the migration tests build a database of the previous
schema version from its own DDL; two tests SIGKILL a real reconciler process.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from safeagent import (
    ActionPolicy,
    AsyncGuard,
    EventKind,
    ExecutionContext,
    Guard,
    OutcomeUnknownError,
    Receipt,
    ReconcileRequest,
    Reconciliation,
    SQLiteStore,
    Status,
)
from safeagent._keys import canonical_json, downstream_key, fingerprint
from safeagent.stores import ClaimRequest
from safeagent.stores import sqlite as sqlite_module
from tests._workers import kill_when_marked, wait_until
from tests.conftest import PG_URL, START_MS, FakeClock, Ledger, pg_schema, require_postgres

ACTION = "send_invoice"
INVOICE = {"invoice_id": "INV-1", "amount_cents": 500}
ATTEMPT_OWNER = "worker-a:4242:MainThread"
LEASE_MS = 30_000
RAN_FOR_MS = 7_000  # how long fn ran before it timed out (a "timed_out" attempt)
SQL_KINDS = pytest.mark.parametrize("store_kind", ["sqlite", "postgres"], indirect=True)


class AckTimeout(Exception):
    """The downstream system did not acknowledge: it may or may not have acted."""


@dataclass(frozen=True)
class Attempt:
    """The attempt left in doubt: its owner, and when it ended (store clock, ms)."""

    owner: str
    claimed_at_ms: int
    ended_at_ms: int


def died(store: Any, clock: FakeClock, request_id: str, owner: str = ATTEMPT_OWNER) -> Attempt:
    """Attempt 1 claims with a 30 s lease and dies (never renews, never completes); 31 s
    later its lease has run out on the store's clock and the record reads as in doubt."""
    body = canonical_json(INVOICE)
    claim = store.claim(
        ClaimRequest(
            namespace="default",
            request_id=request_id,
            action=ACTION,
            fingerprint=fingerprint(ACTION, body),
            payload_json=body.decode(),
            execution_id="dead-" + request_id,
            owner=owner,
            lease_ms=LEASE_MS,
            downstream_key=downstream_key("default", ACTION, request_id),
        )
    )
    assert claim.won
    clock.advance(31)
    expiry = claim.record.lease_expires_at_ms
    assert expiry == claim.record.claimed_at_ms + LEASE_MS
    return Attempt(owner, claim.record.claimed_at_ms, expiry)


def timed_out(store: Any, clock: FakeClock, request_id: str, owner: str = ATTEMPT_OWNER) -> Attempt:
    """``fn`` runs 7 s, then raises an exception declared "outcome unknown": the attempt
    itself records IN_DOUBT at that instant, 23 s before its lease would have run out."""

    def fn(ctx: ExecutionContext) -> None:
        clock.advance(RAN_FOR_MS / 1000)
        raise AckTimeout("no acknowledgement")

    guard = Guard(store, lease=30.0, wait=0, owner=owner, outcome_unknown=(AckTimeout,))
    with pytest.raises(AckTimeout):
        guard.execute(request_id, ACTION, INVOICE, fn)
    guard.close()
    record, _ = store.get("default", request_id)
    assert record.status is Status.IN_DOUBT
    assert record.updated_at_ms == record.claimed_at_ms + RAN_FOR_MS
    assert record.lease_expires_at_ms == record.claimed_at_ms + LEASE_MS
    return Attempt(owner, record.claimed_at_ms, record.claimed_at_ms + RAN_FOR_MS)


LEAVE_IN_DOUBT: dict[str, Callable[..., Attempt]] = {"died": died, "timed_out": timed_out}
DOUBTS = pytest.mark.parametrize("doubt", sorted(LEAVE_IN_DOUBT))


def never(ctx: ExecutionContext) -> None:
    raise AssertionError("fn must not run while the record is in doubt")


def call(
    api: str,
    store: Any,
    owner: str,
    hook: Callable[[ReconcileRequest], Any] | None,
    request_id: str,
    fn: Callable[[ExecutionContext], Any] = never,
) -> Receipt | Exception:
    """One call of ``request_id`` by a :class:`Guard` or an :class:`AsyncGuard` owned by
    ``owner`` (lease 30 s, ``wait=0``): its receipt, or the exception it raised."""
    actions = {} if hook is None else {ACTION: ActionPolicy(reconcile=hook)}
    kwargs: dict[str, Any] = {
        "lease": 30.0,
        "wait": 0,
        "owner": owner,
        "actions": actions,
        "outcome_unknown": (AckTimeout,),
    }
    if api == "sync":
        guard = Guard(store, **kwargs)
        try:
            return guard.execute(request_id, ACTION, INVOICE, fn)
        except Exception as exc:  # the test looks at it
            return exc
        finally:
            guard.close()

    async def run() -> Receipt | Exception:
        aguard = AsyncGuard(store, **kwargs)
        try:
            return await aguard.execute(request_id, ACTION, INVOICE, fn)
        except Exception as exc:  # the test looks at it
            return exc
        finally:
            await aguard.aclose()

    return asyncio.run(run())


def check_names_the_attempt(error: Any, attempt: Attempt, *, number: int = 1) -> None:
    """``error`` is the "outcome unknown" error of attempt ``number`` by ``attempt.owner``."""
    assert isinstance(error, OutcomeUnknownError), error
    assert error.owner == attempt.owner
    assert error.attempt == number
    assert error.claimed_at_ms == attempt.claimed_at_ms
    assert f"attempt {number} by {attempt.owner} " in str(error)
    assert error.receipt.attempt_owner == attempt.owner
    assert error.receipt.attempt_ended_at_ms == attempt.ended_at_ms


def listed(store: Any, request_id: str) -> Receipt:
    """The receipt ``Guard.in_doubt()`` lists for ``request_id``."""
    with Guard(store, wait=0, owner="lister") as guard:
        [receipt] = [r for r in guard.in_doubt() if r.request_id == request_id]
    return receipt


# -- rounds after an unknown, a raising, a timed-out or a junk answer --------------------------


def _unknown(req: ReconcileRequest) -> Any:
    return Reconciliation.unknown(note="mail API cannot tell")


def _timed_out(req: ReconcileRequest) -> Any:
    raise TimeoutError("mail API did not answer within 5 s")


def _raises(req: ReconcileRequest) -> Any:
    raise ConnectionError("mail API unreachable")


def _junk(req: ReconcileRequest) -> Any:
    return {"verdict": "happened"}  # not a Reconciliation: read as unknown


ROUNDS = (_unknown, _timed_out, _raises, _junk, _unknown)


@pytest.mark.parametrize("api", ["sync", "async"])
@DOUBTS
def test_every_round_is_asked_about_the_attempt_that_ran_fn(
    api: str, doubt: str, store: Any, clock: FakeClock
) -> None:
    """Five rounds, each by another reconciler 20 s (less than a lease) after the last, whose
    hooks answer unknown, time out, raise, return junk, answer unknown: every hook is told
    attempt 1's owner and the instant it ended, and every round's error and the in-doubt
    listing name attempt 1 by its owner, while the lease is the last reconciler's."""
    attempt = LEAVE_IN_DOUBT[doubt](store, clock, "r-rounds")
    asked: list[ReconcileRequest] = []
    tokens: list[int] = []
    for n, answer in enumerate(ROUNDS, start=1):
        record, _ = store.get("default", "r-rounds")
        tokens.append(record.fencing_token)

        def hook(req: ReconcileRequest, answer: Callable[..., Any] = answer) -> Any:
            asked.append(req)
            return answer(req)

        reconciler = f"reconciler-{n}:{100 + n}:MainThread"
        error = call(api, store, reconciler, hook, "r-rounds")
        check_names_the_attempt(error, attempt)
        assert isinstance(error, OutcomeUnknownError)
        assert error.receipt.lease_owner == reconciler  # the lease is the reconciler's
        receipt = listed(store, "r-rounds")
        assert (receipt.attempt_owner, receipt.attempt_ended_at_ms) == (
            attempt.owner,
            attempt.ended_at_ms,
        )
        assert receipt.lease_owner == reconciler
        clock.advance(20)
    assert len(asked) == len(ROUNDS)
    for n, req in enumerate(asked):
        assert req.owner == attempt.owner, f"round {n + 1}"
        assert req.lease_expired_at_ms == attempt.ended_at_ms, f"round {n + 1}"
        assert req.attempt == 1
        assert req.claimed_at_ms == attempt.claimed_at_ms
        assert req.fencing_token == tokens[n] + 1
    stored, _ = store.get("default", "r-rounds")
    assert stored.status is Status.IN_DOUBT
    assert stored.lease_owner == f"reconciler-{len(ROUNDS)}:{100 + len(ROUNDS)}:MainThread"
    assert (stored.attempt_owner, stored.attempt_ended_at_ms, stored.ended_attempt) == (
        attempt.owner,
        attempt.ended_at_ms,
        1,
    )


def test_an_attempt_that_recorded_its_own_doubt_ended_when_it_recorded_it(
    store: Any, clock: FakeClock
) -> None:
    """``fn`` raising an "outcome unknown" exception at t: the hook is told t (store clock),
    not the attempt's lease expiry 23 s later, in the first round and after an unknown."""
    attempt = timed_out(store, clock, "r-t")
    record, _ = store.get("default", "r-t")
    t = attempt.claimed_at_ms + RAN_FOR_MS
    assert record.updated_at_ms == t
    asked: list[ReconcileRequest] = []

    def hook(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.unknown()

    for _ in range(2):
        check_names_the_attempt(call("sync", store, "reconciler", hook, "r-t"), attempt)
    assert [(r.owner, r.lease_expired_at_ms) for r in asked] == [(ATTEMPT_OWNER, t)] * 2
    assert t < record.lease_expires_at_ms


# -- a reconciler that dies inside its hook ---------------------------------------------------


@DOUBTS
def test_a_reconciler_that_never_finishes_leaves_the_attempt_for_the_next_round(
    doubt: str, store: Any, clock: FakeClock
) -> None:
    """Two reconcilers in a row take the record over and never complete (as a SIGKILL
    inside the hook leaves it: PENDING under the reconciler's lease); once each lease runs
    out, the listing, the "outcome unknown" error and its audit event name attempt 1's
    owner, and the next hook is told attempt 1's owner and end."""
    attempt = LEAVE_IN_DOUBT[doubt](store, clock, "r-killed")
    for n in (1, 2):
        record, _ = store.get("default", "r-killed")
        killed = f"reconciler-killed-{n}:9{n}:MainThread"
        taken = store.take_over("default", "r-killed", record.fencing_token, killed, LEASE_MS)
        assert taken.accepted
        assert taken.record.status is Status.PENDING
        assert taken.record.lease_owner == killed
        assert taken.record.attempt_facts() == (attempt.owner, attempt.ended_at_ms)
        clock.advance(31)  # the killed reconciler's lease runs out
        receipt = listed(store, "r-killed")
        assert receipt.lease_owner == killed
        assert (receipt.attempt_owner, receipt.attempt_ended_at_ms) == (
            attempt.owner,
            attempt.ended_at_ms,
        )
        check_names_the_attempt(call("sync", store, "observer", None, "r-killed"), attempt)
    with Guard(store, wait=0, owner="auditor") as guard:
        observed = [
            e.detail["owner"]
            for e in guard.audit_trail("r-killed")
            if e.kind is EventKind.IN_DOUBT and e.detail.get("observed")
        ]
    assert observed == [attempt.owner, attempt.owner]
    asked: list[ReconcileRequest] = []

    def hook(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.happened({"mail_id": "m-1"})

    done = call("sync", store, "reconciler-3", hook, "r-killed")
    assert isinstance(done, Receipt)
    assert done.status is Status.SUCCEEDED
    [req] = asked
    assert (req.owner, req.lease_expired_at_ms, req.attempt) == (
        attempt.owner,
        attempt.ended_at_ms,
        1,
    )


# -- the README's rule settles ---------------------------------------------------------------


@DOUBTS
def test_a_hook_following_the_readme_rule_settles_once_the_downstream_timeout_passed(
    doubt: str, store: Any, clock: FakeClock, ledger: Ledger
) -> None:
    """Calls every 20 s (less than the 30 s lease) each run the hook, which answers
    not_happened only once ``req.now_ms`` (the store's clock) is at least
    ``req.lease_expired_at_ms`` plus
    the downstream timeout (45 s): the instant does not move between rounds, so the first
    call at or after it settles, and fn runs once, as attempt 2."""
    timeout_ms = 45_000
    attempt = LEAVE_IN_DOUBT[doubt](store, clock, "r-rule")
    asked: list[ReconcileRequest] = []

    def hook(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        assert req.lease_expired_at_ms is not None
        assert req.now_ms == clock()  # the store's clock as the round began
        if req.now_ms >= req.lease_expired_at_ms + timeout_ms:
            return Reconciliation.not_happened(note="no request of it can still arrive")
        return Reconciliation.unknown(note="a request of it may still be in flight")

    def send(ctx: ExecutionContext) -> dict[str, Any]:
        ledger.append(ctx.request_id, ctx.execution_id)
        return {"sent": ctx.attempt}

    policy = ActionPolicy(reconcile=hook)
    guard = Guard(store, lease=30.0, wait=0, owner="caller", actions={ACTION: policy})
    calls = 0
    try:
        while True:
            calls += 1
            assert calls <= 10, "the hook never settled: its instant kept moving"
            try:
                ran = guard.execute("r-rule", ACTION, INVOICE, send)
                break
            except OutcomeUnknownError:
                clock.advance(20)
    finally:
        guard.close()
    settled_at = clock()
    assert settled_at >= attempt.ended_at_ms + timeout_ms > settled_at - 20_000
    assert ran.attempt == 2
    assert ran.replay is False
    assert ran.result == {"sent": 2}
    assert len(asked) == calls
    assert {(r.owner, r.lease_expired_at_ms) for r in asked} == {
        (attempt.owner, attempt.ended_at_ms)
    }
    assert ledger.count() == 1


# -- a new attempt starts with its own facts --------------------------------------------------


@pytest.mark.parametrize("release", ["not_happened", "resolved_released", "rerun"])
def test_a_new_attempt_after_a_release_is_reported_on_its_own_facts(
    release: str, store: Any, clock: FakeClock
) -> None:
    """Attempt 1 dies; a reconcile round records its facts; the record is released (the
    hook's not_happened, an operator's release, or a failure then an audited rerun); the
    claim of attempt 2 clears the facts; attempt 2 (another owner) times out in fn at t2:
    the next hook is told attempt 2's owner and t2, and its error names attempt 2."""
    first = died(store, clock, "r-new")
    second_owner = "worker-b:5151:MainThread"

    def times_out(ctx: ExecutionContext) -> None:
        clock.advance(3)
        raise AckTimeout("no acknowledgement")

    answer = {
        "not_happened": Reconciliation.not_happened(),
        "resolved_released": Reconciliation.unknown(),
        "rerun": Reconciliation.failed("MailRejected", "bounced"),
    }[release]
    asked: list[ReconcileRequest] = []

    def hook(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return answer if len(asked) == 1 else Reconciliation.unknown()

    outcome = call("sync", store, second_owner, hook, "r-new", times_out)
    record, _ = store.get("default", "r-new")
    if release != "not_happened":  # the round stored its answer; release it, then call again
        assert record.ended_attempt == 1
        assert (record.attempt_owner, record.attempt_ended_at_ms) == (
            first.owner,
            first.ended_at_ms,
        )
        with Guard(store, wait=0, owner="operator") as guard:
            how = "released" if release == "resolved_released" else "rerun"
            guard.resolve("r-new", how, by="alice", reason="the mail log has no such mail")
        outcome = call("sync", store, second_owner, hook, "r-new", times_out)
    assert isinstance(outcome, AckTimeout)  # attempt 2 ran fn, which timed out
    record, _ = store.get("default", "r-new")
    assert (record.attempt, record.status) == (2, Status.IN_DOUBT)
    assert (record.attempt_owner, record.attempt_ended_at_ms, record.ended_attempt) == (
        None,
        None,
        None,
    )
    t2 = record.updated_at_ms
    second = Attempt(second_owner, record.claimed_at_ms, t2)
    assert t2 == record.claimed_at_ms + 3_000
    check_names_the_attempt(call("sync", store, "observer", None, "r-new"), second, number=2)
    clock.advance(5)
    error = call("sync", store, "reconciler-2", hook, "r-new")
    check_names_the_attempt(error, second, number=2)
    assert [(r.attempt, r.owner, r.lease_expired_at_ms) for r in asked] == [
        (1, first.owner, first.ended_at_ms),
        (2, second_owner, t2),
    ]


def _claim_as_an_older_release(store: Any, request_id: str, owner: str, now: int) -> None:
    """Claim a RELEASED record with the previous release's statement, which does not know
    the attempt-facts columns and so leaves them as they are (a rolling upgrade)."""
    sets = (
        "status = 'PENDING', attempt = attempt + 1, fencing_token = fencing_token + 1,"
        " execution_id = 'old-release', lease_owner = {p}, lease_expires_at_ms = {p},"
        " claimed_at_ms = {p}, updated_at_ms = {p}"
    )
    where = " WHERE namespace = 'default' AND request_id = {p} AND status = 'RELEASED'"
    params = (owner, now + LEASE_MS, now, now, request_id)
    if isinstance(store, SQLiteStore):
        with closing(sqlite3.connect(store.path)) as conn, conn:
            sql = "UPDATE executions SET " + (sets + where).format(p="?")
            assert conn.execute(sql, params).rowcount == 1
        return
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as pg:
        sql = f"UPDATE {store.schema}.executions SET " + (sets + where).format(p="%s")
        assert pg.execute(sql, params).rowcount == 1


@SQL_KINDS
def test_facts_of_an_earlier_attempt_are_ignored_after_an_older_release_claims(
    store: Any, clock: FakeClock
) -> None:
    """An older SafeAgent sharing the database during a rolling upgrade claims a released
    record without clearing the facts of attempt 1; its attempt dies too: the hook is told
    that attempt's (2) owner and lease expiry, not attempt 1's stale ones."""
    first = died(store, clock, "r-old")
    verdicts = iter([Reconciliation.unknown(), Reconciliation.not_happened()])
    policy = ActionPolicy(reconcile=lambda req: next(verdicts))
    with Guard(store, wait=0, actions={ACTION: policy}) as g:
        assert g.reconcile().unknown == 1
        assert g.reconcile().not_happened == 1
    record, now = store.get("default", "r-old")
    assert (record.status, record.ended_attempt, record.attempt_owner) == (
        Status.RELEASED,
        1,
        first.owner,
    )
    _claim_as_an_older_release(store, "r-old", "old-release:77:MainThread", now)
    clock.advance(31)
    second = Attempt("old-release:77:MainThread", now, now + LEASE_MS)
    # Before any take-over of attempt 2: read from the record, the stale facts ignored.
    stale, _ = store.get("default", "r-old")
    assert (stale.attempt, stale.ended_attempt, stale.attempt_owner) == (2, 1, first.owner)
    receipt = listed(store, "r-old")
    assert (receipt.attempt_owner, receipt.attempt_ended_at_ms) == (second.owner, now + LEASE_MS)
    check_names_the_attempt(call("sync", store, "observer", None, "r-old"), second, number=2)
    asked: list[ReconcileRequest] = []

    def hook(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.unknown()

    error = call("sync", store, "reconciler", hook, "r-old")
    check_names_the_attempt(error, second, number=2)
    [req] = asked
    assert (req.attempt, req.owner, req.lease_expired_at_ms) == (2, second.owner, now + LEASE_MS)


# -- the operator CLI ----------------------------------------------------------------------------


def test_cli_in_doubt_list_names_the_attempts_owner(tmp_path: Path, clock: FakeClock) -> None:
    """After a round whose hook answered unknown, `safeagent in-doubt list` shows attempt
    1's owner and end (table OWNER column, JSON attempt_owner / attempt_ended_at_ms) next
    to the reconciler's lease."""
    from safeagent._cli import app

    db = tmp_path / "guard.db"
    store = SQLiteStore(db, clock=clock)
    attempt = died(store, clock, "r-cli")
    check_names_the_attempt(call("sync", store, "reconciler-1", _unknown, "r-cli"), attempt)
    store.close()
    runner = CliRunner()
    result = runner.invoke(app, ["in-doubt", "list", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["lease_owner"] == "reconciler-1"
    assert (row["attempt_owner"], row["attempt_ended_at_ms"]) == (
        attempt.owner,
        attempt.ended_at_ms,
    )
    table = runner.invoke(app, ["in-doubt", "list", "--db", str(db)])
    assert table.exit_code == 0, table.output
    assert attempt.owner in table.stdout
    assert "reconciler-1" not in table.stdout


# -- a database of the previous schema version --------------------------------------------------

OLD_COLUMNS = (
    "namespace, request_id, action, fingerprint, status, payload, result, error_type,"
    " error_message, execution_id, attempt, fencing_token, lease_owner, lease_expires_at_ms,"
    " downstream_key, created_at_ms, claimed_at_ms, updated_at_ms, completed_at_ms,"
    " purged_at_ms"
)
OLD_RECONCILER = "old-reconciler:31:MainThread"


def _old_row(
    request_id: str, status: str, token: int, owner: str, lease_end: int, updated: int
) -> tuple[Any, ...]:
    body = canonical_json(INVOICE)
    return (
        "default",
        request_id,
        ACTION,
        fingerprint(ACTION, body),
        status,
        body.decode(),
        None,
        None,
        None,
        "old-" + request_id,
        1,
        token,
        owner,
        lease_end,
        downstream_key("default", ACTION, request_id),
        START_MS,
        START_MS,
        updated,
        None,
        None,
    )


# Rows as the previous release left them (claimed at START_MS by ATTEMPT_OWNER, lease 30 s):
# - old-died: PENDING, the attempt died, its lease ran out at START_MS + 30 s;
# - old-timed-out: fn timed out and stored IN_DOUBT at START_MS + 7 s;
# - old-retaken: a reconciler of the previous release took old-died's twin over at
#   START_MS + 31 s and its hook answered unknown at START_MS + 32 s: the row no longer
#   names the attempt (the defect this release fixes), so the hook is told that reconciler
#   and an instant no earlier than the attempt's real end (docs: Record.attempt_facts).
OLD_ROWS = (
    _old_row("old-died", "PENDING", 1, ATTEMPT_OWNER, START_MS + 30_000, START_MS),
    _old_row("old-timed-out", "IN_DOUBT", 1, ATTEMPT_OWNER, START_MS + 30_000, START_MS + 7_000),
    _old_row("old-retaken", "IN_DOUBT", 2, OLD_RECONCILER, START_MS + 61_000, START_MS + 32_000),
)
EXPECTED = {
    "old-died": (ATTEMPT_OWNER, START_MS + 30_000),
    "old-timed-out": (ATTEMPT_OWNER, START_MS + 7_000),
    "old-retaken": (OLD_RECONCILER, START_MS + 32_000),
}


@pytest.fixture(params=["sqlite", "postgres"])
def previous_version_store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[tuple[Any, Callable[[], str]]]:
    """A database built with the previous schema version's own DDL (SQLite migrations 1-4,
    PostgreSQL 1-2) holding OLD_ROWS, then opened by this release (which migrates it),
    with a function reading its stored schema version."""
    clock.now_ms = START_MS + 40_000  # every old row is in doubt
    if request.param == "sqlite":
        path = tmp_path / "v4.db"
        with closing(sqlite3.connect(path, isolation_level=None)) as conn, conn:
            conn.execute("CREATE TABLE safeagent_meta (key TEXT PRIMARY KEY, value TEXT)")
            for statements in sqlite_module.MIGRATIONS[:4]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("INSERT INTO safeagent_meta VALUES ('schema_version', '4')")
            conn.executemany(
                f"INSERT INTO executions ({OLD_COLUMNS}) VALUES ({', '.join('?' * 20)})",
                OLD_ROWS,
            )

        def version() -> str:
            with closing(sqlite3.connect(path)) as conn, conn:
                return str(
                    conn.execute(
                        "SELECT value FROM safeagent_meta WHERE key = 'schema_version'"
                    ).fetchone()[0]
                )

        store = SQLiteStore(path, clock=clock)
        yield store, version
        store.close()
        return
    require_postgres()
    import psycopg

    from safeagent.stores import _pg_sql
    from safeagent.stores.postgres import PostgresStore

    schema = pg_schema()
    with psycopg.connect(PG_URL, autocommit=True) as pg:
        pg.execute(f"CREATE SCHEMA {schema}")
        pg.execute(f"CREATE TABLE {schema}.safeagent_meta (key TEXT PRIMARY KEY, value TEXT)")
        for statements in _pg_sql.MIGRATIONS[:2]:
            for statement in statements:
                pg.execute(statement.replace("{s}", schema))
        # version 2 as its release made it: 16 chains (migration 2 begins 256 now)
        pg.execute(f"DELETE FROM {schema}.audit_chain WHERE shard >= 16")
        pg.execute(f"INSERT INTO {schema}.safeagent_meta VALUES ('schema_version', '2')")
        with pg.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {schema}.executions ({OLD_COLUMNS})"
                f" VALUES ({', '.join(['%s'] * 20)})",
                OLD_ROWS,
            )

    def pg_version() -> str:
        with psycopg.connect(PG_URL, autocommit=True) as pg:
            row = pg.execute(
                f"SELECT value FROM {schema}.safeagent_meta WHERE key = 'schema_version'"
            ).fetchone()
        assert row is not None
        return str(row[0])

    pg_store = PostgresStore(PG_URL, schema=schema, clock=clock)
    try:
        yield pg_store, pg_version
    finally:
        pg_store.drop_schema()
        pg_store.close()


def test_a_previous_version_database_migrates_and_its_in_doubt_rows_reconcile(
    previous_version_store: tuple[Any, Callable[[], str]], clock: FakeClock, ledger: Ledger
) -> None:
    """Opening a database of the previous schema version migrates it (new columns NULL in
    the old rows); its in-doubt rows are listed with the attempt's owner, every round's
    hook is told the facts derived from the old row, and they settle: not_happened runs fn
    once as attempt 2."""
    store, version = previous_version_store
    from safeagent.stores import _pg_sql

    # PostgreSQL: version 3, its chains having begun at version 2 (version 4 is a schema
    # whose chains begin now, _pg_sql.SCHEMA_VERSION)
    expected_version = (
        sqlite_module.SCHEMA_VERSION if isinstance(store, SQLiteStore) else len(_pg_sql.MIGRATIONS)
    )
    assert version() == str(expected_version)
    records, _ = store.records()
    assert {r.request_id: (r.attempt_owner, r.ended_attempt) for r in records} == dict.fromkeys(
        EXPECTED, (None, None)
    )
    with Guard(store, wait=0, owner="lister") as guard:
        doubts = guard.in_doubt()
    assert {r.request_id: (r.attempt_owner, r.attempt_ended_at_ms) for r in doubts} == EXPECTED
    asked: list[ReconcileRequest] = []
    settle = False

    def hook(req: ReconcileRequest) -> Reconciliation:
        asked.append(req)
        return Reconciliation.not_happened() if settle else Reconciliation.unknown()

    for _ in range(2):  # two rounds answered unknown: the facts stay
        policy = ActionPolicy(reconcile=hook)
        with Guard(store, wait=0, owner="reconciler", actions={ACTION: policy}) as g:
            report = g.reconcile()
        assert report.unknown == 3
        clock.advance(20)
    assert sorted((r.request_id, r.owner, r.lease_expired_at_ms) for r in asked) == sorted(
        (rid, *facts) for rid, facts in EXPECTED.items() for _ in range(2)
    )
    settle = True

    def send(ctx: ExecutionContext) -> str:
        ledger.append(ctx.request_id, ctx.execution_id)
        return "sent"

    receipt = call("sync", store, "caller", hook, "old-died", send)
    assert isinstance(receipt, Receipt)
    assert (receipt.attempt, receipt.replay, receipt.result) == (2, False, "sent")
    assert ledger.count() == 1


# -- a real SIGKILL inside the hook ---------------------------------------------------------------


@pytest.mark.slow
@SQL_KINDS
def test_a_reconciler_sigkilled_inside_its_hook_leaves_the_attempt_for_the_next_round(
    store_kind: str, tmp_path: Path
) -> None:
    """A child process takes the reconcile lease (0.3 s) and is SIGKILLed inside its hook:
    the record is left PENDING under the child's lease; once that runs out (store clock),
    the listing names attempt 1's owner, and the next hook is told attempt 1's owner and
    the instant its fn recorded the doubt, as the killed child's hook was."""
    from safeagent.stores.postgres import PostgresStore

    schema = pg_schema()
    db = tmp_path / "guard.db"
    store: Any = SQLiteStore(db) if store_kind == "sqlite" else PostgresStore(PG_URL, schema=schema)
    try:

        def fn(ctx: ExecutionContext) -> None:
            raise AckTimeout("no acknowledgement")

        with (
            Guard(store, wait=0, owner=ATTEMPT_OWNER, outcome_unknown=(AckTimeout,)) as dead,
            pytest.raises(AckTimeout),
        ):
            dead.execute("r-sigkill", ACTION, INVOICE, fn)
        record, _ = store.get("default", "r-sigkill")
        t = record.updated_at_ms
        marker = tmp_path / "marker.json"
        args: dict[str, Any] = {
            "request_id": "r-sigkill",
            "action": ACTION,
            "payload": INVOICE,
            "lease": 0.3,
            "marker": str(marker),
        }
        args.update({"db": str(db)} if store_kind == "sqlite" else {"pg_url": PG_URL})
        args["schema"] = schema
        child = kill_when_marked("tests._workers", "reconcile_and_hang", args)
        assert (child["owner"], child["lease_expired_at_ms"]) == (ATTEMPT_OWNER, t)

        left, _ = store.get("default", "r-sigkill")
        assert left.status is Status.PENDING
        assert str(child["pid"]) in left.lease_owner

        def lease_ran_out() -> bool:
            found, now = store.get("default", "r-sigkill")
            return bool(found.effective_status(now) is Status.IN_DOUBT)

        assert wait_until(lease_ran_out, timeout=10)
        receipt = listed(store, "r-sigkill")
        assert str(child["pid"]) in (receipt.lease_owner or "")
        assert (receipt.attempt_owner, receipt.attempt_ended_at_ms) == (ATTEMPT_OWNER, t)
        asked: list[ReconcileRequest] = []

        def hook(req: ReconcileRequest) -> Reconciliation:
            asked.append(req)
            return Reconciliation.unknown()

        error = call("sync", store, "reconciler-2", hook, "r-sigkill")
        check_names_the_attempt(error, Attempt(ATTEMPT_OWNER, record.claimed_at_ms, t))
        [req] = asked
        assert (req.owner, req.lease_expired_at_ms) == (ATTEMPT_OWNER, t)
        assert req.fencing_token == child["fencing_token"] + 1
    finally:
        if store_kind == "postgres":
            store.drop_schema()
        store.close()


@DOUBTS
def test_each_take_over_event_names_the_attempt_in_doubt(
    doubt: str, store: Any, clock: FakeClock
) -> None:
    """The audit event of every reconcile take-over carries the attempt's owner and end,
    in the hash chain: what each round was told can be checked against the trail."""
    attempt = LEAVE_IN_DOUBT[doubt](store, clock, "r-ev")
    for owner in ("reconciler-1", "reconciler-2"):
        call("sync", store, owner, lambda _req: Reconciliation.unknown(), "r-ev")
        clock.advance(20)
    take_overs = [
        e
        for e in store.events(subject="r-ev")
        if e.kind is EventKind.CLAIMED and e.detail.get("reconcile")
    ]
    assert [e.actor for e in take_overs] == ["reconciler-1", "reconciler-2"]
    assert {(e.detail["attempt_owner"], e.detail["attempt_ended_at_ms"]) for e in take_overs} == {
        (attempt.owner, attempt.ended_at_ms)
    }
