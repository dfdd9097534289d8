"""The decorator form (``Guard.guarded``, ``AsyncGuard.guarded``): default action names,
methods called through their class, classmethods and staticmethods, guarding what is
already guarded, and pickling (a ``ProcessPoolExecutor`` included).

Side effects are counted in the effect ledger (``tests/conftest.py``), a SQLite file
separate from the guard's database.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import multiprocessing
import os
import pickle
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from safeagent import (
    AsyncGuard,
    ConfigurationError,
    FingerprintMismatchError,
    Guard,
    MemoryStore,
    Status,
)
from tests.conftest import Ledger

POOL_DB_ENV = "SAFEAGENT_TEST_POOL_DB"
"""The SQLite file :func:`refund` is guarded on in a process the pool test spawned: it
sets this before the pool starts, and each worker imports this module afresh. In the
test process itself (unset) the guard is in memory, and ``refund`` is never called."""

_pool_guard = Guard(os.environ[POOL_DB_ENV]) if POOL_DB_ENV in os.environ else Guard(MemoryStore())


@_pool_guard.guarded(key_arg="order_id", exclude=("ledger_path",))
def refund(order_id: str, amount: int, ledger_path: str) -> dict[str, int]:
    """A module-level guarded function (pickled by reference): one ledger row per run; the
    result names the process that ran it."""
    Ledger(ledger_path).append(order_id, str(amount))
    return {"amount": amount, "pid": os.getpid()}


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


def test_default_action_of_a_classmethod_or_staticmethod(guard: Guard) -> None:
    """Without ``action=``, a guarded classmethod or staticmethod is named after the
    function under it (``module.qualname``), as a method is."""

    class Tools:
        @guard.guarded(key_arg="k")
        @classmethod
        def make(cls, k: str) -> str:
            return k

        @guard.guarded(key_arg="k")
        @staticmethod
        def ping(k: str) -> str:
            return k

    assert Tools.make.action == f"{__name__}.{Tools.__qualname__}.make"
    assert Tools().ping.action == f"{__name__}.{Tools.__qualname__}.ping"


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


# -- classmethods and staticmethods -------------------------------------------------------------


def test_guarded_classmethod_is_keyed_without_cls(guard: Guard, ledger: Ledger) -> None:
    """``@guarded`` above ``@classmethod``: through the class, an instance or a subclass
    the call is bound to the class and keyed without ``cls`` (as a method without
    ``self``): one request id and payload, one run, the first receipt replayed."""

    class Svc:
        @guard.guarded(action="svc.make", key_arg="k")
        @classmethod
        def make(cls, k: str, v: int) -> str:
            ledger.append(k, cls.__name__)
            return f"{cls.__name__}:{v}"

    class Sub(Svc):
        pass

    assert [Svc.make("a", 1), Svc().make("a", 1), Sub.make("a", 1)] == ["Svc:1"] * 3
    assert [Svc.make.call("b", "b", 2), Sub().make.call("b", "b", 2)] == ["Svc:2"] * 2
    assert Svc.make.payload("a", 1) == Svc().make.payload("a", 1) == {"v": 1}
    assert ledger.rows() == [("a", "Svc"), ("b", "Svc")]
    receipt = guard.get(Svc.make.request_id_for("a"))
    assert receipt is not None
    assert (receipt.status, receipt.payload) == (Status.SUCCEEDED, {"v": 1})


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="3.13 classmethods skip __get__")
def test_classmethod_above_guarded_binds_the_class(guard: Guard, ledger: Ledger) -> None:
    """``@classmethod`` above ``@guarded`` (before Python 3.13, where a classmethod reads
    what it wraps through ``__get__``) keys and runs as ``@guarded`` above it."""

    class Svc:
        @classmethod
        @guard.guarded(action="svc.make", key_arg="k")
        def make(cls, k: str, v: int) -> str:
            ledger.append(k, cls.__name__)
            return f"{cls.__name__}:{v}"

    assert [Svc.make("a", 1), Svc().make("a", 1), Svc.make.call("a", "a", 1)] == ["Svc:1"] * 3
    assert Svc.make.payload("a", 1) == {"v": 1}
    assert ledger.rows() == [("a", "Svc")]


@pytest.mark.skipif(sys.version_info < (3, 13), reason="before 3.13 this order works")
def test_classmethod_above_guarded_is_refused_on_313(guard: Guard, ledger: Ledger) -> None:
    """On Python 3.13+ a classmethod passes ``cls`` to what it wraps as a plain argument
    (into the payload): a call through ``@classmethod`` above ``@guarded`` is a
    ConfigurationError saying to put ``@guarded`` above it; nothing runs."""

    class Svc:
        @classmethod
        @guard.guarded(action="svc.make", key_arg="k")
        def make(cls, k: str, v: int) -> str:
            ledger.append(k, cls.__name__)
            return f"{cls.__name__}:{v}"

    for call in (lambda: Svc.make("a", 1), lambda: Svc().make("a", 1)):
        with pytest.raises(ConfigurationError, match="put @guarded above @classmethod"):
            call()
    assert ledger.rows() == []


def test_guarded_staticmethod_is_the_same_through_an_instance(guard: Guard, ledger: Ledger) -> None:
    """A guarded staticmethod (``@guarded`` above or below ``@staticmethod``) called
    through an instance is the call through the class: the same request id and payload,
    all its arguments counted (there is no ``self``), one run, the receipt replayed."""

    class Tools:
        @guard.guarded(action="tools.inner", key_arg="k")
        @staticmethod
        def inner(k: str, v: int) -> int:
            ledger.append(k, "inner")
            return v * 10

        @staticmethod
        @guard.guarded(action="tools.outer", key_arg="k")
        def outer(k: str, v: int) -> int:
            ledger.append(k, "outer")
            return v * 10

    tools = Tools()
    assert [Tools.inner("a", 1), tools.inner("a", 1), tools.inner.call("a", "a", 1)] == [10] * 3
    assert [Tools.outer("b", 2), tools.outer("b", 2), tools.outer.call("b", "b", 2)] == [20] * 3
    assert tools.inner.payload("a", 1) == Tools.inner.payload("a", 1) == {"v": 1}
    with pytest.raises(FingerprintMismatchError):
        tools.inner("a", 2)
    assert ledger.rows() == [("a", "inner"), ("b", "outer")]


def test_async_guarded_classmethod_and_staticmethod(tmp_path: Path, ledger: Ledger) -> None:
    """``AsyncGuard.guarded`` takes a classmethod or staticmethod over an ``async def``
    (keyed as for sync ones, awaited, run once); ``Guard.guarded`` refuses it as async."""

    async def main() -> list[str]:
        async with AsyncGuard(tmp_path / "async.db") as guard:

            class Svc:
                @guard.guarded(action="svc.make", key_arg="k")
                @classmethod
                async def make(cls, k: str) -> str:
                    ledger.append(k, "make")
                    return cls.__name__

                @guard.guarded(action="svc.ping", key_arg="k")
                @staticmethod
                async def ping(k: str) -> str:
                    ledger.append(k, "ping")
                    return "pong"

            svc = Svc()
            return [
                await Svc.make("a"),
                await svc.make("a"),
                await svc.ping("b"),
                await Svc.ping("b"),
            ]

    assert asyncio.run(main()) == ["Svc", "Svc", "pong", "pong"]
    assert ledger.rows() == [("a", "make"), ("b", "ping")]

    async def handler(k: str) -> str:
        return k

    with Guard(tmp_path / "sync.db") as sync_guard:
        for method in (classmethod(handler), staticmethod(handler)):
            with pytest.raises(ConfigurationError, match="is async; guard it with AsyncGuard"):
                sync_guard.guarded(action="h", key_arg="k")(method)  # type: ignore[arg-type]


def test_what_is_not_callable_is_refused(guard: Guard) -> None:
    """Guarding what is not callable (a ``property``, or a classmethod over one) is a
    ConfigurationError, not a TypeError from inside ``inspect``."""
    prop = property(lambda _self: 1)
    for made in (prop, classmethod(prop)):  # type: ignore[var-annotated]
        with pytest.raises(ConfigurationError, match="is not callable"):
            guard.guarded(action="p")(made)  # type: ignore[arg-type]


# -- pickling and copying ------------------------------------------------------------------------


def test_module_level_guarded_function_pickles_by_reference() -> None:
    """A module-level guarded function pickles by name, as a function does: unpickled it
    is the same object, in every protocol; ``copy.copy`` and ``copy.deepcopy`` (of it or
    of a structure holding it) give it back, its guard shared, never copied."""
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(refund, protocol)) is refund
    assert copy.copy(refund) is refund
    assert copy.deepcopy(refund) is refund
    assert copy.deepcopy({"tools": [refund]})["tools"][0] is refund


def test_what_has_no_module_level_name_does_not_pickle(guard: Guard, ledger: Ledger) -> None:
    """A guarded local function or lambda fails to pickle with pickle's own error naming
    it a local object, and a guarded callable object with a PicklingError saying only a
    guarded function pickles; copying each gives it back, still working."""

    @guard.guarded(action="local", key_arg="k")
    def local(k: str) -> str:
        ledger.append(k)
        return k

    class Poster:
        def __call__(self, k: str) -> str:
            return k

    by_lambda = guard.guarded(action="lambda", key_arg="k")(lambda k: k)
    for made in (local, by_lambda):
        with pytest.raises((pickle.PicklingError, AttributeError), match="local object"):
            pickle.dumps(made)
    with pytest.raises(pickle.PicklingError, match="only a guarded function pickles"):
        pickle.dumps(guard.guarded(action="post", key_arg="k")(Poster()))
    assert copy.copy(local) is local
    assert [copy.deepcopy(local)("k-1"), local("k-1")] == ["k-1", "k-1"]
    assert ledger.count() == 1


@pytest.mark.slow
def test_a_guarded_function_runs_once_across_a_process_pool(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module-level guarded function submitted to a ``ProcessPoolExecutor`` (spawn) is
    pickled by reference; each worker imports this module, whose guard opens the same
    SQLite file, so a second worker process replays the receipt the first one stored:
    the first worker's result, one ledger row, one durable receipt."""
    db = tmp_path / "pool.db"
    monkeypatch.setenv(POOL_DB_ENV, str(db))
    runs = []
    for _ in range(2):  # two pools: one worker process after another
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pid = pool.submit(os.getpid).result(timeout=120)
            runs.append((pid, pool.submit(refund, "o-1", 5, ledger.path).result(timeout=120)))

    (first_pid, first), (second_pid, second) = runs
    assert first_pid != second_pid
    assert first == second == {"amount": 5, "pid": first_pid}
    assert ledger.rows() == [("o-1", "5")]
    with Guard(db) as guard:
        receipt = guard.get(refund.request_id_for("o-1"))
    assert receipt is not None
    assert (receipt.status, receipt.action, receipt.payload) == (
        Status.SUCCEEDED,
        f"{__name__}.refund",
        {"amount": 5},
    )


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
