"""Checks the exported ONNX against the original sentence-transformers model on real sentences."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from export.source_model import SourceModel

# Cosine to the original model that each precision must reach: (on every sentence, on average).
# fp32 must be exact up to float rounding; int8 trades a little accuracy for ~2x CPU speed.
MIN_COSINE = {"fp32": (0.9999, 0.9999), "fp16": (0.999, 0.9995), "int8": (0.95, 0.98)}


@dataclass(frozen=True)
class ValidationReport:
    sentences: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float

    def passes(self, precision: str) -> bool:
        least, mean = MIN_COSINE[precision]
        return self.min_cosine >= least and self.mean_cosine >= mean


def mean_pooled(session: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Masked mean of the token embeddings, the texts tokenized as one batch padded to its longest."""
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    (tokens,) = session.run(["token_embeddings"], {"input_ids": ids, "attention_mask": mask})
    weights = mask[..., None].astype(np.float32)
    return (tokens * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def onnx_sentence_embeddings(onnx_path: Path, tokenizer: Tokenizer, texts: list[str], normalize: bool, batch_size=32):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    embeddings = np.concatenate([mean_pooled(session, tokenizer, texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)])
    if normalize:
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings


def validate(source: SourceModel, onnx_path: Path, tokenizer: Tokenizer, texts: list[str]) -> ValidationReport:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(source.path), device="cpu").encode(texts, batch_size=32, convert_to_numpy=True)
    exported = onnx_sentence_embeddings(onnx_path, tokenizer, texts, source.normalize)
    cosine = (reference * exported).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1))
    return ValidationReport(
        sentences=len(texts),
        max_abs_diff=float(np.abs(reference - exported).max()),
        min_cosine=float(cosine.min()),
        mean_cosine=float(cosine.mean()),
    )
