"""What the benchmark ran on: cores, CPU model, memory and the versions that shape the figures."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

PACKAGES = ["nvidia-pytriton", "onnxruntime", "tokenizers", "tritonclient", "uvicorn", "grpcio", "numpy"]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def describe(extra: dict[str, str] | None = None) -> dict[str, str]:
    facts = {
        "cores (usable)": str(len(os.sched_getaffinity(0))),
        "CPU": _cpu_model(),
        "memory": f"{_memory_gib():.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for package in PACKAGES:
        try:
            facts[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            facts[package] = "not installed"
    facts.update(extra or {})
    return facts
