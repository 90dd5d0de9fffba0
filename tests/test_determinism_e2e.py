"""End to end: a text's vector does not depend on what it is batched with. The same text embedded alone, in a request
with 64 long passages, in one with 64 other sentences, and as one of 200 concurrent requests, gets the same vector
(max abs difference <= 1e-6): the encoder step cuts every row to its own length whatever its batch, and fp32 has no
per-batch scale. A service that caches vectors (--cache-url) and answers repeated queries relies on it."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import requests

from bench.workload import passages, sentences

pytestmark = pytest.mark.e2e

TOLERANCE = 1e-6


def embed(service, model_name: str, texts: list[str]) -> np.ndarray:
    body = {"model": model_name, "input": texts, "encoding_format": "float"}
    response = requests.post(f"{service.http_url}/v1/embeddings", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


@pytest.mark.parametrize("index", [7, 311])
def test_a_text_gets_the_same_vector_whatever_it_is_batched_with(service, model_name, index):
    texts = sentences()
    target = texts[index]
    (alone,) = embed(service, model_name, [target])
    others = passages()[:64]
    with_passages = embed(service, model_name, [*others[:32], target, *others[32:]])[32]
    with_sentences = embed(service, model_name, [*texts[500:564], target])[-1]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        crowd = [pool.submit(embed, service, model_name, [text]) for text in texts[600:800]]
        (under_load,) = pool.submit(embed, service, model_name, [target]).result()
        assert all(len(future.result()) == 1 for future in crowd)
    for where, vector in [("with 64 passages", with_passages), ("with 64 sentences", with_sentences), ("under load", under_load)]:
        assert np.abs(vector - alone).max() <= TOLERANCE, where
