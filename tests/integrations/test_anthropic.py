"""Anthropic Messages API tool use through the guard.

The model is scripted with the ``anthropic`` package's own ``Message`` and
``ToolUseBlock`` objects (no network). The first two attempts of a run die when the model
call after the tool call times out; the run is retried from the start and the model
re-emits ``charge_card`` with the same input under a new ``tool_use`` id. Side effects are
counted in the effect ledger (``tests/conftest.py``), separate from the guard's database.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integrations import require, run_example

require("anthropic")

from anthropic.types import Message, TextBlock, ToolUseBlock, Usage  # noqa: E402

from safeagent import AsyncGuard, Guard  # noqa: E402
from safeagent.errors import (  # noqa: E402
    ConfigurationError,
    InvalidInputError,
    ResultNotSerializableError,
)
from safeagent.integrations.anthropic import (  # noqa: E402
    REPLAY_MARKER,
    TransportIdWarning,
    arun_tool_uses,
    run_tool_uses,
)

ORDER = "order-42"
INPUT = {"customer": "cus_1", "amount_cents": 1999}


class CardDeclined(Exception):
    """The payment provider refused the charge."""


def tool_use(block_id: str, tool_input: dict[str, Any], name: str = "charge_card") -> ToolUseBlock:
    return ToolUseBlock(type="tool_use", id=block_id, name=name, input=tool_input)


def message(*content: Any) -> Message:
    has_tools = any(getattr(block, "type", None) == "tool_use" for block in content)
    return Message(
        id="msg_scripted",
        type="message",
        role="assistant",
        model="scripted",
        content=list(content),
        stop_reason="tool_use" if has_tools else "end_turn",
        usage=Usage(input_tokens=1, output_tokens=1),
    )


class ScriptedMessages:
    """``create(messages=...)`` answers from a script; an exception in it is raised."""

    def __init__(self, script: list[Message | BaseException]) -> None:
        self.script = list(script)

    def create(self, *, messages: list[Any]) -> Message:
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


def run(
    model: ScriptedMessages, tools: dict[str, Any], guard: Guard, sent: list[Any], **options: Any
) -> str:
    """The tool loop; the tool_result blocks sent back to the model go to ``sent``."""
    messages: list[Any] = [{"role": "user", "content": "Charge order 42."}]
    while True:
        reply = model.create(messages=messages)
        messages.append({"role": "assistant", "content": reply.content})
        if reply.stop_reason != "tool_use":
            return "".join(block.text for block in reply.content if block.type == "text")
        results = run_tool_uses(reply, tools, guard=guard, scope=ORDER, **options)
        sent += results
        messages.append({"role": "user", "content": results})


@pytest.fixture
def charge_card(ledger: Any) -> Callable[..., dict[str, Any]]:
    def charge_card(customer: str, amount_cents: int, currency: str = "usd") -> dict[str, Any]:
        row = ledger.append(f"{customer}:{amount_cents}:{currency}")
        return {"charge_id": f"ch_{row}", "amount_cents": amount_cents}

    return charge_card


@pytest.fixture
def guards(tmp_path: Path) -> Iterator[Callable[[], Guard]]:
    """``new()`` opens a fresh Guard on the same SQLite file: a restarted worker."""
    opened: list[Guard] = []

    def new() -> Guard:
        opened.append(Guard(tmp_path / "guard.db"))
        return opened[-1]

    yield new
    for guard in opened:
        guard.close()


def retried(tools: dict[str, Any], guards: Any, **options: Any) -> list[list[Any]]:
    """Three attempts of one run, each in a fresh worker; the results each one sent."""
    per_attempt = []
    for attempt in (1, 2, 3):
        script: list[Any] = [
            message(TextBlock(type="text", text="Charging."), tool_use(f"toolu_{attempt}", INPUT))
        ]
        script.append(
            TimeoutError("timed out")
            if attempt < 3
            else message(TextBlock(type="text", text="Done."))
        )
        sent: list[Any] = []
        try:
            assert run(ScriptedMessages(script), tools, guards(), sent, **options) == "Done."
        except TimeoutError:
            assert attempt < 3
        per_attempt.append(sent)
    return per_attempt


def test_run_retried_three_times_charges_once(charge_card, guards, ledger):
    """A re-emitted tool_use with new ids charges once; every attempt gets the same result."""
    attempts = retried({"charge_card": charge_card}, guards)
    assert ledger.count() == 1
    results = [sent[0] for sent in attempts]
    assert [r["tool_use_id"] for r in results] == ["toolu_1", "toolu_2", "toolu_3"]
    assert len({r["content"] for r in results}) == 1
    assert all(r["type"] == "tool_result" and "is_error" not in r for r in results)


def test_keyed_on_tool_use_ids_charges_every_attempt(charge_card, guards, ledger):
    """Negative control: keyed on tool_use ids, the same script charges three times."""
    with pytest.warns(TransportIdWarning, match="tool-call ids"):
        retried({"charge_card": charge_card}, guards, key="tool_call_id")
    assert ledger.count() == 3


def test_equivalent_blocks_in_one_message_run_once(charge_card, guards, ledger):
    """Three equivalent tool_use blocks (keys reordered) run once, each with its own id."""
    reply = message(
        tool_use("toolu_a", {"customer": "cus_1", "amount_cents": 1999}),
        tool_use("toolu_b", {"amount_cents": 1999, "customer": "cus_1"}),
        tool_use("toolu_c", {"currency": "usd", "customer": "cus_1", "amount_cents": 1999}),
    )
    results = run_tool_uses(reply, {"charge_card": charge_card}, guard=guards(), scope=ORDER)
    assert ledger.count() == 1
    assert [r["tool_use_id"] for r in results] == ["toolu_a", "toolu_b", "toolu_c"]
    assert len({r["content"] for r in results}) == 1


def test_block_with_other_input_runs_separately(charge_card, guards, ledger):
    """A tool_use whose input really differs is another request: it runs too."""
    reply = message(tool_use("toolu_a", INPUT), tool_use("toolu_b", {**INPUT, "amount_cents": 5}))
    results = run_tool_uses(reply, {"charge_card": charge_card}, guard=guards(), scope=ORDER)
    assert ledger.count() == 2
    assert results[0]["content"] != results[1]["content"]


def test_failure_is_an_error_result_replayed_identically(guards, ledger):
    """The tool's exception is a tool_result with is_error; a re-emitted call gets the same."""

    def charge_card(customer: str, amount_cents: int) -> str:
        ledger.append(customer)
        raise CardDeclined("insufficient funds")

    guard = guards()
    results = [
        run_tool_uses(
            message(tool_use(block_id, INPUT)),
            {"charge_card": charge_card},
            guard=guard,
            scope=ORDER,
        )[0]
        for block_id in ("toolu_1", "toolu_2")
    ]
    assert ledger.count() == 1
    for result, block_id in zip(results, ("toolu_1", "toolu_2"), strict=True):
        assert result == {
            "type": "tool_result",
            "tool_use_id": block_id,
            "content": "Error: CardDeclined: insufficient funds",
            "is_error": True,
        }


def test_unknown_tool_is_an_error_result_and_runs_nothing(charge_card, guards, ledger):
    """A tool_use naming no known tool, or with unfit input, is an is_error result."""
    reply = message(tool_use("toolu_1", INPUT, name="refund"), tool_use("toolu_2", {"x": 1}))
    results = run_tool_uses(reply, {"charge_card": charge_card}, guard=guards(), scope=ORDER)
    assert [r["is_error"] for r in results] == [True, True]
    assert results[0]["content"].startswith("Error: UnknownTool:")
    assert results[1]["content"].startswith("Error: InvalidArguments:")
    assert ledger.count() == 0


def test_dict_blocks_and_replay_marker(charge_card, guards, ledger):
    """Content blocks as dicts are read alike; a replay marker prefixes replays only."""
    guard = guards()
    first = run_tool_uses(
        [tool_use("toolu_1", INPUT)], {"charge_card": charge_card}, guard=guard, scope=ORDER
    )
    again = run_tool_uses(
        [{"type": "text", "text": "Again."}, tool_use("toolu_2", INPUT).model_dump()],
        {"charge_card": charge_card},
        guard=guard,
        scope=ORDER,
        replay_marker=REPLAY_MARKER,
    )
    assert ledger.count() == 1
    assert again[0]["content"] == REPLAY_MARKER + first[0]["content"]


def test_async_twin_retried_run_charges_once(tmp_path, ledger):
    """arun_tool_uses with an AsyncGuard and an async tool: three attempts, one charge."""

    async def charge_card(customer: str, amount_cents: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"charge_id": f"ch_{ledger.append(customer)}"}

    async def main() -> list[Any]:
        results = []
        for attempt in (1, 2, 3):
            guard = AsyncGuard(tmp_path / "guard.db")
            try:
                results += await arun_tool_uses(
                    message(tool_use(f"toolu_{attempt}", INPUT)),
                    {"charge_card": charge_card},
                    guard=guard,
                    scope=ORDER,
                )
            finally:
                await guard.aclose()
        return results

    results = asyncio.run(main())
    assert ledger.count() == 1
    assert len({r["content"] for r in results}) == 1
    assert [r["tool_use_id"] for r in results] == ["toolu_1", "toolu_2", "toolu_3"]


def test_async_result_that_cannot_be_dumped_is_a_success_never_a_failure(tmp_path, ledger):
    """arun_tool_uses, for an async and a sync tool, each with a ``**kwargs`` volatile
    argument excluded for it: the tool charged, then returned a pydantic model whose dump
    raises. The record is SUCCEEDED without a stored result, every attempt gets
    ResultNotSerializableError, and the re-emitted block with a new timestamp runs
    nothing."""
    pydantic = pytest.importorskip("pydantic")

    class Charge(pydantic.BaseModel):
        raw: bytes

    async def charge_async(customer: str, amount_cents: int, **extra: Any) -> Any:
        await asyncio.sleep(0)
        ledger.append(f"async:{extra['requested_at']}")
        return Charge(raw=b"\xff")

    def charge_sync(customer: str, amount_cents: int, **extra: Any) -> Any:
        ledger.append(f"sync:{extra['requested_at']}")
        return Charge(raw=b"\xff")

    tools = {"charge_async": charge_async, "charge_sync": charge_sync}
    exclude = {name: ["requested_at"] for name in tools}

    async def main() -> list[Any]:
        guard = AsyncGuard(tmp_path / "guard.db")
        try:
            for name in tools:
                for stamp in ("10:00:01", "10:00:07"):
                    block = tool_use(
                        f"toolu_{name}_{stamp}", {**INPUT, "requested_at": stamp}, name
                    )
                    with pytest.raises(ResultNotSerializableError):
                        await arun_tool_uses(
                            message(block), tools, guard=guard, scope=ORDER, exclude=exclude
                        )
            return list(guard.store.records()[0])
        finally:
            await guard.aclose()

    records = asyncio.run(main())
    assert sorted(r.status.value for r in records) == ["SUCCEEDED", "SUCCEEDED"]
    assert ledger.count() == 2


def test_sync_function_refuses_an_async_guard(charge_card, tmp_path):
    """run_tool_uses with an AsyncGuard is a configuration error naming the async twin."""
    guard = AsyncGuard(tmp_path / "guard.db")
    try:
        with pytest.raises(ConfigurationError, match="arun_tool_uses"):
            run_tool_uses(
                message(tool_use("toolu_1", INPUT)),
                {"charge_card": charge_card},
                guard=guard,  # type: ignore[arg-type]
                scope=ORDER,
            )
    finally:
        asyncio.run(guard.aclose())


def test_text_only_message_has_no_tool_results(charge_card, guards, ledger):
    """A message without tool_use blocks (objects or a str-content dict) runs nothing."""
    guard = guards()
    reply = message(TextBlock(type="text", text="Nothing to charge."))
    assert run_tool_uses(reply, {"charge_card": charge_card}, guard=guard, scope=ORDER) == []
    text_only = {"role": "assistant", "content": "Nothing to charge."}
    assert run_tool_uses(text_only, {"charge_card": charge_card}, guard=guard, scope=ORDER) == []
    assert ledger.count() == 0


def test_toolset_member_runs_the_qualified_tool_and_keeps_its_toolset(guards, ledger):
    """A toolset member runs "<toolset>.<name>" and its result carries toolset_name."""

    def close_tab(tab_id: int) -> str:
        ledger.append(str(tab_id))
        return "closed"

    block = ToolUseBlock.model_validate(
        {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "close_tab",
            "input": {"tab_id": 3},
            "toolset_name": "browser",
        }
    )
    (result,) = run_tool_uses(
        [block], {"browser.close_tab": close_tab}, guard=guards(), scope=ORDER
    )
    assert result == {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": "closed",
        "toolset_name": "browser",
    }
    assert ledger.count() == 1


def deep_input(depth: int) -> dict[str, Any]:
    """An already parsed input whose ``payload`` nests ``depth`` lists (built without
    recursion)."""
    payload: list[Any] = []
    for _ in range(depth - 1):
        payload = [payload]
    return {"to": "bob", "payload": payload}


def test_deeply_nested_input_is_refused_for_that_block_only(guards, ledger):
    """An input nested too deep, parsed or as JSON text, is the same InvalidArguments
    error result for that block; the blocks before and after it run."""

    def notify(to: str, payload: Any = None) -> str:
        ledger.append(to)
        return "sent"

    deep_text = '{"to": "bob", "payload": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for n, deep in enumerate((deep_input(150), deep_input(50_000), deep_text)):
        blocks = [
            {"type": "tool_use", "id": f"a{n}", "name": "notify", "input": {"to": f"ann{n}"}},
            {"type": "tool_use", "id": f"b{n}", "name": "notify", "input": deep},
            {"type": "tool_use", "id": f"c{n}", "name": "notify", "input": {"to": f"cy{n}"}},
        ]
        results = run_tool_uses(blocks, {"notify": notify}, guard=guards(), scope=ORDER)
        assert [r.get("is_error", False) for r in results] == [False, True, False]
        assert results[1]["content"] == (
            "Error: InvalidArguments: arguments nest deeper than 99 levels"
        )
    assert sorted(key for key, _ in ledger.rows()) == ["ann0", "ann1", "ann2", "cy0", "cy1", "cy2"]


class Currency(enum.Enum):
    """A plain Enum: its members are no JSON values."""

    USD = "usd"


def test_enum_and_sentinel_defaults_just_work(guards, ledger):
    """An Enum default counts by its value (a block spelling it out is the same request);
    a sentinel default, which has no JSON form, is left out of the request id: both tools
    run instead of every block being refused with InvalidArguments."""
    missing = object()

    def charge(customer: str, currency: Currency = Currency.USD) -> str:
        return f"charged {ledger.append(f'{customer}:{currency.value}')}"

    def refund(customer: str, reason: object = missing) -> str:
        return f"refunded {ledger.append(f'refund:{reason is missing}')}"

    blocks = [
        tool_use("a", {"customer": "cus_1"}, "charge"),
        tool_use("b", {"customer": "cus_1", "currency": "usd"}, "charge"),
        tool_use("c", {"customer": "cus_1"}, "refund"),
        tool_use("d", {"customer": "cus_1"}, "refund"),
    ]
    tools = {"charge": charge, "refund": refund}
    results = run_tool_uses(blocks, tools, guard=guards(), scope=ORDER)
    assert [r["content"] for r in results] == ["charged 1"] * 2 + ["refunded 2"] * 2
    assert not any(r.get("is_error") for r in results)
    assert ledger.rows() == [("cus_1:usd", None), ("refund:True", None)]


def test_generator_tools_bad_names_and_scopes_are_refused_up_front(guards, tmp_path, ledger):
    """Generator and async generator function tools, a tool name over 255 characters and a
    scope with NUL are refused by run_tool_uses and arun_tool_uses before anything runs."""

    def charge(customer: str) -> Any:
        ledger.append(customer)
        yield "charged"

    async def acharge(customer: str) -> Any:
        ledger.append(customer)
        yield "charged"

    def plain(customer: str) -> str:
        ledger.append(customer)
        return "charged"

    blocks = [tool_use("a", {"customer": "cus_1"})]
    for tool in (charge, acharge):
        with pytest.raises(ConfigurationError, match="generator function"):
            run_tool_uses(blocks, {"charge_card": tool}, guard=guards(), scope=ORDER)
    with pytest.raises(ConfigurationError, match="tool name"):
        run_tool_uses(blocks, {"x" * 256: plain}, guard=guards(), scope=ORDER)
    with pytest.raises(InvalidInputError, match="scope"):
        run_tool_uses(blocks, {"charge_card": plain}, guard=guards(), scope="o\x00")

    async def run_async() -> None:
        guard = AsyncGuard(tmp_path / "async.db")
        try:
            for tool in (charge, acharge):
                with pytest.raises(ConfigurationError, match="generator function"):
                    await arun_tool_uses(blocks, {"charge_card": tool}, guard=guard, scope=ORDER)
        finally:
            await guard.aclose()

    asyncio.run(run_async())
    assert ledger.count() == 0


@pytest.mark.slow
def test_example_runs_offline_and_charges_once_on_every_run(tmp_path):
    """examples/anthropic_tool_use.py runs offline: one charge with derived ids, every run."""
    for _ in range(2):
        result = run_example("anthropic_tool_use.py", tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.rstrip().endswith("RESULT: ok")
    assert (tmp_path / "safeagent.db").exists()
