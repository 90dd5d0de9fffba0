"""A failure of admission that nothing foresaw (the token store's database answering an error that is not a lost
connection, say) is answered in the contract's shape, over HTTP and gRPC, naming nothing inside; and the next call
is served. In process: the real HTTP protocol and app, and a real grpc.aio server, over a fake Triton."""

import grpc
import pytest

from gateway.core.catalog import Catalog
from gateway.core.scheduler import Scheduler
from gateway.core.service import EmbeddingService
from gateway.ops.metrics import Metrics
from gateway.transports.grpc.server import create_server
from gateway.transports.policy import RequestPolicy
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc
from tests.fake_triton import FakeTriton
from tests.http_harness import Gateway

INSIDE = "relation tokens does not exist"


@pytest.fixture
def admission_fails_once(monkeypatch):
    """RequestPolicy.admit raises an unforeseen error on its first call, and admits as before after it."""
    admit = RequestPolicy.admit
    calls = []

    async def failing_once(self, context, authorization):
        calls.append(context.route)
        if len(calls) == 1:
            raise RuntimeError(INSIDE)
        return await admit(self, context, authorization)

    monkeypatch.setattr(RequestPolicy, "admit", failing_once)
    return calls


@pytest.mark.parametrize(
    "path, body, message_of",
    [
        ("/v1/embeddings", {"input": "hello"}, lambda answer: answer["error"]["message"]),
        ("/semantic_embed", {"prompt": "hello", "representation": "symmetric"}, lambda answer: answer["error"]),
    ],
)
async def test_over_http_it_is_a_500_in_the_contracts_shape(models, admission_fails_once, caplog, path, body, message_of):
    gateway = Gateway(models)
    failed = await gateway.post(path, body)
    assert failed.status == 500 and failed.headers["content-type"] == "application/json"
    assert message_of(failed.json()) == "internal error; it has been logged"
    assert INSIDE not in failed.body.decode()
    assert INSIDE in caplog.text  # the details are in the log
    served = await gateway.post(path, body)
    assert served.status == 200, served.body
    assert admission_fails_once == [path, path]


async def test_over_grpc_it_is_internal_naming_nothing_inside(models: Catalog, admission_fails_once, caplog):
    triton = FakeTriton(next(iter(models.models.values())))
    scheduler = Scheduler(triton, triton.send, max_pending_texts=1024, max_rows_in_flight=128, max_calls_per_lane=2)
    service = EmbeddingService(models, scheduler, max_inputs=2048, truncate=False, timeout_s=5)
    server, port = create_server(service, "127.0.0.1", 0, RequestPolicy(None, Metrics()))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            request = pb.EmbedRequest(model=triton.model.name, inputs=["hello"])
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Embed(request, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INTERNAL
            assert raised.value.details() == "internal error; it has been logged"
            assert INSIDE in caplog.text
            served = await stub.Embed(request, timeout=10)
            assert len(served.embeddings[0].values) == triton.model.dimensions
    finally:
        await server.stop(0)
