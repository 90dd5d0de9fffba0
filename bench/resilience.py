"""Fault scenarios against the real gateway and Triton: what a user sees while Triton is killed, stalled or overloaded.

Each scenario starts its own service on free ports, drives it from 127.0.0.1 with a bounded load, injects one
fault, and returns its figures: requests accepted, succeeded, failed by status, the recovery time and the p99
of one-text probes. tests/test_faults_e2e.py asserts on them; `python -m bench.resilience` runs them all
and writes bench/results/resilience.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import psutil

from export.datasets import sts_sentences
from harness.servers import RunningService, start_service
from repository_contract.naming import step_name

MODEL = "all-minilm-l6-v2"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Figures:
    scenario: str
    accepted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    recovery_s: float | None = None
    probe_p99_s: float | None = None
    notes: str = ""

    def print(self) -> None:
        print(f"[resilience] {json.dumps(asdict(self))}", flush=True)


@dataclass
class Outcome:
    sent_at: float
    done_at: float
    status: int  # 0: the connection failed
    body: bytes


class Load:
    """`concurrency` closed-loop callers posting `texts` to /v1/embeddings until stopped; every outcome is kept.

    A caller refused with 429 waits as Retry-After says, or retry_delay_s when given (a client that ignores it).
    With `distinct`, every call's texts end in a serial number of their own, so that no embedding cache answers them.
    """

    def __init__(
        self,
        url: str,
        concurrency: int,
        texts: list[str],
        headers: dict[str, str] | None = None,
        retry_delay_s: float | None = None,
        distinct: bool = False,
    ):
        self.url = url
        self.retry_delay_s = retry_delay_s
        self.concurrency = concurrency
        self.texts = texts
        self.distinct = distinct
        self._serials = itertools.count()
        self.headers = headers or {}
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _caller(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                async with self._session.post(f"{self.url}/v1/embeddings", json=self._body(), headers=self.headers) as response:
                    body = await response.read()
                    status = response.status
            except aiohttp.ClientError as error:
                body, status = repr(error).encode(), 0
            self.outcomes.append(Outcome(sent, time.monotonic(), status, body))
            if status == 429:
                delay = self.retry_delay_s if self.retry_delay_s is not None else float(response.headers.get("Retry-After", "1"))
                await asyncio.sleep(delay)

    def _body(self) -> dict:
        if not self.distinct:
            return {"model": MODEL, "input": self.texts}
        serial = next(self._serials)
        return {"model": MODEL, "input": [f"{text} ({serial})" for text in self.texts]}

    def figures(self, scenario: str) -> Figures:
        statuses = collections.Counter(o.status for o in self.outcomes)
        # A 429 refuses before any work; every other answer was to an accepted request.
        accepted = sum(count for status, count in statuses.items() if status != 429)
        failed = {str(status): count for status, count in statuses.items() if status not in (200, 429)}
        return Figures(scenario, accepted=accepted, succeeded=statuses[200], failed=failed)

    def recovery_s(self, fault_at: float) -> float | None:
        """From the fault to the first success of a request sent after it."""
        after = [o.done_at for o in self.outcomes if o.sent_at > fault_at and o.status == 200]
        return round(min(after) - fault_at, 2) if after else None


def triton_pid(service: RunningService) -> int:
    return int((service.run_dir / "triton.pid").read_text())


def stubs(service: RunningService) -> list[psutil.Process]:
    return psutil.Process(triton_pid(service)).children()


def shm_regions(service: RunningService) -> set[str]:
    return {arg for stub in stubs(service) for arg in stub.cmdline() if arg.startswith("triton_python_backend_shm")}


def leftovers(service: RunningService, regions: set[str]) -> list[str]:
    """Processes started from this service's run directory, and the given shm regions, still present."""
    left = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(str(service.run_dir) in arg for arg in process.info["cmdline"] or []):
            left.append(f"pid {process.info['pid']}: {' '.join(process.info['cmdline'])[:120]}")
    left += [f"/dev/shm/{region}" for region in regions if Path("/dev/shm", region).exists()]
    return left


async def wait_healthy(service: RunningService, timeout_s: float) -> float:
    """Seconds until /health says ok."""
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - start < timeout_s:
            try:
                async with session.get(f"{service.http_url}/health", timeout=aiohttp.ClientTimeout(total=1)) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"not healthy after {timeout_s} s")


async def probe_latencies(url: str, seconds: float, interval_s: float = 0.1) -> list[float]:
    """One-text requests, one at a time, for `seconds`; each must succeed."""
    latencies = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.monotonic()
            async with session.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "a probe"}) as response:
                await response.read()
                if response.status != 200:
                    raise AssertionError(f"probe answered {response.status}")
            latencies.append(time.monotonic() - start)
            await asyncio.sleep(interval_s)
    return latencies


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3)


# -- scenarios -------------------------------------------------------------------------------------------


async def kill_under_load(service: RunningService, victim: str, concurrency: int = 32, seconds: float = 14.0) -> Figures:
    """kill -9 of tritonserver ("triton") or of one stub ("tokenizer", "encoder") under steady single-text load."""
    regions = shm_regions(service)
    async with Load(service.http_url, concurrency, ["a sentence about a cat that sits outside"]) as load:
        await asyncio.sleep(2)
        if victim == "triton":
            pid = triton_pid(service)
        else:
            pid = next(s.pid for s in stubs(service) if f"/{step_name(MODEL, victim)}/1/model.py" in " ".join(s.cmdline()))
        fault_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(seconds - 2)
    figures = load.figures(f"kill -9 {victim} under {concurrency} clients")
    figures.recovery_s = load.recovery_s(fault_at)
    figures.notes = f"{len(regions)} shm regions before the fault"
    return figures


async def stall(service: RunningService, stall_s: float, timeout_s: float) -> Figures:
    """SIGSTOP Triton for stall_s under load whose requests carry a deadline of timeout_s, then SIGCONT."""
    pid = triton_pid(service)
    async with Load(service.http_url, 8, ["a stalled sentence"], {"X-Request-Timeout": str(timeout_s)}) as load:
        await asyncio.sleep(1)
        fault_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(stall_s)
        os.kill(pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        await asyncio.sleep(3)
    figures = load.figures(f"SIGSTOP Triton {stall_s:.0f} s, deadline {timeout_s:.0f} s")
    during = [o for o in load.outcomes if fault_at + 1 < o.sent_at < resumed_at - timeout_s]
    figures.recovery_s = load.recovery_s(resumed_at)
    slowest = max((o.done_at - o.sent_at for o in during), default=0.0)
    figures.notes = f"slowest answer sent during the stall: {slowest:.2f} s"
    return figures


async def big_batches(service: RunningService, bulk_clients: int = 16, seconds: float = 20.0) -> Figures:
    """bulk_clients sending 2048-text requests continuously, and one-text probes alongside."""
    texts = (sts_sentences() * 2)[:2048]
    async with Load(service.http_url, bulk_clients, texts) as load:
        await asyncio.sleep(2)
        latencies = await probe_latencies(service.http_url, seconds)
    figures = load.figures(f"{bulk_clients} clients of 2048-text requests, one-text probes")
    figures.probe_p99_s = p99(latencies)
    bulk_texts = figures.succeeded * len(texts)
    figures.notes = f"bulk goodput {bulk_texts / (seconds + 2):.0f} texts/s"
    return figures


async def _run_all(out: Path) -> list[Figures]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, scenario, args in [
            ("kill-triton", kill_under_load, ["triton"]),
            ("kill-tokenizer", kill_under_load, ["tokenizer"]),
            ("kill-encoder", kill_under_load, ["encoder"]),
            ("stall", stall, [6.0, 3.0]),
            ("big-batches", big_batches, []),
        ]:
            extra = ["--triton-stall-restart-s=60"] if name == "stall" else []
            service = start_service(Path(tmp) / name, extra_args=extra)
            try:
                figures = await scenario(service, *args)
            finally:
                service.stop()
            figures.print()
            results.append(figures)
    rows = [
        "| fault | accepted | succeeded | failed by status | recovery s | probe p99 s | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in results:
        rows.append(
            f"| {f.scenario} | {f.accepted} | {f.succeeded} | {f.failed or 0} | {f.recovery_s if f.recovery_s is not None else '-'} "
            f"| {f.probe_p99_s if f.probe_p99_s is not None else '-'} | {f.notes} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "resilience.md").write_text(
        "# Resilience\n\nMade by `.venv/bin/python -m bench.resilience` on this 2-core machine.\n\n" + "\n".join(rows) + "\n"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS)
    asyncio.run(_run_all(parser.parse_args().out))


if __name__ == "__main__":
    main()
