# syntax=docker/dockerfile:1
# Two images from one tree:
#   docker build --target operator -t vlm-operator .   (no torch)
#   docker build --target trainer  -t vlm-trainer  .   (CUDA torch, the tests' version)

FROM python:3.11-slim AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip install --no-cache-dir '.[operator]' \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin vlm
USER 10001
ENTRYPOINT ["vlmpretrain", "operator"]

FROM python:3.11-slim AS trainer
# The torch the tests run (scripts/setup.sh pins the same version; tests/test_dockerfile.py
# checks). PyPI's Linux x86_64 wheel is the CUDA build: it brings the CUDA runtime, cuDNN and
# NCCL as nvidia-* wheels; the node's driver comes in through the NVIDIA container toolkit.
ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# the trainer extra adds transformers, webdataset, boto3, ...
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" '.[trainer]' \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin vlm
USER 10001
ENTRYPOINT ["torchrun"]
CMD ["-m", "vlm_trainer", "--config", "/etc/vlm/config.yaml"]
