"""optimum's optimizer and quantizer on the exported encoder, run in .venv-optimum by bench.optimum_levers:

    python -m bench.optimum.convert SOURCE_DIR OUT_DIR

SOURCE_DIR holds model.onnx (the export's fp32 encoder) and the model's config.json, which optimum reads for the
architecture (its fusions are per model type). Each variant is written to OUT_DIR/<name>/model.onnx: O2 (onnxruntime's
transformer fusions), O3 (O2 and GELU approximated), and dynamic int8 with optimum's AVX2 and AVX-512 VNNI
configurations (per-channel weights, a scale per run).
"""

import shutil
import sys
from pathlib import Path

from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig


def main(source: Path, out: Path) -> None:
    optimizer = ORTOptimizer.from_pretrained(source, file_names=["model.onnx"])
    for level, config in (("O2", AutoOptimizationConfig.O2()), ("O3", AutoOptimizationConfig.O3())):
        optimizer.optimize(save_dir=out / level, optimization_config=config)
        # optimum names its output model_optimized.onnx.
        shutil.move(out / level / "model_optimized.onnx", out / level / "model.onnx")
        print(f"optimum {level}: {out / level / 'model.onnx'}", flush=True)
    quantizer = ORTQuantizer.from_pretrained(source, file_name="model.onnx")
    for name, config in (
        ("int8-avx2", AutoQuantizationConfig.avx2(is_static=False, per_channel=True)),
        ("int8-avx512-vnni", AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)),
    ):
        quantizer.quantize(save_dir=out / name, quantization_config=config)
        shutil.move(out / name / "model_quantized.onnx", out / name / "model.onnx")
        print(f"optimum {name}: {out / name / 'model.onnx'}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
