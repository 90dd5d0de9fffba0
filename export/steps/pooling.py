"""Pooling step: what the model does after its transformer (pooling, Dense layers, Normalize) on the token embeddings.

The head itself, and its weights, sit next to this file (sentence_head.py, head.json, head.npz): the export
checked that same code against sentence-transformers before writing it here. So do the tensor names (tensors.py, a
copy of repository_contract/tensors.py): Triton cannot import the repository's packages.
"""

import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from sentence_head import SentenceHead  # type: ignore[import-not-found]  # next to this file in Triton, see above
from tensors import ATTENTION_MASK, EMBEDDING, TOKEN_EMBEDDINGS  # type: ignore[import-not-found]


class TritonPythonModel:
    def initialize(self, args):
        self.head = SentenceHead.load(Path(args["model_repository"]) / args["model_version"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                embeddings = self.head(
                    pb_utils.get_input_tensor_by_name(request, TOKEN_EMBEDDINGS).as_numpy(),
                    pb_utils.get_input_tensor_by_name(request, ATTENTION_MASK).as_numpy(),
                )
            except Exception as error:  # a malformed request (shapes that disagree) fails alone, not its batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"pooling: {error}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(EMBEDDING, embeddings)]))
        return responses
