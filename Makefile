# Two commands for a newcomer: `make run` and `make test`. Everything else is detail.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STREAMS = $(VENV)/bin/streams
SAMPLE ?= $(firstword $(wildcard ../shared/data/sample_data.json) data/sample_data.json)
PYTEST_ARGS ?=
# `make run` serves the bridge's metrics on METRICS_PORT and the worker's on the next port.
METRICS_PORT ?= 9400

.PHONY: install run test unit lint lock stack-up stack-down stack-status bench chaos clean image containers-test
.PHONY: tools hadolint k8s-check image-push

# The runtime package (streams) and the development tooling (dev/: local stack, chaos,
# tests, linters), both editable, from the hash-pinned lock.
$(VENV)/.installed: pyproject.toml dev/pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps -e . -e dev
	touch $@

# The compiled mask core (core/: Rust, PyO3; streams/privacy/core.py) built from source by
# maturin (from the lock) with `cargo build --locked`, installed into the venv; rebuilt only
# when its sources change.
CORE_SOURCES = core/Cargo.toml core/Cargo.lock core/pyproject.toml core/streams_core.pyi $(wildcard core/src/*.rs)
$(VENV)/.core: $(VENV)/.installed $(CORE_SOURCES)
	rm -rf $(VENV)/core-wheel
	$(VENV)/bin/maturin build --release --locked --manifest-path core/Cargo.toml --interpreter $(PY) --out $(VENV)/core-wheel
	$(PY) -m pip install -q --no-deps --force-reinstall $(VENV)/core-wheel/streams_core-*.whl
	touch $@

install: $(VENV)/.installed $(VENV)/.core

## Re-pin both locks (runtime only, and runtime + dev) with hashes after editing a pyproject.
lock:
	$(PY) -m pip install -q uv==0.13.9
	$(VENV)/bin/uv pip compile pyproject.toml --python-version 3.11 --generate-hashes --quiet -o requirements.lock --custom-compile-command "make lock"
	$(VENV)/bin/uv pip compile pyproject.toml dev/pyproject.toml --python-version 3.11 --generate-hashes --quiet -o requirements-dev.lock --custom-compile-command "make lock"
	$(VENV)/bin/uv pip compile core/requirements-build.in --python-version 3.11 --generate-hashes --quiet -o core/requirements-build.lock --custom-compile-command "make lock"

## ruff (lint and format check) and mypy on the package.
lint: install
	$(VENV)/bin/ruff check streams dev tests benchmarks
	$(VENV)/bin/ruff format --check streams dev tests benchmarks
	$(VENV)/bin/mypy

# Dev mode on the local stack (local SQS credentials, queues created on first use, a dev key):
# dev/streams_dev/local.env, also what the test sandboxes set. `streams run` migrates first.
DEV_ENV = $(shell grep -v '^\#' dev/streams_dev/local.env)

## Run the pipeline on the local stack over the sample data; DRAIN=1 exits when done.
run: install
	$(STREAMS) stack up
	$(DEV_ENV) STREAMS_METRICS_PORT=$(METRICS_PORT) $(STREAMS) run --seed $(SAMPLE) $(if $(DRAIN),--drain)

## The whole test suite against the real local stack.
test: install
	$(STREAMS) stack up
	STREAMS_REQUIRE_CORE=1 STREAMS_SAMPLE_DATA=$(SAMPLE) $(PY) -m pytest $(PYTEST_ARGS)

## Unit tests only: no services needed.
unit: install
	STREAMS_REQUIRE_CORE=1 $(PY) -m pytest tests/unit $(PYTEST_ARGS)

BROKERS ?=
stack-up: install
	$(STREAMS) stack up $(if $(BROKERS),--brokers $(BROKERS))
stack-down: install
	$(STREAMS) stack down
stack-status: install
	$(STREAMS) stack status

## Throughput and per-record cost figures.
## make bench BENCH_ARGS="--only mask,latency": a subset (parts: mask,sink,bridge,e2e,rss,latency,scaling)
bench: install
	$(STREAMS) stack up
	STREAMS_REQUIRE_CORE=1 $(PY) -m benchmarks.run $(BENCH_ARGS)

## Chaos run on a private three-broker stack: N messages (2% malformed), K kills of worker
## and bridge, L SIGKILLs of a busy partition's leader broker, one PostgreSQL restart;
## prints what was injected and what was found (copies on the topics included).
N ?= 100000
K ?= 5
L ?= 2
chaos: install
	$(PY) -m streams_dev.chaos --messages $(N) --kills $(K) --leader-kills $(L)

## The production image, streams:local (the Dockerfile; --network host for the lab's engine).
image:
	DOCKER_BUILDKIT=$${DOCKER_BUILDKIT:-$$(docker buildx version >/dev/null 2>&1 && echo 1 || echo 0)} \
	  docker build --network host --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) -t streams:local .

## Pinned tools the tests run (promtool and prometheus from Debian's package, actionlint
## built with go install), fetched once into the stack cache: streams_dev/tools.py.
tools: install
	$(PY) -m streams_dev.tools

## The Dockerfile linted by hadolint (.hadolint.yaml: every finding fails).
hadolint: install
	$(VENV)/bin/hadolint Dockerfile

## The Kubernetes manifests validated (Kubernetes and KEDA schemas, the operating rules).
k8s-check: install
	$(PY) -m pytest tests/deploy -q $(PYTEST_ARGS)

## Build the image and push it as $(IMAGE_REGISTRY)/streams:$(IMAGE_TAG) (CI: on a version
## tag). Logs in first when REGISTRY_USERNAME is set (password from REGISTRY_PASSWORD, on stdin).
IMAGE_REGISTRY ?=
IMAGE_TAG ?= $(shell git describe --tags --always 2>/dev/null || echo dev)
image-push:
	@test -n "$(IMAGE_REGISTRY)" || { echo "image-push: set IMAGE_REGISTRY, e.g. ghcr.io/<owner>" >&2; exit 1; }
	$(MAKE) image
	@if [ -n "$$REGISTRY_USERNAME" ]; then \
	  printf '%s' "$$REGISTRY_PASSWORD" | docker login --username "$$REGISTRY_USERNAME" --password-stdin "$(firstword $(subst /, ,$(IMAGE_REGISTRY)))"; \
	fi
	docker tag streams:local $(IMAGE_REGISTRY)/streams:$(IMAGE_TAG)
	docker push $(IMAGE_REGISTRY)/streams:$(IMAGE_TAG)

## Container tests on a Docker engine: the image, docker-compose end to end (then 3 workers),
## and the integration subset on testcontainers. Uses ../shared/docker-lab's engine when
## there (DOCKER_LAB= to use your own DOCKER_HOST). Fails if the engine cannot start or a
## test is skipped (STREAMS_CONTAINERS_REQUIRED=1).
DOCKER_LAB ?= $(wildcard ../shared/docker-lab)
CONTAINER_TESTS ?= tests/containers tests/integration/test_end_to_end.py tests/integration/test_replay.py \
	tests/integration/test_scaling.py tests/integration/test_health.py
containers-test: install
	@set -e; \
	if [ -n "$(DOCKER_LAB)" ]; then \
	  t0=$$(date +%s); \
	  for try in 1 2 3; do \
	    lab=$$($(DOCKER_LAB)/up) && break; \
	    echo "containers-test: $(DOCKER_LAB)/up failed (try $$try of 3); stopping the lab's engine and trying again" >&2; \
	    $(DOCKER_LAB)/down >&2 || true; lab=""; \
	  done; \
	  lab=$$(printf '%s\n' "$$lab" | tail -n 1); \
	  [ -n "$$lab" ] || { echo "containers-test: the Docker engine did not start after 3 tries: see the lines above ($(DOCKER_LAB)/up)" >&2; exit 1; }; \
	  case "$$lab" in "export DOCKER_HOST="*) eval "$$lab" ;; *) echo "containers-test: unexpected output of $(DOCKER_LAB)/up: $$lab" >&2; exit 1 ;; esac; \
	  echo "containers-test: engine up in $$(( $$(date +%s) - t0 )) s ($$DOCKER_HOST)"; \
	fi; \
	docker info >/dev/null 2>&1 || { echo "containers-test: no Docker engine answers (DOCKER_HOST=$${DOCKER_HOST:-unset}): $$(docker info 2>&1 | tail -n 1)" >&2; exit 1; }; \
	command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || { echo "containers-test: neither docker-compose nor docker compose is installed" >&2; exit 1; }; \
	docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0; \
	STREAMS_TEST_STACK=containers STREAMS_CONTAINERS_REQUIRED=1 STREAMS_SAMPLE_DATA=$(SAMPLE) \
	  $(PY) -m pytest -p no:cacheprovider -rs --durations=15 $(CONTAINER_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
