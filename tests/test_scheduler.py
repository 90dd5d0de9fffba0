"""The scheduler's coalescing, in the fast tier: a recording sender stands in for Triton.

The sender answers each row with its own first input value, so every test can check that each request got
its own rows back from a shared call. The real Triton path is covered by the end-to-end tests
(test_batching_e2e counts the encoder's executions; test_faults_e2e kills and stalls Triton under load).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.core.deadline import Deadline
from gateway.core.errors import ErrorKind, ServiceError
from gateway.core.scheduler import PRIORITY_NICE, PRIORITY_NORMAL, Chunk, Lane, Scheduler
from gateway.triton.pool import TritonPool
from gateway.triton.supervisor import TritonHealth


def lane(priority: int = PRIORITY_NORMAL, width: int = 1, max_rows: int = 64, ensemble: str = "model-ids") -> Lane:
    return Lane(ensemble, "EMBEDDING", priority, max_rows, (width,))


def chunk(values: list[int], on: Lane | None = None, request_id: str = "") -> Chunk:
    on = on or lane()
    data = np.repeat(np.array(values, dtype=np.int64)[:, None], on.row_shape[0], axis=1)
    return Chunk(on, data, request_id=request_id)


class RecordingTriton:
    """Holds each call until the test releases it (or all of them, with `open`), and records what it carried."""

    url = "recording"

    def __init__(self):
        self.calls: list[tuple[Lane, list[int], str]] = []
        self.gates: list[asyncio.Event] = []
        self.open = False
        self.cancelled = 0
        self.error: ServiceError | None = None

    def release(self, index: int) -> None:
        self.gates[index].set()

    def release_all(self) -> None:
        self.open = True
        for gate in self.gates:
            gate.set()

    async def send(self, on: Lane, data: np.ndarray, timeout_s: float, request_id: str):
        self.calls.append((on, data[:, 0].tolist(), request_id))
        gate = asyncio.Event()
        if self.open:
            gate.set()
        self.gates.append(gate)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return data[:, :1].astype(np.float32), np.full(len(data), data.shape[1], dtype=np.int32)


def scheduler_for(triton: RecordingTriton, calls_per_lane: int = 1, rows_in_flight: int = 128) -> Scheduler:
    health = TritonHealth(triton)
    pool = TritonPool([])
    pool.adopt(health)
    health.set(True)
    return Scheduler(
        pool, triton.send, max_pending_texts=10_000, max_rows_in_flight=rows_in_flight, max_calls_per_lane=calls_per_lane
    )


def values_of(answer: tuple[np.ndarray, np.ndarray]) -> list[float]:
    values, _ = answer
    return [float(v) for v in values[:, 0]]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_arriving_while_a_call_is_in_flight_share_the_next_call_and_each_gets_its_own_rows():
    triton = RecordingTriton()
    scheduler = scheduler_for(triton, calls_per_lane=1)
    deadline = Deadline.within(5)
    first = asyncio.create_task(scheduler.run([chunk([100])], deadline))
    await settle()
    rest = [asyncio.create_task(scheduler.run([chunk([i], request_id=f"r{i}")], deadline)) for i in range(9)]
    await settle()
    assert [rows for _, rows, _ in triton.calls] == [[100]]  # the rest wait for the lane, no second call yet

    triton.release_all()
    assert values_of(await first) == [100.0]
    assert [values_of(await task) for task in rest] == [[float(i)] for i in range(9)]
    assert [rows for _, rows, _ in triton.calls] == [[100], list(range(9))]
    assert triton.calls[1][2] == ",".join(f"r{i}" for i in range(9))  # Triton's request id names every request
    assert scheduler.rows_in_flight == 0 and scheduler.pending_texts == 0


async def test_an_idle_lane_sends_at_once_and_calls_per_lane_bounds_the_calls_in_flight():
    triton = RecordingTriton()
    scheduler = scheduler_for(triton, calls_per_lane=2)
    tasks = [asyncio.create_task(scheduler.run([chunk([i])], Deadline.within(5))) for i in range(5)]
    await settle()
    # Each request ran _dispatch as it arrived: two went alone, the other three wait for a call to return.
    assert [rows for _, rows, _ in triton.calls] == [[0], [1]]
    triton.release_all()
    await asyncio.gather(*tasks)
    assert [rows for _, rows, _ in triton.calls] == [[0], [1], [2, 3, 4]]


async def test_lanes_do_not_mix_and_no_call_exceeds_the_lanes_rows():
    triton = RecordingTriton()
    scheduler = scheduler_for(triton, calls_per_lane=1, rows_in_flight=1000)
    blocker = asyncio.create_task(scheduler.run([chunk([0], lane(width=3))], Deadline.within(5)))
    other_blocker = asyncio.create_task(scheduler.run([chunk([0], lane(width=5))], Deadline.within(5)))
    await settle()
    narrow = [
        asyncio.create_task(scheduler.run([chunk(list(range(i, i + 30)), lane(width=3))], Deadline.within(5)))
        for i in (1, 31, 61)
    ]
    wide = asyncio.create_task(scheduler.run([chunk([7, 8], lane(width=5))], Deadline.within(5)))
    await settle()
    triton.release_all()
    await asyncio.gather(blocker, other_blocker, *narrow, wide)
    by_width: dict[int, list[list[int]]] = {}
    for on, rows, _ in triton.calls:
        by_width.setdefault(on.row_shape[0], []).append(rows)
    assert by_width[5] == [[0], [7, 8]]
    assert by_width[3][0] == [0]
    assert all(len(rows) <= 64 for rows in by_width[3])
    assert sorted(v for rows in by_width[3][1:] for v in rows) == list(range(1, 91))
    assert len(by_width[3]) == 3  # 90 rows of 30-row chunks: 60 in one call, 30 in the next


async def test_a_request_that_gives_up_leaves_the_shared_call_running_for_the_others():
    triton = RecordingTriton()
    scheduler = scheduler_for(triton, calls_per_lane=1)
    blocker = asyncio.create_task(scheduler.run([chunk([0])], Deadline.within(5)))
    await settle()
    leaving = asyncio.create_task(scheduler.run([chunk([1])], Deadline.within(5)))
    staying = asyncio.create_task(scheduler.run([chunk([2])], Deadline.within(5)))
    hurried = asyncio.create_task(scheduler.run([chunk([3])], Deadline.within(0.05)))
    await settle()
    triton.release(0)
    await blocker
    await settle()
    assert triton.calls[-1][1] == [1, 2, 3]  # one shared call, now held

    leaving.cancel()
    with pytest.raises(ServiceError) as timed_out:
        await hurried
    assert timed_out.value.kind is ErrorKind.DEADLINE_EXCEEDED
    assert triton.cancelled == 0
    triton.release(1)
    assert values_of(await staying) == [2.0]
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert scheduler.rows_in_flight == 0 and scheduler.pending_texts == 0


async def test_a_call_nobody_waits_for_is_cancelled():
    triton = RecordingTriton()
    scheduler = scheduler_for(triton, calls_per_lane=1)
    tasks = [asyncio.create_task(scheduler.run([chunk([i])], Deadline.within(5))) for i in range(2)]
    await settle()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await settle()
    assert triton.cancelled == 1  # the first call; the second request's chunk was never sent
    assert len(triton.calls) == 1
    assert scheduler.rows_in_flight == 0 and scheduler.pending_texts == 0


async def test_a_failed_call_fails_every_request_in_it_and_the_lane_carries_on():
    triton = RecordingTriton()
    scheduler = scheduler_for(triton, calls_per_lane=1)
    blocker = asyncio.create_task(scheduler.run([chunk([0])], Deadline.within(5)))
    await settle()
    shared = [asyncio.create_task(scheduler.run([chunk([i])], Deadline.within(5))) for i in (1, 2)]
    await settle()
    triton.error = ServiceError(ErrorKind.BACKEND, "refused")
    triton.release_all()
    for task in [blocker, *shared]:
        with pytest.raises(ServiceError):
            await task
    triton.error = None
    assert values_of(await scheduler.run([chunk([5])], Deadline.within(5))) == [5.0]


async def test_nice_requests_wait_while_normal_ones_queue_for_their_lane():
    triton = RecordingTriton()
    scheduler = scheduler_for(triton, calls_per_lane=1)
    normal, nice = lane(PRIORITY_NORMAL), lane(PRIORITY_NICE)
    blocker = asyncio.create_task(scheduler.run([chunk([0], normal)], Deadline.within(5), PRIORITY_NORMAL))
    await settle()
    queued = asyncio.create_task(scheduler.run([chunk([1], normal)], Deadline.within(5), PRIORITY_NORMAL))
    late = asyncio.create_task(scheduler.run([chunk([2], nice)], Deadline.within(5), PRIORITY_NICE))
    await settle()
    assert [rows for _, rows, _ in triton.calls] == [[0]]  # the nice lane is free, but normal traffic waits
    triton.release_all()
    await asyncio.gather(blocker, queued, late)
    assert [(on.priority, rows) for on, rows, _ in triton.calls] == [(1, [0]), (1, [1]), (2, [2])]
