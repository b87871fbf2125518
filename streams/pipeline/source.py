"""A stage's own Kafka consumer: whole batches out, offsets committed only by the stage's writer.

One confluent-kafka consumer per stage, in the stage's group (``<app_id>-<stage>``), with
``enable.auto.commit=false``, ``enable.auto.offset.store=false`` and
``isolation.level=read_committed``: the stage commits its input offsets itself, inside
the same Kafka transaction as its outputs (``streams.pipeline.transactions``).

Every call on the consumer happens on one thread (``kafka-<stage>-source``): polling,
pausing, seeking and the rebalance callbacks, so their order is the order they happened.
Each batch is tagged with the *incarnation* of its partitions; an incarnation changes when
a partition is assigned, revoked, lost or rewound, so a batch read before such an event is
recognised and dropped by the stage instead of being written twice.

- **Revoke** (cooperative-sticky: only the partitions that move): the partitions'
  incarnation changes first, then the thread waits, at most ``STREAMS_REVOKE_TIMEOUT``,
  for the stage to commit what it has in flight (``Stage.on_revoke``), while the group
  generation still allows that commit.
- **Lost** (the session expired): the stage aborts what is in flight, commits nothing.
- **Backpressure**: the bytes handed to the stage and not yet finished are bounded by
  ``STREAMS_STREAM_BUFFER_BYTES`` (librdkafka's own prefetch gets a share of it). Over
  it, the thread first waits (at most ``PAUSE_AFTER``) for the stage to finish a batch:
  a stage behind a backlog does within milliseconds, and librdkafka stops fetching at
  its own bound meanwhile. Only past that wait is every assigned partition paused, and
  the thread keeps polling, so the group never sees the member as stuck
  (``max.poll.interval.ms``); under half, they resume. A pause costs: librdkafka drops
  the records it prefetched and fetches again only after the resume (measured: the sink
  stage, paused every ~16 batches, sat idle ~0.5 s each time, at 40 % of its rate).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from streams.io.kafka import client_config, consumer_memory_config
from streams.settings import Settings

log = logging.getLogger("streams.worker")

RECORD_OVERHEAD = 256  # bytes of Python objects per consumed record (Message, tuple), measured roughly
POLL_TIMEOUT = 0.1  # seconds: how often the thread serves commands and idle ticks
PAUSE_AFTER = 1.0  # seconds over the budget before the partitions are paused (a rebalance waits that long at most)


@dataclass
class Batch:
    """Records of one poll, in partition order, and the incarnation each partition had then.

    An empty batch is an idle tick: the stage may commit what it holds by interval.
    """

    messages: list[Message] = field(default_factory=list)
    incarnations: dict[int, int] = field(default_factory=dict)
    size: int = 0  # bytes counted against the buffer budget
    # The consumer's position per partition after this poll, where it moved: past the
    # batch's records and past transaction markers (a read_committed reader skips them;
    # committing the offset after the last record would leave a lag of 1 per marker).
    ends: dict[int, int] = field(default_factory=dict)


class RevokeHandler(Protocol):
    """What the stage does when partitions come and go (called on the event loop)."""

    async def on_revoke(self, partitions: set[int]) -> None: ...

    async def on_lost(self, partitions: set[int]) -> None: ...

    async def on_assign(self, partitions: set[int]) -> None: ...


class KafkaSource:
    """The stage's consumer on its own thread; batches go to ``deliver`` on the event loop."""

    def __init__(self, settings: Settings, stage: str, topic: str, group: str, client_id: str | None = None) -> None:
        self.settings = settings
        self.stage = stage
        self.topic = topic
        self.group = group
        budget = settings.stream_buffer_bytes
        self.max_bytes = budget // 2  # the other half is librdkafka's prefetch (below)
        self.config = client_config(
            settings,
            **{
                "group.id": group,
                # Members' client ids are visible to anyone who may describe the group.
                "client.id": client_id or f"{settings.app_id}-{stage}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                # A SIGKILLed member holds its partitions until its session expires.
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 2_000,
                "log_level": 3,
            },
        )
        # librdkafka's prefetch within its half of the budget; STREAMS_KAFKA_EXTRA may override it.
        self.config = {**consumer_memory_config(settings), **self.config}
        self.consumer = Consumer(self.config)
        self._lock = threading.Lock()  # guards the incarnation state, read from the event loop
        self._finished = threading.Condition(self._lock)  # a batch left the budget
        self._incarnation: dict[int, int] = {}
        self._rewinding: set[int] = set()
        self._counter = 0
        self._reported: dict[int, int] = {}  # last position handed over per partition (thread only)
        self._metadata: Any = None
        self._held: list[Message] = []  # read while waiting for the stage; they open the next batch
        self._commands: list[Callable[[], None]] = []
        self._in_flight = 0  # bytes handed over and not yet finished
        self._paused = False
        self.pauses = 0  # times the budget paused the partitions (tests)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Callable[[Batch], Coroutine[Any, Any, None]] | None = None
        self._handler: RevokeHandler | None = None
        self.assigned: set[int] = set()
        self.revoked_mid_batch = 0  # revokes that found work in flight (tests, metrics)

    # --- event loop side ---------------------------------------------------
    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[Batch], Coroutine[Any, Any, None]],
        handler: RevokeHandler,
    ) -> None:
        self._loop, self._deliver, self._handler = loop, deliver, handler
        self._thread = threading.Thread(target=self._run, name=f"kafka-{self.stage}-source", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Leave the group (revoking: the stage commits what is in flight) and close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def live(self, batch: Batch) -> list[Message]:
        """The batch's records whose partition is still ours in the incarnation they were read in."""
        stale = self.stale(batch)
        if not stale:
            return batch.messages
        return [m for m in batch.messages if m.partition() not in stale]

    def stale(self, batch: Batch) -> set[int]:
        """Partitions of ``batch`` assigned, revoked, lost or rewound since it was read."""
        with self._lock:
            current = self._incarnation
            rewinding = self._rewinding
            return {p for p, n in batch.incarnations.items() if current.get(p) != n or p in rewinding}

    def is_live(self, partition: int, incarnation: int) -> bool:
        with self._lock:
            return self._incarnation.get(partition) == incarnation and partition not in self._rewinding

    def assigned_now(self) -> set[int]:
        """The partitions assigned at this moment (from any thread)."""
        with self._lock:
            return set(self._incarnation)

    def finished(self, batch: Batch) -> None:
        """The stage is done with ``batch`` (written or dropped): its bytes leave the budget."""
        with self._lock:
            self._in_flight -= batch.size
            self._finished.notify_all()

    def rewind(self) -> None:
        """Back to the committed offsets on every assigned partition (after an aborted transaction).

        Batches already read become stale at once; the seek happens on the thread.
        """
        with self._lock:
            self._rewinding |= set(self._incarnation)
            self._commands.append(self._seek_committed)

    def group_metadata(self) -> Any:
        """The group generation the stage's offsets go in with (KIP-447), as the consumer thread
        last saw it: asked of the consumer from another thread during a rebalance callback,
        it waits for that callback to end, i.e. forever."""
        return self._metadata

    # --- consumer thread ---------------------------------------------------
    def _bump(self, partitions: set[int], remove: bool = False) -> None:
        with self._lock:
            if self._held:  # read in the old incarnation: never handed over in the new one
                self._held = [m for m in self._held if m.partition() not in partitions]
            for p in partitions:
                self._reported.pop(p, None)
                if remove:
                    self._incarnation.pop(p, None)
                else:
                    self._counter += 1
                    self._incarnation[p] = self._counter
                self._rewinding.discard(p)

    def _seek_committed(self) -> None:
        with self._lock:
            partitions = set(self._rewinding) & set(self._incarnation)
        if partitions:
            committed = self.consumer.committed([TopicPartition(self.topic, p) for p in sorted(partitions)], timeout=30)
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                try:
                    self.consumer.seek(TopicPartition(self.topic, tp.partition, offset))
                except KafkaException as exc:  # not yet fetching: assign at that offset instead
                    log.debug("seek %s/%d: %s", self.topic, tp.partition, exc)
                    self.consumer.incremental_unassign([TopicPartition(self.topic, tp.partition)])
                    self.consumer.incremental_assign([TopicPartition(self.topic, tp.partition, offset)])
            log.info("rewound %d partitions to their committed offsets", len(committed), extra={"stage": self.stage})
        self._bump(partitions)

    def _call(self, what: str, partitions: set[int]) -> None:
        """Run the stage's handler on the event loop and wait for it (bounded)."""
        assert self._loop is not None and self._handler is not None
        self._metadata = self.consumer.consumer_group_metadata()
        coro = getattr(self._handler, what)(partitions)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:  # an assignment waits for its state (the dedup window) to be read, however long
            future.result(None if what == "on_assign" else self.settings.revoke_timeout + 5)
        except Exception as exc:
            if what == "on_assign":  # going on without the partitions' state would let copies through
                from streams.pipeline.delivery import die

                die(self.stage, exc)
            log.warning("%s of %d partitions did not finish (%s)", what, len(partitions), type(exc).__name__)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        ps = {tp.partition for tp in partitions}
        self._bump(ps)
        self.assigned |= ps
        # Assigned here, not after the callback (confluent-kafka's default): librdkafka looks
        # up the committed offsets and fetches while the stage reads the partitions' state
        # (the dedup window, ``on_assign``). No record is handed over before that is done:
        # this thread, which hands them over, waits for it.
        consumer.incremental_assign(self._start_offsets(consumer, partitions))
        if self._paused:  # newly assigned partitions start paused like the rest
            consumer.pause(partitions)
        log.info("assigned %d partitions of %s", len(ps), self.topic, extra={"stage": self.stage})
        self._call("on_assign", ps)

    def _start_offsets(self, consumer: Consumer, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Where each newly assigned partition starts: a partition with no committed offset at
        the start ``auto.offset.reset`` names, given explicitly. Left to librdkafka, such a
        partition waits 100 ms (its offset-reset backoff) before its first fetch (measured:
        a new group's first batch 0.1 s after its assignment, 2 ms with this). A partition
        with a committed offset, one whose offset could not be read (an unstable offset:
        a transaction still commits it) and any partition when the read fails are left to
        librdkafka, which reads their offsets itself."""
        start = {"earliest": OFFSET_BEGINNING, "smallest": OFFSET_BEGINNING, "beginning": OFFSET_BEGINNING}
        start |= {"latest": OFFSET_END, "largest": OFFSET_END, "end": OFFSET_END}
        reset = start.get(str(self.config.get("auto.offset.reset")))
        if reset is None or not partitions:
            return partitions
        try:
            committed = consumer.committed(partitions, timeout=self.settings.kafka_timeout)
        except KafkaException as exc:
            log.debug("committed offsets of the assignment: %s", exc.args[0].name(), extra={"stage": self.stage})
            return partitions
        none = {tp.partition for tp in committed if tp.error is None and tp.offset == OFFSET_INVALID}
        return [TopicPartition(tp.topic, tp.partition, reset) if tp.partition in none else tp for tp in partitions]

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        ps = {tp.partition for tp in partitions}
        self._bump(ps, remove=True)
        self.assigned -= ps
        log.info("revoked %d partitions of %s", len(ps), self.topic, extra={"stage": self.stage})
        self._call("on_revoke", ps)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        ps = {tp.partition for tp in partitions}
        self._bump(ps, remove=True)
        self.assigned -= ps
        log.warning("lost %d partitions of %s", len(ps), self.topic, extra={"stage": self.stage})
        self._call("on_lost", ps)

    def _backpressure(self) -> None:
        with self._lock:
            if not self._paused and self._in_flight > self.max_bytes:  # wait for the stage before pausing
                self._finished.wait_for(
                    lambda: self._in_flight <= self.max_bytes or bool(self._commands) or self._stop.is_set(),
                    PAUSE_AFTER,
                )
            in_flight = self._in_flight
        assignment = [TopicPartition(self.topic, p) for p in sorted(self.assigned)]
        if not self._paused and in_flight > self.max_bytes:
            self._paused = True
            self.pauses += 1
            if assignment:
                self.consumer.pause(assignment)
        elif self._paused and in_flight <= self.max_bytes // 2:
            self._paused = False
            if assignment:
                self.consumer.resume(assignment)

    def _hand_over(self, batch: Batch) -> None:
        assert self._loop is not None and self._deliver is not None
        with self._lock:
            self._in_flight += batch.size
        future = asyncio.run_coroutine_threadsafe(self._deliver(batch), self._loop)
        while not self._stop.is_set():
            try:
                future.result(POLL_TIMEOUT)
                return
            except TimeoutError:  # the stage is behind: keep serving the group (and keep what poll returns)
                message = self.consumer.poll(0)
                if message is not None:
                    self._held.append(message)
            except Exception:
                return

    def _errors(self, messages: list[Message]) -> None:
        """A fatal consumer error ends the process (raised); the others are logged and skipped."""
        for m in messages:
            err = m.error()
            if err is not None:
                if err.fatal():
                    log.critical("the %s consumer failed for good (%s)", self.stage, err.name())
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    log.debug("consumer: %s", err.name())

    def _run(self) -> None:
        consumer = self.consumer
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        try:
            while not self._stop.is_set():
                with self._lock:
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                self._backpressure()
                messages = consumer.consume(self.settings.stage_batch_size(self.stage), POLL_TIMEOUT)
                self._metadata = consumer.consumer_group_metadata()
                if self._held:
                    messages, self._held = self._held + messages, []
                batch = Batch()
                if self.assigned:
                    reported = self._reported
                    for tp in consumer.position([TopicPartition(self.topic, p) for p in self.assigned]):
                        if tp.offset >= 0 and reported.get(tp.partition) != tp.offset:
                            batch.ends[tp.partition] = reported[tp.partition] = tp.offset
                if messages:
                    good = [m for m in messages if m.error() is None]
                    if len(good) != len(messages):
                        self._errors(messages)
                    # len(message) is its value's length: the bytes the batch holds, in one C loop
                    batch.messages, batch.size = good, sum(map(len, good)) + RECORD_OVERHEAD * len(good)
                if batch.ends or batch.messages:
                    with self._lock:
                        partitions = cast(set[int], {m.partition() for m in batch.messages}) | set(batch.ends)
                        batch.incarnations = {p: self._incarnation.get(p, -1) for p in partitions}
                self._hand_over(batch)
        except Exception as exc:
            from streams.pipeline.delivery import die

            die(self.stage, exc)
        finally:
            try:
                consumer.close()  # revokes first (the stage commits in flight), then leaves the group
            except Exception as exc:
                log.debug("consumer close: %s", type(exc).__name__)
