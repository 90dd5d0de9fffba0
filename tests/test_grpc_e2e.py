"""End to end: the generated embedding.v1 stubs against the real gateway and Triton."""

import asyncio

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from export.datasets import sts_sentences
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e


@pytest.fixture
async def channel(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield channel


@pytest.fixture
def stub(channel):
    return pb_grpc.EmbeddingServiceStub(channel)


def http_embeddings(service, model: str, texts: list[str], **options) -> np.ndarray:
    """/v1/embeddings as float32, 100 texts per request."""
    vectors = []
    for start in range(0, len(texts), 100):
        body = {"model": model, "input": texts[start : start + 100], "encoding_format": "float", **options}
        response = requests.post(f"{service.http_url}/v1/embeddings", json=body, timeout=120)
        response.raise_for_status()
        vectors += [d["embedding"] for d in response.json()["data"]]
    return np.array(vectors, dtype=np.float32)


def as_array(embeddings) -> np.ndarray:
    return np.array([e.values for e in embeddings], dtype=np.float32)


async def test_embed_matches_http_bit_for_bit(service, stub, model_name, manifest):
    texts = ["The cat sits outside.", "A man is playing guitar.", "How do I reset my password?"]
    response = await stub.Embed(pb.EmbedRequest(model=model_name, inputs=texts))
    assert response.model == model_name
    assert response.model_version == manifest["model_version"]
    assert [e.index for e in response.embeddings] == [0, 1, 2]
    assert all(e.token_count > 0 for e in response.embeddings)
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(e.token_count for e in response.embeddings)
    np.testing.assert_array_equal(as_array(response.embeddings), http_embeddings(service, model_name, texts))


async def test_embed_dimensions_and_truncate_match_http(service, stub, model_name):
    texts = ["A dog runs across the field. " * 80, "Short one."]
    response = await stub.Embed(pb.EmbedRequest(model=model_name, inputs=texts, dimensions=64, truncate=True))
    vectors = as_array(response.embeddings)
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert response.embeddings[0].token_count == 256
    np.testing.assert_array_equal(vectors, http_embeddings(service, model_name, texts, dimensions=64, truncate=True))


async def test_packed_float32_carries_the_same_values(stub, model_name):
    texts = ["Packed bytes skip per-value framing.", "Second input."]
    floats = await stub.Embed(pb.EmbedRequest(model=model_name, inputs=texts))
    packed = await stub.Embed(pb.EmbedRequest(model=model_name, inputs=texts, encoding=pb.VECTOR_ENCODING_PACKED_FLOAT32))
    assert all(len(e.values) == 0 for e in packed.embeddings)
    unpacked = np.array([np.frombuffer(e.values_float32_le, dtype="<f4") for e in packed.embeddings])
    np.testing.assert_array_equal(unpacked, as_array(floats.embeddings))


async def test_list_models_describes_the_export(stub, manifest):
    response = await stub.ListModels(pb.ListModelsRequest())
    (model,) = response.models
    assert (model.name, model.model_version, model.dimensions) == (
        manifest["name"],
        manifest["model_version"],
        manifest["dimensions"],
    )
    assert (model.max_sequence_length_tokens, model.num_layers) == (manifest["max_sequence_length"], manifest["num_layers"])


@pytest.mark.parametrize(
    ("request_fields", "code", "field"),
    [
        ({"inputs": []}, grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        ({"inputs": ["fine", ""]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        ({"inputs": ["x"], "dimensions": 0}, grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
        ({"inputs": ["x"], "dimensions": 385}, grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
        ({"inputs": ["word " * 400], "truncate": False}, grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        ({"inputs": ["x"], "model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "model"),
    ],
)
async def test_bad_input_gets_its_status_code_and_field(stub, model_name, request_fields, code, field):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Embed(pb.EmbedRequest(**{"model": model_name, **request_fields}))
    assert raised.value.code() == code
    assert dict(raised.value.trailing_metadata())["field"] == field
    assert raised.value.details()
    # The server keeps serving after a client's mistake.
    assert len((await stub.Embed(pb.EmbedRequest(model=model_name, inputs=["still fine"]))).embeddings) == 1


async def test_embed_stream_answers_1000_sts_sentences_from_4_streams(service, channel, model_name):
    texts = sts_sentences()[:1000]
    expected = http_embeddings(service, model_name, texts)

    async def one_stream(ids: range) -> list[pb.EmbedStreamResponse]:
        async def requests_():
            for i in ids:
                yield pb.EmbedStreamRequest(id=f"s{i}", text=texts[i], model=model_name)

        return [reply async for reply in pb_grpc.EmbeddingServiceStub(channel).EmbedStream(requests_())]

    replies = await asyncio.gather(*(one_stream(range(k, 1000, 4)) for k in range(4)))
    for k, stream_replies in enumerate(replies):
        assert sorted(r.id for r in stream_replies) == sorted(f"s{i}" for i in range(k, 1000, 4))
    by_id = {r.id: r for stream_replies in replies for r in stream_replies}
    assert len(by_id) == 1000
    served = np.array([by_id[f"s{i}"].embedding.values for i in range(1000)], dtype=np.float32)
    assert all(by_id[f"s{i}"].embedding.token_count > 0 for i in range(1000))
    # Batches hold other neighbours than over HTTP, so only the padding bucket's rounding may differ.
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)


async def test_embed_stream_answers_a_bad_text_with_an_error_and_goes_on(stub, model_name):
    async def requests_():
        yield pb.EmbedStreamRequest(id="good", text="fine", model=model_name)
        yield pb.EmbedStreamRequest(id="empty", text="", model=model_name)
        yield pb.EmbedStreamRequest(id="after", text="still fine", model=model_name)

    by_id = {reply.id: reply async for reply in stub.EmbedStream(requests_())}
    assert sorted(by_id) == ["after", "empty", "good"]
    for good in ("good", "after"):
        assert not by_id[good].HasField("error")
        assert len(by_id[good].embedding.values) == 384
    bad = by_id["empty"]
    assert not bad.HasField("embedding")
    assert (bad.error.code, bad.error.field) == ("validation", "text")
    assert "empty" in bad.error.message


async def test_health_reports_serving_while_triton_is_ready(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "embedding.v1.EmbeddingService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests_():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    (reply,) = [r async for r in reflection.ServerReflectionInfo(requests_())]
    names = {s.name for s in reply.list_services_response.service}
    assert {"embedding.v1.EmbeddingService", "grpc.health.v1.Health"} <= names
