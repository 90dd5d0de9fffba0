"""End to end: three tiny models of other families, exported into one repository next to all-MiniLM and served
through one Triton, answer every contract with sentence-transformers' own vectors.

The models (tests/tiny_models.py) are real transformers architectures with random weights: a BERT with CLS
pooling, a Dense head and query/document prompts; a DistilBERT (no token_type_ids) with max pooling, two Dense
layers and a default prompt; a Qwen3-style decoder with last-token pooling on the end-of-sequence token and a
query instruction. Each is exported under a name of its own choosing (--name), as a user serving a model under
the name their clients already use would.
"""

import concurrent.futures
import json
import random
import shutil
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import requests
from aleph_alpha_client import BatchSemanticEmbeddingRequest, Client, Prompt, SemanticRepresentation

from export.datasets import sts_sentences
from export.steps.sentence_head import SentenceHead
from harness.repositories import copy_model
from harness.servers import MODEL_REPOSITORY, start_service
from proto.embedding.v1 import embedding_pb2 as pb
from proto.embedding.v1 import embedding_pb2_grpc as pb_grpc
from repository_contract.manifest import manifest_path
from repository_contract.naming import step_name
from repository_contract.tensors import ATTENTION_MASK, INPUT_IDS, TOKEN_EMBEDDINGS, onnx_name
from tests.test_export import export
from tests.tiny_models import BUILDERS

pytestmark = pytest.mark.e2e

# Served name -> (directory name in tests/tiny_models, the prompt_name sentence-transformers uses per representation
# and for encode() without one; "" means no prompt). This is the documented mapping, spelled out per model.
MODELS = {
    "bert-cls": ("tiny-bert-cls", {"query": "query", "document": "document", "symmetric": "", "default": None}),
    "distilbert-max": (
        "tiny-distilbert-max",
        {"query": "search_query", "document": "search_document", "symmetric": "clustering", "default": None},
    ),
    "qwen3-embedding": ("tiny-qwen3", {"query": "query", "document": "document", "symmetric": "", "default": None}),
}
MINILM = "all-minilm-l6-v2"
REPRESENTATIONS = {
    "query": SemanticRepresentation.Query,
    "document": SemanticRepresentation.Document,
    "symmetric": SemanticRepresentation.Symmetric,
}
GRPC_REPRESENTATIONS = {
    "query": pb.REPRESENTATION_QUERY,
    "document": pb.REPRESENTATION_DOCUMENT,
    "symmetric": pb.REPRESENTATION_SYMMETRIC,
}
MIN_COSINE = 0.9999


def export_next_to_minilm(repository: Path, model_dirs: dict[str, Path]) -> str:
    """all-MiniLM as bin/setup exported it, and the models of `model_dirs` (served name: directory) exported into the
    same repository by one command; the export's output."""
    copy_model(MODEL_REPOSITORY, repository, MINILM)
    args = ["--output-dir", str(repository), "--encoder-instances", "1"]
    for served, path in model_dirs.items():
        args += ["--model-dir", str(path), "--name", served]
    result = export(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {served: BUILDERS[directory](root / directory) for served, (directory, _) in MODELS.items()}


@pytest.fixture(scope="module")
def repository(tmp_path_factory, model_dirs):
    """all-MiniLM as bin/setup exported it, and the three tiny models exported into the same repository by one command."""
    repository = tmp_path_factory.mktemp("repository")
    output = export_next_to_minilm(repository, model_dirs)
    assert output.count("cosine min 1.000000") == len(MODELS), output
    return repository


@pytest.fixture(scope="module")
def served(tmp_path_factory, repository):
    running = start_service(tmp_path_factory.mktemp("families"), repository)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def texts():
    texts = sts_sentences()
    assert len(texts) == 1030
    return texts


@pytest.fixture(scope="module")
def reference(model_dirs, texts):
    """sentence-transformers' vectors per model and per prompt_name, computed once."""
    from sentence_transformers import SentenceTransformer

    vectors = {}
    for name, path in model_dirs.items():
        model = SentenceTransformer(str(path), device="cpu")
        for key, prompt_name in MODELS[name][1].items():
            options = {"prompt": ""} if prompt_name == "" else {"prompt_name": prompt_name}
            vectors[name, key] = model.encode(texts, batch_size=64, **options)
    return vectors


def assert_matches(served: np.ndarray, expected: np.ndarray, what: str) -> None:
    cosine = (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    worst = int(cosine.argmin())
    assert cosine.min() >= MIN_COSINE, f"{what}: sentence {worst} has cosine {cosine[worst]:.6f}"


def in_chunks(texts: list[str], size: int = 256):
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def test_every_model_is_listed_by_every_contract(served):
    names = {MINILM, *MODELS}
    assert {m["id"] for m in requests.get(f"{served.http_url}/v1/models", timeout=10).json()["data"]} == names
    available = {m["name"]: m for m in requests.get(f"{served.http_url}/models_available", timeout=10).json()}
    assert set(available) == names
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        listed = pb_grpc.EmbeddingServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    assert {m.name: m.dimensions for m in listed.models} == {
        MINILM: 384,
        "bert-cls": 160,
        "distilbert-max": 144,
        "qwen3-embedding": 192,
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_openai_contract_matches_encode_with_the_default_prompt_for_every_sentence(served, reference, texts, name):
    client = openai.OpenAI(base_url=f"{served.http_url}/v1", api_key="unused", max_retries=0)
    vectors = []
    for chunk in in_chunks(texts):
        response = client.embeddings.create(model=name, input=chunk, encoding_format="float")
        assert response.model == name
        vectors += [d.embedding for d in response.data]
    assert_matches(np.array(vectors), reference[name, "default"], f"{name} over /v1/embeddings")


@pytest.mark.parametrize("representation", list(REPRESENTATIONS))
@pytest.mark.parametrize("name", list(MODELS))
def test_aleph_alpha_representations_apply_the_models_prompts_for_every_sentence(served, reference, texts, name, representation):
    client = Client(token="unused", host=served.http_url, total_retries=0)
    vectors = []
    for chunk in in_chunks(texts):
        request = BatchSemanticEmbeddingRequest(
            prompts=[Prompt.from_text(t) for t in chunk], representation=REPRESENTATIONS[representation]
        )
        vectors += client.batch_semantic_embed(request, model=name).embeddings
    assert_matches(np.array(vectors), reference[name, representation], f"{name} {representation} over /batch_semantic_embed")


@pytest.mark.parametrize("name", list(MODELS))
def test_grpc_matches_encode_for_every_sentence(served, reference, texts, name):
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        plain, query = [], []
        for chunk in in_chunks(texts):
            reply = stub.Embed(pb.EmbedRequest(model=name, inputs=chunk), timeout=60)
            assert reply.model == name
            plain += [list(e.values) for e in reply.embeddings]
            prompts = [pb.Prompt(items=[pb.PromptItem(text=t)]) for t in chunk]
            batch = stub.BatchSemanticEmbed(
                pb.BatchSemanticEmbedRequest(model=name, prompts=prompts, representation=pb.REPRESENTATION_QUERY), timeout=60
            )
            query += [list(e.values) for e in batch.embeddings]
    assert_matches(np.array(plain), reference[name, "default"], f"{name} over gRPC Embed")
    assert_matches(np.array(query), reference[name, "query"], f"{name} query over gRPC BatchSemanticEmbed")


@pytest.mark.parametrize("name", list(MODELS))
def test_compress_to_size_128_is_the_exported_projection_of_the_full_vector(served, repository, reference, texts, name):
    manifest = json.loads((repository / name / "embedding_manifest.json").read_text())
    components = np.load(repository / manifest["steps"]["compression"] / "1" / "projection.npy")
    client = Client(token="unused", host=served.http_url, total_retries=0)
    prompts = [Prompt.from_text(t) for t in texts[:64]]
    request = BatchSemanticEmbeddingRequest(prompts=prompts, representation=SemanticRepresentation.Document, compress_to_size=128)
    response = client.batch_semantic_embed(request, model=name)
    compressed = np.array(response.embeddings)
    assert compressed.shape == (64, 128)
    assert response.model_version.startswith(f"{manifest['model_version']}-{manifest['compression']['method']}128-")
    assert_matches(compressed, reference[name, "document"][:64] @ components.T, f"{name} compressed")


def test_embed_layers_last_token_of_the_decoder_is_its_sentence_vector(served, reference, texts):
    """The decoder's last layer pooled at the last token (the end-of-sequence token the tokenizer appends) is what
    its last-token pooling embeds, before Normalize: so /embed picks the real last token too."""
    for index in (0, 1, 517):
        body = {"model": "qwen3-embedding", "prompt": texts[index], "layers": [-1], "pooling": ["last_token"]}
        response = requests.post(f"{served.http_url}/embed", json=body, timeout=60)
        assert response.status_code == 200, response.text
        vector = np.array(response.json()["embeddings"]["layer_-1"]["last_token"])[None]
        assert_matches(vector, reference["qwen3-embedding", "default"][index][None], f"/embed last_token of sentence {index}")


def test_decoder_rows_padded_to_gpu_buckets_keep_their_vectors(repository, reference, texts):
    """GPU encoders take rows right-padded to a length bucket. The exported decoder and the pooling step, run the
    same way here by onnxruntime, give each row the vector it has alone: the causal mask keeps padding out of
    every real token, and last-token pooling finds the end-of-sequence token wherever the padding starts."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    manifest = json.loads(manifest_path(repository, "qwen3-embedding").read_text())
    session = ort.InferenceSession(
        str(repository / manifest["steps"]["encoder"] / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    head = SentenceHead.load(repository / manifest["steps"]["pooling"] / "1")
    tokenizer = Tokenizer.from_file(str(repository / manifest["tokenizer"]))
    encodings = [tokenizer.encode(t).ids for t in texts[:16]]
    ids = np.full((16, 64), manifest["pad_token_id"], dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, sequence in enumerate(encodings):
        ids[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    (tokens,) = session.run([onnx_name(TOKEN_EMBEDDINGS)], {onnx_name(INPUT_IDS): ids, onnx_name(ATTENTION_MASK): mask})
    assert_matches(head(tokens, mask), reference["qwen3-embedding", "default"][:16], "bucket-padded decoder rows")


def test_concurrent_mixed_traffic_gets_every_vector_from_the_right_model(served, reference, texts):
    rng = random.Random(7)
    jobs = [(rng.choice(list(MODELS)), rng.randrange(len(texts))) for _ in range(240)]

    def ask(job):
        name, index = job
        response = requests.post(
            f"{served.http_url}/v1/embeddings",
            json={"model": name, "input": texts[index], "encoding_format": "float"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name
        return np.array(response.json()["data"][0]["embedding"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, index), vector in zip(jobs, answers):
        assert_matches(vector[None], reference[name, "default"][index][None], f"{name} sentence {index} under mixed traffic")
    counts = {name: sum(1 for n, _ in jobs if n == name) for name in MODELS}
    assert min(counts.values()) > 40, counts


def test_a_removed_model_is_dropped_cleanly_on_restart(tmp_path, repository):
    """One model removed with --remove, another by deleting only its entry directory (manifest and all): after a
    restart neither is served, and Triton loads none of the second one's steps left on disk."""
    copy = tmp_path / "repository"
    for name in (MINILM, *MODELS):
        copy_model(repository, copy, name)
    removed = export("--remove", "distilbert-max", "--output-dir", str(copy))
    assert removed.returncode == 0, removed.stderr
    assert not any(p.name.startswith("distilbert-max") for p in copy.iterdir())
    unknown = export("--remove", "distilbert-max", "--output-dir", str(copy))
    assert unknown.returncode == 2 and "not found" in unknown.stderr and "bert-cls" in unknown.stderr
    shutil.rmtree(copy / "qwen3-embedding")
    running = start_service(tmp_path / "run", copy)
    try:
        assert {m["id"] for m in requests.get(f"{running.http_url}/v1/models", timeout=10).json()["data"]} == {MINILM, "bert-cls"}
        for name in ("distilbert-max", "qwen3-embedding"):
            gone = requests.post(f"{running.http_url}/v1/embeddings", json={"model": name, "input": "hello"}, timeout=10)
            assert gone.status_code == 404 and name in gone.json()["error"]["message"]
        kept = requests.post(f"{running.http_url}/v1/embeddings", json={"model": "bert-cls", "input": "hello"}, timeout=30)
        assert kept.status_code == 200
        # The repository API answers only the operator, who has the key the gateway wrote for its Triton.
        admin = {"admin-key": (running.run_dir / "triton-admin-key").read_text().strip()}
        index = requests.post(f"{running.triton_http_url}/v2/repository/index", json={}, headers=admin, timeout=10).json()
        assert step_name("qwen3-embedding", "encoder") in {m["name"] for m in index}, "the leftover steps are still on disk"
        loaded = {m["name"] for m in index if m.get("state") == "READY"}
        assert not any(name.startswith(("distilbert-max", "qwen3-embedding")) for name in loaded), loaded
    finally:
        running.stop()


@pytest.mark.parametrize("representation", ["query", "symmetric"])
@pytest.mark.parametrize("name", list(MODELS))
def test_attention_controls_match_the_reference_for_every_family(served, repository, model_dirs, texts, name, representation):
    """The controlled cases of tests/test_attention_controls_e2e.py, on each family, with the representation's prompt
    as the prefix the controls' positions are shifted by."""
    from tokenizers import Tokenizer

    from tests.test_attention_controls_e2e import assert_cases_match_the_reference, cases, served_vectors

    manifest = json.loads((repository / name / "embedding_manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(repository / manifest["tokenizer"]))
    case_list = cases(texts, lambda text: tokenizer.encode(text, add_special_tokens=False).ids)[::3]
    vectors = served_vectors(served.http_url, served.grpc_port, name, case_list, representation)
    assert_cases_match_the_reference(model_dirs[name], manifest["prefixes"][representation], case_list, vectors)
