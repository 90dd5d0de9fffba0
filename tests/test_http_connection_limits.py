"""Bounded connections of the gateway's HTTP server (gateway/transports/http/server.py), seen from the client's side.

Each test starts the real server from create_http_server, with a tiny Starlette app, in its own process (so
its memory and descriptors can be read, and it can be stopped by PID), then plays the client: slow headers,
huge headers, many headers, more connections than the cap, and an accept loop out of descriptors.

Run as a module, this file is that server: python -m tests.test_http_connection_limits --port 8080
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from harness.servers import ROOT, free_ports
from harness.waiting import wait_until

pytestmark = pytest.mark.e2e

TIMEOUT_S = 1.0  # the header timeout of the servers under test
MARGIN_S = 1.0  # how late past it a connection may still be closed (clock granularity, scheduling on 2 cores)
SLOW_BEGUN = "slow request begun"  # what the server under test prints as a request to /slow starts


class TinyServer:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def sockets(self) -> int:
        """Open sockets of the server process (its listener included)."""
        count = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with suppress(OSError):
                count += os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:")
        return count

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def tiny_server(tmp_path: Path, *args: str, loop: str = "asyncio", timeout_s: float = TIMEOUT_S):
    (port,) = free_ports(1)
    log = tmp_path / f"server-{port}.log"
    command = [sys.executable, "-m", "tests.test_http_connection_limits", f"--port={port}", f"--header-timeout={timeout_s}"]
    with open(log, "wb") as out:
        process = subprocess.Popen([*command, f"--loop={loop}", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = TinyServer(process, port, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, f"server exited early:\n{server.log_text()}"
            with suppress(OSError):
                if get(port)[0] == 200:
                    break
            assert time.monotonic() < deadline, f"server did not answer:\n{server.log_text()}"
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                pytest.fail(f"server did not stop on SIGTERM:\n{server.log_text()}")
    assert process.returncode == 0, server.log_text()
    with closing(socket.socket()) as probe:  # nothing left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def get(port: int, path: str = "/", timeout: float = 3.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """All the server sends until it closes the connection (True), or until timeout (False)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return received, False
    return received, True


def read_response(reader) -> bytes:
    """One Content-Length-framed response from a keep-alive connection; reader is sock.makefile("rb")."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        assert line, f"closed after {head!r}"
        head += line
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    body = reader.read(length)
    assert len(body) == length, f"closed after {head + body!r}"
    return head + body


def is_closed(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (without consuming anything it sent)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_slow_headers_are_answered_408_and_closed_after_the_timeout(tmp_path, loop):
    with tiny_server(tmp_path, loop=loop) as server:
        slow = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        closed_at = None
        served = []
        # One header byte every 0.2 s, as long as the server takes them; normal requests go on meanwhile.
        while time.monotonic() - started < TIMEOUT_S + MARGIN_S + 1:
            try:
                slow.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            served.append(get(server.port)[0])
            time.sleep(0.2)
        response, closed = read_until_closed(slow, timeout=TIMEOUT_S + MARGIN_S)
        closed_at = closed_at or time.monotonic()
        slow.close()
        assert closed, "the slow connection is still open"
        assert TIMEOUT_S - 0.1 <= closed_at - started <= TIMEOUT_S + MARGIN_S
        status, error = status_and_error(response)
        assert status == 408
        assert error["type"] == "invalid_request_error" and error["code"] == "header_timeout" and error["message"]
        assert served and set(served) == {200}

        # A connection that sends nothing is closed too, silently.
        idle = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        response, closed = read_until_closed(idle, timeout=TIMEOUT_S + MARGIN_S)
        idle.close()
        assert closed and response == b""
        assert TIMEOUT_S - 0.1 <= time.monotonic() - started <= TIMEOUT_S + MARGIN_S

        # On a keep-alive connection the clock restarts when a response ends, not when the connection opened.
        kept = socket.create_connection(("127.0.0.1", server.port), timeout=3)
        kept_reader = kept.makefile("rb")
        time.sleep(TIMEOUT_S * 0.7)
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept_reader).startswith(b"HTTP/1.1 200 ")
        time.sleep(TIMEOUT_S * 0.7)
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # 1.4 timeouts after opening, 0.7 after the answer
        assert read_response(kept_reader).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        kept.sendall(b"GET / HTTP/1.1\r\n")  # then too slow again
        response, closed = read_until_closed(kept, timeout=TIMEOUT_S + MARGIN_S)
        kept_reader.close()
        kept.close()
        assert closed and response.startswith(b"HTTP/1.1 408 ")
        assert TIMEOUT_S - 0.1 <= time.monotonic() - answered <= TIMEOUT_S + MARGIN_S


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_100_kib_header_is_answered_431_and_closed(tmp_path, loop):
    with tiny_server(tmp_path, loop=loop) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100 * 1024 + b"\r\n\r\n")
            response, closed = read_until_closed(sock, timeout=3)
        assert closed
        status, error = status_and_error(response)
        assert status == 431 and response.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        assert error["type"] == "invalid_request_error" and error["code"] == "headers_too_large"
        # A header just under the limit still passes, and the server goes on serving.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60 * 1024 + b"\r\n\r\n")
            sock.settimeout(3)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert get(server.port) == (200, b"ok")


def test_bodies_and_pipelined_requests_are_not_counted_as_header_bytes(tmp_path):
    """The header budget ends where the headers do: a big body sent with them, and requests pipelined behind
    a first one in the same packet, are served."""
    with tiny_server(tmp_path, "--max-header-bytes=4096") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock, sock.makefile("rb") as reader:
            body = b"x" * (1024 * 1024)
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert read_response(reader).startswith(b"HTTP/1.1 200 ")
            request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 3000 + b"\r\n\r\n"
            sock.sendall(request * 5)  # 15 KB in one write, each request under the 4 KB limit
            for _ in range(5):
                assert read_response(reader).startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 5000 + b"\r\n\r\n")
            response, closed = read_until_closed(sock, timeout=3)  # the reader holds nothing more: all 5 were read
        assert closed and response.startswith(b"HTTP/1.1 431 ")


def test_200_headers_are_answered_431_and_100_are_served(tmp_path):
    def request_with(count: int) -> bytes:
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(count - 2))  # with Host and Connection: count
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n")
            response, closed = read_until_closed(sock, timeout=3)
        assert closed
        return response

    with tiny_server(tmp_path) as server:
        response = request_with(200)
        status, error = status_and_error(response)
        assert status == 431 and error["code"] == "too_many_headers"
        # Exactly max_headers (100) passes.
        assert request_with(99).startswith(b"HTTP/1.1 200 ")
        assert request_with(100).startswith(b"HTTP/1.1 200 ")
        assert request_with(101).startswith(b"HTTP/1.1 431 ")


def test_unfinished_huge_headers_do_not_grow_the_server(tmp_path):
    """20 clients each start an 8 MiB header and never finish it: the server holds 64 KiB of each at most."""
    header_size = 8 * 1024 * 1024
    with tiny_server(tmp_path) as server:
        for _ in range(3):
            get(server.port)
        before = server.rss()
        sockets = []
        refused = 0
        chunk = b"a" * 65536
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sockets.append(sock)
            sock.settimeout(2)
            try:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: ")
                for _ in range(header_size // len(chunk)):
                    sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                refused += 1
            except TimeoutError:
                pass  # the server stopped reading: nothing to refuse it with, and nothing more held either
        time.sleep(0.5)
        grown = server.rss() - before
        answers = [read_until_closed(sock, timeout=3) for sock in sockets]
        for sock in sockets:
            sock.close()
        # 20 x 8 MiB would be 160 MiB held; what is allowed is 20 x 64 KiB and a read buffer or two each.
        print(f"server RSS grew by {grown / 2**20:.1f} MiB")
        assert grown < 24 * 1024 * 1024, f"server grew by {grown / 2**20:.1f} MiB"
        assert refused == 20
        assert all(closed and response.startswith(b"HTTP/1.1 431 ") for response, closed in answers)
        assert get(server.port) == (200, b"ok")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_cap_keeps_the_newest_connections_and_normal_traffic_is_served(tmp_path, loop):
    """200 idle connections against a cap of 50: the server never holds more than 50, and a new connection
    with a request is served at once; the idle connections that made it in are closed after the timeout."""
    timeout_s = 3.0
    with tiny_server(tmp_path, "--max-connections=50", loop=loop, timeout_s=timeout_s) as server:
        baseline = server.sockets()
        started = time.monotonic()
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        for sock in idle[:100]:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # half of them with a request begun, half with nothing
        # Once the server has taken all 200 in, the oldest 150 have made room for the newer ones.
        wait_until(
            lambda: sum(is_closed(sock) for sock in idle) >= 150, timeout_s=30, what="the server to take in the 200 connections"
        )
        assert server.sockets() - baseline <= 50
        # A new client is served although 200 connections were opened before it.
        for _ in range(10):
            assert get(server.port, timeout=2) == (200, b"ok")
        assert server.sockets() - baseline <= 50
        # The oldest made room: at least 150 of the idle ones are closed already, long before the timeout.
        closed_early = sum(is_closed(sock) for sock in idle)
        assert time.monotonic() - started < timeout_s
        assert closed_early >= 150
        # The rest is closed by the header clock.
        for sock in idle:
            _, closed = read_until_closed(sock, timeout=max(0.1, started + timeout_s + MARGIN_S - time.monotonic()))
            assert closed
            sock.close()
        deadline = time.monotonic() + 2
        while server.sockets() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.sockets() <= baseline
        assert get(server.port) == (200, b"ok")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_at_the_cap_with_every_connection_busy_a_new_one_is_closed_at_once(tmp_path, loop):
    """Connections with a request in flight are never evicted: past the cap, the newcomer is turned away."""
    with tiny_server(tmp_path, "--max-connections=20", loop=loop) as server:
        busy = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # 1.5 s each
            busy.append(sock)
        wait_until(lambda: server.log_text().count(SLOW_BEGUN) == 20, timeout_s=30, what="the 20 slow requests to be under way")
        turned_away = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        response, closed = read_until_closed(turned_away, timeout=1)
        turned_away.close()
        assert closed and response == b"" and time.monotonic() - started < 0.5
        for sock in busy:
            sock.settimeout(3)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            sock.close()
        assert get(server.port) == (200, b"ok")


def test_accept_failures_are_counted_in_one_line_without_tracebacks(tmp_path):
    """Out of descriptors despite the cap (something else in the process took the reserve): asyncio's accept
    loop would log a traceback per failed accept(); the server logs one line with the count, and recovers."""
    with tiny_server(tmp_path, "--fd-limit=128", "--burn-fds-on=/burn") as server:
        burn_s = 2.5
        started = time.monotonic()
        assert get(server.port, f"/burn?seconds={burn_s}") == (200, b"burnt")
        clients = []
        for _ in range(3):  # three waves of clients, 0.7 s apart: one line for all of them
            clients += [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
            time.sleep(0.7)
        log = server.log_text()
        assert "Traceback" not in log and "out of system resource" not in log, log[:3000]
        lines = [line for line in log.splitlines() if line.strip()]
        assert len(lines) == 1, lines[:20]
        assert "accept() failed" in lines[0] and "EMFILE" in lines[0]
        assert int(lines[0].split("accept() failed ")[1].split()[0]) >= 1
        for sock in clients:
            sock.close()
        time.sleep(max(0.0, started + burn_s - time.monotonic()))
        assert get(server.port, timeout=5) == (200, b"ok")  # asyncio retries accepting a second after a failure
        assert log == server.log_text()


def _serve() -> None:
    """The server under test: create_http_server with a tiny app."""
    import asyncio
    import resource

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from gateway.transports.http.server import ConnectionLimits, create_http_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--max-header-bytes", type=int, default=64 * 1024)
    parser.add_argument("--max-headers", type=int, default=100)
    parser.add_argument("--max-connections", type=int, default=0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--fd-limit", type=int, default=0, help="lower the hard open-file limit to this first")
    parser.add_argument("--burn-fds-on", default="", help="a GET path that takes every free descriptor for ?seconds=")
    args = parser.parse_args()
    if args.fd_limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.fd_limit, args.fd_limit))
    burnt: list[int] = []

    async def ok(request):
        await request.body()
        return PlainTextResponse("ok")

    async def slow(request):
        print(SLOW_BEGUN, flush=True)
        await asyncio.sleep(1.5)
        return PlainTextResponse("ok")

    def unburn() -> None:
        while burnt:
            os.close(burnt.pop())

    async def burn(request):
        """Takes every free descriptor for a while, as a leak elsewhere in the process would."""
        with suppress(OSError):
            while True:
                burnt.append(os.open(os.devnull, os.O_RDONLY))
        asyncio.get_running_loop().call_later(float(request.query_params["seconds"]), unburn)
        return PlainTextResponse("burnt", headers={"connection": "close"})

    routes = [Route("/", ok, methods=["GET", "POST"]), Route("/version", ok), Route("/slow", slow)]
    if args.burn_fds_on:
        routes.append(Route(args.burn_fds_on, burn))
    limits = ConnectionLimits(args.header_timeout, args.max_header_bytes, args.max_headers, args.max_connections)
    server = create_http_server(Starlette(routes=routes), "127.0.0.1", args.port, limits, log_level="warning", access_log=False)

    async def main() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: setattr(server, "should_exit", True))
        await server.serve()

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


if __name__ == "__main__":
    _serve()
