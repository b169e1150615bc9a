# The rater-server image: CUDA runtime + cuDNN, onnxruntime-gpu, the core and server distributions only
# (no torch, no trainer). Not built on the development machine (no Docker engine there).
#   docker build -t noiserater/rater-server .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 -v $PWD/models:/models noiserater/rater-server
# onnxruntime-gpu 1.31 needs CUDA 13.x and cuDNN 9.x; change CUDA_IMAGE together with the onnxruntime pin.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /src
COPY core/pyproject.toml core/pyproject.toml
COPY core/src core/src
COPY server/pyproject.toml server/pyproject.toml
COPY server/src server/src
# Same pins as requirements-dev.txt; noiserater-core comes from ./core, never from an index.
RUN pip install "onnxruntime-gpu==1.31.1" "onnx==1.23.2" "grpcio==1.85.3" "grpcio-health-checking==1.85.1" \
      "grpcio-reflection==1.85.1" "protobuf>=7.35,<8" "numpy>=1.26,<3" "scipy>=1.11" "redis>=5.0" \
      "prometheus-client>=0.20" \
 && pip install --no-deps ./core ./server \
 && rm -rf /src

RUN useradd --system --uid 10001 --create-home rater && mkdir -p /models && chown rater /models
USER rater
WORKDIR /home/rater

# Flags have RATER_SERVER_* env fallbacks (see docs/serving.md). Set the port and TLS files through them
# (RATER_SERVER_TLS_CERT, RATER_SERVER_TLS_KEY), not as flags, so that the health check sees them too: it
# reads the same variables and speaks TLS when RATER_SERVER_TLS_CERT is set.
ENV RATER_SERVER_PORT=50051 RATER_SERVER_METRICS_PORT=9464
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["rater-server", "health"]
ENTRYPOINT ["rater-server", "serve", "--repository", "/models"]
