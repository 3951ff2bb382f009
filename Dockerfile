# syntax=docker/dockerfile:1
# Two images from one tree:
#   docker build --target operator -t vlm-operator .   (no torch)
#   docker build --target trainer  -t vlm-trainer  .   (CUDA torch)

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

FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# torch comes from the base image; the trainer extra adds transformers, webdataset, boto3, ...
RUN pip install --no-cache-dir '.[trainer]' \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin vlm
USER 10001
ENTRYPOINT ["torchrun"]
CMD ["-m", "vlm_trainer", "--config", "/etc/vlm/config.yaml"]
