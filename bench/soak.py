"""Soak: mixed load for a long time, with the resident memory of the gateway and of Triton and its stubs.

`python -m bench.soak --minutes 30` writes bench/results/soak.md (RSS every minute; growth after the warm-up
must stay under 5%). tests/test_soak_e2e.py runs the same for 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.resilience import RESULTS, Load
from export.datasets import sts_sentences
from harness.servers import start_service


@dataclass
class Sample:
    minute: float
    gateway_mib: float
    triton_mib: float
    requests: int


def _rss_mib(processes: list[psutil.Process]) -> float:
    return sum(p.memory_info().rss for p in processes) / 2**20


async def soak(minutes: float, sample_every_s: float, warmup_s: float) -> tuple[list[Sample], dict]:
    sentences = sts_sentences()
    with tempfile.TemporaryDirectory() as tmp:
        service = start_service(Path(tmp) / "service")
        try:
            gateway = psutil.Process(service.process.pid)
            triton = psutil.Process(int((service.run_dir / "triton.pid").read_text()))
            loads = [
                Load(service.http_url, 16, [sentences[0]]),
                Load(service.http_url, 2, sentences[:100]),
                Load(service.http_url, 2, sentences[100:132], {"X-Request-Timeout": "5"}),
            ]
            samples = []
            start = time.monotonic()
            for load in loads:
                await load.__aenter__()
            try:
                while (elapsed := time.monotonic() - start) < minutes * 60:
                    await asyncio.sleep(min(sample_every_s, minutes * 60 - elapsed))
                    done = sum(len(load.outcomes) for load in loads)
                    sample = Sample(
                        round((time.monotonic() - start) / 60, 2),
                        _rss_mib([gateway]),
                        _rss_mib([triton, *triton.children()]),
                        done,
                    )
                    print(f"[soak] {sample}", flush=True)
                    samples.append(sample)
            finally:
                for load in loads:
                    await load.__aexit__(None, None, None)
        finally:
            service.stop()
    statuses: dict[str, int] = {}
    for load in loads:
        for key, count in load.figures("soak").failed.items():
            statuses[key] = statuses.get(key, 0) + count
    after_warmup = [s for s in samples if s.minute * 60 >= warmup_s]
    first, last = after_warmup[0], after_warmup[-1]
    summary = {
        "gateway_growth": last.gateway_mib / first.gateway_mib - 1,
        "triton_growth": last.triton_mib / first.triton_mib - 1,
        "requests": last.requests,
        "failed": statuses,
    }
    return samples, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    samples, summary = asyncio.run(soak(args.minutes, sample_every_s=60, warmup_s=120))
    rows = ["| minute | gateway RSS MiB | Triton + stubs RSS MiB | requests so far |", "|---|---|---|---|"]
    rows += [f"| {s.minute} | {s.gateway_mib:.0f} | {s.triton_mib:.0f} | {s.requests} |" for s in samples]
    text = (
        f"# Soak\n\nMade by `.venv/bin/python -m bench.soak --minutes {args.minutes:g}` on this 2-core machine: 16 callers of "
        "one text, 2 of 100 texts, 2 of 32 texts with a 5 s deadline.\n\n" + "\n".join(rows) + "\n\n"
        f"Growth after the 2-minute warm-up: gateway {summary['gateway_growth']:+.1%}, Triton and stubs "
        f"{summary['triton_growth']:+.1%}; {summary['requests']} requests, failed: {summary['failed'] or 'none'}.\n"
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text(text)


if __name__ == "__main__":
    main()
