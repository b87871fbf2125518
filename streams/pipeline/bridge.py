"""The bridge: SQS ``login-queue`` -> Kafka ``logins.raw``, at least once.

Each poller receives up to ten messages, produces them as raw envelopes, waits for the
broker's acknowledgement and only then deletes them from SQS. A crash in between makes
SQS redeliver after the visibility timeout; the message id keeps the row single.

Pipelined: while a batch is being produced, acknowledged and deleted, its poller already
receives the next one (up to ``STREAMS_BRIDGE_INFLIGHT`` batches per poller), so SQS is
never left waiting on Kafka; ``STREAMS_BRIDGE_POLLERS`` scales the receives.

- While a produce is pending the messages are kept invisible (their visibility is
  extended), so a slow broker never lets another poller take and produce them again.
- A body over ``STREAMS_MAX_BODY_BYTES``, or a record Kafka refuses for its size, becomes
  a ``too_large`` dead letter (payload truncated) and is then deleted: it never blocks.
- A broker that is down is waited out with backoff, the messages not deleted.
- Any other poller error is logged and ends the process (exit 70) for its supervisor
  to restart: a poller never dies silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

from botocore.exceptions import BotoCoreError, ClientError

from streams.errors import Rejected
from streams.faults import fault_point
from streams.io.codec import Codecs
from streams.io.kafka import AsyncProducer, Record
from streams.io.sqs import queue_url, sqs_client
from streams.metrics import (
    LIVENESS,
    RECORDS_OUT,
    SQS_DELETE_FAILURES,
    SQS_MESSAGES,
    SQS_VISIBILITY_EXTENSIONS,
    count_dead_letter,
)
from streams.ops.topics import ensure_topics
from streams.pipeline.dead_letters import Reason, dead_letter
from streams.retry import Backoff, retry_forever, wait_at_start
from streams.settings import Settings

log = logging.getLogger("streams.pipeline.bridge")


STAGE = "bridge"


def envelope(message: dict, keep: Collection[str] = ("SentTimestamp",)) -> dict:
    """The raw envelope of one SQS message: its id, send time, body, and the attributes in ``keep``.

    SQS attributes can identify people (SenderId, custom message attributes), so only
    an allow-list travels on (``STREAMS_BRIDGE_ATTRIBUTES``; custom ones as ``attr.NAME``).
    """
    system = message.get("Attributes", {})
    attributes = {name: value for name, value in system.items() if name in keep}
    for name, attr in message.get("MessageAttributes", {}).items():
        if f"attr.{name}" in keep and "StringValue" in attr:
            attributes[f"attr.{name}"] = attr["StringValue"]
    return {
        "message_id": message["MessageId"],
        "sent_at": int(system.get("SentTimestamp", time.time() * 1000)),
        "body": message["Body"],
        "attributes": attributes,
    }


# SQS's system attributes: only these names can be asked for (an unknown name would make
# every receive fail), so any other name in STREAMS_BRIDGE_ATTRIBUTES is simply never found.
SYSTEM_ATTRIBUTES = frozenset(
    {
        "SenderId",
        "SentTimestamp",
        "ApproximateReceiveCount",
        "ApproximateFirstReceiveTimestamp",
        "SequenceNumber",
        "MessageDeduplicationId",
        "MessageGroupId",
        "AWSTraceHeader",
        "DeadLetterQueueSourceArn",
    }
)


def receive_attributes(keep: Collection[str]) -> dict[str, list[str]]:
    """The attribute arguments of ReceiveMessage: only what ``envelope`` keeps, never ``All``.

    ``SentTimestamp`` always (the envelope's ``sent_at``); custom message attributes
    (``All`` of them) only if an ``attr.NAME`` is kept. Smaller answers cost SQS, the
    network and botocore's parser less, and what is not kept is never fetched.
    """
    system = sorted({"SentTimestamp", *(name for name in keep if name in SYSTEM_ATTRIBUTES)})
    args = {"AttributeNames": system}
    if any(name.startswith("attr.") for name in keep):
        args["MessageAttributeNames"] = ["All"]
    return args


class Bridge:
    def __init__(self, settings: Settings, codecs: Codecs | None = None) -> None:
        self.settings = settings
        self.codecs = codecs if codecs is not None else Codecs.from_settings(settings)
        self.codec = self.codecs.raw
        self.keep_attributes = frozenset(a.strip() for a in settings.bridge_attributes.split(",") if a.strip())
        self.receive_attributes = receive_attributes(self.keep_attributes)
        self.bridged = 0
        self.dead_lettered = 0
        self.visibility_extensions = 0
        self.failed = False
        self.failed_deletes = 0
        self.stopping = asyncio.Event()
        self.producer: AsyncProducer | None = None  # set once up: readiness
        self.queue_url: str | None = None

    async def run(self) -> None:
        settings = self.settings
        await asyncio.to_thread(ensure_topics, settings)
        # Records wait up to STREAMS_BRIDGE_LINGER_MS so that each produce request carries
        # more of them (the pollers' batches in flight keep SQS busy meanwhile).
        producer = self.producer = AsyncProducer(settings, **{"linger.ms": settings.bridge_linger_ms})
        try:
            pool = max(20, settings.bridge_pollers * (settings.bridge_inflight + 2))  # receive, deletes, extensions
            async with sqs_client(settings, max_pool=pool, lean=True) as sqs:
                # A dependency that does not answer is waited out; a missing queue or refused
                # credentials (ConfigError) stop the bridge with one line.
                url = self.queue_url = await retry_forever(
                    lambda: queue_url(sqs, settings),
                    "SQS queue lookup",
                    log,
                    settings.retry_max_backoff,
                    retry_on=(ClientError, BotoCoreError, OSError, asyncio.TimeoutError),
                    label="sqs queue lookup",
                )
                log.info(
                    "bridge: %s -> %s with %d pollers", settings.sqs_queue, settings.raw_topic, settings.bridge_pollers
                )
                pollers = [
                    asyncio.create_task(self._poller(sqs, url, producer)) for _ in range(settings.bridge_pollers)
                ]
                reporter = asyncio.create_task(self._report())
                await self.stopping.wait()
                # Batches in flight finish (produce, ack, delete) unless the broker is down:
                # then they are cancelled undeleted, and SQS redelivers them later.
                _, unfinished = await asyncio.wait(pollers, timeout=settings.bridge_stop_grace)
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*pollers, return_exceptions=True)
                reporter.cancel()
        finally:
            await asyncio.to_thread(producer.close)
        log.info("bridge stopped after %d messages", self.bridged)

    def readiness(self) -> str | None:
        """``None`` once the producer is up and the queue URL resolved (``/readyz``); else why not."""
        if self.stopping.is_set():
            return "stopping"
        if self.producer is None or self.queue_url is None:
            return "starting: producer or SQS queue URL not ready"
        return None

    def stop(self) -> None:
        """Finish the batches in flight (produce, ack, delete), then return from ``run``."""
        self.stopping.set()

    async def _report(self) -> None:
        last = 0
        while True:
            await asyncio.sleep(5)
            if self.bridged != last:
                log.info("bridged %d messages", self.bridged)
                last = self.bridged

    async def _poller(self, sqs, url: str, producer: AsyncProducer) -> None:
        """One poller; an unexpected error stops the bridge with a log line, never silently."""
        try:
            await self._poll(sqs, url, producer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical(
                "bridge poller failed (%s); stopping so the supervisor restarts the bridge", type(exc).__name__
            )
            self.failed = True
            self.stopping.set()

    def _records(self, messages: list[dict]) -> list[Record]:
        """Raw envelopes to produce, and ``too_large`` dead letters for bodies over the bound."""
        s = self.settings
        records: list[Record] = []
        for m in messages:
            body_bytes = len(m["Body"].encode("utf-8", "surrogatepass"))
            if body_bytes > s.max_body_bytes:
                detail = f"body of {body_bytes} bytes is over STREAMS_MAX_BODY_BYTES ({s.max_body_bytes})"
                records.append(
                    self._dead(
                        m["MessageId"], Rejected(Reason.TOO_LARGE, detail), m["Body"].encode("utf-8", "surrogatepass")
                    )
                )
            else:
                records.append(
                    (s.raw_topic, m["MessageId"].encode("utf-8"), self.codec.encode(envelope(m, self.keep_attributes)))
                )
        return records

    def _dead(self, message_id: str, rejected: Rejected, payload: bytes | None) -> Record:
        datum = dead_letter(message_id, STAGE, rejected, payload, truncate=True)
        self.dead_lettered += 1
        count_dead_letter(STAGE, datum["reason"], datum["message_id"])
        return self.settings.dlq_topic, datum["message_id"].encode("utf-8"), self.codecs.dead_letter.encode(datum)

    def _refused(self, record: Record, err) -> Record:
        """A record Kafka refused for good (its size): its dead letter instead."""
        _, key, value = record[:3]
        message_id = (key or b"").decode("utf-8", "replace")
        return self._dead(message_id, Rejected(Reason.TOO_LARGE, f"Kafka refused the record: {err.name()}"), value)

    async def _keep_invisible(self, sqs, url: str, messages: list[dict]) -> None:
        """Extend the messages' visibility while their produce is pending (cancelled when done)."""
        timeout = self.settings.bridge_visibility_timeout
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": timeout}
            for i, m in enumerate(messages)
        ]
        while True:
            await asyncio.sleep(timeout / 3)
            try:
                await sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)
                self.visibility_extensions += 1
                SQS_VISIBILITY_EXTENSIONS.inc()
                log.info("extended visibility of %d messages (produce pending)", len(entries))
            except Exception as exc:
                log.warning("SQS visibility extension failed (%s)", type(exc).__name__)

    async def _poll(self, sqs, queue_url: str, producer: AsyncProducer) -> None:
        """Receive batches and hand each to ``_forward``, at most ``bridge_inflight`` at a time.

        A forward that fails ends the poller with its exception (the process stops). On
        stop, the batches in flight finish; if this poller is cancelled (the stop grace
        ran out), they are cancelled undeleted and SQS redelivers them.
        """
        s = self.settings
        backoff = Backoff(s.retry_max_backoff, "sqs receive")
        inflight: set[asyncio.Task] = set()

        def reap(done: set[asyncio.Task]) -> None:
            for task in done:
                inflight.discard(task)
                task.result()  # a failed forward fails the poller

        try:
            while not self.stopping.is_set():
                if len(inflight) >= s.bridge_inflight:
                    done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    reap(done)
                    continue
                messages = await self._receive(sqs, queue_url, backoff)
                reap({t for t in inflight if t.done()})
                if messages:
                    inflight.add(asyncio.create_task(self._forward(sqs, queue_url, producer, messages)))
            while inflight:
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                reap(done)
        finally:
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _receive(self, sqs, queue_url: str, backoff: Backoff) -> list[dict]:
        """One receive of up to ten messages; a failure is logged and backed off (empty list)."""
        s = self.settings
        try:
            response = await sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=s.bridge_wait_seconds,
                VisibilityTimeout=s.bridge_visibility_timeout,
                **self.receive_attributes,
            )
        except Exception as exc:
            log.warning("SQS receive failed (%s); retrying", type(exc).__name__)
            await backoff.wait()
            return []
        backoff.reset()
        messages = response.get("Messages", [])
        SQS_MESSAGES.labels("received").inc(len(messages))
        return messages

    async def _forward(self, sqs, queue_url: str, producer: AsyncProducer, messages: list[dict]) -> None:
        """Produce a batch, wait for the broker's ack, then delete it from SQS."""
        LIVENESS.started()
        keeper = asyncio.create_task(self._keep_invisible(sqs, queue_url, messages))
        try:
            await producer.deliver(
                self._records(messages),
                self._refused,
                f"produce {len(messages)} messages",
                log,
                self.settings.retry_max_backoff,
            )
        finally:
            keeper.cancel()
        fault_point("bridge_after_produce")
        await self._delete(sqs, queue_url, messages)
        LIVENESS.finished()
        self.bridged += len(messages)
        RECORDS_OUT.labels(STAGE, "bridged").inc(len(messages))

    async def _delete(self, sqs, queue_url: str, messages: list[dict]) -> None:
        """Delete acknowledged messages; failures are retried, and at worst come back as duplicates."""
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        backoff = Backoff(self.settings.retry_max_backoff, "sqs delete")
        for attempt in range(5):
            try:
                response = await sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            except Exception as exc:
                log.warning("SQS delete failed (%s), attempt %d", type(exc).__name__, attempt + 1)
            else:
                failed = {f["Id"] for f in response.get("Failed", [])}
                self.failed_deletes += len(failed)
                SQS_DELETE_FAILURES.inc(len(failed))
                SQS_MESSAGES.labels("deleted").inc(len(entries) - len(failed))
                entries = [e for e in entries if e["Id"] in failed]
                if not entries:
                    return
            await backoff.wait()
        log.warning("%d messages not deleted; SQS will redeliver them (idempotent downstream)", len(entries))


def run_bridge(settings: Settings) -> None:
    """Run the bridge until SIGTERM or Ctrl-C; Kafka is checked first (one line if unreachable)."""
    import signal

    from streams.ops.topics import require_topics

    wait_at_start(lambda: require_topics(settings), "Kafka", log, settings.startup_timeout)
    codecs = Codecs.from_settings(settings)  # with a registry: its schema ids, or one line to register them
    LIVENESS.stuck_after = settings.stuck_after
    bridge_failed = False

    async def run() -> None:
        nonlocal bridge_failed
        bridge = Bridge(settings, codecs)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop)
        health = None
        if settings.metrics_port:  # /healthz, /readyz
            from streams.health import HealthServer

            health = HealthServer(settings.metrics_port, bridge.readiness)
            await health.start()
        try:
            await bridge.run()
            bridge_failed = bridge.failed
        finally:
            if health is not None:
                await health.stop()

    from streams.loop import use_uvloop

    use_uvloop()
    asyncio.run(run())
    if bridge_failed:
        raise SystemExit(70)
