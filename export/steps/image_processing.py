"""What a CLIP-style model's image processor does to an encoded image, in PIL and numpy, with the checks serving needs.

One definition serves the Triton image-preprocess step (this file is copied next to its model.py) and the export,
which checks it, with the vision graph, against sentence-transformers' encode(PIL image) before writing anything.
The arithmetic is transformers' CLIPImageProcessor's, step for step: image.convert("RGB"), the shortest edge resized
with PIL (its size rounded down as transformers does), a center crop, then rescale in float64 and normalize in float32.

Attention controls on an image are rectangles of the whole image; control_factors turns them into one factor per
image token by following the image through the same crop, resize and center crop (README, "Attention controls").

Before it decodes anything, an image is refused, with the reason, when its bytes are no image PIL knows, when its
format is not accepted, or when its header declares more pixels than the bound (a decompression bomb).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own names.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# What the export writes next to the image-preprocess step: the processor's parameters, ImageProcessor.to_json.
PROCESSOR_FILE = "image_processor.json"
# As for text controls (gateway/core/controls.py): a patch's product of factors is capped here, which keeps every
# attention score finite in float32.
MAX_POSITION_FACTOR = 1e30
# A rectangle that meets a patch over less than this share of its area (a shared edge, up to float rounding) does not
# reach it, also with token_overlap "complete".
MIN_OVERLAP = 1e-6


class ImageRefused(ValueError):
    """An image that cannot be served; the message says what is wrong with it."""


@dataclass(frozen=True)
class ImageProcessor:
    formats: tuple[str, ...]
    max_pixels: int  # width * height, from the header, above which an image is refused unread
    shortest_edge: int  # the side the image's shortest edge is resized to
    crop_height: int
    crop_width: int
    resample: int  # a PIL resampling filter (3: bicubic)
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_processor_config(cls, config: dict, formats: tuple[str, ...], max_pixels: int) -> ImageProcessor:
        """From a CLIPImageProcessor's preprocessor_config.json; ValueError for a pipeline this class does not do."""
        expected = {"do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}
        differs = {key: config.get(key, True) for key, value in expected.items() if config.get(key, True) != value}
        size, crop = config.get("size", {}), config.get("crop_size", {})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if differs or "shortest_edge" not in size or min(crop["height"], crop["width"]) > size["shortest_edge"]:
            raise ValueError(
                f"the image processor ({config.get('image_processor_type')}, {differs or ''} size {size}, crop_size {crop}) "
                "is not a shortest-edge resize, a center crop within it, rescale and normalize"
            )
        return cls(
            formats=formats,
            max_pixels=max_pixels,
            shortest_edge=size["shortest_edge"],
            crop_height=crop["height"],
            crop_width=crop["width"],
            resample=config.get("resample", 3),
            rescale_factor=config.get("rescale_factor", 1 / 255),
            image_mean=tuple(config["image_mean"]),
            image_std=tuple(config["image_std"]),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ImageProcessor:
        values = json.loads(text)
        return cls(**{**values, **{key: tuple(values[key]) for key in ("formats", "image_mean", "image_std")}})

    def decode(self, data: bytes) -> Image.Image:
        """The image as its viewer sees it: the first frame, EXIF orientation applied. Refused before decoding when
        it is no image, of another format, or larger than the bound."""
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, Image.DecompressionBombError):
            raise ImageRefused(f"not an image in a supported format ({', '.join(self.formats)})") from None
        if image.format not in self.formats:
            raise ImageRefused(f"the image format {image.format} is not supported; supported: {', '.join(self.formats)}")
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageRefused(f"the image has {width}x{height} pixels, more than the {self.max_pixels} supported")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the bound above, not PIL's own warning, decides
                image.load()
                return ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageRefused(f"the {image.format} image cannot be decoded: {error}") from None

    @staticmethod
    def crop(image: Image.Image, x: int, y: int, size: int) -> Image.Image:
        """The square of `size` pixels at (x, y) from the top left; refused unless it lies within the image."""
        width, height = image.size
        if size <= 0 or x < 0 or y < 0 or x + size > width or y + size > height:
            raise ImageRefused(f"the crop x={x}, y={y}, size={size} is not within the {width}x{height} image")
        return image.crop((x, y, x + size, y + size))

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        """The size the shortest-edge resize gives, rounded down as transformers rounds it."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def _center_offsets(self, new_width: int, new_height: int) -> tuple[int, int]:
        """(left, top) of the center crop in the resized image."""
        return (new_width - self.crop_width) // 2, (new_height - self.crop_height) // 2

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """[3, crop_height, crop_width] float32, as CLIPImageProcessor.preprocess makes it."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        new_width, new_height = self._resized(*image.size)
        resized = np.array(image.resize((new_width, new_height), resample=self.resample, reducing_gap=None))
        left, top = self._center_offsets(new_width, new_height)
        cropped = resized[top : top + self.crop_height, left : left + self.crop_width]
        rescaled = (cropped.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean, std = np.array(self.image_mean, dtype=np.float32), np.array(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(((rescaled - mean) / std).transpose(2, 0, 1))

    def visible_box(self, width: int, height: int, crop: tuple[int, int, int] | None) -> tuple[float, float, float, float]:
        """The part of a width x height image (left, top, right, bottom, in its pixels) that the model sees: of the crop
        square, or of the whole image, what the shortest-edge resize and the center crop keep."""
        x, y, crop_width, crop_height = (0, 0, width, height) if crop is None else (crop[0], crop[1], crop[2], crop[2])
        new_width, new_height = self._resized(crop_width, crop_height)
        left, top = self._center_offsets(new_width, new_height)
        # The resize stretches each axis uniformly, so a resized pixel column c covers [c, c + 1) * crop_width / new_width.
        to_x, to_y = crop_width / new_width, crop_height / new_height
        return (
            x + left * to_x,
            y + top * to_y,
            x + (left + self.crop_width) * to_x,
            y + (top + self.crop_height) * to_y,
        )

    def control_factors(
        self, width: int, height: int, crop: tuple[int, int, int] | None, controls: np.ndarray, patch_size: int
    ) -> np.ndarray:
        """[1 + patches] float32: the attention factor of the class token (1: never controlled) and of each patch in
        row-major order, for `controls` [n, 6] (tensors.IMAGE_CONTROL_FIELDS) on a width x height image seen through
        `crop`. A control reaches a patch by the share of the patch's area its rectangle covers: "partial" scales the
        factor's effect by that share (1 + (factor - 1) * share), "complete" applies the whole factor to any patch it
        meets. A patch reached by several controls gets the product of their factors."""
        left, top, right, bottom = self.visible_box(width, height, crop)
        columns = left + (right - left) * np.arange(self.crop_width // patch_size + 1) / (self.crop_width // patch_size)
        rows = top + (bottom - top) * np.arange(self.crop_height // patch_size + 1) / (self.crop_height // patch_size)
        factors = np.ones((len(rows) - 1) * (len(columns) - 1), dtype=np.float64)
        for rect_left, rect_top, rect_width, rect_height, factor, complete in controls.astype(np.float64):
            across = _covered(columns, rect_left * width, (rect_left + rect_width) * width)
            down = _covered(rows, rect_top * height, (rect_top + rect_height) * height)
            share = np.outer(down, across).reshape(-1)
            share[share < MIN_OVERLAP] = 0.0
            factors *= np.where(share > 0, factor, 1.0) if complete else 1.0 + (factor - 1.0) * share
        return np.concatenate([[1.0], np.minimum(factors, MAX_POSITION_FACTOR)]).astype(np.float32)

    def __call__(self, data: bytes, crop: tuple[int, int, int] | None = None) -> np.ndarray:
        return self.pixel_values(self._cropped(self.decode(data), crop))

    def with_controls(
        self, data: bytes, crop: tuple[int, int, int] | None, controls: np.ndarray, patch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pixel values, and the factors of control_factors for the image as decoded (upright, before the crop)."""
        image = self.decode(data)
        factors = self.control_factors(*image.size, crop, controls, patch_size)
        return self.pixel_values(self._cropped(image, crop)), factors

    def _cropped(self, image: Image.Image, crop: tuple[int, int, int] | None) -> Image.Image:
        return image if crop is None else self.crop(image, *crop)


def _covered(edges: np.ndarray, start: float, end: float) -> np.ndarray:
    """For the cells between consecutive `edges`, the share of each that [start, end) covers."""
    overlap = np.minimum(edges[1:], end) - np.maximum(edges[:-1], start)
    return np.clip(overlap, 0.0, None) / np.diff(edges)
