"""Bench-only encoder step: zeros of the shapes the real encoder answers, computed in no time.

bench.pipeline_ceiling installs this file as <model>-encoder/1/model.py in a copy of an exported repository, so a
service on that copy costs everything but the encoder's work: the Triton hop to the step is kept, onnxruntime
is not. It runs only inside Triton's Python backend; it is never part of model_repository/ or of an export.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# The export put repository_contract/tensors.py next to the real encoder's model.py, which this file replaces.
sys.path.insert(0, str(Path(__file__).parent))
from tensors import INPUT_IDS  # type: ignore[import-not-found]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # One row's dims as the export declared them, -1 for the sequence: TOKEN_EMBEDDINGS [-1, hidden] and
        # HIDDEN_STATES [layers + 1, -1, hidden] (JSON gives int64 dims as strings).
        self.row_dims = {output["name"]: [int(d) for d in output["dims"]] for output in config["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            # Ragged batching: each request keeps its own [rows, width], and its outputs must match it.
            rows, width = pb_utils.get_input_tensor_by_name(request, INPUT_IDS).as_numpy().shape
            tensors = [
                pb_utils.Tensor(name, np.zeros((rows, *(width if d == -1 else d for d in self.row_dims[name])), dtype=np.float32))
                # Only what the pipeline asked for, like the real step: the layers pipeline wants HIDDEN_STATES alone.
                for name in request.requested_output_names()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
