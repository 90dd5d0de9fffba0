"""A real Prometheus for end-to-end tests: scrapes the given targets with a throwaway config and storage and answers
PromQL through its HTTP API, so that a test checks what a Prometheus really makes of the gateway's /metrics.

Debian's `prometheus` package comes from `bin/setup --checks`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.debian_packages import installed
from harness.servers import free_ports

PACKAGE = "prometheus"
BINARY = "/usr/bin/prometheus"

# Local requests must not go through an http_proxy the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusServer:
    """A prometheus process scraping `targets` (job name -> ["127.0.0.1:PORT", ...]) every scrape_interval_s, with a
    bearer token for the jobs named in `bearer_tokens`. Use it as a context manager: leaving it stops the process
    group and deletes the storage."""

    def __init__(
        self,
        targets: dict[str, list[str]],
        scrape_interval_s: float = 1,
        bearer_tokens: dict[str, str] | None = None,
        metrics_path: str = "/metrics",
        ready_timeout_s: float = 60,
    ):
        self.targets_by_job = targets
        self.scrape_interval_s = scrape_interval_s
        self.bearer_tokens = bearer_tokens or {}
        self.metrics_path = metrics_path
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self.directory: Path | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.directory / "prometheus.log"

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> PrometheusServer:
        binary = installed(PACKAGE, BINARY)
        self.directory = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
        config = self.directory / "prometheus.yml"
        # JSON is YAML, so the config needs no YAML library.
        config.write_text(json.dumps(self._config(), indent=2))
        try:
            # The free port may be taken by someone else before prometheus binds it; then it is tried on another.
            for _ in range(3):
                (self.port,) = free_ports(1)
                self._launch(binary, config)
                if self._wait_ready():
                    return self
        except BaseException:
            self.stop()
            raise
        error = RuntimeError(f"prometheus found no free port:\n{self.log_tail()}")
        self.stop()
        raise error

    def _config(self) -> dict[str, Any]:
        interval = f"{round(self.scrape_interval_s * 1000)}ms"
        jobs = []
        for job, addresses in self.targets_by_job.items():
            scrape: dict[str, Any] = {"job_name": job, "metrics_path": self.metrics_path}
            scrape["static_configs"] = [{"targets": addresses}]
            if job in self.bearer_tokens:
                scrape["authorization"] = {"credentials": self.bearer_tokens[job]}
            jobs.append(scrape)
        # A scrape may not take longer than the interval between scrapes (the default timeout, 10 s, would).
        timing = {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval}
        return {"global": timing, "scrape_configs": jobs}

    def _launch(self, binary: str, config: Path) -> None:
        self._end_process()
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        # Each try writes a new log, so that its tail tells why this try failed.
        with open(self.log_file, "wb") as log:
            # A process group of its own, so that stop() reaches anything it may start too.
            self.process = subprocess.Popen(
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self) -> bool:
        """True once /-/ready answers 200; False when prometheus exited because its port was taken."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "address already in use" in self.log_tail():
                    return False
                raise RuntimeError(f"prometheus exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                with _OPENER.open(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass  # not listening yet, or 503 while it replays its (empty) write-ahead log
            time.sleep(0.1)
        raise RuntimeError(f"prometheus was not ready within {self.ready_timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 4000) -> str:
        if self.directory is None or not self.log_file.exists():
            return "(no log)"
        return self.log_file.read_text(errors="replace")[-characters:]

    def _api(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with _OPENER.open(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            # A bad query is answered 400 with the parser's message in the body: that message is what helps.
            body = json.loads(error.read() or b"{}")
            raise RuntimeError(f"{path} {params}: {error.code} {body.get('error', '')}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """The instant vector (or scalar) `promql` evaluates to now: data.result of /api/v1/query."""
        return self._api("/api/v1/query", query=promql)["result"]

    def wait_for(self, promql: str, predicate: Callable[[list[dict]], bool], timeout_s: float = 20) -> list[dict]:
        """The first result of `promql` that satisfies predicate, polled until timeout_s has passed. Allow for some
        5 s before the first scrape: Prometheus passes newly discovered targets on to its scrapers every 5 s."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{promql} gave {result} after {timeout_s} s; targets: {self.targets()}")
            time.sleep(min(0.2, self.scrape_interval_s / 2))

    def targets(self) -> list[dict]:
        """The active targets, each with its labels, scrapeUrl, health ("up", "down", "unknown") and lastError."""
        return self._api("/api/v1/targets", state="active")["activeTargets"]

    def _end_process(self) -> None:
        if self.process is None:
            return
        for signum, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                break  # the whole group is gone
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL when it has not ended within 10 s, then the storage goes."""
        self._end_process()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
