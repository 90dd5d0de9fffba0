"""The gRPC server built in-process by its factory (port 0) over the session's real Triton: stop, outage, overload."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from export.datasets import sts_sentences
from gateway.core.catalog import Catalog
from gateway.core.scheduler import Scheduler
from gateway.core.service import EmbeddingService
from gateway.ops.metrics import Metrics
from gateway.transports.grpc.server import create_server
from gateway.transports.policy import RequestPolicy
from gateway.triton.pool import TritonPool
from harness.servers import free_ports
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc
from tests.conftest import MODEL_REPOSITORY


async def running_server(triton_url: str, max_pending_texts: int = 8192):
    triton = await TritonPool.connect(triton_url)
    scheduler = Scheduler(triton, triton.infer, max_pending_texts=max_pending_texts, max_rows_in_flight=128, max_calls_per_lane=2)
    service = EmbeddingService(Catalog.from_repository(MODEL_REPOSITORY), scheduler, max_inputs=2048, truncate=False, timeout_s=5)
    server, port = create_server(service, "127.0.0.1", 0, RequestPolicy(None, Metrics()))
    await server.start()
    return server, port, triton


@pytest.mark.e2e
async def test_graceful_stop_lets_calls_in_flight_finish(service, model_name):
    server, port, triton = await running_server(service.triton_grpc_url)
    texts = sts_sentences()[:400]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)

            async def requests_():
                for i, text in enumerate(texts):
                    yield pb.EmbedStreamRequest(id=str(i), text=text, model=model_name)

            stream = stub.EmbedStream(requests_())
            # The first reply proves the call is in flight, with most of its texts still to embed.
            first = await stream.read()
            stopping = asyncio.create_task(server.stop(grace_s=60))
            replies = [first]
            while (reply := await stream.read()) is not grpc.aio.EOF:
                replies.append(reply)
            assert sorted(int(r.id) for r in replies) == list(range(len(texts)))
            await stopping
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Embed(pb.EmbedRequest(model=model_name, inputs=["after the stop"]), timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
        await triton.close()


async def test_without_triton_health_is_not_serving_and_calls_are_unavailable(model_name):
    (dead_port,) = free_ports(1)
    server, port, triton = await running_server(f"127.0.0.1:{dead_port}")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="embedding.v1.EmbeddingService")
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(model=model_name, inputs=["anyone there?"]))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
        await triton.close()


@pytest.mark.e2e
async def test_overload_is_resource_exhausted_at_once(service, model_name):
    server, port, triton = await running_server(service.triton_grpc_url, max_pending_texts=128)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            calls = [stub.Embed(pb.EmbedRequest(model=model_name, inputs=sts_sentences()[:128])) for _ in range(16)]
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await server.stop(0)
        await triton.close()
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert any(not isinstance(r, Exception) for r in results)
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    # Each refusal says when to retry, in the trailing metadata a client (and gRPC's own retry policy) reads.
    for error in refused:
        metadata = dict(error.trailing_metadata())
        retry_after_s = int(metadata["retry-after"])
        assert retry_after_s >= 1 and f"{retry_after_s} s" in error.details()
        assert int(metadata["grpc-retry-pushback-ms"]) == 1000 * retry_after_s
