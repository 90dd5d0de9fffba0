"""Around every gRPC call of the EmbeddingService: what gateway.transports.http.middleware does for HTTP.

The request id comes from the `x-request-id` metadata or is minted, and goes back in the initial metadata; the
caller is authenticated from the `authorization` metadata (`Bearer <token>`) and rate-limited; one metrics
update and one access-log line follow the call. The health and reflection services stay open, as the HTTP
probes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging

import grpc

from gateway.core.errors import ServiceError, internal
from gateway.ops import request_context
from gateway.ops.request_context import RequestContext, request_id_from
from gateway.transports.grpc.servicer import abort_with
from gateway.transports.policy import RequestPolicy

log = logging.getLogger(__name__)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


class _Call:
    """One call's context, bound while it runs."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, policy: RequestPolicy):
        self.grpc = context
        self.policy = policy
        self.metadata = _metadata(context)
        self.context = RequestContext(request_id_from(self.metadata.get("x-request-id")), "grpc", method)
        self.timeout_s = context.time_remaining()  # None without a deadline

    async def open(self) -> None:
        self._bound = request_context.bind(self.context)
        self.policy.metrics.request_started(self.context)
        await self.grpc.send_initial_metadata((("x-request-id", self.context.request_id),))
        try:
            await self.policy.admit(self.context, self.metadata.get("authorization"))
        except ServiceError as error:
            await abort_with(self.grpc, error)
        except Exception:  # a failure of admission nothing foresaw (the token store's database, say)
            # grpc would answer UNKNOWN with the exception's own text; the caller gets INTERNAL naming nothing inside.
            log.exception("unexpected error admitting %s", self.context.route)
            await abort_with(self.grpc, internal())

    def close(self, failed: BaseException | None) -> None:
        code = self.grpc.code()
        if code is None:
            code = grpc.StatusCode.OK if failed is None else self._ended_by()
        self.policy.finish(self.context, code.name, _REJECTIONS.get(code))
        request_context.unbind(self._bound)

    def _ended_by(self) -> grpc.StatusCode:
        """Why a call ended without a status of ours: grpc cancels the handler alike when the client cancels and
        when the call's deadline passes (the client then sees DEADLINE_EXCEEDED); only the time left tells which.
        The client's own deadline passes a little before ours, by the time its headers took to arrive (2 ms here,
        more under load), and it then cancels the call itself: a cancellation within a tenth of the call's timeout
        (at most a second) of our deadline is that deadline."""
        remaining = self.grpc.time_remaining()
        if remaining is None:
            return grpc.StatusCode.CANCELLED
        slack = min(1.0, 0.1 * self.timeout_s)
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining <= slack else grpc.StatusCode.CANCELLED


# What a refused call counts as in the rejections metric, by the status it ended with, when no error of ours noted
# its kind (abort_with does): a deadline or a cancellation grpc ended the call with itself.
_REJECTIONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "invalid",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "forbidden",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
}


def with_lifecycle(behavior, method: str, policy: RequestPolicy):
    """The method's behavior (unary or streaming reply) wrapped in its call's life cycle.

    Streamed replies are written here (context.write) instead of being handed to grpc as an async generator. grpc
    would drive the generator from outside, and when a write fails because the call is gone (cancelled, or past its
    deadline, while a reply was going out) it logs that failure with a traceback and leaves the generator open;
    the garbage collector's finalizer closes it later, in a task of its own, where the call's context variable
    cannot be reset (another traceback) and the call is accounted for only whenever that happens.
    """
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request, context):
            call = _Call(method, context, policy)
            failed = None
            try:
                await call.open()
                async with contextlib.aclosing(behavior(request, context)) as replies:
                    async for reply in replies:
                        try:
                            await context.write(reply)
                        except grpc.aio.InternalError:
                            # A reply the call can no longer take: the call is over on the client's side. It ends
                            # as the cancellation it is, which grpc takes quietly, as when it cancels us itself.
                            raise asyncio.CancelledError from None
            except BaseException as error:
                failed = error
                raise
            finally:
                call.close(failed)

        return streaming

    async def unary(request, context):
        call = _Call(method, context, policy)
        failed = None
        try:
            await call.open()
            return await behavior(request, context)
        except BaseException as error:
            failed = error
            raise
        finally:
            call.close(failed)

    return unary
