"""A stage's consumer under a backlog larger than its budget: waited for, not paused (issue 20).

A librdkafka pause drops the prefetched records and fetches again only after the resume:
the sink stage, paused every ~16 batches by its own budget, sat idle ~0.5 s each time.
The consumer now waits for the stage to finish a batch, and pauses only a stage stuck
past ``PAUSE_AFTER``. Real Kafka; the "stage" is a queue the test drains.
"""

from __future__ import annotations

import asyncio

import pytest

from streams.io.kafka import send_records
from streams.ops.topics import ensure_topics
from streams.pipeline.source import PAUSE_AFTER, Batch, KafkaSource

pytestmark = pytest.mark.integration

RECORDS = 6000
VALUE = b"v" * 1000  # 6 MB of backlog against a 1 MiB budget for the stage


class Handler:
    async def on_assign(self, partitions: set[int]) -> None:
        return None

    async def on_revoke(self, partitions: set[int]) -> None:
        return None

    async def on_lost(self, partitions: set[int]) -> None:
        return None


async def drain(source: KafkaSource, hold: float) -> list[tuple[int, int]]:
    """Read the backlog through ``source``; the first batch is held ``hold`` seconds, each
    later one a few milliseconds (a stage behind its input). Returns (partition, offset) read."""
    queue: asyncio.Queue[Batch] = asyncio.Queue()
    seen: list[tuple[int, int]] = []
    peak = 0

    async def deliver(batch: Batch) -> None:
        nonlocal peak
        peak = max(peak, source._in_flight)
        await queue.put(batch)

    source.start(asyncio.get_running_loop(), deliver, Handler())
    try:
        first = True
        loop = asyncio.get_running_loop()
        end = loop.time() + 120
        while len(seen) < RECORDS:
            assert loop.time() < end, f"read {len(seen)} of {RECORDS} records in 120 s"
            try:
                batch = await asyncio.wait_for(queue.get(), 1)
            except TimeoutError:
                continue
            if first and batch.messages:
                first = False
                await asyncio.sleep(hold)  # while held, the source hands over more, up to its budget
            await asyncio.sleep(0.003)
            seen += [(m.partition(), m.offset()) for m in batch.messages]
            source.finished(batch)
    finally:
        await asyncio.to_thread(source.stop)
    biggest = len(VALUE) * source.settings.batch_size * 2  # a batch, with the records' overhead
    assert peak <= source.max_bytes + biggest  # the budget still holds
    return seen


def backlog(pipeline) -> KafkaSource:
    s = pipeline.settings.model_copy(update={"stream_buffer_bytes": 2 * 2**20})
    ensure_topics(s)
    send_records(s, [(s.raw_topic, f"k{i}".encode(), VALUE) for i in range(RECORDS)])
    return KafkaSource(s, "mask", s.raw_topic, f"{s.app_id}-backpressure")


def test_a_stage_behind_a_backlog_is_waited_for_not_paused(pipeline):
    source = backlog(pipeline)
    seen = asyncio.run(drain(source, hold=0))
    assert sorted(seen) == sorted(set(seen)) and len(seen) == RECORDS  # each record once
    assert source.pauses == 0


def test_a_stage_stuck_past_the_wait_is_paused_then_resumed(pipeline):
    source = backlog(pipeline)
    seen = asyncio.run(drain(source, hold=PAUSE_AFTER + 1))
    assert sorted(seen) == sorted(set(seen)) and len(seen) == RECORDS
    assert source.pauses >= 1
