"""Transport-neutral embedding core: validate -> build Triton inputs -> infer -> shape the vectors.

HTTP and gRPC handlers translate their contract into an EmbedCall and the result back; nothing here
knows about either transport.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from gateway.core import images
from gateway.core.cache import EmbeddingCache
from gateway.core.catalog import Catalog, ServedModel
from gateway.core.chunking import image_chunks, text_chunks, token_id_chunks
from gateway.core.controls import ControlOptions, PositionControl, position_factors
from gateway.core.deadline import Deadline
from gateway.core.errors import ErrorKind, ServiceError, invalid
from gateway.core.images import ImageInput
from gateway.core.metering import reserve_prompt_tokens
from gateway.core.prompts import Prompt, PromptItem, check_length, decode, encode, resolve
from gateway.core.scheduler import PRIORITY_NORMAL, Answer, Chunk, Scheduler
from gateway.ops import request_context
from repository_contract import tensors
from repository_contract.manifest import EnsembleNames, Vision

# No token of the models served here spans more characters (WordPiece gives up on words over 100), so a text
# longer than this many characters per token of the model's limit is over it: refused, or cut when truncating,
# before anything tokenizes megabytes.
MAX_CHARS_PER_TOKEN = 100


@dataclass(frozen=True)
class CacheAs:
    """What a cached vector of this call is filed under: the output's model_version, and its size."""

    model_version: str
    dimensions: int

    def key(self, model: ServedModel) -> str:
        # Truncation cuts long texts at the model's limit, which the export chooses: another limit, another vector.
        return f"{self.model_version}/{model.max_sequence_length}"


@dataclass(frozen=True)
class EmbedCall:
    model: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None
    truncate: bool | None = None
    priority: int = PRIORITY_NORMAL
    input_field: str = "input"
    deadline: Deadline | None = None


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
    deadline: Deadline | None = None
    controls: ControlOptions = ControlOptions()  # noqa: RUF009 - frozen: one shared default is safe


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
    deadline: Deadline | None = None
    controls: ControlOptions = ControlOptions()  # noqa: RUF009 - frozen: one shared default is safe


@dataclass(frozen=True)
class EmbedLayersResult:
    model_version: str
    # (layer index as requested, {pooling: vector}) in request order.
    layers: list[tuple[int, dict[str, np.ndarray]]]
    tokens: list[str] | None
    num_tokens: int


def has_visible_text(text: str) -> bool:
    """Whether a text holds a character a reader can see: one that is neither whitespace nor a control, format or
    other invisible one. A text of only those has nothing to embed (a BERT tokenizer drops every one of them), so every
    contract refuses it, over HTTP and gRPC alike, here in the core."""
    if text.isprintable():  # the common case, in C: no control, format or line-break character
        return bool(text) and not text.isspace()
    return any(c.isprintable() and not c.isspace() for c in text)


def _nothing_to_embed(where: str, field: str) -> Exception:
    return invalid(f"'{where}' holds only whitespace or control characters: there is nothing to embed", field)


def refuse_invisible(texts: list[str], field: str) -> None:
    """Refuses, naming the field and the index, the first non-empty text with nothing visible in it (empty ones are
    left to the checks that say so)."""
    for index, text in enumerate(texts):
        if text and not has_visible_text(text):
            raise _nothing_to_embed(f"{field}[{index}]", field)


def _refuse_invisible_prompts(prompts: list[list[PromptItem]], field: str) -> None:
    """A prompt of text items only, none with a visible character, is refused as such a text is."""
    for index, items in enumerate(prompts):
        texts = [item.as_text()[0] for item in items if item.kind == "text"]
        if len(texts) == len(items) and any(texts) and not any(has_visible_text(text) for text in texts):
            raise _nothing_to_embed(field if len(prompts) == 1 else f"{field}[{index}]", field)


def _normalized(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _resize(embeddings: np.ndarray, dimensions: int | None, model: ServedModel) -> np.ndarray:
    """Matryoshka-style: keep the first `dimensions` values and re-normalize them."""
    if dimensions is None or dimensions == model.dimensions:
        return embeddings
    if not 0 < dimensions <= model.dimensions:
        raise invalid(f"dimensions must be between 1 and {model.dimensions} for {model.name}, got {dimensions}", "dimensions")
    return _normalized(embeddings[:, :dimensions])


@dataclass(frozen=True)
class _Tower:
    """The encoder whose layers /embed pools: the model's text encoder, or its image encoder for an image."""

    name: str
    num_layers: int
    embeddings: str  # what layer 0 is

    @classmethod
    def of(cls, model: ServedModel, vision: Vision | None) -> _Tower:
        if vision is None:
            return cls(model.name, model.num_layers, "word embeddings")
        return cls(f"{model.name}'s image encoder", vision.num_layers, "patch embeddings")


def _refuse_contextual_images(prompts: list[Prompt], call: EmbedCall | SemanticEmbedCall | EmbedLayersCall) -> None:
    """A contextual threshold reaches tokens by their input embeddings' likeness, which an image's patches have none of
    before the model runs: refused for a request with image controls rather than ignored."""
    if isinstance(call, EmbedCall) or call.controls.contextual_threshold is None:
        return
    if any(prompt.image is not None and prompt.image.controls for prompt in prompts):
        field = call.controls.threshold_field
        raise invalid(
            f"'{field}' applies to text and token controls; an image control reaches the patches its rectangle covers, "
            "so send image controls without a contextual threshold",
            field,
        )


def _account(texts: int, tokens: int) -> None:
    """Adds what a request embedded to its usage (per-token counters, metrics, the access log)."""
    context = request_context.current()
    if context is not None:
        context.add_usage(texts, tokens)


class EmbeddingService:
    def __init__(
        self,
        catalog: Catalog,
        scheduler: Scheduler,
        *,
        max_inputs: int,
        truncate: bool,
        timeout_s: float,
        cache: EmbeddingCache | None = None,
    ):
        self.catalog = catalog
        self.scheduler = scheduler
        self.cache = cache
        self.health = scheduler.health
        self.max_inputs = max_inputs
        self.truncate_default = truncate
        self.timeout_s = timeout_s

    def models(self) -> list[ServedModel]:
        """Every model served, in the catalog's order."""
        return list(self.catalog.models.values())

    def model(self, name: str) -> ServedModel:
        """The model of that name, or a NOT_FOUND error naming the served ones."""
        return self.catalog.get(name)

    def check_open(self, deadline: Deadline | None = None) -> None:
        """The cheap check before a request's body is read (Scheduler.check_open): refuses at once when no work could
        be taken now, or none served before the deadline."""
        self.scheduler.check_open(deadline)

    @property
    def max_tokenized_chars(self) -> int:
        """The most characters tokenize takes (and token ids detokenize takes) for any served model."""
        return max(model.max_sequence_length for model in self.catalog.models.values()) * MAX_CHARS_PER_TOKEN

    def deadline(self, requested_s: float | None = None) -> Deadline:
        """A new request's deadline: the server's timeout, or sooner if the caller asks."""
        return Deadline.within(self.timeout_s, requested_s)

    @staticmethod
    def _capped(texts: list[str], field: str, truncating: bool, model: ServedModel) -> list[str]:
        """The texts, each refused or (when truncating) cut if far longer than the model reads."""
        limit = model.max_sequence_length * MAX_CHARS_PER_TOKEN
        for index, text in enumerate(texts):
            if len(text) > limit and not truncating:
                raise invalid(
                    f"'{field}[{index}]' has {len(text)} characters, more than the {model.max_sequence_length} tokens "
                    f"{model.name} accepts can hold (at most {limit}); shorten it or ask for truncation",
                    field,
                )
        return [text[:limit] for text in texts]

    def _validate(self, call: EmbedCall, model: ServedModel) -> None:
        items = call.texts if call.texts is not None else call.token_ids
        if not items:
            raise invalid(f"'{call.input_field}' must not be empty", call.input_field)
        if len(items) > self.max_inputs:
            raise invalid(
                f"'{call.input_field}' holds {len(items)} items; at most {self.max_inputs} are allowed", call.input_field
            )
        if call.dimensions is not None:
            _resize(np.zeros((0, model.dimensions), np.float32), call.dimensions, model)
        for index, item in enumerate(items):
            if len(item) == 0:
                raise invalid(f"'{call.input_field}[{index}]' must not be empty", call.input_field)
        if call.texts is not None:
            refuse_invisible(call.texts, call.input_field)
        if call.token_ids is not None:
            vocab = model.vocab_size
            for index, ids in enumerate(call.token_ids):
                bad = next((i for i in ids if not 0 <= i < vocab), None)
                if bad is not None:
                    raise invalid(
                        f"'{call.input_field}[{index}]' holds token id {bad}, outside the vocabulary [0, {vocab})",
                        call.input_field,
                    )

    @staticmethod
    def _refuse_overlong(field: str, model: ServedModel, rows: list[int], counts: list[int] | np.ndarray) -> None:
        """Refuses, naming the first such prompt, a prompt of more tokens (special ones included) than the model reads."""
        over = [(row, int(count)) for row, count in zip(rows, counts) if count > model.max_sequence_length]
        if over:
            row, count = min(over)
            raise invalid(
                f"'{field}[{row}]' has {count} tokens, more than the {model.max_sequence_length} "
                f"that {model.name} accepts; shorten it or ask for truncation",
                field,
            )

    @staticmethod
    async def _text_counts(model: ServedModel, texts: list[str]) -> list[int]:
        """Each text's tokens as the tokenizer step counts them (special ones included). Only on the path of a request
        the step refused as over-long, to name the first such text: every other text is tokenized in Triton alone."""
        # encode_batch releases the GIL while it tokenizes (see gateway.core.prompts).
        encodings = await asyncio.to_thread(model.tokenizer.encode_batch, texts)
        return [len(encoding.ids) for encoding in encodings]

    async def embed(self, call: EmbedCall) -> EmbedResult:
        model = self.catalog.get(call.model)
        self._validate(call, model)
        if call.texts is not None:
            # As sentence-transformers' encode() does with no prompt_name; token ids are taken as they are.
            prompts = [self._text_or_image(model, text, call.input_field, index) for index, text in enumerate(call.texts)]
        else:
            assert call.token_ids is not None  # _validate refused a call with neither texts nor token ids
            prompts = [Prompt(token_ids=ids) for ids in call.token_ids]
        cache_as = CacheAs(model.model_version, model.dimensions)
        embeddings, counts = await self._infer_prompts(
            model, prompts, model.embedding, tensors.EMBEDDING, call, call.input_field, cache_as, call.truncate, "embedding"
        )
        _account(len(counts), int(counts.sum()))
        return EmbedResult(model, _resize(embeddings, call.dimensions, model), counts)

    @staticmethod
    def _text_or_image(model: ServedModel, text: str, field: str, index: int) -> Prompt:
        """An input of /v1/embeddings: a text, or for a model that sees images a data URI of one, as
        sentence-transformers' encode() reads such a string (and then with no prefix: the prefix is for texts)."""
        if model.vision is None or not text.startswith(images.DATA_URI_PREFIX):
            return Prompt(text=model.default_prefix + text)
        where = f"{field}[{index}]"
        image = images.from_data_uri(text, where, field)
        images.check(image, model.vision, where, field)
        return Prompt(image=image)

    async def _infer_prompts(
        self,
        model: ServedModel,
        prompts: list[Prompt],
        ensembles: EnsembleNames,
        output: str,
        call: EmbedCall | SemanticEmbedCall | EmbedLayersCall,
        field: str,
        cache_as: CacheAs | None = None,
        truncate: bool | None = None,
        image_pipeline: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts go through the ensemble's tokenizer step, resolved token ids through its token_ids step, prompts
        with attention controls through the controlled one, and images through the model's image ensemble of
        `image_pipeline` (a field of ImageEnsembles: "embedding", "compressed" or "layers"), its controlled one for an
        image with controls, in prompt order. With a cache, texts found in it skip Triton, and the texts computed are
        written to it."""
        _refuse_contextual_images(prompts, call)
        # Before any work, so that a token's tokens-per-minute limit bounds a burst instead of charging it afterwards.
        reservation = await reserve_prompt_tokens(model, prompts, field, model.max_sequence_length * MAX_CHARS_PER_TOKEN)
        truncating = self.truncate_default if truncate is None else truncate
        text_rows: list[int] = []
        texts: list[str] = []
        id_rows: list[int] = []
        ids: list[list[int]] = []
        controlled_rows: list[int] = []
        controlled: list[tuple[list[int], tuple[PositionControl, ...]]] = []
        image_rows: dict[bool, list[int]] = {False: [], True: []}  # by whether the image has controls
        image_inputs: dict[bool, list[ImageInput]] = {False: [], True: []}
        for row, prompt in enumerate(prompts):
            if prompt.image is not None:
                image_rows[bool(prompt.image.controls)].append(row)
                image_inputs[bool(prompt.image.controls)].append(prompt.image)
                continue
            if prompt.text is not None:
                text_rows.append(row)
                texts.append(prompt.text)
                continue
            assert prompt.token_ids is not None  # a prompt without a text has token ids (see Prompt)
            if prompt.controls is None:
                id_rows.append(row)
                ids.append(prompt.token_ids)
            else:
                controlled_rows.append(row)
                controlled.append((prompt.token_ids, prompt.controls))
        answer = Answer(len(prompts))
        chunks: list[Chunk] = []
        computed_rows: list[int] = []
        computed_texts: list[str] = []
        if text_rows:
            computed_texts = self._capped(texts, field, truncating, model)
            computed_rows = text_rows
            if cache_as is not None and self.cache is not None:
                found = await self.cache.lookup(
                    cache_as.key(model), computed_texts, cache_as.dimensions, model.max_sequence_length
                )
                for row, entry in zip(text_rows, found):
                    if entry is not None:
                        answer.put(np.array([row]), entry[0][np.newaxis], np.array([entry[1]]))
                computed_rows = [row for row, entry in zip(text_rows, found) if entry is None]
                computed_texts = [text for text, entry in zip(computed_texts, found) if entry is None]
            if computed_texts:
                # Not truncating, the tokenizer step refuses a text over the model's limit, before the encoder runs.
                chunks += text_chunks(
                    ensembles.text, computed_texts, computed_rows, model.max_batch_size, call.priority, output, not truncating
                )
        if not truncating:
            # Token ids are counted here, exactly, before anything runs.
            lengths = [len(tokens) for tokens in ids] + [len(tokens) for tokens, _ in controlled]
            self._refuse_overlong(field, model, id_rows + controlled_rows, [n + model.special_tokens for n in lengths])
        if id_rows:
            chunks += token_id_chunks(ensembles.token_ids, ids, id_rows, model.max_batch_size, call.priority, output)
        if controlled_rows:
            # Only prompts made of items carry controls, and an EmbedCall's are plain texts or token ids.
            assert not isinstance(call, EmbedCall)
            threshold = call.controls.contextual_threshold
            factors = await asyncio.to_thread(
                lambda: [
                    position_factors(token_ids, positions, threshold, model.token_similarity)
                    for token_ids, positions in controlled
                ]
            )
            controls = (factors, call.controls.log_additive)
            controlled_ids = [token_ids for token_ids, _ in controlled]
            chunks += token_id_chunks(
                ensembles.controlled, controlled_ids, controlled_rows, model.max_batch_size, call.priority, output, controls
            )
        if image_rows[False] or image_rows[True]:
            chunks += self._image_chunks(model, image_pipeline, image_inputs, image_rows, call, output)
        if chunks:
            # One scheduled job for the whole request, so that admission and fairness see all of it.
            try:
                values, counts = await self.scheduler.run(chunks, call.deadline or self.deadline(), call.priority, answer)
            except ServiceError as error:
                if error.kind is not ErrorKind.VALIDATION or error.param is not None:
                    raise
                # The backend refused an input of this request: an image that does not decode, or a text over the limit,
                # which is named by its index and count (the step knows neither which request nor which prompt it was).
                if computed_texts and not truncating:
                    counts_here = await self._text_counts(model, computed_texts)
                    self._refuse_overlong(field, model, computed_rows, counts_here)
                raise invalid(f"'{field}': {error.message}", field) from None
        else:
            values, counts = answer.result()  # every text was cached
        if computed_texts and cache_as is not None and self.cache is not None:
            self.cache.store(cache_as.key(model), computed_texts, values[computed_rows], counts[computed_rows])
        # An image counts as the model's image tokens, whatever the text limit.
        sequences = [row for row in range(len(prompts)) if prompts[row].image is None]
        if not truncating:
            # Cached vectors, which a request that truncated may have stored: their counts are the texts' own.
            self._refuse_overlong(field, model, sequences, counts[sequences])
        counts = counts.copy()
        counts[sequences] = np.minimum(counts[sequences], model.max_sequence_length)
        reservation.settle(int(counts.sum()))
        return values, counts

    @staticmethod
    def _image_chunks(
        model: ServedModel,
        pipeline: str | None,
        inputs: dict[bool, list[ImageInput]],
        rows: dict[bool, list[int]],
        call: EmbedCall | SemanticEmbedCall | EmbedLayersCall,
        output: str,
    ) -> list[Chunk]:
        """The chunks of a request's images: those without controls to the pipeline's plain image ensemble, those with
        controls to its controlled one."""
        # Only a model that sees images resolves image prompts, and its calls name their pipeline.
        assert model.vision is not None and pipeline is not None
        chunks = []
        if inputs[False]:
            plain = getattr(model.vision.ensembles, pipeline)
            chunks += image_chunks(plain, inputs[False], rows[False], model.max_batch_size, call.priority, output)
        if inputs[True]:
            # Only prompts made of items carry controls, and an EmbedCall's inputs are texts, data URIs or token ids.
            assert not isinstance(call, EmbedCall)
            controlled = getattr(model.vision.controlled, pipeline)
            chunks += image_chunks(
                controlled, inputs[True], rows[True], model.max_batch_size, call.priority, output, call.controls.log_additive
            )
        return chunks

    async def _resolve(self, model: ServedModel, prompts: list[list[PromptItem]], prefix: str, field: str) -> list[Prompt]:
        """Prompts made of several items are tokenized here, and images' headers read: in a thread, so that no request
        waits for another's."""
        single = len(prompts) == 1
        limit = model.max_sequence_length * MAX_CHARS_PER_TOKEN

        def resolve_all() -> list[Prompt]:
            return [
                resolve(items, model.tokenizer, prefix, field, None if single else i, limit, model.vision)
                for i, items in enumerate(prompts)
            ]

        if all(len(items) == 1 and items[0].kind == "text" and not items[0].controls for items in prompts):
            return resolve_all()
        return await asyncio.to_thread(resolve_all)

    async def semantic_embed(self, call: SemanticEmbedCall) -> SemanticEmbedResult:
        model = self.catalog.get(call.model)
        if call.representation not in model.prefixes:
            choices = sorted(model.prefixes)
            raise invalid(f"representation must be one of {choices}, got {call.representation!r}", "representation")
        if call.compress_to_size is not None and call.compress_to_size not in model.compress_to_sizes:
            raise invalid(
                f"compress_to_size {call.compress_to_size} is not supported by {model.name} ({model.dimensions} "
                f"dimensions); supported: {list(model.compress_to_sizes)} or null",
                "compress_to_size",
            )
        if not call.prompts or len(call.prompts) > self.max_inputs:
            raise invalid(f"'{call.prompt_field}' must hold 1 to {self.max_inputs} prompts", call.prompt_field)
        _refuse_invisible_prompts(call.prompts, call.prompt_field)
        prompts = await self._resolve(model, call.prompts, model.prefixes[call.representation], call.prompt_field)
        compression = None if call.compress_to_size is None else model.compression
        if compression is None:
            ensembles, model_version, size = model.embedding, model.model_version, model.dimensions
        else:
            ensembles, model_version, size = (
                compression.ensembles,
                compression.model_version(model.model_version),
                compression.size,
            )
        cache_as = CacheAs(model_version, size)
        image_pipeline = "embedding" if compression is None else "compressed"
        embeddings, counts = await self._infer_prompts(
            model, prompts, ensembles, tensors.EMBEDDING, call, call.prompt_field, cache_as, image_pipeline=image_pipeline
        )
        _account(len(prompts), int(counts.sum()))
        return SemanticEmbedResult(model_version, _normalized(embeddings) if call.normalize else embeddings, counts)

    async def embed_layers(self, call: EmbedLayersCall) -> EmbedLayersResult:
        model = self.catalog.get(call.model)
        # An image's layers are its image encoder's: checked against that tower, pooled by its own steps.
        vision = model.vision if any(item.kind == "image" for item in call.prompt) else None
        tower = _Tower.of(model, vision)
        depth = tower.num_layers + 1
        self._check_layers(call.layers, tower)
        poolings = model.layer_poolings
        if not call.poolings or len(call.poolings) > len(poolings) or not set(call.poolings) <= set(poolings):
            shown = call.poolings if len(call.poolings) <= len(poolings) else f"{len(call.poolings)} poolings"
            raise invalid(f"'pooling' must hold one or more of {list(poolings)}, each once; got {shown}", "pooling")
        if len(set(call.poolings)) != len(call.poolings):
            twice = next(p for i, p in enumerate(call.poolings) if p in call.poolings[:i])
            raise invalid(f"'pooling' names {twice!r} twice; name each pooling once", "pooling")
        _refuse_invisible_prompts([call.prompt], "prompt")
        (prompt,) = await self._resolve(model, [call.prompt], "", "prompt")
        pooled, counts = await self._infer_prompts(
            model, [prompt], model.layers, tensors.POOLED, call, "prompt", image_pipeline="layers"
        )
        pooled = _normalized(pooled[0]) if call.normalize else pooled[0]  # [layers + 1, poolings, hidden]
        column = {name: index for index, name in enumerate(model.layer_poolings)}
        layers = [(layer, {p: pooled[layer % depth, column[p]] for p in call.poolings}) for layer in call.layers]
        tokens = None
        if call.tokens and prompt.image is None:  # an image has patches, not tokens with a text
            # The prompt's own tokens; num_tokens also counts the special tokens the model frames them with.
            if prompt.text is None:
                assert prompt.token_ids is not None  # a prompt without a text has token ids (see Prompt)
                ids = prompt.token_ids
            else:
                # Cut as the text sent to Triton is when truncating, so that no more than the model reads is tokenized.
                text = prompt.text[: model.max_sequence_length * MAX_CHARS_PER_TOKEN]
                ids = (await asyncio.to_thread(encode, model.tokenizer, text)).ids
            tokens = [model.tokenizer.id_to_token(i) for i in ids]
        _account(1, int(counts[0]))
        return EmbedLayersResult(model.model_version, layers, tokens, int(counts[0]))

    @staticmethod
    def _check_layers(layers: list[int], tower: _Tower) -> None:
        """One to all of the tower's layers (its embeddings included), each named once: -1 and its positive index
        name the same layer, which would be computed once and answered twice."""
        depth = tower.num_layers + 1
        if not layers or len(layers) > depth:
            raise invalid(f"'layers' must name 1 to {depth} layers of {tower.name}, each once; got {len(layers)}", "layers")
        named: dict[int, int] = {}
        for layer in layers:
            if not -depth <= layer < depth:
                raise invalid(
                    f"layer {layer} is out of range for {tower.name}: 0 is the {tower.embeddings}, "
                    f"1..{tower.num_layers} the layers, -1..-{depth} count from the last",
                    "layers",
                )
            if layer % depth in named:
                first = named[layer % depth]
                same = f"{first} and {layer} name the same layer" if first != layer else f"layer {layer} is named twice"
                raise invalid(f"'layers': {same}; name each layer once", "layers")
            named[layer % depth] = layer

    async def tokenize(self, model_name: str, text: str) -> tuple[list[str], list[int]]:
        """In a thread that releases the GIL while it tokenizes (prompts.encode), so that no other request waits.
        Texts longer than any prompt the model reads are refused first, as every text tokenized on a request is."""
        model = self.catalog.get(model_name)
        check_length(len(text), model.max_sequence_length * MAX_CHARS_PER_TOKEN, "prompt", "prompt")

        def tokenized() -> tuple[list[str], list[int]]:
            encoding = encode(model.tokenizer, text)
            return encoding.tokens, encoding.ids

        return await asyncio.to_thread(tokenized)

    async def detokenize(self, model_name: str, token_ids: list[int]) -> str:
        """Bounded like tokenize: at most as many ids as the longest text tokenize accepts has characters."""
        model = self.catalog.get(model_name)
        limit = model.max_sequence_length * MAX_CHARS_PER_TOKEN
        if len(token_ids) > limit:
            raise invalid(f"'token_ids' holds {len(token_ids)} token ids, more than {limit}", "token_ids")
        vocab = model.vocab_size
        bad = next((i for i in token_ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary [0, {vocab})", "token_ids")
        return await asyncio.to_thread(decode, model.tokenizer, token_ids)
