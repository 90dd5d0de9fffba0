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


# The instructions that decide which int8 and bf16 kernels onnxruntime and OpenVINO run (and int8's exactness, see
# export.onnx_export.quantize_int8).
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _vector_instructions() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "none of " + " ".join(VECTOR_FLAGS)
    return "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def describe(extra: dict[str, str] | None = None) -> dict[str, str]:
    facts = {
        "cores (usable)": str(len(os.sched_getaffinity(0))),
        "CPU": _cpu_model(),
        "vector instructions": _vector_instructions(),
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
