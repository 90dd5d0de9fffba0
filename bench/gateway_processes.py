"""The pipeline ceiling with `--workers 1, 2 and 4`: how far more gateway processes carry the gateway's part.

Each row starts the gateway with that many workers on the pipeline-ceiling copy of the export (bench.pipeline_ceiling),
so the encoder costs nothing and the gateway is what is measured, and loads its one HTTP port with single sentences
from LOAD_GENERATORS processes that split the callers. CPU per request is the gateway's (the parent and its workers)
and Triton's (tritonserver and every stub) over the measured window, divided by the requests answered in it.

    python -m bench.gateway_processes [--workers 1 2 4] [--duration-s 8] [--concurrency 128] [--out bench/results/gateway_processes.md]
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from bench import pipeline_ceiling, requests, workload
from bench.cli import command_line, fresh_work_dir, table_parser
from bench.process_stats import cpu_seconds, cpu_spent, machine_ticks
from bench.throughput import ROOT, progress, served_model
from harness.servers import RunningService, start_service

# Load generators for every row alike: one Python process alone tops out near the single-worker ceiling.
LOAD_GENERATORS = 2


def _is_gateway(label: str) -> bool:
    """The parent (labelled gateway by process_stats) and its workers (python processes of the tree)."""
    return label in ("gateway", "python")


def load(
    service: RunningService,
    workers: int,
    bodies: list[bytes],
    concurrency: int,
    duration_s: float,
    work: Path,
    generators: int = LOAD_GENERATORS,
) -> dict:
    """Runs `generators` load generators on the service's HTTP port at once, splitting the callers; returns the totals
    and the CPU they cost."""
    spawned = []
    for index in range(generators):
        spec = {
            "protocol": "http",
            "port": service.http_port,
            "target": "/v1/embeddings",
            "bodies": bodies,
            "concurrency": concurrency // generators,
            "warmup_s": 2.0,
            "duration_s": duration_s,
            "max_requests": 10**8,
        }
        spec_path = work / f"spec-{workers}-{index}.pickle"
        spec_path.write_bytes(pickle.dumps(spec))
        result_path = work / f"result-{workers}-{index}.json"
        spawned.append(
            (subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(spec_path), str(result_path)], cwd=ROOT), result_path)
        )
    time.sleep(2.0)  # the warm-up, not counted in the CPU figures
    cpu_before = cpu_seconds(service.process.pid)
    idle_before, _, total_before = machine_ticks()
    started = time.monotonic()
    time.sleep(duration_s)
    window = time.monotonic() - started
    cpu_after = cpu_seconds(service.process.pid)
    idle_after, _, total_after = machine_ticks()
    for process, _ in spawned:
        process.wait(timeout=duration_s + 120)
    results = [json.loads(path.read_text()) for _, path in spawned]
    spent = cpu_spent(cpu_before, cpu_after)
    gateway = sum(seconds for label, seconds in spent.items() if _is_gateway(label))
    triton = sum(seconds for label, seconds in spent.items() if not _is_gateway(label))
    requests_per_s = sum(r["requests_per_s"] for r in results)
    answered = requests_per_s * window
    return {
        "workers": workers,
        "requests_per_s": requests_per_s,
        "p50_ms": max(r["p50_ms"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "gateway_cores": gateway / window,
        "triton_cores": triton / window,
        "gateway_ms_per_request": 1000 * gateway / answered,
        "triton_ms_per_request": 1000 * triton / answered,
        "machine_idle": (idle_after - idle_before) / max(1, total_after - total_before),
    }


def markdown(rows: list[dict], command: str, concurrency: int, duration_s: float) -> str:
    one = rows[0]["requests_per_s"]
    lines = [
        "# Gateway workers at the pipeline ceiling",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores). Load: single STS sentences over "
        f"HTTP (`/v1/embeddings`) on the one port the workers share, {concurrency} callers in all from "
        f"{LOAD_GENERATORS} load generators, {duration_s:.0f} s measured per row, on the pipeline-ceiling export (an "
        "encoder that costs nothing). The gateway's CPU is the parent's and its workers'; Triton's is tritonserver's "
        "and every stub's. The load generators run on the same cores.",
        "",
        "| workers | requests/s | ratio to one | worst p50 ms | gateway CPU (cores) | gateway CPU ms per request | "
        "Triton CPU (cores) | Triton CPU ms per request | machine idle | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workers']} | {row['requests_per_s']:.0f} | {row['requests_per_s'] / one:.2f} | {row['p50_ms']:.1f} | "
            f"{row['gateway_cores']:.2f} | {row['gateway_ms_per_request']:.3f} | {row['triton_cores']:.2f} | "
            f"{row['triton_ms_per_request']:.3f} | {100 * row['machine_idle']:.0f}% | {row['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.gateway_processes", __doc__, "gateway_processes.md")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="the --workers of each row")
    parser.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per row")
    parser.add_argument("--concurrency", type=int, default=128, help="callers in all, split between the load generators")
    args = parser.parse_args(argv)
    work = fresh_work_dir(args.work_dir, "gateway-processes-")
    ceiling = pipeline_ceiling.build(ROOT / "model_repository", work / "pipeline-ceiling-repository")
    bodies = requests.openai_bodies(served_model(ceiling), workload.sentences(), 1, "float")
    rows = []
    for workers in args.workers:
        progress(f"starting the gateway with --workers {workers}")
        service = start_service(work / f"workers-{workers}", ceiling, ["--workers", str(workers)])
        try:
            rows.append(load(service, workers, bodies, args.concurrency, args.duration_s, work))
            progress(f"--workers {workers}: {rows[-1]['requests_per_s']:.0f} requests/s")
        finally:
            service.stop()
    command = command_line("python -m bench.gateway_processes", argv)
    args.out.write_text(markdown(rows, command, args.concurrency, args.duration_s))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
