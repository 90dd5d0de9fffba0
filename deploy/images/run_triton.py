"""Triton alone, in the foreground: the command of the Triton pods of both images (python -m deploy.images.run_triton).

Starts the Triton Inference Server of the nvidia-pytriton wheel (in the GPU image, NVIDIA's own in its place) on the
model repository as the gateway does (gateway.triton.process.TritonProcess, with the gateway's EMBED_* settings for the
repository, Triton's ports, the run directory and logging), listening on every address so that gateways in other pods
can call it. It exits when
Triton can no longer serve: tritonserver exited, or a Python-backend stub died, which Triton never notices (its ready
endpoint stays green while every request routed to that stub fails) and so no probe can see. The container then
restarts. SIGTERM or SIGINT stops Triton, letting the requests in flight finish, and exits 0.

Triton's model control, shared-memory, trace and logging APIs answer only calls with the admin key
(gateway.triton.process.RESTRICTED_APIS): EMBED_TRITON_ADMIN_KEY (from a Kubernetes Secret) or, unset, a random key
in triton-admin-key in the run directory, which `kubectl exec` can read.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

from gateway.core.catalog import Catalog
from gateway.ops.logs import configure_logging
from gateway.ops.settings import parse_settings
from gateway.triton.process import ADMIN_KEY_GRPC_METADATA, ADMIN_KEY_HEADER, TritonPorts, TritonProcess, TritonStartError

log = logging.getLogger("gateway.triton")

# Loading every model may take minutes on a busy node; the chart's startup probe allows as long.
START_TIMEOUT_S = 600.0
# How often the process and its stubs are checked.
WATCH_INTERVAL_S = 1.0
# Triton gets --exit-timeout-secs=5 to finish the requests in flight, then this margin before it is killed.
STOP_TIMEOUT_S = 10.0


class _Stop(Exception):
    """Raised in the main thread by SIGTERM or SIGINT, which may arrive while Triton is still loading."""


def _stop(signum: int, frame) -> None:
    raise _Stop


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    try:
        configure_logging(settings.log_level, settings.log_format)
        catalog = Catalog.from_repository(settings.model_repository)
    except ValueError as error:  # a bad log setting, nothing exported, or an export older than this code
        print(f"run_triton: {error}", file=sys.stderr)
        return 2
    ports = TritonPorts(settings.triton_http_port, settings.triton_grpc_port, settings.triton_metrics_port)
    # Triton's own log goes to the container's output, next to these lines.
    triton = TritonProcess(
        settings.model_repository,
        catalog.triton_models,
        ports,
        settings.run_dir,
        Path("/dev/stdout"),
        address="0.0.0.0",
        admin_key=settings.triton_admin_key or None,
    )
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        triton.start(timeout_s=START_TIMEOUT_S)
        log.info(
            "Triton serves %d models on HTTP %d, gRPC %d, metrics %d",
            len(catalog.triton_models),
            ports.http,
            ports.grpc,
            ports.metrics,
        )
        log.info(
            "its model control, shared-memory, trace and logging APIs need the key in %s, as HTTP header %s or gRPC metadata %s",
            triton.admin_key_file,
            ADMIN_KEY_HEADER,
            ADMIN_KEY_GRPC_METADATA,
        )
        while (fault := triton.fault()) is None:
            time.sleep(WATCH_INTERVAL_S)
        log.error("Triton can no longer serve: %s; exiting so that the container is restarted", fault)
        return 1
    except TritonStartError as error:
        log.error("%s", error)
        return 1
    except _Stop:
        log.info("stopping Triton")
        return 0
    finally:
        # A second signal must not cut the stop short and leave the stubs' shared memory behind.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        triton.stop(timeout_s=STOP_TIMEOUT_S)


if __name__ == "__main__":
    sys.exit(main())
