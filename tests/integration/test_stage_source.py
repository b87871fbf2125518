"""A stage's own consumer (streams.pipeline.source) against a real broker: how an assignment starts."""

from __future__ import annotations

import asyncio
import json

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, Consumer, TopicPartition

from benchmarks.throughput import produce_raw
from streams.io.kafka import client_config, metadata_consumer
from streams.ops.topics import ensure_topics
from streams.pipeline.source import Batch, KafkaSource

pytestmark = pytest.mark.integration


class WatchedSource(KafkaSource):
    """The stage's consumer, noting what librdkafka has assigned when the stage's ``on_assign`` starts."""

    assigned_at_restore: list[int] | None = None

    def _call(self, what: str, partitions: set[int]) -> None:
        if what == "on_assign":  # on the consumer's own thread, inside its assignment callback
            self.assigned_at_restore = sorted(tp.partition for tp in self.consumer.assignment())
        super()._call(what, partitions)


class SlowState:
    """A stage that reads some state on assignment (the mask stage's dedup window)."""

    def __init__(self, source: KafkaSource, expected: int) -> None:
        self.source = source
        self.restored = asyncio.Event()
        self.expected = expected
        self.all_read = asyncio.Event()
        self.records = 0
        self.records_before_restored = 0

    async def on_assign(self, partitions: set[int]) -> None:
        await asyncio.sleep(0.5)
        self.restored.set()

    async def on_revoke(self, partitions: set[int]) -> None:
        return None

    async def on_lost(self, partitions: set[int]) -> None:
        return None

    async def deliver(self, batch: Batch) -> None:
        if not self.restored.is_set():
            self.records_before_restored += len(batch.messages)
        self.records += len(batch.messages)
        self.source.finished(batch)
        if self.records >= self.expected:
            self.all_read.set()


def test_an_assigned_partition_is_fetched_while_the_stage_reads_its_state(pipeline, sample_path):
    s = pipeline.settings
    ensure_topics(s)
    ids = produce_raw(s, json.loads(sample_path.read_text()))

    async def run() -> tuple[WatchedSource, SlowState]:
        source = WatchedSource(s, "mask", s.raw_topic, f"{s.app_id}-probe")
        stage = SlowState(source, len(ids))
        source.start(asyncio.get_running_loop(), stage.deliver, stage)
        try:
            await asyncio.wait_for(stage.all_read.wait(), 60)
        finally:
            await asyncio.to_thread(source.stop)
        return source, stage

    source, stage = asyncio.run(run())
    # librdkafka had the partitions (it looks up their offsets and fetches) while the stage read its state...
    assert source.assigned_at_restore == list(range(s.topic_partitions))
    # ...and still no record reached the stage before that state was read.
    assert stage.records_before_restored == 0
    assert stage.records == len(ids)


class StartWatchedSource(KafkaSource):
    """The stage's consumer, noting where it told librdkafka each newly assigned partition starts."""

    starts: list[TopicPartition] | None = None

    def _start_offsets(self, consumer, partitions):
        self.starts = super()._start_offsets(consumer, partitions)
        return self.starts


def test_a_partition_with_no_committed_offset_starts_at_the_earliest_given_explicitly(pipeline, sample_path):
    """Left to librdkafka, such a partition's first fetch waits out its 100 ms offset-reset
    backoff; one with a committed offset still starts there (librdkafka reads it itself)."""
    s = pipeline.settings
    ensure_topics(s)
    ids = produce_raw(s, json.loads(sample_path.read_text()) * 4)
    group = f"{s.app_id}-probe"
    reader = metadata_consumer(s)
    end0 = reader.get_watermark_offsets(TopicPartition(s.raw_topic, 0), timeout=10)[1]
    reader.close()
    assert end0 >= 2, "partition 0 needs records on both sides of the committed offset"
    committer = Consumer(client_config(s, **{"group.id": group, "enable.auto.commit": False}))
    committer.commit(offsets=[TopicPartition(s.raw_topic, 0, 1)], asynchronous=False)
    committer.close()

    async def run() -> tuple[StartWatchedSource, list]:
        source = StartWatchedSource(s, "mask", s.raw_topic, group)
        seen: list = []
        done = asyncio.Event()

        async def deliver(batch: Batch) -> None:
            seen.extend((m.partition(), m.offset()) for m in batch.messages)
            source.finished(batch)
            if len(seen) >= len(ids) - 1:
                done.set()

        stage = SlowState(source, len(ids))
        source.start(asyncio.get_running_loop(), deliver, stage)
        try:
            await asyncio.wait_for(done.wait(), 60)
        finally:
            await asyncio.to_thread(source.stop)
        return source, seen

    source, seen = asyncio.run(run())
    starts = {tp.partition: tp.offset for tp in source.starts or []}
    assert starts == {0: OFFSET_INVALID, **{p: OFFSET_BEGINNING for p in range(1, s.topic_partitions)}}
    assert min(offset for partition, offset in seen if partition == 0) == 1  # the committed offset, not the earliest
    assert len(seen) == len(ids) - 1 and len(set(seen)) == len(seen)
