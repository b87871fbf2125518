# Two commands for a newcomer: `make run` and `make test`. Everything else is detail.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STREAMS = $(VENV)/bin/streams
SAMPLE ?= $(firstword $(wildcard ../shared/data/sample_data.json) data/sample_data.json)
PYTEST_ARGS ?=

.PHONY: install run test unit lint lock stack-up stack-down stack-status bench chaos clean

# The runtime package (streams) and the development tooling (dev/: local stack, chaos,
# tests, linters), both editable, from the hash-pinned lock.
$(VENV)/.installed: pyproject.toml dev/pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps -e . -e dev
	touch $@

install: $(VENV)/.installed

## Re-pin both locks (runtime only, and runtime + dev) with hashes after editing a pyproject.
lock:
	$(PY) -m pip install -q uv==0.13.9
	$(VENV)/bin/uv pip compile pyproject.toml --python-version 3.11 --generate-hashes --quiet -o requirements.lock --custom-compile-command "make lock"
	$(VENV)/bin/uv pip compile pyproject.toml dev/pyproject.toml --python-version 3.11 --generate-hashes --quiet -o requirements-dev.lock --custom-compile-command "make lock"

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
	$(DEV_ENV) $(STREAMS) run --seed $(SAMPLE) $(if $(DRAIN),--drain)

## The whole test suite against the real local stack.
test: install
	$(STREAMS) stack up
	STREAMS_SAMPLE_DATA=$(SAMPLE) $(PY) -m pytest $(PYTEST_ARGS)

## Unit tests only: no services needed.
unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

stack-up: install
	$(STREAMS) stack up
stack-down: install
	$(STREAMS) stack down
stack-status: install
	$(STREAMS) stack status

## Throughput and per-record cost figures.
bench: install
	$(STREAMS) stack up
	$(PY) -m benchmarks.run

## Chaos run on a private stack: N messages (2% malformed), K kills of worker and bridge,
## one Kafka and one PostgreSQL restart; prints what was injected and what was found.
N ?= 100000
K ?= 5
chaos: install
	$(PY) -m streams_dev.chaos --messages $(N) --kills $(K)

clean:
	rm -rf $(VENV) .pytest_cache
