"""Starts the Triton server shipped in the nvidia-pytriton wheel, waits until it is ready, and stops it by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class TritonStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent


def prepare_backends(work_dir: Path) -> Path:
    """A writable copy of the Python backend with the stub for this interpreter beside it, as Triton expects."""
    source = _pytriton_root() / "tritonserver"
    backends = work_dir / "backends"
    stub_name = "triton_python_backend_stub"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (backends / "python" / stub_name).exists():
        shutil.rmtree(backends, ignore_errors=True)
        shutil.copytree(source / "backends", backends)
        shutil.copy(source / "python_backend_stubs" / version / stub_name, backends / "python" / stub_name)
    return backends


def _environment() -> dict[str, str]:
    # The stub links libpython; pointing at this interpreter's own libdir keeps it from loading another one.
    libs = [str(_pytriton_root().parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
    return env


class TritonProcess:
    def __init__(self, model_repository: Path, ports: TritonPorts, work_dir: Path, log_file: Path):
        self.model_repository = model_repository
        self.ports = ports
        self.work_dir = work_dir
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def start(self, ready_model: str, timeout_s: float = 180.0) -> None:
        if "=" in str(self.work_dir.resolve()):
            # The Python backend starts its stubs through `env`, which reads a path with "=" as a variable
            # assignment: every model would fail to load with a confusing "No such file or directory".
            raise TritonStartError(f"the run directory {self.work_dir} must not contain '='")
        backends = prepare_backends(self.work_dir)
        command = [
            str(_pytriton_root() / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={_pytriton_root() / 'tritonserver' / 'caches'}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            # A session of its own so that Ctrl-C in a terminal reaches the gateway first, which then stops Triton.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_environment(), start_new_session=True)
        # Whoever supervises the gateway can still stop Triton by PID if the gateway dies without cleaning up.
        (self.work_dir / "triton.pid").write_text(str(self.process.pid))
        self._wait_ready(ready_model, timeout_s)

    def _wait_ready(self, model: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with {self.process.returncode}; see {self.log_file}")
            if self.model_ready(model):
                return
            time.sleep(0.25)
        self.stop()
        raise TritonStartError(f"{model} was not ready after {timeout_s:.0f}s; see {self.log_file}")

    def model_ready(self, model: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/models/{model}/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
