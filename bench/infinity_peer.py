"""infinity-emb, the server users would otherwise pick, as the benchmark's peer: its own venv, its own process.

infinity-emb 0.0.78 needs sentence-transformers < 4, uvicorn < 0.33 and typer < 0.13 (.venv has newer), so it
lives in `.venv-infinity`, installed from `bench/infinity_requirements.lock` and rebuilt only when the lock changes. It
serves the same local model directory as the service, with its torch engine on CPU in float32, offline.

The endpoint is OpenAI-shaped, with no `/v1` prefix (`--url-prefix ""`):

    POST /embeddings   {"model": "all-minilm-l6-v2", "input": ["text", ...]}
    -> {"object": "list", "data": [{"object": "embedding", "embedding": [384 floats], "index": 0}, ...],
        "model": "all-minilm-l6-v2", "usage": {"prompt_tokens": N, "total_tokens": N}, "id": ..., "created": ...}

`input` may also be a single string. `"encoding_format": "base64"` is accepted too: each `embedding` is then the
base64 of the little-endian float32 bytes. The vectors come back L2-normalised. With one model deployed it
answers whatever `model` names, so a wrong name is not caught. `GET /health` answers 200 once the model is
loaded and warmed up; `GET /models` lists the served name.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

VERSION = "0.0.78"
SERVED_NAME = "all-minilm-l6-v2"
PATH = "/embeddings"  # body: {"model": SERVED_NAME, "input": [...]}; see the module docstring
LOCK = Path(__file__).resolve().parent / "infinity_requirements.lock"


def ensure_installed(root: Path, progress: Callable[[str], None] = print) -> Path:
    """Returns the python of `root/.venv-infinity`, first (re)building that venv from the lock if needed.

    It is rebuilt when it has no python or when the lock's sha256 differs from the one recorded in
    `.venv-infinity/.requirements.sha256` at the last install, the pattern bin/setup uses for `.venv`.
    """
    venv = root / ".venv-infinity"
    python = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    wanted = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    if not python.exists() or not stamp.exists() or stamp.read_text().strip() != wanted:
        progress(f"installing infinity-emb {VERSION} into {venv} (about 1.5 minutes the first time)")
        # --clear: a rebuilt venv holds exactly the lock, nothing left over from the previous one.
        subprocess.run(["python3.11", "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--progress-bar", "off"]
        # torch first and bare: the pin then resolves to the local CPU wheel, not the CUDA build.
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "-r", str(LOCK)], check=True)
        stamp.write_text(wanted)
    return python


def start_infinity(python: Path, model_dir: Path, port: int, log_path: Path, batch_size: int = 32) -> subprocess.Popen:
    """Starts infinity-emb on 127.0.0.1:`port` serving `model_dir` as SERVED_NAME; its output goes to `log_path`.

    `python` is the one ensure_installed returns. The server needs a few seconds to load and warm up the
    model: follow with wait_ready, and end it with stop.
    """
    environment = {
        **os.environ,
        # No hub, no telemetry: the model is a local directory and the machine has no network. Without
        # these it would send a startup event to posthog (INFINITY_ANONYMOUS_USAGE_STATS / DO_NOT_TRACK).
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "DO_NOT_TRACK": "1",
        # It creates `.infinity_cache/` under INFINITY_HOME, else under HF_HOME, else in its working directory
        # (the repository); beside the log it stays out of the tree.
        "INFINITY_HOME": str(log_path.parent),
    }
    command = [
        str(python),
        "-m",
        "infinity_emb.cli",
        "v2",
        "--model-id",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batch-size",
        str(batch_size),
        # Flags win over INFINITY_* variables the caller's environment may hold. A result cache would answer
        # repeated benchmark texts without computing them (its --help claims it is on by default; it is off).
        "--no-vector-disk-cache",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--url-prefix",
        "",
        # Its default logs every request; at these rates that would cost it CPU the service does not spend.
        "--log-level",
        "warning",
    ]
    with open(log_path, "wb") as log:
        # Its own session, so stop() can signal the server and anything it spawned as one group.
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Returns once `url`/health answers 200; raises if the server exits first or is not ready in `timeout_s`."""
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
    """Ends the server and its process group: SIGTERM (it shuts down in about a second), SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
