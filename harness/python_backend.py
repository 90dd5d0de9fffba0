"""Triton's Python-backend steps (export/steps/) run without Triton: a stand-in for `triton_python_backend_utils`
and a loader that imports a step's model.py the way the Python backend does (a module of its own, not a package, with
the tensor names importable from beside it) and initializes it with the args Triton would give it.

The fast tier checks every step through it (tests/test_steps_without_triton.py), and bench/gpu_check.py runs the
encoder step on a GPU machine that has no Triton. Standard library and numpy only, so that it runs wherever the steps
do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = ROOT / "export" / "steps"
TENSOR_NAMES = ROOT / "repository_contract"
# What a step imports from beside itself; modules it imports from anywhere else stay loaded.
BESIDE_A_STEP = {"sentence_head", "tensors"}

log = logging.getLogger("triton_python_backend_utils")


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name = name
        self._array = np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceRequest:
    def __init__(self, inputs: list[Tensor], requested_output_names: list[str] | None = None, parameters: dict | None = None):
        self._inputs = inputs
        self._requested = requested_output_names or []
        self._parameters = parameters or {}

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested


class TritonError:
    # Triton's codes that the steps use; a step's error without one is INTERNAL, as in Triton.
    INTERNAL = 2
    INVALID_ARG = 3

    def __init__(self, message: str, code: int = INTERNAL):
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None):
        self._outputs = output_tensors or []
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Logger:
    """Triton writes these to its log; here they go to Python's logging."""

    @staticmethod
    def log_info(message: str) -> None:
        log.info(message)

    @staticmethod
    def log_warn(message: str) -> None:
        log.warning(message)

    @staticmethod
    def log_error(message: str) -> None:
        log.error(message)


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((tensor for tensor in request.inputs() if tensor.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((tensor for tensor in response.output_tensors() if tensor.name() == name), None)


def stand_in() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    for value in (
        Tensor,
        InferenceRequest,
        InferenceResponse,
        TritonError,
        Logger,
        get_input_tensor_by_name,
        get_output_tensor_by_name,
    ):
        setattr(module, value.__name__, value)
    return module


def request(
    inputs: dict[str, np.ndarray], requested: list[str] | None = None, parameters: dict | None = None
) -> InferenceRequest:
    return InferenceRequest([Tensor(name, value) for name, value in inputs.items()], requested, parameters)


def output(response: InferenceResponse, name: str) -> np.ndarray:
    if response.has_error():
        raise AssertionError(response.error().message())  # type: ignore[union-attr]
    tensor = get_output_tensor_by_name(response, name)
    if tensor is None:
        raise AssertionError(f"no output {name}")
    return tensor.as_numpy()


def triton_args(model_dir: Path, config: dict[str, Any]) -> dict[str, str]:
    """What Triton passes to initialize(): the model's config as JSON, its directory and version, and an instance
    name. `config` is the config.pbtxt as Triton's JSON has it (every field, parameters as string_value)."""
    return {
        "model_config": json.dumps(config),
        "model_repository": str(model_dir),
        "model_version": "1",
        "model_name": model_dir.name,
        "model_instance_name": f"{model_dir.name}_0",
    }


@contextlib.contextmanager
def _as_triton_loads(lock_dir: Path | None) -> Iterator[None]:
    saved_modules, saved_path, saved_tempdir = dict(sys.modules), list(sys.path), tempfile.tempdir
    sys.modules["triton_python_backend_utils"] = stand_in()
    sys.path.insert(0, str(TENSOR_NAMES))
    if lock_dir is not None:
        tempfile.tempdir = str(lock_dir)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        tempfile.tempdir = saved_tempdir
        for name in set(sys.modules) - set(saved_modules):
            if name in BESIDE_A_STEP:
                del sys.modules[name]
        if "triton_python_backend_utils" in saved_modules:
            sys.modules["triton_python_backend_utils"] = saved_modules["triton_python_backend_utils"]
        else:
            del sys.modules["triton_python_backend_utils"]


def _import_step(source: str, module_name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, STEPS / f"{source}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {STEPS / source}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_module(source: str) -> types.ModuleType:
    """export/steps/<source>.py as Triton imports it, for its functions; no model is initialized."""
    with _as_triton_loads(None):
        return _import_step(source, f"triton_step_{source}")


def load_step(source: str, args: dict[str, str], lock_dir: Path | None = None):
    """The TritonPythonModel of export/steps/<source>.py, initialized with `args` (triton_args). The stand-in, and
    whatever the step adds to sys.path and sys.modules (the tensor names, and the pooling step's head), are gone after.
    lock_dir: the temporary directory for the CPU encoder, which keeps a lock file per instance there."""
    with _as_triton_loads(lock_dir):
        model = _import_step(source, f"triton_step_{source}_{args['model_name']}").TritonPythonModel()
        model.initialize(args)
    return model
