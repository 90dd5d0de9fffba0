"""The export CLI: precisions, GPU targets and reuse, each written to a temporary repository."""

import json
import subprocess
import sys

import onnx
import pytest

from tests.servers import ROOT


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def manifest(repository) -> dict:
    (path,) = repository.glob("*/embedding_manifest.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def gpu_repository(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    result = export("--precision", "fp16", "--target", "gpu-onnxruntime", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_int8_export_passes_validation_and_is_smaller(tmp_path):
    result = export("--precision", "int8", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cosine min" in result.stdout
    assert manifest(tmp_path)["precision"] == "int8"
    encoder = manifest(tmp_path)["steps"]["encoder"]
    fp32_size = (ROOT / "model_repository" / encoder / "1" / "model.onnx").stat().st_size
    assert (tmp_path / encoder / "1" / "model.onnx").stat().st_size < fp32_size / 2


def test_gpu_target_uses_tritons_onnxruntime_backend_on_the_gpu(gpu_repository):
    steps = manifest(gpu_repository)["steps"]
    config = (gpu_repository / steps["encoder"] / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "KIND_GPU" in config
    # Triton binds ONNX tensors by name, so the config must speak the exported names.
    for name in ("input_ids", "attention_mask", "token_embeddings", "hidden_states"):
        assert f'name: "{name}"' in config
    assert not (gpu_repository / steps["encoder"] / "1" / "model.py").exists()
    assert "KIND_CPU" in (gpu_repository / steps["tokenizer"] / "config.pbtxt").read_text()


def test_fp16_export_keeps_float32_inputs_and_outputs(gpu_repository):
    model = onnx.load(str(gpu_repository / manifest(gpu_repository)["steps"]["encoder"] / "1" / "model.onnx"))
    assert {i.data_type for i in model.graph.initializer if len(i.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}


def test_tensorrt_target_writes_a_plan_config(tmp_path):
    result = export("--target", "gpu-tensorrt", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'platform: "tensorrt_plan"' in (tmp_path / manifest(tmp_path)["steps"]["encoder"] / "config.pbtxt").read_text()
    assert "trtexec" in result.stdout


def test_fp16_for_the_cpu_target_is_refused():
    result = export("--precision", "fp16")
    assert result.returncode == 2
    assert "GPU" in result.stderr


def test_second_run_reuses_the_export(tmp_path):
    assert export("--output-dir", str(tmp_path)).returncode == 0
    again = export("--output-dir", str(tmp_path))
    assert again.returncode == 0 and "up to date" in again.stdout
