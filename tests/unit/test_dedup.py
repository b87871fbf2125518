"""The mask stage's dedup window, pure logic: copies dropped, replays kept, aborts undone, bounds counted,
and its changelog: one record per partition per transaction, read back to the same window."""

from __future__ import annotations

import copy
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable

import pytest

from streams import metrics
from streams.pipeline.dedup import (
    CHUNK_BYTES,
    ENTRY,
    ENTRY_BYTES,
    MAX_ID_BYTES,
    CoreDedupWindow,
    DedupWindow,
    Window,
    decode,
    fingerprint,
)
from streams.settings import Settings
from tests.unit.test_dedup_core import core_module


@pytest.fixture(params=["reference", "core"])
def make(request) -> Callable[[Settings], Window]:
    """Each test runs on the Python reference and on the compiled core's window."""
    if request.param == "reference":
        return DedupWindow
    module = core_module()
    return lambda s: CoreDedupWindow(s, module)


def window(make: Callable[[Settings], Window], **settings) -> tuple[Window, list]:
    """A window and the changelog records it wrote: ``(topic, key, value, partition)``: the
    partition it is written to, which restore reads back as the raw partition's window."""
    written: list = []
    w = make(Settings(raw_topic="r", **settings))

    def produce(topic, key, value, source, timestamp, partition):
        assert source == (partition, -1) and timestamp == 0
        written.append((topic, key, value, partition))

    w.produce = produce  # type: ignore[attr-defined]
    return w, written


def admit(w: Window, partition: int, offset: int, key: bytes, ts: int) -> bool:
    return w.admit(partition, offset, key, ts)


def commit(w: Window) -> int:
    """What the mask stage does around a commit: flush the changelog, then commit."""
    n = w.flush(w.produce)  # type: ignore[attr-defined]
    w.commit()
    return n


def entries(written: list) -> list:
    return [(partition, item) for _, key, value, partition in written for item in decode(key, value)]


def test_a_later_copy_is_dropped_the_same_record_again_is_not(make):
    w, written = window(make)
    assert admit(w, 0, 10, b"m1", 1000)
    assert not admit(w, 0, 20, b"m1", 5000)  # a bridge copy at a later offset
    assert admit(w, 0, 10, b"m1", 1000)  # a replay reads offset 10 again
    commit(w)
    assert entries(written) == [(0, (b"m1", (10, 1000)))]  # one changelog entry
    assert written[0][0] == "r.mask-dedup"
    assert admit(w, 1, 20, b"m1", 5000)  # another partition is another key's home: not a copy


def test_one_changelog_record_per_partition_per_transaction(make):
    w, written = window(make)
    for i in range(3000):
        assert admit(w, i % 3, i, f"{i:036d}".encode(), 1000 + i)
    assert written == []  # nothing before the commit
    assert commit(w) == 3  # 3,000 ids on 3 partitions: 3 records (the earlier format wrote 3,000)
    assert len(written) == 3 and len({key for _, key, _, _ in written}) == 3  # distinct keys: compaction keeps each
    got = entries(written)
    assert sorted((p, k, e) for p, (k, e) in got) == sorted(
        (i % 3, f"{i:036d}".encode(), (i, 1000 + i)) for i in range(3000)
    )
    assert commit(w) == 0  # an empty transaction writes nothing
    for i in range(3000, 3010):
        admit(w, 0, i, f"{i:036d}".encode(), 1000 + i)
    assert commit(w) == 1 and len(entries(written[3:])) == 10  # the next transaction only its own ids


def test_a_large_transaction_is_cut_into_records_under_the_chunk_size(make):
    w, written = window(make, dedup_max_ids=100_000)
    n = 3 * CHUNK_BYTES // 50
    for i in range(n):
        admit(w, 0, i, f"{i:036d}".encode(), i)
    assert commit(w) > 1
    assert all(len(value) <= CHUNK_BYTES for _, _, value, _ in written)
    assert len(entries(written)) == n


def test_the_changelog_restores_the_window_and_reads_the_earlier_format(make):
    w, written = window(make)
    for i in range(100):
        admit(w, i % 2, i, f"m{i}".encode(), 1000 + i)
    commit(w)
    admit(w, 0, 500, b"aborted", 2000)
    w.flush(w.produce)  # type: ignore[attr-defined]
    w.rollback()
    del written[-1]  # aborted: a read_committed reader never sees it
    restored, _ = window(make)
    loaded: dict[int, list] = {0: [], 1: []}
    for partition, item in entries(written):
        loaded[partition].append(item)
    loaded[0].append((b"old-format", ENTRY.unpack(ENTRY.pack(7, 1050))))  # a record written before this format
    assert decode(b"old-format", ENTRY.pack(7, 1050)) == [(b"old-format", (7, 1050))]
    restored.install(loaded)
    assert restored.size == 101
    assert not admit(restored, 0, 900, b"m0", 3000)  # copies of restored ids are dropped
    assert not admit(restored, 1, 900, b"m99", 3000)
    assert not admit(restored, 0, 901, b"old-format", 3000)
    assert admit(restored, 0, 902, b"aborted", 3000)  # never committed: not a copy


def test_a_restore_keeps_an_id_admitted_twice_at_its_later_place(make):
    w, _ = window(make, dedup_max_ids=2)
    w.install({0: [(b"a", (1, 100)), (b"b", (2, 200)), (b"a", (3, 300))]})  # a redriven at offset 3
    assert w.size == 2 and [(o, t) for _, o, t in w.entries(0)] == [(2, 200), (3, 300)]
    assert admit(w, 0, 4, b"c", 400)  # over the bound: b goes first, a (its later place) stays
    assert not admit(w, 0, 5, b"a", 500) and admit(w, 0, 6, b"b", 600)


def test_an_abort_after_a_revoke_undoes_only_the_partitions_still_held(make):
    w, _ = window(make)
    assert admit(w, 0, 1, b"a", 1) and admit(w, 1, 1, b"b", 1)
    w.forget({0})
    w.rollback()
    assert w.size == 0 and w.entries(1) == [] and w.partitions() == [1]


def test_an_abort_rolls_the_window_back(make):
    w, written = window(make)
    assert admit(w, 0, 1, b"a", 1)
    commit(w)
    assert admit(w, 0, 2, b"b", 2)
    w.rollback()  # the transaction with b was aborted: b is unknown again, its entry not written
    assert commit(w) == 0
    assert admit(w, 0, 3, b"b", 3)
    assert not admit(w, 0, 4, b"a", 4)
    commit(w)
    assert [item for _, item in entries(written)] == [(b"a", (1, 1)), (b"b", (3, 3))]


def test_ids_older_than_the_window_in_record_time_expire_uncounted(make):
    w, _ = window(make, dedup_window=10)  # 10 s of raw-record time
    before = metrics.DEDUP_EVICTIONS._value.get()
    assert admit(w, 0, 1, b"old", 0)
    assert admit(w, 0, 2, b"new", 20_000)
    assert admit(w, 0, 3, b"old", 20_001)  # forgotten: past the window, a copy is no longer caught
    assert metrics.DEDUP_EVICTIONS._value.get() == before


def test_the_count_bound_evicts_and_counts(make):
    w, _ = window(make, dedup_max_ids=2)
    before = metrics.DEDUP_EVICTIONS._value.get()
    for i in range(3):
        assert admit(w, 0, i, f"m{i}".encode(), 1000 + i)
    assert w.size == 2
    assert metrics.DEDUP_EVICTIONS._value.get() == before + 1
    assert admit(w, 0, 9, b"m0", 2000)  # evicted inside the window: the limit of the guarantee


def test_an_id_too_long_to_remember_passes_and_writes_nothing(make):
    w, written = window(make)
    huge = b"x" * (MAX_ID_BYTES + 1)
    assert admit(w, 0, 1, huge, 1) and admit(w, 0, 2, huge, 2)
    assert commit(w) == 0 and w.size == 0


def test_memory_per_id_is_within_what_the_byte_bound_counts():
    """ENTRY_BYTES (what STREAMS_DEDUP_MAX_BYTES counts per id) covers the window's real cost
    for SQS-sized ids (36 characters), committed (nothing pending), at its worst: a full window
    whose dict has just regrown under churn to 6 slots per id (3 x 43,691 is just over 2**17).
    The ids are made inside the measurement: one the window keeps is counted."""
    held = 43_691
    warm, _ = window(DedupWindow, dedup_max_ids=1000)  # Python's free lists (tuples of the undo log) filled first
    for i in range(3000):
        admit(warm, 0, i, f"w{i}".encode(), i)
    commit(warm)
    w, _ = window(DedupWindow, dedup_max_ids=held, dedup_max_bytes=2**30)
    most = 0.0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for start in range(0, held + 50_000, 1000):
        batch = range(start, start + 1000)
        keys = [f"{i:08x}-0000-4000-8000-{i:012x}".encode() for i in batch]
        w.admit_batch([0] * 1000, list(batch), keys, [1_764_000_000_000 + i for i in batch], lambda _: False)
        w.flush(lambda *_: None)
        w.commit()
        if w.size == held:  # full
            most = max(most, (tracemalloc.get_traced_memory()[0] - base) / w.size)
    tracemalloc.stop()
    print(f"dedup window: at most {most:.0f} bytes per id")
    assert w.size == held and most <= ENTRY_BYTES


def test_the_default_bound_holds_200000_ids():
    """The default bound holds the whole 600 s window up to 333 ev/s (100,000 ids, 165 ev/s,
    when an id took over 300 bytes), within the bytes the default allows at ENTRY_BYTES an id."""
    s = Settings()
    assert s.dedup_max_ids >= 200_000 and s.dedup_max_bytes // ENTRY_BYTES >= s.dedup_max_ids
    assert s.dedup_max_bytes <= 42 * 2**20  # its share of the worker's 200 MiB (docs/operations.md, Memory)


class Reference:
    """The window's rule one record at a time over the ids themselves (an ``OrderedDict``, as
    the window was first written): the oracle. An abort restores the state at the last commit."""

    def __init__(self, window_ms: int, limit: int) -> None:
        self.window_ms, self.limit = window_ms, limit
        self.state: dict[int, OrderedDict[bytes, tuple[int, int]]] = {}
        self.newest: dict[int, int] = {}
        self.size = self.admitted = self.evicted = 0
        self.pending: list[tuple[int, tuple[bytes, tuple[int, int]]]] = []
        self.changelog: list[tuple[int, tuple[bytes, tuple[int, int]]]] = []
        self.saved = copy.deepcopy((self.state, self.size))

    def admit(self, partition: int, offset: int, key: bytes | None, timestamp: int, force: bool) -> bool:
        if not key or len(key) > MAX_ID_BYTES:
            return True
        ids = self.state.setdefault(partition, OrderedDict())
        newest = self.newest[partition] = max(self.newest.get(partition, -1), timestamp)
        seen = ids.get(key)
        if seen is not None and seen[1] >= newest - self.window_ms:
            if seen[0] < offset and not force:
                return False
            if seen[0] == offset:
                return True
        ids[key] = (offset, timestamp)
        ids.move_to_end(key)
        self.size += seen is None
        self.pending.append((partition, (key, (offset, timestamp))))
        self.admitted += 1
        if self.size > self.limit or not self.admitted & 255:
            while ids:
                entry = next(iter(ids.values()))
                kept = entry[1] >= newest - self.window_ms
                if kept and self.size <= self.limit:
                    break
                self.evicted += kept
                ids.popitem(last=False)
                self.size -= 1
        return True

    def commit(self) -> None:
        order = list(dict.fromkeys(p for p, _ in self.pending))  # flush: partition by partition, first come
        self.changelog += sorted(self.pending, key=lambda item: order.index(item[0]))
        self.pending = []
        self.saved = copy.deepcopy((self.state, self.size))

    def rollback(self) -> None:
        self.pending = []
        self.state, self.size = copy.deepcopy(self.saved)

    def held(self) -> dict[int, list[tuple[int, int, int]]]:
        return {p: [(fingerprint(k), o, t) for k, (o, t) in ids.items()] for p, ids in self.state.items()}


def test_a_batch_admits_as_one_record_at_a_time_would(make):
    """``admit_batch`` (the mask stage's call, one per batch) agrees with the rule applied one
    record at a time to the ids themselves on every verdict, the state (what is held, in
    expiry order), the evictions counted, the changelog and what an abort undoes: copies,
    replays, redrives, expiry, the bound on ids."""
    import random

    rng = random.Random(7)
    records = []
    for i in range(6000):
        partition = rng.randrange(3)
        key = None if i % 97 == 0 else f"m{rng.randrange(1500)}".encode()  # many copies
        offset = i if rng.random() > 0.1 else max(i - rng.randrange(1, 50), 0)  # some replays
        records.append((partition, offset, key, 1_000 + i * 50, rng.random() < 0.05))
    one = Reference(60_000, 800)
    many, many_written = window(make, dedup_window=60, dedup_max_ids=800)
    verdicts_one, verdicts_many = [], []
    evicted = metrics.DEDUP_EVICTIONS._value.get()
    for start in range(0, len(records), 250):
        batch = records[start : start + 250]
        for p, o, k, t, redrive in batch:
            ok = one.admit(p, o, k, t, False)
            if not ok and redrive:
                ok = one.admit(p, o, k, t, True)
            verdicts_one.append(ok)
        verdicts_many += many.admit_batch(
            [r[0] for r in batch],
            [r[1] for r in batch],
            [r[2] for r in batch],
            [r[3] for r in batch],
            lambda i, batch=batch: batch[i][4],
        )
        if start % 1000 == 500:  # an aborted transaction now and then
            one.rollback()
            many.rollback()
        else:
            one.commit()
            commit(many)
        held = {p: many.entries(p) for p in many.partitions()}
        assert {p: [(o, t) for _, o, t in e] for p, e in one.held().items()} == {
            p: [(o, t) for _, o, t in e] for p, e in held.items()
        }
        if isinstance(many, DedupWindow):  # the core's fingerprints are its own
            assert one.held() == held
        assert (one.newest, one.size) == (many.newest, many.size)
    assert verdicts_one == verdicts_many
    assert metrics.DEDUP_EVICTIONS._value.get() - evicted == one.evicted > 0
    assert False in verdicts_many and one.changelog == entries(many_written)


def test_ids_admitted_again_are_skipped_at_their_earlier_place_and_compacted(make):
    """An id admitted again (a redrive) keeps its later place in the expiry order; the earlier
    places are skipped, undone by an abort, and dropped between transactions once they pile up."""
    w, _ = window(make, dedup_max_ids=10)
    for i in range(3):
        assert admit(w, 0, i, f"m{i}".encode(), i)
    commit(w)
    for n in range(3, 3 + 2000):
        assert w.admit(0, n, b"m0", n, force=True)  # redriven again and again: one id, many places
    assert w.size == 3 and [o for _, o, _ in w.entries(0)] == [1, 2, 2002]
    w.rollback()
    assert [o for _, o, _ in w.entries(0)] == [0, 1, 2]
    assert not isinstance(w, DedupWindow) or len(w.state[0].order) == 3
    for n in range(3, 3 + 2000):
        w.admit(0, n, b"m0", n, force=True)
    commit(w)
    assert [o for _, o, _ in w.entries(0)] == [1, 2, 2002]
    assert not isinstance(w, DedupWindow) or len(w.state[0].order) == 3
    for i in range(3, 11):  # 11 ids: the bound evicts the oldest, m1 (m0's place is the newest of the three)
        admit(w, 0, 3000 + i, f"m{i}".encode(), 3000 + i)
    assert not admit(w, 0, 4000, b"m0", 4000) and admit(w, 0, 4001, b"m1", 4001)
