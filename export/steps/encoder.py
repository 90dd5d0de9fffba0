"""Encoder step for CPU deployments: onnxruntime on the exported ONNX.

The inputs allow ragged batches, so one execute gets every queued request whatever its padded length.
All their rows are pooled, cut to their real lengths, sorted by length and run in slices padded only to
each slice's longest row: the padding a length-sorted in-process caller would have, however the rows
arrived. Outputs go back to each request at the width it was sent with; padded positions hold zeros.

The same file serves the encoder with attention controls, whose graph also takes a factor per position
(CONTROL_FACTORS, gathered like the ids, 1 at padding) and a mode per row (CONTROL_LOG_ADDITIVE).

On a GPU (targets gpu-cuda and gpu-tensorrt-ep, repository_contract.targets) the same step runs one onnxruntime-gpu
session on the execution providers its config names, in slices as long as a batch. The NGC targets replace this model
with Triton's onnxruntime or tensorrt backend on the same tensor names. On every GPU target the layers ensembles get a
graph of their own (export.repository.text_encoders says why), so a graph may answer TOKEN_EMBEDDINGS alone.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# The export copies repository_contract/tensors.py next to this file: Triton cannot import the repository's packages.
sys.path.insert(0, str(Path(__file__).parent))
from tensors import (  # type: ignore[import-not-found]
    ATTENTION_MASK,
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    HIDDEN_STATES,
    INPUT_IDS,
    TOKEN_EMBEDDINGS,
    onnx_name,
)


class Siblings:
    """Whether another instance of this model is executing now, so this one can take every core or one.

    Each instance holds an exclusive flock on its own file while it executes and probes the others' files
    without blocking: microseconds per execute. A file left by a dead process holds no lock. The directory
    is per Triton process (the stub's parent), so two servers on one repository never wait on each other.
    """

    def __init__(self, repository: str, instance_name: str):
        key = hashlib.sha256(f"{os.getppid()}:{repository}".encode()).hexdigest()[:16]
        self.directory = Path(tempfile.gettempdir()) / f"triton-encoder-busy-{key}"
        self.directory.mkdir(exist_ok=True)
        self.own = open(self.directory / instance_name, "w")

    def __enter__(self) -> "Siblings":
        # Locking first means two instances starting together both see the other busy: never 4 threads on 2 cores.
        fcntl.flock(self.own, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.own, fcntl.LOCK_UN)

    def others_busy(self) -> bool:
        for path in self.directory.iterdir():
            if path.name == Path(self.own.name).name:
                continue
            with open(path) as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
        return False


CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def _parameters(config: dict) -> dict[str, str]:
    return {key: value["string_value"] for key, value in config["parameters"].items()}


def cpu_options(threads: int, spinning: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Threads that spin between a run's operators wake sooner than sleeping ones (a lone text sooner), but keep the
    # second core from the other instance when it starts during a run, which costs more under load: off by default
    # (bench/results/levers.md, "Spinning within a run"). When on, they stop at the run's end, not spin on idle.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _disabled_optimizers(fuse_skip_layer_norm: bool) -> list[str]:
    """onnxruntime's fusion of a residual Add and the LayerNormalization after it into one SkipLayerNormalization is
    off unless asked for: in the int8 graph that kernel took 12% of a one-threaded run, and the LayerNormalization
    left without it about a quarter as long, so the encoder ran 4-18% faster on one thread (how each instance runs
    under load), with the same STS Spearman (bench/results/levers.md, "SkipLayerNormalization unfused"). It does not
    fire on the fp32 graph."""
    return [] if fuse_skip_layer_norm else ["SkipLayerNormFusion"]


def cpu_session(model_file: Path, options: ort.SessionOptions, fuse_skip_layer_norm: bool) -> ort.InferenceSession:
    """A CPU session as the step makes each of its own and the one that writes the packed graph (bench.cpu_runtimes
    runs its graphs through it too), so that the optimizers that run are chosen in one place."""
    return ort.InferenceSession(
        str(model_file), options, providers=[CPU], disabled_optimizers=_disabled_optimizers(fuse_skip_layer_norm)
    )


def _this_cpu() -> str:
    """The processor's model and instruction sets: onnxruntime packs weights for the kernels this CPU runs."""
    with open("/proc/cpuinfo") as cpuinfo:
        return "".join(sorted({line for line in cpuinfo if line.startswith(("model name", "flags"))}))


def _packed_key(model_file: Path, fuse_skip_layer_norm: bool) -> str:
    # The optimizers that ran shape the graph as much as the model file does.
    disabled = ",".join(_disabled_optimizers(fuse_skip_layer_norm))
    digest = hashlib.sha256(f"{ort.__version__}\n{_this_cpu()}\n{disabled}".encode())
    with open(model_file, "rb") as graph:
        digest.update(hashlib.file_digest(graph, "sha256").digest())
    return digest.hexdigest()[:24]


def packed_graph(model_file: Path, model_name: str, fuse_skip_layer_norm: bool) -> Path:
    """The graph as onnxruntime optimizes it for this CPU, its weights packed for its kernels, in an external data file
    that every session of every instance maps rather than copies.

    Each session otherwise packs a private copy of the weights, and an instance keeps two sessions: with two instances
    taking turns, a lone text found its instance's weights cold in the cache, which cost about 1 ms a text
    (bench/results/levers.md, "Weights shared by every session"). Written once per model file, onnxruntime version and
    CPU, into EMBED_PACKED_GRAPHS (TritonProcess: the run directory's packed-graphs) under the model's name; another
    file of that name's is removed then (a process that maps it keeps its pages until it closes them).
    """
    root = os.environ.get("EMBED_PACKED_GRAPHS") or str(Path(tempfile.gettempdir()) / "embed-packed-graphs")
    cache = Path(root) / model_name
    cache.mkdir(parents=True, exist_ok=True)
    key = _packed_key(model_file, fuse_skip_layer_norm)
    with open(cache / ".lock", "w") as lock:
        # The instances of a model start together: one writes, the others wait for it and map what it wrote.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / key / "model.onnx").exists():
            staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=cache))
            options = cpu_options(threads=1, spinning=False)
            # Not onnxruntime's warning that the graph suits this CPU alone: the key holds the CPU for that reason.
            options.log_severity_level = 3
            options.optimized_model_filepath = str(staging / "model.onnx")
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            cpu_session(model_file, options, fuse_skip_layer_norm)
            staging.rename(cache / key)
        for other in cache.iterdir():
            # Older graphs of this name, and what a writer killed midway left.
            if other.name not in (key, ".lock"):
                shutil.rmtree(other)
    return cache / key / "model.onnx"


class CpuSessions:
    """Under load every instance runs one-threaded (no thread contention); alone, one request's runs use every core,
    which cuts the latency of a lone request."""

    def __init__(self, model_file: Path, config: dict, args: dict):
        params = _parameters(config)
        spinning = params["thread_spinning"] == "1"
        fuse = params.get("fuse_skip_layer_norm") == "1"
        shared = params.get("shared_weights") == "1"
        graph = self._shared_graph(model_file, args["model_name"], fuse) if shared else model_file
        self.busy = cpu_session(graph, cpu_options(int(params["intra_op_threads"]), spinning), fuse)
        self.alone = cpu_session(graph, cpu_options(int(params["alone_intra_op_threads"]), spinning), fuse)
        self.siblings = Siblings(args["model_repository"], args["model_instance_name"])

    @staticmethod
    def _shared_graph(model_file: Path, model_name: str, fuse_skip_layer_norm: bool) -> Path:
        try:
            return packed_graph(model_file, model_name, fuse_skip_layer_norm)
        except Exception as error:
            # The same vectors come from the exported graph, a little slower for a lone text: not worth refusing to start.
            pb_utils.Logger.log_warn(f"{model_name}: serving {model_file} with weights per session: {error}")
            return model_file

    def executing(self) -> Siblings:
        return self.siblings

    def session(self) -> ort.InferenceSession:
        # Chosen per slice, not per batch: a long batch started alone gives up the second core within one slice of
        # another instance starting.
        return self.busy if self.siblings.others_busy() else self.alone

    def close(self) -> None:
        self.siblings.own.close()


def _gpu_provider_options(name: str, params: dict[str, str], inputs: dict[str, list[int]]) -> dict:
    """inputs: each graph input's dims after the batch axis, as the config gives them (-1: the tokens)."""
    options: dict = {"device_id": int(params.get("device_id", "0"))}
    if name == TENSORRT:
        # One engine for every shape a batch can have (rows up to a slice, tokens up to the longest input), built once
        # and cached, so that no new batch shape stops the step for an engine build.
        rows, length = int(params["slice_rows"]), int(params["max_sequence_length"])

        def shapes(batch: int, tokens: int) -> str:
            return ",".join(f"{n}:{batch}x{'x'.join(str(tokens if d == -1 else d) for d in dims)}" for n, dims in inputs.items())

        cache = os.environ.get("EMBED_TENSORRT_CACHE") or str(Path(tempfile.gettempdir()) / "embed-tensorrt-engines")
        Path(cache).mkdir(parents=True, exist_ok=True)
        options |= {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
            "trt_fp16_enable": params.get("precision") == "fp16",
            "trt_profile_min_shapes": shapes(1, 1),
            "trt_profile_opt_shapes": shapes(rows, min(length, 128)),
            "trt_profile_max_shapes": shapes(rows, length),
        }
    return options


class GpuSession:
    """One session on the GPU for every run: a GPU runs one batch at a time whichever thread asks, so the CPU's
    busy/alone pair would only hold the weights twice. The device is the first one CUDA shows (CUDA_VISIBLE_DEVICES
    picks it): the instances are KIND_CPU to Triton, so that Triton itself never needs CUDA."""

    def __init__(self, model_file: Path, config: dict, args: dict):
        params = _parameters(config)
        wanted = params["execution_providers"].split(",")
        inputs = {onnx_name(i["name"]): [int(d) for d in i["dims"]] for i in config["input"]}
        providers = [(name, _gpu_provider_options(name, params, inputs)) for name in wanted]
        # onnxruntime-gpu finds CUDA's and cuDNN's libraries in the nvidia-* wheels bin/setup --gpu installs only
        # once they are loaded; a system-wide CUDA needs nothing.
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(model_file), options, providers=providers)
        running = [name for name in self._session.get_providers() if name in wanted]
        if not running:
            raise RuntimeError(
                f"this export's target runs the encoder on {', '.join(wanted)}, which this onnxruntime "
                f"({ort.__version__}, {ort.get_device()}) cannot start; it offers {ort.get_available_providers()}. "
                "Install onnxruntime-gpu with `bin/setup --gpu` on a machine with an NVIDIA GPU and driver, or export with --target cpu"
            )
        if running[0] != wanted[0]:
            pb_utils.Logger.log_warn(f"{args['model_name']}: {wanted[0]} could not start; running on {running[0]}")

    def executing(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def session(self) -> ort.InferenceSession:
        return self._session

    def close(self) -> None:
        pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = _parameters(config)
        model_file = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        # Configs written before GPU targets name no providers: they are CPU ones.
        on_cpu = params.get("execution_providers", CPU) == CPU
        self.sessions = CpuSessions(model_file, config, args) if on_cpu else GpuSession(model_file, config, args)
        self.slice_rows = int(params["slice_rows"])
        graph = self.sessions.session()
        self.controlled = onnx_name(CONTROL_FACTORS) in {i.name for i in graph.get_inputs()}
        # The exported outputs name their axes: [batch, sequence, hidden] and [batch, layers, sequence, hidden].
        self.output_axes = {o.name: o.shape for o in graph.get_outputs()}
        # Where the sequence axis is in one row of each output the graph has.
        self.row_sequence_axis = {
            name: self.output_axes[onnx_name(name)].index("sequence") - 1
            for name in (TOKEN_EMBEDDINGS, HIDDEN_STATES)
            if onnx_name(name) in self.output_axes
        }

    def finalize(self):
        # Triton calls this when it unloads the model; a caller without Triton (bench.gpu_check) does too.
        self.sessions.close()

    def execute(self, requests):
        # Requests that want the same outputs share onnxruntime runs (the layers pipeline wants HIDDEN_STATES).
        by_outputs: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            by_outputs.setdefault(tuple(sorted(request.requested_output_names())), []).append(index)
        responses = [None] * len(requests)
        with self.sessions.executing():
            for wanted, members in by_outputs.items():
                group = [requests[i] for i in members]
                try:
                    answers = [pb_utils.InferenceResponse(output_tensors=t) for t in self._encode(group, wanted)]
                except Exception:
                    # A malformed request (shapes that disagree, ids outside the vocabulary) fails its whole group's
                    # run. Then each runs alone, so that only it fails; the rare failure pays, not every batch.
                    answers = [self._encode_alone(request, wanted) for request in group]
                for index, answer in zip(members, answers):
                    responses[index] = answer
        return responses

    def _encode_alone(self, request, wanted: tuple):
        try:
            (tensors,) = self._encode([request], wanted)
        except Exception as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"encoder: {error}"))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _encode(self, requests, wanted: tuple) -> list[list]:
        ids = [self._input(r, INPUT_IDS) for r in requests]
        masks = [self._input(r, ATTENTION_MASK) for r in requests]
        for request_ids, mask in zip(ids, masks):
            # The gather below reads each row's length from its mask: one that disagrees would be answered wrong.
            if request_ids.ndim != 2 or mask.shape != request_ids.shape:
                raise ValueError(f"{INPUT_IDS} {request_ids.shape} and {ATTENTION_MASK} {mask.shape} must be [rows, width] alike")
        all_ids = np.concatenate([a.reshape(-1) for a in ids])
        # Row r of the pooled batch starts at starts[r] in the flattened inputs and has lengths[r] real tokens.
        widths = np.concatenate([np.full(a.shape[0], a.shape[1]) for a in ids])
        starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
        lengths = np.concatenate([m.sum(axis=1) for m in masks])
        first_row = np.concatenate([[0], np.cumsum([a.shape[0] for a in ids])])
        if self.controlled:
            all_factors = np.concatenate([self._input(r, CONTROL_FACTORS).reshape(-1) for r in requests])
            modes = np.concatenate([self._input(r, CONTROL_LOG_ADDITIVE).reshape(-1) for r in requests])

        outputs = {name: [np.zeros(self._output_shape(name, *a.shape), dtype=np.float32) for a in ids] for name in wanted}
        request_of_row = np.repeat(np.arange(len(ids)), [a.shape[0] for a in ids])
        order = np.argsort(lengths, kind="stable")
        for begin in range(0, len(order), self.slice_rows):
            rows = order[begin : begin + self.slice_rows]
            width = max(int(lengths[rows].max()), 1)
            columns = starts[rows, None] + np.arange(width)
            valid = np.arange(width) < lengths[rows, None]
            gathered = np.minimum(columns, len(all_ids) - 1)
            feeds = {
                onnx_name(INPUT_IDS): np.where(valid, all_ids[gathered], 0),
                onnx_name(ATTENTION_MASK): valid.astype(np.int64),
            }
            if self.controlled:
                feeds[onnx_name(CONTROL_FACTORS)] = np.where(valid, all_factors[gathered], 1.0).astype(np.float32)
                feeds[onnx_name(CONTROL_LOG_ADDITIVE)] = modes[rows, None]
            results = self.sessions.session().run([onnx_name(name) for name in wanted], feeds)
            for name, result in zip(wanted, results):
                for slot, row in enumerate(rows):
                    request = request_of_row[row]
                    target = outputs[name][request][row - first_row[request]]
                    real = (slice(None),) * self.row_sequence_axis[name] + (slice(0, lengths[row]),)
                    target[real] = result[slot][real]
        return [[pb_utils.Tensor(name, outputs[name][i]) for name in wanted] for i in range(len(ids))]

    @staticmethod
    def _input(request, name: str) -> np.ndarray:
        return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

    def _output_shape(self, name: str, rows: int, width: int) -> tuple:
        axes = self.output_axes[onnx_name(name)]
        return (rows, *(width if axis == "sequence" else axis for axis in axes[1:]))
