"""Writes the Triton model repository: step models, ensembles and the manifest the gateway serves from."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.compression import Projection
from export.source_model import SourceModel
from export.steps.image_processing import PROCESSOR_FILE, ImageProcessor
from export.steps.sentence_head import SentenceHead
from repository_contract import targets
from repository_contract.manifest import Manifest
from repository_contract.manifest import write as write_manifest
from repository_contract.naming import ensemble_names, image_ensembles, step_name
from repository_contract.tensors import (
    ATTENTION_MASK,
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    EMBEDDING,
    HIDDEN_STATES,
    IMAGE,
    IMAGE_CONTROL_FIELDS,
    IMAGE_CONTROLS,
    IMAGE_CROP,
    INPUT_IDS,
    PIXEL_VALUES,
    POOLED,
    TEXT,
    TOKEN_COUNT,
    TOKEN_EMBEDDINGS,
    TOKEN_IDS,
    onnx_name,
)

DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
STEP_SOURCES = Path(__file__).resolve().parent / "steps"
# The tensor names, which every step imports from beside its model.py.
TENSOR_NAMES = Path(__file__).resolve().parent.parent / "repository_contract" / "tensors.py"
# Each step's source file; every model gets its own copy of each step (see repository_contract.naming). Which text
# encoders a target has is text_encoders'; the NGC targets' run in Triton's own backends instead of this source.
STEP_ROLES = {
    "tokenizer": "tokenizer.py",
    "token-ids": "tokenizer.py",
    "controlled-ids": "tokenizer.py",
    "encoder": "encoder.py",
    # The same step on the graph with attention controls: controlled requests batch apart from the fast path.
    "controlled-encoder": "encoder.py",
    "pooling": "pooling.py",
    "compression": "compression.py",
    "layer-pooling": "layer_pooling.py",
}
# The steps only a model with a vision tower has: encoded image in, pixel values out; pixel values in, vector out;
# pixel values in, the vision tower's hidden states out (a graph of its own, so that plain image vectors never compute
# them); both under attention controls; those states pooled per layer, as the text tower's are by layer-pooling (a step of its own, with the vision
# tower's layers and width).
IMAGE_STEP_ROLES = {
    "image-preprocess": "image_preprocess.py",
    "vision-encoder": "vision_encoder.py",
    "vision-layers-encoder": "vision_encoder.py",
    # Both outputs of the vision tower under attention controls (a graph of its own, as for the text tower).
    "vision-controlled-encoder": "vision_encoder.py",
    "vision-layer-pooling": "layer_pooling.py",
}
# The order of the layer_pooling step's POOLED output; the manifest hands it to the gateway.
LAYER_POOLINGS = ("mean", "weighted_mean", "max", "last_token", "abs_max")


@dataclass(frozen=True)
class TextEncoder:
    """What the graph of one text encoder step takes and answers."""

    controlled: bool  # takes CONTROL_FACTORS and CONTROL_LOG_ADDITIVE besides the ids and mask
    outputs: tuple[str, ...]  # of TOKEN_EMBEDDINGS and HIDDEN_STATES, in that order


def text_encoders(target: str) -> dict[str, TextEncoder]:
    """The text encoder steps of a target, by role. Triton's onnxruntime and TensorRT backends compute every output of
    a graph on every run, so on GPU targets the plain ensembles' encoder has no hidden states and the layers ensembles
    get an encoder of their own; the Python-backend step on a GPU (gpu-cuda, gpu-tensorrt-ep) keeps the same layout,
    so that a long-context model's all-layers tensor is never built, nor held in GPU memory, for a plain batch. On the CPU the hidden states cost nothing measurable (all-MiniLM in onnxruntime, 1
    thread, batches of 32: 160 sentences/s from a graph without them, 163 asking one with them for both), so one step
    serves both and the weights are held once. The controlled encoder answers both on every target: its path is the
    rare one, and another copy of the weights for it is not worth it."""
    both = (TOKEN_EMBEDDINGS, HIDDEN_STATES)
    controlled = TextEncoder(True, both)
    if not targets.target(target).gpu:
        return {"encoder": TextEncoder(False, both), "controlled-encoder": controlled}
    return {
        "encoder": TextEncoder(False, (TOKEN_EMBEDDINGS,)),
        "layers-encoder": TextEncoder(False, (HIDDEN_STATES,)),
        "controlled-encoder": controlled,
    }


def _encoder_for(encoders: Mapping[str, TextEncoder], controlled: bool, output: str) -> str:
    """The encoder step of an ensemble: of those taking its inputs that answer `output`, the one computing the fewest
    other outputs."""
    fitting = [role for role, encoder in encoders.items() if encoder.controlled == controlled and output in encoder.outputs]
    return min(fitting, key=lambda role: len(encoders[role].outputs))


@dataclass(frozen=True)
class RepositoryOptions:
    target: str  # a name of repository_contract.targets.TARGETS
    precision: str
    max_batch_size: int
    length_buckets: tuple[int, ...]  # empty: each request padded to its own longest sequence
    queue_delay_us: int
    encoder_instances: int
    controlled_encoder_instances: int
    intra_op_threads: int
    alone_intra_op_threads: int
    thread_spinning: bool
    shared_weights: bool
    fuse_skip_layer_norm: bool
    slice_rows: int
    execution_env: Path


def _tensor(name: str, dtype: str, dims: list[int], ragged: bool = False, optional: bool = False) -> str:
    # A ragged input lets the dynamic batcher put requests of different lengths in one batch; the Python
    # steps handle each request's tensors on their own, so they can take them. An optional one may be left out by
    # the ensembles that do not need it.
    flags = (" allow_ragged_batch: true" if ragged else "") + (" optional: true" if optional else "")
    return f'  {{ name: "{name}" data_type: {dtype} dims: {json.dumps(dims)}{flags} }}'


def _tensors(kind: str, tensors: list[tuple]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(*t) for t in tensors) + "\n]"


def _parameters(params: dict[str, str]) -> str:
    items = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    return f"parameters [\n{items}\n]"


def _model_config(
    name: str, backend: str, inputs, outputs, options: RepositoryOptions, *, gpu=False, params=None, instances=1
) -> str:
    parts = [
        f'name: "{name}"',
        backend,
        f"max_batch_size: {options.max_batch_size}",
        _tensors("input", inputs),
        _tensors("output", outputs),
        # Level 1 is normal traffic, level 2 is `nice`: queued nice requests wait until no normal one is queued.
        # A request may carry its own timeout (the gateway sends its deadline); once it has waited that long
        # in a step's queue it is rejected there instead of computed for a caller who has given up.
        f"dynamic_batching {{ max_queue_delay_microseconds: {options.queue_delay_us} "
        "priority_levels: 2 default_priority_level: 1 "
        "default_queue_policy { timeout_action: REJECT allow_timeout_override: true } }",
        f"instance_group [{{ count: {instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }}]",
    ]
    if params is not None:
        parts.append(_parameters(params))
    return "\n".join(parts) + "\n"


def _python_params(options: RepositoryOptions, **extra: str) -> dict[str, str]:
    # The Python backend stub embeds an interpreter built against numpy 1.x; this environment has it.
    return {"EXECUTION_ENV_PATH": str(options.execution_env), **extra}


def _write_ensemble(
    out_dir: Path, name: str, input_tensors: list, steps: list[dict], output_tensor, options: RepositoryOptions
) -> None:
    """An ensemble's model directory (with the empty version directory Triton wants) and its config."""
    ensemble_dir = _fresh_model_dir(out_dir / name)
    config = _ensemble_config(name, input_tensors, steps, output_tensor, options)
    (ensemble_dir.parent / "config.pbtxt").write_text(config)


def _compression_step(steps: Mapping[str, str]) -> dict:
    """The model's compression step at the end of an ensemble: the vector before it in, the compressed one out."""
    return {"model": steps["compression"], "input_map": {EMBEDDING: _carried(EMBEDDING)}, "output_map": {EMBEDDING: EMBEDDING}}


def _ensemble_config(name: str, input_tensors: list, steps: list[dict], output_tensor, options: RepositoryOptions) -> str:
    rendered = []
    for step in steps:
        maps = "".join(
            f'      {kind} {{ key: "{k}" value: "{v}" }}\n' for kind in ("input_map", "output_map") for k, v in step[kind].items()
        )
        rendered.append(f'    {{\n      model_name: "{step["model"]}"\n      model_version: -1\n{maps}    }}')
    return (
        "\n".join(
            [
                f'name: "{name}"',
                'platform: "ensemble"',
                f"max_batch_size: {options.max_batch_size}",
                _tensors("input", input_tensors),
                _tensors("output", [output_tensor, (TOKEN_COUNT, "TYPE_INT32", [1])]),
                "ensemble_scheduling {\n  step [\n" + ",\n".join(rendered) + "\n  ]\n}",
            ]
        )
        + "\n"
    )


def step_names(model: str, vision: bool = False, target: str = "cpu", compressed: bool = True) -> dict[str, str]:
    """`compressed` False: a model narrower than the compression size, which has no compression step."""
    roles = [*STEP_ROLES, *text_encoders(target), *(IMAGE_STEP_ROLES if vision else ())]
    return {role: step_name(model, role) for role in dict.fromkeys(roles) if compressed or role != "compression"}


def model_directories(model: str, compress_to: int | None, vision: bool = False, target: str = "cpu") -> list[str]:
    """Every Triton model that serving `model` takes: what the gateway asks Triton to load and removal deletes.
    `compress_to` None: a model narrower than the compression size, without compression."""
    ensembles = [name for pair in ensemble_names(model, compress_to).values() for name in pair.values()]
    if vision:
        ensembles += [name for controlled in (False, True) for name in image_ensembles(model, compress_to, controlled).values()]
    return sorted(ensembles + list(step_names(model, vision, target, compress_to is not None).values()))


def remove_model(out_dir: Path, directories: Iterable[str]) -> None:
    for directory in directories:
        shutil.rmtree(out_dir / directory, ignore_errors=True)


def _encoder_config(name: str, source: SourceModel, options: RepositoryOptions, encoder: TextEncoder) -> str:
    target = targets.target(options.target)
    ragged = target.python_encoder
    inputs = [(INPUT_IDS, "TYPE_INT64", [-1], ragged), (ATTENTION_MASK, "TYPE_INT64", [-1], ragged)]
    if encoder.controlled:
        inputs += [(CONTROL_FACTORS, "TYPE_FP32", [-1], ragged), (CONTROL_LOG_ADDITIVE, "TYPE_BOOL", [1], False)]
    dims = {TOKEN_EMBEDDINGS: [-1, source.hidden_size], HIDDEN_STATES: [source.num_layers + 1, -1, source.hidden_size]}
    outputs = [(output, "TYPE_FP32", dims[output]) for output in encoder.outputs]
    if target.python_encoder:
        params = _python_params(
            options,
            execution_providers=",".join(target.execution_providers),
            intra_op_threads=str(options.intra_op_threads),
            alone_intra_op_threads=str(options.alone_intra_op_threads),
            thread_spinning="1" if options.thread_spinning else "0",
            shared_weights="1" if options.shared_weights else "0",
            fuse_skip_layer_norm="1" if options.fuse_skip_layer_norm else "0",
            slice_rows=str(options.slice_rows),
            # What TensorRT's provider builds its engine's shape profile and precision from.
            max_sequence_length=str(source.max_sequence_length),
            precision=options.precision,
        )
        instances = options.controlled_encoder_instances if encoder.controlled else options.encoder_instances
        return _model_config(name, 'backend: "python"', inputs, outputs, options, params=params, instances=instances)
    # Triton's ONNX and TensorRT backends bind tensors by name, so the config speaks the ONNX names.
    onnx_inputs = [(onnx_name(n), t, d) for n, t, d, _ in inputs]
    onnx_outputs = [(onnx_name(n), t, d) for n, t, d in outputs]
    backend = 'backend: "onnxruntime"' if options.target == "gpu-onnxruntime" else 'platform: "tensorrt_plan"'
    return _model_config(name, backend, onnx_inputs, onnx_outputs, options, gpu=True)


def _encoder_tensor(name: str, options: RepositoryOptions) -> str:
    return name if targets.target(options.target).python_encoder else onnx_name(name)


def _carried(name: str) -> str:
    # Between its steps an ensemble carries a tensor under the lower-case name, apart from its own inputs and outputs.
    return name.lower()


def write_repository(
    source: SourceModel,
    head: SentenceHead,
    onnx_paths: dict[str, Path],
    token_embeddings: np.ndarray,
    tokenizer_json: Path,
    out_dir: Path,
    options: RepositoryOptions,
    manifest: Manifest,
    projection: Projection | None,
) -> None:
    """Writes every Triton model of `source` into out_dir, the manifest last: the gateway serves a model only
    once its manifest is there, and by then all its steps are. `projection` None: a model narrower than the compression
    size, written without its compression step and ensembles.

    onnx_paths: the graph of each of text_encoders(options.target), by role. token_embeddings: the input embedding
    matrix, which the gateway reads for contextual controls (at manifest.controls.token_embeddings).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = manifest.steps
    encoders = text_encoders(options.target)
    token_ids = (TOKEN_IDS, "TYPE_INT64", [-1])
    factors = (CONTROL_FACTORS, "TYPE_FP32", [-1])
    # Per entry step: which ensemble of a pipeline it starts and its inputs; the mode goes from the ensemble's
    # input straight to the encoder.
    token_step = {
        "tokenizer": ("text", [(TEXT, "TYPE_STRING", [1])]),
        "token-ids": ("token_ids", [token_ids]),
        "controlled-ids": ("controlled", [token_ids, factors]),
    }
    mode = (CONTROL_LOG_ADDITIVE, "TYPE_BOOL", [1])
    tokenizer_outputs = [
        (INPUT_IDS, "TYPE_INT64", [-1]),
        (ATTENTION_MASK, "TYPE_INT64", [-1]),
        (TOKEN_COUNT, "TYPE_INT32", [1]),
    ]
    tokenizer_params = _python_params(
        options,
        length_buckets=",".join(map(str, options.length_buckets)),
        max_sequence_length=str(source.max_sequence_length),
        pad_token_id=str(manifest.pad_token_id),
    )
    for role, (kind, inputs) in token_step.items():
        version_dir = _fresh_model_dir(out_dir / steps[role])
        _copy_step_source(role, version_dir)
        shutil.copy(tokenizer_json, version_dir / "tokenizer.json")
        # The controlled step frames and pads the factors with the ids: 1 (uncontrolled) at special tokens and padding.
        outputs = tokenizer_outputs + ([factors] if kind == "controlled" else [])
        config = _model_config(steps[role], 'backend: "python"', inputs, outputs, options, params=tokenizer_params)
        (version_dir.parent / "config.pbtxt").write_text(config)
    np.save(out_dir / steps["controlled-ids"] / "1" / "token_embeddings.npy", token_embeddings)

    for role, onnx_path in onnx_paths.items():
        encoder_dir = _fresh_model_dir(out_dir / steps[role])
        if targets.target(options.target).python_encoder:
            _copy_step_source(role, encoder_dir)
        plan_name = "model.onnx" if options.target != "gpu-tensorrt" else "model.onnx.for-trtexec"
        shutil.copy(onnx_path, encoder_dir / plan_name)
        (encoder_dir.parent / "config.pbtxt").write_text(_encoder_config(steps[role], source, options, encoders[role]))

    hidden, dims = source.hidden_size, source.dimensions
    pooling_dir = _write_python_step(
        steps,
        "pooling",
        [(TOKEN_EMBEDDINGS, "TYPE_FP32", [-1, hidden], True), (ATTENTION_MASK, "TYPE_INT64", [-1], True)],
        [(EMBEDDING, "TYPE_FP32", [dims])],
        out_dir,
        options,
    )
    # The pooling step imports the head from next to itself.
    shutil.copy(STEP_SOURCES / "sentence_head.py", pooling_dir)
    head.save(pooling_dir)
    if projection is not None:
        compression_dir = _write_python_step(
            steps,
            "compression",
            [(EMBEDDING, "TYPE_FP32", [dims])],
            [(EMBEDDING, "TYPE_FP32", [projection.size])],
            out_dir,
            options,
        )
        projection.save(compression_dir / "projection.npy")
    layers_shape = [source.num_layers + 1, len(LAYER_POOLINGS), hidden]
    _write_python_step(
        steps,
        "layer-pooling",
        [(HIDDEN_STATES, "TYPE_FP32", [source.num_layers + 1, -1, hidden], True), (ATTENTION_MASK, "TYPE_INT64", [-1], True)],
        [(POOLED, "TYPE_FP32", layers_shape)],
        out_dir,
        options,
        poolings=",".join(LAYER_POOLINGS),
    )

    pooled = {
        "model": steps["pooling"],
        "input_map": {name: _carried(name) for name in (TOKEN_EMBEDDINGS, ATTENTION_MASK)},
    }
    # Each pipeline: encoder output it needs, the steps after the encoder, the ensemble output.
    pipelines = {
        "embedding": (
            TOKEN_EMBEDDINGS,
            [{**pooled, "output_map": {EMBEDDING: EMBEDDING}}],
            (EMBEDDING, "TYPE_FP32", [dims]),
        ),
        "layers": (
            HIDDEN_STATES,
            [
                {
                    "model": steps["layer-pooling"],
                    "input_map": {name: _carried(name) for name in (HIDDEN_STATES, ATTENTION_MASK)},
                    "output_map": {POOLED: POOLED},
                }
            ],
            (POOLED, "TYPE_FP32", layers_shape),
        ),
    }
    if projection is not None:
        pipelines["compression"] = (
            TOKEN_EMBEDDINGS,
            [
                {**pooled, "output_map": {EMBEDDING: _carried(EMBEDDING)}},
                _compression_step(steps),
            ],
            (EMBEDDING, "TYPE_FP32", [projection.size]),
        )
    ensembles = ensemble_names(source.name, None if projection is None else projection.size)
    for role, (kind, inputs) in token_step.items():
        controlled = kind == "controlled"
        entry_outputs = [INPUT_IDS, ATTENTION_MASK] + ([CONTROL_FACTORS] if controlled else [])
        encoder_inputs = {_encoder_tensor(name, options): _carried(name) for name in entry_outputs}
        if controlled:
            encoder_inputs[_encoder_tensor(mode[0], options)] = mode[0]
        for pipeline, (encoder_output, tail, output_tensor) in pipelines.items():
            ensemble_name = ensembles[pipeline][kind]
            ensemble_steps = [
                {
                    "model": steps[role],
                    "input_map": {name: name for name, _, _ in inputs},
                    "output_map": {name: _carried(name) for name in entry_outputs} | {TOKEN_COUNT: TOKEN_COUNT},
                },
                {
                    "model": steps[_encoder_for(encoders, controlled, encoder_output)],
                    "input_map": encoder_inputs,
                    "output_map": {_encoder_tensor(encoder_output, options): _carried(encoder_output)},
                },
                *tail,
            ]
            ensemble_inputs = inputs + ([mode] if controlled else [])
            _write_ensemble(out_dir, ensemble_name, ensemble_inputs, ensemble_steps, output_tensor, options)
    write_manifest(manifest, out_dir)


@dataclass(frozen=True)
class VisionFiles:
    """What the image pipeline of a model with a vision tower is written from."""

    graph: Path  # the vision ONNX: PIXEL_VALUES -> EMBEDDING
    layers_graph: Path  # PIXEL_VALUES -> HIDDEN_STATES [layers + 1, image tokens, hidden] of the vision tower
    controlled_graph: Path  # PIXEL_VALUES, CONTROL_FACTORS, CONTROL_LOG_ADDITIVE -> EMBEDDING and HIDDEN_STATES
    processor: ImageProcessor
    image_tokens: int
    patch_size: int  # the side of the square of pixels (of the model's view) each image token embeds
    num_layers: int  # the vision tower's transformer layers
    hidden_size: int  # the vision tower's width


def write_image_pipeline(
    manifest: Manifest, vision: VisionFiles, dimensions: int, compressed: int | None, out_dir: Path, options: RepositoryOptions
) -> None:
    """The image steps and the image ensembles: the image vector (`<model>-image`), that vector through the model's
    own compression step (`<model>-image-c<size>`; none when `compressed` is None, as the model then has no such
    step), and every layer of the vision tower pooled (`<model>-image-layers`,
    POOLED [layers + 1, poolings, hidden] in the order of manifest.layers.poolings, as the text layers ensembles
    answer); and the same three under attention controls on the image (`<model>-image-controlled...`). Written before
    write_repository, which writes the manifest last."""
    steps, side = manifest.steps, vision.processor.crop_height
    pixels = (PIXEL_VALUES, "TYPE_FP32", [3, side, vision.processor.crop_width])
    image_inputs = [(IMAGE, "TYPE_STRING", [1]), (IMAGE_CROP, "TYPE_INT64", [3])]
    controls = (IMAGE_CONTROLS, "TYPE_FP32", [-1, len(IMAGE_CONTROL_FIELDS)])
    mode = (CONTROL_LOG_ADDITIVE, "TYPE_BOOL", [1])
    factors = (CONTROL_FACTORS, "TYPE_FP32", [vision.image_tokens])
    mask = (ATTENTION_MASK, "TYPE_INT64", [vision.image_tokens])
    # One preprocess step for both kinds of ensemble: the controlled ones send the controls (an optional input) and
    # take the factors, which only this step can work out, as it alone decodes the image.
    preprocess_dir = _write_python_step(
        steps,
        "image-preprocess",
        [*image_inputs, (*controls, True, True)],
        [pixels, (TOKEN_COUNT, "TYPE_INT32", [1]), mask, factors],
        out_dir,
        options,
        instances=options.encoder_instances,
        image_tokens=str(vision.image_tokens),
        patch_size=str(vision.patch_size),
    )
    (preprocess_dir / PROCESSOR_FILE).write_text(vision.processor.to_json() + "\n")
    shutil.copy(STEP_SOURCES / "image_processing.py", preprocess_dir)
    layers = vision.num_layers + 1
    states = (HIDDEN_STATES, "TYPE_FP32", [layers, vision.image_tokens, vision.hidden_size])
    embedding = (EMBEDDING, "TYPE_FP32", [dimensions])
    encoder_params = {"intra_op_threads": str(options.intra_op_threads), "slice_rows": str(options.slice_rows)}
    # The layers and the controlled encoders have one instance, as the attention-controlled text encoder has: their
    # requests are rare next to plain image vectors, and each instance holds the vision tower's weights once more.
    for role, inputs, outputs, graph, instances in [
        ("vision-encoder", [pixels], [embedding], vision.graph, options.encoder_instances),
        ("vision-layers-encoder", [pixels], [states], vision.layers_graph, 1),
        ("vision-controlled-encoder", [pixels, factors, mode], [embedding, states], vision.controlled_graph, 1),
    ]:
        encoder_dir = _write_python_step(steps, role, inputs, outputs, out_dir, options, instances=instances, **encoder_params)
        shutil.copy(graph, encoder_dir / "model.onnx")
    pooled = (POOLED, "TYPE_FP32", [layers, len(manifest.layers.poolings), vision.hidden_size])
    _write_python_step(
        steps, "vision-layer-pooling", [states, mask], [pooled], out_dir, options, poolings=",".join(manifest.layers.poolings)
    )
    pool_layers = {
        "model": steps["vision-layer-pooling"],
        "input_map": {name: _carried(name) for name in (HIDDEN_STATES, ATTENTION_MASK)},
        "output_map": {POOLED: POOLED},
    }
    for controlled in (False, True):
        inputs = image_inputs + ([controls, mode] if controlled else [])
        # What the preprocess step hands on: the pixels (and the factors), with the image's token count.
        handed = [PIXEL_VALUES] + ([CONTROL_FACTORS] if controlled else [])
        preprocess_outputs = {name: _carried(name) for name in handed} | {TOKEN_COUNT: TOKEN_COUNT}
        preprocess = {
            "model": steps["image-preprocess"],
            "input_map": {name: name for name, *_ in inputs if name != CONTROL_LOG_ADDITIVE},
            "output_map": preprocess_outputs,
        }
        encoder_inputs = {name: _carried(name) for name in handed} | (
            {CONTROL_LOG_ADDITIVE: CONTROL_LOG_ADDITIVE} if controlled else {}
        )
        vector_encoder = steps["vision-controlled-encoder" if controlled else "vision-encoder"]
        layers_encoder = steps["vision-controlled-encoder" if controlled else "vision-layers-encoder"]
        encode = {"model": vector_encoder, "input_map": encoder_inputs}
        layer_steps = [
            # Only the layers ensembles take the image's mask, for the layer pooling.
            {**preprocess, "output_map": {**preprocess_outputs, ATTENTION_MASK: _carried(ATTENTION_MASK)}},
            {"model": layers_encoder, "input_map": encoder_inputs, "output_map": {HIDDEN_STATES: _carried(HIDDEN_STATES)}},
            pool_layers,
        ]
        pipelines = {
            "embedding": ([preprocess, {**encode, "output_map": {EMBEDDING: EMBEDDING}}], embedding),
            "layers": (layer_steps, pooled),
        }
        if compressed is not None:
            pipelines["compressed"] = (
                [preprocess, {**encode, "output_map": {EMBEDDING: _carried(EMBEDDING)}}, _compression_step(steps)],
                (EMBEDDING, "TYPE_FP32", [compressed]),
            )
        names = image_ensembles(manifest.name, compressed, controlled)
        for pipeline, (ensemble_steps, output_tensor) in pipelines.items():
            _write_ensemble(out_dir, names[pipeline], inputs, ensemble_steps, output_tensor, options)


def _write_python_step(
    steps: Mapping[str, str],
    role: str,
    inputs,
    outputs,
    out_dir: Path,
    options: RepositoryOptions,
    instances: int = 1,
    **params: str,
) -> Path:
    version_dir = _fresh_model_dir(out_dir / steps[role])
    _copy_step_source(role, version_dir)
    python_params = _python_params(options, **params)
    config = _model_config(steps[role], 'backend: "python"', inputs, outputs, options, params=python_params, instances=instances)
    (version_dir.parent / "config.pbtxt").write_text(config)
    return version_dir


def _copy_step_source(role: str, version_dir: Path) -> None:
    # GPU targets' "layers-encoder" (text_encoders) is the encoder step on the graph with every layer's hidden states.
    sources = {**STEP_ROLES, "layers-encoder": "encoder.py", **IMAGE_STEP_ROLES}
    shutil.copy(STEP_SOURCES / sources[role], version_dir / "model.py")
    # Triton's Python backend cannot import the repository's packages, so each step imports the names from beside itself.
    shutil.copy(TENSOR_NAMES, version_dir / "tensors.py")


def _fresh_model_dir(model_dir: Path) -> Path:
    """Clears what an earlier export wrote there."""
    version_dir = model_dir / "1"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version_dir.mkdir(parents=True)
    return version_dir
