"""Vision-encoder step: onnxruntime on an exported vision graph, PIXEL_VALUES in, its one output (the `output`
parameter) out.

Two models of one model's image pipeline run this file. vision-encoder's graph is the model's get_image_features (the
vision tower's class token, layer-normed and projected) followed by whatever modules the sentence-transformers model
applies after it (Normalize, say), so its EMBEDDING is the vector sentence-transformers' encode(PIL image) gives.
vision-layers-encoder's graph answers the vision tower's HIDDEN_STATES [layers + 1, image tokens, hidden], which the
image layers ensemble pools. Every image has the same shape, so one execute runs all its requests' rows in slices of
`slice_rows`; a request whose rows the graph refuses fails alone.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# The export copies repository_contract/tensors.py next to this file: Triton cannot import the repository's packages.
sys.path.insert(0, str(Path(__file__).parent))
from tensors import EMBEDDING, HIDDEN_STATES, PIXEL_VALUES, onnx_name  # type: ignore[import-not-found]


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
        self.output = params["output"]
        if self.output not in (EMBEDDING, HIDDEN_STATES):
            raise ValueError(f"vision-encoder: the output {self.output!r} is not {EMBEDDING} or {HIDDEN_STATES}")

    def execute(self, requests):
        pixels = [pb_utils.get_input_tensor_by_name(r, PIXEL_VALUES).as_numpy() for r in requests]
        try:
            answered = self._encode(np.concatenate(pixels))
        except Exception:
            # A malformed request (another image size) fails the whole batch's run; then each runs alone, so that
            # only it fails.
            return [self._answer_alone(p) for p in pixels]
        ends = np.cumsum([len(p) for p in pixels])
        return [self._answer(rows) for rows in np.split(answered, ends[:-1])]

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        runs = [
            self.session.run([onnx_name(self.output)], {onnx_name(PIXEL_VALUES): pixels[begin : begin + self.slice_rows]})[0]
            for begin in range(0, len(pixels), self.slice_rows)
        ]
        return np.concatenate(runs).astype(np.float32)

    def _answer_alone(self, pixels: np.ndarray):
        try:
            return self._answer(self._encode(pixels))
        except Exception as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"vision-encoder: {error}"))

    def _answer(self, rows: np.ndarray):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, rows)])
