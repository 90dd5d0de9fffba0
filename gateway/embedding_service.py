"""Transport-neutral embedding core: validate -> build Triton inputs -> infer -> shape the vectors.

HTTP and gRPC handlers translate their contract into an EmbedCall and the result back; nothing here
knows about either transport.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from gateway.catalog import Catalog, EnsemblePair, ServedModel
from gateway.errors import ErrorKind, ServiceError, invalid
from gateway.prompts import Prompt, PromptItem, resolve
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


class _TokenUsage:
    """Usage as both contracts report it: the tokens the model saw, summed over the inputs."""

    token_counts: np.ndarray

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())


@dataclass(frozen=True)
class EmbedResult(_TokenUsage):
    model: ServedModel
    embeddings: np.ndarray
    token_counts: np.ndarray


@dataclass(frozen=True)
class SemanticEmbedCall:
    """Aleph Alpha-style semantic embedding of prompts made of items."""

    model: str
    prompts: list[list[PromptItem]]
    representation: str = "symmetric"
    compress_to_size: int | None = None
    normalize: bool = False
    priority: int = PRIORITY_NORMAL
    prompt_field: str = "prompt"


@dataclass(frozen=True)
class SemanticEmbedResult(_TokenUsage):
    model_version: str
    embeddings: np.ndarray
    token_counts: np.ndarray


@dataclass(frozen=True)
class EmbedLayersCall:
    """Pooled hidden states of chosen layers for one prompt; layer 0 is the word embeddings."""

    model: str
    prompt: list[PromptItem]
    layers: list[int]
    poolings: list[str]
    tokens: bool = False
    normalize: bool = False
    priority: int = PRIORITY_NORMAL


@dataclass(frozen=True)
class EmbedLayersResult:
    model_version: str
    # (layer index as requested, {pooling: vector}) in request order.
    layers: list[tuple[int, dict[str, np.ndarray]]]
    tokens: list[str] | None
    num_tokens: int


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


def _normalized(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _resize(embeddings: np.ndarray, dimensions: int | None, model: ServedModel) -> np.ndarray:
    """Matryoshka-style: keep the first `dimensions` values and re-normalize them."""
    if dimensions is None or dimensions == model.dimensions:
        return embeddings
    if not 0 < dimensions <= model.dimensions:
        raise invalid(f"dimensions must be between 1 and {model.dimensions} for {model.name}, got {dimensions}", "dimensions")
    return _normalized(embeddings[:, :dimensions])


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

    def _check_lengths(self, field: str, truncate: bool | None, model: ServedModel, counts: np.ndarray) -> None:
        truncate = self.truncate_default if truncate is None else truncate
        if truncate:
            return
        overlong = np.flatnonzero(counts > model.max_sequence_length)
        if overlong.size:
            index = int(overlong[0])
            raise invalid(
                f"'{field}[{index}]' has {int(counts[index])} tokens, more than the {model.max_sequence_length} "
                f"that {model.name} accepts; shorten it or ask for truncation",
                field,
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
        self._check_lengths(call.input_field, call.truncate, model, counts)
        # Usage counts the tokens the model saw, which truncation caps at its limit.
        return EmbedResult(model, _resize(embeddings, call.dimensions, model), np.minimum(counts, model.max_sequence_length))

    async def _infer_prompts(
        self, model: ServedModel, prompts: list[Prompt], ensembles: EnsemblePair, output: str, priority: int, field: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts go through the ensemble's tokenizer step, resolved token ids through its token_ids step, in prompt order."""
        text_rows = [i for i, p in enumerate(prompts) if p.text is not None]
        id_rows = [i for i, p in enumerate(prompts) if p.text is None]
        parts = []
        with self.admission.slot():
            if text_rows:
                texts = [prompts[i].text for i in text_rows]
                parts.append((text_rows, self.triton.embed_texts(ensembles.text, texts, model.max_batch_size, priority, output)))
            if id_rows:
                ids = [prompts[i].token_ids for i in id_rows]
                by_ids = self.triton.embed_token_ids(ensembles.token_ids, ids, model.max_batch_size, priority, output)
                parts.append((id_rows, by_ids))
            results = await asyncio.gather(*(coroutine for _, coroutine in parts))
        values = np.empty((len(prompts), *results[0][0].shape[1:]), dtype=np.float32)
        counts = np.empty(len(prompts), dtype=np.int64)
        for (rows, _), (part_values, part_counts) in zip(parts, results):
            values[rows], counts[rows] = part_values, part_counts
        self._check_lengths(field, None, model, counts)
        return values, np.minimum(counts, model.max_sequence_length)

    async def semantic_embed(self, call: SemanticEmbedCall) -> SemanticEmbedResult:
        model = self.catalog.get(call.model)
        if call.representation not in model.prefixes:
            choices = sorted(model.prefixes)
            raise invalid(f"representation must be one of {choices}, got {call.representation!r}", "representation")
        if call.compress_to_size not in (None, model.compress_to_size):
            raise invalid(
                f"compress_to_size {call.compress_to_size} is not supported by {model.name}; "
                f"supported: [{model.compress_to_size}] or null",
                "compress_to_size",
            )
        if not call.prompts or len(call.prompts) > self.max_inputs:
            raise invalid(f"'{call.prompt_field}' must hold 1 to {self.max_inputs} prompts", call.prompt_field)
        prefix = model.prefixes[call.representation]
        single = len(call.prompts) == 1
        prompts = [
            resolve(items, model.tokenizer, prefix, call.prompt_field, None if single else index)
            for index, items in enumerate(call.prompts)
        ]
        if call.compress_to_size is None:
            ensembles, model_version = EnsemblePair(model.text_ensemble, model.token_ids_ensemble), model.model_version
        else:
            ensembles, model_version = model.compressed, model.compressed_model_version
        embeddings, counts = await self._infer_prompts(model, prompts, ensembles, "EMBEDDING", call.priority, call.prompt_field)
        return SemanticEmbedResult(model_version, _normalized(embeddings) if call.normalize else embeddings, counts)

    async def embed_layers(self, call: EmbedLayersCall) -> EmbedLayersResult:
        model = self.catalog.get(call.model)
        depth = model.num_layers + 1
        if not call.layers:
            raise invalid("'layers' must name at least one layer", "layers")
        for layer in call.layers:
            if not -depth <= layer < depth:
                raise invalid(
                    f"layer {layer} is out of range for {model.name}: 0 is the word embeddings, "
                    f"1..{model.num_layers} the layers, -1..-{depth} count from the last",
                    "layers",
                )
        unknown = [p for p in call.poolings if p not in model.layer_poolings]
        if not call.poolings or unknown:
            raise invalid(f"'pooling' must hold one or more of {list(model.layer_poolings)}, got {call.poolings}", "pooling")
        prompt = resolve(call.prompt, model.tokenizer, "", "prompt")
        pooled, counts = await self._infer_prompts(model, [prompt], model.layers, "POOLED", call.priority, "prompt")
        pooled = _normalized(pooled[0]) if call.normalize else pooled[0]  # [layers + 1, poolings, hidden]
        column = {name: index for index, name in enumerate(model.layer_poolings)}
        layers = [(layer, {p: pooled[layer % depth, column[p]] for p in call.poolings}) for layer in call.layers]
        tokens = None
        if call.tokens:
            # The prompt's own tokens; num_tokens also counts the special tokens the model frames them with.
            ids = prompt.token_ids if prompt.text is None else model.tokenizer.encode(prompt.text, add_special_tokens=False).ids
            tokens = [model.tokenizer.id_to_token(i) for i in ids]
        return EmbedLayersResult(model.model_version, layers, tokens, int(counts[0]))

    def tokenize(self, model_name: str, text: str) -> tuple[list[str], list[int]]:
        encoding = self.catalog.get(model_name).tokenizer.encode(text, add_special_tokens=False)
        return encoding.tokens, encoding.ids

    def detokenize(self, model_name: str, token_ids: list[int]) -> str:
        tokenizer = self.catalog.get(model_name).tokenizer
        vocab = tokenizer.get_vocab_size()
        bad = next((i for i in token_ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary [0, {vocab})", "token_ids")
        return tokenizer.decode(token_ids)
