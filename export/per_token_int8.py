"""Per-token activation scales for a dynamically quantized graph, so that a text's vector never depends on its batch.

onnxruntime's dynamic quantization quantizes each MatMul's activation input with one scale for the whole run
(DynamicQuantizeLinear): the largest value among every row of the batch, padding included, sets every row's rounding,
so a text's vector moved by up to 4.7e-2 with its batch mates (bench/results/cpu_runtimes.md). This pass replaces each
DynamicQuantizeLinear with a symmetric quantization of each token on its own: scale = max |x| over the token's
features / 127, zero point 128 (uint8, which onnxruntime's u8s8 integer kernels take), and applies the token's scale
after the integer MatMul, where it broadcasts over the output features as the weights' per-channel scale does. A token's
integers then depend on that token alone, and the rest of the graph (attention, layer norms) is float, as in fp32.

The weight scale is applied before the token's: onnxruntime's MatMulIntegerToFloat fusion matches
Cast(MatMulInteger) * (a_scale * b_scale) and reads a_scale as one number, which a per-token scale is not (its vectors
came out at cosine 0.46 to fp32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LEVELS = 127.0  # symmetric: [-127, 127] around the zero point, so -x quantizes to the negation of x
ZERO_POINT = 128
TINY = 1e-12  # an all-zero token quantizes to zeros, not NaN

# Names of the constants this pass adds.
_LEVELS, _NEG_LEVELS, _SHIFT, _ZERO_POINT, _TINY, _LAST_AXIS = (
    "per_token_levels",
    "per_token_negative_levels",
    "per_token_shift",
    "per_token_zero_point",
    "per_token_tiny",
    "per_token_last_axis",
)


def _constants(opset: int) -> list[onnx.TensorProto]:
    """The constants the new nodes read; the axes input of ReduceMax only where it is an input (opset 18 on), since
    onnxruntime warns of an initializer that nothing reads."""
    return [
        numpy_helper.from_array(np.array(value, dtype=dtype), name)
        for name, value, dtype in [
            (_LEVELS, LEVELS, np.float32),
            (_NEG_LEVELS, -LEVELS, np.float32),
            (_SHIFT, float(ZERO_POINT), np.float32),
            (_ZERO_POINT, ZERO_POINT, np.uint8),
            (_TINY, TINY, np.float32),
            (_LAST_AXIS, [-1], np.int64),
        ]
        if name != _LAST_AXIS or opset >= 18
    ]


def _quantize_per_token(node: onnx.NodeProto, opset: int) -> list[onnx.NodeProto]:
    """Nodes that compute DynamicQuantizeLinear's first two outputs, per token; its zero point becomes _ZERO_POINT."""
    x, (quantized, scale, _) = node.input[0], node.output
    name = f"{node.name or quantized}/per_token"
    # ReduceMax takes its axes as an input from opset 18 on, as an attribute before.
    reduce = (
        helper.make_node("ReduceMax", [f"{name}/abs", _LAST_AXIS], [f"{name}/max"], keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceMax", [f"{name}/abs"], [f"{name}/max"], keepdims=1, axes=[-1])
    )
    return [
        helper.make_node("Abs", [x], [f"{name}/abs"]),
        reduce,
        helper.make_node("Max", [f"{name}/max", _TINY], [f"{name}/max_safe"]),
        helper.make_node("Div", [f"{name}/max_safe", _LEVELS], [scale]),
        helper.make_node("Div", [x, scale], [f"{name}/scaled"]),
        helper.make_node("Round", [f"{name}/scaled"], [f"{name}/rounded"]),
        helper.make_node("Clip", [f"{name}/rounded", _NEG_LEVELS, _LEVELS], [f"{name}/clipped"]),
        helper.make_node("Add", [f"{name}/clipped", _SHIFT], [f"{name}/shifted"]),
        helper.make_node("Cast", [f"{name}/shifted"], [quantized], to=TensorProto.UINT8),
    ]


def per_token_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (from quantize_dynamic) with every activation quantized per token; changed in place and returned."""
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    quantizers = [node for node in graph.node if node.op_type == "DynamicQuantizeLinear"]
    if not quantizers:
        raise ValueError("no DynamicQuantizeLinear in the graph: not a dynamically quantized model")
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for node in quantizers:
        quantized, a_scale, zero_point = node.output
        uses = consumers.get(quantized, [])
        # Only an integer MatMul's left input is a [..., tokens, features] activation whose last axis is one token's.
        if not uses or any(use.op_type != "MatMulInteger" or index != 0 for use, index in uses):
            raise ValueError(f"{node.name}: quantizes an input of {[(u.op_type, i) for u, i in uses]}, not of a MatMul")
        replaced[id(node)] = _quantize_per_token(node, opset)
        for use, index in consumers.get(zero_point, []):
            use.input[index] = _ZERO_POINT
        for product, _ in consumers.get(a_scale, []):
            if product.op_type != "Mul":
                raise ValueError(f"{node.name}: its scale feeds {product.op_type}, not the scales' product")
            b_scale = next(name for name in product.input if name != a_scale)
            # Cast(MatMulInteger) * (a_scale * b_scale) becomes (Cast(MatMulInteger) * b_scale) * a_scale.
            for rescale, index in consumers.get(product.output[0], []):
                integer_result = rescale.input[1 - index]
                by_weight = f"{rescale.output[0]}/by_weight_scale"
                replaced.setdefault(id(rescale), []).append(helper.make_node("Mul", [integer_result, b_scale], [by_weight]))
                rescale.input[:] = [by_weight, a_scale]
            dropped.add(id(product))
    nodes = []
    for node in list(graph.node):
        if id(node) in dropped:
            continue
        if node.op_type == "DynamicQuantizeLinear":
            nodes += replaced[id(node)]
        else:
            nodes += [*replaced.get(id(node), []), node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(_constants(opset))
    return model


def rewrite(path: Path) -> Path:
    """The quantized graph at `path`, rewritten in place with per-token scales."""
    model = per_token_scales(onnx.load(str(path)))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
