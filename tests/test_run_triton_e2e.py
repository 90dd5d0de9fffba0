"""python -m deploy.images.run_triton: Triton alone in the foreground, as the CPU image's Triton pods run it.

Each test starts run_triton on the exported model repository with free ports, configured only through the EMBED_*
variables, and checks what the pod depends on: Triton listens on every address, SIGTERM stops it and exits 0, and a
dead Python-backend stub (which Triton itself never notices) makes run_triton exit 1 so that the container restarts.
After the exit no process of Triton's group and no /dev/shm region of its stubs is left; whatever happens, the
run_triton process and Triton's process group are ended by PID when the test is over.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from harness.servers import MODEL_REPOSITORY, ROOT, free_ports
from repository_contract.naming import step_name

READY_TIMEOUT_S = 120
EXIT_TIMEOUT_S = 30
# Stubs outlive tritonserver by the moment init takes to reap them once run_triton has killed the group.
REAP_TIMEOUT_S = 5

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(READY_TIMEOUT_S + EXIT_TIMEOUT_S + 60)]

# Direct connections only: a proxy in the environment must not answer for Triton.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class RunTriton:
    process: subprocess.Popen
    run_dir: Path
    log: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    started_at: float
    # tritonserver's pid, which is also its process group's id (it runs in a session of its own).
    pgid: int | None = None
    ready_s: float | None = None
    regions: set[str] = field(default_factory=set)

    def stubs(self) -> list[psutil.Process]:
        children = psutil.Process(self.pgid).children()
        return [stub for stub in children if any("triton_python_backend_stub" in arg for arg in stub.cmdline())]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> tuple[int, float]:
        """run_triton's exit code and the seconds it took, or a failure if it is still running after timeout_s."""
        since = time.monotonic()
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run_triton still running {timeout_s} s later:\n{self.log_tail()}")
        return code, time.monotonic() - since

    def wait_log(self, text: str, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"no {text!r} in run_triton's output after {timeout_s} s:\n{self.log_tail()}"
            time.sleep(0.05)

    def leftovers(self) -> tuple[list[str], float]:
        """What of Triton is left once run_triton has exited (waiting up to REAP_TIMEOUT_S), and the seconds waited."""
        since = time.monotonic()
        while True:
            left = []
            try:
                os.killpg(self.pgid, 0)
                left.append(f"process group {self.pgid}: " + ", ".join(_group_members(self.pgid)))
            except ProcessLookupError:
                pass
            left += [f"/dev/shm/{region}" for region in sorted(self.regions) if Path("/dev/shm", region).exists()]
            waited = time.monotonic() - since
            if not left or waited > REAP_TIMEOUT_S:
                return left, waited
            time.sleep(0.05)

    def end(self) -> None:
        """Ends run_triton and Triton's process group by PID, whatever state they are in, and unlinks the stubs' regions."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        pgid = self.pgid or _read_pid(self.run_dir)
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for region in self.regions:
            Path("/dev/shm", region).unlink(missing_ok=True)


def _read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / "triton.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _group_members(pgid: int) -> list[str]:
    members = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(process.info["pid"]) == pgid:
                command = " ".join(process.info["cmdline"] or [])[:100]
                members.append(f"pid {process.info['pid']} ({process.info['status']}) {command}")
    return members


def _ready(port: int) -> bool:
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class _PortTaken(RuntimeError):
    pass


def _launch(run_dir: Path, extra_env: dict[str, str] | None = None) -> RunTriton:
    """run_triton once its Triton is ready; ended here if it is not (the caller ends it otherwise)."""
    http_port, grpc_port, metrics_port = free_ports(3)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Only the settings under test: EMBED_* variables of the caller's shell must not change what runs.
    env = {name: value for name, value in os.environ.items() if not name.startswith("EMBED_")}
    env.update(
        PYTHONPATH=str(ROOT),
        EMBED_MODEL_REPOSITORY=str(MODEL_REPOSITORY),
        EMBED_TRITON_HTTP_PORT=str(http_port),
        EMBED_TRITON_GRPC_PORT=str(grpc_port),
        EMBED_TRITON_METRICS_PORT=str(metrics_port),
        EMBED_RUN_DIR=str(run_dir / "run"),
        **(extra_env or {}),
    )
    log = run_dir / "run_triton.log"
    # Appending, as Triton does when it opens /dev/stdout: neither overwrites the other's lines.
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.images.run_triton"], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    run = RunTriton(process, run_dir / "run", log, http_port, grpc_port, metrics_port, time.monotonic())
    try:
        deadline = run.started_at + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            # Known as soon as the file is written, so that a start that fails still has its group ended.
            run.pgid = run.pgid or _read_pid(run.run_dir)
            if process.poll() is not None:
                tail = run.log_tail()
                if "already in use" in tail or "could not listen" in tail:
                    raise _PortTaken(tail)
                raise AssertionError(f"run_triton exited with {process.returncode} before Triton was ready:\n{tail}")
            if _ready(http_port):
                run.ready_s = time.monotonic() - run.started_at
                run.pgid = run.pgid or _read_pid(run.run_dir)
                assert run.pgid is not None, f"no {run.run_dir / 'triton.pid'} while Triton is ready"
                run.regions = {
                    arg for stub in run.stubs() for arg in stub.cmdline() if arg.startswith("triton_python_backend_shm")
                }
                assert run.regions, "Triton is ready but no Python-backend stub was found"
                return run
            time.sleep(0.1)
        raise AssertionError(f"Triton not ready {READY_TIMEOUT_S} s after run_triton started:\n{run.log_tail()}")
    except BaseException:
        run.end()
        raise


@contextlib.contextmanager
def running_triton(directory: Path, extra_env: dict[str, str] | None = None):
    """run_triton with its Triton ready, on free ports (new ones if another process took them first); ended by PID after."""
    for attempt in range(3):
        try:
            run = _launch(directory / f"attempt-{attempt}", extra_env)
            break
        except _PortTaken:
            if attempt == 2:
                raise
    try:
        yield run
    finally:
        run.end()


def _listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def _external_ipv4() -> str | None:
    """An address of this machine other than loopback, from which a caller in another pod would reach Triton."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def test_it_serves_on_all_addresses_and_sigterm_stops_triton_and_exits_0(tmp_path):
    with running_triton(tmp_path) as run:
        http_addresses, grpc_addresses = _listening_addresses(run.http_port), _listening_addresses(run.grpc_port)
        assert "0.0.0.0" in http_addresses, f"Triton's HTTP port {run.http_port} listens on {http_addresses}"
        # gRPC binds 0.0.0.0 as one dual-stack socket on [::], which accepts IPv4 too (checked below).
        assert grpc_addresses & {"0.0.0.0", "::"}, f"Triton's gRPC port {run.grpc_port} listens on {grpc_addresses}"
        external = _external_ipv4()
        if external is not None:
            import tritonclient.grpc as tritongrpc

            with _NO_PROXY.open(f"http://{external}:{run.http_port}/v2/health/ready", timeout=5) as response:
                assert response.status == 200
            client = tritongrpc.InferenceServerClient(f"{external}:{run.grpc_port}", channel_args=[("grpc.enable_http_proxy", 0)])
            try:
                assert client.is_server_ready(client_timeout=5)
            finally:
                client.close()

        run.process.send_signal(signal.SIGTERM)
        code, exit_s = run.wait_exit()
        left, reaped_s = run.leftovers()
        print(
            f"[run_triton] SIGTERM: ready {run.ready_s:.1f} s after start, exited {code} {exit_s:.1f} s after SIGTERM, "
            f"group gone {reaped_s:.2f} s after; listening HTTP {sorted(http_addresses)} gRPC {sorted(grpc_addresses)}, "
            f"reached on {external or 'no external address'}"
        )
        assert code == 0, run.log_tail()
        assert left == [], f"left after run_triton exited: {left}"


def test_the_instances_of_each_encoder_map_one_copy_of_its_packed_weights(tmp_path, manifest):
    """Every session of every CPU encoder instance maps the one graph with packed weights written into the run
    directory, where each used to pack a private copy (bench/results/levers.md, "Weights shared by every session")."""
    with running_triton(tmp_path) as run:
        mapped: dict[Path, set[int]] = {}
        for stub in run.stubs():
            for region in stub.memory_maps():
                if region.path.endswith("/model.data"):
                    mapped.setdefault(Path(region.path).resolve(), set()).add(stub.pid)
        for role in ("encoder", "controlled-encoder"):
            name = manifest["steps"][role]
            (written,) = [p for p in (run.run_dir / "packed-graphs" / name).iterdir() if p.name != ".lock"]
            config = (MODEL_REPOSITORY / name / "config.pbtxt").read_text()
            instances = int(re.search(r"instance_group \[\{ count: (\d+)", config).group(1))
            stubs = mapped.get((written / "model.data").resolve(), set())
            print(f"[run_triton] {name}: {len(stubs)} stubs map {written.name}/model.data")
            assert len(stubs) == instances, f"{name}: {instances} instances, mapped by {stubs}; all mapped: {mapped}"


def test_a_dead_stub_makes_it_exit_1(tmp_path, model_name):
    with running_triton(tmp_path) as run:
        # run_triton watches the stubs still alive once its own readiness check has passed, which it logs. A stub killed
        # between Triton's readiness and that moment is never noticed (TritonProcess.start drops dead stubs from those
        # it watches), so the kill waits for the line.
        run.wait_log("Triton serves")
        encoder = step_name(model_name, "encoder")
        encoders = [stub for stub in run.stubs() if f"/{encoder}/1/model.py" in " ".join(stub.cmdline())]
        assert encoders, f"no stub of {encoder} among {[' '.join(s.cmdline())[:120] for s in run.stubs()]}"
        victim = encoders[0].pid
        os.kill(victim, signal.SIGKILL)
        code, exit_s = run.wait_exit()
        left, reaped_s = run.leftovers()
        print(
            f"[run_triton] encoder stub killed: ready {run.ready_s:.1f} s after start, exited {code} {exit_s:.1f} s after "
            f"the kill, group gone {reaped_s:.2f} s after"
        )
        assert code == 1, run.log_tail()
        assert f"stub(s) died (pid {victim})" in run.log.read_text(errors="replace"), run.log_tail()
        assert left == [], f"left after run_triton exited: {left}"
