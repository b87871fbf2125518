"""One fixture layer for every test that needs services.

By default the tests use the local process stack (``streams stack up``, started here if
needed). With ``STREAMS_TEST_STACK=containers`` and a Docker engine, testcontainers
provides Kafka, PostgreSQL and ElasticMQ instead. Each test gets its own topics, queue,
database, consumer group and keys, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import asyncpg
import pytest

from streams.settings import Settings
from tests.helpers import Pipeline

REPO = Path(__file__).resolve().parent.parent


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
    from streams import stack

    settings = Settings()
    stack.up(settings)
    yield settings


async def _create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture
def pipeline(stack_settings: Settings, tmp_path: Path):
    """Isolated names for one test: topics, queue, database, group and keys."""
    tag = uuid.uuid4().hex[:10]
    base_dsn = stack_settings.pg_dsn.get_secret_value()
    database = f"test_{tag}"
    asyncio.run(_create_database(base_dsn, database))
    dsn = base_dsn.rsplit("/", 1)[0] + "/" + database
    env = {
        "STREAMS_KAFKA_BOOTSTRAP": stack_settings.kafka_bootstrap,
        "STREAMS_SQS_ENDPOINT": stack_settings.sqs_endpoint,
        "STREAMS_PG_DSN": dsn,
        "STREAMS_RAW_TOPIC": f"t{tag}.raw",
        "STREAMS_MASKED_TOPIC": f"t{tag}.masked",
        "STREAMS_DLQ_TOPIC": f"t{tag}.dlq",
        "STREAMS_SQS_QUEUE": f"q{tag}",
        "STREAMS_APP_ID": f"streams-{tag}",
        "STREAMS_KEYS_FILE": str(tmp_path / "keys.json"),
        "STREAMS_STACK_DIR": str(stack_settings.stack_dir),
        "STREAMS_BATCH_WITHIN": "0.2",
        "STREAMS_BRIDGE_VISIBILITY_TIMEOUT": "5",
    }
    p = Pipeline(env, tmp_path)
    yield p
    p.stop_all()
