"""Did a change cost the gateway throughput? This checkout's gateway against another revision's, on one pipeline ceiling.

    python -m bench.ab_ceiling --base dd97667 --rounds 4 [--corpus passages --out bench/results/ab_ceiling_passages.md]

The base revision is checked out with `git worktree` under the work dir, with this checkout's generated gRPC stubs.
Both gateways serve the same bench-only repository (bench/pipeline_ceiling.py: this checkout's export with an
encoder that answers zeros at no cost), so what differs is the gateway's and the steps' own cost per request. The
base's gateway must be able to read this checkout's manifests. Rounds alternate which gateway goes first, because
this shared machine drifts by more than the differences looked for; the table gives every round and the means.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean

from bench import pipeline_ceiling, requests, workload
from bench.cli import command_line, fresh_work_dir, table_parser
from bench.throughput import ROOT, progress, run_load, served_model
from harness.servers import start_service

CONCURRENCIES = (1, 128)
# One text per request: an STS sentence, or a passage of them (workload.passages, 600 characters or more).
CORPORA = {"sentences": workload.sentences, "passages": workload.passages}


def _checkout(base: str, work: Path) -> Path:
    tree = work / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), base], cwd=ROOT, check=True, capture_output=True)
    stubs = ROOT / "proto" / "embedding" / "v1"
    for stub in stubs.glob("embedding_pb2*.py*"):
        shutil.copy(stub, tree / "proto" / "embedding" / "v1" / stub.name)
    return tree


def _measure(
    root: Path, repository: Path, bodies: list[bytes], duration_s: float, work: Path, label: str
) -> dict[int, tuple[float, float]]:
    service = start_service(work / label, repository, root=root)
    try:
        figures = {}
        for concurrency in CONCURRENCIES:
            spec = {
                "protocol": "http",
                "port": service.http_port,
                "target": "/v1/embeddings",
                "bodies": bodies,
                "headers": {},
                "concurrency": concurrency,
                "warmup_s": 2.0,
                "duration_s": duration_s,
                "max_requests": 10**8,
            }
            result = run_load(spec, work)
            figures[concurrency] = (result["requests_per_s"], result["p50_ms"])
            progress(f"  {label} c{concurrency}: {result['requests_per_s']:.0f} requests/s, p50 {result['p50_ms']:.2f} ms")
        return figures
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = table_parser("bench.ab_ceiling", __doc__, "ab_ceiling.md")
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="sentences")
    args = parser.parse_args(argv)
    work = fresh_work_dir(args.work_dir, "ab-ceiling-")
    base = _checkout(args.base, work)
    try:
        repository = pipeline_ceiling.build(ROOT / "model_repository", work / "pipeline-ceiling-repository")
        bodies = requests.openai_bodies(served_model(repository), CORPORA[args.corpus](), 1, "float")
        runs: dict[str, list[dict]] = {"base": [], "this checkout": []}
        for round_ in range(args.rounds):
            order = [("base", base), ("this checkout", ROOT)]
            for label, root in order if round_ % 2 == 0 else order[::-1]:
                runs[label].append(
                    _measure(root, repository, bodies, args.duration_s, work, f"{label.replace(' ', '-')}-{round_}")
                )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False, capture_output=True)
    lines = [
        f"# Pipeline ceiling: this checkout's gateway against {args.base}'s",
        "",
        f"`{command_line('python -m bench.ab_ceiling', argv)}`; one text of the {args.corpus} corpus per request over HTTP float, {args.duration_s:.0f} s per point.",
        "",
        "| gateway | concurrency | requests/s per round | mean requests/s | mean p50 ms |",
        "|---|---|---|---|---|",
    ]
    for label, figures in runs.items():
        for concurrency in CONCURRENCIES:
            rates = [f[concurrency][0] for f in figures]
            lines.append(
                f"| {label} | {concurrency} | {', '.join(f'{r:.0f}' for r in rates)} | {mean(rates):.0f} | "
                f"{mean(f[concurrency][1] for f in figures):.2f} |"
            )
    for concurrency in CONCURRENCIES:
        ratio = mean(f[concurrency][0] for f in runs["this checkout"]) / mean(f[concurrency][0] for f in runs["base"])
        lines.append(f"\nc{concurrency}: this checkout / base = {ratio:.3f}")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
