"""What a CLIP-style model's image processor does to an encoded image, in PIL and numpy, with the checks serving needs.

One definition serves the Triton image-preprocess step (this file is copied next to its model.py) and the export,
which checks it, with the vision graph, against sentence-transformers' encode(PIL image) before writing anything.
The arithmetic is transformers' CLIPImageProcessor's, step for step: image.convert("RGB"), the shortest edge resized
with PIL (its size rounded down as transformers does), a center crop, then rescale in float64 and normalize in float32.

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

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """[3, crop_height, crop_width] float32, as CLIPImageProcessor.preprocess makes it."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        resized = np.array(image.resize((new_width, new_height), resample=self.resample, reducing_gap=None))
        top, left = (new_height - self.crop_height) // 2, (new_width - self.crop_width) // 2
        cropped = resized[top : top + self.crop_height, left : left + self.crop_width]
        rescaled = (cropped.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean, std = np.array(self.image_mean, dtype=np.float32), np.array(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(((rescaled - mean) / std).transpose(2, 0, 1))

    def __call__(self, data: bytes, crop: tuple[int, int, int] | None = None) -> np.ndarray:
        image = self.decode(data)
        if crop is not None:
            image = self.crop(image, *crop)
        return self.pixel_values(image)
