"""What a sentence-transformers model does after its transformer, in numpy: pooling, Dense layers, Normalize.

One definition serves the Triton pooling step (this file is copied next to its model.py) and the export,
which checks the ONNX encoder plus this head against sentence-transformers itself and fits the compression
on its output. Poolings follow sentence_transformers' Pooling module; the head is saved as head.json (the
modules in order) and head.npz (the Dense weights).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _cls(tokens, mask):
    # The first real token: index 0 under right padding, which is how every step here pads.
    first = mask.argmax(axis=1)
    return tokens[np.arange(tokens.shape[0]), first]


def _mean(tokens, mask):
    weights = mask[..., None]
    return (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def _mean_sqrt_len_tokens(tokens, mask):
    weights = mask[..., None]
    return (tokens * weights).sum(axis=1) / np.sqrt(np.maximum(weights.sum(axis=1), 1e-9))


def _max(tokens, mask):
    return np.where(mask[..., None] > 0, tokens, -np.inf).max(axis=1)


def _weightedmean(tokens, mask):
    # Token i of the text (1-based) weighs i. sentence-transformers numbers padded positions too, which is the
    # same under right padding; numbering real tokens only keeps it so whichever side is padded.
    weights = (np.cumsum(mask, axis=1) * mask)[..., None]
    return (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def _lasttoken(tokens, mask):
    # The last real token wherever the padding is: for a decoder embedder it is the end-of-sequence token,
    # the only one that has attended to the whole text.
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    return tokens[np.arange(tokens.shape[0]), last] * mask[np.arange(mask.shape[0]), last][:, None]


POOLINGS = {
    "cls": _cls,
    "mean": _mean,
    "max": _max,
    "lasttoken": _lasttoken,
    "mean_sqrt_len_tokens": _mean_sqrt_len_tokens,
    "weightedmean": _weightedmean,
}

_erf = np.vectorize(math.erf, otypes=[np.float32])

# torch.nn activation class names, as sentence-transformers' Dense config records them, to their numpy form.
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Identity": lambda x: x,
    "Tanh": np.tanh,
    "ReLU": lambda x: np.maximum(x, 0),
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "GELU": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
}


@dataclass(frozen=True)
class Dense:
    weight: np.ndarray  # [out, in], as torch.nn.Linear keeps it
    bias: np.ndarray | None
    activation: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        return ACTIVATIONS[self.activation](y)


class Normalize:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class SentenceHead:
    poolings: tuple[str, ...]  # several are concatenated, in order, as sentence-transformers does
    modules: tuple  # Dense and Normalize, in the model's order

    def __call__(self, token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """token_embeddings [batch, sequence, hidden] and attention_mask [batch, sequence] -> [batch, dims]."""
        mask = attention_mask.astype(np.float32)
        x = np.concatenate([POOLINGS[p](token_embeddings, mask) for p in self.poolings], axis=1).astype(np.float32)
        for module in self.modules:
            x = module(x)
        return x.astype(np.float32)

    def save(self, directory: Path) -> None:
        layout, arrays = [], {}
        for index, module in enumerate(self.modules):
            if isinstance(module, Normalize):
                layout.append({"module": "normalize"})
                continue
            arrays[f"weight{index}"] = module.weight
            if module.bias is not None:
                arrays[f"bias{index}"] = module.bias
            layout.append({"module": "dense", "activation": module.activation})
        (directory / "head.json").write_text(json.dumps({"poolings": list(self.poolings), "modules": layout}, indent=2) + "\n")
        np.savez(directory / "head.npz", **arrays)

    @classmethod
    def load(cls, directory: Path) -> SentenceHead:
        spec = json.loads((directory / "head.json").read_text())
        arrays = np.load(directory / "head.npz")
        modules: list[Dense | Normalize] = []
        for index, module in enumerate(spec["modules"]):
            if module["module"] == "normalize":
                modules.append(Normalize())
            else:
                bias = arrays[f"bias{index}"] if f"bias{index}" in arrays else None
                modules.append(Dense(arrays[f"weight{index}"], bias, module["activation"]))
        return cls(tuple(spec["poolings"]), tuple(modules))
