"""Around every HTTP request: its id, the checks no route should repeat (host, content type, caller, rate limit),
then one metrics update and one access-log line when it ends, whatever the outcome.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware: it adds no task or stream per request, and
the request's context variable stays bound while the route runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth.authenticator import forbidden
from gateway.core.errors import ErrorKind, ServiceError
from gateway.ops import request_context
from gateway.ops.request_context import RequestContext, request_id_from
from gateway.transports.http.messages import error_response, header, unexpected_error_response
from gateway.transports.policy import RequestPolicy

# Answered without a token: probes and orchestration must work before anyone has one, and the login makes one.
OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/version", "/get_token"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
ROUTES_SEEN_MAX = 4096
SHUTTING_DOWN = ServiceError(
    ErrorKind.UNAVAILABLE, "the gateway is shutting down and could not finish this request in its grace period; retry it"
)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        policy: RequestPolicy,
        contract_of: Callable[[str], str],
        render_for: Callable[[str], Callable[[ServiceError], Response]],
    ):
        self.app = app
        self.routes = routes
        self.policy = policy
        self.contract_of = contract_of
        self.render_for = render_for
        self._routes_seen: dict[tuple[str, str], tuple[str, bool]] = {}

    def _route(self, scope: Scope) -> tuple[str, bool]:
        """The route's template (a bounded label, where the raw path would make one time series per token id), and
        whether it takes the request's method. Remembered per method and path: matching every route's pattern
        again on each request costs more than the rest of this middleware."""
        key = (scope["method"], scope["path"])
        found = self._routes_seen.get(key)
        if found is None:
            found = self._match(scope)
            if len(self._routes_seen) >= ROUTES_SEEN_MAX:  # arbitrary paths must not grow it without bound
                self._routes_seen.clear()
            self._routes_seen[key] = found
        return found

    def _match(self, scope: Scope) -> tuple[str, bool]:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return getattr(route, "path", "other"), match is Match.FULL
        return "unmatched", False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = scope["path"]
        route, routed = self._route(scope)
        context = RequestContext(request_id_from(header(request, "x-request-id")), self.contract_of(path), route)
        status = {"code": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", context.request_id.encode()))
            await send(message)

        bound = request_context.bind(context)
        self.policy.metrics.request_started(context)
        try:
            try:
                await self._check(request, context, path, routed)
            except ServiceError as error:
                response = error_response(self.render_for(path), error)
                await response(scope, receive, send_with_id)
                return
            except Exception as error:
                # A failure of admission nothing foresaw (the token store's database, say). It is outside the app, so
                # none of the app's handlers would catch it, and uvicorn would answer a plain-text 500.
                await unexpected_error_response(self.render_for(path), request, error)(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # Nothing but the server cancels a request's task (a client that leaves is answered CANCELLED by its route):
            # uvicorn does, for the requests still running when the shutdown grace period ends. They are answered here,
            # in their contract's shape, as a 503 the caller can retry elsewhere, where uvicorn would log a traceback
            # each and answer a plain-text 500.
            task = asyncio.current_task()
            assert task is not None  # this coroutine runs in the request's task, which was just cancelled
            if status["started"] or not task.cancelling():
                raise
            task.uncancel()
            await error_response(self.render_for(path), SHUTTING_DOWN)(scope, receive, send_with_id)
        finally:
            self.policy.finish(context, str(status["code"]))
            request_context.unbind(bound)

    async def _check(self, request: Request, context: RequestContext, path: str, routed: bool) -> None:
        policy = self.policy
        if policy.loopback_host_only and _host_name(header(request, "host") or "").lower() not in LOOPBACK_HOSTS:
            raise forbidden("this gateway answers only requests addressed to localhost while authentication is off")
        # An unknown path or method is answered 404 or 405 by the router (after authentication, when it is on).
        if routed and request.method in BODY_METHODS and not _is_json(header(request, "content-type")):
            raise ServiceError(
                ErrorKind.UNSUPPORTED_MEDIA_TYPE, "the request body must be JSON: send 'Content-Type: application/json'"
            )
        if path in OPEN_PATHS or (path == "/metrics" and policy.metrics_open):
            return
        principal = await policy.admit(context, header(request, "authorization"))
        if principal is not None:
            request.scope.setdefault("state", {})["principal"] = principal
