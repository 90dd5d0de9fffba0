"""Images per second: the service against raw onnxruntime on the same vision graph, preprocessing included.

    .venv/bin/python -m bench.images                      # about 3 minutes; writes bench/results/images.md and .json
    .venv/bin/python -m bench.images --smoke --out DIR    # about a minute, export and start included: proves it runs

The model is a tiny CLIP-style dual encoder with random weights (harness/tiny_models.py: weights cannot be downloaded
here), built in the run's work dir and exported by `python -m export` with its defaults next to all-MiniLM (copied
from model_repository) into a scratch repository. Its vision tower sees 32x32 pixels through 3 layers of width 48,
so encoding an image costs a small fraction of what decoding and resizing the photo costs: these figures measure the
image pipeline around the encoder (base64, the gateway, Triton's preprocessing step, batching), not what a real
CLIP's encoder costs. The report says how the time splits.

Images: the 11 files of export/photos.py (scikit-image's photographs as PNG, JPEG, WebP and GIF, 1 KB to 427 KB,
24x24 to 512x512, colour, grayscale, palette and alpha), sent in turn, so that every point sees the same mix.
Measured in one run:
1. raw onnxruntime in this process on the exported vision graph (the `<model>-vision-encoder` step's model.onnx),
   each image preprocessed by the step's own ImageProcessor (its image_processor.json), with as many onnxruntime
   threads as the service's vision-encoder instances have together: one image at a time, and batches of 8, 16 and
   32 images whose preprocessing runs in this thread or on a pool of as many threads as the preprocessing step has
   instances;
2. the service (gateway + Triton), after a check that it answers raw onnxruntime's vectors: one image per
   POST /semantic_embed at concurrency 1 and 8, and 16 and 32 one-image prompts per POST /batch_semantic_embed at
   concurrency 1 and 2, from the throughput suite's closed-loop load generator in its own process;
3. raw onnxruntime's best point again, to show how far the machine drifted during the run.
Each service point is set against its raw counterpart: a single image at c1 against one image at a time, single
images at cN against a raw batch of N, and requests of B images (at any concurrency) against a raw batch of B, each
batch preprocessed on the pool; and against raw onnxruntime's best point.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench import requests
from bench.cli import command_line, fresh_work_dir
from bench.machine import describe
from bench.report import markdown_table as table
from bench.throughput import RESULTS, Plan, Runner, progress, service_pids, serving
from export.photos import sample_files
from export.steps.image_processing import PROCESSOR_FILE, ImageProcessor
from harness.repositories import copy_model
from harness.servers import MODEL_REPOSITORY, ROOT
from harness.tiny_models import IMAGE_SIZE, PATCH, VISION_HIDDEN, VISION_LAYERS
from repository_contract.manifest import manifest_path, read
from repository_contract.tensors import EMBEDDING, PIXEL_VALUES, onnx_name

MODEL = "tiny-clip"
MINILM = "all-minilm-l6-v2"
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class ImagesPlan:
    load: Plan  # the load generator's warm-up and measured window (the throughput suite's)
    raw_duration_s: float  # at least this long per raw point, in whole passes over the files
    raw_points: list[tuple[int, bool]]  # (images per call, preprocessing on the pool)
    service_points: list[tuple[int, int]]  # (images per request, concurrency)

    @staticmethod
    def full() -> ImagesPlan:
        raw = [(1, False)] + [(batch, pooled) for batch in (8, 16, 32) for pooled in (False, True)]
        return ImagesPlan(Plan.full(), 6.0, raw, [(1, 1), (1, 8), (16, 1), (32, 1), (16, 2), (32, 2)])

    @staticmethod
    def smoke() -> ImagesPlan:
        return ImagesPlan(Plan.smoke(), 0.5, [(1, False), (8, True), (16, False), (16, True)], [(1, 1), (1, 8), (16, 1)])


@dataclass(frozen=True)
class RawPoint:
    images_per_call: int
    preprocess_threads: int
    images_per_s: float
    p50_ms: float  # per call: one image, or one batch
    p99_ms: float
    preprocess_ms_per_image: float
    encode_ms_per_image: float
    calls: int

    @property
    def label(self) -> str:
        if self.images_per_call == 1:
            return "one image at a time"
        threads = "in 1 thread" if self.preprocess_threads == 1 else f"on a pool of {self.preprocess_threads} threads"
        return f"batch {self.images_per_call}, preprocessing {threads}"


def _step_config(repository: Path, step: str) -> tuple[int, dict[str, str]]:
    """A Python-backend step's instance count and parameters, from the config.pbtxt the export wrote."""
    text = (repository / step / "config.pbtxt").read_text()
    count = re.search(r"instance_group \[\{ count: (\d+)", text)
    if count is None:
        raise ValueError(f"{step}/config.pbtxt has no instance count")
    return int(count.group(1)), dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))


class RawImages:
    """The exported vision graph in this process, each image preprocessed by the image-preprocess step's own code and
    parameters: what a caller embedding images in-process would do."""

    def __init__(self, repository: Path, model: str):
        steps = read(manifest_path(repository, model)).steps
        preprocess, encoder = steps["image-preprocess"], steps["vision-encoder"]
        self.processor = ImageProcessor.from_json((repository / preprocess / "1" / PROCESSOR_FILE).read_text())
        instances, params = _step_config(repository, encoder)
        # The service's vision-encoder instances run side by side, each with its own onnxruntime threads.
        self.threads = instances * int(params["intra_op_threads"])
        self.pool_threads = _step_config(repository, preprocess)[0]
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(repository / encoder / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def _pixels(self, files: list[bytes], pool: ThreadPoolExecutor | None) -> np.ndarray:
        return np.stack(list(pool.map(self.processor, files)) if pool else [self.processor(f) for f in files])

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([onnx_name(EMBEDDING)], {onnx_name(PIXEL_VALUES): pixels})[0]

    def embed(self, files: list[bytes]) -> np.ndarray:
        return self._encode(self._pixels(files, None))

    def measure(self, files: list[bytes], batch: int, pooled: bool, duration_s: float) -> RawPoint:
        """Images per second over whole passes of requests.image_groups(files, batch), at least duration_s long,
        after one warm-up call."""
        groups = requests.image_groups(files, batch)
        threads = self.pool_threads if pooled else 1
        with ThreadPoolExecutor(threads) if pooled else nullcontext() as pool:
            self._encode(self._pixels(groups[0], pool))
            latencies, preprocessing, encoding = [], 0.0, 0.0
            start = time.perf_counter()
            while True:
                for group in groups:
                    began = time.perf_counter()
                    pixels = self._pixels(group, pool)
                    preprocessed = time.perf_counter()
                    self._encode(pixels)
                    done = time.perf_counter()
                    latencies.append(done - began)
                    preprocessing += preprocessed - began
                    encoding += done - preprocessed
                elapsed = time.perf_counter() - start
                if elapsed >= duration_s:
                    break
        images = len(latencies) * batch
        return RawPoint(
            batch,
            threads,
            images / elapsed,
            1000 * float(np.percentile(latencies, 50)),
            1000 * float(np.percentile(latencies, 99)),
            1000 * preprocessing / images,
            1000 * encoding / images,
            len(latencies),
        )


def build_repository(work: Path) -> Path:
    """The tiny CLIP built and exported next to all-MiniLM (as model_repository holds it) into work/repository."""
    model_dir, repository, log = work / MODEL, work / "repository", work / "export.log"
    progress(f"building the tiny CLIP and exporting it next to {MINILM} into {repository} (log: {log})")
    copy_model(MODEL_REPOSITORY, repository, MINILM)
    for command in (
        [sys.executable, "-m", "harness.tiny_models", str(model_dir)],
        [sys.executable, "-m", "export", "--output-dir", str(repository), "--model-dir", str(model_dir), "--name", MODEL],
    ):
        with log.open("a") as out:
            done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[1:3])} exited {done.returncode}:\n{log.read_text()[-3000:]}")
    return repository


def _post(url: str, body: bytes) -> dict:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def check_answers(http_url: str, raw: RawImages, files: list[bytes]) -> float:
    """The least cosine between the service's vector of each file (one /batch_semantic_embed request of all of them,
    and one /semantic_embed request of the first) and raw onnxruntime's; fails below MIN_COSINE."""
    batch = requests.image_bodies(MODEL, files, len(files))[0]
    served = np.array(_post(http_url + requests.BATCH_SEMANTIC_EMBED, batch)["embeddings"])
    single = requests.image_bodies(MODEL, files[:1], 1)[0]
    served = np.vstack([served, _post(http_url + requests.SEMANTIC_EMBED, single)["embedding"]])
    expected = raw.embed(files + files[:1])
    cosine = (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    if cosine.min() < MIN_COSINE:
        raise RuntimeError(f"the service's image vectors differ from raw onnxruntime's: cosines {cosine.round(6)}")
    return float(cosine.min())


def measure_service(runner: Runner, repository: Path, raw: RawImages, files: list[bytes], plan: ImagesPlan) -> float:
    """Every service point into runner.measurements; returns check_answers' least cosine."""
    with serving(runner, "service", repository) as service:
        cosine = check_answers(service.http_url, raw, files)
        progress(f"the service answers raw onnxruntime's vectors: least cosine {cosine:.6f}")
        pids = service_pids(service)
        for per_request, concurrency in plan.service_points:
            single = per_request == 1
            target = requests.SEMANTIC_EMBED if single else requests.BATCH_SEMANTIC_EMBED
            runner.measure(
                "service",
                service.http_port,
                "http",
                target.strip("/"),
                "photos",
                requests.image_bodies(MODEL, files, per_request),
                per_request,
                concurrency,
                pids,
                service,
                target=target,
            )
    return cosine


def counterpart(m: dict, raw: list[dict]) -> dict:
    """Service point m's raw point: one image at a time for a single image at c1, a batch of N for single images at
    cN, a batch of B for requests of B images; batches preprocessed on the pool."""
    images = m["texts_per_request"] if m["texts_per_request"] > 1 else m["concurrency"]
    return max((r for r in raw if r["images_per_call"] == images), key=lambda r: r["preprocess_threads"])


def _point(m: dict) -> str:
    if m["texts_per_request"] == 1:
        return f"one image per /semantic_embed request, c{m['concurrency']}"
    return f"{m['texts_per_request']} images per /batch_semantic_embed request, c{m['concurrency']}"


def markdown(run: dict) -> str:
    raw, measurements = run["raw"], run["measurements"]
    best = max(raw, key=lambda r: r["images_per_s"])
    biggest = max(raw, key=lambda r: (r["images_per_call"], -r["preprocess_threads"]))
    share = biggest["preprocess_ms_per_image"] / (biggest["preprocess_ms_per_image"] + biggest["encode_ms_per_image"])
    files = run["files"]
    lines = [
        "# Images per second: the service against raw onnxruntime on the same vision graph",
        "",
        f"Made by `{run['command'].strip()}` from {run['started']} to {run['finished']}; every figure below is from that one run.",
        "",
        f"**The model is a tiny CLIP with random weights** (`harness/tiny_models.py`: weights cannot be downloaded here), "
        f"exported by `python -m export` with its defaults next to {MINILM}. Its vision tower sees "
        f"**{IMAGE_SIZE}x{IMAGE_SIZE} pixels** through {VISION_LAYERS} transformer layers of width {VISION_HIDDEN} "
        f"({(IMAGE_SIZE // PATCH) ** 2 + 1} image tokens), so the encoder is almost free and **preprocessing "
        f"dominates**: in raw onnxruntime at batch {biggest['images_per_call']} an image took "
        f"{biggest['preprocess_ms_per_image']:.2f} ms to decode, convert, resize and normalize and "
        f"{biggest['encode_ms_per_image']:.3f} ms to encode ({share:.0%} of its time was preprocessing). These figures "
        "therefore measure the image pipeline around the encoder (base64, the gateway, Triton's preprocessing step and "
        "batching), not a real CLIP: with ViT-B/32 (224x224, 12 layers of width 768) the encoder would take most of the "
        "time and the ratios below would say little about it.",
        "",
        f"Images: the {len(files)} files of `export/photos.py` (scikit-image's photographs) sent in turn, so every "
        f"point sees the same mix, {run['mean_file_kib']:.0f} KiB on average: "
        + ", ".join(f"{name} ({size / 1024:.0f} KiB)" for name, size in files.items())
        + ". Service requests carry them in base64, one image item per prompt, uncropped.",
        "",
        f"Raw onnxruntime: the exported vision graph in-process with {run['raw_threads']} onnxruntime threads (the "
        "service's vision-encoder instances together), each image preprocessed by the image-preprocess step's own "
        "`ImageProcessor` from its `image_processor.json`; a batch's images are preprocessed in one thread or on a pool "
        f"of {run['pool_threads']} threads (as many as the preprocessing step has instances). The service: "
        f"{run['load']['warmup_s']:g} s warm-up, {run['load']['duration_s']:g} s measured per point, closed loop "
        "(each caller keeps one request in flight), the throughput suite's load generator in its own process; before "
        f"the load, its vectors of every file matched raw onnxruntime's (least cosine {run['least_cosine']:.6f}).",
        "",
        "## Result",
        "",
        "Ratio: service images/s over its raw counterpart's: one image at a time for a single image at c1, a batch of "
        "N for single images at cN, a batch of B for requests of B images (at any concurrency), each batch "
        "preprocessed on the pool. Latency is per request (raw: per call).",
        "",
    ]
    rows = []
    for m in measurements:
        r = counterpart(m, raw)
        rows.append(
            [
                _point(m),
                r["label"],
                f"{r['images_per_s']:.0f}",
                f"{m['texts_per_s']:.0f}",
                f"{m['texts_per_s'] / r['images_per_s']:.2f}",
                f"{m['texts_per_s'] / best['images_per_s']:.2f}",
                f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
                f"{m['p50_ms']:.1f} / {m['p99_ms']:.1f}",
            ]
        )
    lines += table(
        [
            "service point",
            "raw counterpart",
            "raw images/s",
            "service images/s",
            "ratio",
            f"ratio to raw best ({best['images_per_s']:.0f})",
            "raw p50 / p99 ms",
            "service p50 / p99 ms",
        ],
        rows,
    )
    lines += ["", "## Raw onnxruntime", ""]
    lines += table(
        ["point", "images/s", "p50 ms", "p99 ms", "preprocessing ms/image", "encoder ms/image", "calls"],
        [
            [
                r["label"],
                f"{r['images_per_s']:.0f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['preprocess_ms_per_image']:.2f}",
                f"{r['encode_ms_per_image']:.3f}",
                r["calls"],
            ]
            for r in raw
        ],
    )
    end = run["raw_best_at_end"]
    lines += [
        "",
        "Preprocessing ms/image on the pool is wall time shared by its threads. The best point measured again after the "
        f"service: {end['images_per_s']:.0f} images/s ({end['images_per_s'] / best['images_per_s'] - 1:+.0%}), how much "
        "the machine drifted during the run.",
        "",
        "## Service",
        "",
        "Encoder batch: images per vision-encoder execution (Triton's statistics). CPU: share of one core per component "
        "over the point, warm-up included; `encoder` counts every `-encoder` step's stubs, and only the vision encoder "
        "had work; the machine has "
        f"{run['machine']['cores (usable)']} cores. The image-preprocess step has {run['pool_threads']} instances and "
        "decodes a request's images one after another in one of them, so one batch request at a time keeps one "
        "instance busy; images are preprocessed on as many instances as there are requests in flight.",
        "",
    ]
    # The components that worked (the text pipelines' steps idle at 0%).
    busy = {k for m in measurements for k, v in m["cpu_share"].items() if v >= 0.005}
    components = sorted(busy, key=lambda k: (k != "gateway", k))
    lines += table(
        [
            "route",
            "images/request",
            "concurrency",
            "requests/s",
            "images/s",
            "p50 ms",
            "p99 ms",
            "encoder batch",
            *(f"CPU {name.removeprefix(MODEL + '-')}" for name in components),
            "load generator CPU",
            "machine idle",
            "errors",
        ],
        [
            [
                f"/{m['encoding']}",
                m["texts_per_request"],
                m["concurrency"],
                f"{m['requests_per_s']:.1f}",
                f"{m['texts_per_s']:.0f}",
                f"{m['p50_ms']:.1f}",
                f"{m['p99_ms']:.1f}",
                f"{m['encoder_batch']:.1f}" if m["encoder_batch"] else "-",
                *(f"{100 * m['cpu_share'].get(name, 0):.0f}%" for name in components),
                f"{100 * m['loadgen_cpu_share']:.0f}%",
                f"{100 * m['machine_idle']:.0f}%",
                m["errors"],
            ]
            for m in measurements
        ],
    )
    lines += ["", "## Machine", "", *table(["", ""], [[k, v] for k, v in run["machine"].items()])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.images", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="short points, fewer of them: proves the bench runs")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"directory for images.md and .json (default {RESULTS.relative_to(ROOT)}; a temp dir with --smoke)",
    )
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".bench", help="the scratch repository, servers' logs")
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="images-")) if args.smoke else RESULTS)
    if args.smoke and out.resolve() == RESULTS.resolve():
        parser.error(f"a smoke run's figures do not belong in {RESULTS}")
    plan = ImagesPlan.smoke() if args.smoke else ImagesPlan.full()
    work = fresh_work_dir(args.work_dir, "images-")
    run: dict = {
        "command": command_line(".venv/bin/python -m bench.images", argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": describe(),
        "load": {"warmup_s": plan.load.warmup_s, "duration_s": plan.load.duration_s},
    }
    progress(f"machine: {run['machine']['cores (usable)']} cores, {run['machine']['CPU']}; work dir {work}")
    named = sample_files()
    files = list(named.values())
    run["files"] = {name: len(data) for name, data in named.items()}
    run["mean_file_kib"] = sum(run["files"].values()) / len(files) / 1024

    try:
        run.update(measure(work, files, plan))
    finally:
        # The scratch repository (all-MiniLM's copy, a few hundred MB) and the last load's bodies; the logs stay.
        for scratch in (work / "repository", work / MODEL):
            shutil.rmtree(scratch, ignore_errors=True)
        (work / "spec.pickle").unlink(missing_ok=True)
    run["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")

    text = markdown(run)
    print(text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images.md").write_text(text)
    (out / "images.json").write_text(json.dumps(run, indent=1) + "\n")
    progress(f"wrote {out / 'images.md'} and {out / 'images.json'}")
    return 0


def measure(work: Path, files: list[bytes], plan: ImagesPlan) -> dict:
    """Raw onnxruntime, the service, raw onnxruntime's best point again: the run's figures."""
    run: dict = {}
    repository = build_repository(work)
    raw = RawImages(repository, MODEL)
    run["raw_threads"], run["pool_threads"] = raw.threads, raw.pool_threads
    points = []
    for batch, pooled in plan.raw_points:
        point = raw.measure(files, batch, pooled, plan.raw_duration_s)
        points.append(point)
        progress(
            f"raw onnxruntime, {point.label}: {point.images_per_s:.0f} images/s, p50 {point.p50_ms:.1f} ms, "
            f"preprocessing {point.preprocess_ms_per_image:.2f} ms/image, encoder {point.encode_ms_per_image:.3f} ms/image"
        )
    run["raw"] = [{**asdict(p), "label": p.label} for p in points]

    runner = Runner(plan.load, work)
    run["least_cosine"] = measure_service(runner, repository, raw, files, plan)
    run["measurements"] = [asdict(m) for m in runner.measurements]

    best = max(points, key=lambda p: p.images_per_s)
    again = raw.measure(files, best.images_per_call, best.preprocess_threads > 1, plan.raw_duration_s)
    run["raw_best_at_end"] = {**asdict(again), "label": again.label}
    progress(f"raw onnxruntime, {again.label}, again at the end: {again.images_per_s:.0f} images/s")
    return run


if __name__ == "__main__":
    sys.exit(main())
