"""Model repositories for tests and benchmarks: an exported model's Triton models copied into another repository."""

from __future__ import annotations

import shutil
from pathlib import Path

from repository_contract.manifest import manifest_path, read


def copy_model(source_repository: Path, target_repository: Path, name: str) -> None:
    """One exported model's Triton models, as its manifest lists them (steps, ensembles and the manifest's own)."""
    for directory in read(manifest_path(source_repository, name)).directories:
        shutil.copytree(
            source_repository / directory, target_repository / directory, ignore=shutil.ignore_patterns("__pycache__")
        )
