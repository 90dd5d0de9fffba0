"""The GPU check: the encoder step on onnxruntime-gpu against the CPU export, and raw onnxruntime-gpu's speed.

    python -m bench.gpu_check [--repository DIR] [--fp16-repository DIR] [--service DIR [--workers N ...]] [--smoke]
                              [--out FILE]

1. Parity. Every STS sentence's vector from the encoder step (export/steps/encoder.py, loaded as Triton's Python
   backend loads it, through harness.python_backend) on each GPU provider this onnxruntime offers (CUDA, and
   TensorRT where its libraries are), for the fp32 repository and the fp16 one if given, against the same step on the
   CPU provider on the fp32 graph: min and mean cosine and max abs difference, held to the export's bounds for the
   precision (export.validate.MIN_COSINE). The requests are ragged, several to an execute, as Triton batches them.
2. Raw onnxruntime on the same provider at batch sizes 1 to 256 (texts/s, p50 ms per batch): tokenized, encoded and
   pooled in this process, as bench.raw_onnxruntime does on the CPU.
3. With --service DIR: the service on that export (single texts at a concurrency sweep, and 100-text requests) beside
   raw's best batch, in the same run; with --workers, single texts at WORKER_CONCURRENCY from several load generators
   with each `--workers N` given, and the gateway's and Triton's CPU per request: what one GPU host carries.

Without a GPU (no CUDA provider, or no device) it says so and checks the CPU path the same way: the suite's smoke test
runs it, so that the check cannot rot. It needs only the packages installed (bin/setup --gpu on a GPU host) and
exports made beforehand (python -m export --target gpu-cuda [--precision fp16]); nothing is downloaded. Parity and
raw speed import no gateway code, so a GPU host without the service's packages runs them too.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from bench.machine import describe
from export.datasets import DEFAULT_STS_PATH, sts_sentences
from export.steps.sentence_head import SentenceHead
from export.validate import MIN_COSINE
from harness import python_backend
from repository_contract.targets import CPU, CUDA, TENSORRT
from repository_contract.tensors import ATTENTION_MASK, INPUT_IDS, TOKEN_EMBEDDINGS, onnx_name

ROOT = Path(__file__).resolve().parent.parent
FULL_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SMOKE_BATCHES = [1, 8]
TEXTS_PER_REQUEST = 16  # rows of one request in the parity check; several requests make one execute
# The gateway-workers rows: callers in all, split over load generator processes (one Python process alone tops out
# near one gateway worker's ceiling), and the measured window.
WORKER_CONCURRENCY, WORKER_GENERATORS, WORKER_WINDOW_S = 256, 4, 8.0


def progress(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Repository:
    """What the check reads of an export: the encoder graph, the tokenizer and the sentence head."""

    path: Path
    precision: str
    encoder_dir: Path  # the encoder step's model directory; its graph is 1/model.onnx
    tokenizer: Tokenizer
    head: SentenceHead
    max_sequence_length: int
    pad_token_id: int

    @classmethod
    def read(cls, path: Path) -> Repository:
        (manifest_path,) = path.glob("*/embedding_manifest.json")
        manifest = json.loads(manifest_path.read_text())
        tokenizer = Tokenizer.from_file(str(path / manifest["tokenizer"]))
        tokenizer.no_padding()
        tokenizer.enable_truncation(manifest["max_sequence_length"])
        return cls(
            path,
            manifest["precision"],
            path / manifest["steps"]["encoder"],
            tokenizer,
            SentenceHead.load(path / manifest["steps"]["pooling"] / "1"),
            manifest["max_sequence_length"],
            manifest["pad_token_id"],
        )

    def batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids and mask, right-padded to the longest text, as the tokenizer step pads a request."""
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        return ids, mask


def gpu_providers() -> list[str]:
    """The GPU providers this onnxruntime offers that can start on this machine: onnxruntime-gpu lists CUDA's even
    where no device or driver is, so each one is tried on a one-node graph."""
    offered = [p for p in (TENSORRT, CUDA) if p in ort.get_available_providers()]
    if offered and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA's and cuDNN's libraries from the nvidia-* wheels, as the encoder step loads them
    return [p for p in offered if _starts(p)]


def _starts(provider: str) -> bool:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[provider])
    except Exception:  # any failure to start means the provider is not usable here
        return False
    return provider in session.get_providers()


def _step_args(repository: Repository, providers: list[str], rows: int) -> dict[str, str]:
    """What Triton would pass the encoder step of this repository's graph, run on `providers`."""
    parameters = {
        "execution_providers": ",".join(providers),
        "intra_op_threads": "1",
        "alone_intra_op_threads": "1",
        "thread_spinning": "0",
        # On the CPU in slices of 8, as its export does; on a GPU one slice per execute, as a gpu-* export does.
        "slice_rows": "8" if providers == [CPU] else str(rows),
        "max_sequence_length": str(repository.max_sequence_length),
        "precision": repository.precision,
    }
    config = {
        "input": [{"name": INPUT_IDS, "dims": ["-1"]}, {"name": ATTENTION_MASK, "dims": ["-1"]}],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }
    return python_backend.triton_args(repository.encoder_dir, config)


def step_vectors(repository: Repository, providers: list[str], texts: list[str], lock_dir: Path) -> np.ndarray:
    """Each text's sentence vector from the encoder step on `providers`, the texts sent as ragged requests of
    TEXTS_PER_REQUEST, every 8 requests in one execute, as Triton's dynamic batcher hands them over."""
    groups = [texts[i : i + TEXTS_PER_REQUEST] for i in range(0, len(texts), TEXTS_PER_REQUEST)]
    step = python_backend.load_step("encoder", _step_args(repository, providers, 8 * TEXTS_PER_REQUEST), lock_dir)
    vectors = []
    try:
        for first in range(0, len(groups), 8):
            batches = [repository.batch(group) for group in groups[first : first + 8]]
            requests = [
                python_backend.request({INPUT_IDS: ids, ATTENTION_MASK: mask}, [TOKEN_EMBEDDINGS]) for ids, mask in batches
            ]
            for (_, mask), response in zip(batches, step.execute(requests)):
                vectors.append(repository.head(python_backend.output(response, TOKEN_EMBEDDINGS), mask))
    finally:
        step.finalize()
    return np.concatenate(vectors)


@dataclass(frozen=True)
class Parity:
    label: str
    precision: str
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float

    @property
    def bound(self) -> tuple[float, float]:
        return MIN_COSINE[self.precision]

    @property
    def passes(self) -> bool:
        least, mean = self.bound
        return self.min_cosine >= least and self.mean_cosine >= mean


def parity(label: str, precision: str, vectors: np.ndarray, reference: np.ndarray) -> Parity:
    cosine = (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    return Parity(label, precision, float(cosine.min()), float(cosine.mean()), float(np.abs(vectors - reference).max()))


def _session(repository: Repository, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(repository.encoder_dir / "1" / "model.onnx"), options, providers=[provider])


def raw_vectors(repository: Repository, session: ort.InferenceSession, texts: list[str]) -> np.ndarray:
    """The texts' sentence vectors from onnxruntime itself: one padded batch, pooled by the export's head."""
    ids, mask = repository.batch(texts)
    feeds = {onnx_name(INPUT_IDS): ids, onnx_name(ATTENTION_MASK): mask}
    (tokens,) = session.run([onnx_name(TOKEN_EMBEDDINGS)], feeds)
    return repository.head(tokens, mask)


@dataclass(frozen=True)
class Speed:
    label: str
    texts_per_s: float
    p50_ms: float  # of a batch, or of a request
    errors: int = 0


def raw_speed(repository: Repository, provider: str, texts: list[str], batch_sizes: list[int]) -> list[Speed]:
    """Texts/s of tokenizing, encoding and pooling `texts` sorted by length, a batch at a time, in this process."""
    session = _session(repository, provider)
    ordered = sorted(texts, key=len)
    results = []
    for size in batch_sizes:
        batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        raw_vectors(repository, session, batches[len(batches) // 2])  # the first run of a shape allocates
        timings = []
        started = time.perf_counter()
        for batch in batches:
            began = time.perf_counter()
            raw_vectors(repository, session, batch)
            timings.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - started
        label = f"raw onnxruntime {repository.precision} on {provider}, batch {size}"
        results.append(Speed(label, len(ordered) / elapsed, 1000 * float(np.median(timings))))
        progress(f"{label}: {results[-1].texts_per_s:.0f} texts/s, p50 {results[-1].p50_ms:.2f} ms a batch")
    return results


def _gpu_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none found (nvidia-smi absent or failing)"


def _onnxruntime_package() -> str:
    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"onnxruntime {ort.__version__} (no package metadata)"


def service_speeds(repository: Path, texts: list[str], smoke: bool, work: Path) -> list[Speed]:
    """The service on `repository`: single texts at a concurrency sweep, and 100-text requests (bench.throughput's
    runner, so the figures are measured as bin/bench measures them)."""
    from bench.throughput import Plan, Runner, endpoint, served_model, service_pids, serving

    plan = Plan.smoke() if smoke else Plan.full()
    runner = Runner(plan, work)
    model = served_model(repository)
    with serving(runner, "gpu-check service", repository) as service:
        pids = service_pids(service)
        port, build = endpoint(service, "http")
        for concurrency in plan.concurrencies:
            runner.measure(
                "service", port, "http", "float", "sentences", build(model, texts, 1, "float"), 1, concurrency, pids, service
            )
        hundreds = build(model, texts, 100, "float")
        runner.measure("service", port, "http", "float", "sentences", hundreds, 100, plan.batch_concurrency, pids, service)
    return [
        Speed(f"service, {m.texts_per_request} text(s) a request, c{m.concurrency}", m.texts_per_s, m.p50_ms, m.errors)
        for m in runner.measurements
    ]


def worker_speeds(repository: Path, texts: list[str], workers: list[int], work: Path) -> list[Speed]:
    """Single texts at WORKER_CONCURRENCY on the service with each `--workers N`."""
    from bench import gateway_processes
    from bench.requests import openai_bodies
    from bench.throughput import served_model
    from harness.servers import start_service

    bodies = openai_bodies(served_model(repository), texts, 1, "float")
    speeds = []
    for count in workers:
        progress(f"the service with --workers {count}: single texts, {WORKER_CONCURRENCY} callers")
        service = start_service(work / f"workers-{count}", repository, ["--workers", str(count)])
        try:
            row = gateway_processes.load(
                service, count, bodies, WORKER_CONCURRENCY, WORKER_WINDOW_S, work, generators=WORKER_GENERATORS
            )
        finally:
            service.stop()
        label = (
            f"service --workers {count}, 1 text a request, c{WORKER_CONCURRENCY} (CPU per request: gateway "
            f"{row['gateway_ms_per_request']:.2f} ms, Triton {row['triton_ms_per_request']:.2f} ms; machine idle "
            f"{100 * row['machine_idle']:.0f}%)"
        )
        speeds.append(Speed(label, row["requests_per_s"], row["p50_ms"], row["errors"]))
        progress(f"{label}: {row['requests_per_s']:.0f} texts/s")
    return speeds


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository", help="an fp32 export (any target)")
    parser.add_argument("--fp16-repository", type=Path, default=None, help="an fp16 export of the same model, checked too")
    parser.add_argument("--texts", type=Path, default=DEFAULT_STS_PATH, help="STS file whose sentences are embedded")
    parser.add_argument("--smoke", action="store_true", help="128 sentences and batch sizes 1 and 8 (the suite's run)")
    parser.add_argument("--service", type=Path, default=None, help="also measure the service on this export")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[], help="with --service: also single texts with each --workers N"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the tables here as Markdown")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".bench", help="where this run's lock files and logs go")
    args = parser.parse_args(argv)
    texts = sts_sentences(args.texts)[: 128 if args.smoke else None]
    batch_sizes = SMOKE_BATCHES if args.smoke else FULL_BATCHES
    fp32 = Repository.read(args.repository)
    if fp32.precision != "fp32":
        sys.exit(f"bench.gpu_check: --repository must be an fp32 export; {args.repository} is {fp32.precision}")
    repositories = [fp32] + ([Repository.read(args.fp16_repository)] if args.fp16_repository else [])
    gpus = gpu_providers()
    machine = describe({"onnxruntime package": _onnxruntime_package(), "GPU": _gpu_name()})
    if gpus:
        progress(f"GPU providers that start here: {', '.join(gpus)} ({machine['GPU']})")
    else:
        progress(
            f"no GPU: {_onnxruntime_package()} offers {ort.get_available_providers()} and none of CUDA's or TensorRT's "
            "starts here; checking the CPU path instead (the step on the CPU provider against onnxruntime itself)"
        )
    checked = gpus or [CPU]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # Kept, as every bench run's is: the service's logs are there.
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.work_dir))
    progress(f"parity: {len(texts)} sentences through the encoder step, the CPU provider's fp32 vectors the reference")
    reference = step_vectors(fp32, [CPU], texts, work)
    results: list[Parity] = []
    for repository in repositories:
        for provider in checked:
            # The step as its target runs it: TensorRT's provider with CUDA's for what TensorRT cannot take.
            providers = [provider, CUDA] if provider == TENSORRT else [provider]
            vectors = step_vectors(repository, providers, texts, work)
            results.append(
                parity(f"encoder step {repository.precision} on {'+'.join(providers)}", repository.precision, vectors, reference)
            )
            progress(f"{results[-1]}: {'passes' if results[-1].passes else 'FAILS'}")
    if not gpus:
        # Without a GPU the step on the CPU is checked against onnxruntime on one unpadded text at a time.
        session = _session(fp32, CPU)
        single = np.concatenate([raw_vectors(fp32, session, [text]) for text in texts])
        results.append(parity("raw onnxruntime fp32 on the CPU, one text a run", "fp32", single, reference))
        progress(f"{results[-1]}: {'passes' if results[-1].passes else 'FAILS'}")
    speeds = [
        s for repository in repositories for provider in checked for s in raw_speed(repository, provider, texts, batch_sizes)
    ]
    best = max(s.texts_per_s for s in speeds if s.label.startswith("raw onnxruntime fp32"))
    if args.service:
        speeds += service_speeds(args.service, texts, args.smoke, work)
        speeds += worker_speeds(args.service, texts, args.workers, work)
    lines = [
        "# GPU check",
        "",
        f"Made by `python -m bench.gpu_check {' '.join(argv if argv is not None else sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}.",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        f"- providers checked: {', '.join(checked)}" + ("" if gpus else " (no GPU provider starts here)"),
        "",
        "## Parity against the encoder step on the CPU provider, fp32",
        "",
        *_table(
            ["what", "min cosine", "mean cosine", "max abs diff", "bound (min, mean)", "verdict"],
            [
                [
                    p.label,
                    f"{p.min_cosine:.6f}",
                    f"{p.mean_cosine:.6f}",
                    f"{p.max_abs_diff:.2e}",
                    f"{p.bound[0]}, {p.bound[1]}",
                    "passes" if p.passes else "FAILS",
                ]
                for p in results
            ],
        ),
        "",
        f"## Speed ({len(texts)} STS sentences sorted by length; ratio to raw fp32's best batch, {best:.0f} texts/s)",
        "",
        *_table(
            ["what", "texts/s", "ratio", "p50 ms (a batch, or a request)", "errors"],
            [[s.label, f"{s.texts_per_s:.0f}", f"{s.texts_per_s / best:.2f}", f"{s.p50_ms:.2f}", str(s.errors)] for s in speeds],
        ),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        progress(f"wrote {args.out}")
    return 0 if all(p.passes for p in results) else 1


if __name__ == "__main__":
    sys.exit(main())
