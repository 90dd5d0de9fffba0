"""Per-token activation scales for a dynamically quantized graph, so that a text's vector never depends on its batch.

onnxruntime's dynamic quantization quantizes each MatMul's activation input with one scale for the whole run
(DynamicQuantizeLinear): the largest value among every row of the batch, padding included, sets every row's rounding,
so a text's vector moved by up to 4.7e-2 with its batch mates (bench/results/cpu_runtimes.md). This pass replaces each
DynamicQuantizeLinear with a symmetric quantization of each token on its own: scale = max |x| over the token's
features / 127, zero point 128 (uint8, which onnxruntime's u8s8 integer kernels take), and applies the token's scale
after the integer MatMul, where it broadcasts over the output features as the weights' per-channel scale does. A token's
integers then depend on that token alone, and the rest of the graph (attention, layer norms) is float, as in fp32.

Each token is divided by its scale and quantized by one QuantizeLinear (scale 1, zero point 128), and each integer
MatMul is a MatMulIntegerToFloat that applies the weights' scale as it writes its float result; the token's scale
follows as a Mul. The same arithmetic spelt out op by op (Round, Clip, Add, Cast; MatMulInteger, Cast, Mul) made more
passes over every activation, about 37% of the int8 encoder's time, for bit-identical vectors 10-13% slower (the STS
sentences in slices of 8, medians of interleaved rounds: 481 against 535 texts/s on 1 thread, 556 against 639 on 2).
A QuantizeLinear with one scale per token (the activation flattened to [tokens, features]) took the same time with
five more small ops. The token's scale cannot go into MatMulIntegerToFloat itself: it reads its activation scale as
one number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LEVELS = 127.0  # symmetric: [-127, 127] around the zero point, so -x quantizes to the negation of x
ZERO_POINT = 128
TINY = 1e-12  # an all-zero token quantizes to zeros, not NaN
CONTRIB_DOMAIN = "com.microsoft"  # onnxruntime's own operators, MatMulIntegerToFloat among them

# Names of the constants this pass adds.
_LEVELS, _ZERO_POINT, _TINY, _ONE, _LAST_AXIS = (
    "per_token_levels",
    "per_token_zero_point",
    "per_token_tiny",
    "per_token_one",
    "per_token_last_axis",
)


def _constants(opset: int) -> list[onnx.TensorProto]:
    """The constants the new nodes read; the axes input of ReduceMax only where it is an input (opset 18 on), since
    onnxruntime warns of an initializer that nothing reads."""
    return [
        numpy_helper.from_array(np.array(value, dtype=dtype), name)
        for name, value, dtype in [
            (_LEVELS, LEVELS, np.float32),
            (_ZERO_POINT, ZERO_POINT, np.uint8),
            (_TINY, TINY, np.float32),
            (_ONE, 1.0, np.float32),
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
        # Rounds half to even, clips to [0, 255] and casts in one pass, as Round, Clip, Add and Cast did in four.
        helper.make_node("QuantizeLinear", [f"{name}/scaled", _ONE, _ZERO_POINT], [quantized]),
    ]


def _single(consumers: dict[str, list[tuple[onnx.NodeProto, int]]], name: str, op_type: str) -> onnx.NodeProto:
    """The one node that reads `name`, which must be an `op_type`."""
    uses = consumers.get(name, [])
    if len(uses) != 1 or uses[0][0].op_type != op_type:
        raise ValueError(f"{name} feeds {[use.op_type for use, _ in uses]}, not one {op_type}")
    return uses[0][0]


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
        quantized, a_scale, _ = node.output
        uses = consumers.get(quantized, [])
        # Only an integer MatMul's left input is a [..., tokens, features] activation whose last axis is one token's.
        if not uses or any(use.op_type != "MatMulInteger" or index != 0 for use, index in uses):
            raise ValueError(f"{node.name}: quantizes an input of {[(u.op_type, i) for u, i in uses]}, not of a MatMul")
        replaced[id(node)] = _quantize_per_token(node, opset)
        for integer_matmul, _ in uses:
            # Cast(MatMulInteger(a, b)) * (a_scale * b_scale) becomes MatMulIntegerToFloat(a, b, 1, b_scale) * a_scale.
            cast = _single(consumers, integer_matmul.output[0], "Cast")
            rescale = _single(consumers, cast.output[0], "Mul")
            product = next(p for p, _ in consumers[a_scale] if p.output[0] in rescale.input)
            b_scale = next(name for name in product.input if name != a_scale)
            by_weight = f"{rescale.output[0]}/by_weight_scale"
            a, b, _, b_zero_point = integer_matmul.input
            replaced[id(integer_matmul)] = [
                helper.make_node(
                    "MatMulIntegerToFloat",
                    [a, b, _ONE, b_scale, _ZERO_POINT, b_zero_point],
                    [by_weight],
                    name=f"{integer_matmul.name or integer_matmul.output[0]}/to_float",
                    domain=CONTRIB_DOMAIN,
                )
            ]
            rescale.input[:] = [by_weight, a_scale]
            dropped |= {id(cast), id(product)}
    nodes = [new for node in graph.node if id(node) not in dropped for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(_constants(opset))
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return model


def rewrite(path: Path) -> Path:
    """The quantized graph at `path`, rewritten in place with per-token scales."""
    model = per_token_scales(onnx.load(str(path)))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
