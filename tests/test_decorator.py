"""The decorator form (``Guard.guarded``, ``AsyncGuard.guarded``): default action names,
methods called through their class, and guarding what is already guarded.

Side effects are counted in the effect ledger (``tests/conftest.py``), a SQLite file
separate from the guard's database.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from safeagent import AsyncGuard, ConfigurationError, FingerprintMismatchError, Guard, Status
from tests.conftest import Ledger


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[Guard]:
    with Guard(tmp_path / "guard.db") as g:
        yield g


# -- default action names ----------------------------------------------------------------------


def test_default_action_of_a_keyword_partial(guard: Guard, ledger: Ledger) -> None:
    """Without ``action=``, a ``functools.partial`` fixing only keyword arguments is named
    after its function (``module.qualname``): those arguments are parameters with
    defaults, so in the payload; each call runs once and is recorded under that action."""

    def charge(customer: str, amount: int) -> int:
        ledger.append(customer, str(amount))
        return amount

    by_partial = guard.guarded(key_arg="customer")(functools.partial(charge, amount=5))

    assert by_partial.action == f"{__name__}.{charge.__qualname__}"
    assert [by_partial("c-1"), by_partial("c-1")] == [5, 5]
    assert ledger.rows() == [("c-1", "5")]
    first = guard.get('"c-1"')
    assert first is not None
    assert (first.action, first.payload) == (by_partial.action, {"amount": 5})


def test_what_no_payload_tells_apart_needs_an_action(guard: Guard, ledger: Ledger) -> None:
    """A partial fixing positional arguments, or a callable object, has no default action:
    what tells two of them apart (the fixed arguments, the object's state) is in no
    payload, so under one default name two calls with one key would replay each other's
    receipt. ConfigurationError asks for ``action=``; with one per object each runs."""

    def send(region: str, to: str) -> str:
        ledger.append(region, to)
        return f"sent via {region}"

    class Mailer:
        def __init__(self, region: str) -> None:
            self.region = region

        def __call__(self, to: str) -> str:
            ledger.append(self.region, to)
            return f"sent via {self.region}"

    for made in (functools.partial(send, "eu"), Mailer("eu")):
        with pytest.raises(ConfigurationError, match="pass action="):
            guard.guarded(key_arg="to")(made)
    eu = guard.guarded("mail-eu", key_arg="to")(Mailer("eu"))
    us = guard.guarded("mail-us", key_arg="to")(Mailer("us"))

    assert [eu("bob"), us("ann"), eu("bob")] == ["sent via eu", "sent via us", "sent via eu"]
    assert ledger.rows() == [("eu", "bob"), ("us", "ann")]


def test_a_callable_objects_attributes_do_not_hide_the_wrappers(
    guard: Guard, ledger: Ledger
) -> None:
    """A callable object whose attributes are named like the wrapper's methods (``call``,
    ``payload``, ``key``) is guarded and works: its state is not copied onto the wrapper."""

    class Poster:
        def __init__(self) -> None:
            self.payload = {"template": "x"}
            self.key = "secret"
            self.call = "not a method"

        def __call__(self, ref: str) -> str:
            ledger.append(ref)
            return "posted"

    post = guard.guarded("post", key_arg="ref")(Poster())

    assert [post("r-1"), post.call("r-2", "r-2"), post("r-1")] == ["posted"] * 3
    assert post.payload("r-3") == {}
    assert ledger.rows() == [("r-1", None), ("r-2", None)]


def test_no_usable_default_action_asks_for_one(guard: Guard) -> None:
    """A function whose name is no usable action (over 255 characters) is a
    ConfigurationError saying to pass ``action=``; with ``action=`` it is guarded."""

    def key_only(key: str) -> str:
        return key

    key_only.__qualname__ = "f" * 300
    with pytest.raises(ConfigurationError, match="pass action="):
        guard.guarded(key_arg="key")(key_only)
    assert guard.guarded(action="short", key_arg="key")(key_only).action == "short"


def test_async_callable_object_is_async(tmp_path: Path, ledger: Ledger) -> None:
    """An object whose ``__call__`` is ``async def`` is guarded by ``AsyncGuard.guarded``
    (awaited, run once) and refused by ``Guard.guarded``."""

    class Notifier:
        async def __call__(self, key: str) -> str:
            ledger.append(key)
            return "sent"

    with (
        Guard(tmp_path / "sync.db") as sync_guard,
        pytest.raises(ConfigurationError, match="is async; guard it with AsyncGuard"),
    ):
        sync_guard.guarded("notify", key_arg="key")(Notifier())

    async def main() -> list[str]:
        async with AsyncGuard(tmp_path / "async.db") as guard:
            notify = guard.guarded("notify", key_arg="key")(Notifier())
            return [await notify("k-1"), await notify("k-1")]

    assert asyncio.run(main()) == ["sent", "sent"]
    assert ledger.count() == 1


# -- methods through their class -----------------------------------------------------------------


def test_method_called_through_its_class_is_the_same_call(guard: Guard, ledger: Ledger) -> None:
    """``Svc.do(obj, k, v)`` and ``Base.do(self, ...)`` from a subclass key and run exactly
    like ``obj.do(k, v)``: the same request id and payload (without ``self``), one run."""

    class Svc:
        @guard.guarded(action="svc.do", key_arg="k")
        def do(self, k: str, v: int) -> int:
            ledger.append(k, str(v))
            return v * 10

    class Sub(Svc):
        def do2(self, k: str, v: int) -> int:
            return Svc.do(self, k, v)  # type: ignore[no-any-return]

    svc = Svc()
    assert [svc.do("a", 1), Svc.do(svc, "a", 1), Sub().do2("a", 1)] == [10, 10, 10]
    assert [Svc.do.call("b", svc, "b", 2), svc.do.call("b", "b", 2)] == [20, 20]
    assert Svc.do.payload(svc, "a", 1) == svc.do.payload("a", 1) == {"v": 1}
    assert Svc.do.request_id_for("a") == '"a"'
    assert ledger.rows() == [("a", "1"), ("b", "2")]
    receipt = guard.get('"a"')
    assert receipt is not None
    assert (receipt.status, receipt.action, receipt.payload) == (
        Status.SUCCEEDED,
        "svc.do",
        {"v": 1},
    )


def test_async_method_called_through_its_class(tmp_path: Path, ledger: Ledger) -> None:
    """The same for an ``async def`` method under ``AsyncGuard.guarded``."""

    async def main() -> list[int]:
        async with AsyncGuard(tmp_path / "guard.db") as guard:

            class Svc:
                @guard.guarded(action="svc.do", key_arg="k")
                async def do(self, k: str, v: int) -> int:
                    ledger.append(k, str(v))
                    return v * 10

            svc = Svc()
            results = [await svc.do("a", 1), await Svc.do(svc, "a", 1)]
            receipt = await guard.get('"a"')
            assert receipt is not None
            assert receipt.payload == {"v": 1}
            return results

    assert asyncio.run(main()) == [10, 10]
    assert ledger.count() == 1


def test_function_without_self_in_a_class_keeps_its_first_argument(
    guard: Guard, ledger: Ledger
) -> None:
    """A guarded function kept in a class body that takes no ``self``, called through the
    class, is the plain function: its first argument stays in the payload, so another
    title under the same key is refused as another request, not replayed."""

    class Tools:
        @guard.guarded(action="create", key_arg="k")
        def create(title: str, k: str) -> str:  # no self, on purpose
            ledger.append(k, title)
            return title

    assert Tools.create("A", k="1") == "A"
    with pytest.raises(FingerprintMismatchError):
        Tools.create("B", k="1")
    assert ledger.rows() == [("1", "A")]


# -- guarding what is already guarded ------------------------------------------------------------


def test_a_guarded_function_is_not_guarded_again(guard: Guard, ledger: Ledger) -> None:
    """Decorating a guarded function (directly, under ``functools.wraps``, or a guarded
    method) is refused: the inner guard would meet the outer one's claim on the same id."""

    @guard.guarded(action="send", key_arg="k")
    def send(k: str) -> str:
        ledger.append(k)
        return "sent"

    @functools.wraps(send)
    def logged(k: str) -> str:
        return send(k)  # type: ignore[no-any-return]

    class Mailer:
        @guard.guarded(action="mail", key_arg="k")
        def mail(self, k: str) -> str:
            return "never"

    for already in (send, logged, Mailer().mail, Mailer.mail):
        with pytest.raises(ConfigurationError, match="is already guarded"):
            guard.guarded(action="send", key_arg="k")(already)
    assert send("k-1") == "sent"
    assert ledger.count() == 1
