"""The int8 export's per-token activation scales (export.per_token_int8), on a small two-layer graph quantized as the
export quantizes: a row's output does not change when a row of much larger values shares its run (it did with one
scale per run), it stays close to the float graph, and the fusion that would read a per-token scale as one number is
not reached (its outputs came out at cosine 0.46)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import quantize_int8
from export.per_token_int8 import per_token_scales

WIDTH, HIDDEN = 64, 256


def _float_graph(path) -> None:
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.1, (WIDTH, HIDDEN)).astype(np.float32), rng.normal(0, 0.1, (HIDDEN, WIDTH)).astype(np.float32)]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", WIDTH])],
        [numpy_helper.from_array(w, name) for w, name in zip(weights, ("w1", "w2"))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _run(path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("per-token")
    _float_graph(directory / "float.onnx")
    return directory / "float.onnx", quantize_int8(directory / "float.onnx", directory / "int8.onnx")


def test_a_rows_output_does_not_depend_on_what_shares_its_run(graphs):
    _, int8 = graphs
    row = np.random.default_rng(1).normal(0, 1, (1, 5, WIDTH)).astype(np.float32)
    loud = 50 * np.random.default_rng(2).normal(0, 1, (1, 5, WIDTH)).astype(np.float32)
    alone = _run(int8, row)
    together = _run(int8, np.concatenate([loud, row]))[1:]
    assert np.array_equal(alone, together)


def test_it_stays_close_to_the_float_graph(graphs):
    # With full-range (8-bit) weights this fails on a CPU without VNNI (cosine 0.987 on AVX2): its integer kernel
    # saturates pairs of products in int16.
    float_graph, int8 = graphs
    x = np.random.default_rng(3).normal(0, 1, (4, 7, WIDTH)).astype(np.float32)
    expected, got = _run(float_graph, x).reshape(-1, WIDTH), _run(int8, x).reshape(-1, WIDTH)
    cosine = (expected * got).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() > 0.999, cosine.min()


def test_no_activation_is_quantized_per_run(graphs):
    _, int8 = graphs
    ops = [node.op_type for node in onnx.load(str(int8)).graph.node]
    assert "DynamicQuantizeLinear" not in ops and ops.count("MatMulIntegerToFloat") == 2


def test_a_graph_with_nothing_quantized_is_refused(graphs):
    float_graph, _ = graphs
    with pytest.raises(ValueError, match="not a dynamically quantized model"):
        per_token_scales(onnx.load(str(float_graph)))
