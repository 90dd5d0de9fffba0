"""End to end: the unmodified aleph-alpha-client (sync and async) against the real gateway and Triton."""

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
import requests
from aleph_alpha_client import (
    AsyncClient,
    BatchSemanticEmbeddingRequest,
    Client,
    DetokenizationRequest,
    EmbeddingRequest,
    EmbeddingV2Request,
    Prompt,
    SemanticEmbeddingRequest,
    SemanticRepresentation,
    Text,
    TokenizationRequest,
    Tokens,
)

from export.datasets import sts_sentences
from repository_contract.tensors import ATTENTION_MASK, HIDDEN_STATES, INPUT_IDS, onnx_name
from tests.conftest import MODEL_REPOSITORY

pytestmark = pytest.mark.e2e

POOLINGS = ["mean", "weighted_mean", "max", "last_token", "abs_max"]


@pytest.fixture(scope="module")
def client(service):
    return Client(token="unused", host=service.http_url, total_retries=0)


def semantic(prompt: str | Prompt, representation=SemanticRepresentation.Symmetric, **options) -> SemanticEmbeddingRequest:
    prompt = Prompt.from_text(prompt) if isinstance(prompt, str) else prompt
    return SemanticEmbeddingRequest(prompt=prompt, representation=representation, **options)


def openai_vectors(service, model_name, texts):
    body = {"model": model_name, "input": texts, "encoding_format": "float"}
    response = requests.post(f"{service.http_url}/v1/embeddings", json=body, timeout=120)
    response.raise_for_status()
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_version_and_models(client, model_name, manifest):
    client.validate_version()
    assert client.get_version() == "1.19.0"
    (model,) = client.models()
    assert model["name"] == model_name
    assert model["model_version"] == manifest["model_version"]
    assert model["compress_to_sizes"] == [128]


@pytest.mark.parametrize("representation", list(SemanticRepresentation))
@pytest.mark.parametrize("compress_to_size", [None, 128])
@pytest.mark.parametrize("normalize", [False, True])
def test_semantic_embed(client, model_name, manifest, representation, compress_to_size, normalize):
    request = SemanticEmbeddingRequest(
        prompt=Prompt.from_text("How do I reset my password?"),
        representation=representation,
        compress_to_size=compress_to_size,
        normalize=normalize,
    )
    response = client.semantic_embed(request, model=model_name)
    vector = np.array(response.embedding)
    assert vector.shape == (compress_to_size or manifest["dimensions"],)
    assert response.num_tokens_prompt_total == 9  # [CLS] how do i reset my password ? [SEP]
    if compress_to_size is None:
        assert response.model_version == manifest["model_version"]
    else:
        compression = manifest["compression"]
        assert response.model_version == f"{manifest['model_version']}-pca128-{compression['digest']}"
    if normalize or compress_to_size is None:  # all-MiniLM's own vectors are unit length already
        assert abs(np.linalg.norm(vector) - 1) <= 1e-5


def test_compressed_vector_is_the_exported_projection_of_the_full_one(client, model_name, manifest):
    text = "The new movie is awesome."
    full = np.array(client.semantic_embed(semantic(text), model=model_name).embedding)
    compressed = client.semantic_embed(semantic(text, compress_to_size=128), model=model_name).embedding
    components = np.load(MODEL_REPOSITORY / manifest["steps"]["compression"] / "1" / "projection.npy")
    np.testing.assert_allclose(compressed, full @ components.T, atol=1e-5)


def test_symmetric_semantic_embed_equals_openai_embeddings(service, client, model_name):
    text = "A man is playing a guitar."
    response = client.semantic_embed(semantic(text), model=model_name)
    np.testing.assert_array_equal(np.array(response.embedding, dtype=np.float32), openai_vectors(service, model_name, [text])[0])


def test_embeddings_v2_and_aleph_alpha_hosting(service, model_name):
    client = Client(token="unused", host=service.http_url, hosting="aleph-alpha", total_retries=0)
    texts = ["A man is playing a guitar.", "The cat sits outside."]
    response = client.embeddings(EmbeddingV2Request(input=texts), model=model_name)
    assert [d.index for d in response.data] == [0, 1]
    vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_array_equal(vectors, openai_vectors(service, model_name, texts))
    assert response.usage.total_tokens == response.usage.prompt_tokens > 0
    document = client.semantic_embed(semantic(texts[0], SemanticRepresentation.Document), model=model_name)
    np.testing.assert_array_equal(np.array(document.embedding, dtype=np.float32), vectors[0])


def test_text_and_token_id_items_are_concatenated_in_order(service, client, model_name, tokenizer):
    world_ids = tokenizer.encode(" is playing a guitar.", add_special_tokens=False).ids
    prompt = Prompt([Text.from_text("A man"), Tokens.from_token_ids(world_ids)])
    response = client.semantic_embed(semantic(prompt), model=model_name)
    expected = openai_vectors(service, model_name, ["A man is playing a guitar."])[0]
    np.testing.assert_allclose(response.embedding, expected, atol=1e-6)
    assert response.num_tokens_prompt_total == len(tokenizer.encode("A man is playing a guitar.").ids)


@pytest.fixture(scope="module")
def sync_batch(client, model_name):
    texts = sts_sentences()[:250]
    request = BatchSemanticEmbeddingRequest(
        prompts=[Prompt.from_text(t) for t in texts], representation=SemanticRepresentation.Symmetric
    )
    return texts, client.batch_semantic_embed(request, model=model_name)


def test_sync_batch_of_250_prompts_in_three_chunks(service, model_name, tokenizer, sync_batch):
    texts, response = sync_batch
    served = np.array(response.embeddings, dtype=np.float32)
    assert served.shape == (250, 384)
    np.testing.assert_allclose(served, openai_vectors(service, model_name, texts), atol=1e-6)
    assert response.num_tokens_prompt_total == sum(len(e.ids) for e in tokenizer.encode_batch(texts))


async def test_async_client_reassembles_concurrent_chunks_exactly(service, model_name, sync_batch):
    texts, sync_response = sync_batch
    request = BatchSemanticEmbeddingRequest(
        prompts=[Prompt.from_text(t) for t in texts], representation=SemanticRepresentation.Symmetric
    )
    async with AsyncClient(token="unused", host=service.http_url, total_retries=0) as client:
        response = await client.batch_semantic_embed(request, model=model_name, num_concurrent_requests=4, batch_size=50)
    # Chunks run concurrently and may be padded to other buckets than in the sync run: equal up to rounding.
    np.testing.assert_allclose(np.array(response.embeddings), np.array(sync_response.embeddings), atol=1e-6)
    assert response.num_tokens_prompt_total == sync_response.num_tokens_prompt_total


def reference_poolings(hidden: np.ndarray) -> dict[str, np.ndarray]:
    """hidden [seq, dims] of one unpadded sequence: the five poolings, written out plainly."""
    weights = np.arange(1, hidden.shape[0] + 1, dtype=np.float64)[:, None]
    return {
        "mean": hidden.mean(axis=0),
        "weighted_mean": (hidden * weights).sum(axis=0) / weights.sum(),
        "max": hidden.max(axis=0),
        "last_token": hidden[-1],
        "abs_max": np.abs(hidden).max(axis=0),
    }


@pytest.mark.parametrize("normalize", [False, True])
def test_embed_layers_and_poolings_match_the_onnx_hidden_states(client, model_name, manifest, tokenizer, normalize):
    text = "Triton batches requests of equal shape together."
    request = EmbeddingRequest(prompt=Prompt.from_text(text), layers=[0, -1], pooling=POOLINGS, tokens=True, normalize=normalize)
    response = client.embed(request, model=model_name)
    encoding = tokenizer.encode(text)
    session = ort.InferenceSession(
        str(MODEL_REPOSITORY / manifest["steps"]["encoder"] / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    ids = np.array([encoding.ids], dtype=np.int64)
    (hidden_states,) = session.run(
        [onnx_name(HIDDEN_STATES)], {onnx_name(INPUT_IDS): ids, onnx_name(ATTENTION_MASK): np.ones_like(ids)}
    )
    assert hidden_states.shape[1] == manifest["num_layers"] + 1
    assert response.model_version == manifest["model_version"]
    assert response.num_tokens_prompt_total == len(encoding.ids)
    assert response.tokens == tokenizer.encode(text, add_special_tokens=False).tokens
    assert set(response.embeddings) == {(f"layer_{layer}", pooling) for layer in (0, -1) for pooling in POOLINGS}
    for layer in (0, -1):
        expected = reference_poolings(hidden_states[0, layer].astype(np.float64))
        for pooling in POOLINGS:
            want = expected[pooling] / np.linalg.norm(expected[pooling]) if normalize else expected[pooling]
            served = np.array(response.embeddings[(f"layer_{layer}", pooling)])
            np.testing.assert_allclose(served, want, atol=2e-5, err_msg=f"layer {layer} {pooling}")


def test_tokenize_and_detokenize_round_trip(client, model_name, tokenizer):
    text = "how do i reset my password?"
    tokenized = client.tokenize(TokenizationRequest(prompt=text, tokens=True, token_ids=True), model=model_name)
    assert tokenized.token_ids == tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenized.tokens == ["how", "do", "i", "reset", "my", "password", "?"]
    assert client.detokenize(DetokenizationRequest(token_ids=tokenized.token_ids), model=model_name).result == text
    # The client's own tokenizer comes from GET /models/{model}/tokenizer and agrees with the server.
    assert client.tokenizer(model_name).encode(text, add_special_tokens=False).ids == tokenized.token_ids


async def test_async_client_semantic_embed_and_embed(service, client, model_name):
    request = semantic("Hello there", SemanticRepresentation.Query)
    layers_request = EmbeddingRequest(prompt=Prompt.from_text("Hello there"), layers=[-1], pooling=["mean"])
    async with AsyncClient(token="unused", host=service.http_url, total_retries=0) as async_client:
        await async_client.validate_version()
        served, layers = await asyncio.gather(
            async_client.semantic_embed(request, model=model_name),
            async_client.embed(layers_request, model=model_name),
        )
    assert served.embedding == client.semantic_embed(request, model=model_name).embedding
    # all-MiniLM's sentence embedding is the normalized mean of its last layer.
    mean = np.array(layers.embeddings[("layer_-1", "mean")])
    np.testing.assert_allclose(mean / np.linalg.norm(mean), served.embedding, atol=1e-6)
