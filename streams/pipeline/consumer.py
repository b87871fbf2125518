"""Faust's Kafka transport, corrected where it loses work, gives up, or is slow.

1. A consumer that commits past holes in a partition (compacted topics, replays).
2. Producer and consumer start-up that waits out a broker that is down at that moment
   (a restart, a failover) with backoff, instead of crashing the worker.
3. A drain loop that hands each fetched message to the conductor without four tasks per
   message, bounded by bytes and count (see ``_drain_messages``), and a quiet Monitor.

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

The drain loop (``Consumer._drain_messages``) awaits, per message,
``wait_first(callback(message), suspend_flow.wait())``: four tasks created (the callback,
the suspend flag, the stopped and crashed flags) and three cancelled, so that a callback
blocked by flow control during a rebalance is abandoned. Profiled on a byte-copying
agent, that is a fifth of the worker's CPU, although the callback (the conductor putting
the event on the stream's queue) almost never blocks. ``_drain_messages`` below is
Faust's loop with one change: the callback is first run in place; only if it suspends
(flow control, a full buffer, a busy lock) is the rest of it awaited exactly as Faust
does, abandoned on suspend, stop or crash. When any of those flags is already set, the
message goes Faust's way from the start.

Faust bounds a stream's buffer by a count of events (``stream_buffer_maxsize``); once it
is full (the agent is the bottleneck, i.e. always, on a backlog) every further message
takes the conductor's slow path (a blocked put, the wait_first tasks above, a partition
paused and resumed), one message at a time. And a count is no memory bound when records
can be 256 KiB. So this consumer also bounds what it has delivered and not yet seen
acked, with hysteresis: over half of ``stream_buffer_maxsize`` events, or over
``STREAMS_STREAM_BUFFER_BYTES`` (value plus ``EVENT_OVERHEAD`` per event), the drain loop
waits until acks bring both under half of that (or the flow is suspended or stopped, as
Faust would), then delivers a burst on the fast path. Faust's own buffer then never fills.
The counts are reset on a rebalance (revoke and assign), and a delivery Faust's way that
was abandoned is uncounted, so a delivered message that is never acked (its partition
went elsewhere) cannot stall the loop.

Pinned to the exact Faust code it corrects: tests/unit/test_faust_pins.py fails when
faust-streaming's ``_new_offset``, the drain loop or the conductor's message handler
change upstream.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from typing import Any, cast

import faust
from aiokafka.errors import KafkaConnectionError
from faust.sensors import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from mode import Service

from streams.retry import Backoff

log = logging.getLogger("streams.worker")

FAUST_VERSION = "0.15.3"
EVENT_OVERHEAD = 1024  # bytes of Python objects per buffered event (record, Message, Event), measured roughly
DEFAULT_BUFFER_BYTES = 64 * 2**20


@types.coroutine
def _rest_of(coro: Coroutine, yielded: Any) -> Generator[Any, Any, Any]:
    """The remainder of ``await coro`` for a coroutine that was started by hand and
    suspended on ``yielded``: run as a task, it behaves as if the task had run it all."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation and the like go into the coroutine
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def finish(coro: Coroutine, yielded: Any) -> Any:
    """``_rest_of`` as a native coroutine (what ``asyncio.ensure_future`` takes)."""
    return await _rest_of(coro, yielded)


class HoleTolerantConsumer(faust_aiokafka.Consumer):
    _buffered = 0  # bytes delivered to streams and not yet acked (see the module docstring)
    _delivered = 0  # events delivered to streams and not yet acked
    _room: asyncio.Event | None = None
    _budget_cache: tuple[int, int] = (DEFAULT_BUFFER_BYTES, 2**30)  # set when the drain loop starts

    def _budget(self) -> tuple[int, int]:
        """(bytes, events) the drain loop may have delivered and not yet seen acked."""
        return (
            int(getattr(self.app, "stream_buffer_bytes", DEFAULT_BUFFER_BYTES)),
            max(self.app.conf.stream_buffer_maxsize // 2, 1),
        )

    def ack(self, message: Any) -> bool:
        was_acked = message.acked
        result = super().ack(message)
        if not was_acked and message.acked:
            self._buffered -= len(message.value or b"") + EVENT_OVERHEAD
            self._delivered -= 1
            room = self._room
            if room is not None and not room.is_set():
                max_bytes, max_events = self._budget_cache
                if self._buffered <= max_bytes // 2 and self._delivered <= max_events // 2:
                    room.set()
        return result

    def _reset_delivered(self) -> None:
        """After a rebalance nothing delivered before it is counted (acks of it only give slack)."""
        self._buffered = self._delivered = 0
        if self._room is not None:
            self._room.set()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._reset_delivered()
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        self._reset_delivered()
        await super().on_partitions_assigned(assigned, generation_id)

    async def _wait_for_room(self) -> None:
        """Over the byte budget: wait for acks (or a suspended flow, a stop, a crash)."""
        if self._room is None:
            self._room = asyncio.Event()
        self._room.clear()
        await self.wait_first(self._room.wait(), self.suspend_flow.wait())

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

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover
        # Faust 0.15.3's Consumer._drain_messages, but for the marked lines.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        # changed: the flags that make Faust's wait_first give up on a callback
        suspended = self.suspend_flow.is_set
        stopped = cast(Service, self)._stopped.is_set
        crashed = cast(Service, self)._crashed.is_set
        budget, max_delivered = self._budget_cache = self._budget()

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                ait = cast(AsyncIterator, getmany(timeout=1.0))

                # Sleeping because sometimes getmany is called in a loop
                # never releasing to the event loop
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            # We have a gap in income messages
                            if gap > 1 and r_offset:
                                acks_enabled = acks_enabled_for(message.topic)
                                if acks_enabled:
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            # changed: was ``await self.wait_first(callback(message), self.suspend_flow.wait())``
                            if self._buffered > budget or self._delivered >= max_delivered:
                                await self._wait_for_room()
                            size = len(message.value or b"") + EVENT_OVERHEAD
                            self._buffered += size
                            self._delivered += 1
                            delivery = cast(Coroutine, callback(message))
                            if suspended() or stopped() or crashed():
                                waited = await self.wait_first(delivery, self.suspend_flow.wait())
                            else:
                                try:
                                    waiting_on = delivery.send(None)
                                except StopIteration:
                                    waited = None  # delivered without suspending: the common case
                                else:
                                    delivery = finish(delivery, waiting_on)
                                    waited = await self.wait_first(delivery, self.suspend_flow.wait())
                            if waited is not None and delivery not in waited.done:
                                self._buffered -= size  # abandoned (suspended or stopped): never acked
                                self._delivered -= 1
                            # end of change
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev(
                                "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                                offset,
                                message.key,
                                message.value,
                            )
                    unset_flag(flag_consumer_fetching)

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


class RawSchema(faust.Schema):
    """Key and value as the bytes consumed, without Faust's codec registry.

    What ``key_serializer="raw"``/``value_serializer="raw"`` with ``bytes`` types produce
    (``None`` stays ``None``), minus the registry and codec calls per message (8 % of a
    byte-copying worker's CPU, profiled). Nothing to decode, so nothing can fail to decode:
    Faust's drop-on-decode-error trap stays closed (docs/delivery.md, trap 4).
    """

    def loads_key(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.key

    def loads_value(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        return message.value


class QuickProducerBuffer(ProducerBuffer):
    """Faust's ProducerBuffer, whose ``size`` (read by the conductor for every message)
    looks the ``producer_threaded`` setting up once instead of each time."""

    _threaded: bool | None = None

    @property
    def size(self) -> int:
        threaded = self._threaded
        if threaded is None:
            threaded = self._threaded = bool(cast(Any, self.app).conf.producer_threaded)
        if threaded:
            if not self.queue:
                return 0
            return len(self.queue._queue)  # type: ignore[attr-defined]
        return len(self.pending._queue)  # type: ignore[attr-defined]


async def _start_until_connected(start: Callable[[], Awaitable[None]], what: str) -> None:
    """``start()`` until the broker answers: a broker down is transient, not a crash."""
    backoff = Backoff(10.0, f"kafka {what} start")
    while True:
        try:
            return await start()
        except KafkaConnectionError as exc:
            log.warning(
                "Kafka %s cannot start (%s), attempt %d; retrying", what, type(exc).__name__, backoff.attempts + 1
            )
            await backoff.wait()


class StreamsProducer(faust_aiokafka.Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer.__class__ = QuickProducerBuffer

    async def on_start(self) -> None:
        await _start_until_connected(super().on_start, "producer")


class PatientConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def on_start(self) -> None:
        await _start_until_connected(super().on_start, "consumer")


class StreamsConsumer(HoleTolerantConsumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return PatientConsumerThread(self, loop=self.loop, beacon=self.beacon)


class StreamsTransport(faust_aiokafka.Transport):
    Consumer = StreamsConsumer
    Producer = StreamsProducer


class QuietMonitor(Monitor):
    """Faust's Monitor without its per-event bookkeeping (nothing here reads it).

    The per-event sensor calls (message in/out, stream event in/out, buffer full) each
    update counters and dicts; the rest (commits, rebalances, sends) stays as Faust has it.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        pass

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_topic_buffer_full(self, tp: Any) -> None:
        pass


class StreamsApp(faust.App):
    """``faust.App`` whose consumer tolerates holes and drains cheaply (see the module docstring)."""

    _event_class: Any = None

    def _new_transport(self) -> Any:
        return StreamsTransport(self.conf.broker_consumer, self)

    def create_event(self, key: Any, value: Any, headers: Any, message: Any) -> Any:
        """Faust's, with the ``Event`` setting looked up once instead of per message."""
        cls = self._event_class
        if cls is None:
            cls = self._event_class = self.conf.Event
        return cls(self, key, value, headers, message)
