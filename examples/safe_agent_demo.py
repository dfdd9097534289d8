"""An agent retries a payment after a network fault: with and without SafeAgent.

Run it from any directory::

    python examples/safe_agent_demo.py

Two processes talk over HTTP on 127.0.0.1 (ephemeral ports):

* a **tool service** (this file started again with ``--serve``) that runs
  ``charge_card(customer, amount_cents)`` against a payments ledger, its own SQLite
  file that counts every charge made (the ground truth). A fault injector drops the
  connection on the first attempt of each request id *after* the charge is committed,
  so the agent never hears the answer: a real network fault.
* an **agent** (this process) that mints one request id for its intent and retries on
  timeouts and connection errors, sending the same id on each retry.

The scenario runs twice. Without the guard, the retry charges the card again: two
charges. With the guard (``Guard().execute(request_id, "charge_card", ...)`` in the
service), the retry gets the original receipt back, marked as a replay, and the card is
charged once. The guard keeps its records where ``Guard()`` puts them: the PostgreSQL
database of ``$SAFEAGENT_DATABASE_URL`` if that is set, else the embedded SQLite file,
``$SAFEAGENT_DB`` if set, else ``safeagent.db`` in the working directory. Request ids are
unique to each run, so the demo works on every run, not only the first.

Exit code 0 when the unguarded run charged twice and the guarded run once, with the
agent holding the original charge's receipt; 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import closing, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from safeagent import ExecutionContext, Guard, GuardError, InProgressError

MAX_ATTEMPTS = 4
REQUEST_TIMEOUT = 5.0  # seconds the agent waits for one answer
BACKOFF = 0.05  # seconds before the first retry, doubled on each retry
STARTUP_TIMEOUT = 15.0  # seconds to wait for the service to print its port
SHUTDOWN_TIMEOUT = 5.0
RETRYABLE = (TimeoutError, ConnectionError, http.client.HTTPException, urllib.error.URLError)


# -- the tool service (child process) ---------------------------------------------------


def open_ledger(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS charges ("
        " charge_id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount_cents INTEGER NOT NULL,"
        " idempotency_key TEXT, run_id TEXT NOT NULL)"  # no UNIQUE: the ledger counts charges
    )
    return conn


def charge_card(
    ledger: str, run_id: str, customer: str, amount_cents: int, idempotency_key: str | None
) -> dict[str, Any]:
    """The side effect: one committed row in the ledger per call."""
    charge = {
        "charge_id": f"ch_{uuid.uuid4().hex[:12]}",
        "customer": customer,
        "amount_cents": amount_cents,
    }
    with closing(open_ledger(ledger)) as conn, conn:
        conn.execute(
            "INSERT INTO charges VALUES (?, ?, ?, ?, ?)",
            (charge["charge_id"], customer, amount_cents, idempotency_key, run_id),
        )
    return charge


class FaultInjector:
    """Drops the connection on the first attempt of each request id."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def first_attempt(self, request_id: str) -> bool:
        with self._lock:
            first = request_id not in self._seen
            self._seen.add(request_id)
            return first


class ToolHandler(BaseHTTPRequestHandler):
    """``POST /guarded/charge_card`` and ``POST /unguarded/charge_card``."""

    server: ToolServer

    def do_POST(self) -> None:
        mode = {"/guarded/charge_card": "guarded", "/unguarded/charge_card": "unguarded"}.get(
            self.path
        )
        if mode is None:
            self.reply(404, {"error": "NotFound", "message": self.path})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        request_id, run_id, args = body["request_id"], body["run_id"], body["arguments"]
        first = self.server.faults.first_attempt(request_id)
        try:
            if mode == "guarded":
                answer = self.guarded(request_id, run_id, args)
            else:
                answer = charge_card(
                    self.server.ledger, run_id, args["customer"], args["amount_cents"], None
                )
        except InProgressError as exc:
            self.reply(503, {"error": type(exc).__name__, "message": str(exc)})
            return
        except GuardError as exc:
            self.reply(409, {"error": type(exc).__name__, "message": str(exc)})
            return
        if first:  # fault injection: the charge is committed, the answer is lost
            self.drop_connection()
            return
        self.reply(200, answer)

    def guarded(self, request_id: str, run_id: str, args: dict[str, Any]) -> dict[str, Any]:
        payload = {"customer": args["customer"], "amount_cents": args["amount_cents"]}

        def fn(ctx: ExecutionContext) -> dict[str, Any]:
            # A real payments API would get ctx.downstream_key as its Idempotency-Key header.
            return charge_card(
                self.server.ledger,
                run_id,
                payload["customer"],
                payload["amount_cents"],
                ctx.downstream_key,
            )

        receipt = self.server.guard.execute(request_id, "charge_card", payload, fn)
        return receipt.to_dict()

    def drop_connection(self) -> None:
        self.close_connection = True
        with suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def reply(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the demo's output readable


class ToolServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ledger: str, guard: Guard) -> None:
        super().__init__(("127.0.0.1", 0), ToolHandler)
        self.ledger = ledger
        self.guard = guard
        self.faults = FaultInjector()


def serve(ledger: str) -> None:
    """Serve until stdin closes, then write the guard's buffered audit events and exit."""
    open_ledger(ledger).close()
    with Guard() as guard, ToolServer(ledger, guard) as server:
        print(server.server_address[1], flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
        server.serve_forever(poll_interval=0.05)


# -- the agent (parent process) ---------------------------------------------------------


@dataclass
class Outcome:
    """What happened in one scenario: what the agent saw, and what the ledger holds."""

    mode: str
    run_id: str
    request_id: str
    attempts: list[str] = field(default_factory=list)
    answer: dict[str, Any] | None = None
    charges: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def charge_id(self) -> str | None:
        """The charge id in the answer the agent finally got."""
        answer = self.answer or {}
        charge = answer.get("result") if self.mode == "guarded" else answer
        return (charge or {}).get("charge_id")


def describe(exc: BaseException) -> str:
    """The fault's type, unwrapping urllib's URLError (e.g. ConnectionRefusedError)."""
    reason = getattr(exc, "reason", None)
    return type(reason if isinstance(reason, BaseException) else exc).__name__


def call_tool(port: int, mode: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/{mode}/charge_card",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, {"error": data.decode(errors="replace")[:60]}


def run_agent(port: int, mode: str, run_id: str) -> Outcome:
    """One intent, one request id minted once; retried with backoff on transport faults."""
    outcome = Outcome(mode, run_id, request_id=f"{run_id}:charge_card:1")
    body = {
        "request_id": outcome.request_id,
        "run_id": run_id,
        "arguments": {"customer": "cus_ada", "amount_cents": 4200},
    }
    for attempt in range(MAX_ATTEMPTS):
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        try:
            status, answer = call_tool(port, mode, body)
        except RETRYABLE as exc:
            outcome.attempts.append(describe(exc))
            continue
        if status != 200:
            outcome.attempts.append(f"HTTP {status} {answer.get('error', '')}".strip())
            if status == 503:  # the guard says: still running elsewhere, retry later
                continue
            break
        outcome.attempts.append("HTTP 200, receipt" if mode == "guarded" else "HTTP 200, charge")
        outcome.answer = answer
        break
    return outcome


def ledger_charges(ledger: str, run_id: str) -> list[tuple[str, str | None]]:
    """(charge id, downstream idempotency key) of every charge the run made."""
    with closing(sqlite3.connect(ledger)) as conn:
        return conn.execute(
            "SELECT charge_id, idempotency_key FROM charges WHERE run_id = ? ORDER BY rowid",
            (run_id,),
        ).fetchall()


def start_service(ledger: str) -> subprocess.Popen[str]:
    """Start this file with ``--serve``, in the same working directory and environment."""
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", "--ledger", ledger],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def service_port(child: subprocess.Popen[str]) -> int:
    """The port the service prints on its first line of output."""
    stdout = child.stdout
    assert stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(STARTUP_TIMEOUT)
    if not line or not line[0].strip().isdigit():
        raise RuntimeError(f"the tool service did not start (exit code {child.poll()})")
    return int(line[0])


def stop_service(child: subprocess.Popen[str]) -> None:
    """Close stdin (the service writes its buffered audit events and exits); terminate it
    if it does not exit in time."""
    with suppress(OSError):
        if child.stdin is not None:
            child.stdin.close()
    try:
        child.wait(SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if child.poll() is None:
            child.terminate()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def run_scenarios(ledger: str, token: str) -> tuple[Outcome, Outcome]:
    """Start the service, run the agent without and with the guard, stop the service."""
    child = start_service(ledger)
    try:
        port = service_port(child)
        plain = run_agent(port, "unguarded", f"run-{token}-unguarded")
        safe = run_agent(port, "guarded", f"run-{token}-guarded")
    finally:
        stop_service(child)
    for outcome in (plain, safe):
        outcome.charges = ledger_charges(ledger, outcome.run_id)
    return plain, safe


# -- the report -------------------------------------------------------------------------


def print_summary(plain: Outcome, safe: Outcome) -> None:
    rows = [("", "without guard", "with guard")]
    rows.append(("attempts made", str(len(plain.attempts)), str(len(safe.attempts))))
    for i in range(max(len(plain.attempts), len(safe.attempts))):
        left, right = (o.attempts[i] if i < len(o.attempts) else "" for o in (plain, safe))
        rows.append((f"  attempt {i + 1}", left, right))
    rows += [
        ("charges in ledger", str(len(plain.charges)), str(len(safe.charges))),
        ("  charge ids", *(", ".join(c[0] for c in o.charges) for o in (plain, safe))),
        ("charge id agent got", plain.charge_id or "-", safe.charge_id or "-"),
        ("replay flag", "-", str((safe.answer or {}).get("replay", "-"))),
        ("execution id", "-", str((safe.answer or {}).get("execution_id", "-"))[:12]),
    ]
    for label, left, right in rows:
        print(f"  {label:<20} {left:<34} {right}")


def verify(guard: Guard, plain: Outcome, safe: Outcome) -> bool:
    """The claims the demo makes, checked against the ledger and the guard's record."""
    receipt = safe.answer or {}
    record = guard.get(safe.request_id)
    charged = safe.charges[0] if len(safe.charges) == 1 else (None, None)
    checks = {
        "without the guard, the retry charged the card twice": len(plain.charges) == 2,
        "with the guard, the card was charged once": len(safe.charges) == 1,
        "the guarded retry got the original receipt, marked as a replay": (
            receipt.get("replay") is True
            and record is not None
            and receipt.get("execution_id") == record.execution_id
            and safe.charge_id == charged[0]
        ),
        "the charge carried the guard's downstream idempotency key": (
            record is not None and charged[1] == record.downstream_key
        ),
    }
    print()
    for claim, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {claim}")
    return all(checks.values())


def short_detail(detail: dict[str, Any]) -> str:
    shown = {k: v for k, v in detail.items() if k != "fingerprint" and v is not None}
    text = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in shown.items())
    return text if len(text) <= 64 else text[:61] + "..."


def print_audit_trail(guard: Guard, request_id: str) -> None:
    print(f"\nAudit trail of {request_id} (guard.audit_trail):")
    for event in guard.audit_trail(request_id):
        line = (
            f"  {event.kind.value:<10} by {event.actor or '-':<42} "
            f"exec {(event.execution_id or '-')[:12]}  {short_detail(dict(event.detail))}"
        )
        print(line.rstrip())


def where(guard: Guard) -> str:
    """Where the guard keeps its records, as ``Guard()`` chose: the embedded SQLite file,
    or the PostgreSQL database of ``$SAFEAGENT_DATABASE_URL`` (its URL is not printed: it
    may hold a password)."""
    path = getattr(guard.store, "path", None)
    if path is not None:
        return f"{os.path.abspath(path)}  ($SAFEAGENT_DB, else ./safeagent.db)"
    schema = getattr(guard.store, "schema", "?")
    return f"PostgreSQL, schema {schema}  ($SAFEAGENT_DATABASE_URL is set)"


def main(keep_ledger: str | None = None) -> int:
    """The two scenarios and their checks; ``keep_ledger``: a path for the payments
    ledger that outlives the run (default: a temporary file, removed on exit)."""
    token = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="safeagent-demo-") as tmp, Guard() as guard:
        ledger = os.path.abspath(keep_ledger) if keep_ledger else os.path.join(tmp, "ledger.db")
        kept = "" if keep_ledger else " (removed on exit; --ledger PATH keeps it)"
        print(f"Guard database:  {where(guard)}")
        print(f"Payments ledger: {ledger}{kept}")
        print(
            f"Each run, the agent asks once to charge cus_ada 4200 cents (up to {MAX_ATTEMPTS}"
            " attempts);\nthe service drops the connection after the first charge of each"
            " request id.\n"
        )
        plain, safe = run_scenarios(ledger, token)
        print_summary(plain, safe)
        ok = verify(guard, plain, safe)
        print_audit_trail(guard, safe.request_id)
    print(
        f"\nRESULT: {'ok' if ok else 'FAILED'}: without the guard {len(plain.charges)}"
        f" charge(s), with the guard {len(safe.charges)} charge(s)"
    )
    return 0 if ok else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run the tool service (internal)")
    parser.add_argument(
        "--ledger",
        help="the payments ledger file, kept after the run (default: a temporary one)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args(sys.argv[1:])
    if options.serve:
        serve(options.ledger)
        sys.exit(0)
    sys.exit(main(options.ledger))
