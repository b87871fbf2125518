"""The comparators of ``benchmarks.run``: the same work without the project's machinery.

Each runs as its own process (so its CPU and memory are measured like a stage's), with
the stage's ``STREAMS_*`` environment, until SIGTERM:

- ``kafka-mask OUT GROUP``: a bare confluent-kafka loop, consume -> the same ``MaskTransform``
  -> produce (idempotent, acks=all) -> wait for the acks -> commit, batch after batch;
- ``kafka-copy OUT GROUP``: the same loop with the transform replaced by a byte copy;
- ``kafka-mask-txn OUT GROUP``: the same transform in a bare transactional loop (EOS v2):
  outputs and offsets in one transaction, committed every 5,000 records or 0.2 s (the
  mask stage's shipped commit interval), ``read_committed`` input;
- ``pg-copy DSN`` / ``pg-write DSN``: the masked topic's rows (and their vault rows) into a
  fresh database, 500 at a time, by plain asyncpg COPY into both tables / by the sink's own
  ``PostgresSink.write_batch`` (no Kafka, no Faust);
- ``sqs POLLERS``: a bare receive(10) + delete_batch loop per poller, no Kafka.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from confluent_kafka import Consumer, Producer

from streams.io.codec import Codecs
from streams.io.kafka import client_config, read_topic
from streams.settings import load_settings

BATCH = 500
stopping = False


def _on_term(*_: object) -> None:
    global stopping
    stopping = True


def kafka_loop(out_topic: str, group: str, copy: bool) -> None:
    settings = load_settings()
    if copy:

        def transform(batch):
            return [(m.key(), m.value()) for m in batch if not m.error()]
    else:
        from streams.pipeline.mask import MaskTransform
        from streams.privacy.keys import settings_keyring
        from streams.privacy.masking import Masker

        mask = MaskTransform(
            Masker(settings_keyring(settings), cache_size=settings.mask_cache_size), Codecs.from_settings(settings)
        )

        def transform(batch):  # the whole batch in one call, as the stage does (the compiled core when built)
            messages = [
                (m.key(), m.value(), f"{m.topic()}/{m.partition()}/{m.offset()}") for m in batch if not m.error()
            ]
            return [(out.key, out.value) for out in mask.batch(messages)]

    consumer = Consumer(
        client_config(
            settings,
            **{
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    producer = Producer(
        client_config(
            settings,
            **{
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "lz4",
            },
        )
    )
    consumer.subscribe([settings.raw_topic])
    while not stopping:
        batch = consumer.consume(num_messages=BATCH, timeout=0.5)
        if not batch:
            continue
        for key, value in transform(batch):
            while True:
                try:
                    producer.produce(out_topic, value=value, key=key)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush()  # every output acknowledged before the inputs are committed
        consumer.commit(asynchronous=True)
    consumer.close()


def kafka_txn_loop(out_topic: str, group: str) -> None:
    """The bare transactional comparator of the mask stage: same transform, same commit interval."""
    import time
    import uuid

    from confluent_kafka import TopicPartition

    from streams.pipeline.mask import MaskTransform
    from streams.privacy.keys import settings_keyring
    from streams.privacy.masking import Masker

    settings = load_settings()
    mask = MaskTransform(
        Masker(settings_keyring(settings), cache_size=settings.mask_cache_size), Codecs.from_settings(settings)
    )
    consumer = Consumer(
        client_config(
            settings,
            **{
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    producer = Producer(
        client_config(
            settings,
            **{"transactional.id": f"bare-{uuid.uuid4()}", "linger.ms": 5, "compression.type": "lz4"},
        )
    )
    producer.init_transactions(30)
    consumer.subscribe([settings.raw_topic])
    open_since, records, offsets = 0.0, 0, {}
    while not stopping:
        batch = consumer.consume(num_messages=BATCH, timeout=0.1)
        batch = [m for m in batch if not m.error()]
        outputs = mask.batch([(m.key(), m.value(), f"{m.topic()}/{m.partition()}/{m.offset()}") for m in batch])
        for msg, out in zip(batch, outputs, strict=True):
            if not open_since:
                producer.begin_transaction()
                open_since = time.monotonic()
            while True:
                try:
                    producer.produce(out_topic, value=out.value, key=out.key)
                    break
                except BufferError:
                    producer.poll(0.01)
            offsets[msg.partition()] = msg.offset() + 1
            records += 1
        if open_since and (records >= 5000 or time.monotonic() - open_since >= 0.2):
            tps = [TopicPartition(settings.raw_topic, p, o) for p, o in offsets.items()]
            producer.send_offsets_to_transaction(tps, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(60)
            open_since, records, offsets = 0.0, 0, {}
    consumer.close()


def _masked_rows(settings) -> list[dict]:
    codec = Codecs.from_settings(settings).masked
    return [codec.decode(value) for _, value in read_topic(settings, settings.masked_topic) if value]


async def pg_loop(dsn: str, how: str) -> None:
    from streams.io.postgres import connect, migrate
    from streams.pipeline.sink import (
        _COLUMNS,
        _SEALED_COLUMNS,
        _VAULT_COLUMNS,
        PostgresSink,
        sealed_records,
        staged_rows,
    )

    settings = load_settings()
    rows = _masked_rows(settings)
    size = settings.stage_batch_size("sink")  # the sink stage's rows per transaction, like for like
    conn = await connect(dsn)
    await migrate(conn)
    sink = PostgresSink(dsn)
    for i in range(0, len(rows), size):
        if stopping:
            break
        batch = rows[i : i + size]
        if how == "write":
            await sink.write_batch(batch, [])
            continue
        vault, logins = staged_rows(batch)
        sealed = sealed_records(batch)
        async with conn.transaction():
            await conn.copy_records_to_table("pii_vault", records=vault, columns=_VAULT_COLUMNS)
            await conn.copy_records_to_table("user_logins", records=logins, columns=_COLUMNS)
            if sealed:  # per-user key mode: the sealed values instead of vault rows
                await conn.copy_records_to_table("sealed_values", records=sealed, columns=_SEALED_COLUMNS)
    await sink.close()
    await conn.close()
    while not stopping:  # noqa: ASYNC110 - set by a signal handler
        await asyncio.sleep(0.1)


async def sqs_loop(pollers: int) -> None:
    from streams.io.sqs import queue_url, sqs_client

    settings = load_settings()
    async with sqs_client(settings, max_pool=max(20, 2 * pollers)) as sqs:
        url = await queue_url(sqs, settings)

        async def poller() -> None:
            while not stopping:
                response = await sqs.receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=settings.bridge_wait_seconds,
                    VisibilityTimeout=settings.bridge_visibility_timeout,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
                messages = response.get("Messages", [])
                if messages:
                    await sqs.delete_message_batch(
                        QueueUrl=url,
                        Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
                    )

        await asyncio.gather(*(poller() for _ in range(pollers)))


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, _on_term)
    kind, *args = argv
    if kind == "kafka-mask-txn":
        kafka_txn_loop(args[0], args[1])
    elif kind in ("kafka-mask", "kafka-copy"):
        kafka_loop(args[0], args[1], copy=kind == "kafka-copy")
    elif kind in ("pg-copy", "pg-write"):
        asyncio.run(pg_loop(args[0], kind.removeprefix("pg-")))
    elif kind == "sqs":
        asyncio.run(sqs_loop(int(args[0])))
    else:
        raise SystemExit(f"unknown comparator {kind}")


if __name__ == "__main__":
    main(sys.argv[1:])
