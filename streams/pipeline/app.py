"""The Faust worker app: wires the mask and sink stages to their topics, nothing more.

The stages' logic lives in ``mask.py`` and ``sink.py`` (pure functions plus a small writer);
the delivery rules (batch, write durably, then ack) in ``delivery.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import faust
from mode import Service

from streams import metrics
from streams.faults import fault_hang, fault_point
from streams.io.codec import Codecs
from streams.io.kafka import AsyncProducer, Record
from streams.io.kafka_security import faust_credentials
from streams.logs import logging_config
from streams.loop import fewer_malloc_arenas, use_uvloop
from streams.pipeline.consumer import QuietMonitor, RawSchema, StreamsApp
from streams.pipeline.dead_letters import refused_by_kafka
from streams.pipeline.delivery import Events, batch_agent, source_timestamp, where
from streams.pipeline.mask import MaskTransform
from streams.pipeline.sink import PostgresSink, SinkStage
from streams.privacy import key_use
from streams.privacy.keys import KeyRing
from streams.privacy.masking import Masker
from streams.retry import retry_forever, wait_at_start
from streams.settings import Settings

log = logging.getLogger("streams.worker")


class Outputs(Service):
    """Long-lived resources of the agents: the Kafka producer and the PostgreSQL sink."""

    def __init__(self, settings: Settings, codecs: Codecs, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.codecs = codecs
        self.producer: AsyncProducer | None = None
        self.sink = PostgresSink(settings.pg_dsn.get_secret_value(), settings.pg_command_timeout)

    async def on_start(self) -> None:
        self.producer = AsyncProducer(self.settings)

    async def on_stop(self) -> None:
        if self.producer is not None:
            self.producer.close()
        await self.sink.close()

    async def produce(self, records: Sequence[Record], stage: str, what: str) -> None:
        """Produce until the broker acked every record (a down broker is waited out).

        A record Kafka refuses for good (its size) is replaced by its dead letter.
        """
        producer = self.producer
        assert producer is not None, "Outputs used before start"
        s = self.settings

        def instead(record: Record, err) -> Record:
            return refused_by_kafka(record, err, stage, self.codecs.dead_letter, s.dlq_topic)

        await producer.deliver(records, instead, what, log, s.retry_max_backoff)


def broker_urls(settings: Settings) -> str:
    """Faust's broker list from STREAMS_KAFKA_BOOTSTRAP (``host:port,host:port``)."""
    return ";".join(f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",") if host.strip())


def create_app(settings: Settings, keyring: KeyRing | None, codecs: Codecs | None = None) -> faust.App:
    app = StreamsApp(
        settings.app_id,
        broker=broker_urls(settings),
        # The same security settings librdkafka gets (streams.io.kafka_security).
        broker_credentials=faust_credentials(settings),
        # Topics are code (`streams topics plan|apply`, checked at start): Faust must not
        # declare any behind that, with its own partitions and replication factor 1.
        topic_allow_declare=False,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=str(settings.data_dir),  # Faust's table dirs: none used, but Faust creates it
        topic_disable_leader=True,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A SIGKILLed member holds its partitions until its session expires; Faust's
        # default of 60 s would stall the group that long after every crash.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        # A mask worker names the keys it writes under (`streams keys retire` reads it from the group).
        broker_client_id=key_use.client_id(settings, keyring),
        # On stop or rebalance Faust waits until every delivered event is acked; an agent
        # retrying against a dead database never acks, so SIGTERM would hang. Don't wait:
        # the agent is cancelled, its unfinished events stay unacked and are redelivered.
        stream_wait_empty=False,
        producer_acks=-1,
        # Per-event cost (issue 12, profiled): Faust's repaired Cython stream iterator
        # takes events already queued without awaiting the channel; the Monitor's
        # per-event bookkeeping is off (nothing reads it).
        cython_optimizations=True,
        Monitor=QuietMonitor,
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
    )
    app.stream_buffer_bytes = settings.stream_buffer_bytes  # type: ignore[attr-defined]  # read by consumer.py
    if codecs is None:
        codecs = Codecs.from_settings(settings)
    outputs = Outputs(settings, codecs)
    app.service(cast(Any, outputs))  # an instance works too: started and stopped with the app
    if settings.metrics_port:  # /healthz, /readyz (ready once partitions are assigned)
        from streams.health import HealthServer, HealthService, worker_readiness

        app.service(cast(Any, HealthService(HealthServer(settings.metrics_port, lambda: worker_readiness(app)))))
    stages = settings.stage_list

    def topic(name: str) -> faust.TopicT:
        schema = RawSchema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        return app.topic(name, schema=schema, partitions=settings.topic_partitions)

    def agent(name: str, source: faust.TopicT, handle, depth: int) -> None:
        app.agent(source, name=name, concurrency=1)(
            batch_agent(name, settings.batch_size, settings.batch_within, handle, depth)
        )
        lag_topics[name] = source.get_topic_name()

    lag_topics: dict[str, str] = {}

    @app.timer(interval=settings.lag_interval)
    async def report_lag() -> None:
        """Consumer lag per stage and partition as a gauge (the group's committed vs end offsets)."""
        import asyncio

        from streams.io.kafka import group_lag

        try:
            offsets = await asyncio.to_thread(group_lag, settings, list(lag_topics.values()))
        except Exception as exc:  # Kafka down: keep the last values; a timer must never stop the app
            log.debug("consumer lag not updated (%s)", type(exc).__name__)
            return
        stage_of = {t: s for s, t in lag_topics.items()}
        for (t, partition), (committed, end) in offsets.items():
            metrics.CONSUMER_LAG.labels(stage_of[t], t, str(partition)).set(max(end - committed, 0))

    if "mask" in stages:
        assert keyring is not None, "the mask stage needs keys"
        transform = MaskTransform(Masker(keyring, cache_size=settings.mask_cache_size), codecs)

        last_delivery: asyncio.Future | None = None

        async def mask(events: Events) -> asyncio.Future:
            """Transform now; produce once the previous batch's produce is acknowledged.

            Returns the produce, which ``batch_agent`` awaits before it acks the batch, so
            this batch's transform overlaps the previous batch's wait for the broker while
            the records still reach Kafka in batch order.
            """
            nonlocal last_delivery
            await codecs.raw.resolve([e.message.value for e in events], settings.retry_max_backoff)  # new ids only
            outputs_ = transform.batch([(e.message.key, e.message.value, where(e)) for e in events])
            records: list[Record] = []
            dead = 0
            for out, event in zip(outputs_, events, strict=True):
                if out.reason:  # the input's timestamp: the DLQ's retention counts from the raw record's
                    records.append((settings.dlq_topic, out.key, out.value, source_timestamp(event)))
                    dead += 1
                    log.info("dead-lettered a record: %s", out.reason, extra={"stage": "mask", "reason": out.reason})
                    metrics.count_dead_letter("mask", out.reason, out.key)
                else:
                    records.append((settings.masked_topic, out.key, out.value))

            async def deliver(previous: asyncio.Future | None) -> None:
                if previous is not None:
                    await previous
                await outputs.produce(records, "mask", f"produce {len(records)} masked records")
                fault_point("mask_after_produce")
                metrics.RECORDS_OUT.labels("mask", "masked").inc(len(outputs_) - dead)
                metrics.RECORDS_OUT.labels("mask", "dead_letter").inc(dead)

            last_delivery = asyncio.ensure_future(deliver(last_delivery))
            return last_delivery

        agent("mask", topic(settings.raw_topic), mask, depth=2)

    if "sink" in stages:
        sink_stage = SinkStage(codecs)

        last_write: asyncio.Future | None = None

        async def sink(events: Events) -> asyncio.Future:
            """Decode and plan now; write once the previous batch's transaction committed.

            Returns the write (commit, then the dead letters of refused rows), which
            ``batch_agent`` awaits before it acks the batch: batches reach the database one
            after another, in order, while the next one is decoded meanwhile.
            """
            nonlocal last_write
            await codecs.masked.resolve([e.message.value for e in events], settings.retry_max_backoff)  # new ids only
            batch = sink_stage.plan([(e.message.key, e.message.value, where(e)) for e in events])

            async def write(previous: asyncio.Future | None) -> None:
                if previous is not None:
                    await previous
                fault_point("sink_before_commit")
                await fault_hang("sink_before_commit")
                refused = (
                    await retry_forever(
                        lambda: outputs.sink.write_batch(batch.rows, batch.deletes),
                        f"write {len(batch.rows)} rows and {len(batch.deletes)} deletes",
                        log,
                        settings.retry_max_backoff,
                        label="database write",
                    )
                    if batch.rows or batch.deletes
                    else []
                )
                committed_at = time.time()
                if batch.deletes:
                    log.info(
                        "deleted the rows of %d tombstones",
                        len(batch.deletes),
                        extra={"stage": "sink", "count": len(batch.deletes)},
                    )
                dead = batch.dead + sink_stage.refused(batch, refused)
                fault_point("sink_after_commit")
                if dead:
                    await outputs.produce(
                        [(settings.dlq_topic, key, value) for key, value, _ in dead],
                        "sink",
                        f"produce {len(dead)} dead letters",
                    )
                for key, _, reason in dead:
                    metrics.count_dead_letter("sink", reason, key)
                metrics.RECORDS_OUT.labels("sink", "row").inc(len(batch.rows) - len(refused))
                metrics.RECORDS_OUT.labels("sink", "deleted").inc(len(batch.deletes))
                metrics.RECORDS_OUT.labels("sink", "dead_letter").inc(len(dead))
                refused_ids = {row["message_id"] for row, _ in refused}
                for row in batch.rows:
                    if row["message_id"] not in refused_ids:
                        metrics.END_TO_END.observe(max(committed_at - row["sent_at"].timestamp(), 0.0))

            last_write = asyncio.ensure_future(write(last_write))
            return last_write

        agent("sink", topic(settings.masked_topic), sink, depth=2)

    return app


def run_worker(settings: Settings) -> None:
    """Start the worker: keys, topics and database checked first (fail closed), then Faust until SIGTERM.

    The worker never changes the schema (its role needs only DML): the database must be
    at the latest migration (`streams migrate`, a separate step) or it refuses to start.
    """
    import asyncio

    from streams.io.kafka import require_topics
    from streams.io.postgres import require_schema
    from streams.privacy.keys import settings_keyring

    keyring = settings_keyring(settings) if "mask" in settings.stage_list else None
    metrics.LIVENESS.stuck_after = settings.stuck_after
    if keyring is not None:
        metrics.KEY_IN_USE.labels(keyring.join_version, keyring.encryption_key_id).set(1)
    wait_at_start(lambda: require_topics(settings), "Kafka", log, settings.startup_timeout)
    if "sink" in settings.stage_list:
        wait_at_start(
            lambda: require_schema(settings.pg_dsn.get_secret_value()), "PostgreSQL", log, settings.startup_timeout
        )
    codecs = Codecs.from_settings(settings)  # with a registry: its schema ids, or one line to register them
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    use_uvloop()
    fewer_malloc_arenas()
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = create_app(settings, keyring, codecs)
    faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        logging_config=logging_config(settings.log_level, settings.log_format),
    ).execute_from_commandline()
