"""The Faust worker: the mask agent (raw -> masked | DLQ) and the sink agent (masked -> PostgreSQL).

Faust acks an event when an agent's loop moves past it, even if the work failed, and
``take()`` acks its batch in a ``finally``. Both agents therefore use ``noack_take`` and
ack each event themselves, only after its output is durable (broker ack or database
commit). Failures of the next stage are retried, never skipped; bad records become dead
letters. Faust's own value decoding is off (``raw``), so a bad record cannot be dropped
by the framework before we see it. Agents run with concurrency 1: Faust commits the
highest contiguous acked offset, and one ordered batch loop per partition set keeps that
simple. Every Faust trap and how it is avoided: docs/delivery.md.
"""

from __future__ import annotations

import functools
import logging
import os

import asyncpg
import faust
from mode import Service

from streams.codec import Codecs, CodecError
from streams.dead_letters import Reason, Rejected, dead_letter
from streams.kafka import AsyncProducer
from streams.keys import KeyRing
from streams.masking import Masker
from streams.faults import fault_point
from streams.retry import retry_forever
from streams.settings import Settings
from streams.sink import PostgresSink
from streams.transform import MaskTransform

log = logging.getLogger("streams.worker")

# SQLSTATE classes 22 (data exception) and 23 (integrity): retrying cannot fix the row.
ROW_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


def _die(agent: str, exc: BaseException) -> None:
    """An agent raised: exit instead of letting Faust restart it.

    Faust's supervisor would start a fresh actor while the failed batch stays delivered
    but unacked in this process: never redelivered here, and the partition's commit
    stuck behind it. Exiting makes the restart (supervisor, or the next `streams worker`)
    receive the batch again. Only the exception type is logged: messages may quote data.
    """
    log.critical("agent %s failed (%s); exiting so its unacked batch is redelivered", agent, type(exc).__name__)
    logging.shutdown()
    os._exit(70)


def _exit_on_error(fun):
    """Agent body wrapper: any exception (not cancellation) ends the process via ``_die``."""

    @functools.wraps(fun)
    async def agent(stream) -> None:
        try:
            await fun(stream)
        except Exception as exc:
            _die(fun.__name__, exc)

    return agent


def _where(event) -> str:
    message = event.message
    return f"{message.topic}/{message.partition}/{message.offset}"


class Outputs(Service):
    """Long-lived resources of the agents: the Kafka producer and the PostgreSQL sink."""

    def __init__(self, settings: Settings, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.producer: AsyncProducer | None = None
        self.sink = PostgresSink(settings.pg_dsn.get_secret_value())

    async def on_start(self) -> None:
        self.producer = AsyncProducer(self.settings.kafka_bootstrap)

    async def on_stop(self) -> None:
        if self.producer is not None:
            self.producer.close()
        await self.sink.close()

    async def produce(self, records: list[tuple[str, bytes, bytes]], what: str) -> None:
        await retry_forever(
            lambda: self.producer.send_all(records), what, log, self.settings.retry_max_backoff
        )


def create_app(settings: Settings, keyring: KeyRing) -> faust.App:
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=str(settings.stack_dir / "faust"),  # Faust's table dirs: none used, keep cwd clean
        topic_disable_leader=True,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A SIGKILLed member holds its partitions until its session expires; Faust's
        # default of 60 s would stall the group that long after every crash.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        # On stop or rebalance Faust waits until every delivered event is acked; an agent
        # retrying against a dead database never acks, so SIGTERM would hang. Don't wait:
        # the agent is cancelled, its unfinished events stay unacked and are redelivered.
        stream_wait_empty=False,
        producer_acks=-1,
    )
    codecs = Codecs()
    outputs = app.service(Outputs(settings))
    stages = settings.stage_list

    if "mask" in stages:
        transform = MaskTransform(Masker(keyring), codecs)
        raw_topic = app.topic(settings.raw_topic, key_type=bytes, value_type=bytes, partitions=settings.topic_partitions)

        @app.agent(raw_topic, name="mask", concurrency=1)
        @_exit_on_error
        async def mask(stream):
            async for events in stream.noack_take(settings.batch_size, within=settings.batch_within):
                records = []
                for event in events:
                    out = transform(event.message.key, event.message.value, _where(event))
                    records.append((settings.dlq_topic if out.reason else settings.masked_topic, out.key, out.value))
                    if out.reason:
                        log.info("dead-lettered %s: %s", out.key.decode("utf-8", "replace"), out.reason)
                await outputs.produce(records, f"produce {len(records)} masked records")
                fault_point("mask_after_produce")
                for event in events:
                    await stream.ack(event)

    if "sink" in stages:
        masked_topic = app.topic(
            settings.masked_topic, key_type=bytes, value_type=bytes, partitions=settings.topic_partitions
        )

        async def write_batch(rows: list[dict]) -> list[tuple[dict, str]]:
            """Write the batch; if PostgreSQL refuses a row's data, write row by row and return the refused."""
            try:
                await outputs.sink.write(rows)
                return []
            except ROW_ERRORS:
                refused = []
                for row in rows:
                    try:
                        await outputs.sink.write([row])
                    except ROW_ERRORS as exc:
                        refused.append((row, exc.sqlstate))
                return refused

        @app.agent(masked_topic, name="sink", concurrency=1)
        @_exit_on_error
        async def sink(stream):
            await retry_forever(outputs.sink.prepare, "database migration", log, settings.retry_max_backoff)
            async for events in stream.noack_take(settings.batch_size, within=settings.batch_within):
                rows, dead = [], []
                raw_by_id = {}

                def reject(message_id: str, rejected: Rejected, payload: bytes) -> None:
                    datum = dead_letter(message_id, "sink", rejected, payload)
                    dead.append((settings.dlq_topic, message_id.encode(), codecs.dead_letter.encode(datum)))

                for event in events:
                    try:
                        row = codecs.masked.decode(event.message.value)
                    except CodecError as exc:
                        key = event.message.key or _where(event).encode()
                        reject(key.decode("utf-8", "replace"), Rejected(Reason.UNDECODABLE_RECORD, str(exc)), event.message.value)
                        continue
                    rows.append(row)
                    raw_by_id[row["message_id"]] = event.message.value
                fault_point("sink_before_commit")
                refused = await retry_forever(
                    lambda: write_batch(rows), f"write {len(rows)} rows", log, settings.retry_max_backoff
                ) if rows else []
                for row, sqlstate in refused:
                    message_id = row["message_id"]
                    reject(message_id, Rejected(Reason.REJECTED_BY_DATABASE, f"SQLSTATE {sqlstate}"), raw_by_id[message_id])
                fault_point("sink_after_commit")
                if dead:
                    await outputs.produce(dead, f"produce {len(dead)} dead letters")
                for event in events:
                    await stream.ack(event)

    return app
