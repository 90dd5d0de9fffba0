"""What the service costs when nothing or little happens: CPU while idle, and CPU and latency per lone request.

    .venv/bin/python -m bench.idle_cost                               # about 3 minutes; writes bench/results/idle_cost.md
    .venv/bin/python -m bench.idle_cost --baseline-root DIR           # and another checkout's gateway, alternating

Each round starts the service on the exported model, sends a few untimed requests, then measures:
1. idle: every component's CPU seconds (bench.process_stats) over --idle-s seconds with no request;
2. lone requests: --requests single-text POST /v1/embeddings, one after another on one connection; the client's p50
   and each component's CPU time per request.

CPU that the service spends idle or around each request is taken from the encoder on a 2-core machine, and a lone
request's latency is what interactive search sees. With --baseline-root, the gateway of another checkout (a git
worktree of an earlier commit, say) serves the same model repository in alternate rounds, the baseline first in odd
rounds, so that this VM's drift falls on both alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import requests

from bench.auth_overhead import Interrupts, running
from bench.cli import command_line, fresh_work_dir, table_parser
from bench.machine import describe
from bench.process_stats import cpu_seconds, cpu_spent
from bench.report import markdown_table
from bench.throughput import progress
from bench.workload import sentences
from harness.servers import MODEL_REPOSITORY, ROOT
from repository_contract.manifest import manifest_paths, read

COMPONENTS = ("gateway", "tritonserver", "tokenizer", "encoder", "pooling")


def _cpu_between(pid: int, work) -> dict[str, float]:
    before = cpu_seconds(pid)
    work()
    return cpu_spent(before, cpu_seconds(pid))


def measure(root: Path, work: Path, texts: list[str], idle_s: float, interrupts: Interrupts) -> dict:
    model = read(manifest_paths(MODEL_REPOSITORY)[0]).name
    with running(work, MODEL_REPOSITORY, [], interrupts, root) as service, requests.Session() as http:
        latencies: list[float] = []

        def embed(text: str) -> None:
            started = time.perf_counter()
            body = {"model": model, "input": [text], "encoding_format": "float"}
            http.post(f"{service.http_url}/v1/embeddings", json=body, timeout=30).raise_for_status()
            latencies.append(1000 * (time.perf_counter() - started))

        for text in texts[:20]:
            embed(text)
        latencies.clear()
        idle = _cpu_between(service.process.pid, lambda: time.sleep(idle_s))
        lone = _cpu_between(service.process.pid, lambda: [embed(text) for text in texts])
    return {
        "idle_ms_per_s": {label: 1000 * seconds / idle_s for label, seconds in idle.items()},
        "ms_per_request": {label: 1000 * seconds / len(texts) for label, seconds in lone.items()},
        "p50_ms": statistics.median(latencies),
    }


def markdown(results: dict[str, list[dict]], command: str) -> str:
    machine = describe()

    def median(figures: list[dict], key: str, label: str) -> str:
        return f"{statistics.median(f[key].get(label, 0.0) for f in figures):.2f}"

    rows = []
    for checkout, figures in results.items():
        rows.append(
            [
                checkout,
                f"{statistics.median(f['p50_ms'] for f in figures):.2f}",
                *[median(figures, "ms_per_request", label) for label in COMPONENTS],
                *[median(figures, "idle_ms_per_s", label) for label in ("gateway", "tritonserver")],
            ]
        )
    header = [
        "gateway of",
        "lone request p50 ms",
        *[f"{label} CPU ms/request" for label in COMPONENTS],
        "gateway idle CPU ms/s",
        "tritonserver idle CPU ms/s",
    ]
    return "\n".join(
        [
            "# The service's cost while idle and per lone request",
            "",
            f"Made by `{command}` on {machine['CPU']} ({machine['vector instructions']}, {machine['cores (usable)']} cores). "
            f"Medians over {len(next(iter(results.values())))} rounds; "
            "CPU from /proc, per component of the gateway's process tree (stubs of one step summed).",
            "",
            *markdown_table(header, rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.idle_cost", __doc__, "idle_cost.md")
    parser.add_argument("--baseline-root", type=Path, help="another checkout whose gateway is measured alongside")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--idle-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    interrupts = Interrupts()
    work = fresh_work_dir(args.work_dir, "idle-cost-")
    texts = sentences()[: args.requests]
    roots = {"this checkout": ROOT}
    if args.baseline_root:
        roots = {f"baseline ({args.baseline_root.name})": args.baseline_root.resolve(), **roots}
    results: dict[str, list[dict]] = {name: [] for name in roots}
    for number in range(1, args.rounds + 1):
        order = list(roots) if number % 2 else list(roots)[::-1]
        for name in order:
            progress(f"round {number}/{args.rounds}: {name}")
            run_dir = work / f"round{number}-{list(roots).index(name)}"
            figures = measure(roots[name], run_dir, texts, args.idle_s, interrupts)
            progress(f"{name}: {figures}")
            results[name].append(figures)
    args.out.write_text(markdown(results, command_line("python -m bench.idle_cost", argv)))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
