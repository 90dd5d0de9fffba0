"""End to end: a model of 64 dimensions, fewer than compress_to_size's 128, exported next to all-MiniLM into one
repository and served through one Triton. It answers sentence-transformers' own vectors, has no compression step or
compressed ensembles, and refuses compress_to_size with a 400 (INVALID_ARGUMENT over gRPC) naming the field, while
all-MiniLM in the same service still compresses. The model is tests/tiny_models.py's bert_narrow_mean: a BERT with
random weights, built locally."""

import grpc
import numpy as np
import openai
import pytest
import requests

from export.datasets import sts_sentences
from harness.servers import start_service
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc
from repository_contract.manifest import read_all
from tests.test_model_families_e2e import MINILM, assert_matches, export_next_to_minilm
from tests.tiny_models import NARROW, bert_narrow_mean

pytestmark = pytest.mark.e2e

NAME = "narrow-bert"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return bert_narrow_mean(tmp_path_factory.mktemp("tiny-models") / "tiny-bert-narrow")


@pytest.fixture(scope="module")
def repository(tmp_path_factory, model_dir):
    repository = tmp_path_factory.mktemp("repository")
    output = export_next_to_minilm(repository, {NAME: model_dir})
    assert "cosine min 1.000000" in output and "no compression: 64 dimensions, fewer than --compress-to 128" in output
    return repository


@pytest.fixture(scope="module")
def served(tmp_path_factory, repository):
    running = start_service(tmp_path_factory.mktemp("narrow"), repository)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def texts():
    # As many as one /batch_semantic_embed takes.
    return sts_sentences()[:100]


@pytest.fixture(scope="module")
def reference(model_dir, texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(texts, batch_size=64)


def semantic(served, body: dict) -> requests.Response:
    return requests.post(f"{served.http_url}/batch_semantic_embed", json={"representation": "symmetric", **body}, timeout=60)


def test_the_repository_has_no_compression_for_the_narrow_model_only(repository):
    manifests = {manifest.name: manifest for manifest in read_all(repository)}
    narrow, minilm = manifests[NAME], manifests[MINILM]
    assert (narrow.dimensions, narrow.compression) == (NARROW, None)
    assert "compression" not in narrow.steps and not any("-c128" in d for d in narrow.directories)
    assert sorted(p.name for p in repository.iterdir() if p.name.startswith(NAME)) == sorted(narrow.directories)
    assert minilm.compression is not None and (repository / minilm.compression.ensembles.text).is_dir()


def test_its_vectors_are_sentence_transformers_own(served, texts, reference):
    response = semantic(served, {"model": NAME, "prompts": texts})
    assert response.status_code == 200, response.text
    assert_matches(np.array(response.json()["embeddings"]), reference, f"{NAME} over /batch_semantic_embed")


def test_openai_dimensions_truncate_its_vectors(served, texts, reference):
    client = openai.OpenAI(base_url=f"{served.http_url}/v1", api_key="unused", max_retries=0)
    response = client.embeddings.create(model=NAME, input=texts, dimensions=32, encoding_format="float")
    served_vectors = np.array([item.embedding for item in response.data])
    assert served_vectors.shape == (len(texts), 32)
    np.testing.assert_allclose(np.linalg.norm(served_vectors, axis=1), 1, rtol=1e-5)
    assert_matches(served_vectors, reference[:, :32], f"{NAME} truncated to 32 over /v1/embeddings")


def test_compress_to_size_is_refused_for_it_alone(served, texts):
    refused = semantic(served, {"model": NAME, "prompts": texts[:2], "compress_to_size": 128})
    assert refused.status_code == 400, refused.text
    assert refused.json()["field"] == "compress_to_size" and "supported: [] or null" in refused.json()["error"]
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        request = pb.SemanticEmbedRequest(
            model=NAME, prompt=pb.Prompt(items=[pb.PromptItem(text=texts[0])]), compress_to_size=128
        )
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.EmbeddingServiceStub(channel).SemanticEmbed(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(raised.value.trailing_metadata())["field"] == "compress_to_size"
    compressed = semantic(served, {"model": MINILM, "prompts": texts[:2], "compress_to_size": 128})
    assert compressed.status_code == 200, compressed.text
    assert np.array(compressed.json()["embeddings"]).shape == (2, 128)


def test_the_listings_say_which_sizes_each_model_compresses_to(served):
    available = requests.get(f"{served.http_url}/models_available", timeout=10).json()
    assert {m["name"]: m["compress_to_sizes"] for m in available} == {MINILM: [128], NAME: []}
    # Both exported for the CPU here: the listing says where each one's encoder runs.
    assert {(m["precision"], m["target"], tuple(m["execution_providers"])) for m in available} == {
        ("fp32", "cpu", ("CPUExecutionProvider",))
    }
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        listed = pb_grpc.EmbeddingServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    assert {m.name: (m.dimensions, list(m.compress_to_sizes)) for m in listed.models} == {
        MINILM: (384, [128]),
        NAME: (NARROW, []),
    }
