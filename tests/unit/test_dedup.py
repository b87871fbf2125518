"""The mask stage's dedup window, pure logic: copies dropped, replays kept, aborts undone, bounds counted."""

from __future__ import annotations

from streams import metrics
from streams.pipeline.dedup import ENTRY, DedupWindow
from streams.settings import Settings


def window(**settings) -> tuple[DedupWindow, list]:
    written: list = []
    w = DedupWindow(Settings(raw_topic="r", **settings))

    def produce(topic, key, value, source):
        written.append((topic, key, ENTRY.unpack(value), source))

    w.produce = produce  # type: ignore[attr-defined]
    return w, written


def admit(w: DedupWindow, partition: int, offset: int, key: bytes, ts: int) -> bool:
    return w.admit(partition, offset, key, ts, w.produce)  # type: ignore[attr-defined]


def test_a_later_copy_is_dropped_the_same_record_again_is_not():
    w, written = window()
    assert admit(w, 0, 10, b"m1", 1000)
    assert not admit(w, 0, 20, b"m1", 5000)  # a bridge copy at a later offset
    assert admit(w, 0, 10, b"m1", 1000)  # a replay reads offset 10 again
    assert written == [("r.mask-dedup", b"m1", (10, 1000), (0, 10))]  # one changelog entry
    assert admit(w, 1, 20, b"m1", 5000)  # another partition is another key's home: not a copy


def test_an_abort_rolls_the_window_back():
    w, _ = window()
    assert admit(w, 0, 1, b"a", 1)
    w.commit()
    assert admit(w, 0, 2, b"b", 2)
    w.rollback()  # the transaction with b was aborted: b is unknown again
    assert admit(w, 0, 3, b"b", 3)
    assert not admit(w, 0, 4, b"a", 4)


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
