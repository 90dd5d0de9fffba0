"""Request body reading and JSON responses shared by every HTTP contract."""

from __future__ import annotations

import logging
from typing import Any, Callable

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import ErrorKind, ServiceError, internal, invalid

logger = logging.getLogger("gateway")

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def header(request: Request, name: str) -> str | None:
    """The request's first header called `name` (lower case). Starlette's request.headers scans the list and raises
    and catches a KeyError for every absent header, several times per request; one dict per request is cheaper."""
    found = request.scope.get("gateway.headers")
    if found is None:
        found = request.scope["gateway.headers"] = {key.decode("latin-1"): value for key, value in reversed(request.scope["headers"])}
    value = found.get(name)
    return None if value is None else value.decode("latin-1")


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=JSON_OPTIONS), status_code, headers, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the limit, before it is all read."""
    declared = header(request, "content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, f"request body of {declared} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(error: ValidationError) -> ServiceError:
    first = error.errors(include_url=False)[0]
    location = [str(part) for part in first["loc"] if not str(part).startswith(("function-", "list[", "str", "int"))]
    param = location[0] if location else None
    where = ".".join(location) or "body"
    return invalid(f"'{where}': {first['msg']}", param)


async def parse_body(request: Request, adapter: TypeAdapter, limit: int):
    body = await read_body(request, limit)
    try:
        return adapter.validate_json(body)
    except ValidationError as error:
        if any(e["type"] == "json_invalid" for e in error.errors()):
            raise invalid("request body is not valid JSON") from None
        raise _describe(error) from None


def error_response(render: Callable[[ServiceError], Response], error: ServiceError) -> Response:
    """The error in its contract's shape, with Retry-After when the error says when to come back (and the scheme to
    authenticate with when it asks for credentials, as RFC 9110 requires of a 401)."""
    response = render(error)
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    if error.kind is ErrorKind.UNAUTHENTICATED:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def unexpected_error_response(render: Callable[[ServiceError], Response], request: Request, error: Exception) -> Response:
    """A failure no handler foresaw: its traceback goes to the log, the caller gets a 500 that names nothing inside."""
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return error_response(render, internal())


def contract_errors(render: Callable[[ServiceError], Response]):
    """Wraps an endpoint so that every error leaves in its contract's own shape.

    A ServiceError keeps its kind's status; any other exception is logged and answered as internal() (500).
    asyncio.CancelledError is not an Exception and passes through untouched.
    """

    def wrap(endpoint):
        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request)
            except ServiceError as error:
                return error_response(render, error)
            except Exception as error:
                return unexpected_error_response(render, request, error)

        handle.__name__ = endpoint.__name__
        return handle

    return wrap
