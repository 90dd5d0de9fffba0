"""Image-preprocess step: encoded image files in, the vision encoder's PIXEL_VALUES out, one row per image, with each
image's TOKEN_COUNT and an ATTENTION_MASK of ones over its tokens (an image has no padding), which the image layers
ensemble's layer-pooling step takes.

Each row is checked from its header (an image at all, a format the model accepts, no more pixels than its bound) before
it is decoded, then decoded (a GIF's first frame), turned upright by its EXIF orientation, cut to the row's IMAGE_CROP
square when it has one, and resized and normalized exactly as the model's own image processor does (the processor's
parameters are in image_processor.json, the arithmetic is image_processing.py, next to this file,
which the export checked against sentence-transformers). A request with a bad image fails alone, with an INVALID_ARG
error that names the row and what is wrong; the other requests of the batch are answered.

The controlled image ensembles also send IMAGE_CONTROLS (an optional input, which the plain ones leave out); the step
then answers CONTROL_FACTORS, one per image token, from each image's own size and crop: only here is the image decoded,
so only here is known what part of it the model sees.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# The export copies repository_contract/tensors.py and image_processing.py next to this file: Triton cannot import
# the repository's packages.
sys.path.insert(0, str(Path(__file__).parent))
from image_processing import PROCESSOR_FILE, ImageProcessor, ImageRefused  # type: ignore[import-not-found]
from tensors import (  # type: ignore[import-not-found]
    ATTENTION_MASK,
    CONTROL_FACTORS,
    IMAGE,
    IMAGE_CONTROLS,
    IMAGE_CROP,
    NO_CROP,
    PIXEL_VALUES,
    TOKEN_COUNT,
)


class TritonPythonModel:
    def initialize(self, args):
        params = {key: value["string_value"] for key, value in json.loads(args["model_config"])["parameters"].items()}
        self.processor = ImageProcessor.from_json(
            (Path(args["model_repository"]) / args["model_version"] / PROCESSOR_FILE).read_text()
        )
        self.image_tokens = int(params["image_tokens"])
        self.patch_size = int(params["patch_size"])

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            pixels, factors = self._pixel_values(request)
        except ImageRefused as error:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"image-preprocess: {error}", pb_utils.TritonError.INVALID_ARG)
            )
        counts = np.full((len(pixels), 1), self.image_tokens, dtype=np.int32)
        mask = np.ones((len(pixels), self.image_tokens), dtype=np.int64)
        outputs = [
            pb_utils.Tensor(PIXEL_VALUES, pixels),
            pb_utils.Tensor(TOKEN_COUNT, counts),
            pb_utils.Tensor(ATTENTION_MASK, mask),
        ]
        if factors is not None:
            outputs.append(pb_utils.Tensor(CONTROL_FACTORS, factors))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def _pixel_values(self, request) -> tuple[np.ndarray, np.ndarray | None]:
        """Each row's pixel values, and with IMAGE_CONTROLS each row's factors (else None)."""
        images = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1)
        crops = pb_utils.get_input_tensor_by_name(request, IMAGE_CROP).as_numpy().reshape(-1, 3)
        sent = pb_utils.get_input_tensor_by_name(request, IMAGE_CONTROLS)
        controls = None if sent is None else sent.as_numpy()
        if len(crops) != len(images) or (controls is not None and (controls.ndim != 3 or len(controls) != len(images))):
            shown = "" if controls is None else f" and {IMAGE_CONTROLS} {controls.shape}"
            raise ImageRefused(f"{len(images)} rows of {IMAGE}, {len(crops)} of {IMAGE_CROP}{shown}")
        rows, factors = [], []
        for row, (data, crop) in enumerate(zip(images, crops)):
            square = None if tuple(crop) == NO_CROP else tuple(int(v) for v in crop)
            try:
                if controls is None:
                    rows.append(self.processor(bytes(data), square))
                else:
                    pixels, row_factors = self.processor.with_controls(bytes(data), square, controls[row], self.patch_size)
                    rows.append(pixels)
                    factors.append(row_factors)
            except ImageRefused as error:
                raise ImageRefused(f"row {row}: {error}") from None
        return np.stack(rows), None if controls is None else np.stack(factors)
