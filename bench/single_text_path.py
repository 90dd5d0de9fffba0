"""Where one text's time goes at concurrency 1 (issue 26), in one run: the gateway, Triton's ensemble and each of its
steps, against raw onnxruntime on the same encoder graph.

For each export (the fp32 model_repository, and an int8 export unless --no-int8), the same sentences are sent one at a
time, first straight to Triton's text ensemble over HTTP (tritonclient), then over the gateway's /v1/embeddings.
Triton's statistics, read before and after the direct calls, give each step's time per call: queue, input, compute and
output. Raw onnxruntime runs the same encoder graph on the same sentences in this process, with the encoder step's
session settings when it runs alone (2 threads, no spinning) and with spinning threads.

    python -m bench.single_text_path [--requests 300] [--no-int8] [--out bench/results/single_text_path.md]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import requests
import tritonclient.http as triton_http
from tokenizers import Tokenizer

from bench.cli import command_line, fresh_work_dir, table_parser
from bench.report import markdown_table
from bench.throughput import ROOT, export_int8, progress
from bench.workload import sentences
from export.validate import padded_batch
from harness.servers import RunningService, start_service
from repository_contract.manifest import Manifest, manifest_paths, read
from repository_contract.tensors import TEXT, TOKEN_EMBEDDINGS, onnx_name

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def _stats(service: RunningService) -> dict[str, dict]:
    with urllib.request.urlopen(f"{service.triton_http_url}/v2/models/stats", timeout=10) as response:
        return {s["name"]: s for s in json.loads(response.read())["model_stats"]}


def _per_call_ms(before: dict, after: dict) -> dict[str, float]:
    """Each stage's mean time per execution between two statistics reads, and the executions' count."""
    executions = int(after["execution_count"]) - int(before["execution_count"])
    times = {
        stage: (int(after["inference_stats"][stage]["ns"]) - int(before["inference_stats"][stage]["ns"]))
        / 1e6
        / max(executions, 1)
        for stage in STAGES
    }
    return {"executions": executions, **times}


def _timed(call, texts: list[str]) -> list[float]:
    """Milliseconds of each call, one text at a time, after one untimed call."""
    call(texts[0])
    timings = []
    for text in texts:
        started = time.perf_counter()
        call(text)
        timings.append(1000 * (time.perf_counter() - started))
    return timings


def _raw_session(graph: Path, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def measure(repository: Path, texts: list[str], work: Path) -> dict:
    manifest: Manifest = read(manifest_paths(repository)[0])
    tokenizer = Tokenizer.from_file(str(repository / manifest.tokenizer))
    graph = repository / manifest.steps["encoder"] / "1" / "model.onnx"
    figures: dict = {"precision": manifest.precision}
    for spinning in (False, True):
        session = _raw_session(graph, spinning)
        figures[f"raw, spinning {'on' if spinning else 'off'}"] = statistics.median(
            _timed(lambda text, s=session: s.run([onnx_name(TOKEN_EMBEDDINGS)], padded_batch(tokenizer, [text])), texts)
        )
    service = start_service(work / f"service-{manifest.precision}", repository)
    try:
        client = triton_http.InferenceServerClient(service.triton_http_url.removeprefix("http://"))

        def direct(text: str) -> None:
            (prompt := triton_http.InferInput(TEXT, [1, 1], "BYTES")).set_data_from_numpy(
                np.array([[text.encode()]], dtype=object)
            )
            client.infer(manifest.ensembles.text, [prompt])

        before = _stats(service)
        figures["triton ensemble, client p50"] = statistics.median(_timed(direct, texts))
        after = _stats(service)
        figures["steps"] = {
            role: _per_call_ms(before[name], after[name])
            for role, name in [
                ("ensemble", manifest.ensembles.text),
                *[(r, manifest.steps[r]) for r in ("tokenizer", "encoder", "pooling")],
            ]
        }
        with requests.Session() as http:

            def gateway(text: str) -> None:
                body = {"model": manifest.name, "input": [text], "encoding_format": "float"}
                http.post(f"{service.http_url}/v1/embeddings", json=body, timeout=30).raise_for_status()

            figures["gateway, client p50"] = statistics.median(_timed(gateway, texts))
    finally:
        service.stop()
    progress(f"{manifest.precision}: {figures}")
    return figures


PATHS = ("raw, spinning off", "raw, spinning on", "triton ensemble, client p50", "gateway, client p50")


def markdown(results: list[dict], command: str, count: int) -> str:
    lines = [
        "# One text at concurrency 1: where the time goes",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}: {count} STS sentences, one at a time. Client p50: the "
        "median of each call as its caller saw it. Raw: onnxruntime in this process on the same encoder graph and "
        "tokenization, 2 threads, with spinning off (the encoder step's setting) and on.",
        "",
        *markdown_table(["export", *PATHS], [[f["precision"], *(f"{f[p]:.2f} ms" for p in PATHS)] for f in results]),
        "",
        "Each step's mean per execution during the direct ensemble calls (every execution held one text), from Triton's "
        "statistics: time queued, copying inputs in, computing, copying outputs out.",
        "",
    ]
    rows = [
        [f["precision"], role, step["executions"], *(f"{step[s]:.2f}" for s in STAGES), f"{sum(step[s] for s in STAGES):.2f}"]
        for f in results
        for role, step in f["steps"].items()
    ]
    lines += markdown_table(["export", "step", "executions", "queue ms", "input ms", "compute ms", "output ms", "total ms"], rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.single_text_path", __doc__, "single_text_path.md")
    parser.add_argument("--requests", type=int, default=300, help="sentences sent one at a time, per path")
    parser.add_argument("--no-int8", action="store_true", help="the fp32 export only")
    args = parser.parse_args(argv)
    work = fresh_work_dir(args.work_dir, "single-text-")
    texts = sentences()[: args.requests]
    repositories = [ROOT / "model_repository"] + ([] if args.no_int8 else [export_int8(work)])
    results = [measure(repository, texts, work) for repository in repositories]
    report = markdown(results, command_line("python -m bench.single_text_path", argv), len(texts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
