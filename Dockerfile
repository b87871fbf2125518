# The pipeline's production image: one `streams` CLI, the stage chosen by the command
# (`streams bridge`, `streams worker`, `streams migrate`, `streams seed FILE`, ...).
#
#   docker build --network host -t streams:local .     # --network host: see README "Docker"
#
# Three stages: `core` builds the compiled mask core (core/, Rust) from source; `build`
# makes the wheel of the runtime package and installs it, the core's wheel and the
# hash-pinned runtime lock (requirements.lock, no dev tooling) into the venv /opt/streams;
# the final stage is a clean python:3.11-slim with only that venv. It runs as uid/gid
# 10001 and works with a read-only root file system: the only writable path it needs is
# STREAMS_DATA_DIR (/var/lib/streams: a volume, emptyDir or tmpfs).

# ---- core ---------------------------------------------------------------------------
# The compiled mask core (core/: Rust, PyO3) built from source into a wheel: Debian's
# rustc-web and cargo-web (bookworm-security; bookworm's plain rustc is too old for the
# RustCrypto crates), maturin from PyPI (hash-pinned), crates from crates.io against the
# committed Cargo.lock (`cargo build --locked`). No prebuilt binary of the core.
FROM python:3.11-slim AS core

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# Unpinned on purpose: Debian's security archive keeps only the current build of these.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends rustc-web cargo-web gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src/core
COPY core/requirements-build.lock ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements-build.lock
COPY core/Cargo.toml core/Cargo.lock core/pyproject.toml core/streams_core.pyi ./
COPY core/src ./src
RUN maturin build --release --locked --interpreter python3.11 --out /wheels \
    && rm -rf target /root/.cargo/registry

# ---- build --------------------------------------------------------------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# Dependencies first (their layer survives code changes), hash-checked, no resolution.
# The venv gets no pip or setuptools of its own: the base image's pip installs into it.
COPY requirements.lock ./
RUN python -m venv --without-pip /opt/streams \
    && pip --python /opt/streams/bin/python install --no-cache-dir --require-hashes --no-deps -r requirements.lock

# The runtime package as a wheel (streams/schemas is a symlink to ../schemas: the wheel
# gets real copies), installed without its dependencies (all pinned above).
COPY pyproject.toml ./
COPY schemas ./schemas
COPY streams ./streams
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip --python /opt/streams/bin/python install --no-cache-dir --no-deps /wheels/streams-*.whl \
    && /opt/streams/bin/streams --help >/dev/null

# The core's wheel beside it: the worker finds streams_core (else it says so and uses the reference).
COPY --from=core /wheels /wheels
RUN pip --python /opt/streams/bin/python install --no-cache-dir --no-deps /wheels/streams_core-*.whl \
    && /opt/streams/bin/python -c "import streams_core"

# ---- runtime ------------------------------------------------------------------------
FROM python:3.11-slim

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="streams" \
      org.opencontainers.image.description="Login-event stream processor: SQS -> Kafka -> Faust mask -> PostgreSQL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

# A numeric user (Kubernetes' runAsNonRoot checks the uid) with a passwd entry, so
# libraries that look the user up find one; its home need not exist or be writable.
RUN groupadd --system --gid 10001 streams \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin streams \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/streams /etc/streams/keys

COPY --from=build /opt/streams /opt/streams
COPY data/sample_data.json /app/data/sample_data.json

ENV PATH=/opt/streams/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STREAMS_DATA_DIR=/var/lib/streams \
    STREAMS_KEYS_FILE=/etc/streams/keys/keys.json \
    STREAMS_LOG_DIR=/var/lib/streams/logs \
    STREAMS_METRICS_PORT=8080

WORKDIR /app
USER 10001:10001
EXPOSE 8080

# Liveness only: an HTTP GET of /healthz on STREAMS_METRICS_PORT (0 = endpoint off, nothing
# to check). It never imports the app nor connects to Kafka or PostgreSQL.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u;p=os.environ.get('STREAMS_METRICS_PORT','0');sys.exit(p!='0' and u.urlopen('http://127.0.0.1:%s/healthz'%p,timeout=3).status!=200)"]

ENTRYPOINT ["streams"]
CMD ["worker"]
