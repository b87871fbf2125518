"""Faust commits past holes in a partition (issue 9 item 4; streams/pipeline/consumer.py).

Compaction of the masked topic leaves holes: keys k0, kX, kY, kX, kY, kZ at offsets 0-5,
then kW at 6, compact to offsets {0, 3, 4, 5, 6} - a two-offset hole right after the first
record. Stock faust-streaming 0.15.3 never commits past offset 1 there.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from streams.io.kafka import admin_client, client_config, group_lag, metadata_consumer
from tests.factories import masked_value

pytestmark = pytest.mark.integration


def offsets_in(settings, topic: str) -> list[int]:
    consumer = metadata_consumer(settings)
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        found: list[int] = []
        while not found or found[-1] < high - 1:
            msg = consumer.poll(5)
            if msg is None:
                break
            if msg.error() is None:
                found.append(msg.offset())
        return found
    finally:
        consumer.close()


def test_sink_commits_to_the_end_of_a_compacted_partition_with_a_hole_after_offset_0(pipeline):
    s = pipeline.settings
    compact_fast = {
        "cleanup.policy": "compact",
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.001",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": "100",
        "max.compaction.lag.ms": "60000",  # bounded, as the start-up check requires (issue 19 item 5)
    }
    admin = admin_client(s)
    topic = NewTopic(s.masked_topic, num_partitions=s.topic_partitions, replication_factor=1, config=compact_fast)
    for future in admin.create_topics([topic]).values():
        future.result()
    tag = uuid.uuid4().hex[:6]
    keys = [f"{k}-{tag}" for k in ("k0", "kX", "kY", "kX", "kY", "kZ")]
    producer = Producer(client_config(s, **{"enable.idempotence": True}))

    def produce(*names: str) -> None:
        for name in names:  # one at a time, all on partition 0
            producer.produce(s.masked_topic, key=name.encode(), value=masked_value(name), partition=0)
            assert producer.flush(30) == 0

    produce(*keys)
    roll = f"kW-{tag}"

    def compacted() -> bool:
        produce(roll)  # a record in a new segment (segment.ms=100): the old one can be cleaned
        return offsets_in(s, s.masked_topic)[:4] == [0, 3, 4, 5]

    pipeline.wait_for(compacted, 120, "the log cleaner to leave offsets {0, 3, 4, 5, ...}")
    end = group_lag(s, [s.masked_topic], group=s.app_id)[(s.masked_topic, 0)][1]

    pipeline.start("worker", STREAMS_STAGES="sink")
    pipeline.wait_for(lambda: pipeline.row_count() == 5, 120, "5 rows (k0, kX, kY, kZ, kW)")

    def committed_to_end():
        committed, now_end = group_lag(s, [s.masked_topic])[(s.masked_topic, 0)]
        return committed == now_end >= end

    pipeline.wait_for(committed_to_end, 60, "the sink group's commit at the partition end")
