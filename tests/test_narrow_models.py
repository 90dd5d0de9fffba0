"""A model narrower than the compression size (fast tier): served like any other, but without compress_to_size, which
is a 400 (INVALID_ARGUMENT over gRPC) naming the field for it alone; the listings say so. Over the fake Triton, which
has no compressed ensembles for it and refuses a call to one. The real export and Triton:
tests/test_narrow_model_e2e.py."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from gateway.core.catalog import Catalog, ServedModel
from gateway.transports.grpc.servicer import EmbeddingServicer
from proto.embedding.v1 import embedding_pb2 as pb
from repository_contract.manifest import EnsembleNames
from repository_contract.naming import ensemble_names
from tests.http_harness import Gateway
from tests.test_fake_triton_service import Context, assert_rows, normalized, settle

NARROW = "narrow"
TEXTS = ["a short one", "and a somewhat longer text, so that the two differ in length"]


def narrow(model: ServedModel) -> ServedModel:
    """The exported model as the export serves one of 64 dimensions: its own ensembles, and no compression."""
    names = ensemble_names(NARROW, None)
    return dataclasses.replace(
        model,
        name=NARROW,
        model_version=f"{NARROW}-fp32-0123456789ab",
        dimensions=64,
        embedding=EnsembleNames(**names["embedding"]),
        layers=EnsembleNames(**names["layers"]),
        compression=None,
    )


@pytest.fixture
async def gw(models):
    """The gateway serving the narrow model (over the fake Triton) next to the exported one, which compresses."""
    (wide,) = models.models.values()
    gateway = Gateway(Catalog([narrow(wide), wide]))
    assert gateway.model.name == NARROW
    yield gateway
    await settle()
    assert gateway.triton.refused == []


@pytest.mark.parametrize(
    ("path", "body"),
    [("/semantic_embed", {"prompt": TEXTS[0]}), ("/batch_semantic_embed", {"prompts": TEXTS})],
)
async def test_compress_to_size_is_a_400_naming_the_field(gw, path, body):
    response = await gw.post(path, {**body, "representation": "symmetric", "compress_to_size": 128})
    assert response.status == 400, response.body
    error = response.json()
    assert error["field"] == "compress_to_size"
    assert "not supported by narrow (64 dimensions); supported: [] or null" in error["error"]
    assert gw.triton.calls == []


async def test_without_compress_to_size_it_answers_its_own_vectors(gw):
    response = await gw.post("/batch_semantic_embed", {"prompts": TEXTS, "representation": "symmetric"})
    assert response.status == 200, response.body
    answer = response.json()
    assert answer["model_version"] == gw.model.model_version
    assert [len(vector) for vector in answer["embeddings"]] == [64, 64]
    assert_rows(gw.triton, TEXTS, answer["embeddings"])


async def test_openai_dimensions_truncate_its_vectors(gw):
    response = await gw.post("/v1/embeddings", {"input": TEXTS, "dimensions": 32})
    assert response.status == 200, response.body
    vectors = [item["embedding"] for item in response.json()["data"]]
    expected = [normalized(gw.triton.expected(text)[0][:32]) for text in TEXTS]
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-7)
    response = await gw.post("/v1/embeddings", {"input": TEXTS, "dimensions": 128})
    assert response.status == 400 and "between 1 and 64" in response.json()["error"]["message"], response.body


def text_prompt(text: str) -> pb.Prompt:
    return pb.Prompt(items=[pb.PromptItem(text=text)])


@pytest.mark.parametrize(
    "request_",
    [
        pb.SemanticEmbedRequest(prompt=text_prompt(TEXTS[0]), compress_to_size=128),
        pb.BatchSemanticEmbedRequest(prompts=[text_prompt(t) for t in TEXTS], compress_to_size=128),
        pb.EmbedRequest(inputs=TEXTS, compress_to_size=128),
    ],
    ids=lambda request: type(request).__name__,
)
async def test_grpc_compress_to_size_is_invalid_argument_naming_the_field(gw, request_):
    request_.model = NARROW
    servicer, context = EmbeddingServicer(gw.service), Context()
    rpc = type(request_).__name__.removesuffix("Request")
    with pytest.raises(grpc.aio.AbortError):
        await getattr(servicer, rpc)(request_, context)
    assert context.aborted is not None
    code, details, metadata = context.aborted
    assert code is grpc.StatusCode.INVALID_ARGUMENT and metadata["field"] == "compress_to_size", details
    request_.ClearField("compress_to_size")
    answer = await getattr(servicer, rpc)(request_, Context())
    vectors = [answer.embedding] if rpc == "SemanticEmbed" else answer.embeddings
    assert_rows(gw.triton, TEXTS[: len(vectors)], [list(vector.values) for vector in vectors])


async def test_the_listings_say_which_sizes_each_model_compresses_to(gw, models):
    (wide,) = models.models
    response = await gw.request("GET", "/models_available")
    assert response.status == 200
    assert {m["name"]: m["compress_to_sizes"] for m in response.json()} == {NARROW: [], wide: [128]}
    listed = await EmbeddingServicer(gw.service).ListModels(pb.ListModelsRequest(), Context())
    assert {m.name: list(m.compress_to_sizes) for m in listed.models} == {NARROW: [], wide: [128]}
    assert {m.name: m.dimensions for m in listed.models} == {NARROW: 64, wide: 384}
