"""What every HTTP embedding call shares before and around the core: early refusal, its deadline, its client leaving."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from gateway.core.deadline import Deadline
from gateway.core.errors import ErrorKind, ServiceError, invalid
from gateway.core.service import EmbeddingService
from gateway.transports.http.messages import header

T = TypeVar("T")

# Seconds, as a decimal number: the caller's own deadline for this request when shorter than the server's.
TIMEOUT_HEADER = "x-request-timeout"


def deadline(request: Request, service: EmbeddingService) -> Deadline:
    value = header(request, TIMEOUT_HEADER)
    if value is None:
        return service.deadline()
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise invalid(f"header 'X-Request-Timeout' must be a positive number of seconds, got {value!r}", "X-Request-Timeout")
    return service.deadline(seconds)


def refuse_early(service: EmbeddingService, expires: Deadline) -> None:
    """Called before the body is read: when the backlog is already full, or could not serve even one text before the
    request's deadline, the 429 costs no body to parse. In a retry storm of short deadlines most requests are refused,
    and refusing must cost far less than serving."""
    service.check_open(expires)


async def _disconnected(request: Request) -> None:
    # Once the body is read, the server's receive() returns only when the client has gone (or the response is sent).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (and so its queued Triton calls) as soon as the client disconnects.

    The work runs in the handler's own task, which the watcher cancels: one task per request instead of two
    and an asyncio.wait, which is measurable per request at thousands of requests a second.
    """
    handler = asyncio.current_task()
    assert handler is not None  # called from a route, which runs in its request's task
    answered = False

    def client_left(watcher: asyncio.Task) -> None:
        # The work may have finished while this callback was queued: then the response must not be cancelled.
        if not answered and not watcher.cancelled():
            handler.cancel()

    watcher = asyncio.create_task(_disconnected(request))
    watcher.add_done_callback(client_left)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            handler.uncancel()
            raise ServiceError(ErrorKind.CANCELLED, "the client disconnected; its work was cancelled") from None
        raise
    finally:
        answered = True
        watcher.cancel()
