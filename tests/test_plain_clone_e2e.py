"""A plain clone is the product: `git clone` into an empty directory, then the README's serve command.

The clone sits alone in a temporary directory, so the set-up and the export can read nothing beside it (no
../shared, no environment of this checkout). It is cloned from this checkout's last commit, which in CI is main.
`bin/serve` installs the clone's own environments (about 3 minutes), exports the default model and serves it; the
test then checks /v1/embeddings against sentence-transformers, and runs the clone's .venv/bin/perf_analyzer on the
Triton it started, with input data recorded by the README's command. Every process of the clone is stopped by its
process group, and the clone is deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from export.datasets import sts_sentences
from export.source_model import default_model_path
from gateway.__main__ import READY_LINE
from harness.servers import ROOT, free_ports

pytestmark = pytest.mark.e2e

SETUP_TIMEOUT_S = 1200
TEXTS = 16


@pytest.fixture(scope="module")
def clone():
    parent = Path(tempfile.mkdtemp(prefix="plain-clone-"))
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(parent / "repo")], check=True, timeout=120)
        assert sorted(p.name for p in parent.iterdir()) == ["repo"]
        yield parent / "repo"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _clean_environment() -> dict[str, str]:
    """This process's environment without what would point the clone at this checkout's Python environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT)))
    return env


@pytest.fixture(scope="module")
def served(clone):
    """`bin/serve` in the clone, on free ports, until its gateway reports ready; then the whole group is stopped."""
    http, grpc, t_http, t_grpc, t_metrics = free_ports(5)
    log = clone.parent / "serve.log"
    command = [
        "bin/serve",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--triton-http-port={t_http}",
        f"--triton-grpc-port={t_grpc}",
        f"--triton-metrics-port={t_metrics}",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=clone, env=_clean_environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while READY_LINE not in log.read_text(errors="replace"):
            assert process.poll() is None, f"bin/serve exited {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
            assert time.monotonic() < deadline, (
                f"bin/serve not ready after {SETUP_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-4000:]}"
            )
            time.sleep(1)
        yield {"http": f"http://127.0.0.1:{http}", "triton_grpc": f"127.0.0.1:{t_grpc}", "log": log.read_text(errors="replace")}
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to bin/serve's group (the gateway stops its Triton), SIGKILL to whatever is left after 60 s."""
    group = process.pid
    try:
        os.killpg(group, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + 10
    while _group_members(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_members(group):
        os.killpg(group, signal.SIGKILL)
    process.wait(timeout=10)


def _group_members(group: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == group and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def test_bin_serve_from_a_plain_clone_serves_sentence_transformers_vectors(served):
    assert re.search(r"Triton\s+127\.0\.0\.1:\d+ \(gRPC\)", served["log"]), served["log"][-2000:]
    from sentence_transformers import SentenceTransformer

    texts = sts_sentences()[:TEXTS]
    response = requests.post(f"{served['http']}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": texts}, timeout=60)
    assert response.status_code == 200, response.text
    got = np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
    expected = SentenceTransformer(str(default_model_path()), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_the_clones_perf_analyzer_measures_its_triton_with_every_answer_checked(clone, served):
    input_data = clone.parent / "recorded.json"
    subprocess.run(
        [
            ".venv/bin/python",
            "-m",
            "bench.perf_analyzer.make_input_data",
            "--triton",
            served["triton_grpc"],
            "--count",
            "64",
            "--out",
            str(input_data),
        ],
        cwd=clone,
        env=_clean_environment(),
        check=True,
        timeout=120,
    )
    done = subprocess.run(
        [
            ".venv/bin/perf_analyzer",
            "-m",
            "all-minilm-l6-v2",
            "-i",
            "grpc",
            "-u",
            served["triton_grpc"],
            "--input-data",
            str(input_data),
            "--async",
            "--max-threads=8",
            "--concurrency-range=8",
            "--request-count=200",
        ],
        cwd=clone,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"Request count: 200\b", done.stdout) and re.search(r"Throughput: [\d.]+ infer/sec", done.stdout), (
        done.stdout
    )
    assert "error" not in done.stdout.lower()
