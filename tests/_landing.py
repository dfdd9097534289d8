"""Landing a signal handler's effect at an exact point: where CPython runs a Python signal
handler after a C call returns, before the next bytecode. ``sys.setprofile`` sees that
moment as a ``c_return`` event; :func:`at_c_return` runs an action there once, as a handler
landing there would (raising KeyboardInterrupt, or calling the store again)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


@contextmanager
def at_c_return(
    function: str | None,
    call: str,
    action: Callable[[FrameType, Any], None],
    when: Callable[[FrameType, Any], bool] | None = None,
) -> Iterator[list[str]]:
    """While the block runs, once: when a C callable named ``call`` returns in a frame of
    the function named ``function`` (any function if None) and ``when(frame, callable)``
    holds, stop profiling and run ``action(frame, callable)``; what it raises reaches the
    code there. Yields a list the function's name is added to when it fired."""
    fired: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if (
            event == "c_return"
            and getattr(arg, "__name__", "") == call
            and (function is None or frame.f_code.co_name == function)
            and (when is None or when(frame, arg))
        ):
            sys.setprofile(None)
            fired.append(frame.f_code.co_name)
            action(frame, arg)

    sys.setprofile(profile)
    try:
        yield fired
    finally:
        sys.setprofile(None)


def interrupt(_frame: FrameType, _callable: Any) -> None:
    """The action of a Ctrl-C landing there."""
    raise KeyboardInterrupt
