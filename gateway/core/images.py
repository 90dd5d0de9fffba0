"""Image inputs of a prompt, checked from their header before any work: the format, the pixel bound and the crop.

Decoding happens in the model's image step in Triton, off the gateway's event loop. What can be known from the
header alone is checked here, so that a bad image gets its 400 naming the prompt before its request costs Triton
anything (and before it costs any other request in its batch anything): the header is a few hundred bytes to parse,
the pixels are megabytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from gateway.core.controls import ImageControl
from gateway.core.errors import invalid
from repository_contract.manifest import Vision

# EXIF orientations that turn the image a quarter: its width and height swap when the step applies them.
_QUARTER_TURNS = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112
DATA_URI_PREFIX = "data:image/"


@dataclass(frozen=True)
class ImageInput:
    """An encoded image file, the square the caller cut out of it: (x, y, size) in pixels, or None for the model's own
    center crop, and its attention controls (checked: see gateway.core.prompts)."""

    data: bytes
    crop: tuple[int, int, int] | None = None
    controls: tuple[ImageControl, ...] = ()


def from_base64(data: str, where: str, field: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"'{where}' image data is not valid base64", field) from None


def from_data_uri(uri: str, where: str, field: str) -> ImageInput:
    """`data:image/<type>;base64,<data>`, as sentence-transformers reads such a string for a model that sees images."""
    header, comma, data = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise invalid(f"'{where}' is a data URI of an image, but not of the form data:image/<type>;base64,<data>", field)
    return ImageInput(from_base64(data, where, field))


def check(image: ImageInput, vision: Vision, where: str, field: str) -> None:
    """Refuses, naming the prompt, an image whose header says it cannot be served: not an image, a format the model's
    step does not decode, more pixels than the bound, or a crop outside it."""
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, over its own bomb bound; the bound that counts here is the model's.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image.data)) as opened:
                kind, (width, height), exif = opened.format, opened.size, opened.info.get("exif")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        raise invalid(f"'{where}' is not an image of a supported format ({', '.join(vision.formats)})", field) from None
    if kind not in vision.formats:
        raise invalid(f"'{where}' is a {kind} image; supported formats: {', '.join(vision.formats)}", field)
    if width * height > vision.max_image_pixels:
        raise invalid(f"'{where}' has {width}x{height} pixels, more than the {vision.max_image_pixels} an image may have", field)
    orientation = _orientation(exif)
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    if image.crop is not None:
        x, y, size = image.crop
        if x < 0 or y < 0 or size <= 0 or x + size > width or y + size > height:
            raise invalid(f"'{where}' crops a square of {size} pixels at ({x}, {y}), outside the {width}x{height} image", field)


def _orientation(exif: bytes | None) -> int:
    """The EXIF orientation the header carries (1: upright). Read from the header's EXIF block alone: PIL's getexif()
    decodes a whole PNG to look for one after the pixels."""
    if not exif:
        return 1
    tags = Image.Exif()
    try:
        tags.load(exif)
    except (OSError, SyntaxError, ValueError):
        return 1  # unreadable EXIF: the step, which decodes, has the last word on the crop
    return int(tags.get(_ORIENTATION_TAG, 1))
