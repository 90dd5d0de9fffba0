"""The texts every benchmark sends: real STS sentences, and longer passages built from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.datasets import DEFAULT_STS_PATH, sts_sentences

# About 100-200 tokens each: the size of a retrieval chunk, and well past the short-sentence buckets.
PASSAGE_MIN_CHARS = 600


def sentences(path: Path = DEFAULT_STS_PATH) -> list[str]:
    return sts_sentences(path)


def passages(path: Path = DEFAULT_STS_PATH) -> list[str]:
    """Consecutive STS sentences joined until each passage has PASSAGE_MIN_CHARS characters."""
    result, current = [], []
    for sentence in sts_sentences(path):
        current.append(sentence)
        if sum(len(s) + 1 for s in current) >= PASSAGE_MIN_CHARS:
            result.append(" ".join(current))
            current = []
    return result


def zipf_queries(texts: list[str], count: int, exponent: float = 1.1, seed: int = 0) -> list[str]:
    """`count` texts drawn with replacement so that the r-th most popular is drawn in proportion to 1/r^exponent,
    as repeated search queries are. Which text gets which rank is shuffled by `seed`, not by length or order."""
    rng = np.random.default_rng(seed)
    ranked = rng.permutation(len(texts))
    weights = 1.0 / np.arange(1, len(texts) + 1) ** exponent
    draws = rng.choice(len(texts), size=count, p=weights / weights.sum())
    return [texts[ranked[d]] for d in draws]
