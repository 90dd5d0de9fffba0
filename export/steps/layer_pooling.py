"""Layer pooling step for /embed: every pooling of every layer's hidden states, masked over padding.

Output POOLED is [layers + 1, poolings, hidden] in the order of the `poolings` parameter; the gateway
picks the layers and poolings a request asked for. A fixed output shape lets the dynamic batcher merge
/embed requests whatever they ask for, and the reductions cost little next to the encoder run.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# The export copies repository_contract/tensors.py next to this file: Triton cannot import the repository's packages.
sys.path.insert(0, str(Path(__file__).parent))
from tensors import ATTENTION_MASK, HIDDEN_STATES, POOLED  # type: ignore[import-not-found]


def mean(states, mask):
    return (states * mask).sum(axis=2) / np.maximum(mask.sum(axis=2), 1e-9)


def weighted_mean(states, mask):
    # Position-weighted mean: token i (1-based) weighs i, so later tokens count more.
    weights = mask * np.arange(1, mask.shape[2] + 1, dtype=np.float32)[None, None, :, None]
    return (states * weights).sum(axis=2) / np.maximum(weights.sum(axis=2), 1e-9)


def max_(states, mask):
    return np.where(mask > 0, states, -np.inf).max(axis=2)


def last_token(states, mask):
    # Sequences are right-padded, so the last real token sits at (number of real tokens - 1).
    last = (mask[:, 0, :, 0].sum(axis=1).astype(np.int64) - 1).clip(min=0)
    return states[np.arange(states.shape[0]), :, last, :]


def abs_max(states, mask):
    return np.where(mask > 0, np.abs(states), 0.0).max(axis=2)


POOLINGS = {"mean": mean, "weighted_mean": weighted_mean, "max": max_, "last_token": last_token, "abs_max": abs_max}


def pool_all(hidden_states: np.ndarray, attention_mask: np.ndarray, names: list[str]) -> np.ndarray:
    """hidden_states [batch, layers, seq, hidden], attention_mask [batch, seq] -> [batch, layers, poolings, hidden]."""
    mask = attention_mask[:, None, :, None].astype(np.float32)
    return np.stack([POOLINGS[name](hidden_states, mask) for name in names], axis=2).astype(np.float32)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.poolings = config["parameters"]["poolings"]["string_value"].split(",")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                pooled = pool_all(
                    pb_utils.get_input_tensor_by_name(request, HIDDEN_STATES).as_numpy(),
                    pb_utils.get_input_tensor_by_name(request, ATTENTION_MASK).as_numpy(),
                    self.poolings,
                )
            except Exception as error:  # a malformed request (shapes that disagree) fails alone, not its batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"layer pooling: {error}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(POOLED, pooled)]))
        return responses
