"""A stage's transactional producer: its outputs and its input offsets commit together (EOS v2).

``transactional.id`` is ``<app_id>-<stage>-<STREAMS_WORKER_SLOT>``: a worker restarted in
the same slot fences its predecessor and aborts the transaction it left open at once.
Without a slot the id is random, and a crashed worker's open transaction holds
``read_committed`` readers back until it times out (``STREAMS_TRANSACTION_TIMEOUT``, at
most 30 s then). Group-generation fencing (KIP-447: the offsets go in with the
consumer's group metadata) stops a zombie either way.

Errors, as librdkafka classifies them:

- *abortable* (``txn_requires_abort``; a record the broker refused, a partition that
  moved): ``Abort`` is raised, the caller aborts, rewinds its consumer to the committed
  offsets and reads again;
- *retriable* (a coordinator moving, a timeout): the call is repeated;
- *fatal* or *fenced* (a newer worker took the slot): the process exits with one line.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from streams.io.kafka import PERMANENT_ERRORS, client_config, producer_memory_config
from streams.pipeline.delivery import fatal
from streams.retry import Backoff
from streams.settings import Settings

log = logging.getLogger("streams.worker")

# Bytes a record may need beyond its key and value inside a record batch (batch header 61,
# record header and varints <= 21, a little slack): a record whose key + value is within
# ``max.message.bytes - SIZE_MARGIN`` always fits a batch of its own.
SIZE_MARGIN = 512
FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})


Source = tuple[int, int] | Message  # the input a record is the output of


def source_of(source: Source) -> tuple[int, int]:
    """``(partition, offset)`` of an input given as that, or as its consumed ``Message``."""
    if isinstance(source, tuple):
        return source
    return (source.partition(), source.offset())  # type: ignore[return-value]


class Positions(Sequence[tuple[int, int]]):
    """The inputs of a batch's records as ``(partition, offset)`` each, from its two lists:
    what an open transaction keeps to name a refused record's input, instead of the
    consumed ``Message`` objects (which hold the raw records until the commit)."""

    __slots__ = ("offsets", "partitions")

    def __init__(self, partitions: list[int], offsets: list[int]) -> None:
        self.partitions, self.offsets = partitions, offsets

    def __len__(self) -> int:
        return len(self.partitions)

    def __getitem__(self, i):  # an index only (no slice is asked for)
        return (self.partitions[i], self.offsets[i])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.partitions, self.offsets, strict=True)


class Abort(Exception):
    """The open transaction must be aborted; ``refused`` maps an input record
    (``partition, offset``) to the error the broker refused its output with for good."""

    def __init__(
        self, why: str, refused: dict[tuple[int, int], KafkaError] | None = None, in_doubt: bool = False
    ) -> None:
        super().__init__(why)
        self.refused = refused or {}
        # A commit that never returned: the broker may have committed it after all, so
        # in-memory state cannot be undone; it is read back from what Kafka committed.
        self.in_doubt = in_doubt


def make_transactional_id(settings: Settings, stage: str) -> str:
    slot = settings.worker_slot or f"r{uuid.uuid4().hex[:12]}"
    return f"{settings.app_id}-{stage}-{slot}"


def transaction_timeout_ms(settings: Settings) -> int:
    seconds = settings.transaction_timeout if settings.worker_slot else min(settings.transaction_timeout, 30.0)
    return int(seconds * 1000)


class TransactionalProducer:
    """One transaction at a time; every blocking call is meant to run off the event loop."""

    def __init__(self, settings: Settings, stage: str, transactional_id: str | None = None, **config: Any) -> None:
        self.settings = settings
        self.stage = stage
        self.transactional_id = transactional_id or make_transactional_id(settings, stage)
        defaults = {"linger.ms": 5, "compression.type": "lz4", **producer_memory_config(settings)}
        self.config = {
            **defaults,
            **client_config(settings, **config),
            "transactional.id": self.transactional_id,
            "transaction.timeout.ms": transaction_timeout_ms(settings),
            "enable.idempotence": True,
            "acks": "all",
            "log_level": 3,
        }
        # Delivery reports of refused records only, to one callback: a report (and a Python
        # call) per delivered record cost the stage ~2 µs per record (benchmarks.profile_mask).
        self.config["delivery.report.only.error"] = True
        self.config["on_delivery"] = self._delivered
        self.producer = Producer(self.config)
        self.open = False
        self.abandoned = False  # replaced after a call that never returned: its late errors mean nothing
        self.refused: dict[tuple[int, int], KafkaError] = {}  # deliveries refused in this transaction
        # ``(topic, records, sources)`` of each produce call in the open transaction: a refused
        # record's report names its topic, key and value, and this names its input.
        self.sent: list[tuple[str, Sequence[Sequence[Any]], Sequence[Source]]] = []
        self._index: dict[tuple, list[tuple[int, int]]] = {}
        self._indexed = 0  # entries of ``sent`` in ``_index``
        self.records = 0
        self.began = 0.0

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """Run ``call``; retriable errors again (backoff), abortable ones as ``Abort``, fatal ones exit."""
        backoff = Backoff(self.settings.retry_max_backoff, f"kafka {what}")
        while True:
            try:
                return call()
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                self._fatal_check(err)
                if err.txn_requires_abort():
                    self.producer.poll(0)  # serve pending delivery reports: a refused record names itself
                    raise Abort(f"{what}: {err.name()}", dict(self.refused)) from None
                if err.retriable():
                    log.warning("%s: %s, attempt %d; retrying", what, err.name(), backoff.attempts + 1)
                    backoff.wait_blocking()
                    continue
                raise

    def _fatal_check(self, err: KafkaError) -> None:
        """Exit with one line if Kafka will never take this producer's writes again."""
        if self.abandoned:
            raise Abort(f"abandoned producer: {err.name()}")
        if err.fatal() or err.code() in FENCED:
            fatal(
                self.stage,
                f"Kafka refused transactional id {self.transactional_id} for good ({err.name()}): "
                "a newer worker took this slot (STREAMS_WORKER_SLOT), or the producer failed",
            )

    def init(self) -> None:
        """Register the id (fencing any older producer with it) and abort what it left open."""
        self._guard("init transactions", lambda: self.producer.init_transactions(30))

    def begin(self) -> None:
        if not self.open:
            self._guard("begin transaction", self.producer.begin_transaction)
            self.open = True
            self.records = 0
            self.began = time.monotonic()
            self.refused = {}
            self.sent = []
            self._index, self._indexed = {}, 0

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        source: tuple[int, int],
        timestamp: int = 0,
        partition: int = -1,
    ) -> None:
        """Queue one output of input ``source`` (``partition, offset``) in the open transaction;
        ``timestamp`` (ms, 0 = now) is the input's for a dead letter, so the DLQ's retention counts from it;
        ``partition``: a fixed one (the dedup changelog's is its raw partition), else by key."""
        self.produce_many(topic, [(key, value)], [source], timestamp, partition)

    def produce_many(
        self,
        topic: str,
        records: Sequence[Sequence[Any]],
        sources: Sequence[Source],
        timestamp: int = 0,
        partition: int = -1,
    ) -> None:
        """``produce`` each record (its ``key, value`` first: an ``Output`` as it is) of input
        ``sources[i]``, in order: one call per batch, one Python step per record.

        A source is ``(partition, offset)``, or the consumed ``Message`` itself: read only
        when a record is refused (``source_of``), not per record.
        """
        self.sent.append((topic, records, sources))
        produce = self.producer.produce
        plain = partition == -1 and not timestamp
        for record in records:
            try:
                if plain:
                    produce(topic, record[1], record[0])
                else:
                    produce(topic, record[1], record[0], partition, timestamp=timestamp)
            except BufferError:  # librdkafka's queue is full: let it drain
                self._produce_when_room(topic, record, partition, timestamp)
            except KafkaException as exc:
                self._refused_at_once(exc.args[0], records, sources, record)
        self.records += len(records)

    def _produce_when_room(self, topic: str, record: Sequence[Any], partition: int, timestamp: int) -> None:
        while True:
            self.producer.poll(0.05)
            try:
                self.producer.produce(topic, record[1], record[0], partition, timestamp=timestamp)
                return
            except BufferError:
                continue

    def _refused_at_once(
        self, err: KafkaError, records: Sequence[Sequence[Any]], sources: Sequence[Source], record: Sequence[Any]
    ) -> None:
        """``produce`` raised for ``record`` (too large, say): remember its input if for good, then ``Abort``."""
        self._fatal_check(err)
        if err.code() in PERMANENT_ERRORS:
            i = next(i for i, r in enumerate(records) if r is record)
            self.refused[source_of(sources[i])] = err
        raise Abort(f"produce: {err.name()}", dict(self.refused)) from None

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        """A refused record (the only reports asked for): its input, found by topic, key and value."""
        if err is None or err.code() not in PERMANENT_ERRORS:
            return  # another failure: the commit fails with it (abortable), nothing to remember
        index = self._index  # built at a refusal (rare), not per record
        for sent_topic, records, sources in self.sent[self._indexed :]:
            for record, source in zip(records, sources, strict=True):
                index.setdefault((sent_topic, record[0], record[1]), []).append(source_of(source))
        self._indexed = len(self.sent)
        for source in index.get((msg.topic(), msg.key(), msg.value()), ()):
            self.refused[source] = err  # the same bytes twice: both would be refused alike

    def poll(self) -> None:
        self.producer.poll(0)

    def commit(self, offsets: dict[tuple[str, int], int], group_metadata: Any) -> None:
        """Send the input offsets (next offset to read) and commit; ``Abort`` if it must be aborted."""
        if not self.open:
            return
        if offsets:
            tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            self._guard("send offsets", lambda: self.producer.send_offsets_to_transaction(tps, group_metadata, 30))
        self._guard("commit transaction", lambda: self.producer.commit_transaction(60))
        self.open = False
        self.sent, self._index, self._indexed = [], {}, 0

    def abort(self) -> None:
        if self.open:
            self.open = False
            try:
                self._guard("abort transaction", lambda: self.producer.abort_transaction(60))
            except Abort:  # already aborted by the broker
                pass

    def close(self) -> None:
        self.producer.flush(5)
