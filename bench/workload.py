"""The texts every benchmark sends: real STS sentences, and longer passages built from them."""

from __future__ import annotations

from pathlib import Path

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
