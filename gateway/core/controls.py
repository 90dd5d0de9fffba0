"""Attention controls (AtMan): from a prompt's controls to one factor per token position.

The encoder applies the factors (see export/attention_controls.py); this module decides which positions they
reach. Text controls are character spans resolved through the tokenizer's offsets, token-id controls are
positions, a position controlled more than once gets the product of the factors, and with a contextual
threshold a control also reaches every position whose input token embedding is at least that similar to one
of its own. Image controls are rectangles of the image, which the image step resolves to its patches (only it
decodes the image); here they are only checked. The README's "Attention controls" section is the definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Encoding

from gateway.core.errors import invalid

TOKEN_OVERLAPS = ("partial", "complete")
# A position's factor is capped here after the factors of several controls are multiplied: scaled scores stay
# finite in float32 (scores times 1e30 are far below its 3.4e38 limit), so no control can turn a vector into NaN.
MAX_POSITION_FACTOR = 1e30


@dataclass(frozen=True)
class TextControl:
    start: int
    length: int
    factor: float
    token_overlap: str = "partial"


@dataclass(frozen=True)
class TokenControl:
    index: int
    factor: float


@dataclass(frozen=True)
class ImageControl:
    """A rectangle of the whole image (after its EXIF orientation, before any crop), each side a fraction in [0, 1]."""

    left: float
    top: float
    width: float
    height: float
    factor: float
    token_overlap: str = "partial"


Control = TextControl | TokenControl | ImageControl


@dataclass(frozen=True)
class ControlOptions:
    log_additive: bool = True
    contextual_threshold: float | None = None
    threshold_field: str = "contextual_control_threshold"  # as the transport names it, for its errors

    @classmethod
    def checked(cls, log_additive: bool, threshold: float | None, field: str) -> ControlOptions:
        """The options as a transport received them; a threshold that is not a finite number is a 400 naming `field`."""
        if threshold is not None and not math.isfinite(threshold):
            raise invalid(f"'{field}' must be a finite number, got {threshold}", field)
        return cls(log_additive, None if threshold is None else float(threshold), field)


def check(control: Control, item_length: int, where: str, field: str) -> None:
    """A 400 naming the field for a control that cannot apply to its item (of item_length characters or ids; an
    image's controls take any item_length)."""
    if not (isinstance(control.factor, (int, float)) and math.isfinite(control.factor) and control.factor >= 0):
        raise invalid(f"'{where}': a control's factor must be a finite number >= 0, got {control.factor}", f"{field}.factor")
    if isinstance(control, ImageControl):
        _check_rect(control, where, field)
        return
    if isinstance(control, TokenControl):
        if not 0 <= control.index < item_length:
            raise invalid(
                f"'{where}': a control's index {control.index} is outside its item of {item_length} token ids", f"{field}.index"
            )
        return
    _check_overlap(control, where, field)
    if control.start < 0 or control.length < 0 or control.start + control.length > item_length:
        raise invalid(
            f"'{where}': a control's span [{control.start}, {control.start + control.length}) is outside its text "
            f"of {item_length} characters",
            f"{field}.start",
        )


def _check_overlap(control: TextControl | ImageControl, where: str, field: str) -> None:
    if control.token_overlap not in TOKEN_OVERLAPS:
        raise invalid(
            f"'{where}': token_overlap must be one of {list(TOKEN_OVERLAPS)}, got {control.token_overlap!r}",
            f"{field}.token_overlap",
        )


def _check_rect(control: ImageControl, where: str, field: str) -> None:
    """Each side a finite fraction in [0, 1] of the image; a rectangle reaching past the image's edge is allowed, as
    one reaching past what the model sees is: that part reaches nothing."""
    for side in ("left", "top", "width", "height"):
        value = getattr(control, side)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
            raise invalid(
                f"'{where}': an image control's rect.{side} must be a fraction of the image in [0, 1], got {value}",
                f"{field}.rect.{side}",
            )
    _check_overlap(control, where, field)


def image_control_rows(controls: Sequence[ImageControl]) -> np.ndarray:
    """[len(controls), 6] float32 in the order of repository_contract.tensors.IMAGE_CONTROL_FIELDS."""
    return np.array(
        [(c.left, c.top, c.width, c.height, min(c.factor, MAX_POSITION_FACTOR), c.token_overlap == "complete") for c in controls],
        dtype=np.float32,
    ).reshape(-1, 6)


def span_positions(encoding: Encoding, control: TextControl, shift: int = 0) -> list[int]:
    """The positions of `encoding` a text control reaches; its span is shifted by `shift` characters (a prefix)."""
    start, end = control.start + shift, control.start + shift + control.length
    if control.token_overlap == "partial":
        return [i for i, (a, b) in enumerate(encoding.offsets) if a < end and b > start]
    return [i for i, (a, b) in enumerate(encoding.offsets) if start <= a and b <= end]


@dataclass(frozen=True)
class PositionControl:
    """One control resolved to positions of the prompt's token sequence (without the model's special tokens)."""

    positions: tuple[int, ...]
    factor: float


class TokenSimilarity:
    """Cosine similarity of tokens by the model's input embedding matrix, read (memory-mapped) on first use."""

    def __init__(self, path: Path):
        self.path = path

    @cached_property
    def _matrix(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def unit_vectors(self, ids: list[int]) -> np.ndarray:
        rows = np.asarray(self._matrix[np.asarray(ids)], dtype=np.float64)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def position_factors(
    ids: list[int], controls: Sequence[PositionControl], threshold: float | None, similarity: TokenSimilarity | None
) -> np.ndarray:
    """One factor per position: the product of the factors of the controls that reach it (1 where none does)."""
    factors = np.ones(len(ids), dtype=np.float64)
    units = None
    if threshold is not None and controls:
        # Only a contextual threshold needs the similarity; the service passes every model's (see Catalog).
        assert similarity is not None, "a contextual threshold needs the model's token similarity"
        units = similarity.unit_vectors(ids)
    for control in controls:
        reached = np.zeros(len(ids), dtype=bool)
        reached[list(control.positions)] = True
        if units is not None and control.positions:
            cosine = units @ units[list(control.positions)].T
            reached |= cosine.max(axis=1) >= threshold
        factors[reached] *= control.factor
    return np.minimum(factors, MAX_POSITION_FACTOR).astype(np.float32)
