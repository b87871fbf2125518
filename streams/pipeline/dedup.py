"""The mask stage's window of message ids it has written: a bridge copy is dropped, a replay is not.

The bridge cannot be transactional (SQS is not): killed between its produce and the SQS
delete, it puts a second raw record with the same ``message_id`` (and key, so the same
partition) on the raw topic. The mask stage remembers, per raw partition, the offset and
raw timestamp of every ``message_id`` it wrote within ``STREAMS_DEDUP_WINDOW`` seconds
of raw-record time (not wall-clock time, so a backlog does not fill it), and drops a
record whose id it wrote **at an earlier offset**. The same record read again (a
rewind, a crash, ``streams replay``) has the same offset and is processed again.

State is per partition, restored on assignment from a time-bounded changelog topic with
the raw topic's partitioning (``<raw topic>.mask-dedup``, topics as code in
``streams.ops.topics``), written inside the mask stage's transaction: what the changelog
holds is exactly what was committed. An aborted transaction undoes its changes in memory
(``rollback``).

**Changelog format.** One record per transaction and partition (``flush``, just before
the commit), holding every id that transaction admitted on that partition, not one record
per id: the changelog then costs the stage a handful of records per commit instead of one
per input. Its key is unique (``0xff``, first offset, time), so compaction keeps every
batch and the delete retention ages them out; its value is ``0xff 0x01``, a count, and
``offset, raw timestamp, id length, id`` per id (``ITEM``, ``decode``). A record of the
earlier format (key = the id, value = offset and timestamp, 16 bytes) is still read on
restore, so a deployment moves over without a step.

**Memory.** The window keeps a 90-bit fingerprint of each id, not the id (the changelog
keeps the ids, so a restore reads existing changelogs unchanged): per partition a ``dict``
of fingerprint to one ``int`` (raw timestamp << 64 | offset) and a ``deque`` of the
fingerprints in admission order, which expiry pops from the front (an id admitted again is
appended again; its earlier place is skipped). The dicts, and the undo log's tuples, hold
only ints, so the garbage collector does not track them. 163 bytes per id held at the default
bound on 6 partitions, at most ~208 (a dict just regrown under churn: 6 slots per id);
the ``OrderedDict`` of the id to a tuple it replaces took ~330 (benchmarks.dedup_window).

The fingerprint is Python's 64-bit ``hash`` of the id (SipHash, keyed at random per
process: the state is rebuilt from the changelog's ids in each process) and 26 bits of
its CRC-32. Two ids share it with probability 2^-90: with 200,000 ids held in one
partition, a new id is taken for a copy of one (and dropped) with probability 1.6e-22;
at 50,000 ev/s that is 2.6e-10 records a year. The hash alone (64 bits) would be 1.1e-14
per id, 0.017 records a year at that rate: not negligible for a record lost. A BLAKE2b
digest costs three times the fingerprint's ~0.15 µs.

It is bounded by ``STREAMS_DEDUP_MAX_IDS`` and ``STREAMS_DEDUP_MAX_BYTES``; an id
forgotten early under those bounds is counted (``streams_dedup_evictions_total``): a copy
of it is no longer caught. That, and a replay older than the window, are the limits of
the guarantee (docs/delivery.md).

**Compiled core.** ``dedup_window`` picks ``CoreDedupWindow`` (``streams_core.DedupWindow``,
core/src/dedup.rs) when the extension is built and gives this reference's verdicts,
changelog and state on a probe, else ``DedupWindow`` here, the reference
(``STREAMS_REQUIRE_CORE=1``: an error instead). Same state, rules and changelog bytes
(tests/unit/test_dedup_core.py drives both with the same random operations); a 128-bit
fingerprint (two keyed SipHash-1-3 digests: 2^-128 per pair, 9e-22 records a year at
50,000 ev/s with 200,000 held); ~94 bytes per id held instead of ~163, and ~0.3 µs of
CPU per admitted id at the bound instead of ~2 (benchmarks.dedup_window). The changelog's
keys, its reading and the metrics stay in Python (``_Changelog``).
"""

from __future__ import annotations

import abc
import logging
import operator
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from streams import metrics
from streams.errors import ConfigError, TransientError
from streams.io.kafka import metadata_consumer
from streams.ops.topology import changelog_topic
from streams.settings import Settings

log = logging.getLogger("streams.worker")

REDRIVE_HEADER = "streams-redrive"  # a record `streams dlq redrive` put back: reprocessed, never a copy
ENTRY = struct.Struct(">qq")  # the earlier format's value: offset, raw timestamp (ms)
ENTRY_BYTES = 216  # per id held: at most 84 in objects + 120 in a dict under churn, and slack (test_dedup.py)
OFFSET_BITS = 64  # a held entry is one int: raw timestamp << 64 | offset (an offset is 0 .. 2**63 - 1)
OFFSET_MASK = (1 << OFFSET_BITS) - 1
MAGIC = b"\xff\x01"  # a batch value; an earlier entry starts with an offset's high byte (0x00)
HEADER = struct.Struct(">2sI")  # magic, count
ITEM = struct.Struct(">qqH")  # offset, raw timestamp (ms), id length; the id follows
BATCH_KEY = struct.Struct(">cqq")  # 0xff, first offset, time (ns): unique, so compaction keeps each batch
CHUNK_BYTES = 64 * 1024  # a changelog record holds at most this much (far under any topic's limit)
MAX_ID_BYTES = 1024  # longer ids (only a dead letter's fallback id can be) are not remembered
Entry = tuple[int, int]
_KEY = operator.itemgetter(0)  # an output's key: the message id
Produce = Callable[[str, bytes | None, bytes | None, tuple[int, int], int, int], None]


def _chunks(parts: list[bytes]) -> list[tuple[int, int]]:
    """``(start, end)`` of each changelog record's items: each at most ``CHUNK_BYTES`` (or one item)."""
    if not parts:
        return []  # a partition whose records of the transaction were all copies or replays
    if HEADER.size + sum(map(len, parts)) <= CHUNK_BYTES:
        return [(0, len(parts))]  # a transaction's ids on one partition, usually
    chunks = []
    start = 0
    while start < len(parts):
        end, size = start, HEADER.size
        while end < len(parts) and (end == start or size + len(parts[end]) <= CHUNK_BYTES):
            size += len(parts[end])
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def decode(key: bytes | None, value: bytes | None) -> list[tuple[bytes, Entry]]:
    """The ``(id, (offset, raw timestamp))`` of one changelog record, either format; [] if unreadable."""
    if not value:
        return []
    if value[:2] != MAGIC:
        return [(key, ENTRY.unpack(value))] if key and len(value) == ENTRY.size else []  # the earlier format
    out = []
    try:
        _, count = HEADER.unpack_from(value)
        at = HEADER.size
        for _ in range(count):
            offset, timestamp, length = ITEM.unpack_from(value, at)
            at += ITEM.size
            out.append((value[at : at + length], (offset, timestamp)))
            at += length
    except struct.error:
        return []
    return out


def fingerprint(key: bytes) -> int:
    """What the window holds of an id: 90 bits, Python's keyed 64-bit hash and 26 of its CRC-32.

    An int of 36 bytes (a UUID's bytes object takes 69); ~0.15 µs, a third of BLAKE2b's.
    ``hash`` is SipHash with a key random per process (state is rebuilt from the changelog's
    ids in each process): the module docstring has the collision odds.
    """
    return hash(key) + (zlib.crc32(key) >> 6 << 64)


class Held:
    """One partition's ids: fingerprint -> ``timestamp << 64 | offset``, and the fingerprints oldest first.

    An id admitted again is appended again (``OrderedDict.move_to_end`` without its linked
    list); ``moved`` counts its earlier places still in ``order``, which expiry skips.
    """

    __slots__ = ("partition", "ids", "order", "moved")

    def __init__(self, partition: int, ids: dict[int, int] | None = None) -> None:
        self.partition = partition
        self.ids: dict[int, int] = ids if ids is not None else {}
        self.order: deque[int] = deque(self.ids)
        self.moved: dict[int, int] = {}

    def entries(self) -> Iterator[tuple[int, int, int]]:
        """``(fingerprint, offset, raw timestamp)`` of each id held, oldest first (the expiry order)."""
        skip = dict(self.moved)
        for d in self.order:
            if skip.get(d):
                skip[d] -= 1
                continue
            packed = self.ids[d]
            yield d, packed & OFFSET_MASK, packed >> OFFSET_BITS

    def compact(self) -> None:
        """Drop the skipped places (between transactions: ``rollback`` replays ``order``'s changes)."""
        self.order = deque(d for d, _, _ in self.entries())
        self.moved = {}


ADMITTED, EXPIRED = 0, 1  # what an undo entry undoes


class _Changelog(abc.ABC):
    """What both windows share: their bounds, the changelog topic, its reading (``load``)
    and its writing (``_write``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = changelog_topic(settings)
        self.window_ms = int(settings.dedup_window * 1000)
        self.max_ids = settings.dedup_max_ids
        self.max_bytes = settings.dedup_max_bytes
        self.limit = min(self.max_ids, self.max_bytes // ENTRY_BYTES)  # over it: evict

    def _write(self, records: list[tuple[int, int, bytes]], produce: Produce) -> int:
        """Produce ``(partition, first offset, value)`` changelog records; how many."""
        for partition, first_offset, value in records:
            key = BATCH_KEY.pack(b"\xff", first_offset, time.time_ns())
            # The raw partition's changelog partition (restore reads it for that partition);
            # the source (partition, -1) is the output of no input record.
            produce(self.topic, key, value, (partition, -1), 0, partition)
        return len(records)

    def install(self, loaded: dict[int, list[tuple[bytes, Entry]]]) -> None:
        """Make what ``load`` read the state of its partitions (on the event loop)."""
        for p, entries in loaded.items():
            ids, evicted = self._install(p, entries)
            metrics.DEDUP_EVICTIONS.inc(evicted)
            log.info("dedup window of partition %d restored: %d ids", p, ids, extra={"stage": "mask"})

    @abc.abstractmethod
    def _install(self, p: int, entries: list[tuple[bytes, Entry]]) -> tuple[int, int]:
        """Make ``entries`` the state of partition ``p``: ``(ids held, ids evicted)``."""

    def load(self, partitions: set[int]) -> dict[int, list[tuple[bytes, Entry]]]:
        """Read the changelog of newly assigned partitions (read_committed) up to their ends;
        blocking, for a thread.

        All or nothing: a partial window would let bridge copies through, so anything short
        of every partition read to its end raises ``TransientError`` (the caller retries).
        """
        loaded: dict[int, list[tuple[bytes, Entry]]] = {p: [] for p in partitions}
        if not partitions:
            return loaded
        consumer = metadata_consumer(
            self.settings, None, **{"enable.partition.eof": True, "isolation.level": "read_committed"}
        )
        try:
            try:
                meta = consumer.list_topics(self.topic, timeout=self.settings.kafka_timeout).topics.get(self.topic)
                if meta is None or meta.error is not None:
                    raise TransientError(f"dedup changelog {self.topic}: no metadata ({meta and meta.error})")
                missing = set(partitions) - set(meta.partitions)
                if missing:
                    raise TransientError(f"dedup changelog {self.topic}: {len(missing)} partitions not in its metadata")
                remaining = set()
                for p in sorted(partitions):
                    low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)
                    if high > low:
                        remaining.add(p)
            except KafkaException as exc:
                raise TransientError(f"dedup changelog {self.topic}: {exc.args[0].name()}") from None
            if remaining:
                consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(remaining)])
            while remaining:
                msg = consumer.poll(30)
                if msg is None:
                    raise TransientError(f"dedup changelog {self.topic}: no record nor end within 30 s")
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise TransientError(f"dedup changelog {self.topic}: {err.name()}")
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(msg.partition())
                    continue
                loaded[cast(int, msg.partition())].extend(decode(msg.key(), msg.value()))
        finally:
            consumer.close()
        return loaded


class DedupWindow(_Changelog):
    """The window in Python: the reference (``CoreDedupWindow`` must match it, the
    differential test checks), and the fallback without the compiled core."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.state: dict[int, Held] = {}
        self.newest: dict[int, int] = {}  # newest raw timestamp seen per partition
        self.size = 0  # ids held over all partitions
        # Changes since the last commit, to undo on abort, in order: (ADMITTED, partition, fingerprint,
        # entry before or None) or (EXPIRED, partition, fingerprint, entry or None for a skipped place).
        # Ints only: the garbage collector stops tracking such tuples (one holding ``Held`` made a
        # transaction's undo log survive every young collection: +0.5 µs per event).
        self.undo: list[tuple[int, int, int, int | None]] = []
        # Ids admitted in the open transaction, not yet on the changelog: each one's changelog
        # item (``ITEM`` and the id), made at once (no tuple to keep until the flush).
        self.pending: dict[int, list[bytes]] = {}
        self.admitted = 0  # ids admitted so far (a periodic expiry)

    def admit(self, partition: int, offset: int, key: bytes | None, timestamp: int, force: bool = False) -> bool:
        """Whether to write this record's output; remembers the id (its changelog entry goes out in ``flush``).

        ``force``: a deliberate re-send (a redrive) at a later offset is written, and remembered.
        """
        return self.admit_batch([partition], [offset], [key], [timestamp], lambda _: force)[0]

    def admit_records(
        self,
        messages: Sequence[Any],
        outputs: Sequence[Sequence[Any]],
        partitions: list[int],
        offsets: list[int],
        redrive: Callable[[int], bool],
    ) -> list[bool] | None:
        """``admit_batch`` on the mask stage's batch: each output's key (the message id) and
        each input's raw timestamp; ``None`` when every record is to be written (the usual batch)."""
        keep = self.admit_batch(
            partitions, offsets, list(map(_KEY, outputs)), [m.timestamp()[1] for m in messages], redrive
        )
        return None if all(keep) else keep

    def admit_batch(
        self,
        partitions: Sequence[int],
        offsets: Sequence[int],
        keys: Sequence[bytes | None],
        timestamps: Sequence[int],
        redrive: Callable[[int], bool],
    ) -> list[bool]:
        """``admit`` for each record of a batch, in order: whether to write each one's output.

        ``redrive(i)``: record ``i`` is a deliberate re-send (``streams dlq redrive``): at a
        later offset it is still written, and remembered. One call per batch, not per record:
        the per-record Python work is a fingerprint and a few dictionary operations
        (benchmarks.dedup_window).
        """
        out: list[bool] = []
        write = out.append
        window_ms, limit = self.window_ms, self.limit
        crc32 = zlib.crc32
        bits, mask = OFFSET_BITS, OFFSET_MASK
        undo = self.undo.append
        state, newest_of, pending_of = self.state, self.newest, self.pending
        current = -1
        held = Held(-1)
        ids, append = held.ids, held.order.append
        pending: list[bytes] | None = None
        item = ITEM.pack
        newest = -1
        size, admitted, evicted = self.size, self.admitted, 0
        for i, key in enumerate(keys):
            if not key or len(key) > MAX_ID_BYTES:
                write(True)
                continue
            partition, offset, timestamp = partitions[i], offsets[i], timestamps[i]
            if partition != current:
                if current >= 0:
                    newest_of[current] = newest
                current = partition
                held = state.get(partition)  # type: ignore[assignment]
                if held is None:
                    held = state[partition] = Held(partition)
                ids, append = held.ids, held.order.append
                newest = newest_of.get(partition, -1)
                pending = pending_of.get(partition)  # made at its first id: the changelog's order
            if timestamp > newest:
                newest = timestamp
            d = hash(key) + (crc32(key) >> 6 << 64)  # fingerprint(key)
            seen = ids.get(d)
            if seen is not None and seen >> bits >= newest - window_ms:  # older: forgotten, even if not yet removed
                seen_offset = seen & mask
                if seen_offset < offset:
                    if not redrive(i):
                        write(False)  # a later copy of an id already written
                        continue
                elif seen_offset == offset:
                    write(True)  # the same record again (a replay, a rewind): reprocess it
                    continue
            undo((ADMITTED, partition, d, seen))
            ids[d] = timestamp << bits | offset
            append(d)  # expiry goes front to back: the newest at the back
            if seen is None:
                size += 1
            else:
                held.moved[d] = held.moved.get(d, 0) + 1  # its earlier place is skipped
            if pending is None:
                pending = pending_of[partition] = []
            pending.append(item(offset, timestamp, len(key)) + key)
            admitted += 1
            # Over a bound: at once. Past the window: every 256 ids (until then such an id only
            # takes memory; the check above already treats it as forgotten).
            if size > limit or not admitted & 255:
                self.size, newest_of[partition] = size, newest
                evicted += self._expire(held)
                size = self.size
            write(True)
        if current >= 0:
            newest_of[current] = newest
        self.size, self.admitted = size, admitted
        if evicted:
            metrics.DEDUP_EVICTIONS.inc(evicted)  # once a batch: the counter takes a lock
        return out

    def _expire(self, held: Held) -> int:
        """Forget ids from the front: past the window, or over the bound. The ids forgotten
        inside the window (over the bound): ``streams_dedup_evictions_total`` counts them."""
        evicted = 0
        oldest_kept = self.newest.get(held.partition, 0) - self.window_ms
        partition, ids, order, moved, undo = held.partition, held.ids, held.order, held.moved, self.undo.append
        size, limit = self.size, self.limit
        while order:
            d = order[0]
            if moved and d in moved:  # an earlier place of an id admitted again since
                order.popleft()
                if moved[d] == 1:
                    del moved[d]
                else:
                    moved[d] -= 1
                undo((EXPIRED, partition, d, None))
                continue
            entry = ids[d]
            if entry >> OFFSET_BITS >= oldest_kept:
                if size <= limit:
                    break
                evicted += 1  # forgotten inside the window: a copy is no longer caught
            order.popleft()
            del ids[d]
            size -= 1
            undo((EXPIRED, partition, d, entry))
        self.size = size
        return evicted

    def flush(self, produce: Produce) -> int:
        """Write what the open transaction admitted: one changelog record per partition
        (more only past ``CHUNK_BYTES``), in that transaction, just before its commit. Records written."""
        records = [
            (partition, ITEM.unpack_from(parts[start])[0], HEADER.pack(MAGIC, end - start) + b"".join(parts[start:end]))
            for partition, parts in self.pending.items()
            for start, end in _chunks(parts)
        ]
        self.pending = {}
        return self._write(records, produce)

    def commit(self) -> None:
        self.undo.clear()
        self.pending = {}
        for held in self.state.values():
            if len(held.order) > 2 * len(held.ids) + 1024:  # many ids admitted again (redrives, replays)
                held.compact()

    def rollback(self) -> None:
        """Undo every change since the last commit (the transaction was aborted), newest first:
        each partition's ``order`` is back as it was, place for place."""
        state = self.state
        for kind, partition, d, before in reversed(self.undo):
            held = state[partition]  # a partition revoked or restored since took its entries along
            if kind == ADMITTED:
                held.order.pop()
                if before is None:
                    del held.ids[d]
                    self.size -= 1
                else:
                    held.ids[d] = before
                    skipped = held.moved[d]
                    if skipped == 1:
                        del held.moved[d]
                    else:
                        held.moved[d] = skipped - 1
            else:
                held.order.appendleft(d)
                if before is None:
                    held.moved[d] = held.moved.get(d, 0) + 1
                else:
                    held.ids[d] = before
                    self.size += 1
        self.undo.clear()
        self.pending = {}

    def forget(self, partitions: set[int]) -> None:
        """Partitions that left this worker: their state goes with them (and their undo entries)."""
        for p in partitions:
            held = self.state.pop(p, None)
            if held is not None:
                self.size -= len(held.ids)
            self.newest.pop(p, None)
        self._drop_undo(partitions)

    def _drop_undo(self, partitions: Container[int]) -> None:
        if any(entry[1] in partitions for entry in self.undo):
            self.undo = [entry for entry in self.undo if entry[1] not in partitions]

    def entries(self, partition: int) -> list[tuple[int, int, int]]:
        """``(fingerprint, offset, raw timestamp)`` of each id held for ``partition``, oldest first."""
        held = self.state.get(partition)
        return list(held.entries()) if held is not None else []

    def partitions(self) -> list[int]:
        """The partitions with state (a record with an id was read on each), in order."""
        return sorted(self.state)

    def _install(self, p: int, entries: list[tuple[bytes, Entry]]) -> tuple[int, int]:
        self._drop_undo({p})  # the state they undo is replaced
        newest = max((e[1] for _, e in entries), default=0)
        ids: dict[int, int] = {}
        for key, (offset, timestamp) in sorted(entries, key=lambda item: item[1][1]):
            if timestamp >= newest - self.window_ms:
                d = fingerprint(key)
                ids.pop(d, None)  # admitted again: its place is the later one
                ids[d] = timestamp << OFFSET_BITS | offset
        before = self.state.get(p)
        self.size += len(ids) - (len(before.ids) if before is not None else 0)
        held = self.state[p] = Held(p, ids)
        self.newest[p] = newest
        return len(ids), self._expire(held)


class CoreDedupWindow(_Changelog):
    """The window in compiled code (``streams_core.DedupWindow``, core/src/dedup.rs): the
    reference's state and rules, with a 128-bit fingerprint (its collision odds there) and
    ~70 bytes per id held instead of ~163 (benchmarks.dedup_window). The changelog, its
    reading and the metrics stay here."""

    def __init__(self, settings: Settings, core: Any) -> None:
        super().__init__(settings)
        self.core = core.DedupWindow(self.window_ms, self.limit)

    @property
    def size(self) -> int:
        """Ids held over all partitions."""
        return cast(int, self.core.size)

    @property
    def newest(self) -> dict[int, int]:
        """The newest raw timestamp seen per partition."""
        return cast(dict[int, int], self.core.newest)

    def admit(self, partition: int, offset: int, key: bytes | None, timestamp: int, force: bool = False) -> bool:
        return self.admit_batch([partition], [offset], [key], [timestamp], lambda _: force)[0]

    def admit_batch(
        self,
        partitions: Sequence[int],
        offsets: Sequence[int],
        keys: Sequence[bytes | None],
        timestamps: Sequence[int],
        redrive: Callable[[int], bool],
    ) -> list[bool]:
        keep, evicted = self.core.admit_batch(
            _as_list(partitions), _as_list(offsets), _as_list(keys), _as_list(timestamps), redrive
        )
        if evicted:
            metrics.DEDUP_EVICTIONS.inc(evicted)
        return [True] * len(keys) if keep is None else cast(list[bool], keep)

    def admit_records(
        self,
        messages: Sequence[Any],
        outputs: Sequence[Sequence[Any]],
        partitions: list[int],
        offsets: list[int],
        redrive: Callable[[int], bool],
    ) -> list[bool] | None:
        """The core reads each key (``outputs[i][0]``) and raw timestamp (``messages[i].timestamp()``)
        itself: no list of either is made, and a batch of new ids returns ``None``."""
        keep, evicted = self.core.admit_records(partitions, offsets, _as_list(outputs), _as_list(messages), redrive)
        if evicted:
            metrics.DEDUP_EVICTIONS.inc(evicted)
        return cast(list[bool] | None, keep)

    def flush(self, produce: Produce) -> int:
        return self._write(self.core.flush(), produce)

    def commit(self) -> None:
        self.core.commit()

    def rollback(self) -> None:
        self.core.rollback()

    def forget(self, partitions: set[int]) -> None:
        self.core.forget(list(partitions))

    def entries(self, partition: int) -> list[tuple[int, int, int]]:
        return cast(list[tuple[int, int, int]], self.core.entries(partition))

    def partitions(self) -> list[int]:
        return cast(list[int], self.core.partitions())

    def _install(self, p: int, entries: list[tuple[bytes, Entry]]) -> tuple[int, int]:
        return cast(tuple[int, int], self.core.install(p, entries))


Window = DedupWindow | CoreDedupWindow


def _as_list(values: Sequence[Any]) -> list[Any]:
    return values if isinstance(values, list) else list(values)


def dedup_window(settings: Settings, require: bool | None = None) -> Window:
    """The mask stage's window: the compiled one when the core is built and gives the
    reference's verdicts and changelog on a probe, else the reference (logged).

    ``require`` (default: ``STREAMS_REQUIRE_CORE``) turns the fallback into a ``ConfigError``.
    """
    from streams.privacy.core import REQUIRE_ENV, core_required

    if require is None:
        require = core_required()
    try:
        import streams_core

        window: Window = CoreDedupWindow(settings, streams_core)
    except (ImportError, AttributeError):
        reason = "the extension streams_core is not built or has no DedupWindow (make install builds it)"
    else:
        roomy = settings.model_copy(update={"dedup_window": 60.0, "dedup_max_ids": 1000, "dedup_max_bytes": 2**30})
        if _probe(CoreDedupWindow(roomy, streams_core)) == _probe(DedupWindow(roomy)):
            log.info("dedup window: compiled core streams_core in use", extra={"stage": "mask"})
            return window
        reason = "its verdicts or changelog differ from the reference's"
    if require:
        raise ConfigError(f"{REQUIRE_ENV}=1 but the compiled dedup window is unusable: {reason}")
    log.warning("dedup window: Python reference in use, not the compiled core: %s", reason, extra={"stage": "mask"})
    return DedupWindow(settings)


def _probe(window: Window) -> tuple:
    """A window's verdicts, changelog and state over a few records of each kind: a copy, a
    replay, a redrive, an id without memory, an abort, a restore (within any bounds: no eviction)."""
    written: list[tuple[int, bytes, int]] = []

    def produce(_topic: str, key: bytes | None, value: bytes | None, _source: tuple, _ts: int, partition: int) -> None:
        written.append((BATCH_KEY.unpack(cast(bytes, key))[1], cast(bytes, value), partition))

    verdicts = [
        window.admit_batch(
            [0, 0, 0, 1, 0], [1, 2, 1, 1, 3], [b"a", b"a", b"a", b"a", None], [5, 6, 5, 5, 7], lambda _: False
        ),
        window.admit_batch([0, 0], [4, 5], [b"a", b"a"], [8, 9], lambda i: i == 0),
    ]
    window.flush(produce)
    window.commit()
    verdicts.append(window.admit_batch([0], [6], [b"b"], [10], bool))
    window.rollback()
    window._install(2, [(b"x", (5, 10)), (b"y", (6, 10)), (b"x", (7, 20))])
    state = [[(o, t) for _, o, t in window.entries(p)] for p in window.partitions()]
    return verdicts, written, state, window.size
