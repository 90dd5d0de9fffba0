"""CLI: python -m bench.perf_analyzer.make_input_data

Writes sts_sentences.json beside this file: perf_analyzer's --input-data for the text ensemble, one real STS
sentence per request (both sentences of every pair in export/data/sts-forums.tsv), so a benchmark sees the
length mix of real traffic instead of perf_analyzer's random bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from export.datasets import sts_sentences

OUTPUT = Path(__file__).resolve().parent / "sts_sentences.json"
# The ensemble's input, as named in its config.pbtxt; the shape leaves out the batch dimension.
INPUT_NAME = "TEXT"


def render(texts: list[str]) -> str:
    """One request per line, so a change of the sentences reads as a small diff."""
    requests = [json.dumps({INPUT_NAME: {"content": [text], "shape": [1]}}, ensure_ascii=False) for text in texts]
    return '{"data": [\n' + ",\n".join(requests) + "\n]}\n"


def main() -> int:
    texts = sts_sentences()
    OUTPUT.write_text(render(texts), encoding="utf-8")
    print(f"wrote {len(texts)} sentences to {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
