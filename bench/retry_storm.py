"""Retry storms with short deadlines: goodput when 1,000 clients whose requests carry `X-Request-Timeout: 1` retry
every 50 ms after a 429, against the same clients honouring Retry-After; and how long a 429 takes to come back.

A refused request must cost far less than a served one, or the refusals of a storm take the CPU the served ones
need and goodput collapses. One-text requests over HTTP; the load generator runs in this process on the same 2 cores.
`python -m bench.retry_storm` writes bench/results/retry_storm.md (about a minute); `--root` measures another
checkout's gateway (a revision before a change, say) on this checkout's model repository.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.resilience import RESULTS, Load, p99
from harness.servers import ROOT, start_service

TEXT = ["How do I reset my password?"]
DEADLINE = {"X-Request-Timeout": "1"}


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _cpu_s(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


async def measure(
    url: str, clients: int, retry_delay_s: float | None, warmup_s: float, seconds: float, gateway_pid: int | None = None
) -> dict:
    """One storm: `clients` closed-loop callers with a 1 s deadline, each outcome kept; figures over the measured window
    (with the gateway process's CPU when its pid is given)."""
    gateway = psutil.Process(gateway_pid) if gateway_pid is not None else None
    async with Load(url, clients, TEXT, headers=DEADLINE, retry_delay_s=retry_delay_s) as load:
        await asyncio.sleep(warmup_s)
        start, cpu_start = time.monotonic(), _cpu_s(gateway)
        await asyncio.sleep(seconds)
        end, cpu_end = time.monotonic(), _cpu_s(gateway)
    window = [o for o in load.outcomes if start <= o.done_at <= end]
    ok = [o.done_at - o.sent_at for o in window if o.status == 200]
    refused = [o.done_at - o.sent_at for o in window if o.status == 429]
    return {
        "clients": "honour Retry-After" if retry_delay_s is None else f"retry every {retry_delay_s * 1000:.0f} ms",
        "goodput": len(ok) / (end - start),
        "p99_s": p99(ok) if ok else None,
        "refused_per_s": len(refused) / (end - start),
        "p50_429_s": _p50(refused),
        "deadline_503": sum(1 for o in window if o.status == 503),
        "errors": sum(1 for o in window if o.status not in (200, 429, 503)),
        "gateway_cores": round((cpu_end - cpu_start) / (end - start), 2) if gateway is not None else None,
    }


async def run(clients: int, warmup_s: float, seconds: float, root: Path, out: Path | None, command: str) -> list[dict]:
    # A thousand client sockets in this one process.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        service = start_service(Path(tmp) / "service", root=root)
        try:
            for retry in (None, 0.05):
                row = await measure(service.http_url, clients, retry, warmup_s, seconds, service.process.pid)
                print(f"[retry-storm] {row}", flush=True)
                rows.append(row)
        finally:
            service.stop()
    honour, storm = rows
    lines = [
        "| clients (1 s deadline) | goodput req/s | p99 of 200s s | 429s per s | p50 of 429s s | 503 past the deadline "
        "| other errors | gateway CPU, cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['goodput']:.0f} | {r['p99_s']} | {r['refused_per_s']:.0f} | {r['p50_429_s']} "
            f"| {r['deadline_503']} | {r['errors']} | {r['gateway_cores']} |"
        )
    ratio = storm["goodput"] / honour["goodput"] if honour["goodput"] else float("nan")
    lines.append(f"\nGoodput of the storm against clients that honour Retry-After: {ratio:.2f}.")
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "retry_storm.md").write_text(
            "# Retry storm with short deadlines\n\n"
            f"Made by `{command}` on this 2-core machine: {clients} clients, one-text requests over HTTP with "
            f"`X-Request-Timeout: 1`, {warmup_s:g} s warm-up, {seconds:g} s measured per row. The load generator shares "
            "the 2 cores, so the latencies, measured by the clients, include their own wait for the CPU; a 503 is a "
            "request admitted that missed its 1 s deadline.\n\n" + "\n".join(lines) + "\n"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--warmup-s", type=float, default=5)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose gateway runs (default: this one)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where retry_storm.md goes")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    command = " ".join(["python -m bench.retry_storm", *sys.argv[1:]])
    asyncio.run(run(args.clients, args.warmup_s, args.seconds, args.root, None if args.no_write else args.out, command))


if __name__ == "__main__":
    main()
