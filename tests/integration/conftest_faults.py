"""A private stack for tests that stop and restart Kafka or PostgreSQL.

The shared stack on the default ports serves other tests at the same time, so fault
tests get their own Kafka, PostgreSQL and ElasticMQ on free ports (two sessions can run at once), in a temporary
stack dir, started once per session and stopped at the end. Import the fixtures into a
test module: ``from tests.integration.conftest_faults import private_stack, fault_pipeline``.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from pathlib import Path

import asyncpg
import pytest

from streams import stack
from streams.chaos import private_settings
from streams.settings import Settings
from tests.helpers import Pipeline


_started: list[Settings] = []


@pytest.fixture(scope="session")
def private_stack():
    """Kafka, PostgreSQL and ElasticMQ of our own: safe to stop and restart.

    Not under pytest's basetemp: every pytest session resets /tmp/pytest-of-<user> to
    mode 0700, which locks out the system user PostgreSQL runs as under root. Each test
    module that imports this fixture gets its own fixture definition, so the stack is
    kept in ``_started`` and only the first definition starts and stops it.
    """
    if _started:
        yield _started[0]
        return
    stack_dir = Path(tempfile.mkdtemp(prefix="streams-private-stack-"))
    settings = private_settings(stack_dir)
    try:
        stack.up(settings)
        _started.append(settings)
        yield settings
    finally:
        _started.clear()
        stack.down(settings)
        shutil.rmtree(stack_dir, ignore_errors=True)


def restore(settings: Settings) -> None:
    """Bring every service back (a test that failed mid-outage must not break the next)."""
    stack.up(settings)


async def _create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture
def fault_pipeline(private_stack: Settings, tmp_path: Path):
    """The ``pipeline`` fixture of tests/conftest.py, on the private stack."""
    restore(private_stack)
    tag = uuid.uuid4().hex[:10]
    base_dsn = private_stack.pg_dsn.get_secret_value()
    database = f"test_{tag}"
    asyncio.run(_create_database(base_dsn, database))
    env = {
        "STREAMS_KAFKA_BOOTSTRAP": private_stack.kafka_bootstrap,
        "STREAMS_SQS_ENDPOINT": private_stack.sqs_endpoint,
        "STREAMS_PG_DSN": base_dsn.rsplit("/", 1)[0] + "/" + database,
        "STREAMS_RAW_TOPIC": f"t{tag}.raw",
        "STREAMS_MASKED_TOPIC": f"t{tag}.masked",
        "STREAMS_DLQ_TOPIC": f"t{tag}.dlq",
        "STREAMS_SQS_QUEUE": f"q{tag}",
        "STREAMS_APP_ID": f"streams-{tag}",
        "STREAMS_KEYS_FILE": str(tmp_path / "keys.json"),
        "STREAMS_STACK_DIR": str(private_stack.stack_dir),
        "STREAMS_BATCH_WITHIN": "0.2",
        "STREAMS_BRIDGE_VISIBILITY_TIMEOUT": "5",
        "STREAMS_RETRY_MAX_BACKOFF": "2",
        "STREAMS_TOPIC_PARTITIONS": "3",
    }
    p = Pipeline(env, tmp_path)
    yield p
    p.stop_all()
    restore(private_stack)
