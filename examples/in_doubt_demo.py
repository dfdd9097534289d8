"""A worker dies while the payments service holds its answer: the charge is in doubt.

Run it from any directory::

    python examples/in_doubt_demo.py

The same payments scenario as ``safe_agent_demo.py``, but the fault sits between the tool
and the payments service. Processes on 127.0.0.1 (ephemeral ports):

* a **payments service** (this file started again with ``--payments``) with its own SQLite
  ledger (the ground truth of charges). ``POST /charges`` takes an ``Idempotency-Key``
  header and stores it with the charge, without enforcing it (so the ledger counts every
  charge); ``GET /charges?idempotency_key=...`` looks charges up by key. A fault injector
  commits the first charge of each key and then never answers: the caller cannot learn
  the outcome.
* **workers** (this file with ``--worker``) that run the tool
  ``charge_card(customer, amount_cents)`` through ``Guard().execute(...)``, sending
  ``ctx.downstream_key`` as the ``Idempotency-Key``. The guard keeps its records in the
  default embedded SQLite file (``$SAFEAGENT_DB`` if set, else ``safeagent.db`` in the
  working directory) with a 1-second lease, renewed by a heartbeat while a worker lives.
* the **demo** (this process) that SIGKILLs each worker once the ledger shows its charge,
  while the worker still waits for the lost answer.

After the lease runs out, the record reads IN_DOUBT. A retry without a reconcile hook gets
``OutcomeUnknownError`` and charges nothing. A restarted worker whose ``charge_card``
action has a reconcile hook (``ActionPolicy(reconcile=...)``) asks the payments service
for a charge with the attempt's key, finds it, and gets the original charge as its receipt
(a replay): still one charge. A second in-doubt request is settled by the proactive pass
``guard.reconcile()``, with no retry at all.

Each run uses fresh request ids in a namespace of its own: the proactive pass asks the
payments service about every in-doubt record of its namespace, and this run's service only
knows this run's charges. So the demo works on every run, not only the first.

Exit code 0 when each request made exactly one charge, the retry without a hook charged
nothing, and both records ended SUCCEEDED via reconciliation with the charge id the ledger
holds; 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import closing, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from safeagent import (
    ActionPolicy,
    EventKind,
    ExecutionContext,
    Guard,
    GuardError,
    ReconcileRequest,
    Reconciliation,
    Status,
)

LEASE = 1.0  # seconds; short so a dead worker's claim reads as in doubt quickly
HTTP_TIMEOUT = 30.0  # seconds a worker waits for the payments service: generous
LOOKUP_TIMEOUT = 5.0  # seconds the reconcile hook waits for a lookup
STARTUP_TIMEOUT = 15.0  # seconds to wait for the payments service to print its port
CHARGE_TIMEOUT = 15.0  # seconds to wait for a worker's charge to reach the ledger
IN_DOUBT_TIMEOUT = 10.0  # seconds to wait for the killed workers' leases to run out
WORKER_TIMEOUT = 30.0  # seconds a retrying worker may take
SHUTDOWN_TIMEOUT = 5.0
POLL = 0.02


# -- the payments service (child process) ------------------------------------------------


def open_ledger(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10)
    conn.row_factory = sqlite3.Row
    conn.execute(
        "CREATE TABLE IF NOT EXISTS charges ("
        " charge_id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount_cents INTEGER NOT NULL,"
        " idempotency_key TEXT, reference TEXT NOT NULL)"  # no UNIQUE: the ledger counts charges
    )
    return conn


class FaultInjector:
    """Holds back the answer to the first request of each idempotency key."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def first_request(self, key: str) -> bool:
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
            return first


class PaymentsHandler(BaseHTTPRequestHandler):
    """``POST /charges`` (with ``Idempotency-Key``) and ``GET /charges?idempotency_key=``."""

    server: PaymentsServer

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/charges":
            self.reply(404, {"error": "NotFound", "message": self.path})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        key = self.headers.get("Idempotency-Key")
        charge = {
            "charge_id": f"ch_{uuid.uuid4().hex[:12]}",
            "customer": body["customer"],
            "amount_cents": body["amount_cents"],
            "idempotency_key": key,
            "reference": body["reference"],
        }
        with closing(open_ledger(self.server.ledger)) as conn, conn:
            conn.execute(
                "INSERT INTO charges VALUES (:charge_id, :customer, :amount_cents,"
                " :idempotency_key, :reference)",
                charge,
            )
        if self.server.faults.first_request(key or ""):
            # Fault injection: the charge is committed, the answer never comes.
            self.server.stopping.wait()
            self.close_connection = True
            return
        self.reply(201, charge)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        key = parse_qs(url.query).get("idempotency_key", [""])[0]
        if url.path != "/charges" or not key:
            self.reply(404, {"error": "NotFound", "message": self.path})
            return
        with closing(open_ledger(self.server.ledger)) as conn:
            rows = conn.execute(
                "SELECT * FROM charges WHERE idempotency_key = ? ORDER BY rowid", (key,)
            ).fetchall()
        self.reply(200, {"data": [dict(row) for row in rows]})

    def reply(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the demo's output readable


class PaymentsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ledger: str) -> None:
        super().__init__(("127.0.0.1", 0), PaymentsHandler)
        self.ledger = ledger
        self.faults = FaultInjector()
        self.stopping = threading.Event()


def serve_payments(ledger: str) -> None:
    """Serve until stdin closes; then release the held-back requests and exit."""
    open_ledger(ledger).close()
    with PaymentsServer(ledger) as server:
        print(server.server_address[1], flush=True)

        def stop_on_eof() -> None:
            sys.stdin.read()
            server.stopping.set()
            server.shutdown()

        threading.Thread(target=stop_on_eof, daemon=True).start()
        server.serve_forever(poll_interval=0.05)


# -- the tool, its policy and its reconcile hook (workers and the demo) -------------------


class PaymentError(Exception):
    """The payments service refused the charge."""


def payments_call(
    port: int, method: str, path: str, timeout: float, body: Any = None, key: str | None = None
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    try:
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def charge_card(
    port: int, customer: str, amount_cents: int, ctx: ExecutionContext
) -> dict[str, Any]:
    """The side effect: ``POST /charges`` with the guard's downstream idempotency key."""
    body = {"customer": customer, "amount_cents": amount_cents, "reference": ctx.request_id}
    status, answer = payments_call(
        port, "POST", "/charges", HTTP_TIMEOUT, body, key=ctx.downstream_key
    )
    if status != 201:
        raise PaymentError(f"HTTP {status}: {answer}")
    return dict(answer)


def reconcile_hook(port: int) -> Any:
    """The reconcile hook: ask the payments service for a charge with the attempt's key."""

    def reconcile_charge(req: ReconcileRequest) -> Reconciliation:
        path = f"/charges?idempotency_key={quote(req.downstream_key)}"
        status, answer = payments_call(port, "GET", path, LOOKUP_TIMEOUT)
        if status != 200:
            return Reconciliation.unknown(note=f"lookup answered HTTP {status}")
        charges = answer["data"]
        if not charges:
            return Reconciliation.not_happened(note="no charge with this idempotency key")
        if len(charges) > 1:
            return Reconciliation.unknown(note=f"{len(charges)} charges with this key")
        return Reconciliation.happened(charges[0], note=f"found {charges[0]['charge_id']}")

    return reconcile_charge


def open_guard(namespace: str, port: int, *, with_hook: bool) -> Guard:
    """The default embedded store, with the ``charge_card`` action's policy."""
    policy = ActionPolicy(
        lease=LEASE,
        not_executed=(ConnectionRefusedError,),  # refused: the request was never sent
        outcome_unknown=(TimeoutError, ConnectionResetError),  # sent, the answer was lost
        reconcile=reconcile_hook(port) if with_hook else None,
    )
    return Guard(namespace=namespace, actions={"charge_card": policy})


def work(options: argparse.Namespace) -> None:
    """One worker: run ``charge_card`` through the guard, print JSON lines of what it saw."""

    def emit(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    payload = {"customer": options.customer, "amount_cents": options.amount_cents}

    def fn(ctx: ExecutionContext) -> dict[str, Any]:
        emit(event="calling", attempt=ctx.attempt, downstream_key=ctx.downstream_key)
        return charge_card(options.port, options.customer, options.amount_cents, ctx)

    with open_guard(options.namespace, options.port, with_hook=options.with_hook) as guard:
        try:
            receipt = guard.execute(options.request_id, "charge_card", payload, fn)
        except GuardError as exc:
            emit(
                event="error",
                error=type(exc).__name__,
                message=str(exc),
                owner=getattr(exc, "owner", None),
                attempt=getattr(exc, "attempt", None),
            )
            return
        emit(event="receipt", receipt=receipt.to_dict())


# -- the demo (parent process) -----------------------------------------------------------


@dataclass
class Request:
    """One intent to charge, and what happened to it."""

    name: str
    request_id: str
    customer: str
    amount_cents: int
    crash: str = "-"  # how the first worker ended
    crashed_cleanly: bool = False  # killed by SIGKILL after its charge was in the ledger
    status_after_lease: str = "-"
    no_hook_retry: dict[str, Any] = field(default_factory=dict)
    no_hook_charges: int | None = None  # ledger count right after the no-hook retry
    resolved_by: str = "-"
    answer: dict[str, Any] = field(default_factory=dict)  # the reconciled receipt
    charges: list[tuple[str, str | None]] = field(default_factory=list)


class Children:
    """Every child process the demo starts; :meth:`close` ends whatever still runs."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(child)
        return child

    def close(self) -> None:
        for child in self.procs:
            with suppress(OSError):
                if child.stdin is not None:
                    child.stdin.close()  # the payments service exits on EOF
        for child in self.procs:
            try:
                child.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()


def first_line(child: subprocess.Popen[str], timeout: float) -> str:
    stdout = child.stdout
    assert stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0].strip() if line else ""


def start_worker(
    children: Children, port: int, namespace: str, request: Request, *, with_hook: bool
) -> subprocess.Popen[str]:
    args = ["--worker", "--port", str(port), "--namespace", namespace]
    args += ["--request-id", request.request_id, "--customer", request.customer]
    args += ["--amount-cents", str(request.amount_cents)]
    return children.start(*args, *(["--with-hook"] if with_hook else []))


def events(child: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    """The JSON lines a worker printed, once it has ended."""
    out, _ = child.communicate(timeout=timeout)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def ledger_charges(ledger: str, reference: str) -> list[tuple[str, str | None]]:
    """(charge id, idempotency key) of every charge made for one request."""
    with closing(sqlite3.connect(ledger)) as conn:
        return conn.execute(
            "SELECT charge_id, idempotency_key FROM charges WHERE reference = ? ORDER BY rowid",
            (reference,),
        ).fetchall()


def crash_workers(
    children: Children, ledger: str, port: int, namespace: str, requests: list[Request]
) -> None:
    """Start one worker per request; SIGKILL each once the ledger shows its charge."""
    workers = [start_worker(children, port, namespace, r, with_hook=False) for r in requests]
    started = time.monotonic()
    for request, worker in zip(requests, workers, strict=True):
        while not (charges := ledger_charges(ledger, request.request_id)):
            if worker.poll() is not None or time.monotonic() - started > CHARGE_TIMEOUT:
                break
            time.sleep(POLL)
        alive = worker.poll() is None
        worker.kill()  # SIGKILL: no cleanup, no outcome recorded
        worker.wait()
        sigkill = os.name != "posix" or worker.returncode == -signal.SIGKILL
        request.crashed_cleanly = bool(charges) and alive and sigkill
        calling = next((e for e in events(worker, SHUTDOWN_TIMEOUT) if "attempt" in e), {})
        if request.crashed_cleanly:
            request.crash = f"killed, {charges[0][0]} in ledger"
            print(
                f"  {request.name}: worker pid {worker.pid}, attempt {calling.get('attempt')},"
                " POST /charges, Idempotency-Key"
                f" {str(calling.get('downstream_key'))[:16]}...\n"
                f"             {charges[0][0]} in the ledger after"
                f" {time.monotonic() - started:.2f} s, answer held back -> SIGKILL"
            )
        else:
            request.crash = f"worker exited {worker.returncode}, charges {len(charges)}"
            print(f"  {request.name}: worker pid {worker.pid} did not crash as planned")


def wait_in_doubt(guard: Guard, requests: list[Request]) -> list[str]:
    """Wait for the dead workers' leases to run out; the request ids now in doubt."""
    deadline = time.monotonic() + IN_DOUBT_TIMEOUT
    wanted = {r.request_id for r in requests}
    while True:
        in_doubt = [r.request_id for r in guard.in_doubt()]
        if wanted <= set(in_doubt) or time.monotonic() > deadline:
            break
        time.sleep(POLL * 5)
    for request in requests:
        record = guard.get(request.request_id)
        request.status_after_lease = record.status.value if record else "no record"
    return in_doubt


def retry(
    children: Children, port: int, namespace: str, request: Request, *, with_hook: bool
) -> dict[str, Any]:
    """A restarted worker replays its plan: the same request id, the same payload."""
    worker = start_worker(children, port, namespace, request, with_hook=with_hook)
    try:
        seen = events(worker, WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"event": "timeout"}
    return seen[-1] if seen else {"event": f"exit {worker.returncode}"}


def run_scenario(
    guard: Guard, ledger: str, namespace: str, token: str
) -> tuple[Request, Request, list[str]]:
    children = Children()
    first = Request("request 1", f"run-{token}:charge_card:1", "cus_ada", 4200)
    second = Request("request 2", f"run-{token}:charge_card:2", "cus_bob", 1300)
    print(f"Request 1: {first.request_id} (cus_ada, 4200 cents): a worker retries it")
    print(f"Request 2: {second.request_id} (cus_bob, 1300 cents): settled by guard.reconcile()\n")
    try:
        payments = children.start("--payments", "--ledger", ledger)
        line = first_line(payments, STARTUP_TIMEOUT)
        if not line.isdigit():
            raise RuntimeError(f"the payments service did not start (exit {payments.poll()})")
        port = int(line)

        print("1. Two workers charge through the guard; each is killed while it waits:")
        crash_workers(children, ledger, port, namespace, [first, second])

        print(f"\n2. After the {LEASE:g} s lease, nobody holds the claims:")
        in_doubt = wait_in_doubt(guard, [first, second])
        for request in (first, second):
            print(f"  {request.name}: guard.get(id).status -> {request.status_after_lease}")
        print(f"  guard.in_doubt() -> {len(in_doubt)} record(s)")

        print("\n3. A restarted worker retries request 1 without a reconcile hook:")
        first.no_hook_retry = retry(children, port, namespace, first, with_hook=False)
        first.no_hook_charges = len(ledger_charges(ledger, first.request_id))
        answer = first.no_hook_retry
        print(
            f"  -> {answer.get('error') or answer.get('event')} (owner {answer.get('owner')},"
            f" attempt {answer.get('attempt')}); charges in ledger: {first.no_hook_charges}"
        )

        print("\n4. A restarted worker retries request 1 with a reconcile hook:")
        print("  hook: GET /charges?idempotency_key=<req.downstream_key>")
        answer = retry(children, port, namespace, first, with_hook=True)
        first.answer = answer.get("receipt") or {}
        result = first.answer.get("result") or {}
        first.resolved_by = f"hook on retry, replay={first.answer.get('replay')}"
        print(
            f"  -> {answer.get('error') or 'receipt'}: status {first.answer.get('status')},"
            f" replay={first.answer.get('replay')}, charge {result.get('charge_id')}"
        )

        print("\n5. A proactive pass settles request 2 with no retry (guard.reconcile()):")
        with open_guard(namespace, port, with_hook=True) as sweeper:
            report = sweeper.reconcile()
        verdicts = {rid: verdict for _, rid, verdict in report.items}
        second.resolved_by = f"guard.reconcile(): {verdicts.get(second.request_id, '-')}"
        record = guard.get(second.request_id)
        second.answer = record.to_dict() if record else {}
        print(
            f"  -> checked={report.checked} happened={report.happened}"
            f" not_happened={report.not_happened} unknown={report.unknown};"
            f" status {second.answer.get('status')}"
        )
    finally:
        children.close()
    for request in (first, second):
        request.charges = ledger_charges(ledger, request.request_id)
    return first, second, in_doubt


# -- the report -------------------------------------------------------------------------


def charge_id(answer: dict[str, Any]) -> str | None:
    return (answer.get("result") or {}).get("charge_id")


def print_summary(first: Request, second: Request) -> None:
    no_hook = first.no_hook_retry
    rows = [
        ("", "request 1: a worker retries", "request 2: guard.reconcile()"),
        ("customer, amount", *(f"{r.customer} {r.amount_cents}" for r in (first, second))),
        ("first worker", first.crash, second.crash),
        ("status after lease", first.status_after_lease, second.status_after_lease),
        (
            "retry without hook",
            f"{no_hook.get('error', '-')}, {first.no_hook_charges} charge(s)",
            "-",
        ),
        ("resolved by", first.resolved_by, second.resolved_by),
        ("final status", *(str(r.answer.get("status", "-")) for r in (first, second))),
        ("charge id in receipt", *(charge_id(r.answer) or "-" for r in (first, second))),
        ("charges in ledger", str(len(first.charges)), str(len(second.charges))),
        ("  charge ids", *(", ".join(c[0] for c in r.charges) for r in (first, second))),
    ]
    print()
    for label, left, right in rows:
        print(f"  {label:<20} {left:<34} {right}")


def reconciled(guard: Guard, request: Request) -> bool:
    """The record is SUCCEEDED, by a reconcile hook that found the ledger's charge."""
    record = guard.get(request.request_id)
    verdicts = [
        e.detail.get("verdict")
        for e in guard.audit_trail(request.request_id)
        if e.kind is EventKind.RECONCILED
    ]
    return (
        record is not None
        and record.status is Status.SUCCEEDED
        and verdicts == ["happened"]
        and len(request.charges) == 1
        and (record.result or {}).get("charge_id") == request.charges[0][0]
        and charge_id(request.answer) == request.charges[0][0]
        and request.charges[0][1] == record.downstream_key
    )


def verify(guard: Guard, first: Request, second: Request, in_doubt: list[str]) -> bool:
    """The claims the demo makes, checked against the ledger and the guard's records."""
    checks = {
        "each worker was killed after its charge reached the ledger, before the answer": (
            first.crashed_cleanly and second.crashed_cleanly
        ),
        "after the lease, both records read IN_DOUBT (guard.get, guard.in_doubt)": (
            first.status_after_lease == second.status_after_lease == Status.IN_DOUBT.value
            and {first.request_id, second.request_id} <= set(in_doubt)
        ),
        "the retry without a hook got OutcomeUnknownError and charged nothing": (
            first.no_hook_retry.get("error") == "OutcomeUnknownError" and first.no_hook_charges == 1
        ),
        "the retry with the hook got the original charge as its receipt, a replay": (
            first.answer.get("replay") is True
            and first.answer.get("status") == Status.SUCCEEDED.value
        ),
        "request 1 ended SUCCEEDED via reconciliation, with the ledger's charge id": (
            reconciled(guard, first)
        ),
        "request 2 ended SUCCEEDED via guard.reconcile(), with the ledger's charge id": (
            reconciled(guard, second)
        ),
        "the ledger holds exactly one charge per request": (
            len(first.charges) == 1 and len(second.charges) == 1
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


def main() -> int:
    token = uuid.uuid4().hex
    namespace = f"in-doubt-demo-{token[:12]}"
    with (
        tempfile.TemporaryDirectory(prefix="safeagent-in-doubt-") as tmp,
        Guard(namespace=namespace) as guard,
    ):
        ledger = os.path.join(tmp, "ledger.db")
        print(
            f"Guard database:  {os.path.abspath(guard.store.path)}"
            "  ($SAFEAGENT_DB, else ./safeagent.db)"
        )
        print(f"Namespace:       {namespace}  (this run's records only)")
        print(f"Payments ledger: {ledger}")
        print(
            "The payments service commits the first charge of each Idempotency-Key and never"
            f"\nanswers; workers use a {LEASE:g} s lease and a {HTTP_TIMEOUT:g} s HTTP timeout.\n"
        )
        first, second, in_doubt = run_scenario(guard, ledger, namespace, token)
        print_summary(first, second)
        ok = verify(guard, first, second, in_doubt)
        print_audit_trail(guard, first.request_id)
    print(
        f"\nRESULT: {'ok' if ok else 'FAILED'}: {len(first.charges)} charge(s) for request 1,"
        f" {len(second.charges)} for request 2; both settled by reconciliation, none repeated"
    )
    return 0 if ok else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", action="store_true", help="run the payments service")
    parser.add_argument("--ledger", help="the payments ledger file (with --payments)")
    parser.add_argument("--worker", action="store_true", help="run one worker (internal)")
    parser.add_argument("--port", type=int, help="the payments service's port (with --worker)")
    parser.add_argument("--namespace", help="the guard namespace (with --worker)")
    parser.add_argument("--request-id", help="the request id (with --worker)")
    parser.add_argument("--customer", help="the customer to charge (with --worker)")
    parser.add_argument("--amount-cents", type=int, help="the amount (with --worker)")
    parser.add_argument("--with-hook", action="store_true", help="reconcile hook (with --worker)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args(sys.argv[1:])
    if options.payments:
        serve_payments(options.ledger)
        sys.exit(0)
    if options.worker:
        work(options)
        sys.exit(0)
    sys.exit(main())
