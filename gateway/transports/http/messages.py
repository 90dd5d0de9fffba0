"""Request body reading and JSON responses shared by every HTTP contract."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.core.errors import ErrorKind, ServiceError, internal, invalid, note_answered
from gateway.transports.http.server import BODY_ERROR

logger = logging.getLogger("gateway")

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def header(request: Request, name: str) -> str | None:
    """The request's first header called `name` (lower case). Starlette's request.headers scans the list and raises
    and catches a KeyError for every absent header, several times per request; one dict per request is cheaper."""
    found = request.scope.get("gateway.headers")
    if found is None:
        found = request.scope["gateway.headers"] = {
            key.decode("latin-1"): value for key, value in reversed(request.scope["headers"])
        }
    value = found.get(name)
    return None if value is None else value.decode("latin-1")


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=JSON_OPTIONS), status_code, headers, media_type="application/json")


# A body refused for its size is answered no sooner than sending it at this rate takes (at most the cap): the gateway
# still reads and drops it, at about 0.4 ms of CPU a megabyte, and a client looping refused megabytes as fast as they
# are answered would take most of the event loop (bench/results/tokenize_flood.md); this way it takes its own time.
REFUSED_BODY_BYTES_PER_S = 32 * 1024 * 1024
REFUSED_BODY_DELAY_MAX_S = 1.0


async def _too_large(size: int, message: str) -> ServiceError:
    await asyncio.sleep(min(size / REFUSED_BODY_BYTES_PER_S, REFUSED_BODY_DELAY_MAX_S))
    return ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, message)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it is known to exceed the limit, before it is all read (after _too_large's
    delay), and with 400 when its framing is malformed (the server cut it short, see gateway.transports.http.server.BODY_ERROR)."""
    declared = header(request, "content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise await _too_large(int(declared), f"request body of {declared} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise await _too_large(size, f"request body exceeds the {limit}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServiceError(ErrorKind.CANCELLED, "the client disconnected before sending its whole body") from None
    malformed = request.scope.get(BODY_ERROR)
    if malformed is not None:
        raise invalid(f"malformed request body: {malformed}")
    return b"".join(chunks)


def _describe(error: ValidationError) -> ServiceError:
    # The deepest error is the one about what the caller meant: a prompt that is a list of items fails as a string
    # too, at its top, and "should be a valid string" says nothing about the item that is wrong.
    first = max(error.errors(include_url=False), key=lambda e: len(e["loc"]))
    location = [str(part) for part in first["loc"] if not str(part).startswith(("function-", "list[", "str", "int"))]
    param = location[0] if location else None
    where = ".".join(location) or "body"
    return invalid(f"'{where}': {first['msg']}", param)


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> None:
    keys = {key for key, _ in pairs}
    if len(keys) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)


def decode_json(body: bytes):
    """The body as JSON: strict (UTF-8, no NaN or Infinity, no lone surrogate: orjson), and with every object's keys
    distinct. JSON parsers disagree on a repeated key (most keep the last, some the first), so a request that
    repeats one means different things to different readers of it: refused, naming the key.

    orjson cannot see repeated keys; the standard parser, given an object_pairs_hook, can. Both run in C, and the two
    together take a third of the time pydantic's validate_json took for a 2048-text body (a few microseconds more
    for a one-text one)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid("request body is not valid JSON") from None
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as duplicate:
        message = f"key {duplicate.key!r} appears more than once in one JSON object; send each key once"
        raise invalid(message, duplicate.key) from None
    except RecursionError:  # nested deeper than this interpreter's stack, though within orjson's 1024 levels
        raise invalid("request body is nested too deeply") from None
    return data


async def parse_body(request: Request, adapter: TypeAdapter, limit: int):
    data = decode_json(await read_body(request, limit))
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        raise _describe(error) from None


def error_response(render: Callable[[ServiceError], Response], error: ServiceError) -> Response:
    """The error in its contract's shape, with Retry-After when the error says when to come back (and the scheme to
    authenticate with when it asks for credentials, as RFC 9110 requires of a 401)."""
    note_answered(error)
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
