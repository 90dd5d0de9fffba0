"""Pooling step: masked mean over the token embeddings, L2-normalized when the model's modules ask for it."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def masked_mean(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    mask = attention_mask[..., None].astype(np.float32)
    return (token_embeddings * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.normalize = config["parameters"]["normalize"]["string_value"] == "true"

    def execute(self, requests):
        responses = []
        for request in requests:
            embeddings = masked_mean(
                pb_utils.get_input_tensor_by_name(request, "TOKEN_EMBEDDINGS").as_numpy(),
                pb_utils.get_input_tensor_by_name(request, "ATTENTION_MASK").as_numpy(),
            )
            if self.normalize:
                embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("EMBEDDING", embeddings)]))
        return responses
