"""Overload without collapse: goodput and p99 of one-text requests from 128 up to 2,000 concurrent connections.

Two kinds of client: ones that wait as Retry-After says, and ones that retry every 50 ms regardless. The
load generator runs in this process on the same 2 cores, so its own CPU is part of what the service has
to live with. `python -m bench.overload` writes bench/results/overload.md; `--smoke` is a short version.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from bench.resilience import RESULTS, Load, p99
from harness.servers import start_service

TEXT = ["How do I reset my password?"]


async def measure(url: str, connections: int, retry_delay_s: float | None, warmup_s: float, seconds: float) -> dict:
    async with Load(url, connections, TEXT, retry_delay_s=retry_delay_s) as load:
        await asyncio.sleep(warmup_s)
        start = time.monotonic()
        await asyncio.sleep(seconds)
        end = time.monotonic()
    window = [o for o in load.outcomes if start <= o.done_at <= end]
    ok = [o.done_at - o.sent_at for o in window if o.status == 200]
    others = [o.status for o in window if o.status not in (200, 429)]
    return {
        "connections": connections,
        "clients": "honour Retry-After" if retry_delay_s is None else f"retry every {retry_delay_s * 1000:.0f} ms",
        "goodput": len(ok) / (end - start),
        "p99_s": p99(ok) if ok else None,
        "refused_429": sum(1 for o in window if o.status == 429),
        "errors": len(others),
    }


async def run(points: list[int], warmup_s: float, seconds: float, out: Path | None) -> list[dict]:
    # Thousands of client sockets in this one process.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        service = start_service(Path(tmp) / "service")
        try:
            for retry in (None, 0.05):
                for connections in points:
                    row = await measure(service.http_url, connections, retry, warmup_s, seconds)
                    print(f"[overload] {row}", flush=True)
                    rows.append(row)
        finally:
            service.stop()
    peak = max(r["goodput"] for r in rows if r["connections"] == points[0])
    lines = [
        "| connections | clients | goodput req/s | ratio to goodput at 128 | p99 s | 429s | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['connections']} | {r['clients']} | {r['goodput']:.0f} | {r['goodput'] / peak:.2f} | {r['p99_s']} "
            f"| {r['refused_429']} | {r['errors']} |"
        )
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "overload.md").write_text(
            "# Overload\n\nMade by `.venv/bin/python -m bench.overload` on this 2-core machine; one-text requests over HTTP, "
            f"{warmup_s:.0f} s warm-up, {seconds:.0f} s measured per row.\n\n" + "\n".join(lines) + "\n"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="128 and 512 connections, 3 s each, nothing written")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        asyncio.run(run([128, 512], 2, 3, None))
    else:
        asyncio.run(run([128, 512, 1000, 2000], 5, 20, args.out))


if __name__ == "__main__":
    main()
