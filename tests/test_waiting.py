"""harness/waiting.py: a wait returns the condition's value as soon as it holds, and fails at the timeout naming
what it waited for."""

from __future__ import annotations

import asyncio
import time

import pytest

from harness.waiting import NotYet, eventually, wait_until


def test_wait_until_returns_the_first_truthy_value_without_waiting_out_the_timeout():
    calls = []

    def third_time() -> str:
        calls.append(None)
        return "done" if len(calls) == 3 else ""

    started = time.monotonic()
    assert wait_until(third_time, timeout_s=30, interval_s=0.01, what="a third call") == "done"
    assert len(calls) == 3 and time.monotonic() - started < 5


def test_wait_until_fails_at_the_timeout_naming_what_it_waited_for():
    started = time.monotonic()
    with pytest.raises(NotYet, match=r"timed out after 0\.1 s waiting for the moon"):
        wait_until(lambda: False, timeout_s=0.1, interval_s=0.01, what="the moon")
    assert time.monotonic() - started >= 0.1


def test_an_exception_from_the_condition_ends_the_wait_at_once():
    def exited() -> bool:
        raise RuntimeError("the process exited")

    with pytest.raises(RuntimeError, match="exited"):
        wait_until(exited, timeout_s=30)


async def test_eventually_lets_the_loop_run_and_takes_a_coroutine_condition():
    flag = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, flag.set)

    async def is_set() -> bool:
        return flag.is_set()

    assert await eventually(is_set, timeout_s=30, interval_s=0.01, what="the flag") is True
    assert await eventually(lambda: 7, timeout_s=30) == 7


async def test_eventually_fails_at_the_timeout_naming_what_it_waited_for():
    with pytest.raises(NotYet, match="waiting for the flag"):
        await eventually(lambda: 0, timeout_s=0.05, interval_s=0.01, what="the flag")
