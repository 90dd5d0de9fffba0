"""Exports the transformer to ONNX with named tensors, and derives the int8 and fp16 variants; for a dual encoder, its
text tower so, and its vision tower as a graph of its own."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModel, CLIPModel

from export.attention_controls import attention_controls
from export.repository import TextEncoder
from export.source_model import SourceModel
from repository_contract.tensors import (
    ATTENTION_MASK,
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    EMBEDDING,
    HIDDEN_STATES,
    INPUT_IDS,
    PIXEL_VALUES,
    TOKEN_EMBEDDINGS,
    onnx_name,
)

INPUT_NAMES = [onnx_name(INPUT_IDS), onnx_name(ATTENTION_MASK)]
# The controlled graph's extra inputs: a factor per position ([batch, sequence], 1 = uncontrolled) and the mode
# per row ([batch, 1], true = log-additive).
CONTROL_NAMES = [onnx_name(CONTROL_FACTORS), onnx_name(CONTROL_LOG_ADDITIVE)]
OPSET = 17


class _TextEncoder(torch.nn.Module):
    """input_ids, attention_mask -> `outputs`, of TOKEN_EMBEDDINGS (the last layer) and HIDDEN_STATES (the word
    embeddings at index 0 and every layer's output at 1..N, so that /embed can pool any layer from one run)."""

    def __init__(self, model: torch.nn.Module, decoder: bool, outputs: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.decoder = decoder
        self.outputs = outputs
        # Single-segment inputs only, so token types are all zero, as sentence-transformers sends them for one
        # text; keeping them out of the graph keeps the tensor contract to input_ids and attention_mask.
        self.takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        extra: dict[str, torch.Tensor | bool] = {"token_type_ids": torch.zeros_like(input_ids)} if self.takes_token_types else {}
        if self.decoder:
            attention_mask = _causal_mask(attention_mask)
            extra["use_cache"] = False
        layers = HIDDEN_STATES in self.outputs
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=layers, **extra)
        answers = {TOKEN_EMBEDDINGS: out.last_hidden_state}
        if layers:
            answers[HIDDEN_STATES] = torch.stack(out.hidden_states, dim=1)
        return tuple(answers[name] for name in self.outputs)


class _ControlledEncoder(_TextEncoder):
    def forward(self, input_ids, attention_mask, control_factors, control_log_additive):
        with attention_controls(control_factors, control_log_additive.reshape(-1)):
            return super().forward(input_ids, attention_mask)


def _causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The additive [batch, 1, query, key] mask a decoder's eager attention adds: each token sees itself, the
    real tokens before it, and no padding.

    Built here because transformers' own mask construction does not trace to ONNX; a 4-D mask is taken as it is.
    Sequences are right-padded, so the real tokens keep positions 0..n-1 and the padding after them changes
    nothing they compute.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    allowed = (positions[None, :] <= positions[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)


class _ImageEncoder(torch.nn.Module):
    """pixel_values -> what sentence-transformers' encode(image) gives: get_image_features, then the modules after
    the CLIP module (Normalize, say), which act on images and texts alike."""

    def __init__(self, model: CLIPModel, after: list[torch.nn.Module]):
        super().__init__()
        self.model = model
        self.after = torch.nn.ModuleList(after)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = {"sentence_embedding": self.model.get_image_features(pixel_values=pixel_values)}
        for module in self.after:
            features = module(features)
        return features["sentence_embedding"]


class _VisionHiddenStates(torch.nn.Module):
    """pixel_values -> the vision tower's hidden states stacked [batch, layers + 1, image tokens, hidden], as
    transformers' CLIPVisionTransformer returns them with output_hidden_states: index 0 is the class and patch
    embeddings plus the position embeddings after the pre-layernorm (what the first layer takes), 1..N each layer's
    output, the last before the post-layernorm (which CLIP applies to the class token only, for the image vector)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states, dim=1)


class _ControlledImage(torch.nn.Module):
    """pixel_values, control_factors [batch, image tokens], control_log_additive [batch, 1] -> the image vector and the
    vision tower's stacked hidden states, every vision attention under the controls. One graph with both outputs: the
    controlled path is the rare one, and a third copy of the tower's weights for the layers alone is not worth it."""

    def __init__(self, model: CLIPModel, after: list[torch.nn.Module]):
        super().__init__()
        self.image = _ImageEncoder(model, after)
        self.layers = _VisionHiddenStates(model)

    def forward(self, pixel_values, control_factors, control_log_additive):
        with attention_controls(control_factors, control_log_additive.reshape(-1)):
            return self.image(pixel_values), self.layers(pixel_values)


@contextmanager
def _eager_attention(config):
    """Traces the tower's attention as its eager softmax, which attention_controls rewrites (sdpa has no softmax to
    rewrite); restores the implementation the model was loaded with."""
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        config._attn_implementation_internal = previous


def _text_model(source: SourceModel):
    """The transformer whose token embeddings the text pipeline pools: a dual encoder's text tower alone."""
    directory = str(source.path / source.transformer_path)
    if source.vision is not None:
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(directory, attn_implementation="eager").eval()
    return AutoModel.from_pretrained(directory, attn_implementation="eager").eval()


def _trace(
    wrapper: torch.nn.Module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str], axes: dict
) -> None:
    """One graph traced to ONNX the one way the export traces every graph: TorchScript tracing at OPSET, the named
    tensors' `axes` dynamic."""
    torch.onnx.export(
        wrapper.eval(),
        inputs,
        str(path),
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=axes,
        opset_version=OPSET,
        dynamo=False,
    )


def export_vision(source: SourceModel, path: Path, layers_path: Path, controlled_path: Path) -> None:
    """Writes the three vision graphs: PIXEL_VALUES [batch, 3, size, size] -> EMBEDDING [batch, dimensions] at `path`,
    -> HIDDEN_STATES [batch, layers + 1, image tokens, hidden] at `layers_path`, and both under attention controls
    (CONTROL_FACTORS [batch, image tokens], CONTROL_LOG_ADDITIVE [batch, 1]) at `controlled_path`.

    Two plain graphs, not one with both outputs: onnxruntime runs every node of a graph whatever outputs are asked for,
    so one graph would make every plain image vector pay for stacking all the layers' states."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(source.path), device="cpu")
    model = reference[0].model.eval()
    after = list(reference)[1:]
    vision = source.vision
    size = vision.image_size if vision else 0
    tokens = vision.image_tokens if vision else 0
    sample = torch.randn(2, 3, size, size)
    # Both modes and a factor of 0 in the sample, so that no branch is folded away at trace time.
    sample_factors = torch.ones(2, tokens)
    sample_factors[:, 1] = 0.0
    sample_factors[:, 2] = 2.0
    sample_modes = torch.tensor([[True], [False]])
    pixels, factors, modes = onnx_name(PIXEL_VALUES), onnx_name(CONTROL_FACTORS), onnx_name(CONTROL_LOG_ADDITIVE)
    embedding, states = onnx_name(EMBEDDING), onnx_name(HIDDEN_STATES)
    graphs = [
        (_ImageEncoder(model, after), (sample,), [pixels], [embedding], path),
        (_VisionHiddenStates(model), (sample,), [pixels], [states], layers_path),
        (
            _ControlledImage(model, after),
            (sample, sample_factors, sample_modes),
            [pixels, factors, modes],
            [embedding, states],
            controlled_path,
        ),
    ]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for wrapper, inputs, input_names, output_names, graph in graphs:
            controlled = graph == controlled_path
            with _eager_attention(model.vision_model.config) if controlled else nullcontext():
                axes = {name: {0: "batch"} for name in input_names + output_names}
                _trace(wrapper, inputs, graph, input_names, output_names, axes)


def export_fp32(source: SourceModel, graphs: Mapping[Path, TextEncoder]) -> torch.Tensor:
    """Writes each text encoder graph at its path; returns the input token embedding matrix, which contextual controls
    compare tokens with."""
    model = _text_model(source)
    sample_ids = torch.ones(2, 8, dtype=torch.long)
    # One padded row in the sample, so that no shortcut a model takes for an all-ones mask is traced.
    sample_mask = torch.ones_like(sample_ids)
    sample_mask[1, 5:] = 0
    # Both modes and a factor of 0 in the sample, so that no branch is folded away at trace time.
    sample_factors = torch.tensor([[1.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]] * 2)
    sample_modes = torch.tensor([[True], [False]])
    dynamic = {0: "batch", 1: "sequence"}
    axes = {
        onnx_name(INPUT_IDS): dynamic,
        onnx_name(ATTENTION_MASK): dynamic,
        onnx_name(CONTROL_FACTORS): dynamic,
        onnx_name(CONTROL_LOG_ADDITIVE): {0: "batch"},
        onnx_name(TOKEN_EMBEDDINGS): dynamic,
        onnx_name(HIDDEN_STATES): {0: "batch", 2: "sequence"},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for path, graph in graphs.items():
            wrapper = (_ControlledEncoder if graph.controlled else _TextEncoder)(model, source.decoder, graph.outputs)
            inputs = (sample_ids, sample_mask, sample_factors, sample_modes) if graph.controlled else (sample_ids, sample_mask)
            input_names = INPUT_NAMES + CONTROL_NAMES if graph.controlled else INPUT_NAMES
            output_names = [onnx_name(name) for name in graph.outputs]
            _trace(wrapper, inputs, path, input_names, output_names, {name: axes[name] for name in input_names + output_names})
    return model.get_input_embeddings().weight.detach().float()


def quantize_int8(fp32_path: Path, out_path: Path, full_range_weights: bool = False) -> Path:
    """Dynamic int8 quantization of the MatMuls' weights, with each token's activations scaled on their own
    (export.per_token_int8): the CPU speed-up with no calibration data, and vectors that do not depend on the batch.

    Per-channel weight scales matter here: per-tensor scales dropped the mean cosine to the fp32 model on the STS
    sentences from 0.990 to 0.946 (min 0.79), at the same ~2.2x speed. Only MatMuls: the embedding tables (Gather)
    are a lookup that int8 does not speed up, and quantizing them cost 0.0004 STS Spearman (0.7364 to 0.7360,
    `python -m bench.cpu_runtimes` against bin/bench of 2026-12-03); a quantized convolution (CLIP's patch embedding)
    would scale a whole batch of images together.

    Weights use 7 of their 8 bits (reduce_range), as onnxruntime advises for x86 CPUs without VNNI: there its u8s8
    kernel sums pairs of products in int16 (VPMADDUBSW), and a pair of 255 * 127 saturates. On such a CPU (AVX2)
    full-range weights moved the vectors with the machine: min cosine to fp32 0.9741 against 0.9818 on an AVX-512 VNNI
    one, whose kernel does not saturate. With 7-bit weights the integer products are exact on both, so every CPU serves
    the same vectors, at full u8s8 speed; uint8 weights (u8u8, also exact) ran 15% slower on AVX2
    (AVX2 machine: Spearman 0.7396 reduce_range, 0.7389 uint8 weights, 0.7371 full range; fp32 0.7435).
    `full_range_weights` gives the 8-bit weights exported before, for bench.cpu_runtimes to set beside them.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export.per_token_int8 import rewrite

    quantize_dynamic(
        str(fp32_path),
        str(out_path),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=not full_range_weights,
        op_types_to_quantize=["MatMul"],
    )
    return rewrite(out_path)


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """fp16 weights and math, for GPU deployments (onnxruntime runs them on a CPU too); inputs and outputs keep their
    types, so the contract holds and the steps around the encoder feed and read it as the fp32 one."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path


def at_precision(fp32_path: Path, precision: str) -> Path:
    """The graph at `precision`: the fp32 one itself, or its int8 or fp16 variant, written beside it."""
    if precision == "fp32":
        return fp32_path
    convert = {"int8": quantize_int8, "fp16": convert_fp16}[precision]
    return convert(fp32_path, fp32_path.with_suffix(f".{precision}.onnx"))
