"""optimum's graph optimizer and quantizer (issue 25) against the present export, raw and in-process, in one run.

optimum (optimum-onnx 0.1.0, optimum 2.1.0) co-installs with serving's and the export's locks, but the product does not
depend on it: it lives in `.venv-optimum` (bench/optimum/requirements.lock), built on first use, where
bench/optimum/convert.py writes its variants of the exported fp32 encoder. They are then measured here as
bench.cpu_runtimes measures its levers (bench.cpu_runtimes.compare: texts/s at 1 and all threads, one text's p50, STS
Spearman and its drop, cosine to fp32, alone against batched), beside the export's own fp32 and served int8:

- optimum O2: onnxruntime's transformer fusions, as `bench.transformer_fusion` applies them by hand;
- optimum O3: O2 with GELU approximated;
- optimum's dynamic int8, AVX2 and AVX-512 VNNI configurations: per-channel weights, one activation scale per run.

    python -m bench.optimum_levers [--rounds 2] [--pairs N] [--out bench/results/optimum_levers.md]
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

from bench.cli import fresh_work_dir
from bench.cpu_runtimes import Config, exported_fp32, lever_parser, onnxruntime_runner, write_comparison
from bench.throughput import ROOT, progress
from export.datasets import read_sts_pairs
from export.onnx_export import quantize_int8

LOCK = ROOT / "bench" / "optimum" / "requirements.lock"
VARIANTS = {
    "O2": "optimum O2 (transformer fusions), slices of 8",
    "O3": "optimum O3 (fusions, GELU approximated), slices of 8",
    "int8-avx2": "optimum dynamic int8, AVX2 configuration (a scale per run), slices of 8",
    "int8-avx512-vnni": "optimum dynamic int8, AVX-512 VNNI configuration (a scale per run), slices of 8",
}


def ensure_installed() -> Path:
    """The python of .venv-optimum, (re)built from serving's and the export's locks and LOCK when any of them changed:
    the pattern bin/setup uses for .venv."""
    locks = [ROOT / "requirements.lock", ROOT / "requirements-export.lock", LOCK]
    venv = ROOT / ".venv-optimum"
    python, stamp = venv / "bin" / "python", venv / ".requirements.sha256"
    wanted = hashlib.sha256(b"".join(lock.read_bytes() for lock in locks)).hexdigest()
    if not python.exists() or not stamp.exists() or stamp.read_text().strip() != wanted:
        progress(f"installing optimum into {venv} (a few minutes the first time)")
        subprocess.run(["python3.11", "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--progress-bar", "off"]
        # torch first and bare: the pin then resolves to the local CPU wheel, not the CUDA build.
        torch = next(line for line in locks[1].read_text().splitlines() if line.startswith("torch=="))
        subprocess.run([*pip, torch], check=True)
        subprocess.run([*pip, *(arg for lock in locks for arg in ("-r", str(lock)))], check=True)
        stamp.write_text(wanted)
    return python


def main(argv: list[str] | None = None) -> int:
    args = lever_parser("optimum_levers", __doc__, "optimum_levers.md").parse_args(argv)
    work = fresh_work_dir(args.work_dir, "optimum-levers-")
    manifest, fp32 = exported_fp32("optimum_levers")
    source = work / "source"
    source.mkdir()
    shutil.copy(fp32, source / "model.onnx")
    # optimum picks its fusions by the model's type, from the transformers config the export was made from.
    shutil.copy(Path(manifest.source) / "config.json", source / "config.json")
    python = ensure_installed()
    progress("optimum's optimizer and quantizer on the exported encoder")
    subprocess.run([str(python), "-m", "bench.optimum.convert", str(source), str(work)], cwd=ROOT, check=True)
    served_int8 = quantize_int8(fp32, work / "int8-served.onnx")
    configs = [
        Config("onnxruntime fp32, slices of 8 (served fp32)", onnxruntime_runner(fp32), 8),
        *(Config(label, onnxruntime_runner(work / name / "model.onnx"), 8) for name, label in VARIANTS.items()),
        Config(
            "onnxruntime int8, a scale per token, 7-bit weights, slices of 8 (served int8)", onnxruntime_runner(served_int8), 8
        ),
    ]
    tokenizer = Tokenizer.from_file(str(ROOT / "model_repository" / manifest.tokenizer))
    pairs = read_sts_pairs()[: args.pairs]
    write_comparison(args, argv, "optimum_levers", "optimum against the export", configs, tokenizer, pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
