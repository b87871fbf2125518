"""One fixture layer for every test that needs services.

By default the tests use the local process stack (``streams stack up``, started here if
needed). With ``STREAMS_TEST_STACK=containers`` and a Docker engine, testcontainers
provides Kafka, PostgreSQL and ElasticMQ instead (``make containers-test``). Each test
gets its own topics, queue, database, consumer group and keys, so tests never see each
other's data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streams.settings import Settings
from tests.helpers import isolated_pipeline

REPO = Path(__file__).resolve().parent.parent

# Fault and chaos tests' private stack (safe to stop and restart): fixtures private_stack, fault_pipeline.
pytest_plugins = ["tests.integration.conftest_faults"]


def _sample_path() -> Path:
    env = os.environ.get("STREAMS_SAMPLE_DATA")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "data" / "sample_data.json"
    return shared if shared.exists() else REPO / "data" / "sample_data.json"


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return _sample_path()


def _container_stack():
    """Kafka (apache/kafka, KRaft), PostgreSQL and ElasticMQ in containers: tests/containers/stack.py."""
    from tests.containers.stack import ContainerStack

    stack = ContainerStack()
    return stack.start(), stack.stop


@pytest.fixture(scope="session")
def stack_settings():
    """Base settings pointing at a running stack."""
    if os.environ.get("STREAMS_TEST_STACK") == "containers":
        settings, stop = _container_stack()
        try:
            yield settings
        finally:
            stop()
        return
    from streams_dev import stack

    settings = Settings()
    stack.up(settings)
    yield settings


@pytest.fixture
def pipeline(stack_settings: Settings, tmp_path: Path):
    """Isolated names for one test: topics, queue, database, group and keys."""
    p = isolated_pipeline(stack_settings, tmp_path)
    yield p
    p.stop_all()
    p.remove_sandbox()
