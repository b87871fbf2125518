"""The Faust worker app: each stage a service that owns its Kafka I/O, and an agent fed whole batches.

Faust is the application (services, agents, the worker's signals and logging): each
stage's ``StageService`` owns the stage's consumer (``source.py``) and transactional
producer (``transactions.py``) and puts each polled batch on a channel; the stage's agent
takes whole batches from it and runs the stage's writer (``stages.py``). Faust's own Kafka
transport is not started (``NoKafka``): nothing here reads or writes Kafka per event.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any, cast

import faust
from faust.app.base import BootStrategy
from mode import Service
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from streams import metrics
from streams.io.codec import Codecs
from streams.logs import logging_config
from streams.loop import use_uvloop
from streams.ops.topology import stage_group
from streams.pipeline.dedup import dedup_window
from streams.pipeline.delivery import die
from streams.pipeline.mask import MaskTransform
from streams.pipeline.sink import PostgresSink, SinkStage
from streams.pipeline.source import Batch, KafkaSource
from streams.pipeline.stages import MaskWriter, SinkWriter, StageWriter
from streams.pipeline.startup import Check, start_checks
from streams.pipeline.transactions import TransactionalProducer
from streams.privacy import key_use
from streams.privacy.keys import KeyRing
from streams.privacy.ledger import ErasedUsers, LedgerWatch, erased_users
from streams.privacy.masking import Masker, UserMasker
from streams.settings import Settings

log = logging.getLogger("streams.worker")


class NoKafka(BootStrategy):
    """Faust without its Kafka consumer and producer: the stages own theirs."""

    enable_kafka = False


class StreamsApp(faust.App):
    BootStrategy = NoKafka


class BatchChannel(faust.Channel):
    """A channel of whole batches, whose queue only the stage fills and only its agent empties.

    Faust's own channel queues follow the app's flow control, which *clears* them whenever
    it resumes (after a rebalance of Faust's consumer, or when an agent starts): a batch
    silently dropped there would be skipped. This queue has a flow control of its own.
    """

    @property
    def queue(self) -> ThrowableQueue:
        if self._queue is None:
            self._queue = ThrowableQueue(
                maxsize=self.maxsize or 16,
                flow_control=FlowControlEvent(initially_suspended=False),
                clear_on_resume=False,
            )
        return self._queue


class StageService(Service):
    """One stage's Kafka I/O: its consumer thread and producer, started and stopped with the app."""

    def __init__(self, app: faust.App, source: KafkaSource, writer: StageWriter, channel: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.source = source
        self.writer = writer
        self.channel = channel
        self.agent_ready = asyncio.Event()  # set by the agent once it iterates the channel
        self.writer_ready = asyncio.Event()  # set once the writer's producer and record limits are ready
        self.ledger: LedgerWatch | None = None  # the stage's erasure ledger refresh and confirmations

    async def deliver(self, batch: Batch) -> None:
        await self.agent_ready.wait()  # a batch put before the agent subscribed would be dropped
        await self.writer_ready.wait()
        await self.channel.put(batch)

    async def on_start(self) -> None:
        # The consumer joins its group while the producer registers its transactional id:
        # both are round trips to Kafka. No batch reaches the writer before it is ready.
        self.source.start(asyncio.get_running_loop(), self.deliver, self.writer)
        await self.writer.start()
        self.writer_ready.set()
        if self.ledger is not None:
            self.ledger.start()

    async def on_stop(self) -> None:
        await asyncio.to_thread(self.source.stop)  # revokes: the writer commits what is in flight
        if self.ledger is not None:
            await self.ledger.stop()
        self.writer.close()


def create_app(
    settings: Settings,
    keyring: KeyRing | None,
    codecs: Codecs | None = None,
    ledger: list[tuple[int, str, int]] | None = None,
    sealing: UserMasker | None = None,
) -> tuple[faust.App, list[StageService]]:
    """The app and its stage services; ``ledger`` is the erasure ledger read at start (else read at the first tick)."""
    app = StreamsApp(
        settings.app_id,
        web_enabled=False,
        datadir=str(settings.data_dir),  # Faust creates it; nothing is kept there
        topic_allow_declare=False,
    )
    if codecs is None:
        codecs = Codecs.from_settings(settings)  # with a registry: its schema ids, or one line to register them
    services: list[StageService] = []

    def stage(name: str, topic: str, writer_for, erased: ErasedUsers) -> None:
        # A mask worker names the keys it writes under (`streams keys retire` reads it from the group).
        client_id = key_use.client_id(settings, keyring) if name == "mask" else None
        source = KafkaSource(settings, name, topic, stage_group(settings, name), client_id)
        writer = writer_for(source, TransactionalProducer(settings, name))
        writer.erased = erased
        channel = BatchChannel(app, maxsize=max(settings.stream_buffer_maxsize // settings.stage_batch_size(name), 4))
        service = StageService(app, source, writer, channel)
        service.ledger = LedgerWatch(settings.pg_dsn.get_secret_value(), name, erased, writer)
        app.service(cast(Any, service))  # an instance works too: started and stopped with the app
        services.append(service)

        async def agent(stream: Any) -> None:
            service.agent_ready.set()  # ``stream`` is the agent's subscription to the channel
            try:
                async for batch in stream:
                    await writer.handle(batch)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # a bug: exit, never let Faust restart the agent past it
                die(name, exc)

        agent.__name__ = name
        app.agent(channel, name=name, concurrency=1)(agent)

    stages = settings.stage_list
    if "mask" in stages:
        mask_erased = erased_users(ledger)
        keystore = None
        if sealing is not None:  # per-user key mode: no keyring, nothing here decrypts
            from streams.pipeline.mask import SealingMaskTransform
            from streams.privacy.core import load_copy_binary
            from streams.privacy.user_keys import KeyStore

            transform: MaskTransform = SealingMaskTransform(sealing, codecs, mask_erased)
            keystore = KeyStore(
                settings.pg_dsn.get_secret_value(), sealing.lifetime, settings.pg_command_timeout, load_copy_binary()
            )
            mask_erased.on_change.append(keystore.forget_users)
        else:
            assert keyring is not None, "the mask stage needs keys"
            transform = MaskTransform(Masker(keyring, cache_size=settings.mask_cache_size), codecs, mask_erased)
        dedup = dedup_window(settings) if settings.dedup_window > 0 else None
        stage(
            "mask",
            settings.raw_topic,
            lambda source, producer: MaskWriter(settings, source, producer, transform, dedup, keystore),
            mask_erased,
        )
    if "sink" in stages:
        database = PostgresSink(settings.pg_dsn.get_secret_value(), settings.pg_command_timeout)
        sink_erased = erased_users(ledger)
        stage(
            "sink",
            settings.masked_topic,
            lambda source, producer: SinkWriter(settings, source, producer, SinkStage(codecs, sink_erased), database),
            sink_erased,
        )

    if settings.metrics_port:  # /healthz, /readyz (ready once a stage has partitions), /metrics
        from streams.health import HealthServer, HealthService

        def readiness() -> str | None:
            if getattr(app, "should_stop", False):
                return "stopping"
            if not any(s.source.assigned for s in services):
                return "no partitions assigned"
            return None

        app.service(cast(Any, HealthService(HealthServer(settings.metrics_port, readiness))))

    @app.timer(interval=settings.lag_interval)
    async def report_lag() -> None:
        """Consumer lag per stage and partition as a gauge (each stage group's committed vs end offsets)."""
        from streams.io.kafka import group_lag

        for service in services:
            source = service.source
            try:
                offsets = await asyncio.to_thread(group_lag, settings, [source.topic], source.group)
            except Exception as exc:  # Kafka down: keep the last values; a timer must never stop the app
                log.debug("consumer lag not updated (%s)", type(exc).__name__)
                continue
            for (t, partition), (committed, end) in offsets.items():
                metrics.CONSUMER_LAG.labels(source.stage, t, str(partition)).set(max(end - committed, 0))

    return app, services


GC_YOUNG_THRESHOLD = 20_000  # allocations between collections of the youngest generation (CPython: 700)


def fewer_collections() -> None:
    """Keep the cyclic garbage collector off the per-record path.

    Every consumed record allocates a few container objects (its ``Message``, its input
    and output tuples), so at CPython's default threshold the collector ran about once
    per 100 records, and its full collections walked the whole start-up heap (Faust,
    aiohttp, the codecs): measured, ~0.5 s of CPU per 100,000 records of the byte-copy
    shape (benchmarks.profile_mask). The start-up heap is frozen (never walked again: it
    lives as long as the process), and the youngest generation is collected every
    ``GC_YOUNG_THRESHOLD`` allocations. The hot path makes no reference cycles: its
    objects are freed by reference counting, whatever the threshold. (Collection is off
    while the worker starts, ``start_checks``: imports alone ran it ~150 times.)
    """
    gc.freeze()  # no collection first: the few cycles imports leave cost less than a full walk at start
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    gc.enable()


def run_worker(settings: Settings, checks: dict[str, Check] | None = None) -> None:
    """Start the worker: keys, topics and database checked first (fail closed), then Faust until SIGTERM.

    The worker never changes the schema (its role needs only DML): the database must be
    at the latest migration (`streams migrate`, a separate step) or it refuses to start.
    ``checks``: the start-up checks, already running (``streams.pipeline.startup``).
    """
    if checks is None:
        checks = start_checks(settings)
    # Every result in the order the checks were listed: the first failure is the one reported.
    sealing, keyring = checks["keys"].result()
    metrics.LIVENESS.stuck_after = settings.stuck_after
    if keyring is not None:
        metrics.KEY_IN_USE.labels(keyring.join_version, keyring.encryption_key_id).set(1)
    checks["topics"].result()
    if "schema" in checks:
        checks["schema"].result()
    checks["adopt"].result()
    ledger = checks["ledger"].result()
    codecs = checks["codecs"].result()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    use_uvloop()
    asyncio.set_event_loop(asyncio.new_event_loop())
    app, _ = create_app(settings, keyring, codecs, ledger, sealing)
    fewer_collections()
    faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        logging_config=logging_config(settings.log_level, settings.log_format),
    ).execute_from_commandline()
