"""The sink writes batch N+1's rows while batch N's Kafka transaction commits, and keeps the order rules.

``SinkWriter`` with stand-ins for its consumer, producer and database (the real ones are
in the integration tests, e.g. ``test_faults.py``): only the ordering logic is under test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Any

from streams import metrics
from streams.pipeline.sink import SinkBatch
from streams.pipeline.source import Batch
from streams.pipeline.stages import SinkWriter
from streams.pipeline.transactions import Abort
from streams.privacy.ledger import ErasedUsers, LedgerWatch
from streams.settings import Settings

TOPIC = "masked"
SENT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DEADLINE = 5.0


@dataclass
class Record:
    """What the writer reads of a consumed record."""

    partition_: int
    offset_: int

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes:
        return f"m-{self.partition_}-{self.offset_}".encode()

    def value(self) -> bytes:
        return b"v"


class Source:
    """The consumer: every partition live until a rewind, which makes every batch read before it stale."""

    topic = TOPIC

    def __init__(self) -> None:
        self.rewinds = 0

    def live(self, batch: Batch) -> list:
        return [m for m in batch.messages if not self.stale(batch)]

    def stale(self, batch: Batch) -> set[int]:
        return {p for p, n in batch.incarnations.items() if n != self.rewinds}

    def is_live(self, partition: int, incarnation: int) -> bool:
        return incarnation == self.rewinds

    def rewind(self) -> None:
        self.rewinds += 1

    def group_metadata(self) -> Any:
        return None

    def finished(self, batch: Batch) -> None:
        pass

    def batch(self, partition: int, first: int, count: int) -> Batch:
        """``count`` records of ``partition`` from offset ``first``, read now."""
        messages = [Record(partition, first + i) for i in range(count)]
        return Batch(messages, {partition: self.rewinds}, ends={partition: first + count})


@dataclass
class Producer:
    """A transaction per call; each commit waits for a ``release``; ``fail`` makes the next one abortable."""

    transactional_id: str = "t"
    open: bool = False
    refused: dict = field(default_factory=dict)
    committed: list[dict] = field(default_factory=list)  # offsets of each committed transaction, in order
    aborted: int = 0
    releases: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    committing: threading.Event = field(default_factory=threading.Event)  # a commit is waiting for a release
    fail: bool = False

    def begin(self) -> None:
        self.open = True

    def produce(self, *args: Any) -> None:
        pass

    def commit(self, offsets: dict, group_metadata: Any) -> None:
        self.committing.set()
        assert self.releases.acquire(timeout=DEADLINE), "the test never released the commit"
        self.committing.clear()
        if self.fail:
            self.fail = False
            raise Abort("commit transaction: an abortable error")
        self.open = False
        self.committed.append(dict(offsets))

    def release(self, commits: int = 1) -> None:
        self.releases.release(commits)

    def abort(self) -> None:
        self.open = False
        self.aborted += 1

    def poll(self) -> None:
        pass


class Database:
    """Records which batches (by their first message id) were written, in order; ``gate`` holds a write."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def write_batch(self, rows: list[dict], deletes: list[str]) -> list:
        await self.gate.wait()
        self.written.append(rows[0]["message_id"])
        return []


class Masked:
    async def resolve(self, values: Any, max_backoff: float) -> None:
        pass


class Codecs:
    masked = Masked()


class Stage:
    """``SinkStage``'s part the writer calls: a row per record, nothing dead-lettered."""

    codecs = Codecs()

    def plan(self, messages: list) -> SinkBatch:
        return SinkBatch(rows=[{"message_id": key.decode(), "sent_at": SENT} for key, _, _ in messages])

    def refused(self, batch: SinkBatch, refused: list) -> list:
        return []


def writer() -> tuple[SinkWriter, Source, Producer, Database]:
    source, producer, database = Source(), Producer(), Database()
    w = SinkWriter(Settings(masked_topic=TOPIC), source, producer, Stage(), database)  # type: ignore[arg-type]
    return w, source, producer, database


async def until(condition: Any, what: str) -> None:
    """Poll ``condition`` on the event loop, with a deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not condition():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_the_next_batch_is_written_while_the_last_one_commits_and_offsets_commit_in_order():
    async def go() -> None:
        w, source, producer, database = writer()
        before = metrics.LIVENESS._in_flight
        await w.handle(source.batch(0, 0, 3))
        await until(producer.committing.is_set, "batch 1's transaction")
        # Batch 1's commit is held: batch 2's rows are written meanwhile (the old sink waited).
        await asyncio.wait_for(w.handle(source.batch(0, 3, 2)), DEADLINE)
        await until(lambda: database.written == ["m-0-0", "m-0-3"], "batch 2's rows during batch 1's commit")
        assert producer.committed == [] and w.pending == 2
        producer.release(2)
        await w.settle()
        assert producer.committed == [{(TOPIC, 0): 3}, {(TOPIC, 0): 5}]  # one transaction each, in order
        assert (w.pending, w.boundaries, metrics.LIVENESS._in_flight) == (0, 2, before)

    asyncio.run(go())


def test_at_most_one_batch_writes_while_one_commits():
    async def go() -> None:
        w, source, producer, database = writer()
        await w.handle(source.batch(0, 0, 1))
        await until(producer.committing.is_set, "batch 1's transaction")
        await w.handle(source.batch(0, 1, 1))
        await until(lambda: len(database.written) == 2, "batch 2's rows")
        third = asyncio.ensure_future(w.handle(source.batch(0, 2, 1)))
        await asyncio.sleep(0.05)  # batch 3 must wait for batch 1 to end; give it a chance to run ahead
        assert not third.done() and database.written == ["m-0-0", "m-0-1"]
        producer.release(3)
        await asyncio.wait_for(third, DEADLINE)
        await w.settle()
        assert [c[(TOPIC, 0)] for c in producer.committed] == [1, 2, 3]

    asyncio.run(go())


def test_an_aborted_transaction_commits_nothing_of_the_batch_written_meanwhile():
    """Batch 1 aborts while batch 2's rows are being written: batch 2 commits no offset, every
    partition is rewound once, and both are read again (their rows may be written twice)."""

    async def go() -> None:
        w, source, producer, database = writer()
        before = metrics.LIVENESS._in_flight
        await w.handle(source.batch(0, 0, 3))
        await until(producer.committing.is_set, "batch 1's transaction")
        database.gate.clear()  # batch 2's write is under way when batch 1 aborts
        await w.handle(source.batch(0, 3, 2))
        third = source.batch(0, 5, 1)  # read before the abort, handed over after it
        producer.fail = True
        producer.release()
        await until(lambda: source.rewinds == 1, "the abort to rewind")
        database.gate.set()
        await w.settle()
        assert producer.committed == [] and producer.aborted == 1 and source.rewinds == 1
        assert database.written == ["m-0-0", "m-0-3"]
        assert (w.pending, w.boundaries, metrics.LIVENESS._in_flight) == (0, 2, before)
        # A batch read before the rewind is dropped; read again, the records commit.
        await w.handle(third)
        await w.handle(source.batch(0, 0, 6))
        producer.release()
        await w.settle()
        assert database.written == ["m-0-0", "m-0-3", "m-0-0"] and producer.committed == [{(TOPIC, 0): 6}]

    asyncio.run(go())


def test_an_abort_that_lands_just_before_the_next_batch_starts_still_stops_it():
    """The abort has begun (its producer abort still running) when batch 2 is taken: the
    rewind already made batch 2 stale, so it is not written at all."""

    async def go() -> None:
        w, source, producer, database = writer()
        await w.handle(source.batch(0, 0, 3))
        await until(producer.committing.is_set, "batch 1's transaction")
        second = source.batch(0, 3, 2)  # read before the abort
        producer.fail = True
        producer.release()
        await until(lambda: w.aborts == 1, "the abort to begin")
        await w.handle(second)
        await w.settle()
        assert producer.committed == [] and database.written == ["m-0-0"]

    asyncio.run(go())


def test_an_erasure_is_confirmed_only_once_both_batches_in_flight_ended():
    async def go() -> None:
        w, source, producer, database = writer()
        erased = ErasedUsers()
        watch = LedgerWatch("postgresql://unused", "sink", erased, w)
        await w.handle(source.batch(0, 0, 1))
        await until(producer.committing.is_set, "batch 1's transaction")
        await w.handle(source.batch(0, 1, 1))
        await until(lambda: len(database.written) == 2, "batch 2's rows")
        await watch.apply([(1, "u-gone", 0)])  # both batches were planned under version 0
        assert watch.confirm() == 0
        producer.release()
        await until(lambda: w.boundaries == 1, "batch 1 to end")
        assert watch.confirm() == 0  # batch 2 may still commit what version 0 let through
        producer.release()
        await w.settle()
        assert watch.confirm() == 1

    asyncio.run(go())


def test_observe_many_counts_as_observe_one_by_one():
    from prometheus_client import CollectorRegistry, Histogram

    def samples(h: Histogram) -> dict:
        return {
            (s.name, tuple(s.labels.items())): s.value
            for m in h.collect()
            for s in m.samples
            if "created" not in s.name
        }

    amounts = [0.0, 0.1, 0.1000001, 0.3, 5, 7.5, 3600, 3600.5, 1e9, 0.25]
    one, many = (
        Histogram("h", "h", registry=CollectorRegistry(), buckets=metrics.END_TO_END._upper_bounds[:-1])
        for _ in range(2)
    )
    for amount in amounts:
        one.observe(amount)
    metrics.observe_many(many, amounts)
    metrics.observe_many(many, [])
    assert samples(one) == samples(many)
