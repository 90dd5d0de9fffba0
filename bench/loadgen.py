"""Closed-loop load generator, run in its own process: python -m bench.loadgen SPEC.pickle RESULT.json

It shares 2 cores with the server it measures, so it does as little as it can per request: the request
bodies are serialized by the caller beforehand, HTTP is written by hand over keep-alive sockets (no client
library, no JSON parsing of responses beyond a status check), and gRPC calls send pre-serialized bytes.
It reports its own CPU time so the results can say how much of the machine it took.

The spec is a pickled dict:
    protocol     "http" or "grpc"
    port         on 127.0.0.1 (load only ever goes to the local machine)
    target       HTTP path, or the gRPC method ("/embedding.v1.EmbeddingService/Embed")
    bodies       list of bytes, sent round-robin
    concurrency  callers, each with one request in flight at a time
    warmup_s     run, but not measured
    duration_s   measured window; it runs on past its end, by up to EXTENSION_CAP_S, until one request that started
                 in it has ended: a window shorter than the slowest request (a 100-text request to infinity-emb in a
                 smoke run on a slow machine) would otherwise measure nothing
    max_requests upper bound on requests sent, warm-up included
    headers      optional dict of extra headers sent with every request (e.g. Authorization); gRPC sends them
                 as call metadata, names lower-cased as gRPC requires
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import sys
import time

import uvloop


class RequestFailed(Exception):
    pass


class HttpCaller:
    """One keep-alive HTTP/1.1 connection; a request is one write and a Content-Length-framed read."""

    def __init__(self, port: int, path: str, headers: dict[str, str]):
        self.port = port
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{extra}".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self, body: bytes) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 24)
        self.writer.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length)
        if status != 200:
            raise RequestFailed(f"HTTP {status}: {payload[:300]!r}")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class GrpcCaller:
    """Calls one unary method with pre-serialized request bytes on a shared channel."""

    def __init__(self, channel, method: str, headers: dict[str, str]):
        self.method = channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out
        self.metadata = tuple((name.lower(), value) for name, value in headers.items()) or None

    async def call(self, body: bytes) -> None:
        import grpc

        try:
            await self.method(body, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise RequestFailed(f"gRPC {error.code().name}: {error.details()}") from None

    async def close(self) -> None:
        pass


EXTENSION_CAP_S = 60.0


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def run(spec: dict) -> dict:
    bodies = spec["bodies"]
    headers = spec.get("headers") or {}
    channel = None
    if spec["protocol"] == "grpc":
        import grpc

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{spec['port']}")
        callers = [GrpcCaller(channel, spec["target"], headers) for _ in range(spec["concurrency"])]
    else:
        callers = [HttpCaller(spec["port"], spec["target"], headers) for _ in range(spec["concurrency"])]

    next_body = itertools.cycle(range(len(bodies))).__next__
    budget = [spec["max_requests"]]
    start = time.perf_counter()
    measure_from = start + spec["warmup_s"]
    measure_until = [measure_from + spec["duration_s"]]  # moved on while no request has been measured
    give_up = measure_until[0] + EXTENSION_CAP_S
    latencies: list[float] = []
    errors: list[str] = []
    cpu_at: list[os.times_result] = []

    async def caller_loop(caller) -> None:
        while budget[0] > 0:
            now = time.perf_counter()
            if (now >= measure_until[0] and latencies) or now >= give_up:
                return
            budget[0] -= 1
            try:
                await caller.call(bodies[next_body()])
            except (RequestFailed, OSError, asyncio.IncompleteReadError) as error:
                errors.append(str(error))
                return
            done = time.perf_counter()
            if now >= measure_from and (done <= measure_until[0] or not latencies):
                latencies.append(done - now)
                measure_until[0] = max(measure_until[0], done)

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        cpu_at.append(os.times())
        await asyncio.sleep(max(0.0, measure_until[0] - time.perf_counter()))

    marks = asyncio.create_task(cpu_marks())
    await asyncio.gather(*(caller_loop(c) for c in callers))
    ended = time.perf_counter()
    cpu_end = os.times()
    marks.cancel()
    for caller in callers:
        await caller.close()
    if channel is not None:
        await channel.close()

    window = min(ended, measure_until[0]) - measure_from
    cpu_start = cpu_at[0] if cpu_at else cpu_end
    cpu_s = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
    latencies.sort()
    return {
        "requests": len(latencies),
        "window_s": window,
        "requests_per_s": len(latencies) / window if window > 0 else 0.0,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "mean_ms": 1000 * sum(latencies) / len(latencies) if latencies else float("nan"),
        # Share of one core over the measured window (the machine has os.cpu_count() of them).
        "loadgen_cpu_share": cpu_s / (ended - (measure_from if cpu_at else start)),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main() -> int:
    spec_path, result_path = sys.argv[1:3]
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    result = uvloop.run(run(spec))
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
