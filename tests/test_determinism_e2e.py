"""End to end: a text's vector does not depend on what it is batched with, at every precision the CPU serves. The same
text embedded alone, in a request with 64 long passages, in one with 64 other sentences, and as one of 200 concurrent
requests, gets the same vector (max abs difference <= 1e-6): the encoder step cuts every row to its own length whatever
its batch; fp32 has no per-batch scale, and int8 scales each token's activations on their own (export.per_token_int8)
where onnxruntime's dynamic quantization scales a whole run's together. A service that caches vectors (--cache-url) and
answers repeated queries relies on it."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import requests

from bench.workload import passages, sentences
from harness.servers import start_service, starts_servers
from tests.test_export import export

pytestmark = pytest.mark.e2e

TOLERANCE = 1e-6


def embed(service, model_name: str, texts: list[str]) -> np.ndarray:
    body = {"model": model_name, "input": texts, "encoding_format": "float"}
    response = requests.post(f"{service.http_url}/v1/embeddings", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
@starts_servers
def int8_service(tmp_path_factory):
    repository = tmp_path_factory.mktemp("int8-repository")
    result = export("--precision", "int8", "--output-dir", str(repository), "--encoder-instances", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    running = start_service(tmp_path_factory.mktemp("int8"), repository)
    yield running
    running.stop()


@pytest.fixture(params=["fp32", "int8"])
def served(request):
    return request.getfixturevalue("service" if request.param == "fp32" else "int8_service")


@pytest.mark.parametrize("index", [7, 311])
def test_a_text_gets_the_same_vector_whatever_it_is_batched_with(served, model_name, index):
    texts = sentences()
    target = texts[index]
    (alone,) = embed(served, model_name, [target])
    others = passages()[:64]
    with_passages = embed(served, model_name, [*others[:32], target, *others[32:]])[32]
    with_sentences = embed(served, model_name, [*texts[500:564], target])[-1]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        crowd = [pool.submit(embed, served, model_name, [text]) for text in texts[600:800]]
        (under_load,) = pool.submit(embed, served, model_name, [target]).result()
        assert all(len(future.result()) == 1 for future in crowd)
    for where, vector in [("with 64 passages", with_passages), ("with 64 sentences", with_sentences), ("under load", under_load)]:
        assert np.abs(vector - alone).max() <= TOLERANCE, where
