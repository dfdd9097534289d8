"""P6: a framework that re-invokes a failing tool gets the stored outcome, with plain
functions standing in for CrewAI tools and a framework-like retry loop.

Over every store and both API flavours (the ``guard`` fixture). The sent-mail ledger (a
separate SQLite file) is the ground truth of how often the tool body acted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from safeagent import NotExecuted, OutcomeUnknownError, ReplayedFailureError, current_context
from tests.conftest import Ledger

RETRIES = 3


class AckTimeout(TimeoutError):
    """The mail server took the message, but its acknowledgement timed out."""


def framework_invoke(tool: Callable[[], Any], retries: int = RETRIES) -> list[Any]:
    """A framework's default tool retry: invoke, and on any exception re-invoke, up to
    ``retries`` more times. Returns what each invocation returned or raised."""
    outcomes: list[Any] = []
    for _ in range(1 + retries):
        try:
            outcomes.append(tool())
        except Exception as exc:
            outcomes.append(exc)
        else:
            break
    return outcomes


@pytest.mark.parametrize("declared", [False, True], ids=["failure", "outcome_unknown"])
def test_p6_reinvoked_send_email_gets_the_stored_outcome_and_mails_once(
    declared: bool, guard: Any, tmp_path: Path
) -> None:
    """P6: re-invoking a send_email that timed out returns the stored outcome; one mail is sent."""
    mail = Ledger(tmp_path / "mail.db")
    entered: list[int] = []

    @guard.guarded(action="send_email", outcome_unknown=(AckTimeout,) if declared else None)
    def send_email(to: str, template: str) -> dict[str, str]:
        ctx = current_context()
        assert ctx is not None
        entered.append(ctx.attempt)
        mail.append(to, template)
        raise AckTimeout("SMTP acknowledgement timed out after 30 s")

    outcomes = framework_invoke(
        lambda: send_email.call("tool-call-1", to="user@example.test", template="welcome")
    )
    assert len(outcomes) == 1 + RETRIES
    assert isinstance(outcomes[0], AckTimeout)  # the first call sees the original error
    for again in outcomes[1:]:
        if declared:
            assert isinstance(again, OutcomeUnknownError), again
            assert again.attempt == 1
        else:
            assert isinstance(again, ReplayedFailureError), again
            assert again.error_type.endswith("AckTimeout")
            assert again.error_message == "SMTP acknowledgement timed out after 30 s"
    assert entered == [1]
    assert mail.rows() == [("user@example.test", "welcome")]


def test_p6_tool_raising_not_executed_runs_on_every_attempt(guard: Any, ledger: Ledger) -> None:
    """A tool raising NotExecuted runs on every re-invocation and sends nothing."""

    @guard.guarded(action="send_sms")
    def send_sms(to: str, text: str) -> str:
        ctx = current_context()
        assert ctx is not None
        ledger.append("attempt", str(ctx.attempt))
        raise NotExecuted("SMS gateway refused the connection: nothing was sent")

    outcomes = framework_invoke(lambda: send_sms.call("tool-call-2", to="+15550100", text="hi"))
    assert len(outcomes) == 1 + RETRIES
    assert all(isinstance(o, NotExecuted) for o in outcomes), outcomes
    assert ledger.rows("attempt") == [("attempt", str(n)) for n in range(1, 2 + RETRIES)]
    assert ledger.count("sent") == 0
