"""Compression step: projects sentence embeddings to a smaller size with the matrix the export fitted.

The export writes projection.npz next to this file: `mean` (subtracted first) and `components`
(size x dims). PCA fills both from a calibration corpus; a Matryoshka model gets a zero mean and the
identity's first rows, i.e. plain truncation, so one step serves both.
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        fitted = np.load(Path(args["model_repository"]) / args["model_version"] / "projection.npz")
        self.mean = fitted["mean"].astype(np.float32)
        self.components_t = np.ascontiguousarray(fitted["components"].T.astype(np.float32))

    def execute(self, requests):
        responses = []
        for request in requests:
            embeddings = pb_utils.get_input_tensor_by_name(request, "EMBEDDING").as_numpy()
            projected = (embeddings - self.mean) @ self.components_t
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("EMBEDDING", projected)]))
        return responses
