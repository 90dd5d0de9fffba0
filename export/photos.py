"""Real photographs, shipped inside scikit-image (skimage/data), as image files of every accepted format.

The export checks a dual encoder's image vectors on them before it writes anything; the tests and the bench send the
same files through Triton. Each variant is a photo in one format, mode, size and aspect ratio: colour and grayscale,
RGBA and palette, wide, tall, smaller than the model's square and larger than it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib.resources import files

from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "camera")  # camera is grayscale


@dataclass(frozen=True)
class Variant:
    photo: str
    format: str  # PIL's name
    mode: str
    size: tuple[int, int] | None  # (width, height) resized to, or None for the photo's own
    box: tuple[int, int, int, int] | None = None  # cut first (left, top, right, bottom): another aspect ratio
    orientation: int = 1  # EXIF orientation: 6 stores the photo turned, to be shown turned back by a quarter

    @property
    def name(self) -> str:
        shape = f"-{self.size[0]}x{self.size[1]}" if self.size else ""
        turned = f"-exif{self.orientation}" if self.orientation != 1 else ""
        return f"{self.photo}-{self.mode}{shape}{turned}.{self.format.lower()}"


VARIANTS = (
    Variant("astronaut", "PNG", "RGB", None),
    Variant("astronaut", "PNG", "RGBA", (300, 300)),
    Variant("chelsea", "JPEG", "RGB", None),
    Variant("chelsea", "GIF", "P", (200, 133)),
    Variant("coffee", "WEBP", "RGB", (400, 266)),
    Variant("coffee", "JPEG", "RGB", (480, 120), box=(0, 100, 600, 250)),  # wide: 4:1
    Variant("camera", "PNG", "L", None),
    Variant("camera", "WEBP", "L", (90, 240), box=(150, 0, 300, 400)),  # tall
    Variant("astronaut", "JPEG", "RGB", (24, 24)),  # smaller than the model's square: resized up
    Variant("chelsea", "PNG", "LA", (150, 100)),
    Variant("coffee", "JPEG", "RGB", (300, 200), orientation=6),
)
# The EXIF tag that holds the orientation.
ORIENTATION = 0x0112


def photo(name: str) -> Image.Image:
    with (files("skimage") / "data" / f"{name}.png").open("rb") as f:
        image = Image.open(f)
        image.load()
    return image


def _render(variant: Variant) -> bytes:
    image = photo(variant.photo)
    if variant.box:
        image = image.crop(variant.box)
    if variant.size:
        image = image.resize(variant.size, Image.Resampling.LANCZOS)
    image = image.convert(variant.mode) if variant.mode != "P" else image.convert("RGB").quantize(256)
    if variant.mode in ("RGBA", "LA"):
        # Transparency that varies, which the model's processor drops (convert("RGB")) and serving must drop alike.
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    options: dict = {"quality": 90} if variant.format in ("JPEG", "WEBP") else {}
    if variant.orientation != 1:
        exif = Image.Exif()
        exif[ORIENTATION] = variant.orientation
        options["exif"] = exif
    out = io.BytesIO()
    image.save(out, format=variant.format, **options)
    return out.getvalue()


def sample_files() -> dict[str, bytes]:
    """Every variant's file, by its name."""
    return {variant.name: _render(variant) for variant in VARIANTS}
