"""The bridge: SQS ``login-queue`` -> Kafka ``logins.raw``, at least once.

Each poller receives up to ten messages, produces them as raw envelopes, waits for the
broker's acknowledgement and only then deletes them from SQS. A crash in between makes
SQS redeliver after the visibility timeout; the message id keeps the row single.
"""

from __future__ import annotations

import asyncio
import logging
import time

from streams.io.codec import Codecs
from streams.io.kafka import AsyncProducer, DeliveryError, ensure_topics
from streams.faults import fault_point
from streams.retry import Backoff, retry_forever
from streams.settings import Settings
from streams.io.sqs import queue_url, sqs_client

log = logging.getLogger("streams.pipeline.bridge")


def envelope(message: dict) -> dict:
    """The raw envelope of one SQS message: its id, send time, body and attributes."""
    attributes = dict(message.get("Attributes", {}))
    for name, attr in message.get("MessageAttributes", {}).items():
        if "StringValue" in attr:
            attributes[f"attr.{name}"] = attr["StringValue"]
    return {
        "message_id": message["MessageId"],
        "sent_at": int(attributes.get("SentTimestamp", time.time() * 1000)),
        "body": message["Body"],
        "attributes": attributes,
    }


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codecs().raw
        self.bridged = 0
        self.stopping = asyncio.Event()
        self.producer: AsyncProducer | None = None  # set once up: readiness
        self.queue_url: str | None = None

    async def run(self) -> None:
        settings = self.settings
        await asyncio.to_thread(ensure_topics, settings)
        producer = self.producer = AsyncProducer(settings.kafka_bootstrap)
        try:
            async with sqs_client(settings) as sqs:
                url = self.queue_url = await retry_forever(lambda: queue_url(sqs, settings), "SQS queue lookup", log, settings.retry_max_backoff)
                log.info("bridge: %s -> %s with %d pollers", settings.sqs_queue, settings.raw_topic, settings.bridge_pollers)
                pollers = [asyncio.create_task(self._poll(sqs, url, producer)) for _ in range(settings.bridge_pollers)]
                reporter = asyncio.create_task(self._report())
                await self.stopping.wait()
                await asyncio.gather(*pollers)
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

    async def _poll(self, sqs, queue_url: str, producer: AsyncProducer) -> None:
        s = self.settings
        backoff = Backoff(s.retry_max_backoff)
        while not self.stopping.is_set():
            try:
                response = await sqs.receive_message(
                    QueueUrl=queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=s.bridge_wait_seconds,
                    VisibilityTimeout=s.bridge_visibility_timeout,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
            except Exception as exc:
                log.warning("SQS receive failed (%s); retrying", type(exc).__name__)
                await backoff.wait()
                continue
            backoff.reset()
            messages = response.get("Messages", [])
            if not messages:
                continue
            records = [
                (s.raw_topic, m["MessageId"].encode("utf-8"), self.codec.encode(envelope(m))) for m in messages
            ]
            try:
                await producer.send_all(records)
            except DeliveryError as exc:
                # Not deleted, so SQS redelivers them after the visibility timeout.
                log.warning("produce failed, leaving %d messages on the queue: %s", len(messages), exc)
                continue
            fault_point("bridge_after_produce")
            await self._delete(sqs, queue_url, messages)
            self.bridged += len(messages)

    async def _delete(self, sqs, queue_url: str, messages: list[dict]) -> None:
        """Delete acknowledged messages; failures are retried, and at worst come back as duplicates."""
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        backoff = Backoff(self.settings.retry_max_backoff)
        for attempt in range(5):
            try:
                response = await sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            except Exception as exc:
                log.warning("SQS delete failed (%s), attempt %d", type(exc).__name__, attempt + 1)
            else:
                failed = {f["Id"] for f in response.get("Failed", [])}
                entries = [e for e in entries if e["Id"] in failed]
                if not entries:
                    return
            await backoff.wait()
        log.warning("%d messages not deleted; SQS will redeliver them (idempotent downstream)", len(entries))


def run_bridge(settings: Settings) -> None:
    """Run the bridge until SIGTERM or Ctrl-C; Kafka is checked first (one line if unreachable)."""
    import signal

    from streams.io.kafka import require_topics

    require_topics(settings)

    async def run() -> None:
        bridge = Bridge(settings)
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
        finally:
            if health is not None:
                await health.stop()

    asyncio.run(run())
