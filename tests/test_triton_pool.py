"""The pool of Tritons in the fast tier: stand-in clients whose readiness and answers the test sets.

The real thing (two Triton processes, one killed under load) is tests/test_scale_out_e2e.py.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from gateway.core.deadline import Deadline
from gateway.core.errors import ErrorKind, ServiceError
from gateway.core.scheduler import Chunk, Lane, Scheduler
from gateway.triton import pool as triton_pool
from gateway.triton.pool import Target, TritonPool, parse_targets

LANE = Lane("model", "EMBEDDING", 1, 32, (1,))


class StandInTriton:
    """Answers each row with its own index in this Triton's `tag`; `ready`, `fail` and `gate` steer it."""

    def __init__(self, url: str, tag: float):
        self.url = url
        self.tag = tag
        self.ready = True
        self.fail = False
        self.gate: asyncio.Event | None = None
        self.rows = 0
        self.timeouts: list[float] = []
        self.closed = False

    async def server_ready(self, timeout_s: float) -> bool:
        return self.ready

    async def infer(self, lane, data, timeout_s, request_id):
        self.timeouts.append(timeout_s)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ServiceError(ErrorKind.UNAVAILABLE, "connection reset")
        self.rows += len(data)
        return np.full((len(data), 1), self.tag, np.float32), np.ones(len(data), np.int64)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def tritons(monkeypatch) -> dict[str, StandInTriton]:
    """Every client the pool creates, by address; the address's last octet tags its answers."""
    made: dict[str, StandInTriton] = {}

    def client(url: str) -> StandInTriton:
        made[url] = StandInTriton(url, float(url.split(":")[0].split(".")[-1]))
        return made[url]

    monkeypatch.setattr(triton_pool, "TritonClient", client)
    return made


def resolving(monkeypatch, answers: dict[str, list[str]]) -> None:
    async def resolve(target: Target) -> list[str]:
        if target.is_address:
            return [f"{target.host}:{target.port}"]
        if target.host not in answers:
            raise OSError("Name or service not known")
        return [f"{address}:{target.port}" for address in answers[target.host]]

    monkeypatch.setattr(triton_pool, "resolve", resolve)


def test_targets_are_host_port_lists_and_anything_else_is_refused():
    assert parse_targets("a:8001, 10.0.0.2:9001,[::1]:8001") == [
        Target("a", 8001),
        Target("10.0.0.2", 9001),
        Target("[::1]", 8001),
    ]
    for bad in ("", " , ", "a", "a:", ":8001", "a:port", "a:70000", "a:8001,b"):
        with pytest.raises(ValueError, match="--triton-url"):
            parse_targets(bad)


async def test_a_real_name_resolves_to_its_addresses_once_each():
    assert await triton_pool.resolve(Target("localhost", 8001)) == ["127.0.0.1:8001"]
    assert await triton_pool.resolve(Target("10.1.2.3", 8001)) == ["10.1.2.3:8001"]


async def test_calls_go_to_the_least_loaded_ready_triton(tritons, monkeypatch):
    pool = await TritonPool.connect("10.0.0.1:8001,10.0.0.2:8001")
    assert pool.ready_count == 2
    for triton in tritons.values():
        triton.gate = asyncio.Event()
    busy = asyncio.create_task(pool.infer(LANE, np.zeros((30, 1)), 1.0, "r"))
    await asyncio.sleep(0)
    (loaded,) = [e for e in pool.endpoints.values() if e.rows_in_flight == 30]
    (other,) = [tritons[url] for url in pool.endpoints if url != loaded.url]
    other.gate.set()
    # While 30 rows wait on one, every call goes to the other, whatever the round-robin turn.
    answers = [await pool.infer(LANE, np.zeros((1, 1)), 1.0, "r") for _ in range(4)]
    assert [float(values[0, 0]) for values, _ in answers] == [other.tag] * 4
    tritons[loaded.url].gate.set()
    await busy
    # Idle again: ties go round, so both get calls.
    tags = {float((await pool.infer(LANE, np.zeros((1, 1)), 1.0, "r"))[0][0, 0]) for _ in range(4)}
    assert tags == {1.0, 2.0}


async def test_a_failed_call_takes_its_triton_out_until_it_answers_ready_again(tritons):
    pool = await TritonPool.connect("10.0.0.1:8001,10.0.0.2:8001")
    dead = tritons["10.0.0.1:8001"]
    dead.fail, dead.ready = True, False
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(float((await pool.infer(LANE, np.zeros((1, 1)), 1.0, "r"))[0][0, 0]))
        except ServiceError as error:
            outcomes.append(error.kind)
    # At most one call meets the dead Triton; the rest go to the live one.
    assert outcomes.count(ErrorKind.UNAVAILABLE) <= 1 and outcomes.count(2.0) >= 3
    assert pool.ready_count == 1 and "connection reset" in pool.endpoints["10.0.0.1:8001"].health.reason
    dead.fail, dead.ready = False, True
    await pool.check()
    assert pool.ready_count == 2


async def test_the_scheduler_retries_a_call_that_met_a_dying_triton_on_another(tritons):
    pool = await TritonPool.connect("10.0.0.1:8001,10.0.0.2:8001")
    tritons["10.0.0.1:8001"].fail = True
    scheduler = Scheduler(pool, pool.infer, max_pending_texts=1000, max_rows_in_flight=128, max_calls_per_lane=4)
    for _ in range(6):
        values, _ = await scheduler.run([Chunk(LANE, np.zeros((3, 1)))], Deadline.within(2.0))
        assert values[:, 0].tolist() == [2.0] * 3


async def test_with_no_triton_ready_the_pool_answers_unavailable_at_once(tritons):
    pool = await TritonPool.connect("10.0.0.1:8001")
    tritons["10.0.0.1:8001"].ready = False
    await pool.check()
    with pytest.raises(ServiceError) as raised:
        await pool.infer(LANE, np.zeros((1, 1)), 5.0, "r")
    assert raised.value.kind is ErrorKind.UNAVAILABLE and "10.0.0.1:8001" in raised.value.message
    assert tritons["10.0.0.1:8001"].timeouts == []


async def test_with_no_triton_ready_a_call_waits_for_one_until_its_deadline(tritons):
    """The scheduler's one retry policy: it waits for readiness instead of spinning, and is answered at its deadline."""
    pool = await TritonPool.connect("10.0.0.1:8001")
    triton = tritons["10.0.0.1:8001"]
    triton.ready = False
    await pool.check()
    assert not pool.ready and "10.0.0.1:8001" in pool.reason
    scheduler = Scheduler(pool, pool.infer, max_pending_texts=1000, max_rows_in_flight=128, max_calls_per_lane=4)
    # None comes: the call is answered at its deadline, as a call to a stalled Triton is.
    started = time.monotonic()
    with pytest.raises(ServiceError) as raised:
        await scheduler.run([Chunk(LANE, np.zeros((1, 1)))], Deadline.within(0.2))
    assert raised.value.kind is ErrorKind.DEADLINE_EXCEEDED and 0.19 <= time.monotonic() - started < 0.5
    assert triton.timeouts == []
    # One comes: the waiting call goes to it at once, with what is left of its time.
    call = asyncio.create_task(scheduler.run([Chunk(LANE, np.zeros((1, 1)))], Deadline.within(5.0)))
    await asyncio.sleep(0.1)
    assert not call.done() and triton.timeouts == []
    triton.ready = True
    await pool.check()
    values, _ = await call
    assert values[0, 0] == 1.0 and 4.0 < triton.timeouts[-1] < 4.95


async def test_the_scheduler_limits_grow_with_the_tritons_ready(tritons):
    pool = await TritonPool.connect("10.0.0.1:8001,10.0.0.2:8001,10.0.0.3:8001")
    for triton in tritons.values():
        triton.gate = asyncio.Event()
    scheduler = Scheduler(pool, pool.infer, max_pending_texts=1000, max_rows_in_flight=128, max_calls_per_lane=1)
    jobs = [asyncio.create_task(scheduler.run([Chunk(LANE, np.zeros((1, 1)))], Deadline.within(5.0))) for _ in range(5)]
    await asyncio.sleep(0.01)
    # One call per lane and Triton: three in flight, one at each Triton.
    assert sorted(e.rows_in_flight for e in pool.endpoints.values()) == [1, 1, 1]
    for triton in tritons.values():
        triton.gate.set()
    await asyncio.gather(*jobs)


async def test_a_name_is_resolved_again_and_tritons_join_and_retire(tritons, monkeypatch):
    answers = {"triton.svc": ["10.0.0.1", "10.0.0.2"]}
    resolving(monkeypatch, answers)
    pool = await TritonPool.connect("triton.svc:8001")
    assert sorted(pool.endpoints) == ["10.0.0.1:8001", "10.0.0.2:8001"]
    answers["triton.svc"] = ["10.0.0.2", "10.0.0.3"]
    await pool.refresh_addresses()
    assert sorted(pool.endpoints) == ["10.0.0.2:8001", "10.0.0.3:8001"]
    # A newcomer is unready until checked; the one that left is closed, having nothing in flight.
    assert not pool.endpoints["10.0.0.3:8001"].health.ready and tritons["10.0.0.1:8001"].closed
    await pool.check()
    assert pool.ready_count == 2
    # DNS down: the Tritons known stay.
    del answers["triton.svc"]
    await pool.refresh_addresses()
    assert sorted(pool.endpoints) == ["10.0.0.2:8001", "10.0.0.3:8001"]


async def test_a_retired_triton_is_closed_only_after_its_calls_in_flight_are_answered(tritons, monkeypatch):
    answers = {"triton.svc": ["10.0.0.1"]}
    resolving(monkeypatch, answers)
    pool = await TritonPool.connect("triton.svc:8001")
    leaving = tritons["10.0.0.1:8001"]
    leaving.gate = asyncio.Event()
    call = asyncio.create_task(pool.infer(LANE, np.zeros((2, 1)), 1.0, "r"))
    await asyncio.sleep(0)
    answers["triton.svc"] = ["10.0.0.9"]
    await pool.refresh_addresses()
    assert not leaving.closed
    leaving.gate.set()
    values, _ = await call
    assert values[:, 0].tolist() == [1.0, 1.0]
    await pool.refresh_addresses()
    assert leaving.closed
