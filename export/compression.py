"""Fits the compress_to_size projection that the `compression` step applies inside the ensemble.

PCA on the model's own sentence embeddings of a calibration corpus keeps the directions along which
sentences differ most; a model trained with Matryoshka loss already orders its dimensions that way,
so for it the projection is plain truncation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Projection:
    method: str  # "pca" or "matryoshka"
    mean: np.ndarray  # [dims]
    components: np.ndarray  # [size, dims]

    @property
    def size(self) -> int:
        return self.components.shape[0]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.mean.tobytes() + self.components.tobytes()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, components=self.components)


def fit_pca(embeddings: np.ndarray, size: int) -> Projection:
    if size >= embeddings.shape[1] or size > embeddings.shape[0]:
        raise ValueError(f"cannot fit {size} components to {embeddings.shape[0]} embeddings of {embeddings.shape[1]} dims")
    embeddings = embeddings.astype(np.float64)
    mean = embeddings.mean(axis=0)
    # Rows of vt are the principal directions, strongest first.
    _, _, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    return Projection("pca", mean.astype(np.float32), vt[:size].astype(np.float32))


def matryoshka(dims: int, size: int) -> Projection:
    return Projection("matryoshka", np.zeros(dims, np.float32), np.eye(size, dims, dtype=np.float32))
