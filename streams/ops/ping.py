"""Reachability checks against the configured endpoints (``streams ping``, container health)."""

from __future__ import annotations

import asyncio

from streams.io.kafka import preflight
from streams.io.postgres import connect, connection_failure
from streams.io.sqs import queue_url, sqs_client
from streams.settings import Settings


def check_kafka(settings: Settings, timeout: float) -> None:
    preflight(settings, timeout)


def check_postgres(settings: Settings, timeout: float) -> None:
    async def go() -> None:
        try:
            conn = await connect(settings.pg_dsn.get_secret_value(), timeout=timeout)
        except Exception as exc:
            raise connection_failure(exc) from None
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    asyncio.run(go())


def check_sqs(settings: Settings, timeout: float) -> None:
    async def go() -> None:  # what the bridge needs (GetQueueUrl), not ListQueues
        async with sqs_client(settings) as sqs:
            await asyncio.wait_for(queue_url(sqs, settings), timeout)

    asyncio.run(go())


CHECKS = {"kafka": check_kafka, "postgres": check_postgres, "sqs": check_sqs}
