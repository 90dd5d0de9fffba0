"""The export CLI: precisions, GPU targets and reuse, each written to a temporary repository."""

import json
import subprocess
import sys

import onnx
import pytest

from harness.servers import ROOT
from repository_contract.tensors import (
    ATTENTION_MASK,
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    HIDDEN_STATES,
    INPUT_IDS,
    TOKEN_EMBEDDINGS,
    onnx_name,
)
from tests.test_export_gpu import trtexec_commands


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def manifest(repository) -> dict:
    (path,) = repository.glob("*/embedding_manifest.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def gpu_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    result = export("--precision", "fp16", "--target", "gpu-onnxruntime", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def gpu_repository(gpu_export):
    return gpu_export[0]


@pytest.mark.e2e  # a whole export, tens of seconds
def test_int8_export_passes_validation_and_is_smaller(tmp_path):
    result = export("--precision", "int8", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cosine min" in result.stdout
    # The controlled graph is quantized too and checked against the plain one (int8 rounding is its only difference).
    assert "attention-controlled graph with no position controlled" in result.stdout
    assert manifest(tmp_path)["precision"] == "int8"
    for role in ("encoder", "controlled-encoder"):
        encoder = manifest(tmp_path)["steps"][role]
        graph = onnx.load(str(tmp_path / encoder / "1" / "model.onnx")).graph
        # Every layer's six weight MatMuls run in int8 (the embedding tables stay float: a lookup int8 does not speed
        # up), with no activation scale shared by a run.
        ops = [node.op_type for node in graph.node]
        assert ops.count("MatMulIntegerToFloat") == 6 * 6 and "DynamicQuantizeLinear" not in ops
        fp32_size = (ROOT / "model_repository" / encoder / "1" / "model.onnx").stat().st_size
        assert (tmp_path / encoder / "1" / "model.onnx").stat().st_size < fp32_size * 0.7


@pytest.mark.e2e  # a whole export, tens of seconds
def test_fp16_export_of_all_minilm_is_validated(gpu_export):
    """Checked against sentence-transformers on the STS sentences, and its figures printed, as fp32 and int8 are."""
    _, stdout = gpu_export
    assert "validating against sentence-transformers on 1030 sentences" in stdout
    assert "(required min, mean: 0.999, 0.9999)" in stdout
    assert "attention-controlled graph with no position controlled" in stdout


@pytest.mark.e2e  # a whole export, tens of seconds
def test_gpu_target_uses_tritons_onnxruntime_backend_on_the_gpu(gpu_repository):
    steps = manifest(gpu_repository)["steps"]
    # Triton binds ONNX tensors by name, so the configs must speak the exported names; only the layers ensembles'
    # encoder computes the hidden states.
    for role, outputs in (("encoder", (TOKEN_EMBEDDINGS,)), ("layers-encoder", (HIDDEN_STATES,))):
        config = (gpu_repository / steps[role] / "config.pbtxt").read_text()
        assert 'backend: "onnxruntime"' in config and "KIND_GPU" in config
        for name in (INPUT_IDS, ATTENTION_MASK, *outputs):
            assert f'name: "{onnx_name(name)}"' in config
    assert not (gpu_repository / steps["encoder"] / "1" / "model.py").exists()
    assert "KIND_CPU" in (gpu_repository / steps["tokenizer"] / "config.pbtxt").read_text()
    # The attention-controlled encoder gets the same backend, with its control tensors by their ONNX names.
    controlled = (gpu_repository / steps["controlled-encoder"] / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in controlled and "KIND_GPU" in controlled
    for name in (INPUT_IDS, ATTENTION_MASK, CONTROL_FACTORS, CONTROL_LOG_ADDITIVE):
        assert f'name: "{onnx_name(name)}"' in controlled
    ensemble = (gpu_repository / manifest(gpu_repository)["ensembles"]["controlled"] / "config.pbtxt").read_text()
    assert f'key: "{onnx_name(CONTROL_LOG_ADDITIVE)}" value: "{CONTROL_LOG_ADDITIVE}"' in ensemble


@pytest.mark.e2e  # a whole export, tens of seconds
def test_fp16_export_keeps_float32_inputs_and_outputs(gpu_repository):
    model = onnx.load(str(gpu_repository / manifest(gpu_repository)["steps"]["encoder"] / "1" / "model.onnx"))
    assert {i.data_type for i in model.graph.initializer if len(i.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}


@pytest.mark.e2e  # a whole export, tens of seconds
def test_tensorrt_target_writes_a_plan_config(tmp_path):
    result = export("--target", "gpu-tensorrt", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'platform: "tensorrt_plan"' in (tmp_path / manifest(tmp_path)["steps"]["encoder"] / "config.pbtxt").read_text()
    commands = trtexec_commands(result.stdout)
    assert len(commands) == 3 and not any("--fp16" in options for options in commands.values())


@pytest.mark.e2e  # a whole export, tens of seconds
def test_second_run_reuses_the_export(tmp_path):
    assert export("--output-dir", str(tmp_path)).returncode == 0
    again = export("--output-dir", str(tmp_path))
    assert again.returncode == 0 and "up to date" in again.stdout


@pytest.mark.e2e  # a whole export, tens of seconds
def test_fp16_controlled_encoder_takes_controls_like_the_fp32_one(gpu_repository):
    """The GPU graph's controls, run here by onnxruntime on the CPU: in fp16 the masks and constants change (finfo.min
    becomes -65504), and padding must still be told from real keys with a control of 0 or 10 in either mode."""
    import numpy as np
    import onnxruntime as ort

    role = manifest(gpu_repository)["steps"]["controlled-encoder"]
    fp16 = ort.InferenceSession(str(gpu_repository / role / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(ROOT / "model_repository" / role / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 2023, 2003, 1037, 3899, 2770, 1999, 1996, 2380, 102], [101, 2023, 2003, 102, 0, 0, 0, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    for factor, log_additive in [(0.0, True), (10.0, True), (0.0, False), (10.0, False)]:
        factors = np.ones(ids.shape, dtype=np.float32)
        factors[:, 2] = factor
        feeds = {
            onnx_name(INPUT_IDS): ids,
            onnx_name(ATTENTION_MASK): mask,
            onnx_name(CONTROL_FACTORS): factors,
            onnx_name(CONTROL_LOG_ADDITIVE): np.full((2, 1), log_additive),
        }
        vectors = []
        for session in (fp16, fp32):
            (tokens,) = session.run([onnx_name(TOKEN_EMBEDDINGS)], feeds)
            vectors.append((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
        cosine = (vectors[0] * vectors[1]).sum(1) / (np.linalg.norm(vectors[0], axis=1) * np.linalg.norm(vectors[1], axis=1))
        assert cosine.min() >= 0.999, (factor, log_additive, cosine)
