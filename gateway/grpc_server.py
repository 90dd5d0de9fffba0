"""The gRPC server: the EmbeddingService contract, the standard health service and server reflection."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.embedding_service import EmbeddingService
from gateway.grpc_api import EmbeddingServicer
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


class GrpcServer:
    """A grpc.aio server whose health follows Triton: SERVING only while every model's ensemble is ready."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, service: EmbeddingService, poll_s: float):
        self.server = server
        self.health = health_servicer
        self.service = service
        self.poll_s = poll_s
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self._report_health()
        await self.server.start()
        self._watch = asyncio.create_task(self._watch_health())

    async def stop(self, grace_s: float) -> None:
        """Refuses new calls at once and lets calls in flight finish for up to grace_s."""
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def _report_health(self) -> None:
        ensembles = [m.text_ensemble for m in self.service.catalog.models.values()]
        ready = all([await self.service.triton.is_ready(name) for name in ensembles])
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._report_health()


def create_server(service: EmbeddingService, host: str, port: int, health_poll_s: float = 1.0) -> tuple[GrpcServer, int]:
    """The server, not started yet, and the port it is bound to (port 0 picks a free one)."""
    server = grpc.aio.server()
    pb_grpc.add_EmbeddingServiceServicer_to_server(EmbeddingServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    return GrpcServer(server, health_servicer, service, health_poll_s), bound
