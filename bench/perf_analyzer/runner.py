"""Runs the real perf_analyzer (.venv/bin/perf_analyzer, installed by bin/setup) and reads back what it measured.

Every run is closed-loop and asynchronous with one perf_analyzer thread per request in flight: perf_analyzer 2.51
checks a response against the wrong request's validation_data when one thread carries several concurrent requests
(seen here: concurrency 17 on its default 16 threads fails validation that 16 passes), and the openai service kind
knows asynchronous calls only.
"""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PERF_ANALYZER = ROOT / ".venv" / "bin" / "perf_analyzer"


@dataclass(frozen=True)
class Load:
    """How long perf_analyzer measures: a fixed number of requests, or time windows until stable."""

    request_count: int = 0
    window_ms: int = 5000
    # Stability is judged on throughput and average latency (perf_analyzer's default); p99 over a 5 s window on 2
    # shared cores rarely holds still, and with --percentile=99 a c1 point failed to stabilize in 8 windows.
    stability_percent: int = 10
    max_trials: int = 10

    def arguments(self) -> list[str]:
        if self.request_count:
            return [f"--request-count={self.request_count}"]
        return [
            f"--measurement-interval={self.window_ms}",
            f"--stability-percentage={self.stability_percent}",
            f"--max-trials={self.max_trials}",
        ]


@dataclass(frozen=True)
class Run:
    returncode: int
    output: str
    # One dict per request of the measured windows: its inputs, response timestamps and outputs (--profile-export-file).
    requests: list[dict]
    # perf_analyzer's CSV row (-f): Inferences/Second, p50 latency (us), server queue and compute times, ...
    row: dict[str, str]
    cpu_s: float
    wall_s: float

    @property
    def throughput(self) -> float:
        return float(self.row["Inferences/Second"])

    def latency_ms(self, percentile: int) -> float:
        return float(self.row[f"p{percentile} latency"]) / 1000

    @property
    def cpu_share(self) -> float:
        """perf_analyzer's own CPU over its run, in cores."""
        return self.cpu_s / self.wall_s


def ensemble_arguments(model: str, protocol: str, url: str, input_data: Path) -> list[str]:
    """The text ensemble over Triton's gRPC or HTTP endpoint, one sentence per request."""
    return ["-m", model, "-i", protocol, "-u", url, "--input-data", str(input_data), "-b", "1"]


def gateway_arguments(model: str, url: str, input_data: Path) -> list[str]:
    """The gateway's /v1/embeddings as perf_analyzer's openai service kind; `url` is host:port."""
    return [
        "-m",
        model,
        "--service-kind",
        "openai",
        "--endpoint",
        "v1/embeddings",
        "-i",
        "http",
        "-u",
        url,
        "--input-data",
        str(input_data),
    ]


def run(target: list[str], concurrency: int, load: Load, work: Path, timeout_s: float = 600, profile_export: bool = True) -> Run:
    """One perf_analyzer run at one concurrency; a failed one (errors, failed validation) has a non-zero returncode.
    Without profile_export, `requests` stays empty: the export holds every output of every request, megabytes a second."""
    work.mkdir(parents=True, exist_ok=True)
    profile, table = work / f"profile-c{concurrency}.json", work / f"c{concurrency}.csv"
    for stale in (profile, table):
        stale.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite its profile export
    command = [
        str(PERF_ANALYZER),
        *target,
        "--async",
        f"--max-threads={concurrency}",
        f"--concurrency-range={concurrency}",
        *load.arguments(),
        "-f",
        str(table),
        *(["--profile-export-file", str(profile)] if profile_export else []),
    ]
    cpu_before, started = _children_cpu_s(), time.monotonic()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    wall_s, cpu_s = time.monotonic() - started, _children_cpu_s() - cpu_before
    requests = [r for e in json.loads(profile.read_text())["experiments"] for r in e["requests"]] if profile.exists() else []
    rows = list(csv.DictReader(table.open())) if table.exists() else []
    return Run(done.returncode, done.stdout, requests, rows[0] if rows else {}, cpu_s, wall_s)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
