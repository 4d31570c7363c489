# sitefit API image: `sitefit serve` (the HTTP API; jobs queued on Redis for the worker
# image) and `sitefit dicom-listener` (DIMSE). No torch: the API never runs a network.
#
#   docker build -f docker/api.Dockerfile -t sitefit-api .
#
# BASE_IMAGE is any Debian bookworm image: `make images` builds from a local one made with
# mmdebstrap (docs/operations.md, "Images"), where no registry can be reached.
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
WORKDIR /src
# the project's dependencies less torch, read from pyproject.toml so there is one list to keep;
# installed before the sources are copied, so that a code change reuses this layer
COPY pyproject.toml README.md ./
RUN python -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if re.split(r"[^A-Za-z0-9_.-]", d, maxsplit=1)[0].lower() != "torch"))' > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY sitefit ./sitefit
COPY server ./server
COPY worker ./worker
COPY model_store ./model_store
COPY docker/healthcheck.py /opt/sitefit/bin/sitefit-healthcheck
# --no-deps: torch stays out (the CLI imports it only in the engine's commands)
RUN chmod 0755 /opt/sitefit/bin/sitefit-healthcheck \
 && pip install --no-deps . \
 && python -c "import server, sitefit.cli" \
 && if python -c "import torch" 2>/dev/null; then echo "torch found in the API image" >&2; exit 1; fi

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
    SITEFIT_HOME=/data
USER sitefit
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000 11112
# the listener (same image) is checked on its DICOM port instead: see docker-compose.yml
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD sitefit-healthcheck "http://127.0.0.1:${SITEFIT_PORT:-8000}/readyz"
# `sitefit serve --host 0.0.0.0` needs SITEFIT_API_KEYS (Settings refuses an open address
# without keys) and SITEFIT_REDIS_URL (without Redis it would run jobs itself, needing torch)
CMD ["sitefit", "serve", "--host", "0.0.0.0", "--port", "8000"]
