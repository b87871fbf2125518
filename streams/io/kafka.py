"""Kafka plumbing, once for everyone: topic setup, an awaitable producer, lag, reading a topic."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.errors import ConfigError, TransientError
from streams.io.kafka_security import explain, librdkafka_security
from streams.retry import Backoff
from streams.settings import Settings

log = logging.getLogger(__name__)


def client_config(settings: Settings, **config: Any) -> dict[str, Any]:
    """librdkafka configuration for any client: bootstrap and security, then STREAMS_KAFKA_EXTRA, then ``config``.

    The security settings (``STREAMS_KAFKA_SECURITY_PROTOCOL``, ``..._SASL_*``, ``..._SSL_*``)
    are mapped by ``kafka_security.librdkafka_security``, the same settings Faust's
    aiokafka gets through ``kafka_security.faust_credentials``. ``STREAMS_KAFKA_EXTRA``
    is a JSON object of librdkafka properties passed through as they are (e.g.
    ``{"message.max.bytes": "2000000"}``).
    """
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        **librdkafka_security(settings),
        **settings.kafka_extra,
        **config,
    }


# Bytes librdkafka keeps per prefetched record beyond its key and value (its op and message
# structs, the record's share of the fetch buffer); ``queued.max.messages.kbytes`` counts
# only keys and values, so small records need a bound by count too.
PREFETCH_RECORD_OVERHEAD = 512
FETCH_QUEUE_BACKOFF_MS = 20


def message_max_bytes(settings: Settings) -> int:
    """The clients' ``message.max.bytes`` (librdkafka's default unless STREAMS_KAFKA_EXTRA sets it)."""
    return int(settings.kafka_extra.get("message.max.bytes", 1_000_000))


def consumer_memory_config(settings: Settings) -> dict[str, Any]:
    """librdkafka's prefetch of one stage consumer, within half of ``STREAMS_STREAM_BUFFER_BYTES``.

    librdkafka's defaults let one consumer queue 100,000 records (~0.5 KiB of its own
    structures each on top of key and value) or 64 MiB of keys and values, and each fetch
    response lands on top of that: 1 MiB per partition, compressed (lz4 JSON grows ~4x when
    decompressed, and the decompressed buffer lives until its last record is consumed).
    Under a backlog, with two stages, that was most of a worker's memory (issue 20:
    measured, 400 MiB at a 200,000 backlog). The share is split: half for keys and values,
    half for the records' overhead (a count); a fetch brings at most an eighth of it (a
    32nd per partition), so decompressed it stays within about half (never under
    ``message.max.bytes``, which librdkafka refuses; a larger record still comes, alone).
    STREAMS_KAFKA_EXTRA overrides each.
    """
    share = settings.stream_buffer_bytes // 2
    return {
        "queued.max.messages.kbytes": max(share // 2 // 1024, 256),
        "queued.min.messages": max(share // 2 // PREFETCH_RECORD_OVERHEAD, settings.batch_size),
        "max.partition.fetch.bytes": max(share // 32, 64 * 1024),
        "fetch.max.bytes": max(share // 8, message_max_bytes(settings)),
        # Once a bound is reached, librdkafka waits this long before it fetches again (1 s by
        # default): a queue this small drains sooner (measured: half the rate at 1 s).
        "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
    }


def producer_memory_config(settings: Settings) -> dict[str, Any]:
    """librdkafka's send queue of one producer, bounded by ``STREAMS_PRODUCER_BUFFER_BYTES``
    (librdkafka's default is 1 GiB); when full, ``produce`` raises ``BufferError`` and every
    caller waits for deliveries. Never under two records of ``message.max.bytes``: one
    record over the bound could never be queued."""
    return {"queue.buffering.max.kbytes": max(settings.producer_buffer_bytes, 2 * message_max_bytes(settings)) // 1024}


def admin_client(settings: Settings, **config: Any) -> AdminClient:
    """An admin client; librdkafka's own connection logs are off (callers report one line)."""
    return AdminClient(client_config(settings, log_level=0, **config))


def preflight(settings: Settings, timeout: float | None = None) -> None:
    """Connect, authenticate and read the cluster metadata, or raise one line naming the setting.

    Bounded by ``timeout`` (default ``STREAMS_KAFKA_TIMEOUT``): a wrong password or an
    untrusted CA ends as soon as librdkafka reports it, an unreachable broker at the deadline.
    Raises ``ConfigError`` for what a setting must fix (credentials, TLS) and
    ``TransientError`` for a broker that does not answer.
    """
    timeout = settings.kafka_timeout if timeout is None else timeout
    errors: list[KafkaError] = []
    admin = admin_client(settings, error_cb=errors.append)
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.list_topics(timeout=min(1.0, max(deadline - time.monotonic(), 0.1)))
            return
        except KafkaException as exc:
            last = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        admin.poll(0)  # serve the error callback
        fatal = [e for e in errors if e.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL)]
        if fatal or time.monotonic() >= deadline:
            message = explain(settings, errors + ([last] if last is not None else []), timeout)
            raise (ConfigError if fatal else TransientError)(message)


# Errors that no retry can fix for that record (its size, its shape): the record is
# dead-lettered instead. Everything else (broker down, timeouts, leader moves) is transient.
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
    }
)

# topic, key, value[, timestamp ms]: a dead letter carries its input's timestamp, so the
# DLQ's retention counts from when the plaintext first reached Kafka (0 or none: now).
Record = tuple[str, bytes | None, bytes | None] | tuple[str, bytes | None, bytes | None, int]


class DeliveryError(TransientError):
    """Some records of a batch were not acknowledged; ``failed`` maps their index to the error."""

    def __init__(self, failed: dict[int, KafkaError], total: int) -> None:
        first = next(iter(failed.values()))
        super().__init__(f"{len(failed)} of {total} records not acknowledged: {first.name()}")
        self.failed = failed

    @property
    def permanent(self) -> list[int]:
        return [i for i, err in self.failed.items() if err.code() in PERMANENT_ERRORS]


def _resolve(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)


def _delivered(
    settle: Callable[[int, KafkaError | None], None], index: int, err: KafkaError | None, _msg: object
) -> None:
    settle(index, err)


class AsyncProducer:
    """Idempotent ``acks=all`` confluent-kafka producer whose batches can be awaited.

    A background thread serves delivery callbacks, so the event loop only awaits one
    future per batch instead of per record.
    """

    def __init__(self, settings: Settings, **config: object) -> None:
        defaults = {
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": 120_000,
            **producer_memory_config(settings),
        }
        self._producer = Producer(
            {
                **defaults,
                **client_config(settings, **config),
                "enable.idempotence": True,  # never weakened by STREAMS_KAFKA_EXTRA: delivery depends on them
                "acks": "all",
            }
        )
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kafka-delivery", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    async def send_all(
        self, records: Sequence[Record], headers: list[tuple[str, str | bytes | None]] | None = None
    ) -> None:
        """Produce every ``(topic, key, value)``; return once all are acknowledged.

        Raises ``DeliveryError`` naming each record that was not, whether librdkafka
        refused it at once (``produce()`` raises for a record over the size limit) or
        the broker did not acknowledge it.
        """
        if not records:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        failed: dict[int, KafkaError] = {}
        pending = len(records)
        lock = threading.Lock()

        def settle(index: int, err: KafkaError | None) -> None:  # delivery thread, or here
            nonlocal pending
            with lock:
                if err is not None:
                    failed[index] = err
                pending -= 1
                last = pending == 0
            if last:
                loop.call_soon_threadsafe(_resolve, done)

        for index, record in enumerate(records):
            topic, key, value = record[0], record[1], record[2]
            timestamp = record[3] if len(record) > 3 else 0
            while True:
                try:
                    self._producer.produce(
                        topic,
                        value=value,
                        key=key,
                        timestamp=timestamp,
                        headers=headers,
                        on_delivery=functools.partial(_delivered, settle, index),
                    )
                    break
                except BufferError:  # local queue full: let the delivery thread drain it
                    await asyncio.sleep(0.01)
                except KafkaException as exc:  # refused before it was queued (e.g. too large)
                    settle(index, exc.args[0])
                    break
        await done
        if failed:
            raise DeliveryError(failed, len(records))

    async def deliver(
        self,
        records: Sequence[Record],
        on_permanent: Callable[[Record, KafkaError], Record],
        what: str,
        log: logging.Logger,
        max_backoff: float = 10.0,
        label: str = "kafka produce",
    ) -> int:
        """Produce until every record is acknowledged; returns how many were replaced.

        Only the records that failed are sent again (no copies of the acknowledged ones).
        A record refused for good (``PERMANENT_ERRORS``) is replaced by what
        ``on_permanent`` returns (its dead letter); a replacement refused for good raises.
        Transient failures back off and retry for as long as they last.
        """
        pending = [(record, False) for record in records]  # (record, is a replacement)
        replaced = 0
        backoff = Backoff(max_backoff, label)
        while pending:
            try:
                await self.send_all([record for record, _ in pending])
                return replaced
            except DeliveryError as exc:
                permanent = set(exc.permanent)
                retry = []
                for i in sorted(exc.failed):
                    record, is_replacement = pending[i]
                    if i not in permanent:
                        retry.append((record, is_replacement))
                    elif is_replacement:
                        raise
                    else:
                        retry.append((on_permanent(record, exc.failed[i]), True))
                        replaced += 1
                pending = retry
                if len(permanent) < len(exc.failed):
                    log.warning("%s: %s, attempt %d; retrying", what, exc, backoff.attempts + 1)
                    await backoff.wait()
        return replaced

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._closed.set()
        self._thread.join(timeout)


def send_records(
    settings: Settings,
    records: Sequence[Record],
    chunk: int = 10_000,
    headers: list[tuple[str, str | bytes | None]] | None = None,
) -> None:
    """Produce ``(topic, key, value)`` records (each with ``headers``) and return once the broker acked all."""

    async def send() -> None:
        producer = AsyncProducer(settings)
        try:
            for i in range(0, len(records), chunk):
                await producer.send_all(records[i : i + chunk], headers)
        finally:
            producer.close()

    asyncio.run(send())


def metadata_consumer(settings: Settings, group: str | None = None, **config: object) -> Consumer:
    """A consumer that never subscribes nor commits: metadata, watermarks, committed offsets, reads.

    Its own throwaway group unless ``group`` names one to read committed offsets of;
    librdkafka's own connection logs are off (callers report one line themselves). Its reads
    run to a partition's end, never tail it: a fetch at the end answers after 10 ms, not
    librdkafka's 500 (a dedup restore of 60 records took 0.50 s, now 0.012 s).
    """
    return Consumer(
        client_config(
            settings,
            **{
                "group.id": group or f"streams-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "log_level": 0,
                "fetch.wait.max.ms": 10,
            },
            **config,
        )
    )


def total_lag(offsets: dict[tuple[str, int], tuple[int, int]]) -> int:
    """Records not yet committed, summed over ``group_lag``'s partitions."""
    return sum(max(end - committed, 0) for committed, end in offsets.values())


def group_lag(
    settings: Settings, topics: Sequence[str], group: str | None = None
) -> dict[tuple[str, int], tuple[int, int]]:
    """``(topic, partition) -> (committed offset, end offset)``: of ``group``, else of each
    topic's stage group (``streams.ops.topology.group_of_topic``)."""
    from streams.ops.topology import group_of_topic

    if group is None:
        result: dict[tuple[str, int], tuple[int, int]] = {}
        by_group: dict[str, list[str]] = {}
        for topic in topics:
            by_group.setdefault(group_of_topic(settings, topic), []).append(topic)
        for name, its_topics in by_group.items():
            result.update(group_lag(settings, its_topics, name))
        return result
    consumer = metadata_consumer(settings, group=group)
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


_SETTLING = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART)


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """Low and high watermarks; a partition whose leader is still being elected (a topic
    just created) is asked again until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() not in _SETTLING or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def read_topic(
    settings: Settings,
    topic: str,
    timeout: float = 30.0,
    committed_only: bool = False,
    start: dict[int, int] | None = None,
) -> list[tuple[bytes | None, bytes | None]]:
    """``(key, value)`` of every record now in ``topic``, partition by partition.

    Joins no group and commits nothing, so it disturbs no worker. ``committed_only``:
    read_committed (what the stages and downstream readers see). ``start``: partition ->
    first offset to read (a partition it does not name is read from its beginning).
    """
    isolation = {"isolation.level": "read_committed"} if committed_only else {}
    consumer = metadata_consumer(settings, None, **{"enable.partition.eof": True}, **isolation)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        remaining, assign = {}, []
        for p in metadata.partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, p), timeout)
            first = (start or {}).get(p, low)
            if high > max(first, low):
                remaining[p] = high
                assign.append(TopicPartition(topic, p, first if first > low else OFFSET_BEGINNING))
        if not remaining:
            return []
        consumer.assign(assign)
        records = []
        while remaining:
            msg = consumer.poll(timeout)
            if msg is None:
                raise TimeoutError(f"reading {topic}: no record within {timeout}s")
            error, partition = msg.error(), msg.partition() or 0
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    remaining.pop(partition, None)
                    continue
                raise TransientError(f"reading {topic}: {error.str()}")
            records.append((msg.key(), msg.value()))
            if (msg.offset() or 0) + 1 >= remaining.get(partition, 0):
                remaining.pop(partition, None)
        return records
    finally:
        consumer.close()
