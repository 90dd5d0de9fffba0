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

    async def _infer(self, ensemble: str, tensor: grpcclient.InferInput, priority: int, output: str) -> tuple[np.ndarray, np.ndarray]:
        outputs = [grpcclient.InferRequestedOutput(output), grpcclient.InferRequestedOutput("TOKEN_COUNT")]
        try:
            result = await self._client.infer(ensemble, [tensor], outputs=outputs, priority=priority)
        except InferenceServerException as error:
            raise _backend_error(error) from None
        return result.as_numpy(output), result.as_numpy("TOKEN_COUNT").reshape(-1)

    async def embed_texts(self, ensemble: str, texts: list[str], max_batch: int, priority: int = PRIORITY_NORMAL, output: str = "EMBEDDING"):
        """The ensemble's `output` rows and untruncated token counts, in input order; chunks of max_batch run concurrently."""

        async def chunk(part: list[str]):
            tensor = grpcclient.InferInput("TEXT", [len(part), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode("utf-8") for t in part], dtype=np.object_).reshape(-1, 1))
            return await self._infer(ensemble, tensor, priority, output)

        results = await asyncio.gather(*(chunk(texts[i : i + max_batch]) for i in range(0, len(texts), max_batch)))
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    async def embed_token_ids(
        self, ensemble: str, sequences: list[list[int]], max_batch: int, priority: int = PRIORITY_NORMAL, output: str = "EMBEDDING"
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

        results = await asyncio.gather(*(group(members) for members in groups))
        order = np.concatenate([np.array(members) for members in groups])
        embeddings = np.empty((len(sequences), *results[0][0].shape[1:]), dtype=np.float32)
        counts = np.empty(len(sequences), dtype=np.int64)
        embeddings[order] = np.concatenate([r[0] for r in results])
        counts[order] = np.concatenate([r[1] for r in results])
        return embeddings, counts
