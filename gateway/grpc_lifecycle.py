"""Around every gRPC call of the EmbeddingService: what gateway.http_middleware does for HTTP.

The request id comes from the `x-request-id` metadata or is minted, and goes back in the initial metadata; the
caller is authenticated from the `authorization` metadata (`Bearer <token>`) and rate-limited; one metrics
update and one access-log line follow the call. The health and reflection services stay open, as the HTTP
probes do.
"""

from __future__ import annotations

import inspect

import grpc

from gateway import request_context
from gateway.errors import ServiceError
from gateway.grpc_api import abort_with
from gateway.policy import RequestPolicy, rejection_of
from gateway.request_context import RequestContext, request_id_from


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


class _Call:
    """One call's context, bound while it runs."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, policy: RequestPolicy):
        self.grpc = context
        self.policy = policy
        self.metadata = _metadata(context)
        self.context = RequestContext(request_id_from(self.metadata.get("x-request-id")), "grpc", method)
        self.rejection: str | None = None

    async def open(self) -> None:
        self._bound = request_context.bind(self.context)
        self.policy.metrics.request_started(self.context)
        await self.grpc.send_initial_metadata((("x-request-id", self.context.request_id),))
        try:
            await self.policy.admit(self.context, self.metadata.get("authorization"))
        except ServiceError as error:
            self.rejection = rejection_of(error)
            await abort_with(self.grpc, error)

    def close(self, failed: BaseException | None) -> None:
        code = self.grpc.code()
        if code is None:
            code = grpc.StatusCode.OK if failed is None else grpc.StatusCode.CANCELLED
        self.policy.finish(self.context, code.name, self.rejection or _REJECTIONS.get(code))
        request_context.unbind(self._bound)


# What a refused call counts as in the rejections metric, by the status it ended with.
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
    """The method's behavior (unary or streaming reply) wrapped in its call's life cycle."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request, context):
            call = _Call(method, context, policy)
            failed = None
            try:
                await call.open()
                async for reply in behavior(request, context):
                    yield reply
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
