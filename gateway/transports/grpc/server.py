"""The gRPC server: the EmbeddingService contract, the standard health service and server reflection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.core.errors import ServiceError, invalid
from gateway.core.service import EmbeddingService
from gateway.transports.grpc.connections import (
    ConnectionGate,
    GrpcConnectionLimits,
    listening_sockets,
    private_address,
    split_descriptors,
)
from gateway.transports.grpc.lifecycle import with_lifecycle
from gateway.transports.grpc.servicer import EmbeddingServicer
from gateway.transports.http.server import derive_max_connections
from gateway.transports.policy import RequestPolicy
from proto.embedding.v1 import embedding_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


class _Undecodable:
    """What a request deserializer hands over instead of raising: bytes that are not the method's request type."""

    def __init__(self, message_class):
        self.type_name = message_class.DESCRIPTOR.full_name

    def error(self) -> ServiceError:
        return invalid(f"the request is not a valid {self.type_name} message")


def _lenient_deserializer(message_class):
    """grpc answers a deserializer that raises with UNKNOWN naming the exception; this one never raises."""

    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, and whatever else the parser may raise on hostile bytes
            return _Undecodable(message_class)

    return deserialize


async def _decoded(requests):
    """A request stream that ends the call with INVALID_ARGUMENT (through the handler) at its first undecodable message."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error()
        yield request


async def _refuse(request: _Undecodable, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error().message)


def _unary_request(implementation):
    if inspect.isasyncgenfunction(implementation):

        async def streaming(request, context):
            if isinstance(request, _Undecodable):
                await _refuse(request, context)
            async with contextlib.aclosing(implementation(request, context)) as replies:
                async for reply in replies:
                    yield reply

        return streaming

    async def unary(request, context):
        if isinstance(request, _Undecodable):
            await _refuse(request, context)
        return await implementation(request, context)

    return unary


def _stream_request(implementation):
    if inspect.isasyncgenfunction(implementation):

        async def streaming(requests, context):
            async with contextlib.aclosing(implementation(_decoded(requests), context)) as replies:
                async for reply in replies:
                    yield reply

        return streaming

    async def unary(requests, context):
        return await implementation(_decoded(requests), context)

    return unary


def method_handlers(servicer: EmbeddingServicer, policy: RequestPolicy) -> dict[str, grpc.RpcMethodHandler]:
    """What the generated add_EmbeddingServiceServicer_to_server registers, built from the service descriptor, but
    with deserializers that never raise (an undecodable request is answered INVALID_ARGUMENT by the handler) and
    every method inside its call's life cycle (request id, caller, metrics, access log)."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["EmbeddingService"].methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        implementation = getattr(servicer, method.name)
        options = {
            "request_deserializer": _lenient_deserializer(request_class),
            "response_serializer": response_class.SerializeToString,
        }
        decoded = _stream_request(implementation) if method.client_streaming else _unary_request(implementation)
        behavior = with_lifecycle(decoded, method.name, policy)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behavior, **options)
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(behavior, **options)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(behavior, **options)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behavior, **options)
    return handlers


def add_servicer(servicer: EmbeddingServicer, server: grpc.aio.Server, policy: RequestPolicy) -> None:
    """Registers the servicer as the generated add_EmbeddingServiceServicer_to_server would, with method_handlers()."""
    handlers = method_handlers(servicer, policy)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class ReadinessHealth(health.aio.HealthServicer):
    """grpc.health.v1 that follows readiness: SERVING only while every model's ensemble is ready and the token store
    (with authentication on) answers. Check looks at readiness itself, as /health/ready does, so the two never
    disagree; Watch streams follow the updates GrpcServer makes every poll."""

    def __init__(self, service: EmbeddingService, policy: RequestPolicy):
        super().__init__()
        self.service = service
        self.policy = policy

    async def report(self) -> None:
        ready = self.policy.unready_reason(self.service.health) is None
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.set(name, status)

    async def Check(self, request, context):
        await self.report()
        return await super().Check(request, context)


class GrpcServer:
    """A grpc.aio server whose health service follows readiness (ReadinessHealth), updated every poll_s, behind the
    gate that holds its public port (gateway.transports.grpc.connections)."""

    def __init__(self, server: grpc.aio.Server, gate: ConnectionGate, health_servicer: ReadinessHealth, poll_s: float):
        self.server = server
        self.gate = gate
        self.health = health_servicer
        self.poll_s = poll_s
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self.health.report()
        await self.server.start()
        await self.gate.start()
        self._watch = asyncio.create_task(self._watch_health())

    async def stop(self, grace_s: float) -> None:
        """Refuses new connections and calls at once and lets calls in flight finish for up to grace_s."""
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        self.gate.stop_accepting()
        await self.server.stop(grace_s)
        self.gate.close()

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.health.report()


def create_server(
    service: EmbeddingService,
    host: str,
    port: int,
    policy: RequestPolicy,
    health_poll_s: float = 0.1,
    limits: GrpcConnectionLimits | None = None,
    sockets: list[socket.socket] | None = None,
) -> tuple[GrpcServer, int]:
    """The server, not started yet, and the port it is bound to (port 0 picks a free one). Without limits, the
    gRPC port gets its share of this process's descriptors (split_descriptors) and a 10 s handshake timeout.
    sockets: bound ones to accept on instead of binding host:port (a --workers worker's, which its parent bound)."""
    if limits is None:
        budget = split_descriptors(derive_max_connections())
        limits = GrpcConnectionLimits(budget.grpc_connections, budget.grpc_backlog)
    grpc_address, relay_address = private_address()
    server = grpc.aio.server(options=limits.grpc_options())
    add_servicer(EmbeddingServicer(service), server, policy)
    health_servicer = ReadinessHealth(service, policy)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(grpc_address)
    gate = ConnectionGate(sockets or listening_sockets(host, port), relay_address, limits)
    return GrpcServer(server, gate, health_servicer, health_poll_s), gate.port
