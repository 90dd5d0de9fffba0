"""Encoder step for CPU deployments: onnxruntime on the exported ONNX, one run per batch shape.

GPU deployments replace this model with Triton's onnxruntime or tensorrt backend on the same ONNX and
the same tensor names.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config["parameters"].items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["intra_op_threads"])
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model_file = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.output_names = {"TOKEN_EMBEDDINGS": "token_embeddings", "HIDDEN_STATES": "hidden_states"}

    def execute(self, requests):
        # The dynamic batcher merges only equal shapes, but a batch can still hold several shapes when
        # requests arrive with different buckets; each shape gets its own onnxruntime run.
        groups: dict[tuple, list[int]] = {}
        inputs = []
        for index, request in enumerate(requests):
            ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy()
            mask = pb_utils.get_input_tensor_by_name(request, "ATTENTION_MASK").as_numpy()
            inputs.append((ids, mask))
            wanted = tuple(sorted(request.requested_output_names()))
            groups.setdefault((ids.shape[1], wanted), []).append(index)
        responses = [None] * len(requests)
        for (_, wanted), members in groups.items():
            feeds = {
                "input_ids": np.concatenate([inputs[i][0] for i in members]),
                "attention_mask": np.concatenate([inputs[i][1] for i in members]),
            }
            outputs = self.session.run([self.output_names[name] for name in wanted], feeds)
            start = 0
            for i in members:
                rows = inputs[i][0].shape[0]
                tensors = [pb_utils.Tensor(name, out[start : start + rows]) for name, out in zip(wanted, outputs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += rows
        return responses
