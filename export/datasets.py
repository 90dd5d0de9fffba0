"""The STS sentence pairs shipped in export/data (see its README for origin and licence), used for calibration,
validation and quality measurement."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STS_PATH = Path(__file__).resolve().parent / "data" / "sts-forums.tsv"


@dataclass(frozen=True)
class StsPair:
    score: float
    first: str
    second: str


def read_sts_pairs(path: Path = DEFAULT_STS_PATH) -> list[StsPair]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) >= 7]
    return [StsPair(float(row[4]), row[5].strip(), row[6].strip()) for row in rows]


def sts_sentences(path: Path = DEFAULT_STS_PATH) -> list[str]:
    """Both sentences of every pair, in file order: 1030 texts for the shipped file."""
    return [text for pair in read_sts_pairs(path) for text in (pair.first, pair.second)]
