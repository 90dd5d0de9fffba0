"""Every request's life from admission to answer: admission by work, fair dispatch, coalescing, deadline, retry, cancellation.

A request arrives as chunks (at most a few dozen rows each, see gateway.core.chunking), each knowing the positions
of its rows in the request; the answer puts every chunk's rows back at those positions, in one place (Answer). Triton's queue is kept
short: at most max_rows_in_flight rows per ready Triton are sent at once, and the next chunk comes from the request with the
fewest rows left to send (normal traffic before `nice`; ties in arrival order). A one-text request therefore
waits for the rows in flight, not behind another client's 2048 texts, and big requests finish one after the
other instead of all progressing together and all missing their deadlines together, as a round robin would
under overload. A request that gives up (deadline, disconnect, cancelled call) drops its chunks not yet sent.

Chunks of one lane (same ensemble, output, priority and row shape) share Triton calls: at most
max_calls_per_lane calls of a lane per ready Triton are in flight, and when one returns, every chunk of that lane that queued
meanwhile leaves in the next call (up to a chunk's size). Nothing waits to fill a batch: an idle lane
sends at once. Under load, 32 concurrent one-text requests cost Triton a few calls instead of 32, which is
where a fast encoder's time went (every call crosses tritonserver's gRPC front end and each Python step). A
call keeps running while any request in it waits, and is cancelled when none does.

Admission follows the same order: a request of n rows is served after the rows in flight and the requests
with at most n rows left, so it is refused, with 429 and a Retry-After from the measured throughput, when
those could not be served before its deadline. A one-text request is admitted behind any number of big
ones. A hard limit on texts admitted and not yet answered bounds memory.

This is also the one retry policy for a bad Triton. A call that meets no ready Triton waits for one; a call
that meets an unavailable one (down, restarting, a dead stub) is sent again after a growing pause. Both go on until
the request's deadline: an embedding is idempotent, so a restart within the deadline costs the caller only time.
At the deadline the caller learns which it was: no Triton became ready (DEADLINE_EXCEEDED, as for one that stalled),
or the Triton stayed unavailable (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gateway.core.deadline import Deadline
from gateway.core.errors import ErrorKind, ServiceError
from gateway.ops import request_context
from gateway.ops.request_context import RequestContext

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


# A request id naming every request of a shared call is cut here; Triton's logs and traces carry it.
MAX_CALL_ID_CHARS = 256


@dataclass(frozen=True)
class Lane:
    """What a backend call is made of: the model (an ensemble) asked for an output. Chunks of one lane can be
    concatenated into one call's input, up to max_rows rows; what the rows hold is the backend's business."""

    model: str
    output: str
    priority: int
    max_rows: int
    row_shape: tuple[int, ...]
    # What the call asks of the model besides its rows (request parameters, as (name, value) pairs).
    parameters: tuple[tuple[str, bool | int | str], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """Some of a request's input rows (`data`, shaped [rows, *lane.row_shape]) for one lane, and where each of them
    sits in the request (`positions`; None: after the rows of the chunks before it)."""

    lane: Lane
    data: np.ndarray
    positions: np.ndarray | None = None
    request_id: str = ""

    @property
    def rows(self) -> int:
        return len(self.data)


class Answer:
    """A request's answer, row by row: (value, token count) at each position of the request. Each chunk's rows, and
    any row answered without the backend (a cached vector), are put back here, and nowhere else."""

    def __init__(self, size: int):
        self.size = size
        self.values: np.ndarray | None = None
        self.counts = np.zeros(size, dtype=np.int64)

    def put(self, positions: np.ndarray, values: np.ndarray, counts: np.ndarray) -> None:
        if self.values is None:
            if len(positions) == self.size and (self.size == 1 or np.array_equal(positions, np.arange(self.size))):
                # Every row at once, in order, as a single-text request's are: nothing to copy.
                self.values, self.counts = values, counts.astype(np.int64, copy=False)
                return
            self.values = np.empty((self.size, *values.shape[1:]), dtype=np.float32)
        self.values[positions] = values
        self.counts[positions] = counts

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.values is not None, "an answer is read once rows were put in it"
        return self.values, self.counts


class Backend(Protocol):
    """What the scheduler needs to know of its Tritons: gateway.triton.pool.TritonPool."""

    @property
    def reason(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def ready_count(self) -> int: ...

    def down_for_good(self, recovery_s: float) -> bool: ...

    async def wait_ready(self, timeout_s: float) -> bool: ...


# Sends one call's rows to Triton within timeout_s under a request id; returns (values, token counts) per row.
Send = Callable[[Lane, np.ndarray, float, str], Awaitable[tuple[np.ndarray, np.ndarray]]]


@dataclass(eq=False)
class _Job:
    chunks: list[Chunk]
    deadline: Deadline
    texts: int
    done: asyncio.Future
    answer: Answer
    next_chunk: int = 0
    unanswered: int = 0
    rows_unsent: int = 0
    arrival: int = 0
    calls: set = field(default_factory=set)
    # The request's context, to which the job adds its time waiting here and its time in Triton.
    context: RequestContext | None = None
    submitted: float = 0.0
    first_sent: float | None = None

    @property
    def has_pending(self) -> bool:
        return self.next_chunk < len(self.chunks)


@dataclass(eq=False)
class _Call:
    """One Triton call: chunks of one lane from one or more jobs, as parts (job, chunk)."""

    lane: Lane
    parts: list[tuple[_Job, Chunk]] = field(default_factory=list)
    rows: int = 0
    task: asyncio.Task | None = None

    def add(self, job: _Job, chunk: Chunk) -> None:
        self.parts.append((job, chunk))
        self.rows += chunk.rows
        job.calls.add(self)

    @property
    def waiting(self) -> bool:
        return any(not job.done.done() for job, _ in self.parts)

    def deadline(self) -> Deadline:
        """The latest deadline of the requests it carries: each of them gives up at its own."""
        return Deadline(max(job.deadline.expires_at for job, _ in self.parts))

    def of(self, job: _Job) -> _Call:
        """The part of this call that one job's chunks make, as a call of its own (not counted in flight again)."""
        parts = [(owner, chunk) for owner, chunk in self.parts if owner is job]
        return _Call(self.lane, parts, sum(chunk.rows for _, chunk in parts))

    def request_id(self) -> str:
        ids = list(dict.fromkeys(chunk.request_id for _, chunk in self.parts if chunk.request_id))
        joined = ",".join(ids)
        return joined if len(joined) <= MAX_CALL_ID_CHARS else f"{ids[0]},+{len(ids) - 1} more"


def _fail(call: _Call, error: Exception) -> None:
    for job, _ in call.parts:
        if not job.done.done():
            job.done.set_exception(error)


def _positioned(chunks: list[Chunk]) -> list[Chunk]:
    """The chunks, each with the positions of its rows: those given, or the next ones in chunk order."""
    if all(chunk.positions is not None for chunk in chunks):
        return chunks
    placed, start = [], 0
    for chunk in chunks:
        if chunk.positions is None:
            chunk = Chunk(chunk.lane, chunk.data, np.arange(start, start + chunk.rows), chunk.request_id)
        placed.append(chunk)
        start += chunk.rows
    return placed


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
    def __init__(self, health: Backend, send: Send, *, max_pending_texts: int, max_rows_in_flight: int, max_calls_per_lane: int):
        self.health = health
        self.send = send
        self.max_pending_texts = max_pending_texts
        self.max_rows_in_flight = max_rows_in_flight
        self.max_calls_per_lane = max_calls_per_lane
        self.pending_texts = 0
        self.rows_in_flight = 0
        self._lane_calls: Counter[Lane] = Counter()
        self.meter = ThroughputMeter()
        self._queues: dict[int, list[_Job]] = {PRIORITY_NORMAL: [], PRIORITY_NICE: []}
        # Queued jobs by rows left to send, kept in step with the queues: admission sums it instead of the queues, so
        # refusing costs the same with thousands queued (a retry storm) as with none.
        self._unsent: Counter[int] = Counter()
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
        first = sum(size * jobs for size, jobs in self._unsent.items() if size <= rows)
        return self.rows_in_flight + first + rows

    def _count_unsent(self, before: int, after: int) -> None:
        """One queued job's rows left to send went from `before` to `after` (0: not in the queue)."""
        if before:
            self._unsent[before] -= 1
            if not self._unsent[before]:
                del self._unsent[before]
        if after:
            self._unsent[after] += 1

    def check_open(self, deadline: Deadline | None = None) -> None:
        """The cheap check made before a request's body is read: is there room for any work at all, and (given the
        request's deadline) could even a one-text request be served before it? Refusing then costs no parsing."""
        if self.health.down_for_good(RECOVERY_S):
            raise ServiceError(ErrorKind.UNAVAILABLE, f"the inference server is unavailable: {self.health.reason}")
        if self.pending_texts >= self.max_pending_texts:
            raise self._overloaded(f"{self.pending_texts} texts are already waiting", self._drain_s(self.pending_texts))
        if deadline is not None:
            self._admit(1, deadline)

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

    async def run(
        self, chunks: list[Chunk], deadline: Deadline, priority: int = PRIORITY_NORMAL, answer: Answer | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every row's (value, token count) at its position, or the first error; gives up (and drops its work) at the
        deadline. `answer` may already hold rows answered without the backend; the chunks' rows fill the rest."""
        texts = sum(c.rows for c in chunks)
        self.check_open()
        self._admit(texts, deadline)
        chunks = _positioned(chunks)
        if answer is None:
            answer = Answer(texts)
        job = _Job(chunks, deadline, texts, asyncio.get_running_loop().create_future(), answer)
        job.context = request_context.current()
        job.submitted = time.monotonic()
        job.unanswered = len(chunks)
        job.rows_unsent = texts
        self._arrivals += 1
        job.arrival = self._arrivals
        self.pending_texts += texts
        self._queues[priority].append(job)
        self._count_unsent(0, texts)
        try:
            if self._has_room(job):
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
            self._count_unsent(job.rows_unsent, 0)
        self.pending_texts -= job.texts
        if not job.done.done():
            job.done.cancel()
        for call in job.calls:
            if not call.waiting and call.task is not None:
                call.task.cancel()

    def _has_room(self, job: _Job) -> bool:
        """Whether a new job could start a call. If every lane it uses is at its limit, a dispatch would find what the
        last one found, and at high request rates sorting the queue on every arrival costs more than anything else here.
        """
        return any(self._lane_has_room(chunk.lane) for chunk in job.chunks)

    def _width(self) -> int:
        """Tritons that share the work: the limits on rows and calls in flight hold for each of them."""
        return self.health.ready_count or 1

    def _lane_has_room(self, lane: Lane) -> bool:
        return self._lane_calls[lane] < self.max_calls_per_lane * self._width()

    def _dispatch(self) -> None:
        """Sends what can go now: in order (priority, then fewest rows left, then arrival), each chunk joins the
        call its lane is forming, or opens one if the lane has room; it stops at the first chunk over the rows limit.
        """
        forming: dict[Lane, _Call] = {}
        opened: list[_Call] = []
        max_rows_in_flight = self.max_rows_in_flight * self._width()
        for queue in self._queues.values():
            for job in sorted(queue, key=lambda job: (job.rows_unsent, job.arrival)):
                while job.has_pending:
                    chunk = job.chunks[job.next_chunk]
                    if self.rows_in_flight and self.rows_in_flight + chunk.rows > max_rows_in_flight:
                        self._launch(opened)
                        return
                    call = forming.get(chunk.lane)
                    if call is None or call.rows + chunk.rows > chunk.lane.max_rows:
                        if not self._lane_has_room(chunk.lane):
                            break
                        call = forming[chunk.lane] = _Call(chunk.lane)
                        opened.append(call)
                        self._lane_calls[chunk.lane] += 1
                    self._place(job, chunk, call)
                if not job.has_pending:
                    queue.remove(job)
            if queue:
                # Requests of this priority are still waiting: lower priorities wait behind them.
                break
        self._launch(opened)

    def _place(self, job: _Job, chunk: Chunk, call: _Call) -> None:
        call.add(job, chunk)
        job.next_chunk += 1
        self._count_unsent(job.rows_unsent, job.rows_unsent - chunk.rows)
        job.rows_unsent -= chunk.rows
        now = time.monotonic()
        if job.first_sent is None:
            job.first_sent = now
        if self.rows_in_flight == 0:
            self.meter.busy_from(now)
        self.rows_in_flight += chunk.rows

    def _launch(self, calls: list[_Call]) -> None:
        for call in calls:
            call.task = asyncio.create_task(self._execute(call))
            # A callback, not a finally: a task cancelled before it first runs never enters its body.
            call.task.add_done_callback(functools.partial(self._finished, call))

    def _finished(self, call: _Call, _task: asyncio.Task) -> None:
        for job, _ in call.parts:
            job.calls.discard(call)
        self._lane_calls[call.lane] -= 1
        if not self._lane_calls[call.lane]:
            del self._lane_calls[call.lane]
        self.rows_in_flight -= call.rows
        self._dispatch()

    async def _execute(self, call: _Call) -> None:
        """Sends the call and hands each request its rows, or the error to every request in it. A call that the
        backend refuses as a caller's mistake (an image that cannot be decoded) while it carries several requests is
        sent again request by request, so that only the one at fault fails."""
        try:
            data = call.parts[0][1].data if len(call.parts) == 1 else np.concatenate([chunk.data for _, chunk in call.parts])
            values, counts = await self._send_with_retry(call.lane, data, call.deadline(), call.request_id())
        except ServiceError as error:
            jobs = list(dict.fromkeys(job for job, _ in call.parts))
            if error.kind is ErrorKind.VALIDATION and len(jobs) > 1:
                await asyncio.gather(*(self._execute(call.of(job)) for job in jobs))
            else:
                _fail(call, error)
        except Exception as error:
            _fail(call, error)
        else:
            self.meter.completed(call.rows, time.monotonic())
            start = 0
            for job, chunk in call.parts:
                rows = slice(start, start + chunk.rows)
                start += chunk.rows
                if job.done.done():
                    continue  # gone (deadline, disconnect): nobody reads its answer
                assert chunk.positions is not None  # run() positioned every chunk
                job.answer.put(chunk.positions, values[rows], counts[rows])
                job.unanswered -= 1
                if job.unanswered == 0:
                    job.done.set_result(job.answer.result())

    async def _send_with_retry(self, lane: Lane, data: np.ndarray, deadline: Deadline, request_id: str):
        """The one retry policy for a bad Triton (see the module's docstring)."""
        backoff_s = 0.05
        while True:
            if not self.health.ready and not await self.health.wait_ready(deadline.remaining()):
                # As a call to a stalled Triton waits for it, a call with no Triton ready waits for one: past the
                # deadline it is the deadline that was missed.
                raise ServiceError(
                    ErrorKind.DEADLINE_EXCEEDED,
                    f"no inference server became ready within the request's deadline ({self.health.reason})",
                )
            try:
                return await self.send(lane, data, deadline.remaining(), request_id)
            except ServiceError as error:
                if error.kind is not ErrorKind.UNAVAILABLE:
                    raise
                if deadline.remaining() <= backoff_s:
                    raise ServiceError(
                        ErrorKind.UNAVAILABLE, f"the inference server stayed unavailable until the deadline: {error.message}"
                    ) from None
                log.debug("retrying a call of %d rows: %s", len(data), error.message)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 1.0)
