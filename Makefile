# Two commands for a newcomer: `make run` and `make test`. Everything else is detail.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STREAMS = $(VENV)/bin/streams
SAMPLE ?= $(firstword $(wildcard ../shared/data/sample_data.json) data/sample_data.json)
PYTEST_ARGS ?=

.PHONY: install run test unit stack-up stack-down stack-status bench chaos clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

## Run the pipeline on the local stack over the sample data; DRAIN=1 exits when done.
run: install
	$(STREAMS) stack up
	$(STREAMS) run --seed $(SAMPLE) $(if $(DRAIN),--drain)

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
	$(PY) -m streams.chaos --messages $(N) --kills $(K)

clean:
	rm -rf $(VENV) .pytest_cache
