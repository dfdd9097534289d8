"""CrewAI retries a failing tool; the guarded tool sends the email once.

Run it from any directory, offline (``pip install -e '.[crewai]'``)::

    python examples/crewai_tools.py

The agent's model is a scripted ``crewai.llms.base_llm.BaseLLM`` (CrewAI's way to plug in
a custom model) that answers in CrewAI's ReAct text format, so no network and no API key are
needed; CrewAI's telemetry is switched off. The ``send_email`` tool hands the mail to the
mail server and then times out waiting for the acknowledgement. CrewAI's default retry path
calls a failing tool again (in CrewAI 1.x: three attempts, each tried twice), so the
customer gets one email per call. Wrapped by ``safeagent.integrations.crewai.guard_tool``,
the tool body runs once: every re-invocation gets the stored failure, and the model is told
what happened.

The request id is derived from the scope (here the order id, read from the tool's
``order_id`` argument), the tool name and the arguments. The guard keeps its records in the
default SQLite file (``$SAFEAGENT_DB`` if set, else ``safeagent.db`` in the working
directory); each run uses a fresh order id, so the demo works on every run. Exit code 0
when the plain tool sent more than one email and the guarded one exactly one.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
import warnings
from typing import Any

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")  # offline: before crewai loads
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("CREWAI_DISABLE_TRACKING", "true")
warnings.simplefilter("ignore", DeprecationWarning)  # CrewAI's own deprecations

from crewai import Agent, Crew, Task  # noqa: E402
from crewai.llms.base_llm import BaseLLM  # noqa: E402
from crewai.tools import BaseTool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from safeagent import Guard  # noqa: E402
from safeagent.integrations.crewai import guard_tool  # noqa: E402

OUTBOX: list[str] = []  # the mail server: one entry per email handed over


class SendEmailArgs(BaseModel):
    order_id: str = Field(description="The order the email is about.")
    to: str = Field(description="The customer's address.")
    template: str = Field(description="The template name, such as 'welcome'.")


class SendEmail(BaseTool):
    name: str = "send_email"
    description: str = "Send a templated email to a customer."
    args_schema: type[BaseModel] = SendEmailArgs

    def _run(self, order_id: str, to: str, template: str) -> str:
        OUTBOX.append(f"{template} to {to} about {order_id}")
        raise TimeoutError("the mail server did not acknowledge in 30 s")


class ScriptedModel(BaseLLM):
    """Answers with ``replies`` in order; remembers the last thing it was shown."""

    replies: list[str]
    calls: int = 0
    last_prompt: str = ""

    def call(self, messages: Any, *args: Any, **kwargs: Any) -> str:
        self.last_prompt = json.dumps(messages, default=str)
        self.calls += 1
        return self.replies[min(self.calls, len(self.replies)) - 1]

    def supports_function_calling(self) -> bool:
        return False


def run_crew(tool: BaseTool, order_id: str) -> ScriptedModel:
    args = {"order_id": order_id, "to": "user@example.test", "template": "welcome"}
    llm = ScriptedModel(
        model="scripted",
        replies=[
            f"Thought: I will send it.\nAction: send_email\nAction Input: {json.dumps(args)}",
            "Thought: I know what happened.\nFinal Answer: the email was handed over",
        ],
    )
    agent = Agent(
        role="Customer mailer",
        goal="Send customers the right email",
        backstory="Sends transactional emails.",
        llm=llm,
        tools=[tool],
        max_iter=3,
        verbose=False,
    )
    task = Task(description="Send the welcome email.", expected_output="status", agent=agent)
    Crew(agents=[agent], tasks=[task], verbose=False).kickoff()
    return llm


def main() -> int:
    guard = Guard()  # $SAFEAGENT_DATABASE_URL, else $SAFEAGENT_DB, else ./safeagent.db
    plain = SendEmail()
    guarded = guard_tool(SendEmail(), guard, scope_arg="order_id")

    run_crew(plain, f"ORD-{uuid.uuid4().hex[:8]}")
    sent_plain = len(OUTBOX)
    print(f"plain tool:   emails sent {sent_plain}  (CrewAI called the failing tool again)")

    OUTBOX.clear()
    llm = run_crew(guarded, f"ORD-{uuid.uuid4().hex[:8]}")
    sent_guarded = len(OUTBOX)
    told = "did not acknowledge" in llm.last_prompt
    print(f"guarded tool: emails sent {sent_guarded}  (retries got the stored failure)")
    print(f"the model was shown the stored failure: {told}")
    guard.close()
    ok = sent_plain > 1 and sent_guarded == 1 and told
    print(f"RESULT: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
