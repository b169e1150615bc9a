# The images of NoiseRater, from one file. Not built on the development machine (no Docker engine there);
# checked by `make lint` (hadolint, checkov).
#
#   rater-server, GPU (the default):  docker build -t noiserater/rater-server:0.1.0 .
#   rater-server, CPU only:           docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#                                       -t noiserater/rater-server:0.1.0-cpu .
#   trainer (nrctl, torch; the Kubernetes torchrun Job):
#                                     docker build --target trainer -t noiserater/trainer:0.1.0 .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 -v $PWD/models:/models noiserater/rater-server:0.1.0
#
# BASE_IMAGE is the only difference between the GPU and the CPU server: the CUDA runtime with cuDNN, or plain
# Debian with Python 3.11 (the Python the project is developed and tested on). Both install the same
# onnxruntime-gpu, which runs on its CPU provider where CUDA is missing; a second onnxruntime distribution
# would be a second thing to keep in step with the pins for no gain.
# onnxruntime-gpu 1.31 needs CUDA 13.x and cuDNN 9.x; change the CUDA image together with the onnxruntime pin.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# checkov:skip=CKV_DOCKER_7: the tag is in BASE_IMAGE above (checkov does not expand build arguments)
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The CUDA image has no Python: it gets Ubuntu's python3. A python:* base keeps its own and gets no second one.
# DL3008 (apt versions unpinned): the base image's tag fixes the Ubuntu release; a pinned patch version would
# stop building once the archive moves on.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && groupadd --system --gid 10001 rater \
 && useradd --system --uid 10001 --gid 10001 --create-home rater

# nrctl with torch, for training (the Kubernetes torchrun Job). torch comes from PyPI, whose Linux wheels are
# CUDA builds; for a CPU-only trainer, pass PyTorch's CPU wheel index as TORCH_INDEX_URL.
FROM python AS trainer
ARG TORCH_INDEX_URL=""
WORKDIR /src
COPY core/pyproject.toml core/pyproject.toml
COPY core/src core/src
COPY client/pyproject.toml client/pyproject.toml
COPY client/src client/src
COPY trainer/pyproject.toml trainer/pyproject.toml
COPY trainer/src trainer/src
COPY cli/pyproject.toml cli/pyproject.toml
COPY cli/src cli/src
# Same pins as requirements-dev.txt; the noiserater distributions come from here, never from an index.
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" "torch==2.13.0"; \
    else pip install "torch==2.13.0"; fi \
 && pip install "onnxruntime-gpu==1.31.1" "onnx==1.23.2" "onnxscript>=0.5" "grpcio==1.85.3" \
      "grpcio-health-checking==1.85.1" "protobuf>=7.35,<8" "numpy>=1.26,<3" "scipy>=1.11" "scikit-learn>=1.3" \
      "matplotlib>=3.8" "safetensors>=0.4" "typer>=0.12" "rich>=13" \
 && pip install --no-deps ./core ./client ./trainer ./cli \
 && rm -rf /src
# The user "rater" by number: Kubernetes' runAsNonRoot can only verify a numeric user.
USER 10001
WORKDIR /home/rater
ENTRYPOINT ["nrctl"]

# The rater-server: onnxruntime-gpu, the core and server distributions only (no torch, no trainer). Last, so
# that a plain `docker build .` builds it.
FROM python AS rater-server
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
 && rm -rf /src \
 && mkdir -p /models && chown 10001 /models
USER 10001
WORKDIR /home/rater

# Flags have RATER_SERVER_* env fallbacks (see docs/serving.md). Set the port and TLS files through them
# (RATER_SERVER_TLS_CERT, RATER_SERVER_TLS_KEY), not as flags, so that the health check sees them too: it
# reads the same variables and speaks TLS when RATER_SERVER_TLS_CERT is set.
ENV RATER_SERVER_PORT=50051 RATER_SERVER_METRICS_PORT=9464
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["rater-server", "health"]
ENTRYPOINT ["rater-server", "serve", "--repository", "/models"]
