"""A lever of the CPU encoder: onnxruntime's transformer optimizer (fused attention, embedding layer norm, skip layer
norm, bias GELU) on the exported graph, against the graph as exported, raw onnxruntime in-process, same session
options as the encoder step (no spinning), in alternating rounds so that a machine that slows down slows both.

    python -m bench.transformer_fusion [--rounds 3] [--out bench/results/transformer_fusion.md]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from bench.cli import command_line, fresh_work_dir, table_parser
from bench.throughput import ROOT, progress
from bench.workload import sentences
from export.validate import padded_batch
from repository_contract.manifest import manifest_paths, read
from repository_contract.tensors import TOKEN_EMBEDDINGS, onnx_name

BATCH = 32
MEASURED_S = 2.0


def _session(graph: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def _rate(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    """Runs per second over MEASURED_S, after one warm-up run."""
    output = [onnx_name(TOKEN_EMBEDDINGS)]
    session.run(output, feeds)
    started, runs = time.perf_counter(), 0
    while time.perf_counter() - started < MEASURED_S:
        session.run(output, feeds)
        runs += 1
    return runs / (time.perf_counter() - started)


def fuse(exported: Path, fused: Path) -> dict[str, int]:
    """onnxruntime's transformer optimizer on the exported encoder, saved to `fused`; the count of each fusion made."""
    from onnxruntime.transformers.optimizer import optimize_model

    # Heads and width 0: the optimizer reads them from the graph.
    optimized = optimize_model(str(exported), model_type="bert", num_heads=0, hidden_size=0)
    optimized.save_model_to_file(str(fused))
    return {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.transformer_fusion", __doc__, "transformer_fusion.md")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements of each graph")
    args = parser.parse_args(argv)
    work = fresh_work_dir(args.work_dir, "transformer-fusion-")
    manifest = read(manifest_paths(ROOT / "model_repository")[0])
    exported = ROOT / "model_repository" / manifest.steps["encoder"] / "1" / "model.onnx"
    fused = work / "fused.onnx"
    fusions = fuse(exported, fused)
    tokenizer = Tokenizer.from_file(str(ROOT / "model_repository" / manifest.tokenizer))
    texts = sentences()
    batch, one = padded_batch(tokenizer, texts[:BATCH]), padded_batch(tokenizer, texts[:1])
    check = padded_batch(tokenizer, texts[:64])
    (reference,) = _session(exported, 1).run([onnx_name(TOKEN_EMBEDDINGS)], check)
    (candidate,) = _session(fused, 1).run([onnx_name(TOKEN_EMBEDDINGS)], check)
    difference = float(np.abs(reference - candidate).max())
    graphs = {"as exported": exported, "fused": fused}
    rates: dict[tuple[str, int, str], list[float]] = {}
    for round_ in range(args.rounds):
        for name, graph in graphs.items():
            for threads in (1, 2):
                session = _session(graph, threads)
                rates.setdefault((name, threads, "batch"), []).append(BATCH * _rate(session, batch))
                rates.setdefault((name, threads, "one"), []).append(1000 / _rate(session, one))
        progress(f"round {round_ + 1} of {args.rounds}")
    lines = [
        "# Transformer fusions on the CPU encoder",
        "",
        f"Made by `{command_line('python -m bench.transformer_fusion', argv)}` on {time.strftime('%Y-%m-%d')}: "
        f"{manifest.name}'s exported encoder against onnxruntime's transformer optimizer's fusion of it ({fusions}); "
        f"max abs difference of the token embeddings on 64 STS sentences {difference:.1e}. Median of {args.rounds} "
        f"alternating rounds of {MEASURED_S:.0f} s each.",
        "",
        f"| graph | threads | texts/s, batch of {BATCH} | ms, one text |",
        "|---|---|---|---|",
    ]
    for name in graphs:
        for threads in (1, 2):
            batch_rate = statistics.median(rates[(name, threads, "batch")])
            one_ms = statistics.median(rates[(name, threads, "one")])
            lines.append(f"| {name} | {threads} | {batch_rate:.0f} | {one_ms:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
