"""The HTTP application: every contract's routes, plus /health."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import aleph_alpha_api, openai_api
from gateway.embedding_service import EmbeddingService
from gateway.http_io import json_response


def build_app(service: EmbeddingService, max_body_bytes: int) -> Starlette:
    async def health(request: Request) -> Response:
        ensembles = [m.text_ensemble for m in service.catalog.models.values()]
        ready = {name: await service.triton.is_ready(name) for name in ensembles}
        status = 200 if all(ready.values()) else 503
        headers = None if status == 200 else {"Retry-After": "2"}
        return json_response({"status": "ok" if status == 200 else "unavailable", "models": ready}, status, headers)

    routes = [
        Route("/health", health, methods=["GET"]),
        *openai_api.routes(service, max_body_bytes),
        *aleph_alpha_api.routes(service, max_body_bytes),
    ]
    return Starlette(routes=routes)
