"""CLI: python -m gateway. Starts Triton (unless --triton-url is given) and serves the HTTP and gRPC contracts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import uvicorn

from gateway.catalog import Catalog
from gateway.embedding_service import EmbeddingService
from gateway.grpc_server import create_server
from gateway.http_app import build_app
from gateway.settings import Settings, parse_settings
from gateway.triton_client import TritonClient
from gateway.triton_process import TritonPorts, TritonProcess, TritonStartError


# How long calls in flight may run on after a stop signal before gRPC cancels them.
GRPC_GRACE_S = 30.0


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: main() stops every listener, then Triton, on one signal."""

    def capture_signals(self):
        return contextlib.nullcontext()


async def serve(settings: Settings, catalog: Catalog, triton_url: str) -> None:
    triton = TritonClient(triton_url)
    service = EmbeddingService(
        catalog, triton, max_inputs=settings.max_inputs, max_in_flight=settings.max_in_flight, truncate=settings.truncate
    )
    config = uvicorn.Config(
        build_app(service, settings.max_body_bytes),
        host=settings.host,
        port=settings.http_port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    server = _HttpServer(config)
    try:
        grpc_server, grpc_port = create_server(service, settings.host, settings.grpc_port)
    except RuntimeError as error:
        await triton.close()
        raise SystemExit(f"gateway: {error}") from None
    await grpc_server.start()
    draining: list[asyncio.Task] = []  # holds the drain task so it is not garbage-collected midway

    def stop() -> None:
        # Both listeners drain at once: uvicorn finishes its requests while gRPC finishes its calls.
        server.should_exit = True
        draining.append(asyncio.create_task(grpc_server.stop(GRPC_GRACE_S)))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    http_task = asyncio.create_task(server.serve())
    while not server.started and not http_task.done():
        await asyncio.sleep(0.05)
    if http_task.done():
        await grpc_server.stop(0)
        await triton.close()
        raise SystemExit(f"gateway: could not listen on {settings.host}:{settings.http_port}")
    for model in catalog.models.values():
        print(f"model      {model.name} ({model.model_version}, {model.dimensions} dims)")
    print(f"HTTP       http://{settings.host}:{settings.http_port}")
    print("           OpenAI: POST /v1/embeddings, GET /v1/models; GET /health")
    print("           Aleph Alpha: POST /semantic_embed /batch_semantic_embed /embed /tokenize /detokenize, GET /models_available /version")
    print(f"gRPC       {settings.host}:{grpc_port}  (embedding.v1.EmbeddingService, grpc.health.v1.Health, reflection)")
    print(f"Triton     {triton_url} (gRPC, KServe v2)")
    print("ready; Ctrl-C stops", flush=True)
    try:
        await http_task
    finally:
        await grpc_server.stop(GRPC_GRACE_S)
        await triton.close()


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    catalog = Catalog.from_repository(settings.model_repository)
    triton = None
    if settings.triton_url:
        triton_url = settings.triton_url
    else:
        ports = TritonPorts(settings.triton_http_port, settings.triton_grpc_port, settings.triton_metrics_port)
        triton = TritonProcess(settings.model_repository, ports, settings.run_dir, settings.run_dir / "triton.log")
        print(f"starting Triton (log: {triton.log_file})", flush=True)
        try:
            triton.start(ready_model=next(iter(catalog.models.values())).text_ensemble)
        except TritonStartError as error:
            print(f"gateway: {error}", file=sys.stderr)
            return 1
        triton_url = triton.grpc_url
    try:
        asyncio.run(serve(settings, catalog, triton_url))
    finally:
        if triton is not None:
            triton.stop()
            print("stopped Triton and the gateway", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
