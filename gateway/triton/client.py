"""The one place that talks to Triton: builds inference requests for the ensembles and maps its failures.

Triton errors that a retry can cure (Triton down or restarting, a dead stub) become UNAVAILABLE, which the
scheduler retries; anything else unexpected is logged here and reaches the caller as a generic internal error.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gateway.core.errors import ErrorKind, ServiceError, internal
from gateway.core.scheduler import Lane
from repository_contract import tensors

log = logging.getLogger("gateway.triton")

# Triton's words for a model it cannot serve right now: loading after a restart, or a stub that died. The call
# is retried (until its deadline) like one that found Triton down, and the instance name never reaches a caller.
_TRANSIENT = ("stub process", "is not healthy", "unknown model", "is not ready", "request timeout expired", "failed to connect")


# How a step begins the message of an input it refuses as the caller's mistake (with INVALID_ARGUMENT): an image that
# passed the gateway's header check but does not decode, a text over the model's limit in a call that does not truncate.
_INPUT_REFUSED = re.compile(r"(image-preprocess|tokenizer): (row \d+: )?")


def backend_error(error: InferenceServerException) -> ServiceError:
    status = str(error.status() or "")
    message = str(error.message() or "")
    refused = _INPUT_REFUSED.search(message) if "INVALID_ARGUMENT" in status else None
    if refused is not None:
        return ServiceError(ErrorKind.VALIDATION, message[refused.end() :])
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
        outputs = [grpcclient.InferRequestedOutput(lane.output), grpcclient.InferRequestedOutput(tensors.TOKEN_COUNT)]
        try:
            # The deadline travels twice: the client gives up at it, and every step's queue policy drops the
            # request once it has waited that long, so Triton does not compute answers nobody waits for.
            result = await self._client.infer(
                lane.model,
                _input_tensors(data),
                outputs=outputs,
                priority=lane.priority,
                request_id=request_id,
                parameters=dict(lane.parameters) or None,
                timeout=max(int(timeout_s * 1e6), 1),
                client_timeout=timeout_s,
            )
        except InferenceServerException as error:
            raise backend_error(error) from None
        return result.as_numpy(lane.output), result.as_numpy(tensors.TOKEN_COUNT).reshape(-1)


def _input_tensors(data: np.ndarray) -> list[grpcclient.InferInput]:
    """Each field of the rows (records named by the ensemble's inputs, see gateway.core.chunking) as its tensor."""
    inputs = []
    for name in data.dtype.names or ():
        values = data[name]
        tensor = grpcclient.InferInput(name, list(values.shape), np_to_triton_dtype(values.dtype))
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    return inputs
