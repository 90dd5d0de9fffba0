"""Encoder step for CPU deployments: onnxruntime on the exported ONNX.

The inputs allow ragged batches, so one execute gets every queued request whatever its padded length.
All their rows are pooled, cut to their real lengths, sorted by length and run in slices padded only to
each slice's longest row: the padding a length-sorted in-process caller would have, however the rows
arrived. Outputs go back to each request at the width it was sent with; padded positions hold zeros.

The same file serves the encoder with attention controls, whose graph also takes a factor per position
(CONTROL_FACTORS, gathered like the ids, 1 at padding) and a mode per row (CONTROL_LOG_ADDITIVE).

GPU deployments replace this model with Triton's onnxruntime or tensorrt backend on the same tensor
names, where the layers ensembles get a graph of their own (export.repository.text_encoders says why).
"""

import fcntl
import hashlib
import json
import os
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


def _session(model_file: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads would take CPU from the other instance and the other steps between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config["parameters"].items()}
        model_file = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        # Under load every instance runs one-threaded (no thread contention); alone, one request's runs
        # use every core, which cuts the latency of a lone request.
        self.busy_session = _session(model_file, int(params["intra_op_threads"]))
        self.alone_session = _session(model_file, int(params["alone_intra_op_threads"]))
        self.siblings = Siblings(args["model_repository"], args["model_instance_name"])
        self.slice_rows = int(params["slice_rows"])
        self.controlled = onnx_name(CONTROL_FACTORS) in {i.name for i in self.busy_session.get_inputs()}
        # The exported outputs name their axes: [batch, sequence, hidden] and [batch, layers, sequence, hidden].
        self.output_axes = {o.name: o.shape for o in self.busy_session.get_outputs()}
        # Where the sequence axis is in one row of each output.
        self.row_sequence_axis = {
            name: self.output_axes[onnx_name(name)].index("sequence") - 1 for name in (TOKEN_EMBEDDINGS, HIDDEN_STATES)
        }

    def execute(self, requests):
        # Requests that want the same outputs share onnxruntime runs (the layers pipeline wants HIDDEN_STATES).
        by_outputs: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            by_outputs.setdefault(tuple(sorted(request.requested_output_names())), []).append(index)
        responses = [None] * len(requests)
        with self.siblings:
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
            # Chosen per slice, not per batch: a long batch started alone gives up the second core within
            # one slice of another instance starting.
            session = self.busy_session if self.siblings.others_busy() else self.alone_session
            results = session.run([onnx_name(name) for name in wanted], feeds)
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
