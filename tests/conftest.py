"""One fixture layer for every test that needs services.

By default the tests use the local process stack (``streams stack up``, started here if
needed). With ``STREAMS_TEST_STACK=containers`` and a Docker engine, testcontainers
provides Kafka, PostgreSQL and ElasticMQ instead. Each test gets its own topics, queue,
database, consumer group and keys, so tests never see each other's data.
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
    """Kafka, PostgreSQL and ElasticMQ in containers: needs a Docker engine (not on the build machines)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    kafka = KafkaContainer("apache/kafka:3.9.1").with_kraft()
    postgres = PostgresContainer("postgres:16-alpine", username="postgres", password="postgres", dbname="streams")
    sqs = DockerContainer("softwaremill/elasticmq-native:1.6.16").with_exposed_ports(9324)
    for container in (kafka, postgres, sqs):
        container.start()
    wait_for_logs(sqs, "started", timeout=60)
    settings = Settings(
        kafka_bootstrap=kafka.get_bootstrap_server(),
        pg_dsn=postgres.get_connection_url(driver=None),
        sqs_endpoint=f"http://{sqs.get_container_host_ip()}:{sqs.get_exposed_port(9324)}",
    )
    return settings, lambda: [c.stop() for c in (sqs, postgres, kafka)]


@pytest.fixture(scope="session")
def stack_settings():
    """Base settings pointing at a running stack."""
    if os.environ.get("STREAMS_TEST_STACK") == "containers":
        settings, stop = _container_stack()
        yield settings
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
