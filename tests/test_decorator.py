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


def test_default_action_of_a_partial_and_a_callable_object(guard: Guard, ledger: Ledger) -> None:
    """Without ``action=``, a ``functools.partial`` is named after its function and a
    callable object after its class (``module.qualname``); each call runs once and is
    recorded under that action."""

    def charge(customer: str, amount: int) -> int:
        ledger.append(customer, str(amount))
        return amount

    class Charger:
        def __call__(self, customer: str, amount: int) -> int:
            ledger.append(customer, str(amount))
            return amount

    by_partial = guard.guarded(key_arg="customer")(functools.partial(charge, amount=5))
    by_object = guard.guarded(key_arg="customer")(Charger())

    assert by_partial.action == f"{__name__}.{charge.__qualname__}"
    assert by_object.action == f"{__name__}.{Charger.__qualname__}"
    assert [by_partial("c-1"), by_partial("c-1"), by_object("c-2", 7), by_object("c-2", 7)] == [
        5,
        5,
        7,
        7,
    ]
    assert ledger.rows() == [("c-1", "5"), ("c-2", "7")]
    first, second = guard.get('"c-1"'), guard.get('"c-2"')
    assert first is not None
    assert second is not None
    assert (first.action, first.payload) == (by_partial.action, {"amount": 5})
    assert (second.action, second.payload) == (by_object.action, {"amount": 7})


def test_no_usable_default_action_asks_for_one(guard: Guard) -> None:
    """A callable whose class name is no usable action (over 255 characters) is a
    ConfigurationError saying to pass ``action=``; with ``action=`` it is guarded."""
    too_long = type("C" * 300, (), {"__call__": lambda self, key: key})()

    with pytest.raises(ConfigurationError, match="pass action="):
        guard.guarded(key_arg="key")(too_long)
    assert guard.guarded(action="short", key_arg="key")(too_long).action == "short"


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
        sync_guard.guarded(key_arg="key")(Notifier())

    async def main() -> list[str]:
        async with AsyncGuard(tmp_path / "async.db") as guard:
            notify = guard.guarded(key_arg="key")(Notifier())
            assert notify.action == f"{__name__}.{Notifier.__qualname__}"
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
