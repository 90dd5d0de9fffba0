"""CLI: python -m gateway. Starts Triton (unless --triton-url is given) and serves the HTTP and gRPC contracts.

With --workers N, this process starts Triton and N gateway processes that serve on the same ports (gateway.workers).
`python -m gateway users ...` and `python -m gateway tokens ...` manage users and API tokens (gateway.auth.cli).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
from dataclasses import dataclass

import uvloop

from gateway.auth import cli as admin_cli
from gateway.auth.authenticator import Authenticator
from gateway.auth.store import StoreUnavailable, open_store
from gateway.core.cache import EmbeddingCache
from gateway.core.catalog import Catalog
from gateway.core.scheduler import Scheduler
from gateway.core.service import EmbeddingService
from gateway.ops.logs import configure_logging
from gateway.ops.metrics import Metrics
from gateway.ops.settings import Settings, parse_settings, redacted_setting
from gateway.transports.grpc.connections import GrpcConnectionLimits, split_descriptors
from gateway.transports.grpc.server import create_server
from gateway.transports.http.app import build_app, protocol_refusals
from gateway.transports.http.server import ConnectionLimits, create_http_server, derive_max_connections, resolved_limits
from gateway.transports.policy import RequestPolicy
from gateway.triton.client import TritonClient
from gateway.triton.pool import TritonPool
from gateway.triton.process import ADMIN_KEY_GRPC_METADATA, ADMIN_KEY_HEADER, TritonPorts, TritonProcess, TritonStartError
from gateway.triton.supervisor import TritonHealth, TritonSupervisor
from gateway.workers import WorkerRole, Workers, start_sharing_metrics

log = logging.getLogger("gateway")
# The banner's last line: printed once the gateway serves (with --workers, once every worker does).
READY_LINE = "ready; Ctrl-C stops"


def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal_to_listen(settings: Settings) -> str | None:
    """Why the gateway must not start: an open gateway on a network address serves anyone who can reach it."""
    if settings.auth or settings.allow_unauthenticated or is_loopback(settings.host):
        return None
    return (
        f"refusing to listen on {settings.host} without authentication. Turn it on with --auth (EMBED_AUTH=1) after "
        "creating a user and a token: python -m gateway users add you@example.com --role admin, then "
        "python -m gateway tokens create --user you@example.com --description ops. "
        "Pass --allow-unauthenticated only when something in front of the gateway authenticates callers."
    )


async def _triton_pool(settings: Settings, process: TritonProcess | None) -> TritonPool:
    """The Tritons to use: those of --triton-url, or the one the gateway started."""
    if process is None:
        try:
            return await TritonPool.connect(settings.triton_url, dns_refresh_s=settings.triton_dns_refresh_s)
        except ValueError as error:
            raise SystemExit(f"gateway: {error}") from None
    pool = TritonPool([])
    pool.adopt(TritonHealth(TritonClient(process.grpc_url)))
    await pool.check()
    return pool


@dataclass(frozen=True)
class _Listeners:
    """Where the gateway serves, and how many connections each port takes at most (per process)."""

    http_port: int
    grpc_port: int
    http_connections: int
    grpc_connections: int


def _connection_limits(settings: Settings) -> tuple[ConnectionLimits, GrpcConnectionLimits]:
    # One budget of descriptors for both ports' connections, so that neither can take the other's.
    budget = split_descriptors(derive_max_connections(), settings.max_connections, settings.grpc_max_connections)
    limits = ConnectionLimits(settings.header_timeout_s, settings.max_header_bytes, settings.max_headers, budget.http_connections)
    grpc_limits = GrpcConnectionLimits(budget.grpc_connections, budget.grpc_backlog, settings.grpc_handshake_timeout_s)
    return resolved_limits(limits), grpc_limits


async def serve(
    settings: Settings, catalog: Catalog, process: TritonProcess | None, authenticator, role: WorkerRole | None = None
) -> None:
    """One gateway: the whole of it, or (role) one of a host's --workers, which serves on the parent's sockets, admits
    its share of the host's pending texts and rows in flight, and says it serves in its role's file, not on stdout."""
    pool = await _triton_pool(settings, process)
    metrics = Metrics(shared=role is not None)
    cache = None
    if settings.cache_url:
        cache = EmbeddingCache(settings.cache_url, metrics, ttl_s=settings.cache_ttl_s, max_bytes=settings.cache_max_bytes)
    scheduler = Scheduler(
        pool,
        pool.infer,
        max_pending_texts=role.share(settings.max_pending_texts) if role else settings.max_pending_texts,
        max_rows_in_flight=role.share(settings.max_rows_in_flight) if role else settings.max_rows_in_flight,
        max_calls_per_lane=settings.max_calls_per_lane,
    )
    service = EmbeddingService(
        catalog,
        scheduler,
        max_inputs=settings.max_inputs,
        truncate=settings.truncate,
        timeout_s=settings.request_timeout_s,
        cache=cache,
    )
    metrics.watch_scheduler(lambda: scheduler.rows_in_flight, lambda: scheduler.pending_texts)
    metrics.watch_triton(lambda: pool.ready_count, lambda: len(pool.endpoints))
    background = [asyncio.create_task(pool.run())]
    if cache is not None:
        background.append(asyncio.create_task(cache.run()))
    if authenticator is not None:
        background.append(asyncio.create_task(authenticator.run()))
    if metrics.shared:
        background.append(asyncio.create_task(metrics.keep_shared_gauges()))
    if process is not None:
        (health,) = (endpoint.health for endpoint in pool.endpoints.values())
        supervisor = TritonSupervisor(process, health, settings.triton_stall_restart_s, on_restart=metrics.triton_restarted)
        background.append(asyncio.create_task(supervisor.run()))

    async def close_clients() -> None:
        await pool.close()
        if cache is not None:
            await cache.close()

    limits, grpc_limits = _connection_limits(settings)
    policy = RequestPolicy(
        authenticator,
        metrics,
        loopback_host_only=authenticator is None and is_loopback(settings.host),
        metrics_open=not settings.metrics_auth,
    )
    server = create_http_server(
        build_app(service, settings.max_body_bytes, policy),
        settings.host,
        settings.http_port,
        limits,
        protocol_refusals(policy),
        # Our logging configuration stays in force: uvicorn's lines get the same format and request ids.
        log_config=None,
        log_level="warning",
        access_log=False,
        # Requests still running this long after a stop signal are cancelled (and answered 503), so a stalled Triton
        # cannot hold the exit.
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    try:
        grpc_sockets = role.grpc_sockets() if role else None
        grpc_server, grpc_port = create_server(
            service, settings.host, settings.grpc_port, policy, limits=grpc_limits, sockets=grpc_sockets
        )
    except RuntimeError as error:
        _cancel(background)
        await close_clients()
        raise SystemExit(f"gateway: {error}") from None
    await grpc_server.start()
    draining: list[asyncio.Task] = []  # holds the drain task so it is not garbage-collected midway

    def stop() -> None:
        # Nothing restarts Triton from here on. Both listeners drain at once: uvicorn finishes its requests
        # while gRPC finishes its calls, each for at most the grace period.
        _cancel(background)
        server.should_exit = True
        draining.append(asyncio.create_task(grpc_server.stop(settings.shutdown_grace_s)))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    http_task = asyncio.create_task(server.serve(role.http_sockets() if role else None))
    while not server.started and not http_task.done():  # noqa: ASYNC110 - uvicorn's `started` is a flag, not an event
        await asyncio.sleep(0.05)
    if http_task.done():
        _cancel(background)
        await grpc_server.stop(0)
        await close_clients()
        raise SystemExit(f"gateway: could not listen on {settings.host}:{settings.http_port}")
    if role is not None:
        role.serving()
    else:
        listeners = _Listeners(settings.http_port, grpc_port, server.limits.max_connections, grpc_limits.max_connections)
        _print_banner(settings, catalog, process, list(pool.endpoints), listeners)
        print(READY_LINE, flush=True)
    try:
        await http_task
    finally:
        _cancel(background)
        await grpc_server.stop(settings.shutdown_grace_s)
        await close_clients()


def _print_banner(
    settings: Settings, catalog: Catalog, process: TritonProcess | None, triton_endpoints: list[str], listeners: _Listeners
) -> None:
    """Where everything listens, once the gateway serves (with --workers, once all of them do)."""
    per = " per worker" if settings.workers > 1 else ""
    for model in catalog.models.values():
        print(f"model      {model.name} ({model.model_version}, {model.dimensions} dims)")
        print(f"           {model.precision} on {model.target}: {', '.join(model.execution_providers) or 'TensorRT plans'}")
    print(f"HTTP       http://{settings.host}:{listeners.http_port}")
    print("           OpenAI: POST /v1/embeddings, GET /v1/models")
    print(
        "           Aleph Alpha: POST /semantic_embed /batch_semantic_embed /embed /tokenize /detokenize, GET /models_available /version"
    )
    print(f"gRPC       {settings.host}:{listeners.grpc_port}  (embedding.v1.EmbeddingService, grpc.health.v1.Health, reflection)")
    print(f"           connections at most{per}: HTTP {listeners.http_connections}, gRPC {listeners.grpc_connections}")
    print("           probes: GET /health/live /health/ready /health; Prometheus: GET /metrics")
    if process is None:  # --triton-url
        print(f"Triton     {', '.join(triton_endpoints) or settings.triton_url} (gRPC, KServe v2)")
    else:
        # The started Triton, whose ensembles tritonclient and perf_analyzer can call directly.
        print(
            f"Triton     127.0.0.1:{settings.triton_grpc_port} (gRPC), http://127.0.0.1:{settings.triton_http_port} (HTTP); KServe v2"
        )
        print("           its admin APIs (model control, shared memory, trace, logging) need the key in")
        print(
            f"           {process.admin_key_file}, as HTTP header {ADMIN_KEY_HEADER} or gRPC metadata {ADMIN_KEY_GRPC_METADATA}"
        )
    if settings.cache_url:
        print(f"cache      {redacted_setting('cache_url', settings.cache_url)} (TTL {settings.cache_ttl_s} s)")
    if not settings.auth:
        print("auth       off (loopback only); turn on with --auth")
    else:
        store = redacted_setting("auth_database", settings.auth_store_location)
        print(f"auth       on; tokens in {store}; POST /get_token, /users/me/tokens")


async def _serve_host(settings: Settings, catalog: Catalog, process: TritonProcess | None, argv: list[str]) -> int:
    """--workers N: this process supervises Triton and the N gateway processes that serve (gateway.workers)."""
    try:
        workers = Workers(settings, argv, process)
    except (OSError, RuntimeError) as error:
        raise SystemExit(f"gateway: could not listen on {settings.host}: {error}") from None
    http_limits, grpc_limits = _connection_limits(settings)

    def banner(pool: TritonPool, http_port: int, grpc_port: int, pids: str) -> None:
        listeners = _Listeners(http_port, grpc_port, http_limits.max_connections, grpc_limits.max_connections)
        _print_banner(settings, catalog, process, list(pool.endpoints), listeners)
        print(f"workers    {settings.workers} gateway processes, pids {pids}")
        print(READY_LINE, flush=True)

    return await workers.run(lambda: _triton_pool(settings, process), banner)


def _authenticator(settings: Settings, role: WorkerRole | None = None) -> Authenticator | None:
    if not settings.auth:
        return None
    try:
        return Authenticator(open_store(settings.auth_store_location), workers=role.workers if role else 1)
    except StoreUnavailable as error:
        raise SystemExit(
            f"gateway: the token store {redacted_setting('auth_database', settings.auth_store_location)} is unavailable: {error}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in admin_cli.COMMANDS:
        return admin_cli.main(argv)
    settings = parse_settings(argv)
    try:
        configure_logging(settings.log_level, settings.log_format)
    except ValueError as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    if settings.workers < 1:
        print(f"gateway: --workers must be 1 or more, got {settings.workers}", file=sys.stderr)
        return 2
    refusal = refusal_to_listen(settings)
    if refusal is not None:
        print(f"gateway: {refusal}", file=sys.stderr)
        return 2
    role = WorkerRole.of_this_process()
    host = settings.workers > 1 and role is None
    if host:
        # Before any metric exists, in this process and (through the environment) in the workers.
        start_sharing_metrics(settings)
    authenticator = None if host else _authenticator(settings, role)
    try:
        catalog = Catalog.from_repository(settings.model_repository)
    except ValueError as error:  # nothing exported yet, or a model exported by an older version
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    triton = None
    if not settings.triton_url:
        ports = TritonPorts(settings.triton_http_port, settings.triton_grpc_port, settings.triton_metrics_port)
        triton = TritonProcess(
            settings.model_repository,
            catalog.triton_models,
            ports,
            settings.run_dir,
            settings.run_dir / "triton.log",
            admin_key=settings.triton_admin_key or None,
        )
        print(f"starting Triton (log: {triton.log_file})", flush=True)
        try:
            triton.start()
        except TritonStartError as error:
            print(f"gateway: {error}", file=sys.stderr)
            return 1
    try:
        # uvloop for the whole gateway: uvicorn's loop="uvloop" only applies when uvicorn creates the loop itself.
        if host:
            return uvloop.run(_serve_host(settings, catalog, triton, argv))
        uvloop.run(serve(settings, catalog, triton, authenticator, role))
    finally:
        if triton is not None:
            triton.stop(timeout_s=3.0)
            print("stopped Triton and the gateway", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
