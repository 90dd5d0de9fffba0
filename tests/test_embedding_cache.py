"""The embedding cache against a real Redis (a throwaway redis-server), without Triton: what it files, finds, bounds
and forgets, and that a Redis that is down or killed only costs the speed-up.

Through the gateway and across replicas it is tests/test_scale_out_e2e.py.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from gateway.core.cache import EmbeddingCache, cache_key, decode_entry, encode_entry
from gateway.ops.metrics import Metrics
from harness.redis_server import RedisServer
from harness.servers import free_ports, starts_servers
from tests.test_metrics_and_logs import samples, value


@pytest.fixture(scope="module")
@starts_servers
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


async def settled(cache: EmbeddingCache) -> None:
    """Until the background writes are done."""
    while cache._writes:
        await asyncio.sleep(0.01)


def vectors(rows: int, dimensions: int = 4) -> np.ndarray:
    return np.arange(rows * dimensions, dtype=np.float32).reshape(rows, dimensions) / 7


@pytest.mark.e2e
async def test_what_is_stored_is_found_by_version_and_text_with_its_token_count(redis_server, metrics):
    cache = EmbeddingCache(redis_server.url, metrics, ttl_s=60, max_bytes=0)
    try:
        assert await cache.lookup("m-1", ["a", "b"], 4, 256) == [None, None]
        cache.store("m-1", ["a", "b"], vectors(2), np.array([3, 300]))
        await settled(cache)
        found = await cache.lookup("m-1", ["b", "c", "a"], 4, 256)
        assert found[1] is None
        np.testing.assert_array_equal(found[0][0], vectors(2)[1])
        np.testing.assert_array_equal(found[2][0], vectors(2)[0])
        # The raw count is kept (an overlong text is still refused without truncation), the saving counts what the
        # encoder would have read.
        assert (found[0][1], found[2][1]) == (300, 3)
        # Another model version, or another text, is another entry.
        assert await cache.lookup("m-2", ["a"], 4, 256) == [None]
        assert await cache.lookup("m-1", ["a "], 4, 256) == [None]
        found = samples(metrics)
        assert value(found, "embed_gateway_cache_texts_total", result="hit") == 2
        assert value(found, "embed_gateway_cache_texts_total", result="miss") == 5
        assert value(found, "embed_gateway_cache_tokens_saved_total") == 256 + 3
        assert value(found, "embed_gateway_cache_writes_total", result="stored") == 2
        ttl = redis_server.client().ttl(cache_key("m-1", "a"))
        assert 0 < ttl <= 60
    finally:
        await cache.close()


def test_a_gateway_without_a_cache_exports_no_cache_series():
    # A cache_up of 0 would read as a cache that is down.
    assert not [name for name, _ in samples(Metrics()) if name.startswith("embed_gateway_cache")]


def test_an_entry_of_another_size_is_no_hit():
    entry = encode_entry(vectors(1)[0], 9)
    vector, count = decode_entry(entry, 4)
    assert count == 9 and vector.tolist() == vectors(1)[0].tolist()
    assert decode_entry(entry, 8) is None


@pytest.mark.e2e
async def test_the_server_is_bounded_with_lru_eviction(redis_server, metrics):
    cache = EmbeddingCache(redis_server.url, metrics, ttl_s=60, max_bytes=64 * 1024 * 1024)
    try:
        await cache.configure()
        config = redis_server.client().config_get("maxmemory*")
        assert config["maxmemory"] == str(64 * 1024 * 1024) and config["maxmemory-policy"] == "allkeys-lru"
    finally:
        await cache.close()
        redis_server.client().config_set("maxmemory", 0)


@pytest.mark.e2e
async def test_a_cache_that_is_down_costs_no_wait_and_is_taken_up_again(metrics):
    with RedisServer() as server:
        cache = EmbeddingCache(server.url, metrics, ttl_s=60, max_bytes=0, retry_s=0.5)
        try:
            cache.store("m", ["a"], vectors(1), np.array([2]))
            await settled(cache)
            server.kill()
            started = time.monotonic()
            assert await cache.lookup("m", ["a"], 4, 256) == [None]
            # Skipped while down: no connection attempt, so no timeout to wait for.
            for _ in range(50):
                assert await cache.lookup("m", ["a"], 4, 256) == [None]
            assert time.monotonic() - started < 0.5
            found = samples(metrics)
            assert value(found, "embed_gateway_cache_up") == 0
            assert value(found, "embed_gateway_cache_texts_total", result="unavailable") == 51
            server.start()  # empty again, as a crashed cache is
            await asyncio.sleep(0.6)
            cache.store("m", ["a"], vectors(1), np.array([2]))
            await settled(cache)
            (hit,) = await cache.lookup("m", ["a"], 4, 256)
            assert hit is not None and value(samples(metrics), "embed_gateway_cache_up") == 1
        finally:
            await cache.close()


async def test_a_cache_nobody_listens_at_answers_misses_within_its_timeout(metrics):
    (port,) = free_ports(1)
    cache = EmbeddingCache(f"redis://127.0.0.1:{port}/0", metrics, ttl_s=60, max_bytes=1024)
    try:
        started = time.monotonic()
        assert await cache.lookup("m", ["a", "b"], 4, 256) == [None, None]
        await cache.configure()
        assert time.monotonic() - started < 1.0 and not cache.up
    finally:
        await cache.close()
