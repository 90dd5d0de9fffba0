"""What each serving lever gives: the same load against repositories exported with one option changed.

    .venv/bin/python -m bench.levers            # about 15 minutes; writes bench/results/levers_export.md
    .venv/bin/python -m bench.levers --variants default "thread spinning" "default, again" --out FILE   # some

bench/results/levers.md is the record of every lever, these and the gateway's (bench.gateway_levers).

Every variant is a real export (`python -m export --output-dir ... <flags>`) served by the real gateway and
Triton. Raw onnxruntime is measured before and after the variants, and each figure is shown as a ratio to it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import requests, workload
from bench.cli import command_line, fresh_work_dir, table_parser
from bench.raw_onnxruntime import RawEncoder
from bench.throughput import ROOT, Plan, Runner, progress, service_pids
from harness.servers import start_service

# (name, export flags, what it tests). The first is the shipped default.
VARIANTS = [
    (
        "default",
        [],
        "ragged batches of <= 64 rows, slices of 8, 2 instances (2 threads alone, 1 when both busy), no queue delay, one shared copy of the packed weights",
    ),
    ("always 1 thread", ["--alone-intra-op-threads=1"], "an instance running alone does not take the second core"),
    (
        "1 instance x 2 threads",
        ["--encoder-instances=1", "--intra-op-threads=2"],
        "one onnxruntime run at a time, both cores inside it",
    ),
    ("2 instances x 2 threads", ["--intra-op-threads=2"], "oversubscribed: 4 busy threads on 2 cores"),
    ("queue delay 2 ms", ["--queue-delay-us=2000"], "every step waits up to 2 ms to fill a batch"),
    (
        "length buckets",
        ["--length-buckets=16,32,64,128,256"],
        "the tokenizer pads to buckets (the encoder still cuts to real lengths)",
    ),
    ("batches of <= 32 rows", ["--max-batch-size=32"], "fewer rows sorted together"),
    ("batches of <= 128 rows", ["--max-batch-size=128"], "more rows sorted together, longer executions"),
    ("slices of 32 rows", ["--slice-rows=32"], "fewer onnxruntime runs, more padding in each"),
    ("thread spinning", ["--thread-spinning"], "onnxruntime's threads spin between a run's operators, and stop when it ends"),
    (
        "weights per session",
        ["--no-shared-weights"],
        "each onnxruntime session packs its own copy of the weights, as before shared ones (4 copies, not 1)",
    ),
    ("int8", ["--precision=int8"], "the int8 export (a scale per token), its defaults"),
    (
        "int8, SkipLayerNorm fused",
        ["--precision=int8", "--fuse-skip-layer-norm"],
        "onnxruntime fuses each residual Add and LayerNormalization into one SkipLayerNormalization",
    ),
    ("int8, again", ["--precision=int8"], "the int8 row repeated: how far two runs of one setting differ"),
    ("default, again", [], "the first row repeated last: how far two runs of one setting differ on this machine"),
]
CONCURRENCIES = [1, 32, 128]


def export_variant(flags: list[str], target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "export", "--output-dir", str(target), *flags], cwd=ROOT, check=True, stdout=subprocess.DEVNULL
    )


def markdown(rows: list[dict], raw_before: float, raw_after: float, command: str) -> str:
    raw = (raw_before + raw_after) / 2
    lines = [
        "# Serving levers",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}. Load: single STS sentences over HTTP (float) at concurrency "
        f"{', '.join(map(str, CONCURRENCIES))}, and 100-sentence requests at concurrency 4, {Plan.full().duration_s:.0f} s each.",
        f"Raw onnxruntime fp32 (2 threads, batch 32, sorted): {raw_before:.0f} texts/s before the variants, {raw_after:.0f} after; "
        "ratios are to their mean.",
        "",
        "| variant | what it tests | "
        + " | ".join(f"c{c} texts/s (ratio)" for c in CONCURRENCIES)
        + " | c1 p50 ms | 100-text texts/s (ratio) |",
        "|---|---|" + "---|" * (len(CONCURRENCIES) + 2),
    ]
    for row in rows:
        cells = [f"{row[c].texts_per_s:.0f} ({row[c].texts_per_s / raw:.2f})" for c in CONCURRENCIES]
        batch = row["batch"]
        lines.append(
            f"| {row['name']} | {row['about']} | "
            + " | ".join(cells)
            + f" | {row[1].p50_ms:.1f} | {batch.texts_per_s:.0f} ({batch.texts_per_s / raw:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.levers", __doc__, "levers_export.md")
    parser.add_argument("--variants", nargs="+", choices=[name for name, _, _ in VARIANTS], help="these only (default: all)")
    args = parser.parse_args(argv)
    work = fresh_work_dir(args.work_dir, "levers-")
    plan = Plan.full()
    runner = Runner(plan, work)
    texts = workload.sentences()
    raw = RawEncoder(ROOT / "model_repository", threads=2)
    raw_before = raw.throughput(texts, 32).texts_per_s
    progress(f"raw onnxruntime batch 32: {raw_before:.0f} texts/s")
    rows = []
    for name, flags, about in [v for v in VARIANTS if not args.variants or v[0] in args.variants]:
        # Named by its flags, so a repeated setting reuses its export; no "=" in it, because the Python
        # backend starts its stubs through `env`, which would read such a path as a variable assignment.
        repository = args.work_dir / "levers" / ("".join(flags).replace("--", "_").replace("=", "-").strip("_") or "default")
        progress(f"variant '{name}': exporting with {flags or 'the defaults'}")
        export_variant(flags, repository)
        service = start_service(work / f"{len(rows)}-{repository.name}", repository)
        try:
            model = "all-minilm-l6-v2"
            singles = requests.openai_bodies(model, texts, 1, "float")
            hundreds = requests.openai_bodies(model, texts, 100, "float")
            row = {"name": name, "about": about}
            for concurrency in CONCURRENCIES:
                row[concurrency] = runner.measure(
                    name, service.http_port, "http", "float", "sentences", singles, 1, concurrency, service_pids(service), service
                )
            row["batch"] = runner.measure(
                name,
                service.http_port,
                "http",
                "float",
                "sentences",
                hundreds,
                100,
                plan.batch_concurrency,
                service_pids(service),
                service,
            )
            rows.append(row)
        finally:
            service.stop()
    raw_after = raw.throughput(texts, 32).texts_per_s
    progress(f"raw onnxruntime batch 32: {raw_after:.0f} texts/s")
    args.out.write_text(markdown(rows, raw_before, raw_after, command_line("python -m bench.levers", argv)))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
