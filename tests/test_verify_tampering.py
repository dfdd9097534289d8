"""verify against someone who can write the database but does not hold the anchor key:
what a reconcile hook is told of a record in doubt (attempt, owner, end, action,
downstream key), cases and records read again in one snapshot while writers run, and
anchors or rows holding what no writer stores (docs/design.md section 5)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from safeagent import ActionPolicy, Guard, Reconciliation, SQLiteStore, Status
from safeagent._keys import downstream_key
from safeagent.audit import anchor, verify
from safeagent.retention import purge
from tests.conftest import FakeClock
from tests.conftest import raw_sql as _sql

KEY = b"k" * 32


class Timeout(Exception):
    """The downstream system's answer was lost: the outcome is unknown."""


def _lost(_ctx: Any) -> None:
    raise Timeout("response lost")


def _edit(store: Any, request_id: str, **columns: Any) -> None:
    sets = ", ".join(f"{column} = %s" for column in columns)
    _sql(
        store,
        f"UPDATE {{s}}.executions SET {sets} WHERE request_id = %s",
        *columns.values(),
        request_id,
    )


def _kinds(report: Any) -> list[str]:
    return sorted(p.kind for p in report.problems)


def _by_request(report: Any) -> dict[str, str]:
    return {p.detail.split("'")[1]: p.detail for p in report.problems}


def _guard(store: Any, hook: Any = None, **kwargs: Any) -> Guard:
    answer = hook or (lambda _req: Reconciliation.unknown())
    return Guard(
        store,
        wait=0,
        outcome_unknown=[Timeout],
        actions={
            "charge": ActionPolicy(reconcile=answer),
            "ping": ActionPolicy(reconcile=lambda _req: Reconciliation.not_happened()),
        },
        **kwargs,
    )


def _in_doubt(guard: Guard, *request_ids: str, action: str = "charge") -> None:
    for rid in request_ids:
        with pytest.raises(Timeout):
            guard.execute(rid, action, {"amount": 500, "r": rid}, _lost)


# -- 1. the attempt a take-over recorded ------------------------------------------------------


def test_an_attempt_renumbered_with_forged_facts_is_found(db_store: Any) -> None:
    """After a reconcile take-over recorded the attempt's owner and end, editing them is
    found; so is editing them with ``attempt`` and ``ended_attempt`` moved to another
    number (which made the take-over look like another attempt's), and ``attempt`` alone.
    The last claim event recorded the attempt number: the record must hold it."""
    guard = _guard(db_store)
    _in_doubt(guard, "facts", "renumbered", "attempt-only")
    guard.reconcile()  # take-over: records the facts, the hook says unknown
    guard.close()
    pin = anchor(db_store, key=KEY).pin
    assert verify(db_store, key=KEY, last_anchor=pin).ok
    for rid in ("facts", "renumbered", "attempt-only"):
        record, _ = db_store.get("default", rid)
        assert record is not None
        assert record.status is Status.IN_DOUBT
        assert record.ended_attempt == record.attempt == 1
    _edit(db_store, "facts", attempt_owner="nobody", attempt_ended_at_ms=0)
    _edit(
        db_store,
        "renumbered",
        attempt_owner="nobody",
        attempt_ended_at_ms=0,
        attempt=7,
        ended_attempt=7,
    )
    _edit(db_store, "attempt-only", attempt=2)
    report = verify(db_store, key=KEY, last_anchor=pin)
    assert _kinds(report) == ["receipt_edited"] * 3
    found = _by_request(report)
    assert set(found) == {"facts", "renumbered", "attempt-only"}
    assert "owner or end of the attempt in doubt differs" in found["facts"]
    assert (
        "attempt 7, though its claim and take-over events put it at attempt 1"
        in found["renumbered"]
    )
    assert "attempt 2, though" in found["attempt-only"]


def test_legitimate_take_overs_resolutions_and_re_claims_raise_no_alarm(
    store_factory: Any, clock: FakeClock
) -> None:
    """On every store: reconcile rounds (take-overs recording the facts, then keeping
    them), answers of every kind, an operator's resolution, a release and a claim of the
    next attempt (under another action, too), and retention: verify finds nothing."""
    store = store_factory()
    answers = {
        "unknown": Reconciliation.unknown(),
        "happened": Reconciliation.happened({"charge": "ch_1"}),
        "not-happened": Reconciliation.not_happened(),
    }
    guard = _guard(store, hook=lambda req: answers.get(req.request_id, answers["unknown"]))
    _in_doubt(guard, "unknown", "happened", "not-happened", "resolved")
    guard.reconcile()
    guard.reconcile()  # a second round keeps the facts of the first
    record, _ = store.get("default", "unknown")
    assert record is not None
    assert (record.status, record.ended_attempt, record.attempt) == (Status.IN_DOUBT, 1, 1)
    guard.resolve("resolved", "succeeded", by="ops", reason="seen at the PSP", result={"c": 1})
    again = guard.execute("not-happened", "charge", {"amount": 500}, lambda _ctx: "ch_2")
    assert again.attempt == 2
    with pytest.raises(ValueError, match="declined"):
        guard.execute("rerun", "charge", {}, _declined)
    guard.resolve("rerun", "rerun", by="ops", reason="retry")
    other = guard.execute("rerun", "ping", {"n": 1}, lambda _ctx: "pong")
    assert (other.action, other.attempt) == ("ping", 2)
    report = verify(store)
    assert report.ok, report.problems
    clock.advance(5)
    assert purge(store, older_than=1).tombstoned == 4
    report = verify(store)
    assert report.ok, report.problems
    assert report.receipts_checked == 5
    guard.close()


def _declined(_ctx: Any) -> None:
    raise ValueError("card declined")


# -- 2. the action, downstream key and fingerprint of a record ---------------------------------


def test_an_edited_action_downstream_key_or_fingerprint_is_found(
    db_store: Any, clock: FakeClock
) -> None:
    """A reconcile hook looks the effect up by the record's downstream key, and is picked
    by its action: edited on a record in doubt, the hook finds nothing (or another
    action's hook answers) and the request runs again. The action, fingerprint and claim
    instant are compared with the claim's event, the key with the one (namespace, action,
    request id) give; a tombstone keeps them, and is checked too."""
    guard = _guard(db_store)
    _in_doubt(guard, "key", "action", "both", "fingerprint", "claimed")
    guard.execute("done", "charge", {"amount": 1}, lambda _ctx: "ch_done")
    guard.execute("purged", "charge", {"amount": 2}, lambda _ctx: "ch_purged")
    clock.advance(5)
    assert purge(db_store, older_than=1).tombstoned == 2
    _edit(db_store, "done", action="done-other")
    guard.close()
    pin = anchor(db_store, key=KEY).pin
    assert _kinds(verify(db_store, key=KEY, last_anchor=pin)) == ["receipt_edited"]
    _edit(db_store, "done", action="charge")
    assert verify(db_store, key=KEY, last_anchor=pin).ok

    record, _ = db_store.get("default", "key")
    assert record is not None
    _edit(db_store, "key", downstream_key=record.downstream_key[:-1] + "0")
    _edit(db_store, "action", action="ping")
    _edit(db_store, "both", action="ping", downstream_key=downstream_key("default", "ping", "both"))
    _edit(db_store, "fingerprint", fingerprint="0" * 64)
    _edit(db_store, "purged", downstream_key="sa1-" + "0" * 64)
    _edit(db_store, "claimed", claimed_at_ms=0)
    report = verify(db_store, key=KEY, last_anchor=pin)
    assert _kinds(report) == ["receipt_edited"] * 6
    found = _by_request(report)
    assert set(found) == {"key", "action", "both", "fingerprint", "purged", "claimed"}
    assert "claimed_at_ms 0, though its claim" in found["claimed"]
    assert "downstream key" in found["key"]
    assert "action 'ping', though its claim" in found["action"]
    assert "action 'ping'" in found["both"]
    assert "downstream key" in found["both"]  # not the one the claimed action gives
    assert "fingerprint" in found["fingerprint"]
    assert "downstream key" in found["purged"]


def test_an_edited_action_no_longer_lets_another_hook_release_the_request(
    db_store: Any,
) -> None:
    """The whole attack: the action of a charge in doubt edited to one whose hook answers
    "did not happen". verify reports it before any reconcile round runs."""
    charges: list[str] = []

    def charge(ctx: Any) -> None:
        charges.append(ctx.downstream_key)
        raise Timeout("response lost")

    guard = _guard(db_store, hook=lambda req: Reconciliation.happened("ch_1"))
    with pytest.raises(Timeout):
        guard.execute("order-1", "charge", {"amount": 500}, charge)
    guard.close()
    pin = anchor(db_store, key=KEY).pin
    _edit(db_store, "order-1", action="ping")
    report = verify(db_store, key=KEY, last_anchor=pin)
    assert _kinds(report) == ["receipt_edited"]
    assert "action 'ping', though its claim" in report.problems[0].detail


def test_the_payload_is_not_compared(db_store: Any) -> None:
    """The claim's event holds the payload only as the redaction hook left it, and the
    fingerprint may leave fields out (``exclude=``), so neither tells the stored payload:
    an edited payload is not found (docs/guide.md says so). The fingerprint is."""
    guard = _guard(db_store)
    _in_doubt(guard, "p")
    guard.close()
    _edit(db_store, "p", payload='{"amount":50000}')
    assert verify(db_store).ok
    _edit(db_store, "p", fingerprint="f" * 64)
    assert _kinds(verify(db_store)) == ["receipt_edited"]


# -- 3. read again in one snapshot ---------------------------------------------------------


class _Hooks:
    """A store of the real class (so its snapshot read is the real one) whose trail read
    and events reads run a callback, as another process writing right then would."""

    after_chain: Any = None
    after_records: Any = None
    after_events: Any = None

    def audit_chain(self) -> Any:
        found = super().audit_chain()  # type: ignore[misc]
        if self.after_chain:
            self.after_chain()
        return found

    def records(self, **kwargs: Any) -> Any:
        found = super().records(**kwargs)  # type: ignore[misc]
        if self.after_records:
            self.after_records()
        return found

    def events(self, **kwargs: Any) -> Any:
        found = super().events(**kwargs)  # type: ignore[misc]
        if self.after_events:
            self.after_events(kwargs)
        return found


def _hooked(store: Any, clock: FakeClock) -> Any:
    """Another store object of the same class on the same database, with :class:`_Hooks`."""
    cls = type("Hooked" + type(store).__name__, (_Hooks, type(store)), {})
    if isinstance(store, SQLiteStore):
        return cls(store.path, clock=clock)
    return cls(store.dsn, schema=store.schema, clock=clock)


def test_a_busy_case_is_read_in_one_snapshot_not_reported(db_store: Any, clock: FakeClock) -> None:
    """A case receiving a signal after verify's trail read and after every one of its
    reads of events (r19): read again in one snapshot (SQLite: one read transaction;
    PostgreSQL: REPEATABLE READ), it is consistent, and nothing is reported."""
    from safeagent import ConsensusPolicy, FinalityGate

    gate = FinalityGate(Guard(db_store, wait=0), policy=ConsensusPolicy(0.9, 5))
    gate.signal("hot", "s0", "y", 0.5)
    sent = iter(range(1000))
    hooked = _hooked(db_store, clock)

    def signal(*_args: Any) -> None:
        clock.advance(0.001)
        gate.signal("hot", f"s{next(sent) % 3}", "y", 0.5)

    hooked.after_chain = signal
    hooked.after_events = signal
    try:
        report = verify(hooked)
    finally:
        hooked.close()
    assert report.ok, report.problems
    assert report.cases_checked == 1
    assert verify(db_store).ok


def test_requests_changing_while_verify_reads_them_are_read_in_one_snapshot(
    db_store: Any, clock: FakeClock
) -> None:
    """Requests re-run, finished, taken over and resolved after verify's trail read and
    again after its records read: read again in one snapshot, none is reported."""
    guard = _guard(db_store, hook=lambda _req: Reconciliation.happened("ch"))
    with pytest.raises(ValueError, match="declined"):
        guard.execute("rerun", "charge", {}, _declined)
    _in_doubt(guard, "doubt", "resolve")
    hooked = _hooked(db_store, clock)
    steps = iter(
        [
            lambda: (
                guard.resolve("rerun", "rerun", by="ops", reason="retry"),
                guard.execute("new", "charge", {}, lambda _ctx: 1),
            ),
            lambda: (
                guard.execute("rerun", "charge", {}, lambda _ctx: "ok"),
                guard.resolve("resolve", "failed", by="ops", reason="refunded"),
                guard.reconcile(),  # "doubt": taken over, the hook says it happened
            ),
        ]
    )

    def step() -> None:
        for write in steps:
            write()
            return

    hooked.after_chain = step
    hooked.after_records = step
    try:
        report = verify(hooked)
    finally:
        hooked.close()
    assert report.ok, report.problems
    assert report.receipts_checked == 4
    guard.close()
    assert verify(db_store).ok


def test_a_store_without_a_snapshot_read_reports_what_never_holds_still_as_busy(
    store_factory: Any,
) -> None:
    """A store with no snapshot read (the memory store, or a wrapper that only forwards
    to a store, whose own reads are what is read) is read again until the rows hold
    still, a bounded number of times. A case or request that changes under every read is
    reported ``busy`` (not judged), never as tampering; once quiet, it verifies."""
    from safeagent import ConsensusPolicy, FinalityGate

    store = store_factory()
    guard = Guard(store, wait=0)
    gate = FinalityGate(guard, policy=ConsensusPolicy(0.9, 5))
    gate.signal("hot", "s0", "y", 0.5)
    with pytest.raises(ValueError, match="declined"):
        guard.execute("r", "charge", {}, _declined)
    sent = iter(range(1000))

    def rerun() -> None:
        guard.resolve("r", "rerun", by="ops", reason="retry")
        with pytest.raises(ValueError, match="declined"):
            guard.execute("r", "charge", {}, _declined)

    class Forwarding:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def audit_chain(self) -> Any:
            found = store.audit_chain()
            gate.signal("hot", "s9", "y", 0.5)
            rerun()
            return found

        def events(self, **kwargs: Any) -> Any:
            found = store.events(**kwargs)
            if kwargs.get("subject") == "hot":
                gate.signal("hot", f"s{next(sent) % 3}", "y", 0.5)
            elif kwargs.get("subject") == "r":
                rerun()
            return found

    report = verify(Forwarding())
    assert _kinds(report) == ["busy", "busy"], report.problems
    details = sorted(p.detail for p in report.problems)
    assert details[0].startswith("case 'hot' (default) changed during each of 5 reads")
    assert details[1].startswith("request 'r' (default) changed during each of 5 reads")
    assert "no sign of tampering" in details[0]
    quiet = verify(store)
    assert quiet.ok, quiet.problems
    guard.close()


def test_verify_beside_writers_reconcilers_and_gates_finds_nothing(db_store: Any) -> None:
    """Threads claiming, finishing, timing out, reconciling (take-overs), resolving and
    signalling while verify runs again and again, as r18 did: no report of any kind."""
    from safeagent import ConsensusPolicy, FinalityGate
    from safeagent.errors import GuardError

    stop = time.monotonic() + 2.0
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        answers = [Reconciliation.happened(1), Reconciliation.not_happened()]
        guard = Guard(
            db_store,
            wait=0,
            outcome_unknown=[Timeout],
            actions={"a": ActionPolicy(reconcile=lambda req: answers[len(req.request_id) % 2])},
        )
        gate = FinalityGate(guard, policy=ConsensusPolicy(0.6, 1))
        i = 0
        try:
            while time.monotonic() < stop:
                i += 1
                rid = f"w{worker}-{i % 7}"
                try:
                    if i % 5 == 0:
                        guard.reconcile()
                    elif i % 5 == 1:
                        gate.signal(f"c{i % 4}", f"s{worker}", "yes", 0.7)
                    elif i % 5 == 2:
                        guard.resolve(rid, "rerun", by="ops", reason="retry")
                    else:
                        fn = _lost if i % 3 else lambda _ctx, n=i: n
                        guard.execute(rid, "a", {"i": i % 7}, fn)
                except (GuardError, Timeout, ValueError):
                    pass
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    reports = []
    while any(t.is_alive() for t in threads) or not reports:
        reports.append(verify(db_store))
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert all(r.ok for r in reports), [r.problems for r in reports if not r.ok][:1]
    assert verify(db_store).ok


# -- 4. what no writer stores: reported, not raised ------------------------------------------

_BAD_ANCHORS = [
    '{"heads": {"x": [1, "a"]}}',
    '{"heads": {"0": 5}}',
    '{"heads": {"0": [1]}}',
    '{"heads": {"<chains>": [1, "a"]}}',  # the first chain beyond the store's
    '{"heads": {"' + "9" * 5000 + '": [1, "a"]}}',  # more digits than int() reads
    '{"heads": {"0": [true, "a"]}}',
    '{"heads": {}, "prev": [[1], "x"]}',
    '{"heads": {}, "prev": "x"}',
]


@pytest.mark.parametrize("heads", _BAD_ANCHORS)
def test_an_anchor_of_a_shape_no_writer_stores_is_a_bad_anchor(db_store: Any, heads: str) -> None:
    """An anchor inserted by hand, whose heads are not {"<shard>": [seq, hash]} or
    whose predecessor is not [id, mac]: without the key its MAC is not checked, so its
    shape is, and it is a ``bad_anchor`` (verify used to raise)."""
    guard = Guard(db_store)
    guard.execute("r1", "a", {}, lambda _ctx: 1)
    guard.close()
    _sql(
        db_store,
        "INSERT INTO {s}.audit_anchors (id, at_ms, heads, mac) VALUES (1, 0, %s, 'ff')",
        heads.replace("<chains>", str(db_store.chain_shards)),
    )
    assert _kinds(verify(db_store)) == ["bad_anchor"]
    assert _kinds(verify(db_store, key=KEY)) == ["bad_anchor"]


def test_a_forged_predecessor_after_a_real_anchor_is_a_bad_anchor(db_store: Any) -> None:
    guard = Guard(db_store)
    guard.execute("r1", "a", {}, lambda _ctx: 1)
    guard.close()
    real = anchor(db_store, key=KEY)
    _sql(
        db_store,
        "INSERT INTO {s}.audit_anchors (id, at_ms, heads, mac) VALUES (%s, 0, %s, 'ff')",
        real.id + 1,
        '{"heads": {}, "prev": [{"id": 1}, "x"]}',
    )
    assert _kinds(verify(db_store)) == ["bad_anchor"]


def test_a_status_no_writer_stores_is_reported_not_raised(db_store: Any, tmp_path: Any) -> None:
    """An execution record whose status was edited to a value no release writes is a
    ``receipt_edited`` (verify used to raise ValueError); the CLI exits 1."""
    guard = Guard(db_store)
    guard.execute("r1", "a", {}, lambda _ctx: 1)
    guard.close()
    _edit(db_store, "r1", status="BOGUS")
    report = verify(db_store)
    assert _kinds(report) == ["receipt_edited"]
    assert "cannot be read" in report.problems[0].detail
    if isinstance(db_store, SQLiteStore):
        from typer.testing import CliRunner

        from safeagent._cli import app

        result = CliRunner().invoke(app, ["audit", "verify", "--db", db_store.path])
        assert result.exit_code == 1, result.output
        assert "receipt_edited" in result.output


def test_an_unreadable_record_does_not_hide_the_others(db_store: Any) -> None:
    """One record with a status no release writes is reported on its own, and every other
    record is still compared with its events: a result edited on another request is found
    in the same report (verify used to stop at the unreadable row: receipts_checked 0)."""
    guard = Guard(db_store)
    for rid in ("r1", "r2", "r3"):
        guard.execute(rid, "charge", {"n": rid}, lambda _ctx: {"charge": "ch_1"})
    guard.close()
    _edit(db_store, "r1", status="BOGUS")
    _edit(db_store, "r2", result='{"charge": "ch_forged"}')
    report = verify(db_store)
    assert _kinds(report) == ["receipt_edited", "receipt_edited"], report.problems
    found = _by_request(report)
    assert "cannot be read" in found["r1"]
    assert "'BOGUS' is not a status" in found["r1"]
    assert "cannot be read" not in found["r2"]
    assert report.receipts_checked == 3
    assert all(p.seq is not None and p.shard >= 0 for p in report.problems)


def test_an_unreadable_case_does_not_hide_the_others(db_store: Any) -> None:
    """One case row with a state no release writes is reported on its own, and every other
    case is still compared with its events (verify used to stop at the unreadable row:
    cases_checked 0)."""
    from safeagent import ConsensusPolicy, FinalityGate

    guard = Guard(db_store)
    gate = FinalityGate(guard, policy=ConsensusPolicy(0.6, 1))
    for case_id in ("c1", "c2", "c3"):
        gate.signal(case_id, "model", "approve", 0.9)
    guard.close()
    assert verify(db_store).ok
    _sql(db_store, "UPDATE {s}.cases SET state = 'BOGUS' WHERE case_id = 'c1'")
    _sql(db_store, "UPDATE {s}.cases SET outcome = 'reject' WHERE case_id = 'c2'")
    report = verify(db_store)
    assert _kinds(report) == ["case_edited", "case_edited"], report.problems
    found = _by_request(report)
    assert "cannot be read" in found["c1"]
    assert "is not a case state" in found["c1"]
    assert "cannot be read" not in found["c2"]
    assert report.cases_checked == 3
    assert all(p.seq is not None and p.shard >= 0 for p in report.problems)


def test_an_unreadable_row_named_like_a_described_value_hides_no_edit(tmp_path: Any) -> None:
    """An unreadable row whose id is stored as a BLOB (shown as "bytes") must not excuse
    the real request or case named ``bytes``: verify compares rows by their ids as
    stored, so the forged outcome of ``bytes`` is still found (it used to be skipped)."""
    from safeagent import ConsensusPolicy, FinalityGate

    store = SQLiteStore(tmp_path / "a.db")
    guard = Guard(store)
    for rid in ("r1", "bytes"):
        guard.execute(rid, "charge", {"n": rid}, lambda _ctx: {"charge": "ch_1"})
    gate = FinalityGate(guard, policy=ConsensusPolicy(0.6, 1))
    for case_id in ("c1", "bytes"):
        gate.signal(case_id, "model", "approve", 0.9)
    guard.close()
    assert verify(store).ok
    _sql(
        store,
        """UPDATE executions SET result = '{"charge":"ch_forged"}' WHERE request_id = 'bytes'""",
    )
    _sql(
        store,
        "UPDATE executions SET status = 'BOGUS', request_id = X'7231' WHERE request_id = 'r1'",
    )
    _sql(store, "UPDATE cases SET outcome = 'reject' WHERE case_id = 'bytes'")
    _sql(store, "UPDATE cases SET state = 'BOGUS', case_id = X'6331' WHERE case_id = 'c1'")
    report = verify(store)
    details = [p.detail for p in report.problems]
    assert any(d.startswith("request 'bytes'") and "cannot be read" not in d for d in details)
    assert any(d.startswith("case 'bytes'") and "cannot be read" not in d for d in details)
    assert any(d.startswith("request b'r1'") and "cannot be read" in d for d in details)
    assert any(d.startswith("case b'c1'") and "cannot be read" in d for d in details)


_UNREADABLE_EDITS = {
    "signal metadata not JSON": "UPDATE {s}.signals SET metadata = 'zz'",
    "purge's detail not JSON": "UPDATE {s}.audit_events SET detail = 'zz' WHERE kind = 'purged'",
    "purge's kind unknown": "UPDATE {s}.audit_events SET kind = 'zz' WHERE kind = 'purged'",
}


@pytest.mark.parametrize("edit", sorted(_UNREADABLE_EDITS))
def test_rows_no_writer_stores_are_reported_not_raised(
    db_store: Any, clock: FakeClock, edit: str
) -> None:
    """A signal's metadata, or the retention pass's own event, edited into text no reader
    parses: verify reports the edit (verify used to raise UnboundLocalError,
    JSONDecodeError or ValueError)."""
    from safeagent import ConsensusPolicy, FinalityGate

    guard = Guard(db_store)
    guard.execute("r1", "charge", {"amount": 5}, lambda _ctx: {"charge": "ch_1"})
    gate = FinalityGate(guard, policy=ConsensusPolicy(0.6, 1))
    gate.signal("c1", "model", "approve", 0.9, metadata={"why": "ok"})
    clock.advance(10)
    assert purge(db_store, older_than=1).tombstoned == 1
    guard.close()
    assert verify(db_store).ok
    _sql(db_store, _UNREADABLE_EDITS[edit])
    report = verify(db_store)
    assert not report.ok
    assert set(_kinds(report)) <= {"edited", "case_edited", "receipt_edited"}, report.problems


_DEEP = "[" * 100_000 + "]" * 100_000
"""JSON nested past every Python's parser limit: json.loads raises RecursionError on it
(3.12 and 3.13 parse 5,000 levels that 3.11 refuses)."""


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE {s}.signals SET metadata = %s",
        "UPDATE {s}.audit_events SET detail = %s WHERE kind = 'claimed'",
        "UPDATE {s}.audit_anchors SET heads = %s",
    ],
    ids=["signal metadata", "event detail", "anchor heads"],
)
def test_json_nested_past_the_recursion_limit_is_reported_not_raised(
    db_store: Any, edit: str
) -> None:
    """A JSON column edited into text nested 100,000 deep: verify reports it, with the key
    or without (verify used to raise RecursionError)."""
    from safeagent import ConsensusPolicy, FinalityGate

    guard = Guard(db_store)
    guard.execute("r1", "charge", {}, lambda _ctx: 1)
    FinalityGate(guard, policy=ConsensusPolicy(0.6, 1)).signal("c1", "m", "yes", 0.9, metadata={})
    guard.close()
    anchor(db_store, key=KEY)
    _sql(db_store, edit, _DEEP)
    for key in (None, KEY):
        report = verify(db_store, key=key)
        assert not report.ok
        assert set(_kinds(report)) <= {"edited", "case_edited", "bad_anchor"}, report.problems


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE audit_chain SET seq = '' WHERE shard = 0",
        "UPDATE audit_chain SET head = 7 WHERE shard = 0",
        "UPDATE executions SET namespace = X'6465' WHERE request_id = 'r1'",
        "UPDATE executions SET claimed_at_ms = 'zz' WHERE request_id = 'r1'",
        "UPDATE executions SET claimed_at_ms = 1.5 WHERE request_id = 'r1'",
    ],
)
def test_sqlite_values_of_another_type_are_reported_not_raised(tmp_path: Any, edit: str) -> None:
    """SQLite keeps a value of any type in any column: a chain head, a record's namespace
    or claim instant edited to another type is reported (verify used to raise TypeError,
    or judged the claim instant only when it was an int)."""
    store = SQLiteStore(tmp_path / "a.db")
    guard = Guard(store)
    guard.execute("r1", "charge", {}, lambda _ctx: 1)
    guard.close()
    assert verify(store).ok
    _sql(store, edit)
    report = verify(store)
    assert not report.ok
    assert set(_kinds(report)) <= {"head_mismatch", "receipt_edited"}, report.problems
    store.close()


@pytest.mark.parametrize("value", ["zz", "", "4.0", "-1", "9" * 5000])
def test_a_schema_version_no_writer_stores_is_a_store_error(db_store: Any, value: str) -> None:
    """safeagent_meta.schema_version edited to something other than a decimal integer:
    opening the store raises StoreError naming it (it used to raise a bare ValueError)."""
    from safeagent import StoreError

    _sql(db_store, "UPDATE {s}.safeagent_meta SET value = %s WHERE key = 'schema_version'", value)
    if isinstance(db_store, SQLiteStore):
        with pytest.raises(StoreError, match="schema_version"):
            SQLiteStore(db_store.path)
        return
    from safeagent.stores.postgres import PostgresStore

    with pytest.raises(StoreError, match="schema_version"):
        PostgresStore(db_store.dsn, schema=db_store.schema)


# -- 6. what a reconcile take-over or a claim copied from an edited record -------------------


def _take_over_events(store: Any, request_id: str) -> list[Any]:
    return [
        e
        for e in store.events(namespace="default", subject=request_id)
        if e.kind.value == "claimed" and e.detail.get("reconcile")
    ]


def _problems_of(report: Any, request_id: str) -> list[Any]:
    return [p for p in report.problems if p.detail.startswith(f"request {request_id!r}")]


def test_an_edited_attempt_a_take_over_copied_into_the_chain_is_found(db_store: Any) -> None:
    """An attempt number edited on a record in doubt is copied by the next reconcile
    take-over into its event (and the hook is told it). A take-over never changes the
    attempt: its event must record the attempt its claim started. Found after the
    take-over, naming it, and still after the record is edited back."""
    told: list[Any] = []

    def hook(req: Any) -> Any:
        told.append(req.attempt)
        return Reconciliation.unknown()

    guard = _guard(db_store, hook=hook)
    _in_doubt(guard, "laundered")
    _edit(db_store, "laundered", attempt=3)
    assert "attempt 3, though" in _by_request(verify(db_store))["laundered"]
    guard.reconcile()
    assert told == [3]
    take_over = _take_over_events(db_store, "laundered")[0]
    assert take_over.detail["attempt"] == 3
    report = verify(db_store)
    assert set(_kinds(report)) == {"receipt_edited"}
    named = [p for p in report.problems if p.event_id == take_over.id]
    assert len(named) == 1, report.problems
    assert (
        f"its reconcile take-over (event {take_over.id}) recorded attempt 3, though the claim "
        "that started the attempt" in named[0].detail
    )
    assert "recorded attempt 1" in named[0].detail
    # the record itself is compared with the claim, not with the take-over that copied it
    assert any("it holds attempt 3" in p.detail for p in report.problems)
    _edit(db_store, "laundered", attempt=1, ended_attempt=1)
    guard.reconcile()  # a later take-over of the same attempt
    report = verify(db_store)
    assert [p.event_id for p in report.problems] == [take_over.id], report.problems
    guard.close()


def test_an_edited_owner_or_end_the_first_take_over_copied_is_found(db_store: Any) -> None:
    """The first take-over of an attempt records its owner and end as it reads them from
    the record: for a record stored IN_DOUBT, its claim's owner and the instant of the
    event that left it in doubt. Edited before it, they are found in its event."""
    guard = _guard(db_store, owner="worker-1")
    _in_doubt(guard, "both", "owner", "end", "kept")
    _edit(db_store, "both", lease_owner="someone-else")
    _sql(
        db_store,
        "UPDATE {s}.executions SET updated_at_ms = updated_at_ms - 3600000 "
        "WHERE request_id IN (%s, %s)",
        "both",
        "end",
    )
    _edit(db_store, "owner", lease_owner="someone-else")
    guard.close()
    reconciler = _guard(db_store, owner="reconciler")
    reconciler.reconcile()
    reconciler.reconcile()  # later take-overs keep the facts: not reported again
    report = verify(db_store)
    found = _by_request(report)
    assert set(found) == {"both", "owner", "end"}, report.problems
    assert _kinds(report) == ["receipt_edited"] * 3
    for rid in ("both", "owner", "end"):
        first = _take_over_events(db_store, rid)[0]
        (problem,) = _problems_of(report, rid)
        assert problem.event_id == first.id
        assert f"its first reconcile take-over (event {first.id})" in problem.detail
    assert "owner 'someone-else', though its claim was 'worker-1'" in found["both"]
    assert "though the event that left it IN_DOUBT" in found["both"]
    assert "end" not in found["owner"].split("recorded the attempt in doubt's")[1]
    assert "owner" not in found["end"].split("recorded the attempt in doubt's")[1]
    reconciler.close()


def test_the_owner_of_an_expired_lease_is_checked_its_end_is_not(
    db_store: Any, clock: FakeClock
) -> None:
    """A record PENDING with an expired lease: its first take-over records the claim's
    owner, checked, and its lease expiry as the end, which no event records: an edited
    expiry is not found (the docs say so)."""
    guard = _guard(db_store, owner="worker-1", lease=30.0)
    for rid in ("owner", "expiry"):
        guard.store.claim(_claim_request(rid, "worker-1"))
    guard.close()
    clock.advance(31)
    _edit(db_store, "owner", lease_owner="someone-else")
    _sql(
        db_store,
        "UPDATE {s}.executions SET lease_expires_at_ms = lease_expires_at_ms - 20000 "
        "WHERE request_id = %s",
        "expiry",
    )
    reconciler = _guard(db_store, owner="reconciler")
    reconciler.reconcile()
    report = verify(db_store)
    assert set(_by_request(report)) == {"owner"}, report.problems
    assert "owner 'someone-else', though its claim was 'worker-1'" in report.problems[0].detail
    reconciler.close()


def _claim_request(request_id: str, owner: str, lease_ms: int = 30_000) -> Any:
    from safeagent._keys import canonical_json, fingerprint
    from safeagent.stores import ClaimRequest

    body = canonical_json({"amount": 500})
    return ClaimRequest(
        namespace="default",
        request_id=request_id,
        action="charge",
        fingerprint=fingerprint("charge", body),
        payload_json=body.decode(),
        execution_id="dead-" + request_id,
        owner=owner,
        lease_ms=lease_ms,
        downstream_key=downstream_key("default", "charge", request_id),
    )


class NotDone(Exception):
    """The downstream system refused: nothing happened, the record is released."""


def _not_done(_ctx: Any) -> None:
    raise NotDone("refused")


def test_an_attempt_edited_while_released_is_found_at_the_next_claim(db_store: Any) -> None:
    """A claim numbers the next attempt (attempt + 1 of the released record): an attempt
    edited while released is copied, plus one, into the next claim's event. Each claim
    must record one more than the claim before it."""
    guard = Guard(db_store, not_executed=[NotDone], wait=0)
    with pytest.raises(NotDone):
        guard.execute("r2", "charge", {"a": 1}, _not_done)
    _edit(db_store, "r2", attempt=41)
    assert "attempt 41, though" in _by_request(verify(db_store))["r2"]
    assert guard.execute("r2", "charge", {"a": 1}, lambda ctx: ctx.attempt).result == 42
    claim = [
        e for e in db_store.events(namespace="default", subject="r2") if e.kind.value == "claimed"
    ]
    report = verify(db_store)
    assert _kinds(report) == ["receipt_edited"]
    assert report.problems[0].event_id == claim[-1].id
    assert (
        f"its claim (event {claim[-1].id}) recorded attempt 42, though the attempt before it "
        f"(claim event {claim[0].id}) was 1" in report.problems[0].detail
    )
    guard.close()


def test_legitimate_rounds_owners_re_claims_and_purges_raise_no_false_alarm(
    store_factory: Any, clock: FakeClock
) -> None:
    """On every store: reconcile rounds answering unknown, then happened / did not happen,
    by reconcilers of different owners; an operator's resolution after a take-over; a
    release and claims of the next attempts; a FAILED record re-run twice; a first
    take-over of a PENDING record whose lease expired (by claim and by a guard); retention
    purges and a re-run of a tombstone: none of the take-over, claim or facts checks fires."""
    store = store_factory()
    answers = {
        "later-happened": [Reconciliation.unknown(), Reconciliation.happened("ch")],
        "later-not": [
            Reconciliation.unknown(),
            Reconciliation.unknown(),
            Reconciliation.not_happened(),
        ],
    }

    def hook(req: Any) -> Any:
        queue = answers.get(req.request_id)
        if not queue:
            return Reconciliation.unknown()
        return queue.pop(0) if len(queue) > 1 else queue[0]

    workers = [_guard(store, hook=hook, owner=f"w{n}", lease=30.0) for n in range(3)]
    with pytest.raises(Timeout):
        workers[0].execute("later-happened", "charge", {"a": 1}, _lost)
    with pytest.raises(Timeout):
        workers[1].execute("later-not", "charge", {"a": 1}, _lost)
    with pytest.raises(Timeout):
        workers[0].execute("resolved", "charge", {"a": 1}, _lost)
    store.claim(_claim_request("expired", "w2"))
    store.claim(_claim_request("expired-resolved", "w2"))
    clock.advance(31)
    for n in range(3):
        workers[(n + 1) % 3].reconcile()  # each round by another owner
        clock.advance(1)
    workers[2].resolve("resolved", "released", by="ops", reason="seen nothing")
    workers[0].resolve("expired-resolved", "succeeded", by="ops", reason="seen", result=1)
    for rid in ("later-not", "resolved"):
        assert workers[1].execute(rid, "charge", {"a": 2}, lambda ctx: ctx.attempt).result == 2
    guard = Guard(store, not_executed=[NotDone], wait=0, owner="w9")
    for n in range(3):
        with pytest.raises(NotDone):
            guard.execute("released", "charge", {"n": n}, _not_done)
    assert guard.execute("released", "charge", {"n": 9}, lambda ctx: ctx.attempt).result == 4
    for _ in range(2):
        with pytest.raises(ValueError, match="declined"):
            guard.execute("failed", "charge", {}, _declined)
        guard.resolve("failed", "rerun", by="ops", reason="retry")
    with pytest.raises(ValueError, match="declined"):
        guard.execute("failed-tombstone", "charge", {}, _declined)
    report = verify(store)
    assert report.ok, report.problems
    clock.advance(5)
    purged = purge(store, older_than=1)
    assert purged.tombstoned == 6
    guard.resolve("failed-tombstone", "rerun", by="ops", reason="retry")
    assert guard.execute("failed-tombstone", "charge", {}, lambda ctx: ctx.attempt).result == 2
    with pytest.raises(NotDone):
        guard.execute("released-late", "charge", {}, _not_done)
    clock.advance(5)
    purge(store, older_than=1)
    assert guard.execute("released-late", "charge", {}, lambda ctx: ctx.attempt).result == 2
    assert guard.execute("failed", "ping", {}, lambda ctx: ctx.attempt).result == 3
    report = verify(store)
    assert report.ok, report.problems
    for worker in workers:
        worker.close()
    guard.close()


def test_events_without_attempt_numbers_are_not_judged() -> None:
    """Claims and take-overs by older releases may record no attempt number, no facts,
    and a request's first chained claim may follow events from before the chains: none
    of these is reported."""
    from safeagent._verify_receipts import _last_states

    def row(event_id: int, subject: str, detail: dict[str, Any], kind: str = "claimed") -> Any:
        import json as _json

        fields: list[Any] = [None] * 16
        from safeagent import _verify as v

        fields[v._ID], fields[v._KIND], fields[v._NAMESPACE] = event_id, kind, "default"
        fields[v._SUBJECT], fields[v._DETAIL], fields[v._ACTOR] = subject, _json.dumps(detail), "w"
        fields[v._ACTION], fields[v._SHARD], fields[v._SEQ] = "charge", 0, event_id
        fields[v._AT], fields[v._EXECUTION_ID] = 1000 * event_id, "e"
        return tuple(fields)

    rows = [
        row(1, "old", {}),  # a claim with no attempt number
        row(2, "old", {"status": "IN_DOUBT"}, "in_doubt"),
        row(3, "old", {"reconcile": True, "attempt": 5}),  # nothing to compare it with
        row(4, "old", {"reconcile": True}),  # no attempt, no facts
        row(5, "old", {"status": "RELEASED"}, "released"),
        row(6, "old", {"attempt": 6}),  # the attempt before it is unknown
        row(7, "legacy", {"attempt": 3}),  # its first claims are from before the chains
        row(8, "facts", {"attempt": 1}),
        row(9, "facts", {"reconcile": True}),  # an older take-over recorded no facts
        row(10, "facts", {"reconcile": True, "attempt": 1, "attempt_owner": "w2"}),
    ]
    states, edits = _last_states(rows, {("default", "legacy")})
    assert edits == []
    assert states[("default", "old")].attempt == 6
    _, edits = _last_states(rows, set())
    assert [e[1][2] for e in edits] == [7]  # a first claim, with no legacy event, of attempt 3


def test_the_cli_tells_busy_from_tampered(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Every problem ``busy``: nothing vouched for (exit 1), but no sign of tampering, and
    the verdict says so; a ``busy`` beside any other problem is still TAMPERED."""
    SQLiteStore(str(tmp_path / "busy.db")).close()
    from typer.testing import CliRunner

    from safeagent import audit as audit_lib
    from safeagent._cli import app
    from safeagent.audit import Problem, VerifyReport

    busy = Problem("busy", 0, None, None, "request 'r' (default) changed during each of 5 reads")
    edited = Problem("receipt_edited", 0, 1, 1, "request 's' (default): edited")
    for problems, verdict in (
        ([busy, busy], "NOT VERIFIED: 2 subject(s) changed under every read; run it again"),
        ([busy, edited], "TAMPERED: 2 problem(s)"),
    ):
        report = VerifyReport(0, 0, 0, problems=list(problems))
        monkeypatch.setattr(audit_lib, "verify", lambda *_a, _r=report, **_k: _r)
        result = CliRunner().invoke(app, ["audit", "verify", "--db", str(tmp_path / "busy.db")])
        assert result.exit_code == 1, result.output
        assert verdict in " ".join(result.output.split()), result.output
        assert ("TAMPERED" in result.output) == (verdict.startswith("TAMPERED"))


# -- 5. the number of chains ------------------------------------------------------------------


def test_a_head_added_beyond_the_chains_is_reported_and_never_anchored(tmp_path: Any) -> None:
    """A head row added by hand beyond the store's chains (SQLite, 16; a PostgreSQL store
    refuses to open with one, tests/test_postgres.py): verify reports that head, and an
    anchor made meanwhile signs only the store's own chains, so it stays authentic once
    the row is gone."""
    store = SQLiteStore(tmp_path / "a.db")
    guard = Guard(store)
    guard.execute("r", "charge", {}, lambda _ctx: 1)
    _sql(store, "INSERT INTO {s}.audit_chain (shard, seq, head) VALUES (99, 0, %s)", "0" * 64)
    report = verify(store)
    assert [(p.kind, p.shard) for p in report.problems] == [("head_mismatch", 99)]
    signed = anchor(store, key=KEY)
    assert sorted(signed.heads) == list(range(16))
    _sql(store, "DELETE FROM {s}.audit_chain WHERE shard = 99")
    report = verify(store, key=KEY, last_anchor=signed)
    assert report.ok, report.problems
    guard.close()


def test_an_anchor_signed_when_the_store_had_more_chains_says_so(db_store: Any) -> None:
    """An anchor the key signed that names a chain beyond the store's: the store's number
    of chains was lowered since (no anchor() of this store writes one). Reported as a
    bad_anchor saying so, not as forged; without the key, it cannot be told from forged."""
    import hashlib
    import hmac
    import json

    guard = Guard(db_store)
    guard.execute("r", "charge", {}, lambda _ctx: 1)
    guard.close()
    beyond = db_store.chain_shards
    text = json.dumps({"heads": {str(beyond): [0, "0" * 64]}, "prev": None}, sort_keys=True)
    mac = hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()
    _sql(
        db_store,
        "INSERT INTO {s}.audit_anchors (id, at_ms, heads, mac) VALUES (1, 0, %s, %s)",
        text,
        mac,
    )
    (problem,) = verify(db_store, key=KEY).problems
    assert problem.kind == "bad_anchor"
    assert "number of chains was lowered" in problem.detail, problem.detail
    (problem,) = verify(db_store).problems
    assert problem.kind == "bad_anchor"
    assert "forged" in problem.detail, problem.detail


def test_a_store_that_does_not_say_its_number_of_chains_is_refused(tmp_path: Any) -> None:
    """verify and anchor need the store's number of chains (chain_shards): an object that
    forwards only a store's methods is a ConfigurationError, not a trail judged by a guess
    (which would report every event of a 256-chain store as misplaced)."""
    from safeagent import ConfigurationError

    store = SQLiteStore(tmp_path / "a.db")
    Guard(store).execute("r", "charge", {}, lambda _ctx: 1)

    class Methods:
        anchors = store.anchors
        audit_chain = store.audit_chain
        chain_heads = store.chain_heads
        add_anchor = store.add_anchor

    with pytest.raises(ConfigurationError, match="chain_shards"):
        verify(Methods())
    with pytest.raises(ConfigurationError, match="chain_shards"):
        anchor(Methods(), key=KEY)
    assert store.anchors() == []
    store.close()


def test_a_tombstone_forged_after_a_pass_with_a_future_cutoff_is_found(
    db_store: Any, clock: FakeClock
) -> None:
    """``purge(before_ms=...)`` accepts a cutoff in the future; such a pass purged only what
    had finished when it ran. A receipt finished a minute after it and emptied by hand into
    a tombstone stamped with the pass's instant was covered by the cutoff alone, and passed
    verify: its result gone without a trace."""
    guard = _guard(db_store)
    guard.execute("early", "charge", {"amount": 1}, lambda _ctx: "ch_early")
    clock.advance(5)
    passed_at = clock()
    assert purge(db_store, before_ms=passed_at + 86_400_000).tombstoned == 1
    clock.advance(60)
    guard.execute("late", "charge", {"amount": 2}, lambda _ctx: "ch_late")
    guard.close()
    pin = anchor(db_store, key=KEY).pin
    assert verify(db_store, key=KEY, last_anchor=pin).ok
    _edit(db_store, "late", payload="", result=None, purged_at_ms=passed_at)
    report = verify(db_store, key=KEY, last_anchor=pin)
    assert _kinds(report) == ["receipt_edited"]
    assert "no retention pass in the chains covers it" in _by_request(report)["late"]


def test_a_purge_after_the_clock_stepped_back_leaves_a_trail_that_verifies(
    store: Any, clock: FakeClock
) -> None:
    """The CLI's purge flow reads a cutoff, asks for confirmation, then purges up to it
    (``purge(before_ms=cutoff)``). When the store's clock steps back meanwhile by more than
    verification allows (1 s), the pass used to purge records that finished after its
    own clock reading, and verification then reported them as edited ("no retention pass
    covers it"). A pass now purges only what finished before it ran (plus that 1 s):
    those records are kept, counted by no one, and the trail verifies."""
    guard = Guard(store)
    guard.execute("early", "charge", {"n": 1}, lambda _ctx: 1)
    clock.advance(10)
    guard.execute("late", "charge", {"n": 2}, lambda _ctx: 2)
    clock.advance(0.01)
    _, cutoff = store.records(limit=0)  # read, shown, confirmed ...
    clock.advance(-5)  # ... while the clock steps back 5 s
    assert purge(store, before_ms=cutoff).tombstoned == 1  # "early" only
    early, _ = store.get("default", "early")
    late, _ = store.get("default", "late")
    assert early is not None
    assert early.purged_at_ms is not None
    assert late is not None
    assert late.purged_at_ms is None
    report = verify(store)
    assert report.ok, report.problems
    guard.close()
