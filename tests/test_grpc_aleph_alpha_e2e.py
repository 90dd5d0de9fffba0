"""End to end: the Aleph Alpha-style RPCs give what the Aleph Alpha HTTP contract gives, through the same core."""

import grpc
import numpy as np
import pytest
import requests

from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

POOLINGS = {
    "mean": pb.POOLING_MEAN,
    "weighted_mean": pb.POOLING_WEIGHTED_MEAN,
    "max": pb.POOLING_MAX,
    "last_token": pb.POOLING_LAST_TOKEN,
    "abs_max": pb.POOLING_ABS_MAX,
}
REPRESENTATIONS = {
    "symmetric": pb.REPRESENTATION_SYMMETRIC,
    "document": pb.REPRESENTATION_DOCUMENT,
    "query": pb.REPRESENTATION_QUERY,
}


@pytest.fixture
async def stub(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


def http(service, path: str, body: dict) -> dict:
    response = requests.post(f"{service.http_url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def text_prompt(text: str) -> pb.Prompt:
    return pb.Prompt(items=[pb.PromptItem(text=text)])


def as_float32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize("representation", sorted(REPRESENTATIONS))
@pytest.mark.parametrize("compress_to_size", [None, 128])
async def test_semantic_embed_matches_http(service, stub, model_name, representation, compress_to_size):
    text = "A man is playing a guitar on stage."
    reply = await stub.SemanticEmbed(
        pb.SemanticEmbedRequest(
            model=model_name,
            prompt=text_prompt(text),
            representation=REPRESENTATIONS[representation],
            compress_to_size=compress_to_size,
            normalize=True,
        )
    )
    expected = http(
        service,
        "/semantic_embed",
        {
            "model": model_name,
            "prompt": text,
            "representation": representation,
            "compress_to_size": compress_to_size,
            "normalize": True,
        },
    )
    assert reply.model_version == expected["model_version"]
    assert reply.num_tokens_prompt_total == expected["num_tokens_prompt_total"] == reply.embedding.token_count
    vector = as_float32(reply.embedding.values)
    assert vector.shape == (compress_to_size or 384,)
    assert abs(np.linalg.norm(vector) - 1) <= 1e-5
    np.testing.assert_array_equal(vector, as_float32(expected["embedding"]))


async def test_batch_semantic_embed_with_text_and_token_ids_matches_http(service, stub, model_name):
    prompts = [
        pb.Prompt(items=[pb.PromptItem(text="The weather is lovely today.")]),
        pb.Prompt(items=[pb.PromptItem(text="Prices rose"), pb.PromptItem(token_ids=pb.TokenIds(ids=[2011, 2197]))]),
        pb.Prompt(items=[pb.PromptItem(token_ids=pb.TokenIds(ids=[7592, 2088]))]),
    ]
    reply = await stub.BatchSemanticEmbed(
        pb.BatchSemanticEmbedRequest(model=model_name, prompts=prompts, representation=pb.REPRESENTATION_DOCUMENT)
    )
    http_prompts = [
        "The weather is lovely today.",
        [{"type": "text", "data": "Prices rose"}, {"type": "token_ids", "data": [2011, 2197]}],
        [{"type": "token_ids", "data": [7592, 2088]}],
    ]
    expected = http(
        service, "/batch_semantic_embed", {"model": model_name, "prompts": http_prompts, "representation": "document"}
    )
    assert [e.index for e in reply.embeddings] == [0, 1, 2]
    assert reply.num_tokens_prompt_total == expected["num_tokens_prompt_total"] == sum(e.token_count for e in reply.embeddings)
    np.testing.assert_array_equal(as_float32([e.values for e in reply.embeddings]), as_float32(expected["embeddings"]))


async def test_embed_with_aleph_alpha_options_is_a_batch_of_semantic_embeds(service, stub, model_name):
    texts = ["What is the capital of France?", "Paris is the capital of France."]
    reply = await stub.Embed(
        pb.EmbedRequest(
            model=model_name,
            inputs=texts,
            representation=pb.REPRESENTATION_QUERY,
            compress_to_size=128,
            encoding=pb.VECTOR_ENCODING_PACKED_FLOAT32,
        )
    )
    expected = http(
        service,
        "/batch_semantic_embed",
        {"model": model_name, "prompts": texts, "representation": "query", "compress_to_size": 128},
    )
    assert reply.model_version == expected["model_version"]
    assert reply.usage.total_tokens == expected["num_tokens_prompt_total"]
    packed = np.array([np.frombuffer(e.values_float32_le, dtype="<f4") for e in reply.embeddings])
    np.testing.assert_array_equal(packed, as_float32(expected["embeddings"]))


async def test_embed_layers_matches_http(service, stub, model_name):
    text = "Triton batches requests of equal shape together."
    reply = await stub.EmbedLayers(
        pb.EmbedLayersRequest(
            model=model_name, prompt=text_prompt(text), layers=[0, -1], poolings=list(POOLINGS.values()), tokens=True
        )
    )
    expected = http(
        service, "/embed", {"model": model_name, "prompt": text, "layers": [0, -1], "pooling": list(POOLINGS), "tokens": True}
    )
    assert reply.model_version == expected["model_version"]
    assert list(reply.tokens) == expected["tokens"]
    assert reply.num_tokens_prompt_total == expected["num_tokens_prompt_total"]
    assert [(e.layer, e.pooling) for e in reply.embeddings] == [(layer, p) for layer in (0, -1) for p in POOLINGS.values()]
    for entry in reply.embeddings:
        name = next(n for n, value in POOLINGS.items() if value == entry.pooling)
        np.testing.assert_array_equal(
            as_float32(entry.embedding.values), as_float32(expected["embeddings"][f"layer_{entry.layer}"][name])
        )


async def test_tokenize_and_detokenize_round_trip_like_http(service, stub, model_name):
    text = "Hello world, embeddings are fun."
    tokens = await stub.Tokenize(pb.TokenizeRequest(model=model_name, prompt=text))
    expected = http(service, "/tokenize", {"model": model_name, "prompt": text, "tokens": True, "token_ids": True})
    assert (list(tokens.tokens), list(tokens.token_ids)) == (expected["tokens"], expected["token_ids"])
    text_again = await stub.Detokenize(pb.DetokenizeRequest(model=model_name, token_ids=tokens.token_ids))
    assert text_again.result == http(service, "/detokenize", {"model": model_name, "token_ids": expected["token_ids"]})["result"]
    assert text_again.result == text.lower()


@pytest.mark.parametrize(
    ("rpc", "request_", "field"),
    [
        ("SemanticEmbed", pb.SemanticEmbedRequest(prompt=text_prompt("x"), compress_to_size=64), "compress_to_size"),
        ("SemanticEmbed", pb.SemanticEmbedRequest(prompt=pb.Prompt()), "prompt"),
        ("SemanticEmbed", pb.SemanticEmbedRequest(prompt=text_prompt("x"), representation=99), "representation"),
        ("BatchSemanticEmbed", pb.BatchSemanticEmbedRequest(), "prompts"),
        ("Embed", pb.EmbedRequest(inputs=["x"], normalize=True, dimensions=64), "dimensions"),
        ("EmbedLayers", pb.EmbedLayersRequest(prompt=text_prompt("x"), layers=[7], poolings=[pb.POOLING_MEAN]), "layers"),
        (
            "EmbedLayers",
            pb.EmbedLayersRequest(prompt=text_prompt("x"), layers=[-1], poolings=[pb.POOLING_UNSPECIFIED]),
            "pooling",
        ),
        ("Detokenize", pb.DetokenizeRequest(token_ids=[10**7]), "token_ids"),
    ],
)
async def test_bad_aleph_alpha_options_are_invalid_arguments_naming_the_field(stub, model_name, rpc, request_, field):
    request_.model = model_name
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(stub, rpc)(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(raised.value.trailing_metadata())["field"] == field
