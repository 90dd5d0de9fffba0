# syntax=docker/dockerfile:1.7
# The CPU image: the gateway (python -m gateway, which starts its own Triton unless EMBED_TRITON_URL is given) and
# Triton alone (python -m deploy.images.run_triton), with the default model exported into /models at build time.
#
#   docker buildx build -f deploy/images/cpu.Dockerfile -t embedding-service:0.1.0 .

FROM python:3.11.7-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# tini as PID 1 reaps the Python-backend stubs that a dying tritonserver leaves to it, and forwards signals.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 embed \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin embed

# The export's environment: serving's lock and the export's on top (torch, transformers, sentence-transformers, onnx,
# the packaged default model, grpcio-tools for the stubs). Also the stage to export other models with
# (--target export): their configs name /opt/venv as the Python steps' environment, as the image below has one there.
FROM base AS export
WORKDIR /app
COPY requirements.lock requirements-export.lock ./
# torch first, on its own and from PyTorch's CPU index: pinned bare from PyPI it is the CUDA build, gigabytes of GPU
# libraries this image never uses. The export lock's torch==2.13.0 then matches the installed 2.13.0+cpu.
RUN python -m venv /opt/venv \
 && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -r requirements.lock -r requirements-export.lock
COPY proto proto
RUN python -m proto.generate
COPY repository_contract repository_contract
COPY export export
# The CPU encoder's instances and threads are fixed at export: size them to the Triton pod's CPUs (values-cpu.yaml).
ARG ENCODER_INSTANCES=4
ARG INTRA_OP_THREADS=4
# Further export options, e.g. "--precision int8".
ARG EXPORT_ARGS=""
RUN python -m export --output-dir /models \
      --encoder-instances "$ENCODER_INSTANCES" --alone-intra-op-threads "$INTRA_OP_THREADS" $EXPORT_ARGS
# Serving's environment: requirements.lock alone, at the same /opt/venv. Neither the export's libraries nor the packaged
# weights (exported to /models) nor anything of the tests' (requirements-test.lock) is in the image.
FROM base AS build
WORKDIR /app
COPY requirements.lock /tmp/requirements.lock
RUN python -m venv /opt/venv \
 && pip install -r /tmp/requirements.lock \
 && rm /tmp/requirements.lock
# The gRPC stubs, generated in the export stage, which has grpcio-tools.
COPY --from=export /app/proto proto
COPY repository_contract repository_contract
COPY gateway gateway
COPY deploy/images/run_triton.py deploy/images/run_triton.py
# The root filesystem is read-only in the cluster: compiled now, not at every start.
RUN python -m compileall -q /app

FROM base
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY --from=build /models /models
# The run directory (Triton's backends copy, logs, PID file) when no volume is mounted there.
RUN install -d -o 10001 -g 10001 /run/embedding
WORKDIR /app
# The gateway listens on the container's network, which it refuses without EMBED_AUTH=1 (or, behind something that
# authenticates callers, EMBED_ALLOW_UNAUTHENTICATED=1).
ENV EMBED_HOST=0.0.0.0 \
    EMBED_MODEL_REPOSITORY=/models \
    EMBED_RUN_DIR=/run/embedding
# gateway HTTP and gRPC; Triton's HTTP, gRPC and metrics
EXPOSE 8080 50051 8000 8001 8002
USER 10001:10001
# Running Triton alone, point it at Triton's own probe: HEALTH_URL=http://127.0.0.1:8000/v2/health/live.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTH_URL', 'http://127.0.0.1:8080/health/live'), timeout=4)"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "gateway"]
