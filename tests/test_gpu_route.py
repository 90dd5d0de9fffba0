"""The pip GPU route, fast tier, on a machine without a GPU: what `python -m export --target gpu-cuda` (and
gpu-tensorrt-ep) writes, what the encoder step does with it here, the TensorRT provider's options, the no-GPU run of
bench.gpu_check, and the table of targets behind them.

The route runs this project's Python-backend encoder step (export/steps/encoder.py) on onnxruntime-gpu, so the step
must refuse, with the way out (`bin/setup --gpu`), a GPU export that this onnxruntime cannot start, yet serve the same
graphs once the config names the CPU provider instead: then a GPU export's graphs (a plain encoder with token
embeddings only, a layers encoder of its own) are checked here, on the CPU, against plain onnxruntime. TensorRT's
shape profile is a string onnxruntime parses only on a GPU, so it is checked character by character. Each export is of
a tiny model, in process, a few seconds apiece.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tokenizers import Tokenizer
from tritonclient.grpc import model_config_pb2

from bench import gpu_check
from export.__main__ import CPU_MAX_BATCH, CPU_SLICE_ROWS, GPU_ENCODER_INSTANCES, GPU_MAX_BATCH, parse_args
from harness import python_backend
from harness.python_backend import STEPS, output, request
from repository_contract import targets
from repository_contract.manifest import MANIFEST_FILE
from repository_contract.targets import CPU, CUDA, TARGETS, TENSORRT
from repository_contract.tensors import (
    ATTENTION_MASK,
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    HIDDEN_STATES,
    INPUT_IDS,
    TOKEN_EMBEDDINGS,
    onnx_name,
)
from tests.test_export_gpu import MAX_BATCH, MAX_LENGTH, TEXTS, exported
from tests.test_steps_without_triton import load_step, ragged_requests
from tests.tiny_models import bert_cls_dense

ENCODERS = ("encoder", "layers-encoder", "controlled-encoder")
# onnxruntime's CPU build warns when a session asks for a provider it lacks, before the step refuses the session.
NO_CUDA_WARNING = "ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names:UserWarning"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return bert_cls_dense(tmp_path_factory.mktemp("models") / "tiny-bert-cls")


@pytest.fixture(scope="module")
def gpu_cuda(tiny_model, tmp_path_factory):
    repository = tmp_path_factory.mktemp("gpu-cuda")
    return repository, exported(tiny_model, repository, "--target", "gpu-cuda")[0]


def config(model_dir: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def parameters(model_dir: Path) -> dict[str, str]:
    return {key: value.string_value for key, value in config(model_dir).parameters.items()}


def graph_outputs(model_dir: Path) -> list[str]:
    return [o.name for o in onnx.load(str(model_dir / "1" / "model.onnx")).graph.output]


def gpu_starts() -> bool:
    """Whether this onnxruntime starts a GPU provider here (onnxruntime-gpu on a GPU host)."""
    return bool(gpu_check.gpu_providers())


# -- the export ---------------------------------------------------------------------------------------------------------


def test_gpu_targets_default_to_whole_batches_of_256_on_two_instances():
    """The GPU defaults of `python -m export`: a GPU is fastest on many rows at once, so a batch is one slice; two
    instances, one gathering while the other runs. The CPU's stay as they were."""
    for name in ("gpu-cuda", "gpu-tensorrt-ep"):
        args = parse_args(["--target", name])
        assert (args.max_batch_size, args.slice_rows, args.encoder_instances) == (GPU_MAX_BATCH, GPU_MAX_BATCH, 2), name
    # slice_rows follows an explicit batch size, as in the exports below.
    assert parse_args(["--target", "gpu-cuda", "--max-batch-size", "16"]).slice_rows == 16
    cpu = parse_args([])
    assert (cpu.max_batch_size, cpu.slice_rows) == (CPU_MAX_BATCH, CPU_SLICE_ROWS) and CPU_SLICE_ROWS != CPU_MAX_BATCH
    assert GPU_ENCODER_INSTANCES == 2


def test_a_gpu_cuda_export_runs_every_text_encoder_in_the_python_step_on_cuda(gpu_cuda):
    repository, manifest = gpu_cuda
    for role in ENCODERS:
        model_dir = repository / manifest.steps[role]
        encoder = config(model_dir)
        assert encoder.backend == "python", role
        assert (model_dir / "1" / "model.py").read_text() == (STEPS / "encoder.py").read_text(), role
        assert (model_dir / "1" / "tensors.py").exists(), role
        params = parameters(model_dir)
        assert params["execution_providers"] == CUDA, role
        # test_export_gpu.export passes --max-batch-size 16 and no --slice-rows: the GPU default is the whole batch.
        assert encoder.max_batch_size == MAX_BATCH and params["slice_rows"] == str(MAX_BATCH), role
        # What TensorRT's provider builds its profile and precision from.
        assert params["max_sequence_length"] == str(MAX_LENGTH) and params["precision"] == "fp32", role
        per_token = {i.name: i.allow_ragged_batch for i in encoder.input if list(i.dims) == [-1]}
        assert per_token and all(per_token.values()), (role, per_token)
        (group,) = encoder.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU, role  # Triton itself never needs CUDA
        assert group.count == (1 if role == "controlled-encoder" else GPU_ENCODER_INSTANCES), role
    # The plain encoder computes no hidden states; the layers ensembles have an encoder of their own for them.
    assert graph_outputs(repository / manifest.steps["encoder"]) == [onnx_name(TOKEN_EMBEDDINGS)]
    assert graph_outputs(repository / manifest.steps["layers-encoder"]) == [onnx_name(HIDDEN_STATES)]
    assert graph_outputs(repository / manifest.steps["controlled-encoder"]) == [
        onnx_name(n) for n in (TOKEN_EMBEDDINGS, HIDDEN_STATES)
    ]
    controlled_inputs = {i.name: i for i in config(repository / manifest.steps["controlled-encoder"]).input}
    assert controlled_inputs[CONTROL_FACTORS].allow_ragged_batch and list(controlled_inputs[CONTROL_LOG_ADDITIVE].dims) == [1]


def test_a_gpu_cuda_export_pads_no_request_to_a_length_bucket_and_records_its_providers(gpu_cuda):
    repository, manifest = gpu_cuda
    # The step takes ragged batches: the tokenizers pad each request to its own longest text only.
    bucketed = {path.parent.name: parameters(path.parent) for path in repository.glob("*/config.pbtxt")}
    bucketed = {name: params["length_buckets"] for name, params in bucketed.items() if "length_buckets" in params}
    assert manifest.steps["tokenizer"] in bucketed and set(bucketed.values()) == {""}, bucketed
    assert manifest.target == "gpu-cuda" and manifest.execution_providers == (CUDA,)
    # Written, not only filled in on reading from the target.
    written = json.loads((repository / manifest.ensembles.text / MANIFEST_FILE).read_text())
    assert (written["target"], written["execution_providers"]) == ("gpu-cuda", [CUDA])


def test_a_gpu_tensorrt_ep_export_asks_for_tensorrt_then_cuda(tiny_model, tmp_path):
    manifest, _ = exported(tiny_model, tmp_path, "--target", "gpu-tensorrt-ep")
    assert manifest.execution_providers == (TENSORRT, CUDA)
    for role in ENCODERS:
        model_dir = tmp_path / manifest.steps[role]
        assert config(model_dir).backend == "python", role
        assert parameters(model_dir)["execution_providers"] == f"{TENSORRT},{CUDA}", role


# -- the encoder step on the export ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings(NO_CUDA_WARNING)
def test_the_step_of_a_gpu_export_refuses_an_onnxruntime_without_a_gpu_naming_bin_setup_gpu(gpu_cuda, tmp_path):
    """Rather than run a GPU export on the CPU unnoticed (onnxruntime falls back to its CPU provider silently), the step
    fails to load, and says how to get onnxruntime-gpu."""
    if gpu_starts():
        pytest.skip("this onnxruntime starts a GPU provider here: the step loads")
    repository, manifest = gpu_cuda
    for role in ("encoder", "layers-encoder"):
        with pytest.raises(RuntimeError, match=r"runs the encoder on CUDAExecutionProvider.*`bin/setup --gpu`"):
            load_step("encoder", repository / manifest.steps[role], tmp_path)


def unpadded(session: ort.InferenceSession, sequence: list[int], name: str) -> np.ndarray:
    """One output of the graph for one row, run alone and unpadded."""
    feeds = {onnx_name(INPUT_IDS): np.array([sequence]), onnx_name(ATTENTION_MASK): np.ones((1, len(sequence)), np.int64)}
    return session.run([onnx_name(name)], feeds)[0][0]


@pytest.mark.parametrize(("role", "name"), [("encoder", TOKEN_EMBEDDINGS), ("layers-encoder", HIDDEN_STATES)])
def test_the_step_serves_a_gpu_exports_graphs_on_the_cpu_provider(gpu_cuda, tmp_path, role, name):
    """Each GPU graph has one of the two outputs the CPU graph has: the step finds where that one's sequence axis is
    and answers each row of a ragged batch of requests as the graph answers it alone."""
    repository, manifest = gpu_cuda
    model_dir = repository / manifest.steps[role]
    step = load_step("encoder", model_dir, tmp_path, execution_providers=CPU, intra_op_threads="1", alone_intra_op_threads="1")
    try:
        tokenizer = Tokenizer.from_file(str(repository / manifest.tokenizer))
        made = ragged_requests(tokenizer, [TEXTS[:2], TEXTS[2:]], [0, 4], np.random.default_rng(0))
        responses = step.execute([request({INPUT_IDS: ids, ATTENTION_MASK: mask}, [name]) for _, ids, mask in made])
    finally:
        step.sessions.siblings.own.close()  # the lock file the instance holds open for its life
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=[CPU])
    for (sequences, _, _), response in zip(made, responses):
        answered = output(response, name)
        assert answered.shape[0] == len(sequences) and answered.dtype == np.float32
        for row, sequence in enumerate(sequences):
            length = len(sequence)
            served = answered[row, :, :length] if name == HIDDEN_STATES else answered[row, :length]
            np.testing.assert_allclose(served, unpadded(session, sequence, name), atol=1e-4, rtol=1e-4)
            padding = answered[row, :, length:] if name == HIDDEN_STATES else answered[row, length:]
            assert padding.size == 0 or not padding.any()


# -- TensorRT's provider options ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_step_module():
    """export/steps/encoder.py imported as Triton's Python backend imports it (the stand-in for its utilities)."""
    with python_backend._as_triton_loads(None):
        spec = importlib.util.spec_from_file_location("encoder_step_provider_options", STEPS / "encoder.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


# The controlled encoder's inputs as its config gives them (dims after the batch axis): three per token, one per row.
CONTROLLED_INPUTS = {
    onnx_name(INPUT_IDS): [-1],
    onnx_name(ATTENTION_MASK): [-1],
    onnx_name(CONTROL_FACTORS): [-1],
    onnx_name(CONTROL_LOG_ADDITIVE): [1],
}


def profile(rows: int, tokens: int) -> str:
    ids, mask, factors, mode = (onnx_name(n) for n in (INPUT_IDS, ATTENTION_MASK, CONTROL_FACTORS, CONTROL_LOG_ADDITIVE))
    return f"{ids}:{rows}x{tokens},{mask}:{rows}x{tokens},{factors}:{rows}x{tokens},{mode}:{rows}x1"


@pytest.mark.parametrize(("length", "opt_length"), [(512, 128), (64, 64)])
def test_tensorrt_gets_one_profile_from_one_row_to_a_whole_slice_of_the_longest_input(
    encoder_step_module, monkeypatch, tmp_path, length, opt_length
):
    """One engine for every batch shape the step runs (so that none stops it for a build), tuned at 128 tokens or the
    longest input if shorter, cached where EMBED_TENSORRT_CACHE says."""
    cache = tmp_path / "engines" / "nested"
    monkeypatch.setenv("EMBED_TENSORRT_CACHE", str(cache))
    params = {"slice_rows": "48", "max_sequence_length": str(length), "precision": "fp32", "device_id": "1"}
    options = encoder_step_module._gpu_provider_options(TENSORRT, params, CONTROLLED_INPUTS)
    assert cache.is_dir()
    assert options == {
        "device_id": 1,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": False,
        "trt_profile_min_shapes": profile(1, 1),
        "trt_profile_opt_shapes": profile(48, opt_length),
        "trt_profile_max_shapes": profile(48, length),
    }


def test_tensorrt_builds_fp16_for_an_fp16_export_and_caches_in_the_temporary_directory_by_default(
    encoder_step_module, monkeypatch, tmp_path
):
    monkeypatch.delenv("EMBED_TENSORRT_CACHE", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    inputs = {onnx_name(INPUT_IDS): [-1], onnx_name(ATTENTION_MASK): [-1]}
    params = {"slice_rows": "256", "max_sequence_length": "256", "precision": "fp16"}
    options = encoder_step_module._gpu_provider_options(TENSORRT, params, inputs)
    assert options["trt_fp16_enable"] is True and options["device_id"] == 0
    assert options["trt_engine_cache_path"] == str(tmp_path / "embed-tensorrt-engines")
    assert (tmp_path / "embed-tensorrt-engines").is_dir()
    ids, mask = onnx_name(INPUT_IDS), onnx_name(ATTENTION_MASK)
    assert options["trt_profile_max_shapes"] == f"{ids}:256x256,{mask}:256x256"


def test_cuda_gets_only_its_device(encoder_step_module, monkeypatch, tmp_path):
    monkeypatch.setenv("EMBED_TENSORRT_CACHE", str(tmp_path / "engines"))
    params = {"slice_rows": "256", "max_sequence_length": "256", "precision": "fp16", "device_id": "2"}
    assert encoder_step_module._gpu_provider_options(CUDA, params, CONTROLLED_INPUTS) == {"device_id": 2}
    assert not (tmp_path / "engines").exists()


# -- bench.gpu_check without a GPU ----------------------------------------------------------------------------------


def test_the_gpu_check_smoke_run_checks_the_cpu_path_where_no_gpu_starts(capsys, tmp_path):
    """The suite's run of the GPU check (about 10 s), so that it cannot rot: on the default export, without a GPU,
    the step on the CPU provider against itself and against onnxruntime one text at a time, and raw speed."""
    gpus = gpu_check.gpu_providers()
    report = tmp_path / "report" / "g.md"
    # The work directory holds the encoder step's lock files and the run's logs.
    assert gpu_check.main(["--smoke", "--out", str(report), "--work-dir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    checked = gpus or [CPU]
    if gpus:
        assert "GPU providers that start here: " + ", ".join(gpus) in printed
    else:
        assert "no GPU: " in printed and "checking the CPU path instead" in printed
    written = report.read_text()
    assert written in printed  # the report printed is the one written
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in written.splitlines() if line.startswith("| ")}
    parity = [f"encoder step fp32 on {'+'.join([p, CUDA] if p == TENSORRT else [p])}" for p in checked]
    parity += [] if gpus else ["raw onnxruntime fp32 on the CPU, one text a run"]
    for label in parity:
        assert rows[label].endswith(" | passes |"), rows.get(label)
        least = float(rows[label].split(" | ")[1])
        assert least >= 0.9999, rows[label]  # the same graph, on the same or an equivalent provider
    for provider in checked:
        for batch in gpu_check.SMOKE_BATCHES:
            speed = rows[f"raw onnxruntime fp32 on {provider}, batch {batch}"]
            assert float(speed.split(" | ")[1]) > 0 and speed.endswith(" | 0 |"), speed
    assert f"- providers checked: {', '.join(checked)}" in written
    assert gpu_check.SMOKE_BATCHES == [1, 8]


# -- the table of targets ---------------------------------------------------------------------------------------------


def test_an_unknown_target_is_refused_naming_the_known_ones():
    known = "cpu, gpu-cuda, gpu-tensorrt-ep, gpu-onnxruntime, gpu-tensorrt"
    with pytest.raises(ValueError, match=re.escape(f"unknown target 'nope'; known: {known}")):
        targets.target("nope")
    assert ", ".join(TARGETS) == known
    assert targets.target("gpu-tensorrt-ep").execution_providers == (TENSORRT, CUDA)


def test_the_python_step_targets_are_the_cpu_one_and_the_pip_gpu_route():
    assert {name for name, t in TARGETS.items() if t.python_encoder} == {"cpu", "gpu-cuda", "gpu-tensorrt-ep"}
    assert {name for name, t in TARGETS.items() if t.gpu} == {"gpu-cuda", "gpu-tensorrt-ep", "gpu-onnxruntime", "gpu-tensorrt"}
    # The step picks its CPU sessions by the provider list being exactly the CPU's (export/steps/encoder.py).
    assert [name for name, t in TARGETS.items() if t.execution_providers == (CPU,)] == ["cpu"]
