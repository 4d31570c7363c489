# sitefit worker image: `sitefit worker` (runs the queued jobs with torch), and the engine's
# commands (`sitefit train`, `segment`, `models import`).
#
#   docker build -f docker/worker.Dockerfile -t sitefit-worker:cpu .
#   docker build -f docker/worker.Dockerfile -t sitefit-worker:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# torch is installed first, pinned, from TORCH_INDEX: the CPU build by default (PyPI's Linux
# wheel is the CUDA one), the CUDA build from a cuNNN index. The CUDA build needs only the
# NVIDIA driver on the host (and the container toolkit): the CUDA libraries come as wheels.
# TORCH_INDEX empty: pip's default index, plus any wheels in PIP_FIND_LINKS, which is how
# `make images` installs a torch wheel downloaded once on the host (docker/build_images.py).
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/sitefit/bin:$PATH
RUN python3 -m venv /opt/sitefit
# a CA bundle for pip behind a TLS-intercepting proxy (`make images` passes the host's)
ARG PIP_CERT=
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sitefit ./sitefit
COPY server ./server
COPY worker ./worker
COPY model_store ./model_store
COPY docker/healthcheck.py /opt/sitefit/bin/sitefit-healthcheck
# the pinned torch satisfies the project's range: nothing replaces it
RUN chmod 0755 /opt/sitefit/bin/sitefit-healthcheck \
 && pip install . \
 && python -c "import torch, worker.engine; print('torch', torch.__version__)"

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home sitefit \
 && mkdir -p /data \
 && chown sitefit:sitefit /data
COPY --from=builder /opt/sitefit /opt/sitefit
ENV PATH=/opt/sitefit/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SITEFIT_HOME=/data \
    SITEFIT_METRICS_PORT=9100
USER sitefit
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9100
# the metrics server runs on its own thread: it answers while a job runs and while Redis is away
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD sitefit-healthcheck "http://127.0.0.1:${SITEFIT_METRICS_PORT}/metrics"
# SIGTERM finishes the running job first: give it a grace period of SITEFIT_JOB_TIMEOUT_S
CMD ["sh", "-c", "exec sitefit worker --metrics-port \"$SITEFIT_METRICS_PORT\""]
