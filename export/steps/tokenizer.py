"""Tokenizer step: texts (or a prompt's token ids) to padded input ids and an attention mask.

Each request is padded to its longest sequence. Where length buckets are configured (GPU encoders,
whose dynamic batcher merges only equal shapes) it is padded to the smallest bucket that holds it.
A request with the parameter `truncate: false` has any text over the model's limit refused (INVALID_ARG, naming
its row and count) instead of cut, so that the encoder never runs on it. The same file serves three models: `tokenizer` (input TEXT), `token-ids` (input TOKEN_IDS, used as
they are without their -1 padding, and framed by the model's special tokens like a text would be) and
`controlled-ids` (TOKEN_IDS with a CONTROL_FACTORS row each, framed and padded alongside with 1: special
tokens and padding are never controlled).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

# The export copies repository_contract/tensors.py next to this file: Triton cannot import the repository's packages.
sys.path.insert(0, str(Path(__file__).parent))
from tensors import (  # type: ignore[import-not-found]
    ATTENTION_MASK,
    CONTROL_FACTORS,
    ID_PADDING,
    INPUT_IDS,
    TEXT,
    TOKEN_COUNT,
)

# Batches here are a few short texts; tokenizers' thread pool costs more than it saves on 2 shared cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _special_token_frame(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a sequence, e.g. [CLS] and [SEP]."""
    probe = "hello"
    framed = tokenizer.encode(probe).ids
    bare = tokenizer.encode(probe, add_special_tokens=False).ids
    start = next(i for i in range(len(framed)) if framed[i : i + len(bare)] == bare)
    return framed[:start], framed[start + len(bare) :]


def _strict(request) -> bool:
    """Whether the request asks not to truncate (request parameter `truncate: false`, which an ensemble hands every
    step): then an over-long text is refused. Without it, texts are cut at the model's limit and counted whole."""
    return json.loads(request.parameters() or "{}").get("truncate", True) is False


def _error(error: Exception):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {error}"))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.buckets = sorted(int(b) for b in params["length_buckets"].split(",") if b)
        self.max_length = int(params["max_sequence_length"])
        self.pad_id = int(params["pad_token_id"])
        tokenizer_file = str(Path(args["model_repository"]) / args["model_version"] / "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.truncating = Tokenizer.from_file(tokenizer_file)
        self.truncating.enable_truncation(self.max_length)
        self.prefix, self.suffix = _special_token_frame(self.tokenizer)
        self.input_name = config["input"][0]["name"]
        self.controlled = any(i["name"] == CONTROL_FACTORS for i in config["input"])

    def _encode_texts(self, texts: list[str]) -> list[tuple[list[int], int]]:
        """(ids cut to max_length, untruncated count): the gateway rejects or accepts overlong texts."""
        encoded = [e.ids for e in self.tokenizer.encode_batch(texts)]
        overlong = [i for i, ids in enumerate(encoded) if len(ids) > self.max_length]
        truncated = self.truncating.encode_batch([texts[i] for i in overlong]) if overlong else []
        result = [(ids, len(ids)) for ids in encoded]
        for i, encoding in zip(overlong, truncated):
            result[i] = (encoding.ids, len(encoded[i]))
        return result

    def _frame_ids(self, request) -> tuple[list[tuple[list[int], int]], list[list[float]] | None]:
        """Each row without its padding, cut to fit and framed by the special tokens, with its untruncated count;
        and for the controlled model each row's factors cut and framed alike (1 at the special tokens)."""
        room = self.max_length - len(self.prefix) - len(self.suffix)
        rows = self._input(request)
        real = rows != ID_PADDING
        sequences = [
            (self.prefix + row[keep].tolist()[:room] + self.suffix, len(self.prefix) + int(keep.sum()) + len(self.suffix))
            for row, keep in zip(rows, real)
        ]
        if not self.controlled:
            return sequences, None
        frame = [1.0] * len(self.prefix), [1.0] * len(self.suffix)
        factors = [
            frame[0] + row[keep].tolist()[:room] + frame[1] for row, keep in zip(self._input(request, CONTROL_FACTORS), real)
        ]
        return sequences, factors

    def _bucket(self, length: int) -> int:
        return next((b for b in self.buckets if b >= length), length)

    def _response(self, sequences: list[tuple[list[int], int]], factors: list[list[float]] | None = None):
        width = self._bucket(max(len(ids) for ids, _ in sequences))
        input_ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, (ids, _) in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        counts = np.array([[count] for _, count in sequences], dtype=np.int32)
        tensors = [
            pb_utils.Tensor(INPUT_IDS, input_ids),
            pb_utils.Tensor(ATTENTION_MASK, attention_mask),
            pb_utils.Tensor(TOKEN_COUNT, counts),
        ]
        if factors is not None:
            padded = np.ones((len(sequences), width), dtype=np.float32)
            for row, values in enumerate(factors):
                padded[row, : len(values)] = values
            tensors.append(pb_utils.Tensor(CONTROL_FACTORS, padded))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        if self.input_name != TEXT:
            return [self._answer(*self._frame_ids(r)) for r in requests]
        # One encode_batch for every text of every request: per call overhead is paid once per batch.
        texts, counts, responses = [], [], [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                decoded = [v.decode("utf-8") for v in self._input(request).reshape(-1)]
            except UnicodeDecodeError as error:
                responses[index] = _error(error)
                decoded = []
            texts += decoded
            counts.append(len(decoded))
        sequences = self._encode_texts(texts) if texts else []
        start = 0
        for index, count in enumerate(counts):
            if responses[index] is None:
                rows = sequences[start : start + count]
                refusal = self._overlong(rows) if _strict(requests[index]) else None
                responses[index] = refusal or self._answer(rows)
            start += count
        return responses

    def _overlong(self, sequences):
        """A request that does not truncate fails, before the encoder runs, when a text is over the model's limit."""
        for row, (_, count) in enumerate(sequences):
            if count > self.max_length:
                message = f"tokenizer: row {row}: a text has {count} tokens, more than the {self.max_length} the model reads"
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
        return None

    def _answer(self, sequences, factors=None):
        """The response for one request; a request that cannot be padded (no rows) fails alone."""
        try:
            return self._response(sequences, factors)
        except ValueError as error:
            return _error(error)

    def _input(self, request, name: str | None = None) -> np.ndarray:
        return pb_utils.get_input_tensor_by_name(request, name or self.input_name).as_numpy()
