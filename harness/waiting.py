"""Waiting for a condition rather than sleeping a guessed time, where a test waits for background work: usage
written to a store, a log line written, a request under way, a gateway that has noticed its Triton left.

Both return as soon as the condition holds and fail at the timeout naming what they waited for. The timeout only
bounds a failure, so it can be generous: a loaded 2-core machine is slow, and a passing run never waits it out.
An exception from the condition ends the wait at once, so a condition can fail fast (a process it waits for exited).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class NotYet(AssertionError):
    """A condition that did not hold within its timeout."""


def _timed_out(what: str, timeout_s: float) -> NotYet:
    return NotYet(f"timed out after {timeout_s:g} s waiting for {what}")


def wait_until(condition: Callable[[], T], timeout_s: float, interval_s: float = 0.02, what: str = "the condition") -> T:
    """The first truthy value of condition(), called every interval_s; NotYet once timeout_s has passed without one."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout_s)
        time.sleep(interval_s)


async def eventually(
    condition: Callable[[], T | Awaitable[T]], timeout_s: float, interval_s: float = 0.02, what: str = "the condition"
) -> T:
    """wait_until for a coroutine: the event loop runs on between the calls, and condition may be a coroutine function."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout_s)
        await asyncio.sleep(interval_s)
