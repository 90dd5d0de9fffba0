"""Compression step: projects sentence embeddings to a smaller size with the matrix the export fitted.

The export writes projection.npy next to this file, [size, dims]: PCA directions fitted on a
calibration corpus, or for a Matryoshka model the identity's first rows, i.e. plain truncation, so
one step serves both.
"""

import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# The export copies repository_contract/tensors.py next to this file: Triton cannot import the repository's packages.
sys.path.insert(0, str(Path(__file__).parent))
from tensors import EMBEDDING  # type: ignore[import-not-found]


class TritonPythonModel:
    def initialize(self, args):
        components = np.load(Path(args["model_repository"]) / args["model_version"] / "projection.npy")
        self.components_t = np.ascontiguousarray(components.T.astype(np.float32))

    def execute(self, requests):
        responses = []
        for request in requests:
            embeddings = pb_utils.get_input_tensor_by_name(request, EMBEDDING).as_numpy()
            try:
                projected = pb_utils.Tensor(EMBEDDING, embeddings @ self.components_t)
            except ValueError as error:  # a request of another width fails alone, not its batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"compression: {error}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[projected]))
        return responses
