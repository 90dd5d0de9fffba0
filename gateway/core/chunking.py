"""A request's inputs as chunks for the scheduler: rows sorted by length, each chunk knowing its rows' positions.

A row is a record whose fields are the ensemble's input tensors (named by repository_contract.tensors), so that the
scheduler can concatenate and split rows of any kind alike and the Triton client sends each field as it is.
"""

from __future__ import annotations

import numpy as np

from gateway.core.controls import ImageControl, image_control_rows
from gateway.core.images import ImageInput
from gateway.core.scheduler import Chunk, Lane
from gateway.ops import request_context
from repository_contract import tensors

# Token id rows are padded with ID_PADDING (never a token id: the gateway refuses negative ids) to a multiple of
# ID_WIDTH_STEP; the token-ids steps drop it. Without it every distinct length would be a lane of its own.
ID_WIDTH_STEP = 16

# Image controls per row are padded to a multiple of this, for the same reason.
CONTROLS_STEP = 4

# Rows per chunk when a long list is split by length, and per call when chunks share one: small enough that one
# long text pads few others, and the unit in which the scheduler lets a small request overtake a big one.
SORTED_CHUNK = 32


# The request parameter by which a call tells the tokenizer step to refuse a text over the model's limit instead of
# cutting it (Triton hands an ensemble's request parameters to every step). Calls with it and without it never share.
STRICT = (("truncate", False),)


def text_chunks(
    ensemble: str, texts: list[str], positions: list[int], max_batch: int, priority: int, output: str, strict: bool = False
) -> list[Chunk]:
    """The ensemble's chunks for `texts` (at `positions` of the request), sorted by length in chunks of SORTED_CHUNK.

    The tokenizer step pads each call to its longest text, so short texts sent apart from long ones
    are not padded to their length; the encoder's batcher merges the chunks again. `strict`: over-long texts are
    refused by the tokenizer step, before the encoder runs, rather than cut.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    size = min(max_batch, SORTED_CHUNK)
    lane = Lane(ensemble, output, priority, size, (1,), STRICT if strict else ())
    # Taken here, in the request's context: the call runs in a task of the scheduler's, and Triton's logs
    # and traces then name the gateway's request.
    request_id = request_context.current_request_id()
    chunks = []
    for start in range(0, len(order), size):
        part = order[start : start + size]
        rows = np.empty(len(part), dtype=[(tensors.TEXT, np.object_, (1,))])
        rows[tensors.TEXT][:, 0] = [texts[i].encode("utf-8") for i in part]
        chunks.append(Chunk(lane, rows, np.array([positions[i] for i in part]), request_id))
    return chunks


def token_id_chunks(
    ensemble: str,
    sequences: list[list[int]],
    positions: list[int],
    max_batch: int,
    priority: int,
    output: str,
    controls: tuple[list[np.ndarray], bool] | None = None,
) -> list[Chunk]:
    """Like text_chunks for token id sequences. Rows are padded with ID_PADDING to a multiple of ID_WIDTH_STEP, so
    that sequences of nearby lengths share a chunk and a lane, which the scheduler coalesces across requests.

    controls: per sequence its factors, and the mode, for an ensemble that takes attention controls.
    """
    by_width: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_width.setdefault(-(-len(sequence) // ID_WIDTH_STEP) * ID_WIDTH_STEP, []).append(index)
    size = min(max_batch, SORTED_CHUNK)
    request_id = request_context.current_request_id()
    chunks = []
    for width, members in by_width.items():
        lane = Lane(ensemble, output, priority, size, (width,))
        for start in range(0, len(members), size):
            part = members[start : start + size]
            fields: list[tuple[str, type, tuple[int, ...]]] = [(tensors.TOKEN_IDS, np.int64, (width,))]
            if controls is not None:
                fields += [(tensors.CONTROL_FACTORS, np.float32, (width,)), (tensors.CONTROL_LOG_ADDITIVE, np.bool_, (1,))]
            rows = np.empty(len(part), dtype=fields)
            rows[tensors.TOKEN_IDS] = _right_padded([sequences[i] for i in part], width, tensors.ID_PADDING, np.int64)
            if controls is not None:
                # Factors of 1 under the padding: the step drops those positions with the ids anyway.
                rows[tensors.CONTROL_FACTORS] = _right_padded([controls[0][i] for i in part], width, 1.0, np.float32)
                rows[tensors.CONTROL_LOG_ADDITIVE] = controls[1]
            chunks.append(Chunk(lane, rows, np.array([positions[i] for i in part]), request_id))
    return chunks


def _right_padded(rows: list, width: int, fill, dtype) -> np.ndarray:
    padded = np.full((len(rows), width), fill, dtype=dtype)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = row
    return padded


def image_chunks(
    ensemble: str,
    inputs: list[ImageInput],
    positions: list[int],
    max_batch: int,
    priority: int,
    output: str,
    log_additive: bool | None = None,
) -> list[Chunk]:
    """The image ensemble's chunks: each row an encoded image file and its crop, decoded by the ensemble's step.

    log_additive: the mode, for the controlled image ensemble, whose rows also carry their images' controls, padded
    to a multiple of CONTROLS_STEP with controls of factor 1 (which change nothing), so that images with about as many
    controls share a lane.
    """
    by_width: dict[int, list[int]] = {}
    for index, image in enumerate(inputs):
        width = 0 if log_additive is None else -(-len(image.controls) // CONTROLS_STEP) * CONTROLS_STEP
        by_width.setdefault(width, []).append(index)
    size = min(max_batch, SORTED_CHUNK)
    request_id = request_context.current_request_id()
    chunks = []
    for width, members in by_width.items():
        lane = Lane(ensemble, output, priority, size, (width,) if log_additive is not None else (1,))
        for start in range(0, len(members), size):
            part = members[start : start + size]
            fields: list[tuple[str, type, tuple[int, ...]]] = [
                (tensors.IMAGE, np.object_, (1,)),
                (tensors.IMAGE_CROP, np.int64, (3,)),
            ]
            if log_additive is not None:
                controls_shape = (width, len(tensors.IMAGE_CONTROL_FIELDS))
                fields += [(tensors.IMAGE_CONTROLS, np.float32, controls_shape), (tensors.CONTROL_LOG_ADDITIVE, np.bool_, (1,))]
            rows = np.empty(len(part), dtype=fields)
            rows[tensors.IMAGE][:, 0] = [inputs[i].data for i in part]
            rows[tensors.IMAGE_CROP] = [inputs[i].crop or tensors.NO_CROP for i in part]
            if log_additive is not None:
                rows[tensors.IMAGE_CONTROLS] = [_padded_controls(inputs[i].controls, width) for i in part]
                rows[tensors.CONTROL_LOG_ADDITIVE] = log_additive
            chunks.append(Chunk(lane, rows, np.array([positions[i] for i in part]), request_id))
    return chunks


def _padded_controls(controls: tuple[ImageControl, ...], width: int) -> np.ndarray:
    padded = np.tile(np.array(tensors.NO_CONTROL, dtype=np.float32), (width, 1))
    padded[: len(controls)] = image_control_rows(controls)
    return padded
