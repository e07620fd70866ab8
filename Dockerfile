# syntax=docker/dockerfile:1
#
# jupyter-session-broker image, two variants chosen by the VARIANT build arg:
#
#   docker build -t session-broker .                           # lean: hub/binder backends
#   docker build --build-arg VARIANT=local -t session-broker:local .   # + jupyter_server, ipykernel
#
# Stage 1 builds the project's wheel and installs it, with its runtime
# dependencies only, into a virtual environment at /opt/broker. Stage 2 is a
# fresh slim Python with nothing but that environment and tini, running as an
# unprivileged user. Configuration comes from BROKER_* environment variables
# (`docker run --rm --entrypoint session-broker session-broker config` lists
# them).
# tests/deploy/test_dockerfile.py repeats these steps without Docker.
#
# BASE_IMAGE: the release pipeline (.github/workflows/release.yml) resolves the
# tag below to its digest once per run and builds both variants FROM
# python:<version>-slim@sha256:<digest>, recorded in the image's
# org.opencontainers.image.base.* labels. A plain local build uses the tag.

ARG BASE_IMAGE=python:3.12-slim
# lean: the broker for BROKER_BACKEND=jupyterhub/binderhub; local: also the
# [local] extra that BROKER_BACKEND=local runs for each session.
ARG VARIANT=lean

# ---- build ------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# A C compiler for the relay's compiled module (broker.proxy._wire_c, which
# Cython makes from _wire_py.py, see setup.py); only this stage has it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md requirements.lock ./
COPY src ./src
# The wheel holds only the package; the venv gets no pip of its own
# (--without-pip), so the final image carries no build tooling. Its
# dependencies are the tested versions of requirements.lock (constraints).
RUN case "$VARIANT" in \
      lean) extras=speed ;; \
      local) extras=speed,local ;; \
      *) echo "VARIANT must be lean or local, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
 && python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/broker \
 && python -m pip --python /opt/broker/bin/python install \
      -c requirements.lock "$(ls /wheels/*.whl)[$extras]"

# ---- runtime ----------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG VARIANT
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/jupyter-session-broker/jupyter-session-broker
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="jupyter-session-broker" \
      org.opencontainers.image.description="Per-visitor Jupyter sessions brokered in front of JupyterHub, BinderHub or local processes" \
      org.opencontainers.image.licenses="BSD-3-Clause" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.jupyter-session-broker.variant="${VARIANT}"
# tini is PID 1: it forwards SIGTERM to the broker (graceful drain) and reaps
# orphaned processes, such as the kernels of a local session whose server was
# killed, which would otherwise stay zombies under a PID 1 that never waits.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1000 broker \
 && useradd --system --uid 1000 --gid broker --home-dir /home/broker --create-home \
      --shell /usr/sbin/nologin broker
COPY --from=build /opt/broker /opt/broker
ENV PATH=/opt/broker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8765
USER 1000:1000
WORKDIR /home/broker
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BROKER_PORT', '8765') + '/health', timeout=4)"]
# Without -g: SIGTERM reaches the broker alone, which drains and then stops the
# local sessions' servers itself.
ENTRYPOINT ["tini", "--", "session-broker", "serve"]
