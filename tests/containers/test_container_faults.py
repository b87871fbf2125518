"""A PostgreSQL outage on containers: stop and start the database container mid-run; every
valid message still lands exactly once and the sink never commits what it did not write."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr

from streams.settings import Settings
from tests.containers.stack import bind_port, postgres_container
from tests.helpers import isolated_pipeline

pytestmark = [pytest.mark.containers, pytest.mark.integration]


def logins(n: int, tag: str) -> list[dict]:
    return [
        {
            "user_id": f"{tag}-{i}",
            "app_version": "2.3.0",
            "device_type": "ios",
            "ip": f"198.51.100.{i % 250}",
            "locale": "DE",
            "device_id": f"{tag}-dev-{i}",
        }
        for i in range(n)
    ]


def count_rows(p) -> int:
    """Row count, or -1 while the restarted database does not accept connections yet."""
    try:
        return p.row_count()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return -1


@pytest.fixture
def own_postgres():
    """A PostgreSQL container of this test's own, on a fixed host port (a restart keeps the DSN)."""
    container = postgres_container()
    bind_port(container, 5432)
    container.start()
    yield container
    container.stop()


def test_postgres_container_stopped_and_started_mid_run(stack_settings: Settings, own_postgres, tmp_path: Path):
    base = stack_settings.model_copy(update={"pg_dsn": SecretStr(own_postgres.get_connection_url(driver=None))})
    p = isolated_pipeline(base, tmp_path, STREAMS_RETRY_MAX_BACKOFF="2")
    try:
        s = p.settings
        first = p.send(logins(50, "a"))
        p.start("bridge")
        worker = p.start("worker")
        p.wait_for(lambda: p.row_count() == 50, 180, "the first 50 rows")

        database = own_postgres.get_wrapped_container()
        database.stop(timeout=10)
        second = p.send(logins(200, "b"))
        # The mask stage goes on; the sink cannot write, retries and must not commit.
        p.wait_for(lambda: p.lag([s.raw_topic]) == 0 and len(p.topic(s.masked_topic)) >= 250, 180, "masked records")
        p.wait_for(lambda: p.logs().count("failed (") >= 2, 90, "the sink to retry")
        assert p.lag([s.masked_topic]) >= 200, "the sink committed offsets it never wrote"
        database.start()

        ids = set(first) | set(second)
        p.wait_for(lambda: count_rows(p) == len(ids), 240, f"{len(ids)} rows")
        p.wait_for(lambda: p.lag([s.raw_topic, s.masked_topic]) == 0, 120, "every offset committed")
        rows = p.query("SELECT message_id FROM user_logins")
        assert len(rows) == len({r["message_id"] for r in rows}) == len(ids)
        assert {r["message_id"] for r in rows} == ids
        assert worker.poll() is None  # it resumed by itself
        assert not p.dead_letters()
    finally:
        p.stop_all()
