"""Reachability checks against the configured endpoints (``streams ping``, container health)."""

from __future__ import annotations

import asyncio


from streams.settings import Settings
from streams.io.kafka import admin_client
from streams.io.postgres import connect
from streams.io.sqs import sqs_client


def check_kafka(settings: Settings, timeout: float) -> None:
    admin_client(settings).list_topics(timeout=timeout)


def check_postgres(settings: Settings, timeout: float) -> None:
    async def go() -> None:
        conn = await connect(settings.pg_dsn.get_secret_value(), timeout=timeout)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    asyncio.run(go())


def check_sqs(settings: Settings, timeout: float) -> None:
    async def go() -> None:
        async with sqs_client(settings) as sqs:
            await asyncio.wait_for(sqs.list_queues(), timeout)

    asyncio.run(go())


CHECKS = {"kafka": check_kafka, "postgres": check_postgres, "sqs": check_sqs}
