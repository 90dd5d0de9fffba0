"""Server-side batching for a stream of single texts: one core call per batch instead of one per text.

While the stream's batches in flight are at their limit, new texts wait in a bounded inbox; the next batch
takes everything waiting (up to max_batch). Light streams so get low latency and busy ones big batches, and
a client that sends faster than the service embeds is slowed by gRPC flow control instead of filling memory.

Every item is answered, with its vector or with an error, and a failed batch never ends the stream: a
ServiceError answers each id of the batch with that error, and any other exception is logged and answers
each id with internal(). A validation error of a batch of several texts is first narrowed down by embedding
its texts one by one, so that one bad text does not fail its neighbours. Only a request stream that breaks
(a message that does not decode, say) ends the stream, with that error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gateway.core.errors import ErrorKind, ServiceError, internal
from gateway.core.service import EmbedCall, EmbeddingService

logger = logging.getLogger("gateway")

_END = object()


class StreamItem(Protocol):
    id: str
    text: str
    model: str
    encoding: int  # not used here: the transport checks it (`check`) and renders the item's reply in it

    def HasField(self, name: str) -> bool: ...


@dataclass(frozen=True)
class StreamReply:
    """The answer to one item: its vector and token count, or the error that kept it from being embedded."""

    item: StreamItem
    vector: np.ndarray | None = None
    token_count: int = 0
    error: ServiceError | None = None


def _options(item: StreamItem) -> tuple:
    """Texts share a core call only when everything but the text is the same."""
    optional = lambda name: getattr(item, name) if item.HasField(name) else None  # noqa: E731
    return item.model, optional("dimensions"), optional("truncate")


class StreamBatcher:
    def __init__(
        self,
        service: EmbeddingService,
        max_batch: int,
        check: Callable[[StreamItem], ServiceError | None],
        batches_in_flight: int = 4,
    ):
        self.service = service
        self.max_batch = max_batch
        self.batches_in_flight = batches_in_flight
        # What the transport itself refuses in an item (an encoding it does not know, say): that item is
        # answered with the error at once, and never reaches the core.
        self.check = check

    async def embed(self, items: AsyncIterator[StreamItem]) -> AsyncIterator[StreamReply]:
        """One StreamReply per item, in completion order; raises only what breaks the request stream itself."""
        inbox: asyncio.Queue = asyncio.Queue(maxsize=self.max_batch * self.batches_in_flight)
        outbox: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._read(items, inbox, outbox)), asyncio.create_task(self._dispatch(inbox, outbox))]
        try:
            while (done := await outbox.get()) is not _END:
                if isinstance(done, BaseException):
                    raise done
                for reply in done:
                    yield reply
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
        except Exception as error:
            # _embed_batch answers its own failures, so this is a bug here; end the stream rather than hang it.
            logger.error("EmbedStream batching failed", exc_info=error)
            outbox.put_nowait(internal())
            return
        finally:
            # Reached early only when the stream is gone (or broken); its batches in flight have nobody to answer.
            for task in running:
                task.cancel()
        outbox.put_nowait(_END)

    async def _embed_batch(self, batch: list[StreamItem], outbox: asyncio.Queue) -> None:
        groups: dict[tuple, list[StreamItem]] = {}
        refused = []
        for item in batch:
            if (error := self.check(item)) is not None:
                refused.append(StreamReply(item, error=error))
            else:
                groups.setdefault(_options(item), []).append(item)
        if refused:
            outbox.put_nowait(refused)
        for options, members in groups.items():
            outbox.put_nowait(await self._embed_group(options, members))

    async def _embed_group(self, options: tuple, members: list[StreamItem]) -> list[StreamReply]:
        """One reply per member: the vectors of one core call, or each member's error."""
        model, dimensions, truncate = options
        texts = [m.text for m in members]
        call = EmbedCall(model=model, texts=texts, dimensions=dimensions, truncate=truncate, input_field="text")
        try:
            result = await self.service.embed(call)
        except ServiceError as error:
            if error.kind is ErrorKind.VALIDATION and len(members) > 1:
                # Which text is at fault: each one alone, one after the other so as not to take more admission
                # slots than the batch did. Only on failure, and at most one extra call per text.
                replies = []
                for member in members:
                    replies += await self._embed_group(options, [member])
                return replies
            return [StreamReply(member, error=error) for member in members]
        except Exception as error:
            ids = ", ".join(repr(m.id) for m in members)
            logger.error("EmbedStream batch of ids [%s] failed", ids, exc_info=error)
            return [StreamReply(member, error=internal()) for member in members]
        return [
            StreamReply(member, vector, count)
            for member, vector, count in zip(members, result.embeddings, result.token_counts.tolist())
        ]
