"""The operator CLI (``safeagent ...``): in-process through typer's CliRunner, and as the
real entry point (``python -m safeagent``) in subprocesses, against SQLite files and a
PostgreSQL schema that the library itself wrote.

The seeded store holds, on the fake clock of ``conftest`` (November 2023, so every lease
has long expired by the wall clock the CLI reads):

- ``r-1`` charge SUCCEEDED (then one replay and one fingerprint conflict),
- ``r-2`` refund FAILED (one hour later),
- ``r-3`` charge IN_DOUBT (a timeout declared "outcome unknown", two hours later),
- ``r-4`` charge PENDING whose owner died (claimed directly, three hours later),
- ``t-1`` email SUCCEEDED in namespace ``tenant-b``,
- cases ``case-1`` (FINAL "approve") and ``case-2`` (IN_RECONCILIATION).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from safeagent import (
    EventKind,
    FinalityGate,
    FingerprintMismatchError,
    Guard,
    ReceiptPurgedError,
    SQLiteStore,
    Status,
)
from safeagent._cli._common import iso
from safeagent._keys import canonical_json, downstream_key, fingerprint
from safeagent.stores import ClaimRequest
from tests._workers import child_env, wait_until
from tests.conftest import PG_URL, START_MS, FakeClock, Ledger, pg_schema, require_postgres

CHARGE = {"customer": "cus_ada", "amount_cents": 4200, "card_number": "4242 4242 4242 4242"}
HOUR = 3600.0
KEY = "k" * 32
TIMEOUT = 60

runner = CliRunner()


# -- seeding ---------------------------------------------------------------------------------


def seed(store: Any, clock: FakeClock) -> None:
    """Write the records and cases listed in the module docstring through the library."""
    guard = Guard(store, lease=30.0, wait=0, owner="seeder", outcome_unknown=(TimeoutError,))

    def charge(ctx: Any) -> dict[str, str]:
        return {"charge_id": "ch_1", "receipt_email": "ada@example.com"}

    guard.execute("r-1", "charge", CHARGE, charge)
    guard.execute("r-1", "charge", CHARGE, charge)
    with pytest.raises(FingerprintMismatchError):
        guard.execute("r-1", "charge", {**CHARGE, "amount_cents": 1}, charge)
    clock.advance(HOUR)

    def refund(ctx: Any) -> None:
        raise ValueError("card declined")

    with pytest.raises(ValueError, match="declined"):
        guard.execute("r-2", "refund", {"charge_id": "ch_0"}, refund)
    clock.advance(HOUR)

    def lost_ack(ctx: Any) -> None:
        raise TimeoutError("no answer from the payment service")

    with pytest.raises(TimeoutError):
        guard.execute("r-3", "charge", {**CHARGE, "amount_cents": 700}, lost_ack)
    clock.advance(HOUR)
    body = canonical_json({**CHARGE, "amount_cents": 900})
    won = store.claim(
        ClaimRequest(
            namespace="default",
            request_id="r-4",
            action="charge",
            fingerprint=fingerprint("charge", body),
            payload_json=body.decode(),
            execution_id="dead-r-4",
            owner="worker-dead:4242:MainThread",
            lease_ms=30_000,
            downstream_key=downstream_key("default", "charge", "r-4"),
        )
    )
    assert won.won
    guard.execute("t-1", "email", {"to": "bob"}, lambda ctx: "sent", namespace="tenant-b")
    gate = FinalityGate(guard)
    gate.signal("case-1", "fraud-model", "approve", 0.9)
    gate.signal("case-2", "fraud-model", "approve", 0.6)
    gate.signal("case-2", "policy-agent", "reject", 0.7, metadata={"rule": "R7"})
    guard.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SAFEAGENT_DB", "SAFEAGENT_DATABASE_URL", "SAFEAGENT_AUDIT_KEY", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A seeded SQLite file, closed before the CLI opens it."""
    path = tmp_path / "guard.db"
    clock = FakeClock()
    store = SQLiteStore(path, clock=clock)
    seed(store, clock)
    store.close()
    return path


def cli(*args: str | Path, input: str | None = None) -> Any:
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from safeagent._cli import app

    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def cli_json(*args: str | Path) -> Any:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def table_rows(text: str) -> list[list[str]]:
    """The rows of a printed table, split on runs of two or more spaces."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


def records(db: Path) -> dict[str, Any]:
    store = SQLiteStore(db)
    try:
        found, _ = store.records()
        return {r.request_id: r for r in found}
    finally:
        store.close()


# -- receipts --------------------------------------------------------------------------------


def test_receipts_list_json_shows_every_record_with_its_status_as_read(db: Path) -> None:
    """receipts list --json gives every namespace's records, an expired lease as IN_DOUBT."""
    rows = cli_json("receipts", "list", "--db", db)
    assert [(r["namespace"], r["request_id"], r["status"], r["stored_status"]) for r in rows] == [
        ("default", "r-1", "SUCCEEDED", "SUCCEEDED"),
        ("default", "r-2", "FAILED", "FAILED"),
        ("default", "r-3", "IN_DOUBT", "IN_DOUBT"),
        ("default", "r-4", "IN_DOUBT", "PENDING"),
        ("tenant-b", "t-1", "SUCCEEDED", "SUCCEEDED"),
    ]
    first = rows[0]
    assert first["result"] == {"charge_id": "ch_1", "receipt_email": "[REDACTED]"}
    assert first["created_at_ms"] == START_MS
    assert first["error"] is None
    assert rows[1]["error"] == {"type": "ValueError", "message": "card declined"}
    assert "payload" not in first


def test_receipts_list_filters_by_namespace_action_status_and_prefix(db: Path) -> None:
    """Each filter narrows the listing to the matching request ids."""

    def ids(*args: str) -> list[str]:
        return [r["request_id"] for r in cli_json("receipts", "list", "--db", str(db), *args)]

    assert ids("--namespace", "tenant-b") == ["t-1"]
    assert ids("--action", "refund") == ["r-2"]
    assert ids("--status", "in_doubt") == ["r-3", "r-4"]
    assert ids("--status", "FAILED", "--status", "succeeded") == ["r-1", "r-2", "t-1"]
    assert ids("--prefix", "r-") == ["r-1", "r-2", "r-3", "r-4"]
    assert ids("--action", "charge", "--status", "succeeded") == ["r-1"]


def test_receipts_list_pages_and_time_window(db: Path) -> None:
    """--limit/--offset page the rows; --since/--until take ISO 8601 or durations ago."""

    def ids(*args: str) -> list[str]:
        return [r["request_id"] for r in cli_json("receipts", "list", "--db", str(db), *args)]

    assert ids("--limit", "2") == ["r-1", "r-2"]
    assert ids("--limit", "2", "--offset", "2") == ["r-3", "r-4"]
    assert ids("--newest-first", "--limit", "2") == ["t-1", "r-4"]
    assert ids("--offset", "9") == []
    # r-1 at 22:13:20Z, r-2 at 23:13:20Z, r-3 at 00:13:20Z, r-4 and t-1 at 01:13:20Z
    assert ids("--since", "2023-11-14T23:00:00Z", "--until", "2023-11-15T00:30:00") == [
        "r-2",
        "r-3",
    ]
    assert ids("--since", "2023-11-15T01:13:20+00:00") == ["r-4", "t-1"]
    assert ids("--since", "1d") == []  # everything was written in 2023
    assert len(ids("--until", "90m")) == 5


def test_receipts_list_prints_a_table_with_a_row_per_receipt(db: Path) -> None:
    """Without --json, one table row per receipt; an expired lease is labelled."""
    result = cli("receipts", "list", "--db", db)
    assert result.exit_code == 0
    rows = table_rows(result.stdout)
    assert rows[0] == [
        "NAMESPACE",
        "REQUEST ID",
        "ACTION",
        "STATUS",
        "ATTEMPT",
        "CREATED",
        "COMPLETED",
    ]
    assert rows[1] == [
        "default",
        "r-1",
        "charge",
        "SUCCEEDED",
        "1",
        "2023-11-14T22:13:20.000Z",
        "2023-11-14T22:13:20.000Z",
    ]
    assert rows[4][:4] == ["default", "r-4", "charge", "IN_DOUBT (lease expired)"]
    assert len(rows) == 6
    assert "1-5 of 5 matching receipts" in result.stderr


def test_receipts_show_gives_the_redacted_receipt_and_its_audit_trail(db: Path) -> None:
    """receipts show: the full receipt (card number redacted) and its events in order."""
    shown = cli_json("receipts", "show", "r-1", "--db", db)
    receipt = shown["receipt"]
    assert receipt["status"] == "SUCCEEDED"
    assert receipt["payload"] == {**CHARGE, "card_number": "[REDACTED]"}
    assert receipt["downstream_key"].startswith("sa1-")
    assert [e["kind"] for e in shown["audit_trail"]] == [
        "claimed",
        "succeeded",
        "replayed",
        "conflict",
    ]
    raw = cli_json("receipts", "show", "r-1", "--db", db, "--no-redact")
    assert raw["receipt"]["payload"] == CHARGE
    assert raw["receipt"]["result"]["receipt_email"] == "ada@example.com"


def test_receipts_show_table_and_namespace(db: Path) -> None:
    """The table view lists the fields; --namespace reaches another tenant's record."""
    result = cli("receipts", "show", "t-1", "--namespace", "tenant-b", "--db", db)
    assert result.exit_code == 0
    rows = table_rows(result.stdout)
    assert ["status", "SUCCEEDED"] in rows
    assert ["result", "sent"] in rows
    # timestamps are shown as ISO 8601 under names without "_ms"
    created = next(row for row in rows if row and row[0] == "created_at")
    assert created[1].endswith("Z")
    assert "T" in created[1]
    assert not any(row and row[0].endswith("_ms") for row in rows)
    assert any(r[2:4] == ["claimed", "seeder"] for r in rows if len(r) > 3)


def test_receipts_show_unknown_id_exits_1(db: Path) -> None:
    """An unknown request id (or one in another namespace) is exit 1 with a message."""
    result = cli("receipts", "show", "nope", "--db", db)
    assert result.exit_code == 1
    assert "no receipt 'nope' in namespace 'default'" in result.stderr
    assert "stored quoted" not in result.stderr
    assert cli("receipts", "show", "t-1", "--db", db).exit_code == 1


def test_receipts_show_points_at_a_decorator_key_stored_quoted(tmp_path: Path) -> None:
    """The decorator stores a str key as its JSON text: asked for the bare id, the CLI says
    there is a record under the quoted one; an empty listing says so plainly."""
    path = tmp_path / "d.db"
    SQLiteStore(path).close()
    assert "no matching receipts" in cli("receipts", "list", "--db", path).stderr
    with Guard(SQLiteStore(path)) as guard:

        @guard.guarded(action="create_ticket", key_arg="request_id")
        def create_ticket(title: str, request_id: str) -> str:
            return title

        create_ticket("printer", request_id="conv-7:ticket-1")
    result = cli("receipts", "show", "conv-7:ticket-1", "--db", path)
    assert result.exit_code == 1
    assert 'there is one for "conv-7:ticket-1"' in result.stderr
    assert cli("receipts", "show", '"conv-7:ticket-1"', "--db", path).exit_code == 0


# -- in doubt, reconcile, resolve ------------------------------------------------------------


def test_in_doubt_list_shows_declared_and_expired_records(db: Path) -> None:
    """in-doubt list: r-3 stored IN_DOUBT and r-4 PENDING with a dead owner, nothing else."""
    rows = cli_json("in-doubt", "list", "--db", db)
    assert [(r["request_id"], r["stored_status"], r["lease_owner"]) for r in rows] == [
        ("r-3", "IN_DOUBT", "seeder"),
        ("r-4", "PENDING", "worker-dead:4242:MainThread"),
    ]
    table = cli("in-doubt", "list", "--db", db)
    assert table.exit_code == 0
    row = table_rows(table.stdout)[2]
    assert row[:5] == ["default", "r-4", "charge", "PENDING, lease expired", "1"]
    assert cli_json("in-doubt", "list", "--db", db, "--namespace", "tenant-b") == []


APP_MODULE = """
from safeagent import ActionPolicy, AsyncGuard, Guard, MemoryStore, Reconciliation

def check(req):
    verdicts = {{
        "r-3": Reconciliation.happened({{"charge_id": "ch_found", "attempt": req.attempt}}),
        "r-4": Reconciliation.not_happened(),
    }}
    return verdicts.get(req.request_id, Reconciliation.unknown(note="ask the bank"))

async def acheck(req):
    return check(req)

guard = Guard(MemoryStore(), actions={{"charge": ActionPolicy(reconcile={hook})}})
aguard = AsyncGuard(MemoryStore(), actions={{"charge": ActionPolicy(reconcile=acheck)}})

class App:
    guard = guard

app = App()
mapping = {{"charge": ActionPolicy(reconcile=check)}}
unknown = Guard(MemoryStore(), actions={{"charge": ActionPolicy(
    reconcile=lambda req: Reconciliation.unknown(note="ask the bank"))}})
"""


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: Any) -> Iterator[str]:
    """An application module in the working directory, importable under a unique name."""
    name = f"ops_app_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(APP_MODULE.format(hook="check"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("attr", ["guard", "aguard", "app", "mapping"])
def test_in_doubt_reconcile_runs_the_apps_hooks_over_the_chosen_store(
    db: Path, app_module: str, attr: str
) -> None:
    """reconcile --app module:attr runs the app's hooks (Guard, AsyncGuard, .guard, mapping)."""
    report = cli_json("in-doubt", "reconcile", "--app", f"{app_module}:{attr}", "--db", db)
    assert report["checked"] == 2
    assert report["happened"] == 1
    assert report["not_happened"] == 1
    assert report["unknown"] == report["no_hook"] == 0
    assert sorted((i["request_id"], i["verdict"]) for i in report["items"]) == [
        ("r-3", "happened"),
        ("r-4", "not_happened"),
    ]
    after = records(db)
    assert after["r-3"].status is Status.SUCCEEDED
    assert json.loads(after["r-3"].result_json or "null") == {
        "charge_id": "ch_found",
        "attempt": 1,
    }
    assert after["r-4"].status is Status.RELEASED
    assert cli_json("in-doubt", "list", "--db", db) == []


def test_in_doubt_reconcile_exits_1_while_records_stay_in_doubt(db: Path, app_module: str) -> None:
    """A hook that answers "unknown" leaves both records in doubt: exit 1, table printed."""
    result = cli("in-doubt", "reconcile", "--app", f"{app_module}:unknown", "--db", db)
    assert result.exit_code == 1
    rows = table_rows(result.stdout)
    assert ["default", "r-3", "unknown"] in rows
    assert ["unknown", "2"] in rows
    assert [r["request_id"] for r in cli_json("in-doubt", "list", "--db", db)] == ["r-3", "r-4"]


def test_in_doubt_reconcile_rejects_a_bad_app_spec(db: Path, app_module: str) -> None:
    """--app without ':', an unknown module or attribute, or a non-guard object: exit 2."""
    for spec, message in [
        (app_module, "must be module:attribute"),
        ("no_such_module_xyz:guard", "cannot import 'no_such_module_xyz'"),
        (f"{app_module}:missing", "has no attribute 'missing'"),
        (f"{app_module}:check", "expected a safeagent Guard"),
    ]:
        result = cli("in-doubt", "reconcile", "--app", spec, "--db", db)
        assert result.exit_code == 2, spec
        assert message in result.stderr
    assert len(cli_json("in-doubt", "list", "--db", db)) == 2


def test_resolve_succeeded_stores_the_result_and_audits_who_and_why(db: Path) -> None:
    """resolve --succeeded --result settles an in-doubt record, audited with by and reason."""
    out = cli_json(
        "resolve",
        "r-3",
        "--succeeded",
        "--result",
        '{"charge_id": "ch_manual"}',
        "--by",
        "alice",
        "--reason",
        "found in the Stripe dashboard",
        "--db",
        db,
    )
    assert out["status"] == "SUCCEEDED"
    assert out["result"] == {"charge_id": "ch_manual"}
    assert out["fencing_token"] == 2
    trail = cli_json("receipts", "show", "r-3", "--db", db)["audit_trail"]
    resolved = [e for e in trail if e["kind"] == "resolved"]
    assert len(resolved) == 1
    assert resolved[0]["actor"] == "alice"
    assert resolved[0]["detail"]["reason"] == "found in the Stripe dashboard"


def test_resolve_released_lets_the_next_call_run_once(db: Path, tmp_path: Path) -> None:
    """After resolve --released, the application's next call runs the side effect once."""
    result = cli(
        "resolve", "r-4", "--released", "--by", "bob", "--reason", "never sent", "--db", db
    )
    assert result.exit_code == 0
    assert "resolved default/r-4 (released): now RELEASED" in result.stdout
    ledger = Ledger(tmp_path / "ledger.db")
    guard = Guard(SQLiteStore(db), wait=0)
    payload = {**CHARGE, "amount_cents": 900}
    for _ in range(2):
        receipt = guard.execute("r-4", "charge", payload, lambda ctx: ledger.append("r-4"))
    assert ledger.count("r-4") == 1
    assert receipt.attempt == 2
    guard.store.close()


def test_resolve_failed_and_rerun(db: Path) -> None:
    """--failed stores an error; --rerun turns a FAILED record into RELEASED."""
    failed = cli_json(
        "resolve",
        "r-3",
        "--failed",
        "--error-type",
        "CardDeclined",
        "--by",
        "alice",
        "--reason",
        "the bank says declined",
        "--db",
        db,
    )
    assert failed["status"] == "FAILED"
    assert failed["error"] == {"type": "CardDeclined", "message": "the bank says declined"}
    rerun = cli_json("resolve", "r-2", "--rerun", "--by", "alice", "--reason", "fixed", "--db", db)
    assert rerun["status"] == "RELEASED"


def test_resolve_refusals_exit_1_and_change_nothing(db: Path) -> None:
    """Resolving a finished record or an unknown id is refused (exit 1)."""
    before = records(db)
    done = cli("resolve", "r-1", "--failed", "--by", "a", "--reason", "x", "--db", db)
    assert done.exit_code == 1
    assert "not in doubt" in done.stderr
    missing = cli("resolve", "nope", "--released", "--by", "a", "--reason", "x", "--db", db)
    assert missing.exit_code == 1
    assert "no record" in missing.stderr
    assert records(db) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "a", "--reason", "x"], "exactly one of"),
        (["--succeeded", "--failed", "--by", "a", "--reason", "x"], "exactly one of"),
        (["--failed", "--result", "1", "--by", "a", "--reason", "x"], "--result goes with"),
        (["--succeeded", "--error-type", "E", "--by", "a", "--reason", "x"], "go with --failed"),
        (["--succeeded", "--result", "{nope", "--by", "a", "--reason", "x"], "not valid JSON"),
        (["--succeeded", "--by", "a", "--reason", " "], "reason must be a non-empty str"),
        (["--succeeded", "--by", "a"], "Missing option '--reason'"),
    ],
)
def test_resolve_usage_errors_exit_2_and_change_nothing(
    db: Path, args: list[str], message: str
) -> None:
    """Bad flag combinations, bad JSON and missing options are exit 2; nothing changes."""
    before = records(db)
    result = cli("resolve", "r-3", *args, "--db", db)
    assert result.exit_code == 2
    assert message in result.output
    assert records(db) == before


# -- cases -----------------------------------------------------------------------------------


def test_cases_list_and_state_filter(db: Path) -> None:
    """cases list shows both cases; --state narrows; the table shows the outcome."""
    cases = cli_json("cases", "list", "--db", db)
    assert [(c["case_id"], c["state"], c["outcome"]) for c in cases] == [
        ("case-1", "FINAL", "approve"),
        ("case-2", "IN_RECONCILIATION", None),
    ]
    only = cli_json("cases", "list", "--db", db, "--state", "in_reconciliation")
    assert [c["case_id"] for c in only] == ["case-2"]
    table = table_rows(cli("cases", "list", "--db", db).stdout)
    assert table[1][:6] == ["default", "case-1", "FINAL", "approve", "1", "approve"]


def test_cases_show_gives_signals_tally_history_and_settlement(db: Path) -> None:
    """cases show gives signals, tally, state history and (once settled) the settlement."""
    shown = cli_json("cases", "show", "case-2", "--db", db)
    assert shown["case"]["tally"]["scores"] == {"approve": 0.3, "reject": 0.35}
    assert [(s["source"], s["outcome"], s["status"]) for s in shown["signals"]] == [
        ("fraud-model", "approve", "live"),
        ("policy-agent", "reject", "live"),
    ]
    assert shown["signals"][1]["metadata"] == {"rule": "R7"}
    assert [(e["detail"]["from"], e["detail"]["to"]) for e in shown["state_history"]] == [
        (None, "OPEN"),
        ("OPEN", "RESOLVED_PROVISIONAL"),
        ("RESOLVED_PROVISIONAL", "IN_RECONCILIATION"),
    ]
    assert shown["settlement"] is None
    guard = Guard(SQLiteStore(db))
    FinalityGate(guard).settle("case-1", "pay_out", lambda outcome, ctx: {"paid": outcome})
    guard.store.close()
    settled = cli_json("cases", "show", "case-1", "--db", db)
    assert settled["case"]["state"] == "SETTLED"
    assert settled["settlement"]["status"] == "SUCCEEDED"
    assert settled["state_history"][-1]["detail"]["to"] == "SETTLED"
    table = cli("cases", "show", "case-2", "--db", db)
    assert ["RESOLVED_PROVISIONAL", "IN_RECONCILIATION", "-", "policy-agent"] in [
        r[1:] for r in table_rows(table.stdout)
    ]
    assert cli("cases", "show", "nope", "--db", db).exit_code == 1


def signal_args(case_id: str, confidence: str, *extra: str | Path) -> list[str | Path]:
    return ["cases", "signal", case_id, "--source", "human", "--outcome", "approve",
            "--confidence", confidence, *extra]  # fmt: skip


def test_cases_signal_records_a_signal_with_metadata(db: Path) -> None:
    """cases signal adds a live signal (with its metadata) and reports the case after it."""
    case = cli_json(*signal_args("case-2", "1", "--metadata", '{"ticket": "OPS-1"}', "--db", db))
    assert case["state"] == "IN_RECONCILIATION"
    assert [(s["source"], s["metadata"]) for s in case["signals"]][-1] == (
        "human",
        {"ticket": "OPS-1"},
    )
    assert len(case["signals"]) == 3


def test_cases_signal_opens_a_case_only_with_open(db: Path) -> None:
    """A signal on an absent case is exit 1 and creates nothing unless --open is given."""
    absent = cli(*signal_args("case-9", "0.9", "--db", db))
    assert absent.exit_code == 1
    assert "pass --open" in absent.stderr
    assert [c["case_id"] for c in cli_json("cases", "list", "--db", db)] == ["case-1", "case-2"]
    opened = cli_json(*signal_args("case-9", "0.9", "--open", "--db", db))
    assert (opened["state"], opened["outcome"]) == ("FINAL", "approve")


def test_cases_signal_open_takes_the_new_cases_policy(db: Path) -> None:
    """--open with --threshold/--quorum opens the case under that policy (one confident
    signal no longer makes it FINAL under quorum 2); the policy of an existing case never
    changes, so asking for another one is exit 1 and records nothing; the options without
    --open, or out of range, are exit 2."""
    opened = cli_json(*signal_args("case-9", "0.9", "--open", "--threshold", "0.95",
                                   "--quorum", "2", "--db", db))  # fmt: skip
    assert (opened["state"], opened["policy"]) == (
        "RESOLVED_PROVISIONAL",
        {"threshold": 0.95, "quorum": 2},
    )
    other = cli(*signal_args("case-9", "1", "--open", "--quorum", "1", "--db", db))
    assert other.exit_code == 1
    assert "policy never changes" in other.stderr
    assert len(cli_json("cases", "show", "case-9", "--db", db)["signals"]) == 1
    for extra in (["--threshold", "0.5"], ["--open", "--threshold", "1.5"],
                  ["--open", "--quorum", "0"]):  # fmt: skip
        bad = cli(*signal_args("case-10", "1", *extra, "--db", db))
        assert bad.exit_code == 2, bad.output
    assert cli("cases", "show", "case-10", "--db", db).exit_code == 1


def test_cases_signal_open_racing_another_opener_is_exit_1(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process opens the case with another policy between the CLI's look and its
    --open: the library refuses the open, and the CLI says so as for a case it saw (exit 1,
    no signal recorded), not as bad input (exit 2)."""
    from safeagent import ConsensusPolicy, FinalityGate, Guard, SQLiteStore

    store = SQLiteStore(db)
    FinalityGate(Guard(store)).open("case-11", policy=ConsensusPolicy(0.6, 3))
    store.close()
    monkeypatch.setattr(FinalityGate, "get", lambda *_a, **_k: None)  # looked before it
    raced = cli(*signal_args("case-11", "1", "--open", "--quorum", "1", "--db", db))
    assert raced.exit_code == 1, raced.output
    assert "policy never changes" in raced.stderr
    assert "no signal recorded" in raced.stderr
    monkeypatch.undo()
    assert cli_json("cases", "show", "case-11", "--db", db)["signals"] == []


def test_cases_resolve_finalizes_once(db: Path) -> None:
    """cases resolve makes an IN_RECONCILIATION case FINAL; resolving it again is exit 1."""
    args = ["cases", "resolve", "case-2", "--outcome", "reject", "--by", "carol",
            "--reason", "policy R7", "--db", db]  # fmt: skip
    resolved = cli_json(*args)
    assert (resolved["state"], resolved["outcome"], resolved["resolved_by"]) == (
        "FINAL",
        "reject",
        "carol",
    )
    again = cli(*args)
    assert again.exit_code == 1
    assert "is FINAL" in again.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--confidence", "1.5"], "confidence must be a number in [0, 1]"),
        (["--confidence", "0.5", "--metadata", "[1]"], "--metadata must be a JSON object"),
        (["--confidence", "high"], "Invalid value for '--confidence'"),
    ],
)
def test_cases_signal_bad_input_exits_2(db: Path, extra: list[str], message: str) -> None:
    """A confidence out of range, non-object metadata or a non-number: exit 2."""
    result = cli("cases", "signal", "case-2", "--source", "s", "--outcome", "o", *extra, "--db", db)
    assert result.exit_code == 2
    assert message in result.output


# -- audit -----------------------------------------------------------------------------------


def all_events(db: Path) -> list[Any]:
    store = SQLiteStore(db)
    try:
        return store.events()
    finally:
        store.close()


def test_audit_tail_prints_the_last_events(db: Path) -> None:
    """audit tail -n 3 prints the last three events; --json one object per line."""
    events = all_events(db)
    result = cli("audit", "tail", "-n", "3", "--db", db)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert [f"#{e.id}" for e in events[-3:]] == [line.split()[1] for line in lines]
    as_json = cli("audit", "tail", "-n", "2", "--json", "--subject", "r-1", "--db", db)
    assert [json.loads(line)["kind"] for line in as_json.stdout.splitlines()] == [
        "replayed",
        "conflict",
    ]
    assert cli("audit", "tail", "-n", "0", "--db", db).stdout == ""


def test_audit_export_jsonl_and_csv_are_redacted(db: Path, tmp_path: Path) -> None:
    """audit export writes every event (to stdout or --out), card numbers redacted."""
    count = len(all_events(db))
    out = tmp_path / "trail.jsonl"
    result = cli("audit", "export", "--out", out, "--db", db)
    assert result.exit_code == 0
    assert f"exported {count} events to {out}" in result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == count
    assert lines[0]["detail"]["payload"]["card_number"] == "[REDACTED]"
    assert "4242 4242" not in out.read_text()
    as_csv = cli("audit", "export", "--format", "csv", "--namespace", "tenant-b", "--db", db)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["kind"] for r in rows] == ["claimed", "succeeded"]
    assert {r["subject"] for r in rows} == {"t-1"}
    assert cli("audit", "export", "--format", "xml", "--db", db).exit_code == 2
    for where, why in ((tmp_path, "Is a directory"), (tmp_path / "no" / "x.csv", "No such")):
        refused = cli("audit", "export", "--out", where, "--db", db)
        assert refused.exit_code == 2
        assert f"--out: cannot write {where}: {why}" in refused.stderr
        assert "Traceback" not in refused.stderr + refused.stdout
    assert tmp_path.is_dir()


def tamper(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(sql)
    conn.close()


def test_audit_verify_passes_then_finds_an_edited_event(db: Path) -> None:
    """verify passes an untouched trail and names an event edited with raw SQL (exit 1)."""
    ok = cli_json("audit", "verify", "--db", db)
    assert ok["ok"] is True
    assert ok["events_checked"] == len(all_events(db))
    target = all_events(db)[1]
    tamper(db, f"UPDATE audit_events SET actor = 'mallory' WHERE id = {target.id}")
    result = cli("audit", "verify", "--db", db, "--json")
    assert result.exit_code == 1
    found = json.loads(result.stdout)
    assert found["ok"] is False
    assert [(p["kind"], p["event_id"]) for p in found["problems"]] == [("edited", target.id)]
    table = cli("audit", "verify", "--db", db)
    assert table.exit_code == 1
    assert "TAMPERED: 1 problem(s)" in table.stdout
    assert "warning: no audit key" in table.stderr


def test_audit_verify_finds_a_receipt_edited_in_the_database(db: Path) -> None:
    """verify compares every finished receipt with the outcome digest its event recorded:
    a result changed with raw SQL is named (exit 1), in the table and in --json."""
    clean = cli_json("audit", "verify", "--db", db)
    assert clean["receipts_checked"] >= 1
    assert clean["receipts_unverified"] == 0
    with closing(sqlite3.connect(db)) as conn:
        (rid,) = conn.execute(
            "SELECT request_id FROM executions WHERE status = 'SUCCEEDED' LIMIT 1"
        ).fetchone()
    tamper(db, f"UPDATE executions SET result = '{{\"forged\":1}}' WHERE request_id = '{rid}'")
    result = cli("audit", "verify", "--db", db, "--json")
    assert result.exit_code == 1
    found = json.loads(result.stdout)
    assert [p["kind"] for p in found["problems"]] == ["receipt_edited"]
    assert rid in found["problems"][0]["detail"]
    table = cli("audit", "verify", "--db", db)
    assert table.exit_code == 1
    assert "receipt_edited" in table.stdout
    assert "receipts checked" in table.stdout


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.key"
    path.write_text(KEY)
    return path


def test_audit_anchor_without_a_key_is_exit_2(db: Path) -> None:
    """anchor with neither --key-file nor $SAFEAGENT_AUDIT_KEY is exit 2 and stores nothing."""
    missing = cli("audit", "anchor", "--db", db)
    assert missing.exit_code == 2
    assert "audit key" in missing.stderr
    assert cli_json("audit", "verify", "--db", db)["anchors_checked"] == 0


def test_audit_anchor_signs_every_chain_head_and_verify_checks_it(db: Path, key_file: Path) -> None:
    """anchor --key-file signs the 16 chain heads; verify with the key checks the anchor."""
    anchor = cli_json("audit", "anchor", "--key-file", key_file, "--db", db)
    assert anchor["id"] == 1
    assert len(anchor["heads"]) == 16
    checked = cli_json("audit", "verify", "--key-file", key_file, "--db", db)
    assert (checked["ok"], checked["anchors_checked"], checked["anchors_unverified"]) == (
        True,
        1,
        0,
    )


def test_audit_verify_with_another_key_reports_a_bad_anchor(
    db: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify with a different $SAFEAGENT_AUDIT_KEY names the anchor as bad (exit 1)."""
    assert cli("audit", "anchor", "--key-file", key_file, "--db", db).exit_code == 0
    monkeypatch.setenv("SAFEAGENT_AUDIT_KEY", "another-key-of-32-bytes-length!!")
    wrong = cli("audit", "verify", "--db", db, "--json")
    assert wrong.exit_code == 1
    assert [p["kind"] for p in json.loads(wrong.stdout)["problems"]] == ["bad_anchor"]


def test_audit_verify_with_a_too_short_key_is_exit_2(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $SAFEAGENT_AUDIT_KEY shorter than 16 bytes is a usage error (exit 2)."""
    monkeypatch.setenv("SAFEAGENT_AUDIT_KEY", "short")
    result = cli("audit", "verify", "--db", db)
    assert result.exit_code == 2
    assert "at least 16 bytes" in result.stderr


def test_audit_verify_finds_a_deleted_event_after_the_anchor(db: Path, key_file: Path) -> None:
    """An anchored event deleted with raw SQL is reported as deleted (exit 1)."""
    assert cli("audit", "anchor", "--key-file", key_file, "--db", db).exit_code == 0
    last = all_events(db)[-1]
    tamper(db, f"DELETE FROM audit_events WHERE id = {last.id}")
    result = cli("audit", "verify", "--key-file", key_file, "--db", db, "--json")
    assert result.exit_code == 1
    assert "deleted" in {p["kind"] for p in json.loads(result.stdout)["problems"]}


def test_audit_anchor_gives_its_pin_and_verify_checks_the_pinned_anchor(
    db: Path, key_file: Path, tmp_path: Path
) -> None:
    """audit anchor prints the pin to keep outside the database (ID:MAC; --json has it
    too) and --pin-file writes it; verify --pin-file / --last-anchor report the pinned
    anchor deleted (exit 1), and refuse a bad pin or both options (exit 2)."""
    first = cli_json("audit", "anchor", "--key-file", key_file, "--db", db)
    assert first["pin"] == f"{first['id']}:{first['mac']}"
    pin_file = tmp_path / "audit.pin"
    text = cli("audit", "anchor", "--key-file", key_file, "--db", db, "--pin-file", pin_file)
    assert text.exit_code == 0, text.output
    second = pin_file.read_text().strip()
    assert second.startswith("2:")
    assert f"pin {second} written to {pin_file}" in text.stdout
    shown = cli("audit", "anchor", "--key-file", key_file, "--db", db)
    assert "pin (keep it outside the database): 3:" in shown.stdout
    checked = cli_json(
        "audit", "verify", "--key-file", key_file, "--pin-file", pin_file, "--db", db
    )
    assert (checked["ok"], checked["last_anchor"]) == (True, 2)
    assert cli("audit", "verify", "--last-anchor", first["pin"], "--db", db).exit_code == 0
    table = cli("audit", "verify", "--key-file", key_file, "--pin-file", pin_file, "--db", db)
    assert "last anchor #2 checked against its pin" in table.stdout
    tamper(db, "DELETE FROM audit_anchors WHERE id >= 2")
    result = cli("audit", "verify", "--key-file", key_file, "--pin-file", pin_file, "--db", db)
    assert result.exit_code == 1
    assert "missing_anchor" in result.stdout
    found = cli("audit", "verify", "--last-anchor", second, "--db", db, "--json")
    assert [p["kind"] for p in json.loads(found.stdout)["problems"]] == ["missing_anchor"]
    for bad in (["--last-anchor", "2:xyz"], ["--pin-file", tmp_path / "none.pin"]):
        refused = cli("audit", "verify", *bad, "--db", db)
        assert refused.exit_code == 2
        assert refused.stderr.startswith("error:")
    both = cli("audit", "verify", "--last-anchor", second, "--pin-file", pin_file, "--db", db)
    assert both.exit_code == 2
    no_dir = cli(
        "audit", "anchor", "--key-file", key_file, "--db", db,
        "--pin-file", tmp_path / "no" / "such.pin",
    )  # fmt: skip
    assert no_dir.exit_code == 2
    assert cli_json("audit", "verify", "--db", db)["anchors_checked"] == 1  # nothing anchored


def test_audit_verify_with_a_key_reports_a_trail_no_anchor_signs(db: Path, key_file: Path) -> None:
    """With the key, a trail with events and no anchor at all (every anchor deleted) is
    a no_anchor problem (exit 1); --allow-unanchored accepts a trail never anchored."""
    result = cli("audit", "verify", "--key-file", key_file, "--db", db)
    assert result.exit_code == 1
    assert "no_anchor" in result.stdout
    assert "no anchor signs this trail" in result.stdout
    allowed = cli_json("audit", "verify", "--key-file", key_file, "--allow-unanchored", "--db", db)
    assert (allowed["ok"], allowed["anchors_checked"]) == (True, 0)
    assert cli("audit", "verify", "--db", db).exit_code == 0  # no key: nothing to check


def test_stats_counts_executions_replays_conflicts_and_in_doubt(db: Path) -> None:
    """stats counts per action and in a window (every claim, the dead r-4's too, executes)."""
    found = cli_json("stats", "--db", db)
    assert (found["executions"], found["replays"], found["conflicts"], found["in_doubt"]) == (
        5,
        1,
        1,
        1,
    )
    assert found["per_action"]["charge"] == {
        "executions": 3,
        "replays": 1,
        "conflicts": 1,
        "in_doubt": 1,
    }
    assert found["per_action"]["refund"]["executions"] == 1
    window = cli_json("stats", "--db", db, "--since", "2023-11-14T23:00:00Z")
    assert (window["executions"], window["replays"], window["conflicts"]) == (4, 0, 0)
    assert cli_json("stats", "--db", db, "--since", "1h")["executions"] == 0
    table = table_rows(cli("stats", "--db", db, "--namespace", "tenant-b").stdout)
    assert ["email", "1", "0", "0", "0"] in table
    assert ["(total)", "1", "0", "0", "0"] in table


# -- purge -----------------------------------------------------------------------------------


def test_purge_asks_first_and_declining_changes_nothing(db: Path) -> None:
    """Without --yes purge asks; "n" or no answer is exit 1 and nothing is purged."""
    for answer in ("n\n", ""):
        result = cli("purge", "--older-than", "30d", "--db", db, input=answer)
        assert result.exit_code == 1
        assert "Purge records finished before" in result.stderr
        assert "nothing was purged" in result.stderr
    assert all(r.purged_at_ms is None for r in records(db).values())


def test_purge_tombstones_finished_records_and_a_retry_does_not_run(
    db: Path, tmp_path: Path
) -> None:
    """purge --yes tombstones finished records, and a retry of one never runs again."""
    counts = cli_json("purge", "--older-than", "30d", "--yes", "--by", "ops", "--db", db)
    assert counts.pop("cutoff") == iso(counts.pop("cutoff_ms"))
    # r-4 is PENDING with an expired lease: it reads (and is kept) in doubt, like r-3.
    assert counts == {"tombstoned": 3, "released": 0, "kept_pending": 0, "kept_in_doubt": 2}
    after = records(db)
    assert after["r-1"].purged_at_ms is not None
    assert after["r-1"].payload_json == ""
    assert after["r-3"].purged_at_ms is None
    listed = table_rows(cli("receipts", "list", "--db", db).stdout)
    assert listed[1][3] == "SUCCEEDED (tombstone)"
    ledger = Ledger(tmp_path / "ledger.db")
    guard = Guard(SQLiteStore(db), wait=0)
    with pytest.raises(ReceiptPurgedError):
        guard.execute("r-1", "charge", CHARGE, lambda ctx: ledger.append("r-1"))
    guard.store.close()
    assert ledger.count() == 0
    purged = [e for e in all_events(db) if e.kind is EventKind.PURGED]
    assert purged[-1].actor == "ops"


def test_purge_interactive_yes_purges(db: Path) -> None:
    """Answering "y" to the prompt purges."""
    result = cli("purge", "--older-than", "1w", "--db", db, input="y\n")
    assert result.exit_code == 0
    assert ["tombstoned", "3"] in table_rows(result.stdout)


@pytest.mark.parametrize("value", ["30", "thirty days", "-1d", "1y"])
def test_purge_needs_a_duration_with_a_unit(db: Path, value: str) -> None:
    """--older-than without a unit (30 could be seconds or days) is exit 2, nothing purged."""
    result = cli("purge", "--older-than", value, "--yes", "--db", db)
    assert result.exit_code == 2
    assert "expected a duration with a unit" in result.stderr
    assert all(r.purged_at_ms is None for r in records(db).values())


# -- stores and usage ------------------------------------------------------------------------


def test_missing_database_is_exit_3_and_nothing_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing --db, $SAFEAGENT_DB or ./safeagent.db: exit 3, a clear message, no file."""
    monkeypatch.chdir(tmp_path)
    default = cli("receipts", "list")
    assert default.exit_code == 3
    assert f"no SafeAgent database at {tmp_path / 'safeagent.db'}" in default.stderr
    assert cli("in-doubt", "list", "--db", tmp_path / "sub" / "x.db").exit_code == 3
    monkeypatch.setenv("SAFEAGENT_DB", str(tmp_path / "env.db"))
    from_env = cli("audit", "verify")
    assert from_env.exit_code == 3
    assert "env.db" in from_env.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_a_file_that_is_not_a_safeagent_database_is_exit_3_and_untouched(tmp_path: Path) -> None:
    """Some other SQLite file, or no SQLite file at all: exit 3, the file unchanged."""
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    before = other.read_bytes()
    result = cli("receipts", "list", "--db", other)
    assert result.exit_code == 3
    assert "is not a SafeAgent database" in result.stderr
    assert other.read_bytes() == before
    assert cli("stats", "--db", text).exit_code == 3
    assert text.read_text() == "hello"


@pytest.mark.parametrize(
    "command", [("receipts", "list"), ("audit", "verify"), ("purge", "--older-than", "0s", "--yes")]
)
def test_a_database_of_an_older_schema_is_exit_3_and_not_upgraded(
    db: Path, command: tuple[str, ...]
) -> None:
    """A file an older SafeAgent wrote (schema version below this release's): exit 3 and
    the file byte for byte as it was, whatever the command. Opening it would upgrade it,
    and the release the application runs would then refuse to start on it."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE safeagent_meta SET value = '4' WHERE key = 'schema_version'")
    conn.close()
    before = db.read_bytes()

    result = cli(*command, "--db", db)

    assert result.exit_code == 3
    assert "has schema version 4, written by an older SafeAgent" in result.stderr
    assert "Nothing was changed" in result.stderr
    assert db.read_bytes() == before


def test_store_options_usage_errors(db: Path) -> None:
    """--db with --database-url, or a bad --schema: exit 2."""
    both = cli("receipts", "list", "--db", db, "--database-url", "postgresql://x/y")
    assert both.exit_code == 2
    assert "exclusive" in both.stderr
    bad = cli("receipts", "list", "--database-url", "postgresql://x/y", "--schema", "a;drop")
    assert bad.exit_code == 2


def test_an_unreachable_postgresql_is_exit_3_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """$SAFEAGENT_DATABASE_URL pointing at a closed port: exit 3, password masked."""
    pytest.importorskip("psycopg")
    monkeypatch.setenv("SAFEAGENT_DATABASE_URL", "postgresql://ops:hunter2@127.0.0.1:1/none")
    result = cli("receipts", "list")
    assert result.exit_code == 3
    assert "cannot reach PostgreSQL at postgresql://ops:***@127.0.0.1:1/none" in result.stderr
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["receipts", "list", "--bogus"],
        ["receipts", "list", "--status", "DONE"],
        ["receipts", "list", "--limit", "0"],
        ["receipts", "list", "--since", "yesterday"],
        ["receipts", "list", "--since", "1h", "--until", "2h"],
        ["nonsense"],
        ["audit", "tail", "-n", "-1"],
    ],
)
def test_bad_arguments_are_exit_2(db: Path, args: list[str]) -> None:
    """Unknown options and commands, bad choices, ranges and instants: exit 2."""
    assert cli(*args, "--db", db).exit_code == 2


def test_help_documents_the_exit_codes_and_version() -> None:
    """--help on the root and on a command lists the exit codes; --version prints it."""
    for args in ([], ["audit", "verify"], ["purge"]):
        result = cli(*args, "--help")
        assert result.exit_code == 0
        assert "Exit codes:" in result.stdout
        assert "3  the store is missing, unreachable or failed" in result.stdout
    assert cli("--version").stdout.startswith("safeagent ")


def test_demo_without_the_examples_folder_is_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pip-installed package has no examples folder: demo says so and exits 2."""
    from safeagent import _cli

    monkeypatch.setattr(_cli, "DEMO_PATH", Path("/nonexistent/examples/safe_agent_demo.py"))
    result = cli("demo")
    assert result.exit_code == 2
    assert "source checkout" in result.stderr


@pytest.fixture
def serve_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A stand-in safeagent.integrations.mcp whose serve() records its arguments."""
    calls: list[dict[str, Any]] = []
    fake = types.ModuleType("safeagent.integrations.mcp")
    fake.serve = lambda **kw: calls.append(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "safeagent.integrations.mcp", fake)
    return calls


@pytest.mark.parametrize("install_hint_in_error", [True, False])
def test_mcp_without_its_extra_says_how_to_install_it_once(
    db: Path, monkeypatch: pytest.MonkeyPatch, install_hint_in_error: bool
) -> None:
    """Without the mcp extra: exit 2 and one install hint, whether the integration's own
    ImportError (which names the command) or a bare one from the SDK arrives."""
    import safeagent._cli as cli_module

    def missing(name: str) -> Any:
        raise ImportError(
            "needs the MCP Python SDK: pip install -e '.[mcp]' in a SafeAgent clone"
            if install_hint_in_error
            else "No module named 'mcp'"
        )

    monkeypatch.setattr(cli_module.importlib, "import_module", missing)
    result = cli("mcp", "--db", db)
    assert result.exit_code == 2
    assert result.stderr.count("pip install -e '.[mcp]'") == 1, result.stderr


def test_mcp_calls_serve_with_the_chosen_database(db: Path, serve_calls: list[Any]) -> None:
    """mcp imports the integration lazily and calls serve(db=<the database>)."""
    assert cli("mcp", "--db", db).exit_code == 0
    assert serve_calls == [{"db": str(db)}]


def test_mcp_passes_the_signal_source_and_refuses_a_bad_one(
    db: Path, serve_calls: list[Any]
) -> None:
    """mcp --signal-source NAME hands serve() the source its signals are recorded as; an
    empty one is exit 2 before anything is served."""
    assert cli("mcp", "--db", db, "--signal-source", "planner").exit_code == 0
    assert serve_calls == [{"db": str(db), "signal_source": "planner"}]
    bad = cli("mcp", "--db", db, "--signal-source", "")
    assert bad.exit_code == 2, bad.stderr
    assert len(serve_calls) == 1


def test_mcp_creates_a_database_only_with_create(tmp_path: Path, serve_calls: list[Any]) -> None:
    """mcp on a missing file is exit 3 (serve not called) unless --create is given."""
    new = tmp_path / "new.db"
    assert cli("mcp", "--db", new).exit_code == 3
    assert serve_calls == []
    assert cli("mcp", "--db", new, "--create").exit_code == 0
    assert serve_calls == [{"db": str(new)}]


def test_mcp_passes_a_postgresql_schema(serve_calls: list[Any]) -> None:
    """mcp --database-url --schema hands serve() the URL and the schema."""
    url = "postgresql://ops@127.0.0.1:5432/agents"
    result = cli("mcp", "--database-url", url, "--schema", "tenant_a", "--create")
    assert result.exit_code == 0
    assert serve_calls == [{"db": url, "schema": "tenant_a"}]


def test_mcp_without_the_integration_is_exit_2(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When safeagent.integrations.mcp cannot be imported, mcp says how to install it."""
    monkeypatch.setitem(sys.modules, "safeagent.integrations.mcp", None)
    missing = cli("mcp", "--db", db)
    assert missing.exit_code == 2
    assert "pip install -e '.[mcp]'" in missing.stderr


def test_the_package_does_not_import_the_cli() -> None:
    """import safeagent loads neither the CLI nor typer/rich."""
    code = (
        "import safeagent, sys; "
        "print([m for m in ('safeagent._cli', 'typer', 'rich') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert out.stdout.strip() == "[]"


# -- the real entry point in subprocesses ----------------------------------------------------


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Any:
    """``python -m safeagent ARGS`` in a fresh interpreter."""
    base = {
        k: v
        for k, v in child_env().items()
        if k not in ("SAFEAGENT_DB", "SAFEAGENT_DATABASE_URL", "SAFEAGENT_AUDIT_KEY", "COLUMNS")
    }
    return subprocess.run(
        [sys.executable, "-m", "safeagent", *map(str, args)],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_entry_point_lists_a_real_sqlite_file(db: Path, tmp_path: Path) -> None:
    """python -m safeagent with $SAFEAGENT_DB prints the JSON listing and the table."""
    env = {"SAFEAGENT_DB": str(db)}
    listed = run("receipts", "list", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert [r["request_id"] for r in json.loads(listed.stdout)] == [
        "r-1",
        "r-2",
        "r-3",
        "r-4",
        "t-1",
    ]
    table = run("in-doubt", "list", cwd=tmp_path, env=env)
    assert table.returncode == 0
    assert [row[1] for row in table_rows(table.stdout)[1:]] == ["r-3", "r-4"]


def test_entry_point_unknown_id_is_exit_1(db: Path, tmp_path: Path) -> None:
    """python -m safeagent receipts show of an unknown id exits 1 with a message."""
    result = run("receipts", "show", "nope", "--db", db, cwd=tmp_path)
    assert result.returncode == 1
    assert "no receipt 'nope'" in result.stderr


def test_entry_point_missing_database_is_exit_3_and_creates_nothing(tmp_path: Path) -> None:
    """python -m safeagent on a missing ./safeagent.db or --db file: exit 3, no file made."""
    missing = run("receipts", "list", cwd=tmp_path)
    assert missing.returncode == 3
    assert "no SafeAgent database at" in missing.stderr
    assert "nothing was created" in missing.stderr
    assert run("audit", "verify", "--db", "elsewhere.db", cwd=tmp_path).returncode == 3
    assert list(tmp_path.iterdir()) == []


def test_entry_point_bad_arguments_are_exit_2(tmp_path: Path) -> None:
    """python -m safeagent with a bad choice or a missing option: exit 2, usage message."""
    bad = run("receipts", "list", "--status", "DONE", cwd=tmp_path)
    assert bad.returncode == 2
    assert "Invalid value for '--status'" in bad.stderr
    missing = run("resolve", "r-1", cwd=tmp_path)
    assert missing.returncode == 2
    assert "Missing option" in missing.stderr
    assert list(tmp_path.iterdir()) == []


KILLED_CHILD = """
import os, signal, sys
from safeagent import Guard
guard = Guard(sys.argv[1], lease=0.5)
guard.execute("kill-1", "charge", {"amount": 1}, lambda ctx: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_entry_point_sees_a_sigkilled_claim_in_doubt_and_resolves_it(tmp_path: Path) -> None:
    """A SIGKILLed child's claim is listed in doubt once its lease expires, then resolved."""
    db = tmp_path / "guard.db"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(db)],
        env=child_env(),
        timeout=TIMEOUT,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL

    def listed() -> list[Any]:
        out = run("in-doubt", "list", "--json", "--db", db, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))

    assert wait_until(lambda: len(listed()) == 1, timeout=10, interval=0.2)
    (row,) = listed()
    assert (row["request_id"], row["stored_status"], row["status"]) == (
        "kill-1",
        "PENDING",
        "IN_DOUBT",
    )
    resolved = run(
        "resolve", "kill-1", "--released", "--by", "ops", "--reason", "child died", "--db", db,
        cwd=tmp_path,
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr
    assert listed() == []


def test_entry_point_audit_tail_follow_prints_new_events(db: Path, tmp_path: Path) -> None:
    """audit tail --follow prints an event written after it started; Ctrl-C ends it with 0."""
    base = {k: v for k, v in child_env().items() if not k.startswith("SAFEAGENT_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "safeagent",
            "audit",
            "tail",
            "-n",
            "1",
            "-f",
            "--json",
            "--interval",
            "0.1",
            "--db",
            str(db),
        ],
        cwd=tmp_path,
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    try:
        assert wait_until(lambda: len(lines) == 1, timeout=20)
        guard = Guard(SQLiteStore(db))
        guard.execute("late-1", "email", {"to": "eve"}, lambda ctx: "sent")
        guard.store.close()
        assert wait_until(lambda: len(lines) >= 3, timeout=20)
        assert [(json.loads(x)["subject"], json.loads(x)["kind"]) for x in lines[1:3]] == [
            ("late-1", "claimed"),
            ("late-1", "succeeded"),
        ]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
        reader.join(TIMEOUT)
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.slow
def test_entry_point_demo_runs_the_example(tmp_path: Path) -> None:
    """python -m safeagent demo --db runs the payment demo and keeps its records there."""
    db = tmp_path / "demo.db"
    result = run("demo", "--db", db, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: ok" in result.stdout
    assert db.exists()
    assert not (tmp_path / "safeagent.db").exists()


@pytest.mark.slow
def test_entry_point_demo_db_wins_over_a_database_url(
    tmp_path: Path, pg_throwaway_database_url: str
) -> None:
    """demo --db keeps the records in that SQLite file even with $SAFEAGENT_DATABASE_URL
    set (as its help says), in the demo and in the service process it starts."""
    db = tmp_path / "demo.db"
    env = {"SAFEAGENT_DATABASE_URL": pg_throwaway_database_url}
    result = run("demo", "--db", db, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: ok" in result.stdout
    assert f"Guard database:  {db}" in result.stdout
    assert db.exists()


@pytest.fixture
def pg_store() -> Iterator[tuple[Any, str]]:
    """A seeded PostgreSQL schema unique to the test, dropped afterwards."""
    require_postgres()
    from safeagent.stores.postgres import PostgresStore

    schema = pg_schema()
    clock = FakeClock()
    store = PostgresStore(PG_URL, schema=schema, clock=clock)
    try:
        seed(store, clock)
        yield store, schema
    finally:
        store.drop_schema()
        store.close()


def test_entry_point_lists_a_postgresql_schema(pg_store: tuple[Any, str], tmp_path: Path) -> None:
    """python -m safeagent --database-url --schema lists PostgreSQL receipts as read."""
    _, schema = pg_store
    listed = run("receipts", "list", "--json", "--database-url", PG_URL, "--schema", schema,
                 cwd=tmp_path)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert [(r["request_id"], r["status"]) for r in json.loads(listed.stdout)] == [
        ("r-1", "SUCCEEDED"),
        ("r-2", "FAILED"),
        ("r-3", "IN_DOUBT"),
        ("r-4", "IN_DOUBT"),
        ("t-1", "SUCCEEDED"),
    ]


def test_entry_point_on_postgresql_via_the_environment(
    pg_store: tuple[Any, str], tmp_path: Path
) -> None:
    """With $SAFEAGENT_DATABASE_URL: in-doubt list, audit verify, stats and resolve."""
    store, schema = pg_store
    env = {"SAFEAGENT_DATABASE_URL": PG_URL}
    doubt = run("in-doubt", "list", "--json", "--schema", schema, cwd=tmp_path, env=env)
    assert [r["request_id"] for r in json.loads(doubt.stdout)] == ["r-3", "r-4"]
    verified = run("audit", "verify", "--json", "--schema", schema, cwd=tmp_path, env=env)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    stats = run("stats", "--json", "--schema", schema, cwd=tmp_path, env=env)
    assert json.loads(stats.stdout)["executions"] == 5
    resolved = run(
        "resolve", "r-3", "--succeeded", "--result", '"ok"', "--by", "ops", "--reason", "seen",
        "--schema", schema, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr
    record, _ = store.get("default", "r-3")
    assert (record.status, record.result_json) == (Status.SUCCEEDED, '"ok"')


def test_entry_point_missing_postgresql_schema_is_exit_3_and_not_created(tmp_path: Path) -> None:
    """A --schema SafeAgent never created is exit 3, and the schema is not created."""
    require_postgres()
    import psycopg

    absent = pg_schema()
    missing = run("receipts", "list", "--database-url", PG_URL, "--schema", absent,
                  cwd=tmp_path)  # fmt: skip
    assert missing.returncode == 3
    assert f"no SafeAgent schema '{absent}'" in missing.stderr
    with psycopg.connect(PG_URL) as conn:
        found = conn.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (absent,)
        ).fetchone()
    assert found is None


def test_entry_point_older_postgresql_schema_is_exit_3_and_not_upgraded(
    pg_store: tuple[Any, str], tmp_path: Path
) -> None:
    """A PostgreSQL schema an older SafeAgent wrote: exit 3, its schema_version unchanged."""
    import psycopg

    _, schema = pg_store
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.safeagent_meta SET value = '3' WHERE key = 'schema_version'")
    listed = run("receipts", "list", "--database-url", PG_URL, "--schema", schema,
                 cwd=tmp_path)  # fmt: skip
    assert listed.returncode == 3
    assert "has schema version 3, written by an older SafeAgent" in listed.stderr
    with psycopg.connect(PG_URL) as conn:
        row = conn.execute(
            f"SELECT value FROM {schema}.safeagent_meta WHERE key = 'schema_version'"
        ).fetchone()
    assert row == ("3",)


def _nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


def test_receipts_of_a_result_nested_near_the_recursion_limit_are_shown(tmp_path: Path) -> None:
    """A result nested 900 levels deep is stored (the encoder allows it) and replays whole;
    receipts show and list print it down to 100 levels with a note for the rest, instead
    of a RecursionError traceback (redaction and printing recurse)."""
    path = tmp_path / "deep.db"
    store = SQLiteStore(path)
    guard = Guard(store)
    deep = _nested(900)
    assert guard.execute("deep", "a", {}, lambda _ctx: deep).result == deep
    guard.close()
    store.close()
    for flags in ((), ("--no-redact",)):
        result = cli("receipts", "show", "deep", "--db", path, "--json", *flags)
        assert result.exit_code == 0, result.output
        value = json.loads(result.stdout)["receipt"]["result"]
        for _ in range(100):
            (value,) = value
        assert value == "[nested deeper than 100 levels: not shown]"
    result = cli("receipts", "show", "deep", "--db", path)
    assert result.exit_code == 0, result.output
    result = cli("receipts", "list", "--db", path, "--json")
    assert result.exit_code == 0, result.output


# -- purge: the cutoff shown is the cutoff purged ----------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def live_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, list[str]]]:
    """A store on the real clock (the database's, on PostgreSQL) with one SUCCEEDED
    record, ``old``, and the CLI arguments that open it."""
    store: Any
    if request.param == "sqlite":
        store = SQLiteStore(tmp_path / "live.db")
        where = ["--db", str(tmp_path / "live.db")]
    else:
        require_postgres()
        from safeagent.stores.postgres import PostgresStore

        schema = pg_schema()
        store = PostgresStore(PG_URL, schema=schema)
        where = ["--database-url", PG_URL, "--schema", schema]
    Guard(store).execute("old", "charge", {"n": 1}, lambda ctx: "old result")
    try:
        yield store, where
    finally:
        if request.param == "postgres":
            store.drop_schema()
        store.close()


def test_purge_keeps_a_record_finished_while_the_prompt_waits(
    live_store: tuple[Any, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cutoff is read once, on the store's clock, before the question: a record that
    finishes while the operator reads the prompt is after it and kept, and the report and
    the ``purged`` event give the cutoff the prompt showed."""
    from safeagent._cli import _audit

    store, where = live_store
    asked: list[str] = []

    def answer_later(question: str) -> bool:
        asked.append(question)
        assert wait_until(lambda: store.records(limit=0)[1] > cutoff_ms_of(question) + 5, 10)
        Guard(store).execute("new", "charge", {"n": 2}, lambda ctx: "new result")
        return True

    def cutoff_ms_of(question: str) -> int:
        shown = question.split("finished before ")[1].split(" in ", maxsplit=1)[0]
        moment = datetime.fromisoformat(shown.replace("Z", "+00:00"))
        return round(moment.timestamp() * 1000)

    monkeypatch.setattr(_audit, "confirm", answer_later)
    report = cli_json("purge", "--older-than", "0s", *where)
    [question] = asked
    assert report["cutoff"] in question
    assert report["cutoff_ms"] == cutoff_ms_of(question)
    assert report["tombstoned"] == 1
    found = {r.request_id: r for r in store.records()[0]}
    assert found["old"].purged_at_ms is not None
    assert found["new"].purged_at_ms is None
    assert found["new"].result_json == '"new result"'
    assert found["new"].completed_at_ms >= report["cutoff_ms"]
    [event] = [e for e in store.events() if e.kind is EventKind.PURGED]
    assert event.detail["cutoff_ms"] == report["cutoff_ms"]


# -- a row the CLI cannot read ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def edited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A seeded store (the module docstring's rows) whose rows a test edits by raw SQL:
    ``(where, sql)``, the CLI arguments and ``sql(statement)`` on the store's tables."""
    clock = FakeClock()
    if request.param == "sqlite":
        path = tmp_path / "edited.db"
        store: Any = SQLiteStore(path, clock=clock)
        seed(store, clock)
        store.close()

        def sql(statement: str) -> None:
            with closing(sqlite3.connect(path)) as conn, conn:
                conn.execute(statement.replace("{t}", ""))
            conn.close()

        yield ["--db", str(path)], sql
        return
    require_postgres()
    import psycopg

    from safeagent.stores.postgres import PostgresStore

    schema = pg_schema()
    store = PostgresStore(PG_URL, schema=schema, clock=clock)
    seed(store, clock)

    def pg_sql(statement: str) -> None:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(statement.replace("{t}", schema + "."))  # type: ignore[arg-type]

    try:
        yield ["--database-url", PG_URL, "--schema", schema], pg_sql
    finally:
        store.drop_schema()
        store.close()


def no_traceback(result: Any) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_an_unreadable_receipt_is_listed_as_such_and_the_others_still(edited: Any) -> None:
    """A result that is not JSON, or a status no release wrote, marks that receipt
    UNREADABLE (what is wrong, in the row and on standard error) and lists every other;
    ``receipts show`` of it is one ``error:`` line, exit 3."""
    where, sql = edited
    sql("UPDATE {t}executions SET result = '{oops' WHERE request_id = 'r-1'")
    sql("UPDATE {t}executions SET status = 'BOGUS' WHERE request_id = 'r-2'")
    result = cli("receipts", "list", *where)
    no_traceback(result)
    assert result.exit_code == 0
    rows = {r[1]: r for r in table_rows(result.stdout)[1:]}
    assert rows["r-1"][3] == "UNREADABLE: result is not JSON"
    assert rows["r-2"][3] == "UNREADABLE: status 'BOGUS' is not a status"
    assert rows["r-3"][3] == "IN_DOUBT"
    assert set(rows) == {"r-1", "r-2", "r-3", "r-4", "t-1"}
    assert "warning: 2 receipt(s) could not be read" in result.stderr
    listed = {r["request_id"]: r for r in cli_json("receipts", "list", *where)}
    assert listed["r-1"] == {
        "namespace": "default",
        "request_id": "r-1",
        "action": "charge",
        "created_at_ms": START_MS,
        "stored_status": "SUCCEEDED",
        "unreadable": "result is not JSON",
    }
    assert listed["r-2"]["unreadable"] == "status 'BOGUS' is not a status"
    assert listed["r-4"]["status"] == "IN_DOUBT"
    shown = cli("receipts", "show", "r-1", *where)
    no_traceback(shown)
    assert shown.exit_code == 3
    assert shown.stderr.startswith("error: receipt default/r-1: result is not JSON")
    assert shown.stderr.count("\n") == 1
    assert cli("receipts", "show", "r-3", *where).exit_code == 0


def test_an_unreadable_pending_record_is_listed_in_doubt(edited: Any) -> None:
    """in-doubt list shows a PENDING or IN_DOUBT row it cannot read (it may be in doubt)
    as UNREADABLE, next to the others."""
    where, sql = edited
    sql("UPDATE {t}executions SET result = '{oops' WHERE request_id = 'r-4'")
    result = cli("in-doubt", "list", *where)
    no_traceback(result)
    rows = {r[1]: r for r in table_rows(result.stdout)[1:]}
    assert rows["r-3"][3] == "IN_DOUBT"
    assert rows["r-4"][3] == "UNREADABLE: result is not JSON"
    assert "2 in doubt" in result.stderr


def test_a_payload_that_is_not_json_fails_only_receipts_show(edited: Any) -> None:
    """A listing shows no payload, so one that is not JSON leaves the row listed as it is
    (receipts list, in-doubt list, with and without --json); ``receipts show`` of it,
    which shows the payload, is one ``error:`` line, exit 3."""
    where, sql = edited
    sql("UPDATE {t}executions SET payload = '{bad' WHERE request_id IN ('r-1', 'r-3')")
    for command in (("receipts", "list"), ("in-doubt", "list")):
        result = cli(*command, *where)
        no_traceback(result)
        assert result.exit_code == 0
        rows = {r[1]: r for r in table_rows(result.stdout)[1:]}
        assert rows["r-3"][3] == "IN_DOUBT"
        assert "UNREADABLE" not in result.stdout
    listed = {r["request_id"]: r for r in cli_json("receipts", "list", *where)}
    assert (listed["r-1"]["status"], listed["r-3"]["status"]) == ("SUCCEEDED", "IN_DOUBT")
    shown = cli("receipts", "show", "r-3", *where)
    no_traceback(shown)
    assert shown.exit_code == 3
    assert shown.stderr.startswith("error: receipt default/r-3: payload is not JSON")


def test_a_receipt_with_a_text_time_is_unreadable(tmp_path: Path) -> None:
    """SQLite keeps text in an INTEGER column: a created_at_ms edited to text is named
    (``created_at_ms holds text, not an integer``), not a TypeError traceback."""
    clock = FakeClock()
    path = tmp_path / "edited.db"
    store = SQLiteStore(path, clock=clock)
    seed(store, clock)
    store.close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE executions SET created_at_ms = 'x' WHERE request_id = 'r-1'")
    conn.close()
    result = cli("receipts", "list", "--db", path, "--since", "2000-01-01T00:00:00Z")
    no_traceback(result)
    rows = {r[1]: r for r in table_rows(result.stdout)[1:]}
    assert rows["r-1"][3] == "UNREADABLE: created_at_ms holds text, not an integer"
    assert rows["r-2"][3] == "FAILED"
    shown = cli("receipts", "show", "r-1", "--db", path)
    assert shown.exit_code == 3
    assert "created_at_ms holds text, not an integer" in shown.stderr


def test_an_unreadable_event_is_marked_in_tail_show_export_and_stats(edited: Any) -> None:
    """An event kind no release wrote: ``audit tail`` and ``receipts show`` mark the event
    UNREADABLE and print every other; ``audit export`` writes it as stored (JSON lines add
    ``unreadable``); ``stats`` counts the others and says one was not counted."""
    where, sql = edited
    before = cli_json("stats", *where)
    tailed = cli("audit", "tail", "-n", "100", "--json", *where).stdout.splitlines()
    [bad] = [e["id"] for e in map(json.loads, tailed) if e["kind"] == "replayed"]
    sql(f"UPDATE {{t}}audit_events SET kind = 'bogus' WHERE id = {bad}")
    problem = "kind 'bogus' is not an event kind"
    tail = cli("audit", "tail", "-n", "100", *where)
    no_traceback(tail)
    assert tail.exit_code == 0
    lines = tail.stdout.splitlines()
    assert len(lines) == len(tailed)  # every event, the unreadable one too
    [marked_line] = [line for line in lines if f"#{bad} " in line]
    assert "UNREADABLE" in marked_line
    assert marked_line.endswith(problem)
    again = cli("audit", "tail", "-n", "100", "--json", *where).stdout.splitlines()
    [marked] = [e for e in map(json.loads, again) if e["id"] == bad]
    assert (marked["kind"], marked["unreadable"]) == ("bogus", problem)
    assert "detail" not in marked
    shown = cli("receipts", "show", "r-1", *where)
    no_traceback(shown)
    assert shown.exit_code == 0
    trail = {row[0]: row for row in table_rows(shown.stdout.split("audit trail")[1])[1:]}
    assert (trail[str(bad)][2], trail[str(bad)][-1]) == ("UNREADABLE", problem)
    assert len(trail) == 4  # claimed, succeeded, replayed, conflict
    exported = cli("audit", "export", "--format", "jsonl", *where)
    no_traceback(exported)
    assert exported.exit_code == 0
    events = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [e["id"] for e in events] == [json.loads(line)["id"] for line in tailed]
    [raw] = [e for e in events if e["id"] == bad]
    assert (raw["kind"], raw["unreadable"], raw["subject"]) == ("bogus", problem, "r-1")
    assert raw["detail"] == {"status": "SUCCEEDED"}  # its detail, as stored
    csv_out = cli("audit", "export", "--format", "csv", *where)
    assert csv_out.exit_code == 0
    assert len(list(csv.DictReader(io.StringIO(csv_out.stdout)))) == len(tailed)
    assert f"event #{bad}: {problem}" in csv_out.stderr
    counted = cli_json("stats", *where)
    assert counted.pop("events_unreadable") == 1
    assert counted.pop("replays") == before.pop("replays") - 1  # the unreadable one
    assert before.pop("events_unreadable") == 0
    counted["per_action"]["charge"].pop("replays")
    before["per_action"]["charge"].pop("replays")
    assert counted == before


def test_an_unreadable_case_or_signal_is_marked_in_cases_list(edited: Any) -> None:
    """A case state no release wrote, or a live signal whose metadata is not JSON, marks
    that case UNREADABLE in ``cases list`` and lists the other; ``cases show`` of it is one
    ``error:`` line, exit 3."""
    where, sql = edited
    sql("UPDATE {t}cases SET state = 'WHATEVER' WHERE case_id = 'case-1'")
    sql("UPDATE {t}signals SET metadata = '{' WHERE case_id = 'case-2' AND source = 'policy-agent'")
    result = cli("cases", "list", *where)
    no_traceback(result)
    assert result.exit_code == 0
    rows = {r[1]: r for r in table_rows(result.stdout)[1:]}
    assert rows["case-1"][2] == "UNREADABLE: state 'WHATEVER' is not a case state"
    assert rows["case-2"][2].startswith("UNREADABLE: signal #")
    assert rows["case-2"][2].endswith("(source 'policy-agent'): metadata is not JSON")
    listed = cli_json("cases", "list", *where)
    assert [c["case_id"] for c in listed] == ["case-1", "case-2"]
    assert listed[0]["unreadable"] == "state 'WHATEVER' is not a case state"
    assert listed[1]["unreadable"].endswith("metadata is not JSON")
    for case_id in ("case-1", "case-2"):
        shown = cli("cases", "show", case_id, *where)
        no_traceback(shown)
        assert shown.exit_code == 3
        assert shown.stderr.startswith(f"error: case default/{case_id}: ")
        assert shown.stderr.count("\n") == 1
