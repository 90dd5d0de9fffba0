"""The ceiling: the exported encoder run by onnxruntime in this process, with the same tokenizer, no server.

Texts are tokenized as a batch, padded to the batch's longest text (not to a bucket), encoded and mean-pooled
by the export's own validation code, which applies the model's head (pooling, Dense, Normalize): what a caller embedding in-process
would do. Like sentence-transformers, a list is sorted by length first, so a batch pads as little as it can.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from export.steps.sentence_head import SentenceHead
from export.validate import head_embeddings


@dataclass(frozen=True)
class Throughput:
    batch_size: int
    texts_per_s: float


class RawEncoder:
    def __init__(self, repository: Path, threads: int):
        (manifest_path,) = repository.glob("*/embedding_manifest.json")
        manifest = json.loads(manifest_path.read_text())
        self.precision = manifest["precision"]
        self.head = SentenceHead.load(repository / manifest["steps"]["pooling"] / "1")
        self.tokenizer = Tokenizer.from_file(str(repository / manifest["tokenizer"]))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(manifest["max_sequence_length"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(repository / manifest["steps"]["encoder"] / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        return head_embeddings(self.session, self.tokenizer, texts, self.head)

    def throughput(self, texts: list[str], batch_size: int) -> Throughput:
        """Texts per second over one pass of `texts`, after one warm-up batch."""
        ordered = sorted(texts, key=len)
        self.embed(ordered[:batch_size])
        start = time.perf_counter()
        for i in range(0, len(ordered), batch_size):
            self.embed(ordered[i : i + batch_size])
        return Throughput(batch_size, len(ordered) / (time.perf_counter() - start))

    def best_throughput(self, texts: list[str], batch_sizes: list[int], progress: Callable[[str], None]) -> list[Throughput]:
        results = []
        for size in batch_sizes:
            results.append(self.throughput(texts, size))
            progress(f"raw onnxruntime {self.precision} batch {size}: {results[-1].texts_per_s:.0f} texts/s")
        return results

    def single_latency_ms(self, texts: list[str], count: int) -> float:
        """p50 of embedding one text at a time: the floor for a concurrency-1 request."""
        self.embed(texts[:1])
        timings = []
        for text in texts[:count]:
            start = time.perf_counter()
            self.embed([text])
            timings.append(time.perf_counter() - start)
        return 1000 * float(np.median(timings))
