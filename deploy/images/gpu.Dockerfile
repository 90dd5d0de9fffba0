# syntax=docker/dockerfile:1.7
# Triton for GPUs: NVIDIA's Triton Inference Server image serving an export for Triton's own GPU backends
# (--target gpu-onnxruntime, or gpu-tensorrt). Triton alone: the gateway runs from the CPU image with EMBED_TRITON_URL.
# Triton runs under the CPU image's supervisor (python -m deploy.images.run_triton), which exits when Triton can no
# longer serve, a dead Python-backend stub included, so that the container restarts.
#
#   docker buildx build -f deploy/images/gpu.Dockerfile -t embedding-service-gpu:0.1.0 .
#   ... --build-arg TARGET=gpu-tensorrt --build-arg EXPORT_ARGS="--precision fp16"
#
# Release 24.10 is Triton 2.51.0, the server the CPU image runs from the nvidia-pytriton wheel and the test suite
# exercises (tritonclient 2.73 speaks the same KServe v2 protocol to it). It is also what makes the Python steps run
# here: they need Python 3.11 (the lock's wheels) while the image's own stub is built for its Python 3.10, and the
# nvidia-pytriton wheel carries the Python-backend stub for 3.11 of exactly this Triton release.

FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# tini as PID 1 reaps the Python-backend stubs that a dying tritonserver leaves to it, and forwards signals.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 embed \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin embed

# The export's environment: serving's lock and the export's on top of it.
FROM base AS export
WORKDIR /app
COPY requirements.lock requirements-export.lock ./
# torch from PyTorch's CPU index: the export runs on the build machine, no GPU needed.
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && /opt/venv/bin/pip install -r requirements.lock -r requirements-export.lock
COPY repository_contract repository_contract
COPY export export
COPY deploy/images/build_tensorrt_plans.py deploy/images/build_tensorrt_plans.py
ARG TARGET=gpu-onnxruntime
ARG EXPORT_ARGS=""
# The configs name /opt/venv as the Python steps' environment (EXECUTION_ENV_PATH): the image below has one there.
RUN /opt/venv/bin/python -m export --target "$TARGET" --output-dir /models $EXPORT_ARGS

FROM base
ENV PATH=/opt/venv/bin:$PATH
# Serving's lock: the Python steps (tokenizer, pooling, compression, layer pooling) import numpy 1.x and tokenizers,
# and run_triton the gateway's supervision of Triton; the encoders run in Triton's onnxruntime or TensorRT backend.
# nvidia-pytriton brings the Python-backend stub for 3.11.
COPY requirements.lock /tmp/requirements.lock
RUN python3.11 -m venv /opt/venv \
 && pip install -r /tmp/requirements.lock \
 && rm /tmp/requirements.lock \
 && cp /opt/venv/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
       /opt/tritonserver/backends/python/triton_python_backend_stub
# The stub links the CUDA runtime it was built with from the wheel's library folder (names made unique, so nothing of
# the image's is shadowed).
ENV LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:/opt/venv/lib/python3.11/site-packages/nvidia_pytriton.libs
# run_triton starts Triton as the gateway does (gateway.triton.process): the wheel's tritonserver with a copy of the
# wheel's backends folder. Both link the wheel's own copy of Triton's core, which NVIDIA's onnxruntime and TensorRT
# backends cannot load into, so here the wheel's server is NVIDIA's, without the wheel's backend and cache folders
# (it then uses its own, under /opt/tritonserver). Every other flag is run_triton's, as in the CPU image: the ports,
# every address, the models to load, the admin key of the model control API.
RUN printf '%s\n' '#!/bin/sh' \
      'for arg; do shift; case "$arg" in --backend-directory=*|--cache-directory=*) ;; *) set -- "$@" "$arg";; esac; done' \
      'exec /opt/tritonserver/bin/tritonserver "$@"' \
      > /opt/venv/lib/python3.11/site-packages/pytriton/tritonserver/bin/tritonserver
WORKDIR /app
COPY repository_contract repository_contract
COPY gateway gateway
COPY deploy/images/run_triton.py deploy/images/run_triton.py
# The root filesystem is read-only in the cluster: compiled now, not at every start.
RUN python -m compileall -q /app
COPY --from=export /models /models
# Run by the chart's init container for gpu-tensorrt, in TensorRT's image of the same release.
COPY deploy/images/build_tensorrt_plans.py /opt/deploy/build_tensorrt_plans.py
# The run directory (the backends' copy, the PID file, the admin key) when no volume is mounted there.
RUN install -d -o 10001 -g 10001 /run/embedding
ENV EMBED_MODEL_REPOSITORY=/models \
    EMBED_RUN_DIR=/run/embedding
EXPOSE 8000 8001 8002
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3.11", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4)"]
# NVIDIA's entrypoint (its banner, the CUDA compatibility checks) under tini, then the supervisor.
ENTRYPOINT ["tini", "--", "/opt/nvidia/nvidia_entrypoint.sh"]
CMD ["python", "-m", "deploy.images.run_triton"]
