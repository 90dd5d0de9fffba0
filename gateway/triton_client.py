"""The one place that talks to Triton: builds inference requests for the ensembles and maps its failures."""

from __future__ import annotations

import asyncio

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.errors import ErrorKind, ServiceError

# Triton's dynamic batcher serves lower numbers first; level 1 is normal traffic, 2 is `nice`.
PRIORITY_NORMAL = 1
PRIORITY_NICE = 2


def _backend_error(error: InferenceServerException) -> ServiceError:
    status = str(error.status() or "")
    if "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status:
        return ServiceError(ErrorKind.UNAVAILABLE, "the inference server is unavailable, retry shortly")
    if "RESOURCE_EXHAUSTED" in status:
        return ServiceError(ErrorKind.OVERLOADED, "the inference server is overloaded, retry shortly")
    return ServiceError(ErrorKind.BACKEND, f"inference failed: {error.message()}")


# Texts per request when a long list is split by length; small enough that one long text pads few others.
SORTED_CHUNK = 32


def _in_order(groups: list[list[int]], results: list[tuple[np.ndarray, np.ndarray]], total: int) -> tuple[np.ndarray, np.ndarray]:
    """Puts each group's rows back at the input positions the group lists."""
    order = np.concatenate([np.array(members) for members in groups])
    values = np.empty((total, *results[0][0].shape[1:]), dtype=np.float32)
    counts = np.empty(total, dtype=np.int64)
    values[order] = np.concatenate([r[0] for r in results])
    counts[order] = np.concatenate([r[1] for r in results])
    return values, counts


class TritonClient:
    def __init__(self, url: str):
        self.url = url
        self._client = grpcclient.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, model: str) -> bool:
        try:
            return await self._client.is_model_ready(model)
        except InferenceServerException:
            return False

    async def model_statistics(self, model: str) -> dict:
        return await self._client.get_inference_statistics(model, as_json=True)

    async def _infer(
        self, ensemble: str, tensor: grpcclient.InferInput, priority: int, output: str
    ) -> tuple[np.ndarray, np.ndarray]:
        outputs = [grpcclient.InferRequestedOutput(output), grpcclient.InferRequestedOutput("TOKEN_COUNT")]
        try:
            result = await self._client.infer(ensemble, [tensor], outputs=outputs, priority=priority)
        except InferenceServerException as error:
            raise _backend_error(error) from None
        return result.as_numpy(output), result.as_numpy("TOKEN_COUNT").reshape(-1)

    async def embed_texts(
        self, ensemble: str, texts: list[str], max_batch: int, priority: int = PRIORITY_NORMAL, output: str = "EMBEDDING"
    ):
        """The ensemble's `output` rows and untruncated token counts, in input order; chunks run concurrently.

        The tokenizer step pads each request to the bucket of its longest text, so texts are sent sorted by
        length in chunks of SORTED_CHUNK: short texts are not padded to a long one's bucket, and the
        encoder's batcher merges the chunks that land in the same bucket again.
        """
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        size = min(max_batch, SORTED_CHUNK)
        chunks = [order[i : i + size] for i in range(0, len(order), size)]

        async def chunk(members: list[int]):
            tensor = grpcclient.InferInput("TEXT", [len(members), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([texts[i].encode("utf-8") for i in members], dtype=np.object_).reshape(-1, 1))
            return await self._infer(ensemble, tensor, priority, output)

        return _in_order(chunks, await asyncio.gather(*(chunk(members) for members in chunks)), len(texts))

    async def embed_token_ids(
        self,
        ensemble: str,
        sequences: list[list[int]],
        max_batch: int,
        priority: int = PRIORITY_NORMAL,
        output: str = "EMBEDDING",
    ):
        """Like embed_texts for token id sequences; sequences of equal length share a request."""
        by_length: dict[int, list[int]] = {}
        for index, ids in enumerate(sequences):
            by_length.setdefault(len(ids), []).append(index)
        groups = [members[i : i + max_batch] for members in by_length.values() for i in range(0, len(members), max_batch)]

        async def group(members: list[int]):
            tensor = grpcclient.InferInput("TOKEN_IDS", [len(members), len(sequences[members[0]])], "INT64")
            tensor.set_data_from_numpy(np.array([sequences[i] for i in members], dtype=np.int64))
            return await self._infer(ensemble, tensor, priority, output)

        return _in_order(groups, await asyncio.gather(*(group(members) for members in groups)), len(sequences))
