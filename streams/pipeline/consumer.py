"""Faust's Kafka transport, corrected where it loses work or gives up.

1. A consumer that commits past holes in a partition (compacted topics, replays).
2. Producer and consumer start-up that waits out a broker that is down at that moment
   (a restart, a failover) with backoff, instead of crashing the worker.

On 1:

faust-streaming 0.15.3 never commits past a hole right after the first record it reads:
its drain loop only records a gap when the previous read offset is truthy, so the hole
after offset 0 is never recorded, and ``_new_offset``'s head-gap check then refuses to
move past it (``min(acked) - committed > 1``). On the compacted masked topic (offsets
{0, 3, 4, ...}) the sink's lag never reaches zero and a crash reprocesses everything.

Our agents ack every event of a partition in offset order, one batch after another
(``delivery.batch_agent``, concurrency 1), so an offset between the committed position
and the lowest acked one was never delivered: it is a hole, never unfinished work. This
consumer fills such head holes before Faust computes the offset to commit.

Pinned to the exact Faust code it corrects: tests/unit/test_faust_pins.py fails when
faust-streaming's ``_new_offset`` or the drain loop's gap check change upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka.errors import KafkaConnectionError
from faust.transport.drivers import aiokafka as faust_aiokafka

from streams.retry import Backoff

log = logging.getLogger("streams.worker")

FAUST_VERSION = "0.15.3"


class HoleTolerantConsumer(faust_aiokafka.Consumer):
    def _new_offset(self, tp: Any) -> int | None:
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked and committed is not None:
            lowest = min(acked)
            if lowest > committed:
                # committed is the next offset to read; everything below the lowest
                # acked offset was never delivered (see the module docstring).
                acked.extend(range(committed, lowest))
        return super()._new_offset(tp)


async def _start_until_connected(start: Callable[[], Awaitable[None]], what: str) -> None:
    """``start()`` until the broker answers: a broker down is transient, not a crash."""
    backoff = Backoff(10.0, f"kafka {what} start")
    while True:
        try:
            return await start()
        except KafkaConnectionError as exc:
            log.warning("Kafka %s cannot start (%s), attempt %d; retrying", what, type(exc).__name__, backoff.attempts + 1)
            await backoff.wait()


class PatientProducer(faust_aiokafka.Producer):
    async def on_start(self) -> None:
        await _start_until_connected(super().on_start, "producer")


class PatientConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def on_start(self) -> None:
        await _start_until_connected(super().on_start, "consumer")


class PatientHoleTolerantConsumer(HoleTolerantConsumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return PatientConsumerThread(self, loop=self.loop, beacon=self.beacon)


class StreamsTransport(faust_aiokafka.Transport):
    Consumer = PatientHoleTolerantConsumer
    Producer = PatientProducer


class StreamsApp(faust.App):
    """``faust.App`` whose consumer tolerates holes (see the module docstring)."""

    def _new_transport(self) -> Any:
        return StreamsTransport(self.conf.broker_consumer, self)
