"""Server-side batching for a stream of single texts: one core call per batch instead of one per text.

While the stream's batches in flight are at their limit, new texts wait in a bounded inbox; the next batch
takes everything waiting (up to max_batch). Light streams so get low latency and busy ones big batches, and
a client that sends faster than the service embeds is slowed by gRPC flow control instead of filling memory.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol

import numpy as np

from gateway.embedding_service import EmbedCall, EmbeddingService
from gateway.errors import ServiceError

_END = object()


class StreamItem(Protocol):
    id: str
    text: str
    model: str

    def HasField(self, name: str) -> bool: ...


def _options(item: StreamItem) -> tuple:
    """Texts share a core call only when everything but the text is the same."""
    optional = lambda name: getattr(item, name) if item.HasField(name) else None  # noqa: E731
    return item.model, optional("dimensions"), optional("truncate")


class StreamBatcher:
    def __init__(self, service: EmbeddingService, max_batch: int, batches_in_flight: int = 4):
        self.service = service
        self.max_batch = max_batch
        self.batches_in_flight = batches_in_flight

    async def embed(self, items: AsyncIterator[StreamItem]) -> AsyncIterator[tuple[StreamItem, np.ndarray, int]]:
        """(item, vector, token count) for every item, in completion order; a ServiceError ends the stream."""
        inbox: asyncio.Queue = asyncio.Queue(maxsize=self.max_batch * self.batches_in_flight)
        outbox: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._read(items, inbox, outbox)), asyncio.create_task(self._dispatch(inbox, outbox))]
        try:
            while (done := await outbox.get()) is not _END:
                if isinstance(done, BaseException):
                    raise done
                for result in done:
                    yield result
        finally:
            for task in tasks:
                task.cancel()

    async def _read(self, items, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        try:
            async for item in items:
                await inbox.put(item)
        except Exception as error:
            outbox.put_nowait(error)
            return
        await inbox.put(_END)

    async def _take(self, inbox: asyncio.Queue) -> tuple[list[StreamItem], bool]:
        """The items waiting now (at least one, or the end), and whether the stream has ended."""
        batch = []
        item = await inbox.get()
        while item is not _END:
            batch.append(item)
            if len(batch) == self.max_batch or inbox.empty():
                return batch, False
            item = inbox.get_nowait()
        return batch, True

    async def _dispatch(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        slots = asyncio.Semaphore(self.batches_in_flight)
        running: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            running.discard(task)
            slots.release()

        ended = False
        try:
            while not ended:
                await slots.acquire()
                batch, ended = await self._take(inbox)
                task = asyncio.create_task(self._embed_batch(batch, outbox))
                running.add(task)
                task.add_done_callback(finished)
            await asyncio.gather(*running)
        finally:
            # Reached early only when the stream is gone; its batches in flight have nobody to answer.
            for task in running:
                task.cancel()
        outbox.put_nowait(_END)

    async def _embed_batch(self, batch: list[StreamItem], outbox: asyncio.Queue) -> None:
        groups: dict[tuple, list[StreamItem]] = {}
        for item in batch:
            groups.setdefault(_options(item), []).append(item)
        for (model, dimensions, truncate), members in groups.items():
            call = EmbedCall(model=model, texts=[m.text for m in members], dimensions=dimensions, truncate=truncate, input_field="text")
            try:
                result = await self.service.embed(call)
            except ServiceError as error:
                ids = ", ".join(repr(m.id) for m in members)
                outbox.put_nowait(ServiceError(error.kind, f"batch of ids [{ids}]: {error.message}", error.param))
                return
            outbox.put_nowait(list(zip(members, result.embeddings, result.token_counts.tolist())))
