"""Starts the real gateway (which starts the real Triton) on free ports and stops both by PID."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import requests

from gateway.__main__ import READY_LINE

ROOT = Path(__file__).resolve().parent.parent


def starts_servers(fixture_function):
    """Tags a fixture function that starts a real server (the gateway, Triton, PostgreSQL, Redis, Prometheus): put it
    under @pytest.fixture. tests/conftest.py refuses to run a test that uses such a fixture without the e2e marker."""
    fixture_function.starts_servers = True
    return fixture_function


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class RunningService:
    process: subprocess.Popen
    run_dir: Path
    http_port: int
    grpc_port: int
    triton_http_port: int
    triton_grpc_port: int
    triton_metrics_port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def triton_http_url(self) -> str:
        return f"http://127.0.0.1:{self.triton_http_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"127.0.0.1:{self.triton_grpc_port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        # The gateway removes the file when it stopped Triton itself; if it is still there, end Triton's group.
        pid_file = self.run_dir / "triton.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


MODEL_REPOSITORY = ROOT / "model_repository"


def raw_http(port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None, timeout_s: float = 120):
    """(status, lower-cased headers, body) of one request on a fresh connection to 127.0.0.1:port, sent as given:
    http.client adds only Host (unless given), Accept-Encoding and Content-Length, where a client library would
    add or normalize more."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def gateway_cli(*args: str, stdin: str | None = None) -> str:
    """`python -m gateway ARGS` (users, tokens): its stdout, or an AssertionError with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"python -m gateway {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def start_service(
    run_dir: Path,
    model_repository: Path = MODEL_REPOSITORY,
    extra_args: list[str] = (),
    timeout_s: float = 180,
    wait_healthy: bool = True,
    root: Path = ROOT,
    preexec_fn=None,
) -> RunningService:
    """The gateway once /health says ok, or (wait_healthy=False) once it answers at all. `root` is the checkout whose
    gateway runs (another revision's, for a comparison); `preexec_fn` runs in the gateway's process before it starts
    (to lower a resource limit, say).

    A free port can be taken by another process between free_ports() and the server binding it; the start
    is then tried again on new ports rather than failing the test.
    """
    for attempt in range(3):
        try:
            return _start_service(run_dir, model_repository, extra_args, timeout_s, wait_healthy, root, preexec_fn)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    pass


def _start_service(
    run_dir: Path, model_repository: Path, extra_args, timeout_s: float, wait_healthy: bool, root: Path, preexec_fn
) -> RunningService:
    http, grpc, t_http, t_grpc, t_metrics = free_ports(5)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "gateway",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--triton-http-port={t_http}",
        f"--triton-grpc-port={t_grpc}",
        f"--triton-metrics-port={t_metrics}",
        f"--model-repository={model_repository}",
        f"--run-dir={run_dir}",
        *extra_args,
    ]
    log = open(run_dir / "gateway.log", "wb")
    process = subprocess.Popen(
        command,
        cwd=root,
        # The checkout first; a PYTHONPATH already set (packages installed with --target, say) stays behind it.
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])},
        stdout=log,
        stderr=subprocess.STDOUT,
        # A limit must be lowered before exec (the gateway sizes its connection caps from it at start); the callers
        # only call setrlimit, which takes no lock another thread could hold at the fork.
        preexec_fn=preexec_fn,  # noqa: PLW1509 - setrlimit only, see above
    )
    service = RunningService(process, run_dir, http, grpc, t_http, t_grpc, t_metrics)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            service.stop()
            logs = "".join(p.read_text(errors="replace") for p in (run_dir / "gateway.log", run_dir / "triton.log") if p.exists())
            if "already in use" in logs or "could not listen" in logs:
                raise PortTaken(logs[-2000:])
            raise RuntimeError(f"gateway exited early:\n{logs[-4000:]}")
        try:
            with urllib.request.urlopen(f"{service.http_url}/health", timeout=2) as response:
                # With --workers, /health answers once one worker serves; the parent says "ready" once all do.
                if json.loads(response.read())["status"] == "ok" and READY_LINE in (run_dir / "gateway.log").read_text():
                    return service
        except urllib.error.HTTPError:
            if not wait_healthy:
                return service
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    service.stop()
    raise RuntimeError(f"gateway not healthy after {timeout_s}s; logs in {run_dir}")


class HttpApi:
    """A requests session bound to one base URL, with default headers: what the end-to-end tests call routes with."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 60):
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.headers.update(headers or {})

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, self.base_url + path, timeout=self.timeout_s, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def __enter__(self) -> HttpApi:
        return self

    def __exit__(self, *exc_info) -> None:
        self.session.close()
