"""Kafka plumbing shared by the stages: topic setup, an awaitable producer, lag reading."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.settings import Settings

log = logging.getLogger(__name__)


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Raw and DLQ hold PII, so their retention is bounded; the masked topic is compacted."""
    bounded = {"retention.ms": str(settings.raw_retention_ms)}
    return {
        settings.raw_topic: bounded,
        settings.masked_topic: {"cleanup.policy": "compact"},
        settings.dlq_topic: bounded,
    }


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create the pipeline's topics if missing, with the configured partition count."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=1, config=config)
        for name, config in topic_configs(settings).items()
        if name not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            future.result()
            log.info("created topic %s with %d partitions", name, settings.topic_partitions)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


class DeliveryError(Exception):
    """The broker did not acknowledge every record of a batch."""


class AsyncProducer:
    """Idempotent ``acks=all`` confluent-kafka producer whose batches can be awaited.

    A background thread serves delivery callbacks, so the event loop only awaits one
    future per batch instead of per record.
    """

    def __init__(self, bootstrap: str, **config: object) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "lz4",
                "message.timeout.ms": 120_000,
                **config,
            }
        )
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kafka-delivery", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    async def send_all(self, records: Sequence[tuple[str, bytes, bytes]]) -> None:
        """Produce every ``(topic, key, value)`` and return once all are acknowledged."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pending = len(records)
        errors: list[str] = []

        def on_delivery(err, _msg) -> None:  # runs on the delivery thread
            nonlocal pending
            if err is not None:
                errors.append(err.str())
            pending -= 1
            if pending == 0:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        for topic, key, value in records:
            while True:
                try:
                    self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let the delivery thread drain it
                    await asyncio.sleep(0.01)
        await done
        if errors:
            raise DeliveryError(f"{len(errors)} of {len(records)} records not acknowledged: {errors[0]}")

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._closed.set()
        self._thread.join(timeout)


def group_lag(settings: Settings, topics: Sequence[str], group: str | None = None) -> dict[tuple[str, int], tuple[int, int]]:
    """``(topic, partition) -> (committed offset, end offset)`` for the worker group."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": group or settings.app_id, "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(timeout=10)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in metadata.topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        committed = consumer.committed(partitions, timeout=10) if partitions else []
        result = {}
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            offset = tp.offset if tp.offset >= 0 else low
            result[(tp.topic, tp.partition)] = (offset, high)
        return result
    finally:
        consumer.close()
