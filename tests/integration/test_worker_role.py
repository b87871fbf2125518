"""The worker never migrates, and runs as a login role that has only streams_worker's DML rights."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid

import asyncpg
import pytest

from streams.io.postgres import connect, latest_version

pytestmark = pytest.mark.integration


def test_an_unmigrated_database_is_refused_in_one_line_and_left_untouched(pipeline):
    assert pipeline.run("keys", "init").returncode == 0  # no dev-key warning in stderr
    result = pipeline.run("worker", STREAMS_LOG_LEVEL="WARNING", timeout=90)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "run `streams migrate`" in lines[0] and f"{latest_version():04d}" in lines[0]
    assert pipeline.query("SELECT to_regclass('user_logins') AS t")[0]["t"] is None


async def _as(dsn: str, sql: str) -> None:
    conn = await connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def test_a_login_role_granted_streams_worker_runs_the_pipeline_and_cannot_change_the_schema(pipeline, sample_path):
    owner_dsn = pipeline.settings.pg_dsn.get_secret_value()
    applied = pipeline.run("migrate")
    assert applied.returncode == 0 and "0004_worker_role.sql" in applied.stdout, applied.stderr
    again = pipeline.run("migrate")  # roles are cluster-wide: a second database or run creates nothing twice
    assert again.returncode == 0 and "none pending" in again.stdout, again.stderr

    login, password = f"w{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(12)
    asyncio.run(_as(owner_dsn, f"CREATE ROLE {login} LOGIN PASSWORD '{password}' IN ROLE streams_worker"))
    worker_dsn = owner_dsn.replace("postgresql://postgres@", f"postgresql://{login}:{password}@")
    try:
        sample = json.loads(sample_path.read_text())
        pipeline.send(sample)
        bridge = pipeline.start("bridge")
        worker = pipeline.start("worker", STREAMS_PG_DSN=worker_dsn)
        pipeline.wait_for(lambda: pipeline.row_count() == len(sample) - 1, 120, "the rows written as the worker role")
        assert pipeline.stop(bridge) == 0
        assert pipeline.stop(worker) == 0
        assert password not in pipeline.logs()

        async def refused(sql: str) -> type[Exception] | None:
            try:
                await _as(worker_dsn, sql)
            except asyncpg.PostgresError as exc:
                return type(exc)
            return None

        assert asyncio.run(refused("CREATE TABLE sneaky (id int)")) is asyncpg.InsufficientPrivilegeError
        assert asyncio.run(refused("ALTER TABLE user_logins ADD COLUMN x int")) is asyncpg.InsufficientPrivilegeError
        assert asyncio.run(refused("DROP TABLE user_logins")) is asyncpg.InsufficientPrivilegeError
        assert (
            asyncio.run(refused("SELECT ciphertext FROM pii_vault")) is asyncpg.InsufficientPrivilegeError
        )  # reveal's only
        assert asyncio.run(refused("SELECT field, token FROM pii_vault")) is None  # the upsert's conflict check
        assert asyncio.run(refused("SELECT * FROM pii_reveal_audit")) is asyncpg.InsufficientPrivilegeError
        assert asyncio.run(refused("CREATE TEMP TABLE staged (id int)")) is None  # TEMP: a staged batch may use it
    finally:
        asyncio.run(_as(owner_dsn, f"DROP ROLE IF EXISTS {login}"))
