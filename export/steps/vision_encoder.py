"""Vision-encoder step: onnxruntime on an exported vision graph, PIXEL_VALUES in, the outputs each request asks for out.

Three models of one model's image pipeline run this file. vision-encoder's graph is the model's get_image_features (the
vision tower's class token, layer-normed and projected) followed by whatever modules the sentence-transformers model
applies after it (Normalize, say), so its EMBEDDING is the vector sentence-transformers' encode(PIL image) gives.
vision-layers-encoder's graph answers the vision tower's HIDDEN_STATES [layers + 1, image tokens, hidden], which the
image layers ensemble pools. vision-controlled-encoder's graph answers both under attention controls: it also takes
CONTROL_FACTORS (one per image token) and CONTROL_LOG_ADDITIVE per row. Every image has the same shape, so one
execute runs all its requests' rows in slices of `slice_rows`; a request whose rows the graph refuses fails alone.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# The export copies repository_contract/tensors.py next to this file: Triton cannot import the repository's packages.
sys.path.insert(0, str(Path(__file__).parent))
from tensors import (  # type: ignore[import-not-found]
    CONTROL_FACTORS,
    CONTROL_LOG_ADDITIVE,
    EMBEDDING,
    HIDDEN_STATES,
    PIXEL_VALUES,
    onnx_name,
)


class TritonPythonModel:
    def initialize(self, args):
        params = {key: value["string_value"] for key, value in json.loads(args["model_config"])["parameters"].items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["intra_op_threads"])
        options.inter_op_num_threads = 1
        # Spinning threads would take CPU from the other steps between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model_file = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.slice_rows = int(params["slice_rows"])
        # The graph's inputs beyond the pixels (the controls, for the controlled graph), as config.pbtxt names them.
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self.inputs = [PIXEL_VALUES] + [
            name for name in (CONTROL_FACTORS, CONTROL_LOG_ADDITIVE) if onnx_name(name) in graph_inputs
        ]
        # What a request that names no output gets: every output of the graph.
        graph_outputs = {o.name for o in self.session.get_outputs()}
        self.outputs = tuple(name for name in (EMBEDDING, HIDDEN_STATES) if onnx_name(name) in graph_outputs)

    def execute(self, requests):
        # Requests that want the same outputs share onnxruntime runs (only /embed's layers want HIDDEN_STATES).
        by_outputs: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            by_outputs.setdefault(tuple(sorted(request.requested_output_names())) or self.outputs, []).append(index)
        responses = [None] * len(requests)
        for wanted, members in by_outputs.items():
            feeds = [
                {name: pb_utils.get_input_tensor_by_name(requests[i], name).as_numpy() for name in self.inputs} for i in members
            ]
            try:
                answered = self._encode({name: np.concatenate([f[name] for f in feeds]) for name in self.inputs}, wanted)
            except Exception:
                # A malformed request (another image size) fails the whole batch's run; then each runs alone, so that
                # only it fails.
                answers = [self._answer_alone(f, wanted) for f in feeds]
            else:
                ends = np.cumsum([len(f[PIXEL_VALUES]) for f in feeds])[:-1]
                split = {name: np.split(rows, ends) for name, rows in answered.items()}
                answers = [self._answer({name: split[name][k] for name in wanted}) for k in range(len(feeds))]
            for index, answer in zip(members, answers):
                responses[index] = answer
        return responses

    def _encode(self, feeds: dict[str, np.ndarray], wanted: tuple) -> dict[str, np.ndarray]:
        runs = [
            self.session.run(
                [onnx_name(name) for name in wanted],
                {onnx_name(name): rows[begin : begin + self.slice_rows] for name, rows in feeds.items()},
            )
            for begin in range(0, len(feeds[PIXEL_VALUES]), self.slice_rows)
        ]
        return {name: np.concatenate([run[k] for run in runs]).astype(np.float32) for k, name in enumerate(wanted)}

    def _answer_alone(self, feeds: dict[str, np.ndarray], wanted: tuple):
        try:
            return self._answer(self._encode(feeds, wanted))
        except Exception as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"vision-encoder: {error}"))

    @staticmethod
    def _answer(outputs: dict[str, np.ndarray]):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, rows) for name, rows in outputs.items()])
