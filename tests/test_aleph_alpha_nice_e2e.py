"""?nice=true lowers the Triton priority: under a load of nice requests, normal requests are not held up."""

import asyncio
import statistics
import time

import aiohttp
import pytest
from aleph_alpha_client import (
    AsyncClient,
    BatchSemanticEmbeddingRequest,
    Prompt,
    SemanticRepresentation,
)

from export.datasets import sts_sentences
from harness.scrape import metric_sum
from harness.waiting import eventually

pytestmark = pytest.mark.e2e

# The queue a probe finds holds LOAD_CONCURRENCY requests of 100 prompts. The probes are as big: the gateway's
# scheduler serves requests with fewer rows first, so a one-prompt probe would overtake either load. Behind a
# normal load a 100-prompt probe waits its turn (seconds); behind a nice load only for the rows in flight.
LOAD_PROMPTS = 1800
LOAD_CONCURRENCY = 12
PROBES = 5
SYMMETRIC = SemanticRepresentation.Symmetric


async def pending_texts(session: aiohttp.ClientSession, url: str) -> float:
    """Texts in the gateway's scheduler, waiting or in flight (its gauge, read from memory)."""
    return await metric_sum(session, url, "embed_gateway_pending_texts")


async def probe_latencies_under_load(service, model_name, load_is_nice: bool) -> tuple[list[float], float]:
    """Latencies of normal 100-prompt requests sent together while a load of such requests fills the queue."""
    load = BatchSemanticEmbeddingRequest(
        prompts=[Prompt.from_text(t) for t in (sts_sentences() * 2)[:LOAD_PROMPTS]], representation=SYMMETRIC
    )
    probes = [
        BatchSemanticEmbeddingRequest(
            prompts=[Prompt.from_text(f"Is request {i}.{j} held up?") for j in range(100)], representation=SYMMETRIC
        )
        for i in range(PROBES)
    ]
    async with (
        AsyncClient(token="unused", host=service.http_url, nice=load_is_nice, total_retries=0) as load_client,
        AsyncClient(token="unused", host=service.http_url, total_retries=0) as probe_client,
        aiohttp.ClientSession() as metrics_session,
    ):

        async def timed(probe) -> float:
            sent = time.monotonic()
            await probe_client.batch_semantic_embed(probe, model=model_name)
            return time.monotonic() - sent

        started = time.monotonic()
        batches = load_client.batch_semantic_embed(
            load, model=model_name, num_concurrent_requests=LOAD_CONCURRENCY, batch_size=100
        )
        load_task = asyncio.create_task(batches)

        async def load_queued() -> bool:
            if load_task.done():
                load_task.result()  # its error, if it failed
                raise AssertionError("the load was served before the probes were sent")
            return await pending_texts(metrics_session, service.http_url) >= LOAD_CONCURRENCY * 100

        await eventually(load_queued, timeout_s=60, what=f"the load's {LOAD_CONCURRENCY} requests to be queued in the gateway")
        latencies = await asyncio.gather(*(timed(probe) for probe in probes))
        assert len((await load_task).embeddings) == LOAD_PROMPTS
        return latencies, time.monotonic() - started


async def test_nice_load_does_not_delay_normal_requests(service, model_name):
    behind_normal, normal_load_s = await probe_latencies_under_load(service, model_name, load_is_nice=False)
    behind_nice, nice_load_s = await probe_latencies_under_load(service, model_name, load_is_nice=True)
    report = (
        f"probe latencies (s) behind a normal load {behind_normal} ({normal_load_s:.1f}s), "
        f"behind a nice load {behind_nice} ({nice_load_s:.1f}s)"
    )
    print(report)
    # Behind a normal load the probes wait for the queue; behind a nice load only for the batches already executing.
    assert statistics.median(behind_nice) * 3 < statistics.median(behind_normal), report
    assert max(behind_nice) < nice_load_s / 2, report
