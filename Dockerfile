# syntax=docker/dockerfile:1
#
# jupyter-session-broker image: `docker build -t session-broker .`
#
# Stage 1 builds the project's wheel and installs it, with its runtime
# dependencies only, into a virtual environment at /opt/broker. Stage 2 is a
# fresh slim Python with nothing but that environment, running as an
# unprivileged user. Configuration comes from BROKER_* environment variables
# (`docker run --rm --entrypoint session-broker session-broker config` lists
# them). tests/deploy/test_dockerfile.py repeats these steps without Docker.

ARG PYTHON_VERSION=3.12

# ---- build ------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
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
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/broker \
 && python -m pip --python /opt/broker/bin/python install \
      -c requirements.lock "$(ls /wheels/*.whl)[speed]"

# ---- runtime ----------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 1000 broker \
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
ENTRYPOINT ["session-broker", "serve"]
