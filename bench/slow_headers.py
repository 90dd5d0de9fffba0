"""Slow-header connections to an HTTP port, or idle ones to a gRPC port, and what they do to normal traffic.

    python -m bench.slow_headers --url http://127.0.0.1:8080 --connections 20000 --duration 30

Phase 1 measures normal traffic alone: --clients keep-alive clients, each with one small request in flight at a
time (GET --path, default /version, which the gateway serves as plain text; or POST with --body), plus a probe
that opens a fresh connection for each of its requests, every --probe-interval seconds. Phase 2 opens up to
--connections slow-header connections to the same host and port (the request line, then one header byte every
--byte-interval seconds, never finishing; a connection the server closes is opened again, as an attacker would)
and, once they are all under way, measures the same traffic again. It prints both, and the ratio of the
throughputs (goal: at least 0.90).

With --grpc-port, the attack goes to the server's gRPC port instead: --connections idle connections that send
nothing at all, not even the HTTP/2 preface (one the server closes is opened again), and gRPC traffic (health Check
over --clients channels of their own, and a fresh channel per probe) is measured as well as the HTTP traffic:

    python -m bench.slow_headers --url http://127.0.0.1:8080 --grpc-port 50051 --connections 20000 --duration 20 \
        --server-pid <gateway pid> --out bench/results/slow_headers_grpc.md

--out writes the figures, and the command that made them, as Markdown.

The client raises its own open-file limit to the hard one and spreads the slow connections over as many
processes as that limit needs. Everything is bounded: at most --connections slow connections at once, a ramp
of at most --ramp-timeout seconds, and each phase --duration seconds (plus a second of warm-up).
Against the tiny test app: python -m tests.test_http_connection_limits --port 8080 serves GET /version.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import math
import multiprocessing
import os
import resource
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

FD_SPARE = 256  # descriptors a client process keeps for itself besides its slow connections


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))]


# ---------------------------------------------------------------- the attack (one process per share)

# Rounds per --byte-interval: each round visits a slice of the connections, so the bytes go out evenly.
_ROUNDS = 50


def _attack_process(
    host: str, port: int, head: bytes | None, count: int, interval: float, connect_rate: float, stop, open_now, started, result
) -> None:
    """Holds count slow-header connections (head, then a byte every interval), or idle ones (head None: nothing is
    ever sent), with plain non-blocking sockets and no event loop, so that the attack itself takes as little as
    possible of the CPU it shares with the server it measures (the server's cost per connection and per byte is
    what is measured, not the client's)."""
    raise_fd_limit()
    counters = {"opened": 0, "closed_by_server": 0, "answered_408": 0, "answered_other": 0, "connect_failed": 0}
    sockets: list[socket.socket | None] = [None] * count
    head_sent = [False] * count
    open_count = 0
    round_s = interval / _ROUNDS
    connect_budget = 0.0
    next_round = time.monotonic()
    turn = 0
    while not stop.is_set():
        connect_budget = min(connect_budget + connect_rate * round_s, connect_rate * round_s * 2)
        for index in range(turn % _ROUNDS, count, _ROUNDS):
            sock = sockets[index]
            if sock is None:
                if connect_budget < 1:
                    continue
                connect_budget -= 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                error = sock.connect_ex((host, port))
                if error not in (0, errno.EINPROGRESS):
                    counters["connect_failed"] += 1
                    sock.close()
                    continue
                if started.value < count:
                    with started.get_lock():
                        started.value += 1
                sockets[index], head_sent[index] = sock, False
                counters["opened"] += 1
                open_count += 1
                continue  # the request line goes out on the next visit, once connected
            try:
                answer = sock.recv(64)  # the server said something: it is closing this connection
            except BlockingIOError:
                answer = None
            except OSError:
                answer = b""
            if head is None and answer != b"":
                # Idle: nothing to send. What came is a bare HTTP/2 server's SETTINGS, sent first: read, and ignored.
                continue
            if answer is None:
                try:
                    sock.send(b"a" if head_sent[index] else head)
                    head_sent[index] = True
                    continue
                except BlockingIOError:
                    continue  # not connected yet, or the server stopped reading: try again next visit
                except OSError:
                    answer = b""
            counters["closed_by_server"] += 1
            if answer.startswith(b"HTTP/1.1 408"):
                counters["answered_408"] += 1
            elif answer:
                counters["answered_other"] += 1
            sock.close()
            sockets[index] = None  # reopened on a later visit, as an attacker would
            open_count -= 1
        open_now.value = open_count
        turn += 1
        next_round += round_s
        delay = next_round - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_round = time.monotonic()
    for sock in sockets:
        if sock is not None:
            sock.close()
    result.put(counters)


# ---------------------------------------------------------------- normal traffic


class _Failed(Exception):
    pass


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length is None:
        raise _Failed(f"HTTP {status} without Content-Length")
    await reader.readexactly(length)
    if not 200 <= status < 300:
        raise _Failed(f"HTTP {status}")


async def _traffic(host: str, port: int, request: bytes, clients: int, duration: float, probe_interval: float) -> dict:
    warmup = 1.0
    start = time.perf_counter()
    measure_from, measure_until = start + warmup, start + warmup + duration
    latencies: list[float] = []
    errors: list[str] = []
    probes: list[float | None] = []

    async def client() -> None:
        reader = writer = None
        while (now := time.perf_counter()) < measure_until:
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                await asyncio.wait_for(_request(reader, writer, request), 10)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, _Failed) as error:
                if now >= measure_from:
                    errors.append(f"{type(error).__name__}: {error}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
                continue
            done = time.perf_counter()
            if now >= measure_from and done <= measure_until:
                latencies.append(done - now)
        if writer is not None:
            writer.close()

    async def probe() -> None:
        # A new connection per request, as a client without a pool: what a connection cap does shows here.
        fresh = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1) if b"\r\n\r\n" in request else request
        await asyncio.sleep(warmup)
        while time.perf_counter() + probe_interval <= measure_until:
            began = time.perf_counter()
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                await asyncio.wait_for(_request(reader, writer, fresh), 10)
                probes.append(time.perf_counter() - began)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, _Failed):
                probes.append(None)
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(max(0.0, began + probe_interval - time.perf_counter()))

    cpu_start = os.times()
    await asyncio.gather(probe(), *(client() for _ in range(clients)))
    cpu_end = os.times()
    return _figures(latencies, errors, probes, duration, cpu_start, cpu_end)


def _figures(latencies: list[float], errors: list[str], probes: list[float | None], duration: float, cpu_start, cpu_end) -> dict:
    done_probes = [p for p in probes if p is not None]
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / duration,
        "p50_ms": 1000 * _percentile(latencies, 0.5),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "probes": len(probes),
        "probes_ok": len(done_probes),
        "probe_p50_ms": 1000 * _percentile(done_probes, 0.5),
        "probe_max_ms": 1000 * max(done_probes) if done_probes else float("nan"),
        "cpu_s": (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system),
    }


async def _grpc_traffic(target: str, clients: int, duration: float, probe_interval: float) -> dict:
    """The gRPC counterpart of _traffic: clients each with a channel (and so a connection) of its own and one health
    Check in flight at a time, and a probe that opens a fresh channel for each of its Checks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    warmup = 1.0
    start = time.perf_counter()
    measure_from, measure_until = start + warmup, start + warmup + duration
    latencies: list[float] = []
    errors: list[str] = []
    probes: list[float | None] = []
    request = health_pb2.HealthCheckRequest()
    # Channels to one target share their connections unless told otherwise; separate clients would not.
    options = [("grpc.use_local_subchannel_pool", 1)]

    async def check(stub) -> None:
        reply = await stub.Check(request, timeout=10)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise _Failed(f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")

    async def client() -> None:
        channel = None
        while (now := time.perf_counter()) < measure_until:
            try:
                if channel is None:
                    channel = grpc.aio.insecure_channel(target, options=options)
                    stub = health_pb2_grpc.HealthStub(channel)
                await check(stub)
            except (grpc.aio.AioRpcError, _Failed) as error:
                if now >= measure_from:
                    reason = error.code().name if isinstance(error, grpc.aio.AioRpcError) else str(error)
                    errors.append(f"{type(error).__name__}: {reason}")
                await channel.close()
                channel = None
                await asyncio.sleep(0.05)
                continue
            done = time.perf_counter()
            if now >= measure_from and done <= measure_until:
                latencies.append(done - now)
        if channel is not None:
            await channel.close()

    async def probe() -> None:
        await asyncio.sleep(warmup)
        while time.perf_counter() + probe_interval <= measure_until:
            began = time.perf_counter()
            async with grpc.aio.insecure_channel(target, options=options) as channel:
                try:
                    await check(health_pb2_grpc.HealthStub(channel))
                    probes.append(time.perf_counter() - began)
                except (grpc.aio.AioRpcError, _Failed):
                    probes.append(None)
            await asyncio.sleep(max(0.0, began + probe_interval - time.perf_counter()))

    cpu_start = os.times()
    await asyncio.gather(probe(), *(client() for _ in range(clients)))
    cpu_end = os.times()
    return _figures(latencies, errors, probes, duration, cpu_start, cpu_end)


def _traffic_process(kind, target, request, clients, duration, probe_interval, result) -> None:
    if kind == "grpc":
        # grpc.aio on the standard loop: it does not support uvloop.
        result.put(asyncio.run(_grpc_traffic(target, clients, duration, probe_interval)))
    else:
        host, port = target
        result.put(uvloop.run(_traffic(host, port, request, clients, duration, probe_interval)))


def _server_stats(pid: int | None) -> dict | None:
    if not pid:
        return None
    import psutil

    process = psutil.Process(pid)
    times = process.cpu_times()
    return {"rss_mib": process.memory_info().rss / 2**20, "fds": process.num_fds(), "cpu_s": times.user + times.system}


def _cpu_seconds(pids) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _run_traffic(ctx, args, kind, target, request, pid) -> tuple[dict, dict | None]:
    result = ctx.Queue()
    before = _server_stats(pid)
    process = ctx.Process(
        target=_traffic_process, args=(kind, target, request, args.clients, args.duration, args.probe_interval, result)
    )
    process.start()
    figures = result.get(timeout=args.duration + 60)
    figures["client_cpu_share"] = figures.pop("cpu_s") / (args.duration + 1)
    process.join(10)
    after = _server_stats(pid)
    server = None
    if before and after:
        server = {
            "rss_mib": after["rss_mib"],
            "fds": after["fds"],
            "cpu_share": (after["cpu_s"] - before["cpu_s"]) / (args.duration + 1),
        }
    return figures, server


def _describe(name: str, figures: dict, server: dict | None) -> str:
    line = (
        f"{name:<16} {figures['requests_per_s']:>9.1f} req/s  p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms  "
        f"errors {figures['errors']}  fresh-connection probes {figures['probes_ok']}/{figures['probes']} ok "
        f"(p50 {figures['probe_p50_ms']:.1f} ms, max {figures['probe_max_ms']:.1f} ms)"
    )
    if figures["first_error"]:
        line += f"\n{'':<16} first error: {figures['first_error']}"
    line += f"\n{'':<16} traffic client: {figures['client_cpu_share']:.2f} cores"
    if server:
        line += f"; server: {server['rss_mib']:.0f} MiB RSS, {server['fds']} fds, {server['cpu_share']:.2f} cores"
    return line


def _ratio(during: dict, without: dict) -> float:
    return during["requests_per_s"] / without["requests_per_s"] if without["requests_per_s"] else float("nan")


def _server_line(pid: int) -> str:
    """What the server under test was: its command line and open-file limit, read while it runs."""
    import psutil

    process = psutil.Process(pid)
    soft, _ = process.rlimit(psutil.RLIMIT_NOFILE)
    return f"Server (pid {pid}): `{shlex.join(process.cmdline())}`, open-file limit {soft}."


def _report(
    command: str,
    server: str,
    attack: str,
    rows: list[tuple[str, str, dict, dict | None]],
    ratios: dict[str, float],
    notes: list[str],
) -> str:
    """The figures as Markdown, for bench/results/."""
    lines = [
        f"# {attack[0].upper()}{attack[1:]}",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores.",
        *([server] if server else []),
        "",
        "| traffic | phase | requests/s | p50 | p99 | errors | fresh-connection probes ok (max) | server fds | server RSS "
        "| server CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for traffic, phase, figures, server in rows:
        fds, rss, cpu = ("", "", "")
        if server:
            fds, rss, cpu = f"{server['fds']}", f"{server['rss_mib']:.0f} MiB", f"{server['cpu_share']:.2f} cores"
        probes = f"{figures['probes_ok']}/{figures['probes']} ({figures['probe_max_ms']:.0f} ms)"
        lines.append(
            f"| {traffic} | {phase} | {figures['requests_per_s']:.1f} | {figures['p50_ms']:.2f} ms | {figures['p99_ms']:.2f} ms "
            f"| {figures['errors']} | {probes} | {fds} | {rss} | {cpu} |"
        )
    lines += ["", *notes, ""]
    for traffic, ratio in ratios.items():
        lines.append(
            f"Throughput ratio of {traffic} traffic during/without the attack: {ratio:.2f} "
            f"(goal >= 0.90: {'met' if ratio >= 0.90 else 'missed'})."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_headers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="http://host:port of the server (a path in it is used as --path)")
    parser.add_argument("--path", default=None, help="path of the normal requests (default /version)")
    parser.add_argument("--method", choices=["GET", "POST"], default="GET")
    parser.add_argument("--body", default='{"text": "hello"}', help="body of POST requests (sent as application/json)")
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=0,
        help="attack this gRPC port of the same host with idle connections instead, and measure gRPC traffic too",
    )
    parser.add_argument("--connections", type=int, default=20000, help="slow-header (or idle) connections at most")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds each phase measures")
    parser.add_argument("--clients", type=int, default=8, help="keep-alive clients (gRPC: channels) of the normal traffic")
    parser.add_argument("--probe-interval", type=float, default=0.2, help="seconds between fresh-connection probes")
    parser.add_argument(
        "--byte-interval",
        type=float,
        default=3.0,
        help="seconds between header bytes of a slow connection (idle ones: between checks that they are open)",
    )
    parser.add_argument(
        "--connect-rate", type=float, default=4000.0, help="new slow connections per second at most, all processes together"
    )
    parser.add_argument("--ramp-timeout", type=float, default=60.0, help="seconds to wait for the slow connections to open")
    parser.add_argument("--processes", type=int, default=0, help="client processes holding slow connections (0: as needed)")
    parser.add_argument("--cpus", default="", help="run every client process on these CPUs only, e.g. 1 or 2,3")
    parser.add_argument("--server-pid", type=int, default=0, help="also report this server process's memory, descriptors and CPU")
    parser.add_argument("--out", default="", help="write the figures and this command as Markdown to this file")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "bench.slow_headers", *(sys.argv[1:] if argv is None else argv)])

    url = urlsplit(args.url)
    if url.scheme != "http" or not url.hostname:
        parser.error("--url must be http://host:port")
    host, port = url.hostname, url.port or 80
    path = args.path or (url.path if url.path not in ("", "/") else "/version")
    host_header = f"{host}:{port}".encode()
    if args.method == "GET":
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host_header)
    else:
        body = args.body.encode()
        request = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            path.encode(),
            host_header,
            len(body),
            body,
        )
    # What is measured, and where the attack goes: slow headers on the HTTP port, or idle connections on the gRPC port.
    traffics = [("HTTP", "http", (host, port), request)]
    if args.grpc_port:
        traffics.append(("gRPC", "grpc", f"{host}:{args.grpc_port}", None))
        attack_port, attack_head, kind = args.grpc_port, None, "idle"
        attack = f"idle connections on the gRPC port ({args.connections:,} attempted, nothing sent, not even the HTTP/2 preface)"
    else:
        attack_port, attack_head, kind = port, b"GET %s HTTP/1.1\r\nHost: %s\r\nX-Slow: " % (path.encode(), host_header), "slow"
        attack = f"slow headers ({args.connections:,} connections attempted, one header byte every {args.byte_interval:g} s)"

    if args.cpus:
        # Keeps the client off the server's cores on a small machine (children inherit it): start the server
        # with e.g. `taskset -c 0` and this with --cpus 1.
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
    limit = raise_fd_limit()
    per_process = max(1, limit - FD_SPARE)
    processes = args.processes or max(1, math.ceil(args.connections / per_process))
    shares = [args.connections // processes + (i < args.connections % processes) for i in range(processes)]
    if max(shares) > per_process:
        parser.error(f"{max(shares)} connections in one process exceed its open-file limit {limit}; use more --processes")
    ctx = multiprocessing.get_context("fork")
    server_line = _server_line(args.server_pid) if args.server_pid else ""

    print(
        f"target {args.method} http://{host}:{port}{path}"
        + (f" and gRPC health Check on {host}:{args.grpc_port}" if args.grpc_port else "")
        + f"; {args.clients} keep-alive clients, a fresh-connection probe every {args.probe_interval:g} s; "
        f"{args.connections} {kind} connections to port {attack_port} over {processes} process(es)",
        flush=True,
    )
    rows = []
    baselines = {}
    for name, traffic_kind, target, traffic_request in traffics:
        figures, server = _run_traffic(ctx, args, traffic_kind, target, traffic_request, args.server_pid)
        print(_describe(f"{name} without", figures, server), flush=True)
        rows.append((name, "without attack", figures, server))
        baselines[name] = figures

    stop = ctx.Event()
    attack_results = ctx.Queue()
    counters = [(ctx.Value("i", 0), ctx.Value("i", 0)) for _ in shares]
    attackers = [
        ctx.Process(
            target=_attack_process,
            args=(
                host,
                attack_port,
                attack_head,
                share,
                args.byte_interval,
                args.connect_rate / processes,
                stop,
                open_now,
                started,
                attack_results,
            ),
        )
        for share, (open_now, started) in zip(shares, counters)
    ]
    for attacker in attackers:
        attacker.start()
    ramp_start = time.monotonic()
    ratios = {}
    try:
        while time.monotonic() - ramp_start < args.ramp_timeout:
            if sum(started.value for _, started in counters) >= args.connections:
                break
            time.sleep(0.2)
        time.sleep(min(2.0, args.byte_interval))  # let the first header bytes go out
        held = sum(open_now.value for open_now, _ in counters)
        ramp_s = time.monotonic() - ramp_start
        print(f"attack ramped up in {ramp_s:.1f} s; {held} {kind} connections open from the client's side", flush=True)
        attackers_cpu = _cpu_seconds(attacker.pid for attacker in attackers)
        for name, traffic_kind, target, traffic_request in traffics:
            figures, server = _run_traffic(ctx, args, traffic_kind, target, traffic_request, args.server_pid)
            print(_describe(f"{name} during", figures, server), flush=True)
            rows.append((name, "during attack", figures, server))
            ratios[name] = _ratio(figures, baselines[name])
        attacked_s = len(traffics) * (args.duration + 1)
        attackers_cpu = (_cpu_seconds(attacker.pid for attacker in attackers) - attackers_cpu) / attacked_s
        held_end = sum(open_now.value for open_now, _ in counters)
    finally:
        stop.set()
        totals: dict[str, int] = {}
        for _ in attackers:
            try:
                for name, value in attack_results.get(timeout=max(2 * args.byte_interval, 5) + 20).items():
                    totals[name] = totals.get(name, 0) + value
            except Exception:  # an attacker that died reports nothing; its process is ended below
                pass
        for attacker in attackers:
            attacker.join(5)
            if attacker.is_alive():
                attacker.kill()
                attacker.join()
    notes = [
        f"Attack: {attack}; ramped up in {ramp_s:.1f} s with {held:,} open from the client's side, {held_end:,} at the end; "
        "over the whole attack: " + ", ".join(f"{name.replace('_', ' ')} {value:,}" for name, value in totals.items()) + ".",
        f"Attacking processes: {attackers_cpu:.2f} cores; traffic client: "
        + ", ".join(f"{figures['client_cpu_share']:.2f} cores ({traffic}, {phase})" for traffic, phase, figures, _ in rows)
        + ".",
    ]
    print(*notes, sep="\n")
    for name, ratio in ratios.items():
        verdict = "met" if ratio >= 0.90 else "missed"
        print(f"throughput ratio of {name} traffic during/without attack: {ratio:.2f} (goal >= 0.90: {verdict})")
    if args.out:
        Path(args.out).write_text(_report(command, server_line, attack, rows, ratios, notes))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
