"""Dynamic batching really merges concurrent single-text requests in the encoder."""

import asyncio
import json
import urllib.request

import openai
import pytest

from export.datasets import sts_sentences
from repository_contract.naming import step_name

pytestmark = pytest.mark.e2e


def encoder_counts(service, model_name) -> tuple[int, int]:
    with urllib.request.urlopen(f"{service.triton_http_url}/v2/models/{step_name(model_name, 'encoder')}/stats") as response:
        stats = json.loads(response.read())["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


async def test_concurrent_single_text_requests_share_encoder_executions(service, model_name):
    # Short sentences all fall in the first length bucket, so only timing decides whether they merge.
    texts = [t for t in sts_sentences() if len(t.split()) <= 8][:32]
    assert len(texts) == 32
    client = openai.AsyncOpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)
    inferences_before, executions_before = encoder_counts(service, model_name)
    responses = await asyncio.gather(*(client.embeddings.create(model=model_name, input=text) for text in texts))
    inferences, executions = (a - b for a, b in zip(encoder_counts(service, model_name), (inferences_before, executions_before)))
    assert all(len(r.data) == 1 for r in responses)
    assert inferences == 32
    assert executions <= inferences // 4, f"{executions} encoder executions for {inferences} inferences"
