"""perf_analyzer against bin/bench's own load generator, on the same service and the same points, in one run.

    python -m bench.perf_analyzer.study            # about 20 minutes: writes bench/results/perf_analyzer.{md,json}
    python -m bench.perf_analyzer.study --smoke --out DIR    # two points, a few seconds each (the test suite runs it)

Order of a run, each step printed as it starts:
1. raw onnxruntime in this process on the same ONNX and tokenizer, at several batch sizes: the ceiling;
2. one service (gateway + Triton) on the default export; the expected answers for every STS sentence are recorded
   from it one text at a time (perf_analyzer validates every response against them, byte for byte);
3. for each concurrency from 1 to 128 and each route (the text ensemble over Triton's gRPC and HTTP, and the
   gateway's /v1/embeddings with base64 vectors): perf_analyzer (closed loop, asynchronous, one thread per request
   in flight, time windows until stable), then bin/bench's load generator (bench/loadgen.py) sending the same
   requests in the same wire format (KServe v2 gRPC, KServe v2 HTTP with binary tensors, the same JSON body);
4. raw onnxruntime's batch 32 again, to show how far the machine's speed drifted during the run.
Both tools share the machine's cores with the server; each run records how much CPU the tool itself took.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import requests as request_bodies
from bench.cli import command_line, fresh_work_dir
from bench.machine import describe
from bench.perf_analyzer import runner
from bench.perf_analyzer.make_input_data import record_gateway, record_triton, render, token_counts
from bench.raw_onnxruntime import RawEncoder
from bench.throughput import run_load, served_model
from export.datasets import sts_sentences
from harness.servers import ROOT, RunningService, start_service
from repository_contract.tensors import EMBEDDING, TEXT, TOKEN_COUNT

RESULTS = ROOT / "bench" / "results"
ROUTES = ["ensemble gRPC", "ensemble HTTP", "gateway /v1/embeddings"]


def progress(message: str) -> None:
    print(f"[perf_analyzer study {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Plan:
    concurrencies: list[int]
    perf_analyzer: runner.Load
    warmup_s: float
    duration_s: float
    raw_batch_sizes: list[int]

    @staticmethod
    def full() -> Plan:
        return Plan(
            [1, 2, 4, 8, 16, 32, 64, 128],
            runner.Load(window_ms=5000, stability_percent=20, max_trials=10),
            2.0,
            10.0,
            [1, 8, 16, 32, 64],
        )

    @staticmethod
    def smoke() -> Plan:
        return Plan([1, 8], runner.Load(window_ms=1000, stability_percent=50, max_trials=4), 1.0, 2.0, [1, 32])


@dataclass
class Point:
    route: str
    tool: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    tool_cores: float
    errors: str | None
    # perf_analyzer's view of the server (ensemble routes): microseconds a request spent queued and computing.
    server_queue_us: float | None = None
    server_compute_us: float | None = None


def triton_grpc_bodies(model: str, texts: list[str]) -> list[bytes]:
    """ModelInferRequest bytes, one text each, asking for every output as perf_analyzer does."""
    from tritonclient.grpc import service_pb2

    bodies = []
    for text in texts:
        data = text.encode()
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name=TEXT, datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(struct.pack("<I", len(data)) + data)
        bodies.append(request.SerializeToString())
    return bodies


# KServe v2 HTTP with binary tensors, as perf_analyzer sends them: a JSON header, then the raw tensor bytes. The header
# is padded with spaces to one length, so that its length, a request header, is the same for every body.
HEADER_BYTES = 256


def triton_http_bodies(texts: list[str]) -> tuple[list[bytes], dict[str, str]]:
    bodies = []
    for text in texts:
        data = text.encode()
        tensor = struct.pack("<I", len(data)) + data
        header = json.dumps(
            {
                "inputs": [{"name": TEXT, "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(tensor)}}],
                "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in (EMBEDDING, TOKEN_COUNT)],
            }
        ).encode()
        bodies.append(header.ljust(HEADER_BYTES) + tensor)
    return bodies, {"Inference-Header-Content-Length": str(HEADER_BYTES)}


class Study:
    def __init__(self, plan: Plan, work: Path, service: RunningService, model: str, ensemble: str):
        self.plan, self.work, self.service = plan, work, service
        self.points: list[Point] = []
        texts = sts_sentences()
        progress(f"recording the expected answers of {len(texts)} sentences, one text at a time")
        self.ensemble_data = work / "ensemble.json"
        self.ensemble_data.write_text(
            render(texts, token_counts(ROOT / "model_repository", texts), record_triton(service.triton_grpc_url, ensemble, texts))
        )
        self.gateway_data = work / "gateway.json"
        self.gateway_data.write_text(record_gateway(service.http_url, model, texts))
        http_bodies, http_headers = triton_http_bodies(texts)
        triton_http = f"127.0.0.1:{service.triton_http_port}"
        # route -> (perf_analyzer's arguments, the load generator's spec without its timing)
        self.routes = {
            ROUTES[0]: (
                runner.ensemble_arguments(ensemble, "grpc", service.triton_grpc_url, self.ensemble_data),
                {
                    "protocol": "grpc",
                    "port": service.triton_grpc_port,
                    "target": "/inference.GRPCInferenceService/ModelInfer",
                    "bodies": triton_grpc_bodies(ensemble, texts),
                    "headers": {},
                },
            ),
            ROUTES[1]: (
                runner.ensemble_arguments(ensemble, "http", triton_http, self.ensemble_data),
                {
                    "protocol": "http",
                    "port": service.triton_http_port,
                    "target": f"/v2/models/{ensemble}/infer",
                    "bodies": http_bodies,
                    "headers": http_headers,
                },
            ),
            ROUTES[2]: (
                runner.gateway_arguments(model, f"127.0.0.1:{service.http_port}", self.gateway_data),
                {
                    "protocol": "http",
                    "port": service.http_port,
                    "target": "/v1/embeddings",
                    "bodies": request_bodies.openai_bodies(model, texts, 1, "base64"),
                    "headers": {},
                },
            ),
        }

    def perf_analyzer(self, route: str, concurrency: int) -> Point:
        arguments, _ = self.routes[route]
        run = runner.run(
            arguments,
            concurrency,
            self.plan.perf_analyzer,
            self.work / "perf_analyzer" / route.replace(" ", "-").replace("/", ""),
            profile_export=False,
        )
        if run.returncode != 0 or not run.row:
            error = next(
                (line.strip() for line in run.output.splitlines() if "rror" in line or "unstable" in line.lower()),
                run.output.strip().splitlines()[-1] if run.output.strip() else f"exit {run.returncode}",
            )
            return self._add(Point(route, "perf_analyzer", concurrency, 0.0, float("nan"), float("nan"), run.cpu_share, error))
        server = {}
        if not route.startswith("gateway"):
            server = {
                "server_queue_us": float(run.row["Server Queue"]),
                "server_compute_us": sum(
                    float(run.row[k]) for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
                ),
            }
        return self._add(
            Point(
                route,
                "perf_analyzer",
                concurrency,
                run.throughput,
                run.latency_ms(50),
                run.latency_ms(99),
                run.cpu_share,
                None,
                **server,
            )
        )

    def loadgen(self, route: str, concurrency: int) -> Point:
        _, spec = self.routes[route]
        work = self.work / "loadgen"
        work.mkdir(exist_ok=True)
        result = run_load(
            {
                **spec,
                "concurrency": concurrency,
                "warmup_s": self.plan.warmup_s,
                "duration_s": self.plan.duration_s,
                "max_requests": 1_000_000,
            },
            work,
        )
        return self._add(
            Point(
                route,
                "loadgen",
                concurrency,
                result["requests_per_s"],
                result["p50_ms"],
                result["p99_ms"],
                result["loadgen_cpu_share"],
                result["first_error"],
            )
        )

    def _add(self, point: Point) -> Point:
        self.points.append(point)
        progress(
            f"  {point.route} c{point.concurrency} {point.tool}: {point.requests_per_s:.0f} requests/s, p50 {point.p50_ms:.1f} ms, "
            f"p99 {point.p99_ms:.1f} ms, the tool took {point.tool_cores:.2f} cores"
            + (f"; error: {point.errors}" if point.errors else "")
        )
        return point


def write_report(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "perf_analyzer.json", out / "perf_analyzer.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    raw_best = max(results["raw"].values())
    best_batch = max(results["raw"], key=results["raw"].get)
    lines = [
        "# perf_analyzer and bin/bench's load generator on the same service",
        "",
        f"Made by `{results['command']}` from {results['started']} to {results['finished']}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()) + ".",
        "",
        f"Raw onnxruntime in-process, same ONNX and tokenizer, fp32, sorted by length: best batch {best_batch}, **{raw_best:.0f} texts/s** "
        f"(batches: {', '.join(f'{b}: {v:.0f}' for b, v in results['raw'].items())}); batch 32 again at the end: "
        f"{results['raw_batch32_at_end']:.0f}.",
        "",
        "One STS sentence per request (the 1030 in turn). perf_analyzer 2.51.0: `--async`, one thread per request in flight, "
        f"{_load_words(results['plan']['perf_analyzer'])}, every response validated byte for byte against the answer recorded "
        "for it alone. The load generator (`bench/loadgen.py`): closed loop, one process, "
        f"{results['plan']['warmup_s']:g} s warm-up then {results['plan']['duration_s']:g} s measured, the same request bytes. "
        "`tool cores`: the CPU the load tool itself used over its run (the machine has "
        f"{results['machine']['cores (usable)']}). `÷ raw`: requests/s over raw onnxruntime's best batch.",
    ]
    for route in ROUTES:
        lines += [
            "",
            f"## {route}",
            "",
            "| concurrency | perf_analyzer req/s | p50 ms | p99 ms | tool cores | load generator req/s | p50 ms | p99 ms | tool cores "
            "| perf_analyzer ÷ load generator | perf_analyzer ÷ raw |"
            + (" Triton queue / compute ms (perf_analyzer) |" if not route.startswith("gateway") else ""),
            "|---" * (11 if route.startswith("gateway") else 12) + "|",
        ]
        for concurrency in results["plan"]["concurrencies"]:
            pa, lg = (_point(results, route, tool, concurrency) for tool in ("perf_analyzer", "loadgen"))
            cells = [
                str(concurrency),
                *_cells(pa),
                *_cells(lg),
                f"{pa['requests_per_s'] / lg['requests_per_s']:.2f}" if pa["requests_per_s"] and lg["requests_per_s"] else "-",
                f"{pa['requests_per_s'] / raw_best:.2f}",
            ]
            if not route.startswith("gateway"):
                cells.append(
                    f"{pa['server_queue_us'] / 1000:.1f} / {pa['server_compute_us'] / 1000:.1f}"
                    if pa["server_queue_us"] is not None
                    else "-"
                )
            lines.append("| " + " | ".join(cells) + " |")
        errors = [
            f"{p['tool']} c{p['concurrency']}: {p['errors']}" for p in results["points"] if p["route"] == route and p["errors"]
        ]
        if errors:
            lines += ["", "Errors: " + "; ".join(errors)]
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, json_path]


def _load_words(load: dict) -> str:
    if load["request_count"]:
        return f"{load['request_count']} requests a point"
    return f"{load['window_ms'] / 1000:g} s windows until three agree within {load['stability_percent']}% (at most {load['max_trials']})"


def _point(results: dict, route: str, tool: str, concurrency: int) -> dict:
    return next(p for p in results["points"] if (p["route"], p["tool"], p["concurrency"]) == (route, tool, concurrency))


def _cells(point: dict) -> list[str]:
    if point["errors"] and not point["requests_per_s"]:
        return ["failed", "-", "-", f"{point['tool_cores']:.2f}"]
    return [f"{point['requests_per_s']:.0f}", f"{point['p50_ms']:.1f}", f"{point['p99_ms']:.1f}", f"{point['tool_cores']:.2f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.perf_analyzer.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="two points, a few seconds each: proves the study runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for perf_analyzer.md and .json")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".bench")
    args = parser.parse_args(argv)
    plan = Plan.smoke() if args.smoke else Plan.full()
    work = fresh_work_dir(args.work_dir, "perf-analyzer-")
    results: dict = {
        "command": command_line("python -m bench.perf_analyzer.study", argv),
        "plan": asdict(plan),
        "machine": describe({"perf_analyzer": "2.51.0"}),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    texts = sts_sentences()
    raw = RawEncoder(args.repository, len(os.sched_getaffinity(0)))
    results["raw"] = {r.batch_size: r.texts_per_s for r in raw.best_throughput(texts, plan.raw_batch_sizes, progress)}
    progress(f"starting the service on {args.repository}")
    service = start_service(work / "service", args.repository)
    try:
        manifest = json.loads(next(args.repository.glob("*/embedding_manifest.json")).read_text())
        study = Study(plan, work, service, served_model(args.repository), manifest["ensembles"]["text"])
        for concurrency in plan.concurrencies:
            for route in ROUTES:
                study.perf_analyzer(route, concurrency)
                study.loadgen(route, concurrency)
    finally:
        service.stop()
    results["raw_batch32_at_end"] = raw.throughput(texts, 32).texts_per_s
    progress(f"raw onnxruntime batch 32 at the end: {results['raw_batch32_at_end']:.0f} texts/s")
    results["points"] = [asdict(p) for p in study.points]
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    progress("wrote " + ", ".join(str(p) for p in write_report(results, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
