"""The HTTP application: every contract's routes, the token routes, the probes and /metrics.

Every error leaves in the shape of the contract at its path, including the ones no route answers itself:
an unknown path (404), a method a route does not take (405, with Allow) and any exception that escapes a
route (500). Paths under /v1/ and /embeddings belong to the OpenAI contract, everything else to Aleph Alpha's.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.core.errors import RETRY_AFTER_S, ErrorKind, ServiceError
from gateway.core.service import EmbeddingService
from gateway.ops.metrics import UNPARSED_ROUTE
from gateway.ops.request_context import RequestContext, request_id_from
from gateway.transports.http import aleph_alpha as aleph_alpha_api
from gateway.transports.http import openai as openai_api
from gateway.transports.http import tokens as token_api
from gateway.transports.http.messages import (
    JSON_OPTIONS,
    contract_errors,
    error_response,
    json_response,
    unexpected_error_response,
)
from gateway.transports.http.middleware import RequestMiddleware
from gateway.transports.http.server import Refusals
from gateway.transports.policy import RequestPolicy

# The ErrorKind whose code and type describe an HTTP status that a route did not choose itself.
_KIND_OF_STATUS = {
    401: ErrorKind.UNAUTHENTICATED,
    403: ErrorKind.FORBIDDEN,
    404: ErrorKind.NOT_FOUND,
    413: ErrorKind.PAYLOAD_TOO_LARGE,
    429: ErrorKind.OVERLOADED,
    503: ErrorKind.UNAVAILABLE,
}


OPS_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})


def _is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path == "/embeddings" or path.startswith("/embeddings/")


def renderer_for(path: str) -> Callable[[ServiceError], Response]:
    """The error renderer of the contract that owns a path."""
    return openai_api.render_error if _is_openai(path) else aleph_alpha_api.render_error


def contract_of(path: str) -> str:
    """The contract label of a path in metrics and logs."""
    if path in OPS_PATHS:
        return "ops"
    return "openai" if _is_openai(path) else "aleph_alpha"


# The contract label of a request refused before its path was read.
NO_CONTRACT = "http"


def protocol_refusals(policy: RequestPolicy) -> Refusals:
    """How the HTTP server answers the requests it refuses itself (unparsable, headers too slow or too large, see
    gateway.transports.http.server): in the shape of the contract at their path when it was read (OpenAI's otherwise), with a
    request id, counted in the metrics like every refusal, and in the access log sampled (junk by nature)."""

    def refuse(path: str | None, status: int, message: str, code: str) -> tuple[bytes, str]:
        contract = NO_CONTRACT if path is None else contract_of(path)
        context = RequestContext(request_id_from(None), contract, UNPARSED_ROUTE)
        policy.metrics.request_refused_unparsed(contract, status)
        policy.access_log.write(context, str(status), sample=True)
        if path is None or _is_openai(path):
            error_type = openai_api.ERROR_TYPES.get(status, "invalid_request_error")
            error = {"message": message, "type": error_type, "param": None, "code": code, "request_id": context.request_id}
            body: dict[str, object] = {"error": error}
        else:
            body = {"error": message, "code": code.upper(), "field": None, "request_id": context.request_id}
        return orjson.dumps(body, option=JSON_OPTIONS), context.request_id

    return refuse


def _message(request: Request, error: HTTPException, headers: dict[str, str]) -> str:
    path = request.url.path
    if error.status_code == 404:
        return f"no route for path '{path}'"
    if error.status_code == 405:
        return f"method {request.method} is not allowed on '{path}'; allowed: {headers.get('Allow', '')}"
    return f"{error.detail} on '{path}'"


async def _http_exception(request: Request, error: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the contract's shape, status and headers kept."""
    assert isinstance(error, HTTPException)
    status = error.status_code
    headers = dict(error.headers or {})
    if "Allow" in headers:  # Starlette joins a set; sorted, the header is the same on every run
        headers["Allow"] = ", ".join(sorted(method.strip() for method in headers["Allow"].split(",")))
    kind = _KIND_OF_STATUS.get(status, ErrorKind.BACKEND if status >= 500 else ErrorKind.VALIDATION)
    response = error_response(renderer_for(request.url.path), ServiceError(kind, _message(request, error, headers)))
    response.status_code = status
    for name, value in headers.items():
        response.headers[name] = value
    return response


async def _escaped(request: Request, error: Exception) -> Response:
    """Whatever escapes a route: a ServiceError keeps its status, anything else is logged and answered 500."""
    render = renderer_for(request.url.path)
    if isinstance(error, ServiceError):
        return error_response(render, error)
    return unexpected_error_response(render, request, error)


def _unready(reason: str) -> Response:
    # Not ready is the kind UNAVAILABLE, and says when to come back as its errors do.
    retry_after = RETRY_AFTER_S[ErrorKind.UNAVAILABLE]
    return json_response({"status": "unavailable", "reason": reason}, 503, {"Retry-After": str(retry_after)})


class StaticRoutes:
    """Calls the endpoint of a fixed path (no path parameters) directly, and leaves every other request to Starlette.

    Starlette's error middlewares, router and endpoint wrapper cost about a fifth of the gateway's CPU per request at
    thousands of requests a second; the embedding routes are fixed paths whose endpoints answer every ServiceError in
    their contract's shape themselves. Whatever still escapes is answered as Starlette's handler would (_escaped).
    """

    def __init__(self, app: ASGIApp, routes: list[Route]):
        self.app = app
        self.endpoints = {
            (method, route.path): route.endpoint
            for route in routes
            if isinstance(route, Route) and not route.param_convertors
            for method in route.methods or ()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as error:
            response = await _escaped(request, error)
        await response(scope, receive, send)


def build_app(service: EmbeddingService, max_body_bytes: int, policy: RequestPolicy) -> ASGIApp:

    # The probes answer from the state background tasks keep, so a stalled Triton or database cannot stall them.
    @contract_errors(aleph_alpha_api.render_error)
    async def health(request: Request) -> Response:
        return json_response({"status": "ok"}) if service.health.ready else _unready(service.health.reason)

    async def live(request: Request) -> Response:
        return json_response({"status": "ok"})

    @contract_errors(aleph_alpha_api.render_error)
    async def ready(request: Request) -> Response:
        reason = policy.unready_reason(service.health)
        return json_response({"status": "ok"}) if reason is None else _unready(reason)

    async def metrics(request: Request) -> Response:
        body, content_type = policy.metrics.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *openai_api.routes(service, max_body_bytes),
        *token_api.routes(policy.authenticator, max_body_bytes),
        *aleph_alpha_api.routes(service, max_body_bytes),
    ]
    # Exception (or 500) is the handler of Starlette's ServerErrorMiddleware, the outermost layer; it answers
    # and then re-raises, so the server also logs what escaped.
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception, Exception: _escaped})
    return RequestMiddleware(StaticRoutes(app, routes), routes, policy, contract_of, renderer_for)
