"""A throwaway Redis for end-to-end tests: redis-server on a free port with no persistence, stopped by PID.

Debian's `redis-server` package comes from `bin/setup --bench` or `--checks`.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from harness.debian_packages import installed
from harness.servers import free_ports

PACKAGE = "redis-server"
BINARY = "/usr/bin/redis-server"
START_TIMEOUT_S = 20


class RedisServer:
    """Use as a context manager: leaving it stops the server and deletes its directory."""

    def __init__(self) -> None:
        self.binary = installed(PACKAGE, BINARY)
        self.directory = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def start(self) -> None:
        """Starts on a free port the first time, on the same port again after kill(), so that clients reconnect."""
        if not self.port:
            (self.port,) = free_ports(1)
        # No RDB snapshots or AOF: throwaway data, and a restart after kill() starts empty, as a crashed cache would.
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
        ]
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """A crash: SIGKILL, nothing flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, characters: int = 3000) -> str:
        log = self.directory / "redis.log"
        return log.read_text(errors="replace")[-characters:] if log.exists() else ""
