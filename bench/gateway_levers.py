"""What each gateway setting gives per request: the same export served with one gateway flag changed.

    .venv/bin/python -m bench.gateway_levers     # about 15 minutes; writes bench/results/levers_gateway.md

Each variant is measured twice: on the default export (single STS sentences over HTTP at concurrency 1, 32
and 128, gRPC at 32) and on the pipeline-ceiling copy of it, whose encoder costs nothing
(bench.pipeline_ceiling), at concurrency 32 and 128: the second shows what the setting does to the cost
around the encoder, which a fast accelerator would expose. Raw onnxruntime is measured before and after.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from bench import pipeline_ceiling, workload
from bench.cli import command_line, fresh_work_dir, table_parser
from bench.raw_onnxruntime import RawEncoder
from bench.throughput import ROOT, Plan, Runner, endpoint, progress, served_model, service_pids, serving

# (name, gateway flags, what it tests). The first is the shipped default.
VARIANTS = [
    ("default", [], "coalescing, at most 4 calls in flight per lane, calls of at most 32 rows"),
    ("1 call per lane", ["--max-calls-per-lane=1"], "the biggest coalesced calls; Triton's steps never overlap for one lane"),
    ("2 calls per lane", ["--max-calls-per-lane=2"], "bigger calls, less overlap"),
    ("8 calls per lane", ["--max-calls-per-lane=8"], "smaller calls, more overlap (the 128-row limit still holds)"),
    ("no coalescing", ["--max-calls-per-lane=100000"], "every request its own Triton call, as before coalescing"),
    ("default, again", [], "the first row repeated last: how far two runs of one setting differ on this machine"),
]
REAL_POINTS = [("http", 1), ("http", 32), ("http", 128), ("grpc", 32)]
CEILING_POINTS = [("http", 32), ("http", 128)]


def _measure(runner: Runner, name: str, service, repository: Path, texts: list[str], points) -> dict:
    model = served_model(repository)
    row = {}
    for protocol, concurrency in points:
        port, build = endpoint(service, protocol)
        row[(protocol, concurrency)] = runner.measure(
            name,
            port,
            protocol,
            "float",
            "sentences",
            build(model, texts, 1, "float"),
            1,
            concurrency,
            service_pids(service),
            service,
        )
    return row


def markdown(rows: list[dict], raw_before: float, raw_after: float, command: str, duration_s: float) -> str:
    raw = (raw_before + raw_after) / 2
    real = [f"{p} c{c} texts/s (ratio)" for p, c in REAL_POINTS]
    ceiling = [f"ceiling {p} c{c} requests/s" for p, c in CEILING_POINTS]
    lines = [
        "# Gateway levers",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}. Load: single STS sentences, {duration_s:.0f} s per point. "
        "Ceiling columns: the same gateway on the pipeline-ceiling copy of the export (its encoder answers zeros at no cost).",
        f"Raw onnxruntime fp32 (2 threads, batch 32, sorted): {raw_before:.0f} texts/s before the variants, {raw_after:.0f} after; "
        "ratios are to their mean. Encoder batch: rows per encoder execution at http c32.",
        "",
        "| variant | what it tests | "
        + " | ".join(real)
        + " | http c1 p50 ms | encoder batch | "
        + " | ".join(ceiling)
        + " | gateway CPU per ceiling request at c128 |",
        "|---|---|" + "---|" * (len(real) + len(ceiling) + 3),
    ]
    for row in rows:
        cells = [f"{row['real'][p].texts_per_s:.0f} ({row['real'][p].texts_per_s / raw:.2f})" for p in REAL_POINTS]
        cells += [f"{row['real'][('http', 1)].p50_ms:.1f}", f"{row['real'][('http', 32)].encoder_batch or 0:.1f}"]
        cells += [f"{row['ceiling'][p].requests_per_s:.0f}" for p in CEILING_POINTS]
        top = row["ceiling"][("http", 128)]
        cells.append(f"{1000 * top.cpu_share.get('gateway', 0) / top.requests_per_s:.2f} ms")
        lines.append(f"| {row['name']} | {row['about']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.gateway_levers", __doc__, "levers_gateway.md")
    parser.add_argument("--duration-s", type=float, default=Plan.full().duration_s, help="measured seconds per point")
    args = parser.parse_args(argv)
    work = fresh_work_dir(args.work_dir, "gateway-levers-")
    runner = Runner(dataclasses.replace(Plan.full(), duration_s=args.duration_s), work)
    texts = workload.sentences()
    repository = ROOT / "model_repository"
    ceiling = pipeline_ceiling.build(repository, work / "pipeline-ceiling-repository")
    raw = RawEncoder(repository, threads=2)
    raw_before = raw.throughput(texts, 32).texts_per_s
    progress(f"raw onnxruntime batch 32: {raw_before:.0f} texts/s")
    rows = []
    for index, (name, flags, about) in enumerate(VARIANTS):
        progress(f"variant '{name}': gateway flags {flags or 'the defaults'}")
        row = {"name": name, "about": about}
        with serving(runner, f"{index}-real", repository, flags) as service:
            row["real"] = _measure(runner, name, service, repository, texts, REAL_POINTS)
        with serving(runner, f"{index}-ceiling", ceiling, flags) as service:
            row["ceiling"] = _measure(runner, f"{name} (ceiling)", service, ceiling, texts, CEILING_POINTS)
        rows.append(row)
    raw_after = raw.throughput(texts, 32).texts_per_s
    progress(f"raw onnxruntime batch 32: {raw_after:.0f} texts/s")
    command = command_line("python -m bench.gateway_levers", argv)
    args.out.write_text(markdown(rows, raw_before, raw_after, command, args.duration_s))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
