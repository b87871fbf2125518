"""Read a whole topic from its start to its current end, without joining any group.

For summaries, inspections and tests: it commits nothing and disturbs no worker.
"""

from __future__ import annotations

import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[bytes | None, bytes]]:
    """``(key, value)`` of every record now in ``topic``, partition by partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"streams-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        ends = {}
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                ends[p] = high
        if not ends:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        records = []
        remaining = dict(ends)
        while remaining:
            msg = consumer.poll(timeout)
            if msg is None:
                raise TimeoutError(f"reading {topic}: no record within {timeout}s")
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    remaining.pop(msg.partition(), None)
                    continue
                raise RuntimeError(f"reading {topic}: {msg.error().str()}")
            records.append((msg.key(), msg.value()))
            if msg.offset() + 1 >= remaining.get(msg.partition(), 0):
                remaining.pop(msg.partition(), None)
        return records
    finally:
        consumer.close()
