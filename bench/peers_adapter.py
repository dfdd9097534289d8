"""SafeAgent as an adapter for the peers harness (``bench-peers/``, outside this repository).

One Guard per process on an SQLite file in the harness's temp dir (threads share it; each
W4 process builds its own on the same file). Callers that meet a live claim wait for it
(``wait``, 10 s by default, SafeAgent's own default) and then replay; only if the claim is
still held after that do they get the harness's ``InFlight``.

    cd /work/shared   # the folder holding bench-peers/
    PYTHONPATH=/work/main/bench /work/main/.venv/bin/python bench-peers/run.py \\
        --adapters floor_full,peers_adapter:SafeAgent,peers_adapter:SafeAgentClaimDurable \\
        --out /tmp/peers.json

Durability is a constructor argument (``SafeAgentAdapter(durability="claim-durable")``);
the harness builds ``module:Class`` adapters without arguments, hence the two subclasses.
This module is used by the harness only: the project's tests never import it.
"""

from __future__ import annotations

import os
from typing import Any

from safeagent import Guard, SQLiteStore
from safeagent.errors import InProgressError

try:  # the harness's base class and in-flight answer, when run by the harness
    from adapters import Adapter, InFlight  # type: ignore[import-not-found]
except ImportError:  # imported elsewhere (lint, a quick check): same names, same meaning

    class Adapter:  # type: ignore[no-redef]
        packages: tuple[str, ...] = ()
        multiprocess = True

    class InFlight(Exception):  # type: ignore[no-redef]  # noqa: N818 - the harness's name
        """Another caller holds the claim for this request id; no receipt stored yet."""


class SafeAgentAdapter(Adapter):
    """SafeAgent's Guard on SQLite (WAL; claim fsynced, completion per ``durability``)."""

    packages = ("safeagent", "rfc8785")
    multiprocess = True

    def __init__(self, durability: str = "durable", wait: float = 10.0) -> None:
        self.durability = durability
        self.wait = wait
        self.guard: Guard | None = None
        self.store: SQLiteStore | None = None

    def setup(self, tmpdir: str) -> None:
        self.store = SQLiteStore(
            os.path.join(tmpdir, "safeagent.sqlite3"), durability=self.durability
        )
        self.guard = Guard(self.store, wait=self.wait)

    def execute(self, request_id: str, payload: Any, fn: Any) -> Any:
        assert self.guard is not None, "setup() first"
        try:
            receipt = self.guard.execute(request_id, "bench", payload, lambda _ctx: fn())
        except InProgressError as exc:
            raise InFlight(request_id) from exc
        return receipt.result

    def describe(self) -> dict[str, Any]:
        assert self.store is not None
        conn = self.store._conn()
        return {
            "durability": self.durability,
            "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
            "claim_synchronous": "FULL",
            "completion_synchronous": "NORMAL" if self.durability == "claim-durable" else "FULL",
            "wait_s": self.wait,
        }

    def teardown(self) -> None:
        if self.guard is not None:
            self.guard.close()
        if self.store is not None:
            self.store.close()


class SafeAgent(SafeAgentAdapter):
    """Durable default: claim and completion fsynced."""

    def __init__(self) -> None:
        super().__init__(durability="durable")


class SafeAgentClaimDurable(SafeAgentAdapter):
    """Claim fsynced, completion without fsync (a power loss leaves it in doubt, never a
    duplicate)."""

    def __init__(self) -> None:
        super().__init__(durability="claim-durable")
