"""librdkafka's queues stay within the worker's memory budget (issue 20: RSS flat with the backlog).

librdkafka's defaults let each consumer prefetch 100,000 records (~0.7 KiB each with its own
structures) and each producer queue 1 GiB: a worker's RSS then grew with the backlog.
"""

from __future__ import annotations

from confluent_kafka import Consumer

from streams.io.kafka import PREFETCH_RECORD_OVERHEAD, consumer_memory_config, producer_memory_config
from streams.pipeline.source import KafkaSource
from streams.pipeline.transactions import TransactionalProducer
from streams.settings import Settings

LIBRDKAFKA_DEFAULT_QUEUED_MESSAGES = 100_000


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def test_a_stage_consumer_prefetches_within_its_share_of_the_budget():
    s = settings()
    source = KafkaSource(s, "mask", "logins.raw", "g")
    try:
        config = source.config
    finally:
        source.consumer.close()
    share = s.stream_buffer_bytes - source.max_bytes  # the half not delivered to the stage
    # queued records: their keys and values, and librdkafka's structures (by count)
    queued = int(config["queued.max.messages.kbytes"]) * 1024 + int(config["queued.min.messages"]) * (
        PREFETCH_RECORD_OVERHEAD
    )
    assert queued <= share
    assert int(config["queued.min.messages"]) < LIBRDKAFKA_DEFAULT_QUEUED_MESSAGES
    # one fetch response on top, compressed (~4x decompressed): within about half the share again
    assert int(config["fetch.max.bytes"]) <= share // 8
    assert int(config["max.partition.fetch.bytes"]) <= int(config["fetch.max.bytes"])
    # a small queue drains in well under librdkafka's 1 s wait before it fetches again
    assert int(config["fetch.queue.backoff.ms"]) <= 100


def test_the_bounds_follow_the_budget():
    small, large = (
        consumer_memory_config(settings(stream_buffer_bytes=8 * 2**20)),
        consumer_memory_config(settings(stream_buffer_bytes=64 * 2**20)),
    )
    for key in ("queued.max.messages.kbytes", "queued.min.messages", "fetch.max.bytes", "max.partition.fetch.bytes"):
        assert small[key] < large[key], key


def test_a_fetch_is_never_smaller_than_the_largest_record():
    """librdkafka refuses a consumer whose fetch.max.bytes is under message.max.bytes."""
    s = settings(stream_buffer_bytes=2**20, kafka_extra={"message.max.bytes": "4000000"})
    config = consumer_memory_config(s)
    assert config["fetch.max.bytes"] >= 4_000_000
    Consumer({"group.id": "g", "bootstrap.servers": "127.0.0.1:1", **s.kafka_extra, **config}).close()


def test_kafka_extra_overrides_a_bound():
    s = settings(kafka_extra={"queued.min.messages": "123"})
    source = KafkaSource(s, "sink", "logins.masked", "g")
    source.consumer.close()
    assert source.config["queued.min.messages"] == "123"


def test_producers_queue_a_bounded_number_of_bytes():
    s = settings(producer_buffer_bytes=8 * 2**20)
    producer = TransactionalProducer(s, "mask", transactional_id="t")
    assert producer.config["queue.buffering.max.kbytes"] == 8 * 1024
    # one record of message.max.bytes always fits (else produce would wait forever)
    big = settings(producer_buffer_bytes=2**20, kafka_extra={"message.max.bytes": "3000000"})
    assert producer_memory_config(big)["queue.buffering.max.kbytes"] * 1024 >= 3_000_000
