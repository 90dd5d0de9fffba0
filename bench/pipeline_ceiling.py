"""The pipeline's ceiling: a bench-only copy of an exported repository whose encoder step costs nothing.

Everything but the encoder is the export's own: tokenizer, pooling, compression, the ensembles, their configs
(batching, instances) and the manifest the gateway reads. The encoder keeps its config, so Triton schedules it
as it would the real one, but its model.py is bench/zero_encoder.py, which answers zeros of the declared shapes.
A service on the copy shows the most requests the rest of the pipeline can carry, whatever the encoder.

Its vectors are zeros: the copy is written under a bench run's work dir, never into model_repository/, and
never shipped. The ONNX is left out since the zero encoder never opens it (about 90 MB for all-MiniLM).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.servers import MODEL_REPOSITORY
from repository_contract.manifest import read_all

LABEL = "pipeline ceiling"
ZERO_ENCODER = Path(__file__).with_name("zero_encoder.py")


def build(repository: Path, target: Path) -> Path:
    """Writes the copy of `repository` (a CPU export) to `target`, which must not exist yet; returns `target`."""
    if target.resolve().is_relative_to(MODEL_REPOSITORY.resolve()):
        raise ValueError(f"the pipeline-ceiling repository must stay out of {MODEL_REPOSITORY}: its vectors are zeros")
    # GPU exports give the encoder to Triton's onnxruntime or TensorRT backend, with lower-case tensor names.
    (manifest,) = read_all(repository)
    steps = manifest.steps
    # Both encoders, the plain one and the one with attention controls, answer zeros.
    encoders = [steps["encoder"], steps["controlled-encoder"]]
    if any('backend: "python"' not in (repository / encoder / "config.pbtxt").read_text() for encoder in encoders):
        raise ValueError(f"{repository} is not a CPU export: its encoders are not Python-backend steps")
    shutil.copytree(repository, target, ignore=shutil.ignore_patterns("model.onnx", "__pycache__"))
    for encoder in encoders:
        shutil.copy(ZERO_ENCODER, target / encoder / "1" / "model.py")
    return target
