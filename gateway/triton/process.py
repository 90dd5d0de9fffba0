"""Starts the Triton server shipped in the nvidia-pytriton wheel and owns it: its process group, its stubs, its /dev/shm.

Triton runs in a process group of its own with its Python-backend stubs, so that ending the group leaves no
orphan, and the shared-memory regions the stubs were started with are unlinked after the group is gone: a
tritonserver killed with -9 otherwise leaves stubs holding hundreds of MB and segments in /dev/shm.

Triton's APIs that change what it serves or where it writes are restricted to callers that send the admin key (see
RESTRICTED_APIS); the gateway itself never calls them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
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

import psutil

log = logging.getLogger("gateway.triton")

SHM_DIR = Path("/dev/shm")
# The stub's command line names the region it shares with tritonserver: `stub <model.py> <region> ...`.
_STUB_SHM_ARG = 2

# Triton's HTTP and gRPC APIs that only an operator may call, with the admin key in header ADMIN_KEY_HEADER (gRPC
# metadata ADMIN_KEY_GRPC_METADATA: Triton's gRPC front end expects the key's name with its own prefix): loading and
# unloading models (an unload is an outage; a load from a crafted repository runs its code), registering shared memory
# (a region Triton then reads and writes), and trace and log settings (which name files Triton writes). Left open, as
# the gateway, tritonclient and perf_analyzer need them: inference, health, metadata, model config and statistics.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_KEY_HEADER = "admin-key"
ADMIN_KEY_GRPC_METADATA = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
# The key goes on tritonserver's command line and in HTTP headers and gRPC metadata: no separators of Triton's flag
# syntax (",", ":", "="), nothing a header cannot carry, and long enough not to be guessed.
_ADMIN_KEY = re.compile(r"[A-Za-z0-9._~-]{16,}")


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


def _environment(work_dir: Path) -> dict[str, str]:
    # The stub links libpython; pointing at this interpreter's own libdir keeps it from loading another one.
    libs = [str(_pytriton_root().parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
    # The gpu-tensorrt-ep encoder caches its engines here: built once per run directory, not on every start.
    env.setdefault("EMBED_TENSORRT_CACHE", str(work_dir.resolve() / "tensorrt-engines"))
    # The CPU encoders write the graphs whose packed weights their sessions share here, once per run directory.
    env.setdefault("EMBED_PACKED_GRAPHS", str(work_dir.resolve() / "packed-graphs"))
    return env


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ExitWatch:
    """Which of some processes have exited, in one poll(2) over their pidfds.

    The supervisor asks ten times a second. Asking psutil instead read two /proc files per stub each time, on the
    gateway's event loop: the gateway idled at 14 ms of CPU a second with it and 9 with this (bench/results/levers.md,
    "The supervisor's stub watch"). A pidfd
    becomes readable when its process exits, zombie or reaped, and names that process only, so a PID reused
    since cannot pass for a lost stub.
    """

    def __init__(self, processes: list[psutil.Process]):
        self._poll = select.poll()
        self._pids: dict[int, int] = {}
        self._gone: list[int] = []
        for process in processes:
            try:
                descriptor = os.pidfd_open(process.pid)
            except ProcessLookupError:
                self._gone.append(process.pid)
                continue
            # Opened after psutil saw it: the process may have ended since, or the PID name another one (psutil
            # compares start times). Either way it is lost now, and counted once, not again when its pidfd polls.
            if not _alive(process):
                os.close(descriptor)
                self._gone.append(process.pid)
                continue
            self._pids[descriptor] = process.pid
            self._poll.register(descriptor, select.POLLIN)

    def exited(self) -> list[int]:
        """The PIDs of the watched processes that have exited."""
        return self._gone + [self._pids[descriptor] for descriptor, _ in self._poll.poll(0)]

    def close(self) -> None:
        for descriptor in self._pids:
            os.close(descriptor)
        self._pids = {}


class TritonProcess:
    def __init__(
        self,
        model_repository: Path,
        models: list[str],
        ports: TritonPorts,
        work_dir: Path,
        log_file: Path,
        address: str = "127.0.0.1",
        admin_key: str | None = None,
    ):
        """admin_key: what RESTRICTED_APIS require; None draws a random one. Either way it is written, readable by this
        user only, to admin_key_file while Triton runs, which is how an operator gets a key drawn here."""
        self.admin_key = admin_key or secrets.token_urlsafe(32)
        self.model_repository = model_repository
        self.models = models
        self.ports = ports
        self.work_dir = work_dir
        self.log_file = log_file
        # Where HTTP and gRPC listen: loopback for the gateway's own Triton, all addresses for Triton in a pod of its own.
        self.address = address
        self.process: subprocess.Popen | None = None
        self._stubs: list[psutil.Process] = []
        self._serving = ExitWatch([])
        self._shm_regions: set[str] = set()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def pid_file(self) -> Path:
        return self.work_dir / "triton.pid"

    @property
    def admin_key_file(self) -> Path:
        return self.work_dir / "triton-admin-key"

    def start(self, timeout_s: float = 180.0) -> None:
        """Starts tritonserver and returns once every model is ready, with its stubs recorded."""
        if "=" in str(self.work_dir.resolve()):
            # The Python backend starts its stubs through `env`, which reads a path with "=" as a variable
            # assignment: every model would fail to load with a confusing "No such file or directory".
            raise TritonStartError(f"the run directory {self.work_dir} must not contain '='")
        if not _ADMIN_KEY.fullmatch(self.admin_key):
            raise TritonStartError("the Triton admin key must be at least 16 characters, each a letter, a digit or one of ._~-")
        backends = prepare_backends(self.work_dir)
        command = [
            str(_pytriton_root() / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            # Only the models the manifests name: whatever else is left in the repository (a model removed by
            # hand, steps of an older layout) is never loaded, so removing a model and restarting drops it.
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.models),
            f"--backend-directory={backends}",
            f"--cache-directory={_pytriton_root() / 'tritonserver' / 'caches'}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
            # The gateway's own grace period covers calls in flight; Triton's default 30 s would only add to it.
            "--exit-timeout-secs=5",
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._write_admin_key()
        with open(self.log_file, "ab") as log_file:
            # A session (and process group) of its own: Ctrl-C in a terminal reaches the gateway first, which
            # then stops Triton, and the stubs Triton forks stay in the group, so one killpg ends them all.
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=_environment(self.work_dir), start_new_session=True
            )
        # Whoever supervises the gateway can still end the group by PID if the gateway dies without cleaning up.
        self.pid_file.write_text(str(self.process.pid))
        self._stubs, self._shm_regions = [], set()
        self._wait_ready(self.process, timeout_s)
        self._record_stubs(self.process.pid)
        # Watched from now on: the stubs serving the ready models (one a loading step started and ended is not lost).
        self._serving = ExitWatch([stub for stub in self._stubs if _alive(stub)])

    def _write_admin_key(self) -> None:
        # Created afresh with mode 0600: a file left by someone else, or with wider permissions, is not reused.
        self.admin_key_file.unlink(missing_ok=True)
        descriptor = os.open(self.admin_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as key_file:
            key_file.write(self.admin_key + "\n")

    def _wait_ready(self, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                code = process.returncode
                self.stop()
                raise TritonStartError(f"tritonserver exited with {code}; see {self.log_file}")
            # Recorded while loading too: a start that fails must still leave no stub and no region behind.
            self._record_stubs(process.pid)
            if self.server_ready():
                return
            time.sleep(0.1)
        self.stop()
        raise TritonStartError(f"Triton's models were not ready after {timeout_s:.0f}s; see {self.log_file}")

    def server_ready(self) -> bool:
        """Triton's own view: with strict readiness, every model in the repository is ready."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _record_stubs(self, pid: int) -> None:
        """Adds the stubs tritonserver (pid) has now, and their regions, to those recorded (none are forgotten)."""
        try:
            children = psutil.Process(pid).children()
        except psutil.NoSuchProcess:
            return
        known = {stub.pid for stub in self._stubs}
        self._stubs += [child for child in children if child.pid not in known]
        for stub in children:
            try:
                arguments = stub.cmdline()
            except psutil.NoSuchProcess:
                continue
            if len(arguments) > _STUB_SHM_ARG and arguments[_STUB_SHM_ARG].startswith("triton_python_backend_shm"):
                self._shm_regions.add(arguments[_STUB_SHM_ARG])

    def fault(self) -> str | None:
        """Why this Triton can no longer serve (it exited, or a stub it will never replace died), or None."""
        if self.process is None:
            return "not started"
        if self.process.poll() is not None:
            return f"tritonserver exited with {self.process.returncode}"
        lost = self._serving.exited()
        if lost:
            return f"{len(lost)} Python-backend stub(s) died (pid {', '.join(str(pid) for pid in lost)})"
        return None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ends tritonserver and every stub, then unlinks their shared memory. SIGTERM first unless timeout_s is 0."""
        if self.process is None:
            return
        group = self.process.pid
        if self.process.poll() is None:
            self._record_stubs(group)
        if self.process.poll() is None and timeout_s > 0:
            try:
                # SIGCONT too: a stopped Triton would otherwise never see the SIGTERM.
                os.killpg(group, signal.SIGTERM)
                os.killpg(group, signal.SIGCONT)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.info("tritonserver did not stop within %.0f s of SIGTERM; killing its process group", timeout_s)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        # Stubs that had already left the group (none should) are ended one by one.
        for stub in self._stubs:
            try:
                stub.kill()
                stub.wait(timeout=5)
            except psutil.NoSuchProcess:
                pass
        for region in self._shm_regions:
            (SHM_DIR / region).unlink(missing_ok=True)
        self._serving.close()
        self._stubs, self._serving, self._shm_regions = [], ExitWatch([]), set()
        self.pid_file.unlink(missing_ok=True)
        self.admin_key_file.unlink(missing_ok=True)
