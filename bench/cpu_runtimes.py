"""Levers of the CPU encoder's runtime and precision (issue 26), raw and in-process, in one run: onnxruntime fp32 (the
graph as exported, the yardstick) and with onnxruntime's transformer fusions (bench.transformer_fusion); onnxruntime's
dynamic int8 with one scale per run (quantize_dynamic as it comes, served before), in slices of 8 rows and one row per
run; the served int8, with a scale per token (export.per_token_int8), with 7-bit weights and with 8-bit ones;
onnxruntime's static int8 (QDQ, per-channel weights, activations calibrated on the first STS sentences after
onnxruntime's pre-processing: its Spearman is measured partly on its calibration texts, which flatters it); and
OpenVINO at f32 and bf16 (in hardware where the CPU has AVX-512 BF16), bf16 once as it comes and once with every row
padded to its own length rounded up to a multiple of 16 tokens, a slice holding rows of one padded width. The report
names the CPU's vector instructions, which decide the int8 and bf16 figures.

Each is run as the encoder step runs a batch: the texts sorted by length, in slices padded to the slice's longest.
Quality is the STS Spearman over the shipped pairs and the vectors' cosine to fp32's; determinism is the largest
difference between 64 texts' vectors embedded alone and among all the others. Rounds alternate the configurations, so
a machine that slows down slows every one; each figure is the best of the rounds.

    python -m bench.cpu_runtimes [--rounds 2] [--out bench/results/cpu_runtimes.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bench.cli import command_line, fresh_work_dir, table_parser
from bench.machine import describe
from bench.report import markdown_table
from bench.sts_quality import pair_cosines, spearman
from bench.throughput import ROOT, progress
from bench.transformer_fusion import fuse
from export.datasets import StsPair, read_sts_pairs
from export.onnx_export import quantize_int8
from export.validate import padded_batch
from harness.python_backend import step_module
from repository_contract.manifest import Manifest, manifest_paths, read
from repository_contract.tensors import ATTENTION_MASK, TOKEN_EMBEDDINGS, onnx_name

# Min-max calibration keeps every intermediate tensor of every batch: 256 sentences hold it to a few GB.
CALIBRATION_TEXTS = 256

Run = Callable[[dict[str, np.ndarray]], np.ndarray]  # padded feeds -> token embeddings


@dataclass(frozen=True)
class Config:
    name: str
    runtime: Callable[[int], Run]  # threads -> a runner
    slice_rows: int
    # Above 1: each row padded to its own length rounded up to a multiple of this, and a slice holds rows of one such
    # width only, so that no row's padding depends on the rows beside it.
    width_multiple: int = 1


def onnxruntime_runner(graph: Path, fuse_skip_layer_norm: bool = False) -> Callable[[int], Run]:
    # The encoder step's own sessions (export/steps/encoder.py), as the export configures them by default: threads that
    # sleep between runs, and no SkipLayerNormalization unless asked for (export's --fuse-skip-layer-norm).
    step = step_module("encoder")

    def build(threads: int) -> Run:
        session = step.cpu_session(graph, step.cpu_options(threads, spinning=False), fuse_skip_layer_norm)
        return lambda feeds: session.run([onnx_name(TOKEN_EMBEDDINGS)], feeds)[0]

    return build


def _openvino(graph: Path, precision: str) -> Callable[[int], Run]:
    import openvino

    def build(threads: int) -> Run:
        core = openvino.Core()
        settings = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        compiled = core.compile_model(core.read_model(str(graph)), "CPU", settings)
        request, output = compiled.create_infer_request(), compiled.output(onnx_name(TOKEN_EMBEDDINGS))
        return lambda feeds: request.infer(feeds)[output].copy()

    return build


def _per_run_scales(fp32: Path, out: Path) -> Path:
    """quantize_dynamic as the export called it before per-token scales: every quantizable op, one scale per run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def _static_int8(fp32: Path, work: Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """onnxruntime's static quantization as its documentation gives it for CPUs: the graph pre-processed (shape
    inference and optimization), QDQ format, per-channel int8 weights, uint8 activations whose ranges are calibrated
    (min-max) on `calibration`'s batches; MatMuls only, as the served int8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared, out = work / "int8-static-prepared.onnx", work / "int8-static.onnx"
    # onnxruntime's symbolic shape inference gives up on the exported encoder ("Incomplete symbolic shape inference");
    # ONNX's own shape inference and the graph optimization still run.
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=["MatMul"]
    )
    return out


def _feeds(tokenizer: Tokenizer, texts: list[str], multiple: int) -> dict[str, np.ndarray]:
    feeds = padded_batch(tokenizer, texts)
    width = feeds[onnx_name(ATTENTION_MASK)].shape[1]
    extra = -width % multiple
    return {name: np.pad(array, ((0, 0), (0, extra))) for name, array in feeds.items()}


def _slices(lengths: list[int], config: Config) -> list[list[int]]:
    """The rows of each run: sorted by length, config.slice_rows at a time, within one padded width (width_multiple)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    widths: dict[int, list[int]] = {}
    for row in order:
        widths.setdefault(-(-lengths[row] // config.width_multiple) if config.width_multiple > 1 else 0, []).append(row)
    return [rows[b : b + config.slice_rows] for rows in widths.values() for b in range(0, len(rows), config.slice_rows)]


def embed(run: Run, tokenizer: Tokenizer, texts: list[str], config: Config) -> np.ndarray:
    """Mean-pooled, normalized vectors of `texts` (in their order), run as the encoder step runs them."""
    vectors = np.zeros((len(texts), 0), dtype=np.float32)
    for rows in _slices([len(tokenizer.encode(text).ids) for text in texts], config):
        feeds = _feeds(tokenizer, [texts[i] for i in rows], config.width_multiple)
        mask = feeds[onnx_name(ATTENTION_MASK)][..., None]
        pooled = (run(feeds) * mask).sum(1) / mask.sum(1)
        if not vectors.shape[1]:
            vectors = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
        vectors[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return vectors


def one_text_p50_ms(run: Run, tokenizer: Tokenizer, texts: list[str], config: Config) -> float:
    feeds = [_feeds(tokenizer, [text], config.width_multiple) for text in texts]
    run(feeds[0])
    timings = []
    for one in feeds:
        started = time.perf_counter()
        run(one)
        timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)


def compare(configs: list[Config], tokenizer: Tokenizer, pairs: list[StsPair], rounds: int, command: str) -> list[str]:
    """Every configuration measured as the module says, configs[0] the yardstick; the report's lines from the
    paragraph saying how it was made to the table."""
    texts = [t for p in pairs for t in (p.first, p.second)]
    gold = np.array([p.score for p in pairs])
    cores = len(os.sched_getaffinity(0))
    machine = describe()
    quality: dict[str, tuple[float, float, float]] = {}
    reference = embed(configs[0].runtime(1), tokenizer, texts, configs[0])
    for config in configs:
        run = config.runtime(1)
        vectors = embed(run, tokenizer, texts, config)
        alone = np.concatenate([embed(run, tokenizer, [text], config) for text in texts[:64]])
        quality[config.name] = (
            spearman(pair_cosines(vectors), gold),
            float((vectors * reference).sum(1).min()),
            float(np.abs(alone - vectors[:64]).max()),
        )
        progress(f"{config.name}: Spearman, min cosine to fp32, alone against batched: {quality[config.name]}")
    speed: dict[tuple[str, str], list[float]] = {}
    for round_ in range(rounds):
        for config in configs:
            for threads in sorted({1, cores}):
                run = config.runtime(threads)
                embed(run, tokenizer, texts[:64], config)
                started = time.perf_counter()
                embed(run, tokenizer, texts, config)
                speed.setdefault((config.name, f"{threads} threads"), []).append(len(texts) / (time.perf_counter() - started))
            run = config.runtime(cores)
            speed.setdefault((config.name, "one text"), []).append(one_text_p50_ms(run, tokenizer, texts[:200], config))
        progress(f"round {round_ + 1} of {rounds}")
    yardstick = max(speed[(configs[0].name, f"{cores} threads")])
    rows = []
    for config in configs:
        rates = [max(speed[(config.name, f"{t} threads")]) for t in sorted({1, cores})]
        spearman_, cosine, drift = quality[config.name]
        rows.append(
            [
                config.name,
                *(f"{rate:.0f}" for rate in rates),
                f"{rates[-1] / yardstick:.2f}",
                f"{min(speed[(config.name, 'one text')]):.2f}",
                f"{spearman_:.4f}",
                f"{100 * (1 - spearman_ / quality[configs[0].name][0]):.2f}%",
                f"{cosine:.6f}",
                f"{drift:.1e}",
            ]
        )
    return [
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}, {cores} cores of "
        f"{machine['CPU']} ({machine['vector instructions']}), onnxruntime {machine['onnxruntime']}; "
        f"the best of {rounds} alternating rounds. Raw and in-process: no Triton, no gateway. Texts/s over the "
        f"{len(texts)} STS sentences sorted by length, run in slices as the encoder step runs them; one text: the p50 of "
        f"200 sentences each run alone on {cores} threads; ratio: to onnxruntime fp32 on {cores} threads. Spearman over "
        f"the {len(pairs)} pairs (mean pooling, the model's own head); its drop, the least cosine of a vector to fp32's, and "
        "the largest difference between 64 texts' vectors embedded alone and batched are measured on 1 thread.",
        "",
        *markdown_table(
            [
                "configuration",
                "texts/s, 1 thread",
                f"texts/s, {cores} threads",
                "ratio",
                "one text p50 ms",
                "STS Spearman",
                "drop",
                "min cosine to fp32",
                "alone against batched",
            ],
            rows,
        ),
    ]


def lever_parser(module: str, doc: str | None, table: str) -> argparse.ArgumentParser:
    """The arguments of a command that compares levers: table_parser's, --rounds and --pairs."""
    parser = table_parser(f"bench.{module}", doc or "", table)
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each configuration")
    parser.add_argument("--pairs", type=int, default=None, help="the first this many STS pairs only (a smoke run)")
    return parser


def exported_fp32(module: str) -> tuple[Manifest, Path]:
    """model_repository's manifest and its fp32 encoder graph, the yardstick every lever is measured against."""
    manifest = read(manifest_paths(ROOT / "model_repository")[0])
    if manifest.precision != "fp32":
        sys.exit(f"bench.{module}: needs the fp32 export in model_repository (bin/setup makes it)")
    return manifest, ROOT / "model_repository" / manifest.steps["encoder"] / "1" / "model.onnx"


def write_comparison(
    args: argparse.Namespace,
    argv: list[str] | None,
    module: str,
    title: str,
    configs: list[Config],
    tokenizer: Tokenizer,
    pairs: list[StsPair],
) -> None:
    """compare() over `pairs` and args.rounds, printed and written to args.out under `title`."""
    lines = [f"# {title}", "", *compare(configs, tokenizer, pairs, args.rounds, command_line(f"python -m bench.{module}", argv))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = lever_parser("cpu_runtimes", __doc__, "cpu_runtimes.md").parse_args(argv)
    work = fresh_work_dir(args.work_dir, "cpu-runtimes-")
    manifest, fp32 = exported_fp32("cpu_runtimes")
    progress("quantizing the encoder to int8, as `python -m export --precision int8` does, and without per-token scales")
    int8 = quantize_int8(fp32, work / "int8.onnx")
    per_run = _per_run_scales(fp32, work / "int8-per-run.onnx")
    full_range = quantize_int8(fp32, work / "int8-full-range.onnx", full_range_weights=True)
    tokenizer = Tokenizer.from_file(str(ROOT / "model_repository" / manifest.tokenizer))
    pairs = read_sts_pairs()[: args.pairs]
    texts = [t for p in pairs for t in (p.first, p.second)]
    calibrated = min(len(texts), CALIBRATION_TEXTS)
    progress(f"calibrating static int8 on {calibrated} STS sentences")
    calibration = [_feeds(tokenizer, texts[i : i + 8], 1) for i in range(0, calibrated, 8)]
    static = _static_int8(fp32, work, calibration)
    fused = work / "fused.onnx"
    fuse(fp32, fused)
    configs = [
        Config("onnxruntime fp32, slices of 8 (served fp32)", onnxruntime_runner(fp32), 8),
        Config("onnxruntime fp32 with transformer fusions, slices of 8", onnxruntime_runner(fused), 8),
        Config("onnxruntime int8, a scale per run, slices of 8 (served int8 before)", onnxruntime_runner(per_run), 8),
        Config("onnxruntime int8, a scale per run, one row per run", onnxruntime_runner(per_run), 1),
        Config("onnxruntime int8, a scale per token, 8-bit weights, slices of 8", onnxruntime_runner(full_range), 8),
        Config("onnxruntime int8, a scale per token, 7-bit weights, slices of 8 (served int8)", onnxruntime_runner(int8), 8),
        Config(
            "the same with SkipLayerNormalization fused (served until 2026-12-06)",
            onnxruntime_runner(int8, fuse_skip_layer_norm=True),
            8,
        ),
        Config(f"onnxruntime int8, static QDQ calibrated on {calibrated} sentences, slices of 8", onnxruntime_runner(static), 8),
        Config("OpenVINO f32, slices of 8", _openvino(fp32, "f32"), 8),
        Config("OpenVINO bf16, slices of 8", _openvino(fp32, "bf16"), 8),
        Config("OpenVINO bf16, slices of 8, each row padded to a multiple of 16", _openvino(fp32, "bf16"), 8, 16),
    ]
    write_comparison(args, argv, "cpu_runtimes", "The CPU encoder's runtime and precision", configs, tokenizer, pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
