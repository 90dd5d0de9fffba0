"""The export for GPUs, fast tier: fp16 checked against sentence-transformers (and refused where it overflows), served
by the CPU encoder step too, the trtexec commands a gpu-tensorrt export prints, and which GPU encoder graph computes the
hidden states. Each exports a tiny model in process, a few seconds apiece; tests/test_export.py exports all-MiniLM."""

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModel

from export.__main__ import main
from export.validate import MIN_COSINE
from repository_contract.manifest import Manifest, read
from repository_contract.tensors import (
    ATTENTION_MASK,
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    HIDDEN_STATES,
    INPUT_IDS,
    TOKEN_EMBEDDINGS,
    onnx_name,
)
from tests.test_steps_without_triton import alone, load_step, output, ragged_requests, request
from tests.tiny_models import bert_cls_dense

# Apart from the defaults, and a longest input above the length TensorRT tunes for (128), so that each shows in the
# profile where it belongs.
MAX_BATCH, MAX_LENGTH, OPT_LENGTH = 16, 200, 128
TEXTS = ["A man is playing a guitar.", "How do I reset my password? I have tried everything.", "short"]


def export(model_dir: Path, repository: Path, *options: str) -> tuple[int, str, str]:
    """python -m export of one model, in process: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["--model-dir", str(model_dir), "--output-dir", str(repository), *options]
    # --compress-to the head's own size: truncation, no PCA to fit.
    argv += ["--max-batch-size", str(MAX_BATCH), "--max-sequence-length", str(MAX_LENGTH), "--compress-to", "160"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def exported(model_dir: Path, repository: Path, *options: str) -> tuple[Manifest, str]:
    status, stdout, stderr = export(model_dir, repository, *options)
    assert status == 0, stdout + stderr
    (path,) = repository.glob("*/embedding_manifest.json")
    return read(path), stdout


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    # CLS pooling and a tanh Dense head on random weights: the touchiest of the tiny models in fp16.
    return bert_cls_dense(tmp_path_factory.mktemp("models") / "tiny-bert-cls")


@pytest.fixture(scope="module")
def tensorrt(tiny_model, tmp_path_factory) -> tuple[Path, Manifest, str]:
    repository = tmp_path_factory.mktemp("tensorrt")
    return repository, *exported(tiny_model, repository, "--target", "gpu-tensorrt", "--precision", "fp16")


@pytest.fixture(scope="module")
def gpu_onnxruntime(tiny_model, tmp_path_factory) -> tuple[Path, Manifest]:
    repository = tmp_path_factory.mktemp("gpu-onnxruntime")
    return repository, exported(tiny_model, repository, "--target", "gpu-onnxruntime", "--precision", "fp16")[0]


def figures(stdout: str, line: str) -> list[float]:
    """The numbers on the export's progress line that starts with `line`."""
    (found,) = re.findall(rf"\] {re.escape(line)}(.*)", stdout)
    return [float(number) for number in re.findall(r"\d\.\d+(?:e[-+]\d+)?", found)]


def test_an_fp16_export_is_validated_against_sentence_transformers(tensorrt):
    _, manifest, stdout = tensorrt
    assert manifest.precision == "fp16"
    assert "validating against sentence-transformers on 1030 sentences" in stdout
    _, least, mean, *required = figures(stdout, "max-abs-diff ")
    assert tuple(required) == MIN_COSINE["fp16"] and least >= required[0] and mean >= required[1]
    _, controlled = figures(stdout, "attention-controlled graph with no position controlled: max-abs-diff ")
    assert controlled >= MIN_COSINE["fp16"][0]


def test_an_fp16_graph_that_overflows_is_refused(tiny_model, tmp_path):
    """A model whose first feed-forward output reaches past fp16's largest value (65504): in fp32 the layer norm after
    it brings the values back, in fp16 they become inf, then NaN."""
    model_dir = shutil.copytree(tiny_model, tmp_path / "overflowing")
    model = AutoModel.from_pretrained(str(model_dir))
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(1e4)
    model.save_pretrained(str(model_dir))
    status, stdout, stderr = export(model_dir, tmp_path / "repository", "--precision", "fp16")
    assert status == 1, stdout + stderr
    assert "cosine min nan" in stdout
    assert "fp16 export of overflowing does not match the original model" in stderr
    assert not (tmp_path / "repository").exists()


def test_the_cpu_encoder_step_serves_an_fp16_graph(tiny_model, tmp_path):
    """The fp16 graph keeps float32 and int64 at its edges, so the Python-backend encoder feeds and reads it as the fp32
    one: each row as the graph answers it alone, in float32."""
    manifest, _ = exported(tiny_model, tmp_path / "repository", "--precision", "fp16")
    model_dir = tmp_path / "repository" / manifest.steps["encoder"]
    graph = onnx.load(str(model_dir / "1" / "model.onnx"))
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in graph.graph.initializer}
    step = load_step("encoder", model_dir, tmp_path, slice_rows="2", intra_op_threads="1", alone_intra_op_threads="1")
    tokenizer = Tokenizer.from_file(str(tmp_path / "repository" / manifest.tokenizer))
    ((sequences, ids, mask),) = ragged_requests(tokenizer, [TEXTS], [2], np.random.default_rng(0))
    (response,) = step.execute([request({INPUT_IDS: ids, ATTENTION_MASK: mask}, [TOKEN_EMBEDDINGS, HIDDEN_STATES])])
    step.sessions.siblings.own.close()
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for name in (TOKEN_EMBEDDINGS, HIDDEN_STATES):
        answered = output(response, name)
        assert answered.dtype == np.float32
        for row, sequence in enumerate(sequences):
            served = answered[row, :, : len(sequence)] if name == HIDDEN_STATES else answered[row, : len(sequence)]
            np.testing.assert_allclose(served, alone(session, sequence)[name], atol=2e-3, rtol=1e-2)


def trtexec_commands(stdout: str) -> dict[str, dict[str, str]]:
    """Each trtexec command the export printed, by the Triton model whose graph it builds: its options."""
    commands = [shlex.split(line) for line in stdout.splitlines() if line.lstrip().startswith("trtexec ")]
    options = [dict(arg.partition("=")[::2] for arg in command[1:]) for command in commands]
    return {Path(each["--onnx"]).parent.parent.name: each for each in options}


def shapes(inputs: dict[str, bool], rows: int, length: int) -> str:
    """A trtexec shape option's value for these inputs, each one per token (True) or one per row."""
    return ",".join(f"{name}:{rows}x{length if per_token else 1}" for name, per_token in inputs.items())


def test_a_tensorrt_export_prints_a_complete_trtexec_command_for_every_encoder(tensorrt):
    repository, manifest, stdout = tensorrt
    commands = trtexec_commands(stdout)
    encoders = {manifest.steps[role] for role in ("encoder", "layers-encoder", "controlled-encoder")}
    plans = {path.parent.name for path in repository.glob("*/config.pbtxt") if "tensorrt_plan" in path.read_text()}
    assert set(commands) == encoders == plans
    for model, options in commands.items():
        assert Path(options["--onnx"]).exists()
        assert options["--saveEngine"] == str(repository / model / "1" / "model.plan")
        assert "--fp16" in options
        inputs = {onnx_name(INPUT_IDS): True, onnx_name(ATTENTION_MASK): True}
        if model == manifest.steps["controlled-encoder"]:
            inputs |= {onnx_name(CONTROL_FACTORS): True, onnx_name(CONTROL_LOG_ADDITIVE): False}
        assert options["--minShapes"] == shapes(inputs, 1, 1)
        assert options["--optShapes"] == shapes(inputs, MAX_BATCH, OPT_LENGTH)
        assert options["--maxShapes"] == shapes(inputs, MAX_BATCH, MAX_LENGTH)


def encoder_of(repository: Path, ensemble: str, manifest: Manifest) -> str:
    """The encoder step among an ensemble's steps."""
    encoders = {manifest.steps[role] for role in ("encoder", "layers-encoder", "controlled-encoder")}
    (encoder,) = set(re.findall(r'model_name: "([^"]+)"', (repository / ensemble / "config.pbtxt").read_text())) & encoders
    return encoder


def test_gpu_ensembles_compute_hidden_states_only_for_layers(gpu_onnxruntime):
    """Triton's GPU backends compute every output of a graph on every run: the plain ensembles' encoder has no hidden
    states, the layers ensembles' one has them; the controlled ensembles share one encoder with both."""
    repository, manifest = gpu_onnxruntime
    plain = [manifest.ensembles, manifest.compression.ensembles]
    wanted = [(ensembles.text, (TOKEN_EMBEDDINGS,)) for ensembles in plain]
    wanted += [(ensembles.token_ids, (TOKEN_EMBEDDINGS,)) for ensembles in plain]
    wanted += [(manifest.layers.ensembles.text, (HIDDEN_STATES,)), (manifest.layers.ensembles.token_ids, (HIDDEN_STATES,))]
    controlled = [manifest.ensembles.controlled, manifest.compression.ensembles.controlled, manifest.layers.ensembles.controlled]
    wanted += [(ensemble, (TOKEN_EMBEDDINGS, HIDDEN_STATES)) for ensemble in controlled]
    for ensemble, outputs in wanted:
        encoder = encoder_of(repository, ensemble, manifest)
        graph = onnx.load(str(repository / encoder / "1" / "model.onnx"))
        assert [o.name for o in graph.graph.output] == [onnx_name(name) for name in outputs], ensemble
        config = (repository / encoder / "config.pbtxt").read_text()
        declared = re.findall(r'name: "(\w+)"', config[config.index("output [") :])
        assert declared == [onnx_name(name) for name in outputs], ensemble
    assert manifest.steps["layers-encoder"] in manifest.directories
