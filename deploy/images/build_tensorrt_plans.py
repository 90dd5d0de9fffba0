"""Builds the TensorRT plan of every encoder that a --target gpu-tensorrt export left for it, on this machine's GPU.

  python3 build_tensorrt_plans.py MODEL_REPOSITORY

A plan fits the GPU model and the TensorRT version it was built with, so the chart runs this at each Triton pod's
start, as an init container in TensorRT's image of the Triton image's release (nvcr.io/nvidia/tensorrt:24.10-py3,
trtexec on its PATH). Each manifest names its model's steps; every one whose config asks for a plan (the text
encoders: plain, for the layers ensembles, with attention controls) gets one, each input with one optimization
profile, from one row of one token to max_batch_size rows of max_sequence_length tokens, and fp16 kernels for an fp16
export. A plan already there is kept, so a restarted init container does not build it again. The export prints the
same commands (trtexec_command) for a gpu-tensorrt repository. Standard library only, for Python 3.8 on: TensorRT's
image has none of the project's packages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

MANIFEST = "embedding_manifest.json"
PLAN_PLATFORM = 'platform: "tensorrt_plan"'
ONNX_NAME = "model.onnx.for-trtexec"
PLAN_NAME = "model.plan"
# The length TensorRT tunes its kernels for within the profile: above most sentences, below the model's limit.
OPT_LENGTH = 128
# One input of the config the export wrote: { name: "input_ids" data_type: TYPE_INT64 dims: [-1] }
INPUT = re.compile(r'\{\s*name:\s*"(?P<name>\w+)"\s+data_type:\s*\w+\s+dims:\s*\[(?P<dims>[^\]]*)\]')


def encoder_inputs(config: str) -> list[tuple[str, list[int]]]:
    """Each input's name and dims without the batch, where -1 is the sequence."""
    block = config[config.index("input [") : config.index("output [")]
    return [(m["name"], [int(d) for d in m["dims"].split(",")]) for m in INPUT.finditer(block)]


def profile(inputs: list[tuple[str, list[int]]], max_rows: int, max_length: int) -> list[str]:
    def shapes(rows: int, length: int) -> str:
        return ",".join(
            f"{name}:" + "x".join(str(d) for d in [rows] + [length if d == -1 else d for d in dims]) for name, dims in inputs
        )

    return [
        f"--minShapes={shapes(1, 1)}",
        f"--optShapes={shapes(max_rows, min(OPT_LENGTH, max_length))}",
        f"--maxShapes={shapes(max_rows, max_length)}",
    ]


def plan_models(repository: Path, manifest: dict) -> list[Path]:
    """The directories of the manifest's Triton models that are served from a TensorRT plan."""
    steps = [repository / step for step in manifest["steps"].values()]
    return [step for step in steps if PLAN_PLATFORM in (step / "config.pbtxt").read_text()]


def trtexec_command(model_dir: Path, manifest: dict, plan: Path) -> list[str]:
    """trtexec building `plan` from the graph the export left in model_dir."""
    inputs = encoder_inputs((model_dir / "config.pbtxt").read_text())
    return [
        "trtexec",
        f"--onnx={model_dir / '1' / ONNX_NAME}",
        f"--saveEngine={plan}",
        *profile(inputs, manifest["max_batch_size"], manifest["max_sequence_length"]),
        *(["--fp16"] if manifest["precision"] == "fp16" else []),
        "--skipInference",
    ]


def build(model_dir: Path, manifest: dict) -> None:
    plan = model_dir / "1" / PLAN_NAME
    if plan.exists():
        print(f"{plan} is there, kept", flush=True)
        return
    # Written aside and renamed when complete: a build cut short never leaves a plan the next start would keep.
    partial = plan.with_name(PLAN_NAME + ".partial")
    command = trtexec_command(model_dir, manifest, partial)
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    os.replace(partial, plan)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    repository = Path(argv[1])
    manifests = [json.loads(path.read_text()) for path in sorted(repository.glob(f"*/{MANIFEST}"))]
    if not manifests:
        print(f"build_tensorrt_plans: no {MANIFEST} under {repository}", file=sys.stderr)
        return 2
    for manifest in manifests:
        if manifest["target"] != "gpu-tensorrt":
            print(f"{manifest['name']} was exported for {manifest['target']}: no plan to build", flush=True)
            continue
        for model_dir in plan_models(repository, manifest):
            build(model_dir, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
