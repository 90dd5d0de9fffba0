"""infinity-emb, the server users would otherwise pick, as the benchmark's peer: its own venv, its own process.

infinity-emb 0.0.78 needs sentence-transformers < 4 (ours is 5.7), so it lives in `.venv-infinity`, installed
from `bench/infinity_requirements.lock` and refreshed only when the lock changes. It serves the same local
model directory with its torch engine on CPU, offline, at OpenAI-shaped `POST /embeddings`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

VERSION = "0.0.78"
SERVED_NAME = "all-minilm-l6-v2"
PATH = "/embeddings"  # OpenAI-shaped body: {"model": SERVED_NAME, "input": [...]}
LOCK = Path(__file__).resolve().parent / "infinity_requirements.lock"


def ensure_installed(root: Path, progress: Callable[[str], None] = print) -> Path:
    """The venv's python; (re)installs when the lock's hash differs from the one recorded at the last install."""
    venv = root / ".venv-infinity"
    stamp = venv / ".requirements.sha256"
    wanted = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != wanted:
        progress(f"installing infinity-emb {VERSION} into {venv} (a few minutes the first time)")
        subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--progress-bar", "off"]
        # torch first and bare: the pin then resolves to the local CPU wheel, not the CUDA build.
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "-r", str(LOCK)], check=True)
        stamp.write_text(wanted)
    return venv / "bin" / "python"


def start_infinity(python: Path, model_dir: Path, port: int, log_path: Path, batch_size: int = 32) -> subprocess.Popen:
    environment = {
        **os.environ,
        # No hub, no telemetry: the model is a local directory and the machine has no network.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "DO_NOT_TRACK": "1",
    }
    command = [
        str(python), "-m", "infinity_emb.cli", "v2",
        "--model-id", str(model_dir), "--served-model-name", SERVED_NAME,
        "--engine", "torch", "--device", "cpu", "--batch-size", str(batch_size),
        "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "",
        # Its default logs every request; at these rates that would cost it CPU the service does not spend.
        "--log-level", "warning",
    ]
    log = open(log_path, "wb")
    # Its own session, so stop() can signal the server and anything it spawned as one group.
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"infinity-emb exited with {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"infinity-emb not ready after {timeout_s}s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
