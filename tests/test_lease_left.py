"""``ExecutionContext.lease_left()``: a stalled owner can tell that its lease ran out.

A review found a duplicate with every process alive: the owner of a claim stalled (here
SIGSTOP; a GC pause, a C call holding the GIL or a frozen VM do the same) past its lease
while ``fn`` was about to send; a retry's reconcile hook, following the documented time
rule (``not_happened`` once ``now_ms >= lease_expired_at_ms +`` the downstream timeout,
and the downstream has no such charge), let the retry charge; then the owner woke up and
charged too. ``fn`` that checks ``ctx.lease_left()`` right before its send declines it.

Real processes, a real SQLite file, a real stop signal; the charges are rows of an effect
ledger (a separate SQLite file) that stands for the downstream payments API.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safeagent import ActionPolicy, ExecutionContext, Guard, Reconciliation, SQLiteStore, _runtime
from tests._workers import child_env, wait_until
from tests.conftest import Ledger

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")

LEASE = 0.6
DOWNSTREAM_TIMEOUT_MS = 200

# The owner: claims, says it is ready, waits for "go" (the parent stops it meanwhile),
# then sends the charge: after checking its lease, or not (argv[4] == "check").
OWNER = """
import sys, time
from pathlib import Path
from typing import Any
from safeagent import Guard, NotExecuted
from tests.conftest import Ledger

db, ledger_path, folder, mode = sys.argv[1:5]
ledger = Ledger(ledger_path)
guard = Guard(db, lease=float(sys.argv[5]))

def charge(ctx):
    Path(folder, "ready").touch()
    while not Path(folder, "go").exists():
        time.sleep(0.01)
    left = ctx.lease_left()
    Path(folder, "left").write_text(repr(left))
    if mode == "check" and left < 0.1:
        raise NotExecuted(f"lease ran out ({left} s left): not sending")
    ledger.append("charge", "owner " + ctx.downstream_key)
    return "charged by the owner"

try:
    guard.execute("order-1", "charge", {"amount": 5}, charge)
    print("owner: ok")
except Exception as exc:
    print("owner:", type(exc).__name__)
"""


def _stalled_owner_and_a_retry(tmp_path: Path, mode: str) -> tuple[list[str], str]:
    db, ledger_path = tmp_path / "guard.db", tmp_path / "ledger.db"
    SQLiteStore(db).close()
    ledger = Ledger(ledger_path)

    def hook(req: object) -> Reconciliation:
        key = req.downstream_key  # type: ignore[attr-defined]
        if any(detail and detail.endswith(key) for _, detail in ledger.rows("charge")):
            return Reconciliation.happened("found downstream")
        now, ended = req.now_ms, req.lease_expired_at_ms  # type: ignore[attr-defined]
        if ended is not None and now >= ended + DOWNSTREAM_TIMEOUT_MS:
            return Reconciliation.not_happened(note="no such charge downstream")
        return Reconciliation.unknown()

    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(db), str(ledger_path), str(tmp_path), mode, str(LEASE)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until((tmp_path / "ready").exists, timeout=30)
        os.kill(owner.pid, signal.SIGSTOP)  # stalled, alive, past its lease
        try:
            time.sleep(LEASE + DOWNSTREAM_TIMEOUT_MS / 1000 + 0.3)
            retry = Guard(db, lease=LEASE, actions={"charge": ActionPolicy(reconcile=hook)})

            def charge(ctx: ExecutionContext) -> str:
                ledger.append("charge", "retry " + ctx.downstream_key)
                return "charged by the retry"

            assert retry.execute("order-1", "charge", {"amount": 5}, charge).result == (
                "charged by the retry"
            )
            (tmp_path / "go").touch()
        finally:
            os.kill(owner.pid, signal.SIGCONT)
        out, _ = owner.communicate(timeout=60)
    finally:
        if owner.poll() is None:
            owner.kill()
    return [detail or "" for _, detail in ledger.rows("charge")], out


def test_a_stalled_owner_that_checks_its_lease_does_not_charge_again(tmp_path: Path) -> None:
    charges, out = _stalled_owner_and_a_retry(tmp_path, "check")

    assert len(charges) == 1, charges
    assert charges[0].startswith("retry ")
    assert float((tmp_path / "left").read_text()) == 0.0
    assert "owner: LeaseLostError" in out  # its release is fenced out: the retry took over


def test_without_the_check_the_stalled_owner_charges_twice(tmp_path: Path) -> None:
    """The hazard the check is for (and the reason the docs no longer give the time rule
    alone): the same run, the owner sending without asking."""
    charges, _ = _stalled_owner_and_a_retry(tmp_path, "send")

    assert sorted(c.split()[0] for c in charges) == ["owner", "retry"]


def test_lease_left_counts_down_from_the_claim_and_renewals_refresh_it(tmp_path: Path) -> None:
    guard = Guard(tmp_path / "guard.db", lease=0.9)
    seen: list[float] = []

    def fn(ctx: ExecutionContext) -> int:
        seen.append(ctx.lease_left())
        time.sleep(1.2)  # four renewals' worth: the lease holds all along
        seen.append(ctx.lease_left())
        return 1

    guard.execute("r", "a", {}, fn)

    assert 0.5 < seen[0] <= 0.9
    assert 0.3 < seen[1] <= 0.9
    assert ExecutionContext("r", "n", "a", {}, 1, 1, "e", "d").lease_left() == math.inf


def test_lease_left_is_zero_once_fn_has_returned_or_raised(tmp_path: Path) -> None:
    """A thread ``fn`` left behind (it timed out waiting for it) must not send: the
    record may already be settled and retried (a review's duplicate: it read 4 s left)."""
    guard = Guard(tmp_path / "guard.db", lease=5)
    kept: list[ExecutionContext] = []
    seen: list[float] = []

    def fn(ctx: ExecutionContext) -> None:
        kept.append(ctx)
        seen.append(ctx.lease_left())
        raise TimeoutError("the worker did not answer in time")

    with pytest.raises(TimeoutError):
        guard.execute("r", "a", {}, fn)
    worker = threading.Thread(target=lambda: seen.append(kept[0].lease_left()))
    worker.start()
    worker.join()

    assert 4 < seen[0] <= 5
    assert seen[1] == 0.0


def test_a_running_context_copies_pickles_and_dumps_as_before(tmp_path: Path) -> None:
    """The context of a running fn is still a plain value for ``pickle``, ``deepcopy``,
    ``asdict``, ``repr`` and equality. A copy reads the live lease (and 0 once fn is
    over); a pickled one (another process, perhaps another host, whose clock means
    nothing here) and one made by ``dataclasses.replace`` read 0: they cannot learn of
    renewals or of the end of fn (a review: a worker process sent after a retry had)."""
    guard = Guard(tmp_path / "guard.db", lease=5)
    out: dict[str, Any] = {}

    def fn(ctx: ExecutionContext) -> None:
        out["pickled"] = pickle.loads(pickle.dumps(ctx))
        out["deep"] = copy.deepcopy(ctx)
        out["shallow"] = copy.copy(ctx)
        out["replaced"] = dataclasses.replace(ctx, payload={"x": "redacted"})
        out["dict"] = dataclasses.asdict(ctx)
        out["repr"] = repr(ctx)
        out["equal"] = ctx == ExecutionContext(**out["dict"]) == ctx
        out["left"] = [out[k].lease_left() for k in ("pickled", "deep", "shallow", "replaced")]

    guard.execute("r", "a", {"x": 1}, fn)

    pickled, deep, shallow, replaced = out["left"]
    assert (pickled, replaced) == (0.0, 0.0)
    assert 4 < deep <= 5
    assert 4 < shallow <= 5
    assert out["deep"].lease_left() == out["shallow"].lease_left() == 0.0  # fn is over
    assert out["pickled"] == out["deep"] == out["shallow"]
    assert out["equal"] is True
    assert out["dict"] == {
        "request_id": "r",
        "namespace": "default",
        "action": "a",
        "payload": {"x": 1},
        "attempt": 1,
        "fencing_token": 1,
        "execution_id": out["deep"].execution_id,
        "downstream_key": out["deep"].downstream_key,
    }
    assert str(out["repr"]).startswith("ExecutionContext(request_id='r'")


def test_an_interrupt_as_the_heartbeat_block_ends_keeps_no_lease_alive(tmp_path: Path) -> None:
    """A KeyboardInterrupt handled at the first instruction of the heartbeat block's
    ``__exit__`` (where CPython runs signal handlers; simulated with a trace function)
    leaves no beat renewing the lease, and the context reads 0 (a review: the lease was
    renewed for as long as the process lived, and a kept context read it live)."""
    guard = Guard(tmp_path / "guard.db", lease=1)
    kept: list[ExecutionContext] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is _runtime._Beating.__exit__.__code__:
            sys.settrace(None)
            raise KeyboardInterrupt("handled as __exit__ begins")

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            guard.execute("r", "a", {}, lambda ctx: kept.append(ctx) or "done")
    finally:
        sys.settrace(None)

    assert kept[0].lease_left() == 0.0
    assert not any(beater.beats for beater in _runtime.heartbeats._beaters.values())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reads_no_lease(tmp_path: Path) -> None:
    """A child forked inside fn (multiprocessing's default start method on Linux before
    3.14) has a memory copy of the lease view that never learns of renewals or of the
    end of fn: it reads 0 (a review: it read 4 s left after a retry had charged)."""
    guard = Guard(tmp_path / "guard.db", lease=5)
    seen: list[float] = []

    def fn(ctx: ExecutionContext) -> None:
        seen.append(ctx.lease_left())
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it reads, and leave at once
            os.write(write, repr(ctx.lease_left()).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        seen.append(float(os.read(read, 100)))
        os.close(read)

    guard.execute("r", "a", {}, fn)

    assert 4 < seen[0] <= 5
    assert seen[1] == 0.0


def test_copies_of_a_viewless_context_read_no_lease_and_keep_its_name(tmp_path: Path) -> None:
    """A copy of an unpickled or ``replace``d context (no view) reads 0 and does not raise
    (a review: AttributeError); the running context's type is named ExecutionContext,
    as error messages and stored failures showed it before."""
    guard = Guard(tmp_path / "guard.db", lease=5)
    out: dict[str, Any] = {}

    def fn(ctx: ExecutionContext) -> None:
        for name, other in (
            ("pickled", pickle.loads(pickle.dumps(ctx))),
            ("replaced", dataclasses.replace(ctx, attempt=2)),
        ):
            out[name] = (copy.copy(other).lease_left(), copy.deepcopy(other).lease_left())
        out["name"] = type(ctx).__name__

    guard.execute("r", "a", {}, fn)

    assert out["pickled"] == out["replaced"] == (0.0, 0.0)
    assert out["name"] == "ExecutionContext"
