"""Transport-neutral embedding core: validate -> build Triton inputs -> infer -> shape the vectors.

HTTP and gRPC handlers translate their contract into an EmbedCall and the result back; nothing here
knows about either transport.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from gateway.catalog import Catalog, ServedModel
from gateway.errors import ErrorKind, ServiceError, invalid
from gateway.triton_client import PRIORITY_NORMAL, TritonClient


@dataclass(frozen=True)
class EmbedCall:
    model: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None
    truncate: bool | None = None
    priority: int = PRIORITY_NORMAL
    input_field: str = "input"


@dataclass(frozen=True)
class EmbedResult:
    model: ServedModel
    embeddings: np.ndarray
    token_counts: np.ndarray

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())


class Admission:
    """Caps requests in flight so that overload answers 429 at once instead of growing a queue."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    @contextmanager
    def slot(self):
        if self.in_flight >= self.limit:
            raise ServiceError(ErrorKind.OVERLOADED, f"more than {self.limit} requests in flight, retry shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def _resize(embeddings: np.ndarray, dimensions: int | None, model: ServedModel) -> np.ndarray:
    """Matryoshka-style: keep the first `dimensions` values and re-normalize them."""
    if dimensions is None or dimensions == model.dimensions:
        return embeddings
    if not 0 < dimensions <= model.dimensions:
        raise invalid(f"dimensions must be between 1 and {model.dimensions} for {model.name}, got {dimensions}", "dimensions")
    cut = embeddings[:, :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


class EmbeddingService:
    def __init__(self, catalog: Catalog, triton: TritonClient, *, max_inputs: int, max_in_flight: int, truncate: bool):
        self.catalog = catalog
        self.triton = triton
        self.max_inputs = max_inputs
        self.admission = Admission(max_in_flight)
        self.truncate_default = truncate

    def _validate(self, call: EmbedCall, model: ServedModel) -> None:
        items = call.texts if call.texts is not None else call.token_ids
        if not items:
            raise invalid(f"'{call.input_field}' must not be empty", call.input_field)
        if len(items) > self.max_inputs:
            raise invalid(f"'{call.input_field}' holds {len(items)} items; at most {self.max_inputs} are allowed", call.input_field)
        if call.dimensions is not None:
            _resize(np.zeros((0, model.dimensions), np.float32), call.dimensions, model)
        for index, item in enumerate(items):
            if len(item) == 0:
                raise invalid(f"'{call.input_field}[{index}]' must not be empty", call.input_field)
        if call.token_ids is not None:
            vocab = model.vocab_size
            for index, ids in enumerate(call.token_ids):
                bad = next((i for i in ids if not 0 <= i < vocab), None)
                if bad is not None:
                    raise invalid(f"'{call.input_field}[{index}]' holds token id {bad}, outside the vocabulary [0, {vocab})", call.input_field)

    def _check_lengths(self, call: EmbedCall, model: ServedModel, counts: np.ndarray) -> None:
        truncate = self.truncate_default if call.truncate is None else call.truncate
        if truncate:
            return
        overlong = np.flatnonzero(counts > model.max_sequence_length)
        if overlong.size:
            index = int(overlong[0])
            raise invalid(
                f"'{call.input_field}[{index}]' has {int(counts[index])} tokens, more than the {model.max_sequence_length} "
                f"that {model.name} accepts; shorten it or ask for truncation",
                call.input_field,
            )

    async def embed(self, call: EmbedCall) -> EmbedResult:
        model = self.catalog.get(call.model)
        self._validate(call, model)
        with self.admission.slot():
            if call.texts is not None:
                embeddings, counts = await self.triton.embed_texts(model.text_ensemble, call.texts, model.max_batch_size, call.priority)
            else:
                embeddings, counts = await self.triton.embed_token_ids(
                    model.token_ids_ensemble, call.token_ids, model.max_batch_size, call.priority
                )
        self._check_lengths(call, model, counts)
        # Usage counts the tokens the model saw, which truncation caps at its limit.
        return EmbedResult(model, _resize(embeddings, call.dimensions, model), np.minimum(counts, model.max_sequence_length))
