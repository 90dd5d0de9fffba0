"""The gateway refuses to start on a repository it cannot serve, saying what to do, before it starts Triton."""

import json
import shutil
import subprocess
import sys

import pytest

from harness.servers import MODEL_REPOSITORY, ROOT

pytestmark = pytest.mark.e2e


def gateway(repository) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", f"--model-repository={repository}", "--http-port=0", "--grpc-port=0", "--no-auth"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_empty_repository_says_to_export_first(tmp_path):
    done = gateway(tmp_path)
    assert done.returncode == 2
    assert "run `python -m export` first" in done.stderr and "Traceback" not in done.stderr


def test_a_manifest_from_before_attention_controls_says_to_export_again(tmp_path, manifest):
    old = {key: value for key, value in manifest.items() if key != "controls"}
    (tmp_path / manifest["name"]).mkdir()
    (tmp_path / manifest["name"] / "embedding_manifest.json").write_text(json.dumps(old))
    shutil.copytree(MODEL_REPOSITORY / manifest["steps"]["tokenizer"], tmp_path / manifest["steps"]["tokenizer"])
    done = gateway(tmp_path)
    assert done.returncode == 2
    assert f"export {manifest['name']} again" in done.stderr and "Traceback" not in done.stderr
