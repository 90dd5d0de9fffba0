"""A fake Triton at the scheduler's send seam whose answers can be checked row by row, for the fast tier.

FakeTriton is both halves of what gateway.core.scheduler.Scheduler takes: the Backend (health) and the Send callable.
It reads every row the gateway sends the way the model's ensembles would (a text is tokenized with the model's own
tokenizer, special tokens and truncation included; token ids lose their padding and are framed with the special
tokens; controlled rows carry their factors) and answers it with a vector that is a deterministic function of that
row's token ids alone: a fixed random projection of the ids, weighted by position (and by the controls' factors).
So `expected(row)` computes, for one input on its own, exactly what the gateway must answer for it however it was
batched, sorted by length, chunked, coalesced with other requests' rows and reassembled; a row answered for the
wrong input, or in the wrong place, is a different vector.

What it answers follows the ensemble a call names: the model's dimensions for the embedding ensembles, the
compressed size for the compressed ones, and [layers + 1, poolings, dimensions] for the layers ones, with the
untruncated token count per row as the tokenizer step reports it. A call the real ensembles would refuse (an
unknown ensemble, such as a compressed one of a model without compression, the wrong input for it, more rows than
the lane or the model's batch allows) is recorded in `refused` and fails as Triton's INVALID_ARGUMENT would; tests
check that list stays empty.

Faults come as gateway.triton.client would raise them for the matching Triton failure (triton_error): a number of
calls or every call failing UNAVAILABLE (a restart), an error for the calls that carry one marked text (one bad
request), a stall (calls wait until released, or until their timeout like the real client), and a Triton down for good.

tests.http_harness.Gateway runs the gateway's real HTTP stack and core over it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tokenizers import Tokenizer
from tritonclient.utils import InferenceServerException

from gateway.core.catalog import ServedModel
from gateway.core.errors import ServiceError
from gateway.core.scheduler import Lane
from gateway.triton.client import backend_error
from repository_contract import tensors
from repository_contract.manifest import EnsembleNames
from repository_contract.tensors import ID_PADDING

# Features per token id before the projection to the output's size: enough that distinct inputs never collide.
FEATURES = 32
CONTROL_FIELDS = (tensors.TOKEN_IDS, tensors.CONTROL_FACTORS, tensors.CONTROL_LOG_ADDITIVE)
IMAGE_CONTROL_INPUTS = (tensors.IMAGE, tensors.IMAGE_CROP, tensors.IMAGE_CONTROLS, tensors.CONTROL_LOG_ADDITIVE)


def _undecodable(rows: list) -> ServiceError | None:
    """As the image step refuses an image whose pixels do not decode (a file cut short), after its header passed."""
    for index, row in enumerate(rows):
        if isinstance(row, ImageRow):
            try:
                with Image.open(io.BytesIO(row.data)) as image:
                    image.load()
            except OSError as error:
                return triton_error("INVALID_ARGUMENT", f"image-preprocess: row {index}: the image cannot be decoded: {error}")
    return None


def triton_error(status: str, message: str = "") -> ServiceError:
    """What gateway.triton.client.TritonClient.infer raises when Triton fails with this gRPC status (UNAVAILABLE,
    DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, ...): the fake fails as the real client would."""
    return backend_error(InferenceServerException(message or f"fake Triton: {status}", status=f"StatusCode.{status}"))


@functools.cache
def _token_table(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((vocab, FEATURES))


@functools.cache
def _projection(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, size]).standard_normal((FEATURES, size))


_TOKENIZERS: dict[tuple[str, int], tuple[Tokenizer, Tokenizer]] = {}


def _tokenizers(model: ServedModel) -> tuple[Tokenizer, Tokenizer]:
    """The model's tokenizer as the tokenizer step holds it: one that never truncates, one that cuts at the model's
    length. Shared by every fake of one export, which only reads them."""
    key = (model.model_version, model.max_sequence_length)
    if key not in _TOKENIZERS:
        plain, truncating = Tokenizer.from_str(model.tokenizer.to_str()), Tokenizer.from_str(model.tokenizer.to_str())
        plain.no_truncation()
        truncating.enable_truncation(model.max_sequence_length)
        _TOKENIZERS[key] = plain, truncating
    return _TOKENIZERS[key]


@dataclass(frozen=True)
class ImageRow:
    """An image as the image ensembles read it: the file's bytes and its crop ((-1, -1, -1): none); for the controlled
    ones also its controls (rows of tensors.IMAGE_CONTROL_FIELDS, without the padding) and their mode."""

    data: bytes
    crop: tuple[int, int, int]
    controls: tuple[tuple[float, ...], ...] = ()
    log_additive: bool = True


# One input as the fake reads it: a text, token ids (without special tokens), token ids with their controls
# (one factor per id, and whether the factors are log-additive), or an image.
Row = str | list[int] | tuple[list[int], list[float], bool] | ImageRow


@dataclass
class Call:
    """One call the gateway made: its lane, its rows as read (in the order sent), and what it was sent with."""

    lane: Lane
    rows: list[Row]
    request_id: str
    timeout_s: float
    cancelled: bool = False
    answered: bool = False  # whether it got vectors: a call a step refused, or that failed, never reached the encoder

    @property
    def request_ids(self) -> list[str]:
        return [part for part in self.request_id.split(",") if part]


@dataclass
class Fault:
    error: ServiceError
    times: int | None  # calls it still fails; None: every call it matches
    marker: str | None  # only calls carrying a text that contains this


@dataclass(frozen=True)
class _Kind:
    """What one of the model's ensembles takes and answers."""

    input: str  # "text", "token_ids", "controlled", "image" or "image_controlled"
    output: str  # "EMBEDDING" or "POOLED"
    size: int  # the vector size it answers
    depth: int = 0  # POOLED: the layers it pools, embeddings included


class FakeTriton:
    """The scheduler's Backend and Send for one served model (see the module's docstring).

    Inspect: `calls` (every Call, in the order sent), `refused` (calls the real ensembles would refuse), `called` (set
    at the first call). Reference: `expected(row)` for one input alone, `tokens(text)` for a text's ids. Faults:
    `fail(...)`, `stall()` and `release()`, `go_down()`, and `latency_s` (each call takes at least this long).
    """

    url = "fake-triton"

    def __init__(self, model: ServedModel, seed: int = 0):
        self.model = model
        self.seed = seed
        self._table = _token_table(model.vocab_size, seed)
        self._tokenizer, self._truncating = _tokenizers(model)
        probe = "hello"
        framed = self._tokenizer.encode(probe).ids
        bare = self._tokenizer.encode(probe, add_special_tokens=False).ids
        start = framed.index(bare[0])
        self.prefix, self.suffix = framed[:start], framed[start + len(bare) :]
        self._kinds: dict[str, _Kind] = {}
        pipelines = [(model.embedding, tensors.EMBEDDING, model.dimensions), (model.layers, tensors.POOLED, model.dimensions)]
        if model.compression is not None:
            pipelines.append((model.compression.ensembles, tensors.EMBEDDING, model.compression.size))
        for ensembles, output, size in pipelines:
            for kind in ("text", "token_ids", "controlled"):
                self._kinds[getattr(ensembles, kind)] = _Kind(kind, output, size, model.num_layers + 1)
        if model.vision is not None:
            vision = model.vision
            for images, kind in ((vision.ensembles, "image"), (vision.controlled, "image_controlled")):
                self._kinds[images.embedding] = _Kind(kind, tensors.EMBEDDING, model.dimensions)
                self._kinds[images.layers] = _Kind(kind, tensors.POOLED, vision.hidden_size, vision.num_layers + 1)
                if model.compression is not None:
                    self._kinds[images.compressed] = _Kind(kind, tensors.EMBEDDING, model.compression.size)
        # Health, as gateway.triton.pool.TritonPool reports it.
        self.reason = ""
        self._down = False
        # What happened.
        self.calls: list[Call] = []
        self.refused: list[str] = []
        self.called = asyncio.Event()
        # Faults.
        self.faults: list[Fault] = []
        self.latency_s = 0.0
        self._open = asyncio.Event()
        self._open.set()

    # -- the Backend protocol -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self._down

    @property
    def ready_count(self) -> int:
        return 0 if self._down else 1

    def down_for_good(self, recovery_s: float) -> bool:
        return self._down

    async def wait_ready(self, timeout_s: float) -> bool:
        # Down is for good here: nothing brings the fake back, so a call waiting for it waits out its time.
        if self._down:
            await asyncio.sleep(timeout_s)
        return not self._down

    # -- faults ----------------------------------------------------------------------------------------

    def fail(self, error: ServiceError, *, times: int | None = None, when_text_contains: str | None = None) -> None:
        """The next `times` matching calls (every one when None) fail with `error`; with `when_text_contains`, only
        calls carrying a text that contains it match."""
        self.faults.append(Fault(error, times, when_text_contains))

    def stall(self) -> None:
        """Calls wait until release(), or until their timeout, when they fail DEADLINE_EXCEEDED as the client would."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def go_down(self, reason: str = "the fake Triton is down") -> None:
        """Unready past any restart: the scheduler refuses new work at once, and calls fail UNAVAILABLE."""
        self._down = True
        self.reason = reason

    # -- the Send seam ---------------------------------------------------------------------------------

    async def send(self, lane: Lane, data: np.ndarray, timeout_s: float, request_id: str) -> tuple[np.ndarray, np.ndarray]:
        kind = self._kinds.get(lane.model)
        problem = self._refusal(kind, lane, data)
        call = Call(lane, [] if kind is None or problem else self._read(kind, data), request_id, timeout_s)
        self.calls.append(call)
        self.called.set()
        if kind is None or problem is not None:
            self.refused.append(problem or lane.model)
            raise triton_error("INVALID_ARGUMENT", problem or lane.model)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if not self._open.is_set():
                try:
                    async with asyncio.timeout(timeout_s):
                        await self._open.wait()
                except TimeoutError:
                    raise triton_error("DEADLINE_EXCEEDED") from None
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        if self._down:
            raise triton_error("UNAVAILABLE", "failed to connect to all addresses")
        error = self._fault(call) or _undecodable(call.rows) or self._overlong(lane, call.rows)
        if error is not None:
            raise error
        answers = [self._answer(kind, row) for row in call.rows]
        call.answered = True
        return np.stack([values for values, _ in answers]), np.array([count for _, count in answers], dtype=np.int32)

    def _refusal(self, kind: _Kind | None, lane: Lane, data: np.ndarray) -> str | None:
        """Why Triton would refuse this call, or None."""
        if kind is None:
            return f"unknown ensemble {lane.model!r}"
        if lane.output != kind.output:
            return f"{lane.model} has no output {lane.output!r}"
        rows = len(data)
        if not 0 < rows <= min(lane.max_rows, self.model.max_batch_size):
            return f"{rows} rows for a lane of {lane.max_rows} and a model of {self.model.max_batch_size}"
        fields = data.dtype.names
        if kind.input == "text":
            ok = fields == (tensors.TEXT,) and data[tensors.TEXT].dtype == object and data[tensors.TEXT].shape[1:] == (1,)
        elif kind.input == "token_ids":
            ids = data[tensors.TOKEN_IDS] if fields == (tensors.TOKEN_IDS,) else None
            ok = ids is not None and ids.dtype == np.int64 and ids.ndim == 2
        elif kind.input == "image":
            ok = fields == (tensors.IMAGE, tensors.IMAGE_CROP) and data[tensors.IMAGE_CROP].shape[1:] == (3,)
        elif kind.input == "image_controlled":
            ok = (
                fields == IMAGE_CONTROL_INPUTS
                and data[tensors.IMAGE_CONTROLS].dtype == np.float32
                and data[tensors.IMAGE_CONTROLS].shape[2:] == (len(tensors.IMAGE_CONTROL_FIELDS),)
            )
        else:
            ok = fields == CONTROL_FIELDS
        return None if ok else f"{lane.model} takes {kind.input}, not {fields} {data.shape}"

    def _read(self, kind: _Kind, data: np.ndarray) -> list[Row]:
        if kind.input == "text":
            return [value.decode("utf-8") for value in data[tensors.TEXT].reshape(-1)]
        if kind.input == "token_ids":
            return [[int(i) for i in row if i != ID_PADDING] for row in data[tensors.TOKEN_IDS]]
        if kind.input == "image":
            crops = data[tensors.IMAGE_CROP].tolist()
            return [ImageRow(value, (x, y, size)) for value, (x, y, size) in zip(data[tensors.IMAGE].reshape(-1), crops)]
        if kind.input == "image_controlled":
            images = zip(data[tensors.IMAGE].reshape(-1), data[tensors.IMAGE_CROP].tolist(), data[tensors.IMAGE_CONTROLS])
            modes = data[tensors.CONTROL_LOG_ADDITIVE].reshape(-1)
            return [
                ImageRow(
                    value, (x, y, size), tuple(tuple(c) for c in controls.tolist() if tuple(c) != tensors.NO_CONTROL), bool(mode)
                )
                for (value, (x, y, size), controls), mode in zip(images, modes)
            ]
        rows: list[Row] = []
        for ids, factors, mode in zip(data[tensors.TOKEN_IDS], data[tensors.CONTROL_FACTORS], data[tensors.CONTROL_LOG_ADDITIVE]):
            real = ids != ID_PADDING
            rows.append(([int(i) for i in ids[real]], [float(f) for f in factors[real]], bool(mode[0])))
        return rows

    def _overlong(self, lane: Lane, rows: list) -> ServiceError | None:
        """As the tokenizer step refuses, in a call that asks not to truncate, a text over the model's limit."""
        if dict(lane.parameters).get("truncate", True) is not False:
            return None
        limit = self.model.max_sequence_length
        for index, row in enumerate(rows):
            count = len(self._tokenizer.encode(row).ids) if isinstance(row, str) else 0
            if count > limit:
                message = f"tokenizer: row {index}: a text has {count} tokens, more than the {limit} the model reads"
                return triton_error("INVALID_ARGUMENT", message)
        return None

    def _fault(self, call: Call) -> ServiceError | None:
        texts = [row for row in call.rows if isinstance(row, str)]
        for fault in self.faults:
            if fault.times == 0:
                continue
            if fault.marker is not None and not any(fault.marker in text for text in texts):
                continue
            if fault.times is not None:
                fault.times -= 1
            return fault.error
        return None

    # -- answers ---------------------------------------------------------------------------------------

    def _framed(self, row: Row) -> tuple[list[int], list[float] | None, bool, int]:
        """A row as the model reads it: its ids (framed, cut to the model's length), its factors, its mode, and its
        untruncated token count."""
        if isinstance(row, str):
            full = self._tokenizer.encode(row).ids
            ids = full if len(full) <= self.model.max_sequence_length else self._truncating.encode(row).ids
            return ids, None, True, len(full)
        ids, factors, log_additive = row if isinstance(row, tuple) else (row, None, True)
        room = self.model.max_sequence_length - len(self.prefix) - len(self.suffix)
        count = len(self.prefix) + len(ids) + len(self.suffix)
        framed = self.prefix + list(ids)[:room] + self.suffix
        if factors is None:
            return framed, None, log_additive, count
        ones = [1.0] * len(self.prefix), [1.0] * len(self.suffix)
        return framed, ones[0] + list(factors)[:room] + ones[1], log_additive, count

    def _vector(self, ids: list[int], factors: list[float] | None, log_additive: bool, size: int) -> np.ndarray:
        # Position-weighted, so that the order of the tokens counts; a factor weighs its position (squared when
        # multiplicative, so that the mode shows too). Not normalized: normalize and dimensions must do their part.
        weights = 1.0 / (1.0 + np.arange(len(ids)))
        if factors is not None:
            weights = weights * np.asarray(factors) ** (1 if log_additive else 2)
        return (weights @ self._table[np.asarray(ids)] @ _projection(size, self.seed)).astype(np.float32)

    def _image_vector(self, row: ImageRow, size: int) -> np.ndarray:
        """A function of the file's bytes, the crop and the controls alone: the same image, crop and controls, the same
        vector."""
        controls = repr((row.controls, row.log_additive)).encode() if row.controls else b""
        digest = hashlib.sha256(row.data + repr(row.crop).encode() + controls).digest()
        features = np.random.default_rng(list(digest)).standard_normal(FEATURES)
        return (features @ _projection(size, self.seed)).astype(np.float32)

    def _answer(self, kind: _Kind, row: Row) -> tuple[np.ndarray, int]:
        if isinstance(row, ImageRow):
            assert self.model.vision is not None  # image ensembles exist only for a model that sees images
            vector, count = self._image_vector(row, kind.size), self.model.vision.image_tokens
        else:
            ids, factors, log_additive, count = self._framed(row)
            vector = self._vector(ids, factors, log_additive, kind.size)
        if kind.output == tensors.POOLED:
            layers, poolings = kind.depth, len(self.model.layer_poolings)
            scale = (1 + np.arange(layers))[:, None, None] * (1 + np.arange(poolings) / 10)[None, :, None]
            vector = (vector[None, None, :] * scale).astype(np.float32)
        return vector, count

    def expected(self, row: Row, *, compressed: bool = False, layers: bool = False) -> tuple[np.ndarray, int]:
        """What the model's embedding ensemble (or its compressed or layers one) answers for this one input alone:
        its vector (or [layers + 1, poolings, dimensions] pooled vectors) and its untruncated token count."""
        if compressed:
            assert self.model.compression is not None, "a model without compression has no compressed ensembles"
            ensembles: EnsembleNames = self.model.compression.ensembles
        else:
            ensembles = self.model.layers if layers else self.model.embedding
        if isinstance(row, ImageRow):
            assert self.model.vision is not None
            vision = self.model.vision.controlled if row.controls else self.model.vision.ensembles
            image = vision.compressed if compressed else vision.layers if layers else vision.embedding
            return self._answer(self._kinds[image], row)
        kind = "text" if isinstance(row, str) else "controlled" if isinstance(row, tuple) else "token_ids"
        return self._answer(self._kinds[getattr(ensembles, kind)], row)

    def tokens(self, text: str) -> list[int]:
        """A text's token ids without the special tokens, as an input of token ids would carry them."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids
