"""A private stack for tests that stop and restart Kafka or PostgreSQL.

The shared stack on the default ports serves other tests at the same time, so fault
tests get their own Kafka, PostgreSQL and ElasticMQ on free ports (two sessions can run at once), in a temporary
stack dir, started once per session (only if a test asks for it) and stopped at the end.
tests/conftest.py loads this module as a plugin, so any test can request the fixtures.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from streams.settings import Settings
from streams_dev import stack
from streams_dev.sandbox import private_settings
from tests.helpers import isolated_pipeline


def _private(brokers: int):
    """A private stack with ``brokers`` Kafka nodes, up for the session, then gone.

    Not under pytest's basetemp: every pytest session resets /tmp/pytest-of-<user> to
    mode 0700, which locks out the system user PostgreSQL runs as under root.
    """
    stack_dir = Path(tempfile.mkdtemp(prefix="streams-private-stack-"))
    settings = private_settings(stack_dir, brokers=brokers)
    try:
        stack.up(settings)
        yield settings
    finally:
        stack.down(settings)
        shutil.rmtree(stack_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def private_stack():
    """Kafka, PostgreSQL and ElasticMQ of our own: safe to stop and restart."""
    yield from _private(brokers=1)


@pytest.fixture(scope="session")
def private_cluster():
    """The same with three Kafka brokers (replication 3, min.insync 2): safe to kill a broker."""
    yield from _private(brokers=3)


def restore(settings: Settings) -> None:
    """Bring every service back (a test that failed mid-outage must not break the next)."""
    stack.up(settings)


@pytest.fixture
def fault_pipeline(private_stack: Settings, tmp_path: Path):
    """The ``pipeline`` fixture of tests/conftest.py, on the private stack."""
    restore(private_stack)
    p = isolated_pipeline(private_stack, tmp_path, STREAMS_RETRY_MAX_BACKOFF="2", STREAMS_TOPIC_PARTITIONS="3")
    yield p
    p.stop_all()
    restore(private_stack)
