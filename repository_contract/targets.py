"""Where an export's encoders run: the `--target` of `python -m export`, in one table that the export, the encoder
step's config and the gateway's model listings all read.

Two routes reach a GPU. The pip route keeps this project's Python-backend encoder step and gives its onnxruntime a GPU
execution provider (`onnxruntime-gpu`, installed by `bin/setup --gpu`): it runs on the Triton that pip installs
(nvidia-pytriton ships only the Python backend). The NGC route hands the encoder to Triton's own onnxruntime or
TensorRT backend, which only NVIDIA's container images carry.
"""

from __future__ import annotations

from dataclasses import dataclass

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


@dataclass(frozen=True)
class Target:
    name: str
    # The encoder is this project's Python-backend step (export/steps/encoder.py), which takes ragged batches; else it
    # is a Triton backend, which batches equal shapes only and so needs length buckets.
    python_encoder: bool
    gpu: bool
    # onnxruntime's execution providers, most wanted first; the Python-backend step needs the first unless a later
    # one is named as its fallback. Empty where onnxruntime does not run the encoder (TensorRT plans).
    execution_providers: tuple[str, ...]
    runtime: str  # in words, for the banner and the model listings


TARGETS = {
    target.name: target
    for target in (
        Target("cpu", True, False, (CPU,), "onnxruntime on the CPU, in Triton's Python backend"),
        Target("gpu-cuda", True, True, (CUDA,), "onnxruntime-gpu's CUDA provider, in Triton's Python backend"),
        # TensorRT's provider builds an engine per shape profile and caches it in the run directory; without
        # TensorRT's libraries the step runs on CUDA and says so in Triton's log.
        Target(
            "gpu-tensorrt-ep", True, True, (TENSORRT, CUDA), "onnxruntime-gpu's TensorRT provider, in Triton's Python backend"
        ),
        Target("gpu-onnxruntime", False, True, (CUDA,), "Triton's onnxruntime backend (NGC image)"),
        Target("gpu-tensorrt", False, True, (), "Triton's TensorRT backend, plans built by trtexec (NGC image)"),
    )
}


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}") from None
