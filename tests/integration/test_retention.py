"""Issue 19 item 5 on the real stack: topic time bounds checked at start, dead letters keep their timestamp."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from streams.errors import ConfigError
from streams.io.kafka import admin_client, metadata_consumer, send_records
from streams.ops import topics
from tests.factories import raw_value

pytestmark = pytest.mark.integration


def set_topic_config(settings, topic: str, key: str, value: str) -> None:
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)],
    )
    admin = admin_client(settings)
    for future in admin.incremental_alter_configs([resource], request_timeout=10).values():
        future.result()


def test_an_existing_topic_that_keeps_pii_forever_is_refused_at_start(pipeline):
    s = pipeline.settings
    assert pipeline.run("topics", "apply").returncode == 0
    created = topics.inspect(s, topics.specs(s), 10)
    assert created[s.masked_topic].config == {
        "cleanup.policy": "compact",
        "max.compaction.lag.ms": "86400000",
        "delete.retention.ms": "86400000",
        "min.insync.replicas": "1",
    }
    assert created[s.raw_topic].config["segment.ms"] == str(topics.segment_ms(s.raw_retention_ms))

    set_topic_config(s, s.raw_topic, "retention.ms", "-1")  # an operator's "keep forever"
    result = pipeline.run("bridge", STREAMS_LOG_LEVEL="WARNING", timeout=90)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"topic {s.raw_topic} has retention.ms=-1" in lines[0] and "streams topics apply" in lines[0]
    topics.require(s.model_copy(update={"accept_long_retention": True}))  # the operator's flag, with a warning

    set_topic_config(s, s.dlq_topic, "cleanup.policy", "compact")
    plan = pipeline.run("topics", "plan")
    assert f"alter  {s.raw_topic}: retention.ms -1 -> {s.raw_retention_ms}" in plan.stdout, plan.stdout
    assert f"alter  {s.dlq_topic}: cleanup.policy compact -> delete" in plan.stdout, plan.stdout
    assert pipeline.run("topics", "apply").returncode == 0
    topics.require(s)  # fixed: no refusal

    set_topic_config(s, s.masked_topic, "max.compaction.lag.ms", "9223372036854775807")
    with pytest.raises(ConfigError, match="max.compaction.lag.ms"):
        topics.require(s)


def dlq_timestamps(settings) -> dict[bytes, int]:
    """Kafka timestamp of every dead letter, by key."""
    consumer = metadata_consumer(settings, **{"enable.partition.eof": True, "auto.offset.reset": "earliest"})
    try:
        meta = consumer.list_topics(settings.dlq_topic, timeout=10).topics[settings.dlq_topic]
        consumer.assign([TopicPartition(settings.dlq_topic, p, 0) for p in meta.partitions])
        found, eof = {}, set()
        while len(eof) < len(meta.partitions):
            msg = consumer.poll(10)
            assert msg is not None, "no record within 10 s"
            if msg.error() is not None:
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                eof.add(msg.partition())
                continue
            found[msg.key()] = msg.timestamp()[1]
        return found
    finally:
        consumer.close()


def test_a_dead_letter_keeps_the_raw_records_timestamp(pipeline):
    s = pipeline.settings
    assert pipeline.run("topics", "apply").returncode == 0
    old = int(time.time() * 1000) - 3 * 24 * 3600 * 1000  # three days ago: the retention clock already runs
    send_records(s, [(s.raw_topic, b"m-old", raw_value("m-old", '{"foo": "oops"}'), old)])
    pipeline.start("worker", STREAMS_STAGES="mask")
    pipeline.wait_for(lambda: pipeline.dead_letters(), 120, "the dead letter")
    assert dlq_timestamps(s) == {b"m-old": old}
