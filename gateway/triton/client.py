"""The one place that talks to Triton: builds inference requests for the ensembles and maps its failures.

Triton errors that a retry can cure (Triton down or restarting, a dead stub) become UNAVAILABLE, which the
scheduler retries; anything else unexpected is logged here and reaches the caller as a generic internal error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gateway.core.errors import ErrorKind, ServiceError, internal
from gateway.core.scheduler import Chunk, Lane
from gateway.ops import request_context

log = logging.getLogger("gateway.triton")

# Triton's words for a model it cannot serve right now: loading after a restart, or a stub that died. The call
# is retried (until its deadline) like one that found Triton down, and the instance name never reaches a caller.
_TRANSIENT = ("stub process", "is not healthy", "unknown model", "is not ready", "request timeout expired", "failed to connect")


def backend_error(error: InferenceServerException) -> ServiceError:
    status = str(error.status() or "")
    message = str(error.message() or "")
    if "DEADLINE_EXCEEDED" in status:
        return ServiceError(ErrorKind.DEADLINE_EXCEEDED, "the inference server did not answer within the request's deadline")
    if "UNAVAILABLE" in status or any(marker in message.lower() for marker in _TRANSIENT):
        return ServiceError(
            ErrorKind.UNAVAILABLE, f"the inference server is unavailable ({status or 'no connection'}), retry shortly"
        )
    if "RESOURCE_EXHAUSTED" in status:
        return ServiceError(ErrorKind.OVERLOADED, "the inference server is overloaded, retry shortly")
    log.error("Triton failed a request: %s %s", status, message)
    return internal()


# Token id rows sent to Triton are padded with ID_PADDING (never a token id: the gateway refuses negative ids) to a
# multiple of ID_WIDTH_STEP; the token-ids steps drop it. Without it every distinct length would be a lane of its own.
ID_PADDING = -1
ID_WIDTH_STEP = 16

# Rows per chunk when a long list is split by length, and per call when chunks share one: small enough that one
# long text pads few others, and the unit in which the scheduler lets a small request overtake a big one.
SORTED_CHUNK = 32


@dataclass(frozen=True)
class ChunkedInput:
    """A request's rows as chunks for the scheduler: chunks[i] carries the input rows at positions members[i]."""

    chunks: list[Chunk]
    members: list[list[int]]
    total: int

    def assemble(self, results: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Puts each chunk's rows back at the input positions it holds."""
        if len(results) == 1 and self.members[0] == list(range(self.total)):
            return results[0]  # one chunk already in input order, as every single-text request is
        order = np.concatenate([np.array(members) for members in self.members])
        values = np.empty((self.total, *results[0][0].shape[1:]), dtype=np.float32)
        counts = np.empty(self.total, dtype=np.int64)
        values[order] = np.concatenate([r[0] for r in results])
        counts[order] = np.concatenate([r[1] for r in results])
        return values, counts


# tritonclient's own channel options, plus reconnection at most a second apart. gRPC's default backoff grows to two
# minutes while a server is away, so a Triton restarted after a long outage would wait that long to be used again.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonClient:
    def __init__(self, url: str):
        self.url = url
        self._client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)

    async def close(self) -> None:
        await self._client.close()

    async def server_ready(self, timeout_s: float) -> bool:
        try:
            return await self._client.is_server_ready(client_timeout=timeout_s)
        except (TimeoutError, InferenceServerException):
            return False

    async def infer(self, lane: Lane, data: np.ndarray, timeout_s: float, request_id: str) -> tuple[np.ndarray, np.ndarray]:
        """One ensemble call for `data` (rows of the lane's input): its output and token count per row."""
        outputs = [grpcclient.InferRequestedOutput(lane.output), grpcclient.InferRequestedOutput("TOKEN_COUNT")]
        try:
            # The deadline travels twice: the client gives up at it, and every step's queue policy drops the
            # request once it has waited that long, so Triton does not compute answers nobody waits for.
            result = await self._client.infer(
                lane.ensemble,
                _input_tensors(lane, data),
                outputs=outputs,
                priority=lane.priority,
                request_id=request_id,
                timeout=max(int(timeout_s * 1e6), 1),
                client_timeout=timeout_s,
            )
        except InferenceServerException as error:
            raise backend_error(error) from None
        return result.as_numpy(lane.output), result.as_numpy("TOKEN_COUNT").reshape(-1)


def text_input(ensemble: str, texts: list[str], max_batch: int, priority: int, output: str = "EMBEDDING") -> ChunkedInput:
    """The ensemble's chunks for `texts`, sorted by length in chunks of SORTED_CHUNK.

    The tokenizer step pads each call to its longest text, so short texts sent apart from long ones
    are not padded to their length; the encoder's batcher merges the chunks again.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    size = min(max_batch, SORTED_CHUNK)
    members = [order[i : i + size] for i in range(0, len(order), size)]
    lane = Lane(ensemble, "TEXT", "BYTES", output, priority, size, (1,))
    # Taken here, in the request's context: the call runs in a task of the scheduler's, and Triton's logs
    # and traces then name the gateway's request.
    request_id = request_context.current_request_id()
    chunks = [
        Chunk(lane, np.array([texts[i].encode("utf-8") for i in part], dtype=np.object_).reshape(-1, 1), request_id)
        for part in members
    ]
    return ChunkedInput(chunks, members, len(texts))


def token_ids_input(
    ensemble: str,
    sequences: list[list[int]],
    max_batch: int,
    priority: int,
    output: str = "EMBEDDING",
    controls: tuple[list[np.ndarray], bool] | None = None,
) -> ChunkedInput:
    """Like text_input for token id sequences. Rows are padded with ID_PADDING to a multiple of ID_WIDTH_STEP, so
    that sequences of nearby lengths share a chunk and a lane, which the scheduler coalesces across requests.

    controls: per sequence its factors, and the mode, for an ensemble that takes attention controls.
    """
    by_width: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_width.setdefault(-(-len(sequence) // ID_WIDTH_STEP) * ID_WIDTH_STEP, []).append(index)
    size = min(max_batch, SORTED_CHUNK)
    members = [(width, rows[i : i + size]) for width, rows in by_width.items() for i in range(0, len(rows), size)]
    request_id = request_context.current_request_id()
    chunks = []
    for width, part in members:
        lane = Lane(ensemble, "TOKEN_IDS", "INT64", output, priority, size, (width,))
        ids = _right_padded([sequences[i] for i in part], width, ID_PADDING, np.int64)
        if controls is not None:
            # Factors of 1 under the padding: the step drops those positions with the ids anyway.
            factors = _right_padded([controls[0][i] for i in part], width, 1.0, np.float32)
            ids = _controlled_rows(ids, factors, controls[1])
        chunks.append(Chunk(lane, ids, request_id))
    return ChunkedInput(chunks, [part for _, part in members], len(sequences))


def _right_padded(rows: list, width: int, fill, dtype) -> np.ndarray:
    padded = np.full((len(rows), width), fill, dtype=dtype)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = row
    return padded


def _controlled_rows(ids: np.ndarray, factors: np.ndarray, log_additive: bool) -> np.ndarray:
    """Rows that carry their attention controls with their ids, as records: the scheduler concatenates and splits
    them like any other rows, and _input_tensors sends each field as its own tensor."""
    width = ids.shape[1]
    rows = np.empty(
        len(ids),
        dtype=[
            ("TOKEN_IDS", np.int64, (width,)),
            ("CONTROL_FACTORS", np.float32, (width,)),
            ("CONTROL_LOG_ADDITIVE", np.bool_, (1,)),
        ],
    )
    rows["TOKEN_IDS"], rows["CONTROL_FACTORS"], rows["CONTROL_LOG_ADDITIVE"] = ids, factors, log_additive
    return rows


def _input_tensors(lane: Lane, data: np.ndarray) -> list[grpcclient.InferInput]:
    fields = [(lane.input_name, data)] if data.dtype.names is None else [(name, data[name]) for name in data.dtype.names]
    tensors = []
    for name, values in fields:
        datatype = np_to_triton_dtype(values.dtype) if data.dtype.names else lane.datatype
        tensor = grpcclient.InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
        tensors.append(tensor)
    return tensors
