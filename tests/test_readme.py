"""The README's Quickstart, run as written (``payments`` standing for the reader's API
client), and the two rules the paragraph after it states."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from safeagent import (
    ActionPolicy,
    Guard,
    OutcomeUnknownError,
    ReplayedFailureError,
    ResultNotSerializableError,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    return block.group(1)


class Payments:
    """A payments API that charges once per idempotency key, as Stripe's does."""

    def __init__(self) -> None:
        self.charges: list[tuple[str, int, str]] = []

    def charge(self, customer: str, amount_cents: int, *, idempotency_key: str) -> Any:
        self.charges.append((customer, amount_cents, idempotency_key))
        return SimpleNamespace(id=f"ch_{len(self.charges)}", status="succeeded")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAFEAGENT_DATABASE_URL", raising=False)
    monkeypatch.delenv("SAFEAGENT_DB", raising=False)
    return tmp_path


def test_the_quickstart_charges_once_and_replays_the_receipt(in_tmp: Path) -> None:
    payments = Payments()
    scope: dict[str, Any] = {"payments": payments}
    exec(compile(_quickstart(), "README.md", "exec"), scope)
    first = scope["receipt"]
    assert first.replay is False
    assert first.result == {"charge_id": "ch_1", "status": "succeeded"}
    assert (in_tmp / "safeagent.db").exists()  # the embedded default, in the cwd
    again = scope["guard"].execute(
        "order-42", "charge_card", {"customer": "CUST-1", "amount_cents": 500}, scope["charge"]
    )
    assert again.replay is True
    assert again.result == first.result
    assert len(payments.charges) == 1
    assert payments.charges[0][2] == first.downstream_key
    scope["guard"].close()


def test_an_sdk_object_result_is_refused_after_the_side_effect_ran_and_never_runs_again(
    in_tmp: Path,
) -> None:
    payments = Payments()
    with Guard() as guard:

        def charge(ctx: Any) -> Any:
            return payments.charge("CUST-1", 500, idempotency_key=ctx.downstream_key)

        for _ in range(2):
            with pytest.raises(ResultNotSerializableError):
                guard.execute("order-43", "charge_card", {}, charge)
    assert len(payments.charges) == 1


def test_an_undeclared_exception_is_a_final_failure_a_declared_one_leaves_doubt(
    in_tmp: Path,
) -> None:
    class ReadTimeout(Exception):
        pass

    calls: list[str] = []

    def charge(ctx: Any) -> Any:
        calls.append(ctx.request_id)
        raise ReadTimeout("no answer in 10 s")

    with Guard() as guard:
        with pytest.raises(ReadTimeout):
            guard.execute("order-44", "charge_card", {}, charge)
        with pytest.raises(ReplayedFailureError):
            guard.execute("order-44", "charge_card", {}, charge)
    with Guard(actions={"charge_card": ActionPolicy(outcome_unknown=(ReadTimeout,))}) as guard:
        with pytest.raises(ReadTimeout):
            guard.execute("order-45", "charge_card", {}, charge)
        with pytest.raises(OutcomeUnknownError):
            guard.execute("order-45", "charge_card", {}, charge)
    assert calls == ["order-44", "order-45"]
