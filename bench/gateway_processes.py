"""One gateway process against two, at the pipeline ceiling: how far more gateway processes would carry it.

The gateway has no option to run several processes yet (see levers.md for what that needs). This measures what
it would give: a second gateway, started with --triton-url, shares the first one's Triton, and the load is split
evenly between their HTTP ports, as SO_REUSEPORT would split connections. The repository is the pipeline-ceiling
copy of the export (bench.pipeline_ceiling), so the encoder costs nothing and the gateways are what is measured.

    python -m bench.gateway_processes [--duration-s 8] [--concurrency 128] [--out bench/results/gateway_processes.md]
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

from bench import pipeline_ceiling, requests, workload
from bench.cli import command_line, fresh_work_dir, table_parser
from bench.process_stats import cpu_seconds, machine_ticks
from bench.throughput import ROOT, progress, served_model
from harness.servers import RunningService, start_service


def _split_load(services: list[RunningService], bodies: list[bytes], concurrency: int, duration_s: float, work: Path) -> dict:
    """Runs one load generator per gateway at once, each with its share of the callers; returns the totals."""
    pids = [s.process.pid for s in services] + [int((services[0].run_dir / "triton.pid").read_text())]
    spawned = []
    for index, service in enumerate(services):
        spec = {
            "protocol": "http",
            "port": service.http_port,
            "target": "/v1/embeddings",
            "bodies": bodies,
            "concurrency": concurrency // len(services),
            "warmup_s": 2.0,
            "duration_s": duration_s,
            "max_requests": 10**8,
        }
        spec_path = work / f"spec-{len(services)}-{index}.pickle"
        spec_path.write_bytes(pickle.dumps(spec))
        result_path = work / f"result-{len(services)}-{index}.json"
        spawned.append(
            (subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(spec_path), str(result_path)], cwd=ROOT), result_path)
        )
    time.sleep(2.0)  # the warm-up, not counted in the CPU figures
    cpu_before = [cpu_seconds(pid) for pid in pids]
    idle_before, _, total_before = machine_ticks()
    started = time.monotonic()
    time.sleep(duration_s)
    window = time.monotonic() - started
    cpu_after = [cpu_seconds(pid) for pid in pids]
    idle_after, _, total_after = machine_ticks()
    for process, _ in spawned:
        process.wait(timeout=duration_s + 120)
    results = [json.loads(path.read_text()) for _, path in spawned]
    gateways = sum(
        after.get("gateway", 0.0) - before.get("gateway", 0.0) for before, after in zip(cpu_before[:-1], cpu_after[:-1])
    )
    triton = sum(cpu_after[-1].values()) - sum(cpu_before[-1].values())
    return {
        "processes": len(services),
        "requests_per_s": sum(r["requests_per_s"] for r in results),
        "p50_ms": max(r["p50_ms"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "gateway_cores": gateways / window,
        "triton_cores": triton / window,
        "machine_idle": (idle_after - idle_before) / max(1, total_after - total_before),
    }


def markdown(rows: list[dict], command: str, concurrency: int, duration_s: float) -> str:
    one = rows[0]["requests_per_s"]
    lines = [
        "# Gateway processes at the pipeline ceiling",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}. Load: single STS sentences over HTTP (`/v1/embeddings`), "
        f"{concurrency} callers in all, split evenly between the gateways, {duration_s:.0f} s measured per row. "
        "Triton (with its Python-backend stubs) is shared; its CPU is tritonserver and every stub together.",
        "",
        "| gateway processes | requests/s | ratio to one | worst p50 ms | gateways' CPU (cores) | Triton's CPU (cores) | machine idle | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['processes']} | {row['requests_per_s']:.0f} | {row['requests_per_s'] / one:.2f} | {row['p50_ms']:.1f} | "
            f"{row['gateway_cores']:.2f} | {row['triton_cores']:.2f} | {100 * row['machine_idle']:.0f}% | {row['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.gateway_processes", __doc__, "gateway_processes.md")
    parser.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per row")
    parser.add_argument("--concurrency", type=int, default=128, help="callers in all, split between the gateways")
    args = parser.parse_args(argv)
    work = fresh_work_dir(args.work_dir, "gateway-processes-")
    ceiling = pipeline_ceiling.build(ROOT / "model_repository", work / "pipeline-ceiling-repository")
    bodies = requests.openai_bodies(served_model(ceiling), workload.sentences(), 1, "float")
    rows = []
    progress("starting the first gateway (with Triton)")
    first = start_service(work / "gateway-1", ceiling)
    try:
        rows.append(_split_load([first], bodies, args.concurrency, args.duration_s, work))
        progress(f"1 gateway: {rows[-1]['requests_per_s']:.0f} requests/s")
        progress("starting the second gateway on the first one's Triton")
        second = start_service(work / "gateway-2", ceiling, [f"--triton-url=127.0.0.1:{first.triton_grpc_port}"])
        try:
            rows.append(_split_load([first, second], bodies, args.concurrency, args.duration_s, work))
            progress(f"2 gateways: {rows[-1]['requests_per_s']:.0f} requests/s")
        finally:
            second.stop()
    finally:
        first.stop()
    command = command_line("python -m bench.gateway_processes", argv)
    args.out.write_text(markdown(rows, command, args.concurrency, args.duration_s))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
