"""OpenAI-compatible /v1/embeddings and /v1/models (also /embeddings, which the Aleph Alpha client calls)."""

from __future__ import annotations

import base64
import time
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter
from starlette.requests import Request
from starlette.routing import Route

from gateway.core.errors import ServiceError
from gateway.core.service import EmbedCall, EmbeddingService
from gateway.ops.request_context import request_id_field
from gateway.transports.http.lifecycle import cancel_on_disconnect, deadline, refuse_early
from gateway.transports.http.messages import contract_errors, json_response, parse_body
from gateway.transports.http.status import http_status

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: StrictInt | None = Field(default=None)
    user: StrictStr | None = None
    truncate: StrictBool | None = None


REQUEST = TypeAdapter(EmbeddingsRequest)


def render_error(error: ServiceError):
    status = http_status(error)
    body = {
        "message": error.message,
        "type": ERROR_TYPES.get(status, "server_error"),
        "param": error.param,
        "code": error.kind.value,
    }
    return json_response({"error": body | request_id_field()}, status)


def _to_call(request: EmbeddingsRequest, deadline) -> EmbedCall:
    items = [request.input] if isinstance(request.input, str) else request.input
    is_ids = bool(items) and isinstance(items[0], (int, list))
    if is_ids and isinstance(items[0], int):
        items = [items]
    # pydantic validated the list as a whole against one of the input's types, so its first item tells which.
    return EmbedCall(
        model=request.model,
        texts=None if is_ids else cast(list[str], items),
        token_ids=cast(list[list[int]], items) if is_ids else None,
        dimensions=request.dimensions,
        truncate=request.truncate,
        deadline=deadline,
    )


def _encode(vector, encoding_format: str | None):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector


def routes(service: EmbeddingService, max_body_bytes: int) -> list[Route]:
    @contract_errors(render_error)
    async def embeddings(request: Request):
        expires = deadline(request, service)
        refuse_early(service, expires)
        body = await parse_body(request, REQUEST, max_body_bytes)
        result = await cancel_on_disconnect(request, service.embed(_to_call(body, expires)))
        data = [
            {"object": "embedding", "embedding": _encode(vector, body.encoding_format), "index": index}
            for index, vector in enumerate(result.embeddings)
        ]
        usage = {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens}
        return json_response({"object": "list", "data": data, "model": result.model.name, "usage": usage})

    @contract_errors(render_error)
    async def models(request: Request):
        data = [
            {"id": model.name, "object": "model", "created": int(time.time()), "owned_by": "triton-embedding-service"}
            for model in service.models()
        ]
        return json_response({"object": "list", "data": data})

    return [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
