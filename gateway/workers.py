"""--workers N: N gateway processes on one host share its HTTP and gRPC ports over one Triton.

One gateway process is bound by its one event loop, so by one core: about 3,000 requests/s at the pipeline ceiling
(bench/results/throughput.md). A host whose encoder serves more than that (a GPU host) needs several. The parent
process (`Workers`):
- binds the HTTP and gRPC listening sockets once, and every worker accepts on those same sockets: the kernel hands a
  new connection to a worker waiting in accept, so a busy worker takes fewer (the pre-fork model of gunicorn, rather
  than SO_REUSEPORT, which spreads connections by a hash whatever each worker's load);
- starts Triton and supervises it as a single gateway does (restarting it when it stalls or a stub dies); the workers
  call it as an external Triton (--triton-url), and ride out its restarts as they would any Triton's;
- starts the workers, starts again one that exits, and on SIGTERM or SIGINT has every worker drain its requests
  (--shutdown-grace-s) before Triton is stopped;
- has every process record its metrics into one directory (gateway.ops.metrics), so that /metrics reports the host.

What a single gateway keeps in memory is split evenly, so that the host as a whole keeps the limits it was given: each
worker admits 1/N of --max-pending-texts and --max-rows-in-flight (rounded up) and grants 1/N of each token's rate
limits. Usage per token adds up in the token store, which the workers share.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import uvicorn

from gateway.ops.metrics import Metrics, forget_process, share_between_processes
from gateway.ops.settings import Settings
from gateway.transports.grpc.connections import listening_sockets
from gateway.triton.pool import TritonPool
from gateway.triton.process import TritonProcess
from gateway.triton.supervisor import TritonSupervisor

log = logging.getLogger("gateway.workers")

# How the parent tells a process it is one of its workers: its WorkerRole, as JSON. Internal, not a setting.
ROLE_ENV = "EMBED_GATEWAY_WORKER"
# A worker that exits is started again after this long, doubling while it keeps exiting, up to RESTART_MAX_S; one that
# ran RESTART_RESET_S starts from RESTART_FIRST_S again.
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
RESTART_RESET_S = 60.0
# Past its drain (--shutdown-grace-s), how long a worker has to exit before it is killed.
EXIT_SLACK_S = 10.0
LISTEN_BACKLOG = 2048
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerRole:
    """What one worker is told by its parent: the listening sockets it inherits, how many workers share the host's
    limits, and the file it creates once it serves."""

    http_fds: tuple[int, ...]
    grpc_fds: tuple[int, ...]
    workers: int
    ready_file: str

    @classmethod
    def of_this_process(cls) -> WorkerRole | None:
        encoded = os.environ.get(ROLE_ENV)
        if not encoded:
            return None
        fields = json.loads(encoded)
        return cls(tuple(fields["http_fds"]), tuple(fields["grpc_fds"]), fields["workers"], fields["ready_file"])

    def encoded(self) -> str:
        return json.dumps(asdict(self))

    def share(self, limit: int) -> int:
        """This worker's part of a host-wide limit: rounded up, so that no worker gets 0."""
        return math.ceil(limit / self.workers)

    def http_sockets(self) -> list[socket.socket]:
        return [socket.socket(fileno=fd) for fd in self.http_fds]

    def grpc_sockets(self) -> list[socket.socket]:
        sockets = [socket.socket(fileno=fd) for fd in self.grpc_fds]
        for sock in sockets:
            sock.setblocking(False)
        return sockets

    def serving(self) -> None:
        """Tells the parent this worker accepts connections now."""
        Path(self.ready_file).touch()

    def has_served(self) -> bool:
        return Path(self.ready_file).exists()

    def forget_served(self) -> None:
        Path(self.ready_file).unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the worker before it runs: the kernel sends it SIGTERM (a drain) when the parent dies, however it died, so
    that no worker outlives its parent holding the ports."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _listening(settings: Settings) -> tuple[list[socket.socket], list[socket.socket]]:
    """The HTTP socket, bound as uvicorn binds its own, and the gRPC ones, bound as the gRPC gate binds its own; both
    listening already, so that connections wait in the backlog while a worker starts (or starts again)."""
    http = uvicorn.Config("gateway", host=settings.host, port=settings.http_port, backlog=LISTEN_BACKLOG).bind_socket()
    grpc = listening_sockets(settings.host, settings.grpc_port)
    for sock in [http, *grpc]:
        sock.listen(LISTEN_BACKLOG)
        sock.set_inheritable(True)
    return [http], grpc


class Workers:
    """The parent of --workers N (see the module's docstring)."""

    def __init__(self, settings: Settings, argv: list[str], process: TritonProcess | None):
        self.settings = settings
        self.argv = argv
        self.process = process
        self.http_sockets, self.grpc_sockets = _listening(settings)
        self.http_port = self.http_sockets[0].getsockname()[1]
        self.grpc_port = self.grpc_sockets[0].getsockname()[1]
        self.directory = settings.run_dir / "workers"
        self.running: dict[int, asyncio.subprocess.Process] = {}  # by worker index
        self.stopping = asyncio.Event()

    def _role(self, index: int) -> WorkerRole:
        return WorkerRole(
            tuple(s.fileno() for s in self.http_sockets),
            tuple(s.fileno() for s in self.grpc_sockets),
            self.settings.workers,
            str(self.directory / f"{index}.ready"),
        )

    def _worker_argv(self) -> list[str]:
        # Later flags win in argparse: the worker is a single gateway that uses the parent's Triton.
        triton = self.settings.triton_url or f"127.0.0.1:{self.settings.triton_grpc_port}"
        return [*self.argv, "--workers", "1", "--triton-url", triton]

    async def _start(self, index: int) -> asyncio.subprocess.Process:
        role = self._role(index)
        role.forget_served()
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *self._worker_argv(),
            env={**os.environ, ROLE_ENV: role.encoded()},
            pass_fds=[*role.http_fds, *role.grpc_fds],
            preexec_fn=_die_with_parent,
        )
        self.running[index] = worker
        return worker

    async def _keep(self, index: int) -> None:
        """Worker `index`, started again whenever it exits while the host is not stopping, once it has served: one
        that exits before it ever served (a setting it refuses, say) ends the host's start instead."""
        delay = RESTART_FIRST_S
        role = self._role(index)
        served = False
        while True:
            started = time.monotonic()
            worker = await self._start(index)
            code = await worker.wait()
            forget_process(worker.pid)
            served = served or role.has_served()
            if self.stopping.is_set() or not served:
                return
            delay = RESTART_FIRST_S if time.monotonic() - started > RESTART_RESET_S else min(2 * delay, RESTART_MAX_S)
            log.error("gateway worker %d (pid %d) exited with %s; starting it again in %.0f s", index, worker.pid, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return

    async def _all_serving(self, kept: list[asyncio.Task]) -> bool:
        """Whether every worker came to serve (False: one gave up first, or the host is stopping)."""
        roles = [self._role(index) for index in range(self.settings.workers)]
        while not all(role.has_served() for role in roles):
            if self.stopping.is_set() or any(task.done() for task in kept):
                return False
            await asyncio.sleep(0.05)
        return True

    def _stop(self) -> None:
        """Every worker drains (SIGTERM) at once; _drain waits for them."""
        self.stopping.set()
        for worker in self.running.values():
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)

    async def _drain(self) -> None:
        deadline = self.settings.shutdown_grace_s + EXIT_SLACK_S
        waits = [worker.wait() for worker in self.running.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), deadline)
        except TimeoutError:
            for worker in self.running.values():
                if worker.returncode is None:
                    log.error("gateway worker pid %d did not exit %.0f s after SIGTERM; killing it", worker.pid, deadline)
                    worker.kill()
            await asyncio.gather(*(worker.wait() for worker in self.running.values()))

    async def run(self, connect: Callable[[], Awaitable[TritonPool]], banner: Callable[[TritonPool, int, int, str], None]) -> int:
        """Supervises Triton (when this host started it) and the workers until a stop signal; banner(pool, http_port,
        grpc_port, worker pids) is printed once every worker serves. Returns the exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop)
        # The workers first: a fork once the Triton client's threads run makes grpc warn on every start.
        kept = [asyncio.create_task(self._keep(index)) for index in range(self.settings.workers)]
        pool = await connect()
        metrics = Metrics(shared=True)  # the parent's own series: Triton's restarts
        background = [asyncio.create_task(pool.run())]
        if self.process is not None:
            (health,) = (endpoint.health for endpoint in pool.endpoints.values())
            supervisor = TritonSupervisor(
                self.process, health, self.settings.triton_stall_restart_s, on_restart=metrics.triton_restarted
            )
            background.append(asyncio.create_task(supervisor.run()))
        status = 0
        try:
            if await self._all_serving(kept):
                banner(pool, self.http_port, self.grpc_port, self._pids())
            elif not self.stopping.is_set():
                print("gateway: a worker exited before it served; see its error above", file=sys.stderr)
                status = 1
                self._stop()
            await self.stopping.wait()
            await self._drain()
        finally:
            for task in [*kept, *background]:
                task.cancel()
            await pool.close()
        return status

    def _pids(self) -> str:
        return ", ".join(str(worker.pid) for worker in self.running.values())


def start_sharing_metrics(settings: Settings) -> None:
    """The parent's first step: a fresh metrics directory, which the workers inherit through the environment."""
    directory = settings.run_dir / "metrics"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    share_between_processes(directory)
    (settings.run_dir / "workers").mkdir(parents=True, exist_ok=True)
