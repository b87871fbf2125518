"""The worker stages: source (batches) -> pure transform -> a writer that commits outputs and offsets together.

- **mask**: ``MaskTransform`` on each batch, its masked records and dead letters
  produced into one Kafka transaction with the raw offsets (EOS v2). A transaction
  commits every ``STREAMS_COMMIT_RECORDS`` records or ``STREAMS_COMMIT_INTERVAL``
  seconds; its commit runs on a thread while the next batch is transformed.
- **sink**: ``SinkStage.plan`` on each batch, the rows written to PostgreSQL in one
  database transaction (idempotent by ``message_id``), then the sink's dead letters and
  the masked offsets in one Kafka transaction. The next batch is decoded meanwhile, and
  its rows are written while that transaction commits (``SinkWriter``).

A transaction Kafka wants aborted is aborted, every assigned partition is rewound to its
committed offset, and reading goes on; a record the broker refused for its size is
dead-lettered on the way through again. docs/delivery.md has the rules and their tests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, Message

from streams import metrics
from streams.errors import TransientError
from streams.faults import fault_hang, fault_point, fault_stall
from streams.io.codec import CONFLUENT_HEADER_LEN
from streams.io.kafka import admin_client
from streams.pipeline.dead_letters import refused_by_kafka
from streams.pipeline.dedup import REDRIVE_HEADER
from streams.pipeline.mask import MaskTransform
from streams.pipeline.sink import PostgresSink, SinkStage
from streams.pipeline.source import Batch, KafkaSource, RevokeHandler
from streams.pipeline.transactions import SIZE_MARGIN, Abort, Positions, TransactionalProducer
from streams.privacy import core as mask_core
from streams.privacy.ledger import ERASED
from streams.retry import retry_forever
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.pipeline.dedup import Window
    from streams.privacy.ledger import ErasedUsers
    from streams.privacy.user_keys import KeyStore

log = logging.getLogger("streams.worker")

TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588  # Kafka's default max.message.bytes


def where(message: Message) -> str:
    """``topic/partition/offset``: an identity for records without a usable key."""
    return f"{message.topic()}/{message.partition()}/{message.offset()}"


def stage_input(messages: list[Message]) -> list[tuple[bytes | None, bytes | None, str]]:
    """``(key, value, where)`` of consumed records, for ``MaskTransform.batch`` and ``SinkStage.plan``
    (a null value is a tombstone). ``where`` names a record only when its key may not serve as
    its id (none, or not ASCII: it may not decode); else "": a string per record is not made
    to be thrown away."""
    return [(k, m.value(), where(m) if not k or not k.isascii() else "") for m in messages for k in [m.key()]]


_KEY = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)
_REASON = operator.itemgetter(2)
_HEAD = operator.itemgetter(slice(0, CONFLUENT_HEADER_LEN))


def _plain(outputs: list[Any], limit: int) -> bool:
    """No dead letter nor dropped record among ``outputs``, and each within ``limit`` bytes
    of key + value (bounded by the longest key plus the longest value): in C loops."""
    if any(map(_REASON, outputs)):
        return False
    return not outputs or max(map(len, map(_KEY, outputs))) + max(map(len, map(_VALUE, outputs))) <= limit


def schema_heads(inputs: list[tuple[bytes | None, bytes | None, str]]) -> set[bytes]:
    """The distinct schema headers of a batch's values (a batch shares one or two), in C loops:
    what ``AvroCodec.resolve`` looks up, without a Python step per record."""
    return set(map(_HEAD, filter(None, map(_VALUE, inputs))))


Read = tuple[list[tuple[bytes | None, bytes | None, str]], list[int], list[int], set[bytes]]


def read_batch(messages: list[Message]) -> Read:
    """What a stage reads of a batch: its inputs (``stage_input``), each record's partition
    and offset, and the schema headers of its values (``schema_heads``). The reference of
    the compiled core's one pass (``streams_core.stage_input``)."""
    inputs = stage_input(messages)
    partitions = cast(list[int], [m.partition() for m in messages])  # consumed records have both
    return inputs, partitions, cast(list[int], [m.offset() for m in messages]), schema_heads(inputs)


# Records the core's reading is checked on when loaded: each kind of key (none, empty, not
# ASCII, text), of value (none, empty, shorter than a header, two headers).
_READ_PROBES = [
    Message(topic="t", partition=p, offset=o, key=k, value=v)
    for p, o, k, v in (
        (0, 5, b"id-1", b"\x00\x00\x00\x00\x01abc"),
        (1, 0, None, b"\xc3\x01\x02"),
        (1, 1, b"", b""),
        (2, 7, b"\xffid", None),
        (2, 9, b"id-2", b"\x00\x00\x00\x00\x02"),
        (0, 1 << 40, b"id-3", b"\x00\x00\x00\x00\x01xyz"),
    )
]


@functools.cache
def batch_reader() -> Callable[[list[Message]], Read]:
    """``read_batch`` in one core pass over the ``Message`` objects when the core is built
    and agrees on the probes, else ``read_batch`` itself (``STREAMS_REQUIRE_CORE=1``: an error)."""
    return mask_core.load_batch_reader(read_batch, _READ_PROBES, where, CONFLUENT_HEADER_LEN)


def record_limits(settings: Settings, topics: Sequence[str]) -> dict[str, int]:
    """Bytes of key + value a record may have on each topic: the topic's ``max.message.bytes``
    (read once, at start) and the producer's ``message.max.bytes``, less ``SIZE_MARGIN``."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    producer_max = int(settings.kafka_extra.get("message.max.bytes", 1_000_000))
    limits = {}
    admin = admin_client(settings)
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in topics]
    for resource, future in admin.describe_configs(resources, request_timeout=settings.kafka_timeout).items():
        try:
            value = int(future.result()["max.message.bytes"].value)
        except Exception as exc:  # not allowed to read it: assume the broker default
            log.warning("max.message.bytes of %s not readable (%s)", resource.name, type(exc).__name__)
            value = DEFAULT_MAX_MESSAGE_BYTES
        limits[resource.name] = min(value, producer_max) - SIZE_MARGIN
    return limits


class StageWriter(RevokeHandler):
    """What both stages share: the lock that orders batches, commits and rebalances; the abort path."""

    stage = ""

    def __init__(self, settings: Settings, source: KafkaSource, producer: TransactionalProducer) -> None:
        self.settings = settings
        self.source = source
        self.producer = producer
        self.lock = asyncio.Lock()
        self.in_flight: asyncio.Future | None = None  # the commit (mask) or write (sink) running
        self.offsets: dict[tuple[str, int], int] = {}  # next offset per partition, in the open transaction
        self.refused: dict[tuple[int, int], KafkaError] = {}  # inputs whose output the broker refused for good
        self.limits: dict[str, int] = {}
        self.batches = 0  # batches in the open transaction (liveness)
        self.boundaries = 0  # transactions ended (committed or aborted): the erasure ledger confirms at one
        self.aborts = 0  # transactions aborted (each rewound the source)
        self.erased: ErasedUsers | None = None  # the erasure ledger in memory (streams.privacy.ledger)
        self.read = batch_reader()
        self.in_ = metrics.RECORDS_IN.labels(self.stage)
        self.size_ = metrics.BATCH_SIZE.labels(self.stage)
        self.seconds_ = metrics.BATCH_SECONDS.labels(self.stage)

    async def start(self) -> None:
        """Register the transactional id and read the topics' record limits, side by side."""
        _, self.limits = await asyncio.gather(
            asyncio.to_thread(self.producer.init),
            asyncio.to_thread(record_limits, self.settings, [self.settings.masked_topic, self.settings.dlq_topic]),
        )

    def close(self) -> None:
        self.producer.close()

    def busy(self) -> bool:
        """A transaction is open or committing: work begun under an older erasure ledger may still commit."""
        return self.producer.open or (self.in_flight is not None and not self.in_flight.done())

    def boundary_mark(self) -> int | None:
        """The ``boundaries`` count that, once passed, means no work in flight now can still
        commit (the erasure ledger confirms a version then); None when nothing is in flight."""
        return self.boundaries if self.busy() else None

    def ledger_version(self) -> int:
        return self.erased.version if self.erased is not None else 0

    async def handle(self, batch: Batch) -> None:
        """Write one batch; the source learns it was handled, whatever happened."""
        try:
            await self._handle(batch)
        finally:
            self.source.finished(batch)

    async def _handle(self, batch: Batch) -> None:
        """Each stage's writer: transform the batch and write it with its offsets."""

    def fit(self, record: tuple[str, bytes | None, bytes | None], source: tuple[int, int], codecs: Any) -> tuple:
        """The record, or its dead letter when it cannot fit the topic (or the broker refused it before)."""
        topic, key, value = record
        limit = self.limits.get(topic)
        err = self.refused.get(source)
        if err is None and limit is not None and len(key or b"") + len(value or b"") > limit:
            err = TOO_LARGE
        if err is None:
            return record
        fixed = refused_by_kafka(record, err, self.stage, codecs.dead_letter, self.settings.dlq_topic)
        if fixed[0] != topic or len(fixed[1] or b"") + len(fixed[2] or b"") <= self.limits.get(fixed[0], 1 << 62):
            return fixed
        return refused_by_kafka(fixed, err, self.stage, codecs.dead_letter, self.settings.dlq_topic)

    def advance(self, batch: Batch, offsets: dict[tuple[str, int], int]) -> bool:
        """Move ``offsets`` to the consumer's positions of ``batch`` (still-live partitions); any moved?"""
        if not batch.ends:
            return False
        stale = self.source.stale(batch)
        topic = self.source.topic
        moved = False
        for p, end in batch.ends.items():
            if p not in stale and end > offsets.get((topic, p), -1):
                offsets[(topic, p)] = end
                moved = True
        return moved

    def live_now(self, batch: Batch, messages: list[Message]) -> list[Message]:
        """Of ``messages`` (live when the batch was taken), those still live (checked under the lock)."""
        incarnations = batch.incarnations
        dead = {p for p in incarnations if not self.source.is_live(p, incarnations[p])}
        return [m for m in messages if m.partition() not in dead] if dead else messages

    async def blocking(self, call: Any, what: str) -> Any:
        """A blocking transaction call on a thread, bounded by ``STREAMS_COMMIT_TIMEOUT``.

        librdkafka can hang in a commit or abort after its coordinator restarted (a known
        upstream bug): past the bound the producer is replaced by a new one with the same
        transactional id, which fences the old one and aborts its transaction, and the
        batch is read again (``Abort``).
        """
        task = asyncio.ensure_future(asyncio.to_thread(call))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.settings.commit_timeout)
        except TimeoutError:
            log.warning(
                "%s did not return within %.0f s: replacing the producer",
                what,
                self.settings.commit_timeout,
                extra={"stage": self.stage},
            )
            old = self.producer
            old.abandoned = True
            self.producer = TransactionalProducer(self.settings, self.stage, transactional_id=old.transactional_id)
            await asyncio.to_thread(self.producer.init)  # the old transaction is now committed or aborted
            raise Abort(f"{what} timed out", in_doubt=True) from None

    async def settle(self) -> None:
        """Wait for the running commit or write; an abortable failure aborts and rewinds."""
        task, self.in_flight = self.in_flight, None
        if task is not None:
            try:
                await task
            except Abort as abort:
                await self.aborted(abort)

    async def aborted(self, abort: Abort) -> None:
        """Abort the open transaction, rewind every assigned partition, drop what was in flight."""
        log.warning(
            "transaction aborted (%s); reading again from the committed offsets", abort, extra={"stage": self.stage}
        )
        metrics.RETRIES.labels(f"{self.stage} transaction").inc()
        # At once, before anything awaits: a batch taken before this point sees ``aborts`` moved,
        # one taken after it sees its partitions stale; neither commits past the aborted one.
        self.aborts += 1
        self.source.rewind()
        self.refused.update(abort.refused)
        producer = self.producer
        try:
            await self.blocking(producer.abort, "abort transaction")
        except Abort:  # replaced: the new producer has no open transaction
            pass
        producer.poll()  # the delivery reports of the aborted transaction: which records the broker refused
        self.refused.update(producer.refused)
        self.offsets.clear()
        await self.rolled_back(abort.in_doubt)
        for _ in range(self.batches):
            metrics.LIVENESS.finished()
        self.batches = 0

    async def rolled_back(self, in_doubt: bool) -> None:
        """Undo in-memory state of the aborted transaction (the mask stage's dedup window);
        ``in_doubt``: it may have committed, so that state is read back from Kafka instead."""

    def committed(self, offsets: dict[tuple[str, int], int]) -> None:
        """The open transaction committed: its effects are final."""
        self.prune(offsets)

    def prune(self, offsets: dict[tuple[str, int], int]) -> None:
        """Forget refusals of inputs now behind the committed offsets."""
        if self.refused:
            ends = {p: o for (_, p), o in offsets.items()}
            for key in [k for k in self.refused if k[0] in ends and k[1] < ends[k[0]]]:
                del self.refused[key]

    def commit_sync(self, offsets: dict[tuple[str, int], int]) -> None:
        self.producer.commit(offsets, self.source.group_metadata())
        fault_stall(f"{self.stage}_after_commit", self.settings.commit_timeout + 2)

    async def on_assign(self, partitions: set[int]) -> None:
        return None

    async def on_revoke(self, partitions: set[int]) -> None:
        """Commit what is in flight while the generation still allows it (bounded)."""
        async with self.lock:
            busy = self.in_flight is not None or self.producer.open
            finish = asyncio.ensure_future(self._finish())
            try:
                await asyncio.wait_for(asyncio.shield(finish), self.settings.revoke_timeout)
            except TimeoutError:  # it goes on; a late commit is refused by the group generation (then aborted)
                log.warning("in-flight work not committed within the revoke timeout", extra={"stage": self.stage})
                self.in_flight = finish
            if busy:
                self.source.revoked_mid_batch += 1
                metrics.REVOKES.labels(self.stage, "in_flight").inc()
                log.info("revoke: committed the batch in flight", extra={"stage": self.stage})
            else:
                metrics.REVOKES.labels(self.stage, "idle").inc()
            for key in [k for k in self.offsets if k[1] in partitions]:
                del self.offsets[key]

    async def _finish(self) -> None:
        await self.settle()
        if self.producer.open:
            await self.commit_now()

    def before_commit(self) -> None:
        """Last writes of the open transaction, just before it commits (the mask stage's dedup changelog)."""

    async def commit_now(self) -> None:
        offsets, self.offsets = self.offsets, {}
        try:
            self.before_commit()
            await self.blocking(lambda: self.commit_sync(offsets), "commit transaction")
        except Abort as abort:
            await self.aborted(abort)
            return
        self.committed(offsets)
        for _ in range(self.batches):
            metrics.LIVENESS.finished()
        self.batches = 0

    async def on_lost(self, partitions: set[int]) -> None:
        """The session expired: nothing of these partitions may be committed; abort what is open."""
        async with self.lock:
            await self.settle()  # a commit already running ends (bounded by STREAMS_COMMIT_TIMEOUT)
            metrics.REVOKES.labels(self.stage, "lost").inc()
            if self.producer.open:
                await self.aborted(Abort("partitions lost"))


class MaskWriter(StageWriter):
    stage = "mask"

    def __init__(
        self,
        settings: Settings,
        source: KafkaSource,
        producer: TransactionalProducer,
        transform: MaskTransform,
        dedup: Window | None = None,
        keystore: KeyStore | None = None,
    ) -> None:
        super().__init__(settings, source, producer)
        self.transform = transform
        self.keystore = keystore  # per-user key mode: new data keys stored before their transaction commits
        self.codecs = transform.codecs
        self.dedup = dedup
        self.counts = {"masked": 0, "dead_letter": 0, "duplicate": 0, "erased": 0}
        self.dead: list[tuple[str, bytes]] = []  # (reason, message id) in the open transaction
        self.masked_out = metrics.RECORDS_OUT.labels("mask", "masked")
        self.dead_out = metrics.RECORDS_OUT.labels("mask", "dead_letter")

    async def on_assign(self, partitions: set[int]) -> None:
        """The window of newly assigned partitions, read in full before their first record:
        a broker restart or a slow changelog is waited out (backoff), never skipped."""
        if self.dedup is not None:
            dedup = self.dedup
            loaded = await retry_forever(
                lambda: asyncio.to_thread(dedup.load, partitions),
                "restoring the dedup window",
                log,
                retry_on=(TransientError,),
                label="dedup restore",
            )
            dedup.install(loaded)

    async def on_revoke(self, partitions: set[int]) -> None:
        await super().on_revoke(partitions)
        if self.dedup is not None:
            self.dedup.forget(partitions)

    async def on_lost(self, partitions: set[int]) -> None:
        await super().on_lost(partitions)
        if self.dedup is not None:
            self.dedup.forget(partitions)

    async def rolled_back(self, in_doubt: bool) -> None:
        self.boundaries += 1
        self.counts = dict.fromkeys(self.counts, 0)
        self.dead = []
        if self.dedup is not None:
            self.dedup.rollback()
            if in_doubt:  # the ids of a transaction that committed after all must stay
                await self.on_assign(self.source.assigned_now())

    def before_commit(self) -> None:
        if self.dedup is not None:
            self.dedup.flush(self.producer.produce)

    def committed(self, offsets: dict[tuple[str, int], int]) -> None:
        self.boundaries += 1
        self.prune(offsets)
        self.masked_out.inc(self.counts["masked"])
        self.dead_out.inc(self.counts["dead_letter"])
        if self.counts["duplicate"]:
            metrics.DUPLICATES_DROPPED.inc(self.counts["duplicate"])
        for reason, message_id in self.dead:
            metrics.count_dead_letter("mask", reason, message_id)
        self.counts = dict.fromkeys(self.counts, 0)
        self.dead = []
        if self.dedup is not None:
            self.dedup.commit()

    async def store_new_keys(self) -> None:
        """Per-user key mode: the data keys made so far are stored (durable in PostgreSQL).

        Called at the start of every commit, before the transaction commits: a masked record
        becomes visible (read_committed) only once the data key it was sealed under is stored.
        Records of an open transaction are invisible and vanish if it aborts, so the keys of
        all its batches go in one write per transaction (not one per batch), on the commit's
        task, while the next batch is transformed. PostgreSQL down holds the commit (retried).
        """
        if self.keystore is not None:
            await retry_forever(
                self.keystore.flush, "store new data keys", log, self.settings.retry_max_backoff, label="key store"
            )

    async def _handle(self, batch: Batch) -> None:
        messages = self.source.live(batch) if batch.messages else []
        began = time.monotonic()
        inputs, partitions, positions, heads = self.read(messages)
        if messages:  # schema ids not seen before: fetched once (a registry that is down is waited out)
            await self.codecs.raw.resolve(heads, self.settings.retry_max_backoff)
        # The transform runs while the previous transaction commits on its thread.
        ledger = self.ledger_version()
        outputs = self.transform.batch(inputs) if messages else []
        async with self.lock:
            await self.settle()
            if messages and self.ledger_version() != ledger:  # an erasure arrived meanwhile: apply it
                outputs = self.transform.batch(inputs)
            if messages:
                now = self.live_now(batch, messages)
                if len(now) != len(messages):
                    keep = {id(m) for m in now}
                    outputs = [o for m, o in zip(messages, outputs, strict=True) if id(m) in keep]
                    messages = now
                    _, partitions, positions, _ = self.read(messages)
                if messages:
                    try:
                        self._produce(messages, outputs, partitions, positions)
                    except Abort as abort:
                        await self.aborted(abort)
                        return
                    metrics.LIVENESS.started()
                    self.batches += 1
                    self.in_.inc(len(messages))
                    self.size_.observe(len(messages))
                    self.seconds_.observe(time.monotonic() - began)
                    fault_point("mask_after_produce")
                    await fault_hang("mask_after_produce")  # a transaction left open (tests kill it)
            producer = self.producer
            if batch.ends and (producer.open or not messages) and self.advance(batch, self.offsets):
                producer.begin()  # past transaction markers too (an offsets-only transaction when idle)
            if producer.open and (
                producer.records >= self.settings.commit_records
                or time.monotonic() - producer.began >= self.settings.commit_interval
            ):
                offsets, self.offsets = self.offsets, {}
                try:
                    self.before_commit()
                except Abort as abort:
                    await self.aborted(abort)
                    return
                self.in_flight = asyncio.ensure_future(self._commit(offsets))

    async def commit_now(self) -> None:
        await self.store_new_keys()
        await super().commit_now()

    async def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        await self.store_new_keys()  # before the commit: no record visible before its data key is stored
        await self.blocking(lambda: self.commit_sync(offsets), "commit transaction")
        self.committed(offsets)
        for _ in range(self.batches):
            metrics.LIVENESS.finished()
        self.batches = 0

    def _produce(
        self, messages: list[Message], outputs: list[Any], partitions: list[int], positions: list[int]
    ) -> None:
        """Queue a batch's outputs in the open transaction; per record only what each needs.

        A masked record that fits goes straight to the producer; dead letters, erased users'
        records, records over the topic's limit and inputs the broker refused before take
        the slow path (``_special``).
        """
        s = self.settings
        producer = self.producer
        producer.begin()
        topic = s.raw_topic
        offsets = self.offsets
        # Each record's partition and offset (``partitions``, ``positions``: read once, with the
        # batch) serve the offsets and the dedup window. The last one per partition wins.
        for partition, offset in dict(zip(partitions, positions, strict=True)).items():
            offsets[(topic, partition)] = offset + 1
        keep = self._admitted(messages, outputs, partitions, positions) if self.dedup is not None else None
        masked_topic = s.masked_topic
        masked_limit = self.limits.get(masked_topic, 1 << 62)
        refused = self.refused
        if (keep is None or all(keep)) and not refused and _plain(outputs, masked_limit):
            # The usual batch, checked in C loops: every record masked and within the limit.
            producer.produce_many(masked_topic, outputs, Positions(partitions, positions))
            self.counts["masked"] += len(outputs)
            producer.poll()
            return
        masked: list[Any] = []  # produced in the inputs' order
        sources: list[tuple[int, int]] = []
        for i, out in enumerate(outputs):
            if keep is not None and not keep[i]:
                continue
            key, value, reason = out
            if reason or refused or len(key) + len(value) > masked_limit:
                if masked:  # the order outputs go out in is the inputs' order
                    producer.produce_many(masked_topic, masked, sources)
                    self.counts["masked"] += len(masked)
                    masked, sources = [], []
                self._special(messages[i], out)
                continue
            masked.append(out)
            sources.append((partitions[i], positions[i]))
        if masked:
            producer.produce_many(masked_topic, masked, sources)
            self.counts["masked"] += len(masked)
        producer.poll()

    def _admitted(
        self, messages: list[Message], outputs: list[Any], partitions: list[int], positions: list[int]
    ) -> list[bool] | None:
        """The dedup window's verdict on each record of the batch, ``None`` when every one is
        written (the usual batch); a copy is counted, not written."""
        assert self.dedup is not None

        def redrive(i: int) -> bool:
            return any(header[0] == REDRIVE_HEADER for header in messages[i].headers() or ())

        keep = self.dedup.admit_records(messages, outputs, partitions, positions, redrive)
        if keep is not None:
            self.counts["duplicate"] += keep.count(False)
        return keep

    def _special(self, message: Message, out: Any) -> None:
        """One record off the fast path: an erased user's (dropped), a dead letter, or one that
        does not fit the masked topic or the broker refused before (dead-lettered ``too_large``)."""
        reason = out.reason
        if reason == ERASED:  # an erased user's record: dropped, never dead-lettered
            self.counts["erased"] += 1
            return
        s = self.settings
        source = (cast(int, message.partition()), cast(int, message.offset()))
        record: tuple = (s.dlq_topic, out.key, out.value) if reason else (s.masked_topic, out.key, out.value)
        fixed = self.fit(record, source, self.codecs)
        if fixed is not record:
            record, reason = fixed, reason or "too_large"
        if reason:
            self.counts["dead_letter"] += 1
            self.dead.append((reason, record[1]))
            log.info("dead-lettered a record: %s", reason, extra={"stage": "mask", "reason": reason})
            kind, timestamp = message.timestamp()  # the DLQ's retention counts from the raw record's
            ts = timestamp if kind != TIMESTAMP_NOT_AVAILABLE else 0
            self.producer.produce(record[0], record[1], record[2], source, ts)
        else:
            self.counts["masked"] += 1
            self.producer.produce(record[0], record[1], record[2], source)


class SinkWriter(StageWriter):
    """Rows into PostgreSQL, then the batch's dead letters and offsets in one Kafka transaction.

    Two batches overlap: batch N's transaction commits on a thread while batch N+1's rows
    are written (the transaction is mostly waiting on the broker: in series it added
    4-14 ms to every batch). The order rules:

    - a batch's transaction begins only once its rows are committed in PostgreSQL and the
      batch before it has ended: one transaction at a time, offsets committed in order;
    - a transaction that aborts rewinds every assigned partition at once (``aborted``); a
      batch taken before that commits nothing (``aborts`` moved) and is read again with
      the rest. Its rows may be written twice: the write is idempotent by message id;
    - at most two batches in flight, one writing rows and one committing (``make_room``),
      so a revoke finishes both within its bound and an erasure waits for both
      (``boundary_mark``).
    """

    stage = "sink"

    def __init__(
        self,
        settings: Settings,
        source: KafkaSource,
        producer: TransactionalProducer,
        sink_stage: SinkStage,
        database: PostgresSink,
    ) -> None:
        super().__init__(settings, source, producer)
        self.sink_stage = sink_stage
        self.codecs = sink_stage.codecs
        self.database = database
        self.pending = 0  # batches begun and not ended (written and committed, aborted or dropped)
        self.turn: asyncio.Event | None = None  # set once the last batch's rows are written and the one before ended

    def boundary_mark(self) -> int | None:
        return self.boundaries + self.pending - 1 if self.pending else None

    async def make_room(self) -> None:
        """Wait until the last batch's rows are written and the batch before it has ended:
        then one batch commits while the next one writes its rows, never more."""
        if self.turn is not None:
            await self.turn.wait()
        if self.in_flight is not None and self.in_flight.done():
            await self.settle()  # a batch that raised (a bug) raises here

    async def _handle(self, batch: Batch) -> None:
        messages = self.source.live(batch) if batch.messages else []
        if not messages and not batch.ends:
            return
        inputs, partitions, positions, heads = self.read(messages)
        if messages:
            await self.codecs.masked.resolve(heads, self.settings.retry_max_backoff)
        ledger = self.ledger_version()
        plan = self.sink_stage.plan(inputs)  # while the last batch writes
        async with self.lock:
            await self.make_room()
            now = self.live_now(batch, messages)
            moved = len(now) != len(messages)  # records of a partition that moved meanwhile dropped
            if moved:
                inputs, partitions, positions, _ = self.read(now)
            if moved or self.ledger_version() != ledger:  # or an erasure arrived meanwhile
                plan = self.sink_stage.plan(inputs)
            topic = self.source.topic  # the one topic the stage reads; the last offset per partition wins
            offsets = {(topic, p): o + 1 for p, o in zip(partitions, positions, strict=True)}
            if not self.advance(batch, offsets) and not now:
                return
            metrics.LIVENESS.started()
            self.in_.inc(len(now))
            ahead, turn = self.in_flight, asyncio.Event()
            self.turn = turn
            self.pending += 1
            self.in_flight = asyncio.ensure_future(
                self._write(plan, offsets, now, time.monotonic(), ahead, turn, self.aborts)
            )

    async def _write(
        self,
        batch: Any,
        offsets: dict[tuple[str, int], int],
        messages: list[Message],
        began: float,
        ahead: asyncio.Future | None,
        turn: asyncio.Event,
        aborts: int,
    ) -> None:
        """One batch: its rows, then (after the batch ``ahead`` ended) its Kafka transaction,
        unless a transaction aborted since the batch was taken (``aborts``)."""
        s = self.settings
        ended = False
        try:
            try:
                fault_point("sink_before_commit")
                await fault_hang("sink_before_commit")
                refused = (
                    await retry_forever(
                        lambda: self.database.write_batch(batch.rows, batch.deletes),
                        f"write {len(batch.rows)} rows and {len(batch.deletes)} deletes",
                        log,
                        s.retry_max_backoff,
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
                dead = batch.dead + self.sink_stage.refused(batch, refused)
                if ahead is not None:  # waited for, never cancelled with this batch
                    await asyncio.wait([ahead])
                    ahead.result()  # the batch before raised (a bug): so does this one
                fault_point("sink_after_commit")  # no transaction of this stage open
            finally:
                turn.set()
            if self.aborts != aborts:  # rewound since this batch was taken: it is read again
                return
            records = [
                self.fit((s.dlq_topic, key, value), (-1, i), self.codecs) for i, (key, value, _) in enumerate(dead)
            ]

            def transaction() -> None:
                producer = self.producer
                producer.begin()
                for i, (topic, key, value) in enumerate(records):
                    producer.produce(topic, key, value, (-1, i))
                fault_stall("sink_after_commit", s.commit_timeout + 2)  # a transaction that never answers
                producer.commit(offsets, self.source.group_metadata())

            try:
                await self.blocking(transaction, "commit transaction")
            except Abort as abort:
                ended = True
                metrics.LIVENESS.finished()
                await self.aborted(abort)
                return
            for key, _, reason in dead:
                metrics.count_dead_letter("sink", reason, key)
            metrics.RECORDS_OUT.labels("sink", "row").inc(len(batch.rows) - len(refused))
            metrics.RECORDS_OUT.labels("sink", "deleted").inc(len(batch.deletes))
            metrics.RECORDS_OUT.labels("sink", "dead_letter").inc(len(dead))
            refused_ids = {row["message_id"] for row, _ in refused}
            metrics.observe_many(
                metrics.END_TO_END,
                [
                    max(committed_at - row["sent_at"].timestamp(), 0.0)
                    for row in batch.rows
                    if row["message_id"] not in refused_ids
                ],
            )
            self.size_.observe(len(messages))
            self.seconds_.observe(time.monotonic() - began)
        finally:
            if not ended:
                metrics.LIVENESS.finished()
            self.pending -= 1
            self.boundaries += 1
