"""The mask stage's dedup window, pure logic: copies dropped, replays kept, aborts undone, bounds counted,
and its changelog: one record per partition per transaction, read back to the same window."""

from __future__ import annotations

import tracemalloc

from streams import metrics
from streams.pipeline.dedup import CHUNK_BYTES, ENTRY, MAX_ID_BYTES, DedupWindow, decode
from streams.settings import Settings


def window(**settings) -> tuple[DedupWindow, list]:
    """A window and the changelog records it wrote: ``(topic, key, value, partition)``: the
    partition it is written to, which restore reads back as the raw partition's window."""
    written: list = []
    w = DedupWindow(Settings(raw_topic="r", **settings))

    def produce(topic, key, value, source, timestamp, partition):
        assert source == (partition, -1) and timestamp == 0
        written.append((topic, key, value, partition))

    w.produce = produce  # type: ignore[attr-defined]
    return w, written


def admit(w: DedupWindow, partition: int, offset: int, key: bytes, ts: int) -> bool:
    return w.admit(partition, offset, key, ts)


def commit(w: DedupWindow) -> int:
    """What the mask stage does around a commit: flush the changelog, then commit."""
    n = w.flush(w.produce)  # type: ignore[attr-defined]
    w.commit()
    return n


def entries(written: list) -> list:
    return [(partition, item) for _, key, value, partition in written for item in decode(key, value)]


def test_a_later_copy_is_dropped_the_same_record_again_is_not():
    w, written = window()
    assert admit(w, 0, 10, b"m1", 1000)
    assert not admit(w, 0, 20, b"m1", 5000)  # a bridge copy at a later offset
    assert admit(w, 0, 10, b"m1", 1000)  # a replay reads offset 10 again
    commit(w)
    assert entries(written) == [(0, (b"m1", (10, 1000)))]  # one changelog entry
    assert written[0][0] == "r.mask-dedup"
    assert admit(w, 1, 20, b"m1", 5000)  # another partition is another key's home: not a copy


def test_one_changelog_record_per_partition_per_transaction():
    w, written = window()
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


def test_a_large_transaction_is_cut_into_records_under_the_chunk_size():
    w, written = window(dedup_max_ids=100_000)
    n = 3 * CHUNK_BYTES // 50
    for i in range(n):
        admit(w, 0, i, f"{i:036d}".encode(), i)
    assert commit(w) > 1
    assert all(len(value) <= CHUNK_BYTES for _, _, value, _ in written)
    assert len(entries(written)) == n


def test_the_changelog_restores_the_window_and_reads_the_earlier_format():
    w, written = window()
    for i in range(100):
        admit(w, i % 2, i, f"m{i}".encode(), 1000 + i)
    commit(w)
    admit(w, 0, 500, b"aborted", 2000)
    w.flush(w.produce)  # type: ignore[attr-defined]
    w.rollback()
    del written[-1]  # aborted: a read_committed reader never sees it
    restored, _ = window()
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


def test_an_abort_rolls_the_window_back():
    w, written = window()
    assert admit(w, 0, 1, b"a", 1)
    commit(w)
    assert admit(w, 0, 2, b"b", 2)
    w.rollback()  # the transaction with b was aborted: b is unknown again, its entry not written
    assert commit(w) == 0
    assert admit(w, 0, 3, b"b", 3)
    assert not admit(w, 0, 4, b"a", 4)
    commit(w)
    assert [item for _, item in entries(written)] == [(b"a", (1, 1)), (b"b", (3, 3))]


def test_ids_older_than_the_window_in_record_time_expire_uncounted():
    w, _ = window(dedup_window=10)  # 10 s of raw-record time
    before = metrics.DEDUP_EVICTIONS._value.get()
    assert admit(w, 0, 1, b"old", 0)
    assert admit(w, 0, 2, b"new", 20_000)
    assert admit(w, 0, 3, b"old", 20_001)  # forgotten: past the window, a copy is no longer caught
    assert metrics.DEDUP_EVICTIONS._value.get() == before


def test_the_count_bound_evicts_and_counts():
    w, _ = window(dedup_max_ids=2)
    before = metrics.DEDUP_EVICTIONS._value.get()
    for i in range(3):
        assert admit(w, 0, i, f"m{i}".encode(), 1000 + i)
    assert w.size == 2
    assert metrics.DEDUP_EVICTIONS._value.get() == before + 1
    assert admit(w, 0, 9, b"m0", 2000)  # evicted inside the window: the limit of the guarantee


def test_an_id_too_long_to_remember_passes_and_writes_nothing():
    w, written = window()
    huge = b"x" * (MAX_ID_BYTES + 1)
    assert admit(w, 0, 1, huge, 1) and admit(w, 0, 2, huge, 2)
    assert commit(w) == 0 and w.size == 0


def test_memory_per_id_is_within_what_the_byte_bound_counts():
    """ENTRY_BYTES (what STREAMS_DEDUP_MAX_BYTES counts per id) covers the window's real cost
    for SQS-sized ids (36 characters), committed (nothing pending)."""
    from streams.pipeline.dedup import ENTRY_BYTES

    w, _ = window(dedup_max_ids=1_000_000, dedup_max_bytes=2**30)
    keys = [f"{i:08x}-0000-4000-8000-{i:012x}".encode() for i in range(50_000)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i, key in enumerate(keys):
        admit(w, i % 6, 1_000_000 + i, key, 1_764_000_000_000 + i)
    w.flush(lambda *_: None)
    w.commit()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    per_id = used / len(keys) + (33 + 36)  # the ids were made before: add a bytes object of 36
    print(f"dedup window: {per_id:.0f} bytes per id")
    assert per_id <= ENTRY_BYTES


def reference_admit(
    w: DedupWindow, partition: int, offset: int, key: bytes | None, timestamp: int, force: bool
) -> bool:
    """The window's rule one record at a time, as it was written before batches (the oracle)."""
    from collections import OrderedDict

    from streams.pipeline.dedup import ENTRY_BYTES

    if not key or len(key) > MAX_ID_BYTES:
        return True
    ids = w.state.setdefault(partition, OrderedDict())
    newest = w.newest.get(partition, -1)
    if timestamp > newest:
        newest = w.newest[partition] = timestamp
    seen = ids.get(key)
    if seen is not None and seen[1] >= newest - w.window_ms:
        if seen[0] < offset and not force:
            return False
        if seen[0] == offset:
            return True
    w.undo.append((partition, key, seen))
    ids[key] = (offset, timestamp)
    if seen is None:
        w.size += 1
    else:
        ids.move_to_end(key)
    w.pending.setdefault(partition, []).append((key, offset, timestamp))
    w.admitted += 1
    if w.size > w.max_ids or w.size * ENTRY_BYTES > w.max_bytes or not w.admitted & 255:
        w._expire(partition, ids)
    return True


def test_a_batch_admits_as_one_record_at_a_time_would():
    """``admit_batch`` (the mask stage's call, one per batch) agrees with the rule applied one
    record at a time on every verdict, the state, the changelog and what an abort undoes:
    copies, replays, redrives, expiry, the bound on ids."""
    import random

    rng = random.Random(7)
    records = []
    for i in range(6000):
        partition = rng.randrange(3)
        key = None if i % 97 == 0 else f"m{rng.randrange(1500)}".encode()  # many copies
        offset = i if rng.random() > 0.1 else max(i - rng.randrange(1, 50), 0)  # some replays
        records.append((partition, offset, key, 1_000 + i * 50, rng.random() < 0.05))
    one, one_written = window(dedup_window=60, dedup_max_ids=800)
    many, many_written = window(dedup_window=60, dedup_max_ids=800)
    verdicts_one, verdicts_many = [], []
    for start in range(0, len(records), 250):
        batch = records[start : start + 250]
        for p, o, k, t, redrive in batch:
            ok = reference_admit(one, p, o, k, t, False)
            if not ok and redrive:
                ok = reference_admit(one, p, o, k, t, True)
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
            commit(one)
            commit(many)
        assert (one.state, one.newest, one.size) == (many.state, many.newest, many.size)
    assert verdicts_one == verdicts_many
    assert False in verdicts_many and entries(one_written) == entries(many_written)
