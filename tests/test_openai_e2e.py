"""End to end: the official openai client against the real gateway and Triton."""

import numpy as np
import openai
import pytest
from sentence_transformers import SentenceTransformer

from export.datasets import sts_sentences
from export.source_model import default_model_path

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference_model():
    return SentenceTransformer(str(default_model_path()), device="cpu")


def test_default_base64_matches_explicit_float(client, model_name):
    texts = ["The cat sits outside.", "A man is playing guitar."]
    default = client.embeddings.create(model=model_name, input=texts)
    floats = client.embeddings.create(model=model_name, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    # JSON carries the float32 values in shortest form; read back as float32 they must be bit-identical.
    as_float32 = lambda response: np.array([d.embedding for d in response.data], dtype=np.float32)  # noqa: E731
    np.testing.assert_array_equal(as_float32(default), as_float32(floats))
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0


def test_every_sts_sentence_matches_sentence_transformers(client, model_name, reference_model):
    texts = sts_sentences()
    assert len(texts) == 1030
    served = np.concatenate(
        [
            [d.embedding for d in client.embeddings.create(model=model_name, input=texts[i : i + 100]).data]
            for i in range(0, len(texts), 100)
        ]
    )
    expected = reference_model.encode(texts, batch_size=64)
    cosine = (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    worst = int(cosine.argmin())
    assert cosine.min() >= 0.9999, f"sentence {worst} {texts[worst]!r}: cosine {cosine[worst]}"
