"""Every request's life from admission to answer: admission by work, fair dispatch, deadline, retry, cancellation.

A request arrives as chunks (at most a few dozen rows each, see gateway.triton_client). Triton's queue is kept
short: at most max_rows_in_flight rows are sent at once, and the next chunk comes from the request with the
fewest rows left to send (normal traffic before `nice`; ties in arrival order). A one-text request therefore
waits for the rows in flight, not behind another client's 2048 texts, and big requests finish one after the
other instead of all progressing together and all missing their deadlines together, as a round robin would
under overload. A request that gives up (deadline, disconnect, cancelled call) drops its chunks not yet sent.

Admission follows the same order: a request of n rows is served after the rows in flight and the requests
with at most n rows left, so it is refused, with 429 and a Retry-After from the measured throughput, when
those could not be served before its deadline. A one-text request is admitted behind any number of big
ones. A hard limit on texts admitted and not yet answered bounds memory.

A chunk that meets an unavailable Triton (down, restarting, a dead stub) is retried until its request's
deadline: an embedding is idempotent, so a restart within the deadline costs the caller only time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from gateway import request_context
from gateway.deadline import Deadline
from gateway.errors import ErrorKind, ServiceError
from gateway.request_context import RequestContext
from gateway.supervisor import TritonHealth

log = logging.getLogger("gateway.scheduler")

# Triton's dynamic batcher serves lower numbers first; level 1 is normal traffic, 2 is `nice`.
PRIORITY_NORMAL = 1
PRIORITY_NICE = 2
# Until the throughput is measured (half a second of busy time), admit only this many rows ahead of a request:
# a few seconds of work on the slowest CPU this runs on, so a cold start cannot admit minutes of it.
COLD_START_ROWS = 2048
# The throughput estimate moves with the mix of text lengths; a request admitted on the edge of its deadline
# would be computed and then thrown away, so admission keeps this much room.
ESTIMATE_MARGIN = 1.25
# A Triton unready for longer than this is not restarting (measured: 6-9 s from kill -9 to serving on 2 cores):
# new requests are then answered 503 at once instead of waiting out their deadline; accepted ones still retry.
RECOVERY_S = 15.0


@dataclass(frozen=True)
class Chunk:
    """One Triton call of a request: `rows` input rows, sent by `send(timeout_s)`."""

    rows: int
    send: Callable[[float], Awaitable[Any]]


@dataclass(eq=False)
class _Job:
    chunks: list[Chunk]
    deadline: Deadline
    texts: int
    done: asyncio.Future
    next_chunk: int = 0
    results: list = field(default_factory=list)
    unanswered: int = 0
    rows_unsent: int = 0
    arrival: int = 0
    tasks: set = field(default_factory=set)
    # The request's context, to which the job adds its time waiting here and its time in Triton.
    context: RequestContext | None = None
    submitted: float = 0.0
    first_sent: float | None = None

    @property
    def has_pending(self) -> bool:
        return self.next_chunk < len(self.chunks)


def _timed(job: _Job) -> None:
    """Splits a finished job's time into waiting in this queue and being served by Triton, for metrics and logs."""
    if job.context is None:
        return
    now = time.monotonic()
    sent = job.first_sent if job.first_sent is not None else now
    job.context.queue_s += sent - job.submitted
    job.context.triton_s += now - sent


class ThroughputMeter:
    """Rows per second while busy, decayed over about `horizon_s` of busy time; idle time does not count."""

    def __init__(self, horizon_s: float = 10.0):
        self.horizon_s = horizon_s
        self._rows = 0.0
        self._busy_s = 0.0
        self._since = time.monotonic()

    def busy_from(self, now: float) -> None:
        self._since = now

    def completed(self, rows: int, now: float) -> None:
        elapsed = max(now - self._since, 0.0)
        decay = math.exp(-elapsed / self.horizon_s)
        self._rows = self._rows * decay + rows
        self._busy_s = self._busy_s * decay + elapsed
        self._since = now

    @property
    def rows_per_s(self) -> float | None:
        # Too little busy time measured yet to say; admission then relies on the text limit alone.
        return self._rows / self._busy_s if self._busy_s > 0.5 else None


class Scheduler:
    def __init__(self, health: TritonHealth, *, max_pending_texts: int, max_rows_in_flight: int):
        self.health = health
        self.max_pending_texts = max_pending_texts
        self.max_rows_in_flight = max_rows_in_flight
        self.pending_texts = 0
        self.rows_in_flight = 0
        self.meter = ThroughputMeter()
        self._queues: dict[int, list[_Job]] = {PRIORITY_NORMAL: [], PRIORITY_NICE: []}
        self._arrivals = 0

    # -- admission ------------------------------------------------------------------------------------

    def _drain_s(self, texts: int) -> float | None:
        rate = self.meter.rows_per_s
        return texts / rate if rate else None

    def _overloaded(self, why: str, retry_after_s: float | None) -> ServiceError:
        retry_after = max(1, math.ceil(retry_after_s)) if retry_after_s is not None else 1
        return ServiceError(ErrorKind.OVERLOADED, f"{why}; retry in about {retry_after} s", retry_after_s=retry_after)

    def _rows_ahead(self, rows: int) -> int:
        """Rows served before a new request of `rows` rows completes: those in flight, the requests that go first
        (no more rows left to send than it has), and its own."""
        first = sum(job.rows_unsent for queue in self._queues.values() for job in queue if job.rows_unsent <= rows)
        return self.rows_in_flight + first + rows

    def check_open(self) -> None:
        """The cheap check made before a request's body is read: is there room for any work at all?"""
        if self.health.down_for_good(RECOVERY_S):
            raise ServiceError(ErrorKind.UNAVAILABLE, f"the inference server is unavailable: {self.health.reason}")
        if self.pending_texts >= self.max_pending_texts:
            raise self._overloaded(f"{self.pending_texts} texts are already waiting", self._drain_s(self.pending_texts))

    def _admit(self, texts: int, deadline: Deadline) -> None:
        # A lone request larger than the limit is still served; refusing it would refuse it forever.
        if self.pending_texts and self.pending_texts + texts > self.max_pending_texts:
            raise self._overloaded(
                f"{self.pending_texts} texts are already waiting and this request adds {texts}", self._drain_s(self.pending_texts)
            )
        rows_ahead = self._rows_ahead(texts)
        if not self.pending_texts:
            return
        finish_s = self._drain_s(rows_ahead)
        if finish_s is None and rows_ahead > COLD_START_ROWS:
            raise self._overloaded(f"{rows_ahead} rows are ahead of this request and the throughput is not measured yet", None)
        if finish_s is not None and finish_s * ESTIMATE_MARGIN > deadline.remaining():
            raise self._overloaded(
                f"the backlog would take about {finish_s:.1f} s to serve this request, longer than its deadline of "
                f"{deadline.remaining():.1f} s",
                finish_s - deadline.remaining(),
            )

    # -- a request's life -------------------------------------------------------------------------------

    async def run(self, chunks: list[Chunk], deadline: Deadline, priority: int = PRIORITY_NORMAL) -> list:
        """Each chunk's result, in chunk order, or the first error; gives up (and drops its work) at the deadline."""
        texts = sum(c.rows for c in chunks)
        self.check_open()
        self._admit(texts, deadline)
        job = _Job(chunks, deadline, texts, asyncio.get_running_loop().create_future(), results=[None] * len(chunks))
        job.context = request_context.current()
        job.submitted = time.monotonic()
        job.unanswered = len(chunks)
        job.rows_unsent = texts
        self._arrivals += 1
        job.arrival = self._arrivals
        self.pending_texts += texts
        self._queues[priority].append(job)
        try:
            self._dispatch()
            async with asyncio.timeout(deadline.remaining()):
                return await job.done
        except TimeoutError:
            raise ServiceError(ErrorKind.DEADLINE_EXCEEDED, "the request did not complete within its deadline") from None
        finally:
            self._forget(job, priority)
            _timed(job)

    def _forget(self, job: _Job, priority: int) -> None:
        """Drops what a finished, failed, timed-out or cancelled job had not sent, and cancels what it had."""
        if job in self._queues[priority]:
            self._queues[priority].remove(job)
        for task in job.tasks:
            task.cancel()
        self.pending_texts -= job.texts
        if not job.done.done():
            job.done.cancel()

    def _next_job(self) -> _Job | None:
        for queue in self._queues.values():
            if queue:
                return min(queue, key=lambda job: (job.rows_unsent, job.arrival))
        return None

    def _dispatch(self) -> None:
        while (job := self._next_job()) is not None:
            chunk = job.chunks[job.next_chunk]
            if self.rows_in_flight and self.rows_in_flight + chunk.rows > self.max_rows_in_flight:
                return
            index = job.next_chunk
            job.next_chunk += 1
            job.rows_unsent -= chunk.rows
            if not job.has_pending:
                next(q for q in self._queues.values() if job in q).remove(job)
            now = time.monotonic()
            if job.first_sent is None:
                job.first_sent = now
            if self.rows_in_flight == 0:
                self.meter.busy_from(now)
            self.rows_in_flight += chunk.rows
            task = asyncio.create_task(self._execute(job, index, chunk))
            job.tasks.add(task)

    async def _execute(self, job: _Job, index: int, chunk: Chunk) -> None:
        try:
            result = await self._send_with_retry(chunk, job.deadline)
        except Exception as error:  # noqa: BLE001 - delivered to the request, whose transport answers (and logs) it
            if not job.done.done():
                job.done.set_exception(error)
        else:
            self.meter.completed(chunk.rows, time.monotonic())
            job.results[index] = result
            job.unanswered -= 1
            if job.unanswered == 0 and not job.done.done():
                job.done.set_result(job.results)
        finally:
            job.tasks.discard(asyncio.current_task())
            self.rows_in_flight -= chunk.rows
            self._dispatch()

    async def _send_with_retry(self, chunk: Chunk, deadline: Deadline):
        backoff_s = 0.05
        while True:
            try:
                return await chunk.send(deadline.remaining())
            except ServiceError as error:
                if error.kind is not ErrorKind.UNAVAILABLE:
                    raise
                if deadline.remaining() <= backoff_s:
                    raise ServiceError(
                        ErrorKind.UNAVAILABLE, f"the inference server stayed unavailable until the deadline: {error.message}"
                    ) from None
                log.debug("retrying a chunk of %d rows: %s", chunk.rows, error.message)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 1.0)
            await self.health.wait_ready(deadline.remaining())
