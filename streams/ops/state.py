"""What the pipeline holds right now: queue depth, uncommitted records, rows, dead letters.

Read-only queries for ``streams run``, ``streams status``, the chaos run and the tests;
none joins the worker group or commits anything.
"""

from __future__ import annotations

import collections

import asyncpg

from streams.io.codec import Codecs
from streams.io.kafka import group_lag, read_topic, total_lag
from streams.io.postgres import connect
from streams.io.sqs import queue_depth, queue_url, sqs_client
from streams.ops.topology import worker_inputs
from streams.settings import Settings


async def current_queue_depth(settings: Settings) -> int:
    async with sqs_client(settings) as sqs:
        return await queue_depth(sqs, await queue_url(sqs, settings))


async def row_count(settings: Settings) -> int | None:
    """Rows in ``user_logins``; None when PostgreSQL does not answer, 0 before the first migration."""
    try:
        conn = await connect(settings.pg_dsn.get_secret_value(), timeout=5)
    except Exception:
        return None
    try:
        return await conn.fetchval("SELECT count(*) FROM user_logins")
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def pipeline_lag(settings: Settings) -> int:
    """Records the worker group has not committed yet, across every topic it reads."""
    return total_lag(group_lag(settings, worker_inputs(settings)))


def dead_letters(settings: Settings) -> list[dict]:
    """Every dead letter now in the DLQ topic, decoded."""
    codec = Codecs.from_settings(settings).dead_letter
    return [codec.decode(value) for _, value in read_topic(settings, settings.dlq_topic)]


def dead_letter_counts(settings: Settings) -> collections.Counter:
    return collections.Counter(d["reason"] for d in dead_letters(settings))
