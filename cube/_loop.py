"""Which event loop runs a service (shared by the agent and the proxy)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Final

__all__ = ["EVENT_LOOPS", "LoopUnavailable", "new_event_loop", "run_on"]

#: "auto" (uvloop when installed), "uvloop" or "asyncio".
EVENT_LOOPS: Final = ("auto", "uvloop", "asyncio")


class LoopUnavailable(RuntimeError):
    """The event loop asked for is not installed."""


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """uvloop (a C event loop, TLS included: much of a relay's per-request CPU is the loop's)
    when asked or, for "auto", when it is installed; else asyncio's."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise LoopUnavailable(
                    "event_loop uvloop was asked for but is not installed"
                ) from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_on(coro: Coroutine[Any, Any, None], choice: str) -> None:
    """Run ``coro`` to completion on a new loop of that choice (as ``asyncio.run``)."""
    try:
        loop = new_event_loop(choice)
    except LoopUnavailable:
        coro.close()
        raise
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.run(coro)
