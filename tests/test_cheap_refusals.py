"""Refusing must cost far less than serving, in the fast tier: under a backlog, a request whose deadline the backlog
cannot meet is refused before its body is even read, and admission costs the same however many requests wait (it
sums rows by request size, kept in step with the queues, instead of walking the queues). The real processes under
a retry storm: tests/test_refusal_floods_e2e.py and bench/retry_storm.py."""

from __future__ import annotations

import asyncio
import json
import random
import time

import numpy as np
import pytest

from gateway.core.chunking import text_chunks
from gateway.core.deadline import Deadline
from gateway.core.scheduler import PRIORITY_NICE, PRIORITY_NORMAL, Chunk, Lane
from tests.http_harness import Gateway
from tests.test_scheduler import RecordingTriton, scheduler_for

LANE = Lane("model", "EMBEDDING", PRIORITY_NORMAL, 32, (1,))


def chunks(rows: int, lane: Lane = LANE) -> list[Chunk]:
    data = np.array([[b"text"]] * rows, dtype=np.object_)
    return [Chunk(lane, data[i : i + lane.max_rows]) for i in range(0, rows, lane.max_rows)]


def brute_force_rows_ahead(scheduler, rows: int) -> int:
    """What admission summed before: every queued job walked, on every arrival."""
    queued = sum(job.rows_unsent for queue in scheduler._queues.values() for job in queue if job.rows_unsent <= rows)
    return scheduler.rows_in_flight + queued + rows


async def test_rows_ahead_stays_in_step_with_the_queues_through_dispatch_and_departures():
    triton = RecordingTriton()
    scheduler = scheduler_for(triton, calls_per_lane=2, rows_in_flight=64)
    rng = random.Random(7)
    nice = Lane("model", "EMBEDDING", PRIORITY_NICE, 32, (1,))
    running: list[asyncio.Task] = []
    for step in range(300):
        action = rng.random()
        if action < 0.6:
            rows = rng.choice([1, 1, 2, 5, 31, 32, 33, 70, 200])
            lane, priority = (nice, PRIORITY_NICE) if rng.random() < 0.2 else (LANE, PRIORITY_NORMAL)
            running.append(asyncio.create_task(scheduler.run(chunks(rows, lane), Deadline.within(60), priority)))
        elif action < 0.8 and running:
            running.pop(rng.randrange(len(running))).cancel()  # a client that leaves, queued or in flight
        elif triton.gates:
            triton.release(rng.randrange(len(triton.gates)))
        for _ in range(3):
            await asyncio.sleep(0)
        for rows in (1, 2, 32, 100, 10_000):
            assert scheduler._rows_ahead(rows) == brute_force_rows_ahead(scheduler, rows), f"step {step}, {rows} rows"
    triton.release_all()
    await asyncio.gather(*running, return_exceptions=True)
    assert scheduler._unsent == {} and scheduler.pending_texts == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"input": "a text"}),
        ("/semantic_embed", {"prompt": "a text", "representation": "symmetric"}),
        ("/embed", {"prompt": "a text", "layers": [-1], "pooling": ["mean"]}),
    ],
)
async def test_a_request_the_backlog_cannot_serve_in_time_is_refused_before_its_body_is_read(models, path, body):
    gateway = Gateway(models)
    gateway.triton.stall()  # Triton busy: what is sent stays in flight, the rest queues
    scheduler = gateway.scheduler
    now = time.monotonic()
    scheduler.meter.busy_from(now - 1.0)
    scheduler.meter.completed(400, now)  # measured: 400 rows a second
    one_text = text_chunks(gateway.model.embedding.text, ["text"], [0], 32, PRIORITY_NORMAL, "EMBEDDING")
    backlog = [asyncio.create_task(scheduler.run(one_text, Deadline.within(60))) for _ in range(600)]
    await asyncio.sleep(0)
    assert scheduler.pending_texts == 600

    body = json.dumps({"model": gateway.model.name, **body}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-Timeout: 1\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    connection = gateway.connect()
    connection.send(head)  # and not one byte of the body
    response = await connection.response()
    assert response.status == 429
    assert int(response.headers["retry-after"]) >= 1
    assert scheduler.pending_texts == 600  # nothing was admitted

    # The same request with a deadline the backlog can meet is read and queued: the refusal was about the deadline.
    patient = gateway.connect()
    patient.send(head.replace(b"X-Request-Timeout: 1", b"X-Request-Timeout: 20") + body)
    async with asyncio.timeout(5):
        while scheduler.pending_texts == 600:
            await asyncio.sleep(0)
    for task in backlog:
        task.cancel()
    await asyncio.gather(*backlog, return_exceptions=True)
    connection.close()
    patient.close()
