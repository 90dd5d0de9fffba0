"""A text-level embedding cache in Redis, shared by every gateway replica.

Query traffic repeats heavily (the same searches, the same chunks re-embedded), and an embedding costs
milliseconds of encoder time while a Redis lookup costs a fraction of one. A request's texts are looked up in
one MGET; only the misses go to Triton, and they are written back after the answer has left, so a hit skips
Triton entirely and a miss costs one round trip more.

The key is a digest of everything that decides the vector: the model_version (the graph's digest; the
compressed ensemble has its own), the longest input the export reads, and the text exactly as the model sees
it, the representation's or prompt's prefix included. Normalization and `dimensions` are applied after the
cache, so one entry serves every variant of them. The value is the raw token count and the float32 vector.

A cache that is down or slow must only cost its speed-up: each operation gives up after timeout_s, and after
a failure the cache is skipped for retry_s instead of costing every request a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from typing import cast

import numpy as np
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from gateway.ops.metrics import Metrics
from gateway.ops.settings import redacted_setting

log = logging.getLogger("gateway.cache")

KEY_PREFIX = "embed:v1:"
_COUNT = struct.Struct("<I")
# Writes waiting for Redis at most; past it, new misses are not cached. A slow Redis must not grow the gateway.
MAX_PENDING_WRITES = 64


def cache_key(version: str, text: str) -> str:
    digest = hashlib.blake2b(f"{version}\0{text}".encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()
    return KEY_PREFIX + digest


def encode_entry(vector: np.ndarray, count: int) -> bytes:
    return _COUNT.pack(count) + vector.astype("<f4", copy=False).tobytes()


def decode_entry(value: bytes, dimensions: int) -> tuple[np.ndarray, int] | None:
    """The cached (vector, token count), or None for an entry of another shape (written by another export)."""
    if len(value) != _COUNT.size + 4 * dimensions:
        return None
    return np.frombuffer(value, dtype="<f4", offset=_COUNT.size), _COUNT.unpack_from(value)[0]


class EmbeddingCache:
    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        ttl_s: int,
        max_bytes: int,
        timeout_s: float = 0.1,
        retry_s: float = 2.0,
    ):
        self.url = url
        self.metrics = metrics
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._redis = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._skip_until = 0.0
        self._configured = max_bytes <= 0
        self._writes: set[asyncio.Task] = set()
        metrics.watch_cache(lambda: self.up)

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, what: str, error: Exception) -> None:
        if self.up:
            log.warning(
                "the embedding cache failed to %s (%s); requests go to Triton for %.0f s",
                what,
                error or type(error).__name__,
                self.retry_s,
            )
        self._skip_until = time.monotonic() + self.retry_s

    async def configure(self) -> None:
        """Bounds the server's memory with LRU eviction, once it answers. Managed Redis services may refuse CONFIG;
        their own maxmemory then bounds the cache, which is said once in the log."""
        if self._configured or not self.up:
            return
        try:
            async with asyncio.timeout(self.timeout_s * 10):
                await self._redis.config_set("maxmemory", self.max_bytes)
                await self._redis.config_set("maxmemory-policy", "allkeys-lru")
            log.info(
                "embedding cache at %s: at most %d bytes, least recently used evicted first",
                redacted_setting("cache_url", self.url),
                self.max_bytes,
            )
        except ResponseError as error:
            log.warning("the cache's Redis refused CONFIG SET (%s); its own maxmemory and policy bound the cache", error)
        except (RedisError, OSError, TimeoutError) as error:
            self._failed("configure", error)
            return
        self._configured = True

    async def run(self) -> None:
        """Configures the server as soon as it answers; a cache down at start is taken up when it comes back."""
        while not self._configured:
            await self.configure()
            await asyncio.sleep(self.retry_s)

    async def lookup(
        self, version: str, texts: list[str], dimensions: int, max_tokens: int
    ) -> list[tuple[np.ndarray, int] | None]:
        """Each text's cached (vector, token count), or None where it must be computed."""
        if not self.up:
            self.metrics.cache_looked_up("unavailable", len(texts))
            return [None] * len(texts)
        try:
            async with asyncio.timeout(self.timeout_s):
                # A client without decode_responses answers bytes; redis types every reply as bytes | str.
                values = cast(list[bytes | None], await self._redis.mget([cache_key(version, text) for text in texts]))
        except (RedisError, OSError, TimeoutError) as error:
            self._failed("answer a lookup", error)
            self.metrics.cache_looked_up("unavailable", len(texts))
            return [None] * len(texts)
        found = [decode_entry(value, dimensions) if value is not None else None for value in values]
        hits = [entry for entry in found if entry is not None]
        self.metrics.cache_looked_up("hit", len(hits), tokens_saved=sum(min(count, max_tokens) for _, count in hits))
        self.metrics.cache_looked_up("miss", len(texts) - len(hits))
        return found

    def store(self, version: str, texts: list[str], vectors: np.ndarray, counts: np.ndarray) -> None:
        """Writes the computed embeddings in the background: the caller's answer does not wait for Redis."""
        if not texts or not self.up:
            return
        if len(self._writes) >= MAX_PENDING_WRITES:
            self.metrics.cache_written("skipped", len(texts))
            return
        entries = {
            cache_key(version, text): encode_entry(vector, int(count)) for text, vector, count in zip(texts, vectors, counts)
        }
        task = asyncio.create_task(self._write(entries))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, entries: dict[str, bytes]) -> None:
        try:
            async with asyncio.timeout(self.timeout_s * 5):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, value in entries.items():
                        pipe.set(key, value, ex=self.ttl_s)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as error:
            self._failed("store embeddings", error)
            self.metrics.cache_written("failed", len(entries))
        else:
            self.metrics.cache_written("stored", len(entries))

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await self._redis.aclose()
