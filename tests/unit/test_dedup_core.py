"""The compiled dedup window (streams_core.DedupWindow, core/src/dedup.rs) against the Python
reference (streams/pipeline/dedup.py), driven by the same random operations: every verdict,
eviction, redrive question, state and changelog byte must agree.

Without the extension these tests skip, unless STREAMS_REQUIRE_CORE=1 (``make unit``, CI):
then a core that is not built fails them.
"""

from __future__ import annotations

import random
import sys

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import metrics
from streams.errors import ConfigError
from streams.pipeline.dedup import (
    BATCH_KEY,
    CHUNK_BYTES,
    MAX_ID_BYTES,
    REDRIVE_HEADER,
    CoreDedupWindow,
    DedupWindow,
    Window,
    decode,
    dedup_window,
)
from streams.pipeline.mask import Output
from streams.settings import Settings
from tests.helpers import core_module

PARTITIONS = 4
KEYS = [None, b"", b"x" * (MAX_ID_BYTES + 1), b"y" * MAX_ID_BYTES] + [f"m{i}".encode() for i in range(12)]


# One record: partition, key, offset step (negative: an earlier offset read again; 0: the same
# one again; positive: a later one), raw-time step (ms; 1,000 lands on a 1 s window's edge,
# 5,000 jumps past it), redrive.
records = st.tuples(
    st.integers(0, PARTITIONS - 1),
    st.sampled_from(KEYS),
    st.sampled_from([-3, -1, 0, 1, 1, 1, 2]),
    st.sampled_from([0, 1, 300, 500, 1_000, 5_000, -50, -1_000]),
    st.booleans(),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.lists(records, min_size=1, max_size=40), st.booleans()),
        st.tuples(st.just("commit")),
        st.tuples(st.just("abort"), st.booleans()),  # rollback, after a flush or not
        st.tuples(st.just("forget"), st.sets(st.integers(0, PARTITIONS - 1), max_size=2)),
        st.tuples(st.just("restore"), st.sets(st.integers(0, PARTITIONS - 1), min_size=1, max_size=3)),
    ),
    max_size=40,
)


class Pair:
    """The reference and the core window side by side, the changelog each wrote, and the
    committed changelog (what a read_committed restore reads)."""

    def __init__(self, window_s: float, max_ids: int) -> None:
        s = Settings(raw_topic="r", dedup_window=window_s, dedup_max_ids=max_ids)
        self.windows: tuple[Window, Window] = (DedupWindow(s), CoreDedupWindow(s, core_module()))
        self.committed: list[tuple[int, bytes]] = []  # (partition, value)
        self.cursor = [0] * PARTITIONS
        self.clock = 1_764_000_000_000

    def both(self, call) -> tuple[object, object, int, int]:
        """``call(window)`` on each: the results and the evictions each counted."""
        out = []
        for w in self.windows:
            before = metrics.DEDUP_EVICTIONS._value.get()
            result = call(w)
            out.append((result, metrics.DEDUP_EVICTIONS._value.get() - before))
        (a, ea), (b, eb) = out
        return a, b, ea, eb

    def admit(self, batch: list, via_records: bool) -> None:
        partitions, offsets, keys, timestamps, forced, messages = [], [], [], [], [], []
        for partition, key, step, dt, redrive in batch:
            self.cursor[partition] = max(self.cursor[partition] + step, 0)
            self.clock += dt
            partitions.append(partition)
            offsets.append(self.cursor[partition])
            keys.append(key)
            timestamps.append(self.clock)
            forced.append(redrive)
            headers = [(REDRIVE_HEADER, b"1")] if redrive else None
            message = Message(
                topic="r",
                partition=partition,
                offset=self.cursor[partition],
                key=b"user",
                value=b"",
                timestamp=(TIMESTAMP_CREATE_TIME, self.clock),
                headers=headers,
            )
            messages.append(message)
        asked: tuple[list[int], list[int]] = ([], [])

        def call(w: Window):
            questions = asked[w is self.windows[1]]

            def redrive(i: int) -> bool:  # as the mask stage asks: from the record's headers
                questions.append(i)
                return any(h[0] == REDRIVE_HEADER for h in messages[i].headers() or ())

            if via_records:
                outputs = [Output(k, b"masked") for k in keys]
                return w.admit_records(messages, outputs, list(partitions), list(offsets), redrive)
            return w.admit_batch(partitions, offsets, keys, timestamps, redrive)

        a, b, ea, eb = self.both(call)
        assert a == b and ea == eb
        assert asked[0] == asked[1]  # the redrive question: asked for the same copies only
        if not via_records:
            assert [i for i, ok in enumerate(a) if not ok] == [  # type: ignore[arg-type]
                i for i in asked[0] if not forced[i]
            ]

    def flush(self) -> list[tuple[int, bytes]]:
        written: tuple[list, list] = ([], [])

        def call(w: Window) -> int:
            def produce(topic, key, value, source, timestamp, partition):
                assert topic == "r.mask-dedup" and source == (partition, -1) and timestamp == 0
                magic, first_offset, ns = BATCH_KEY.unpack(key)
                assert magic == b"\xff" and ns > 0
                assert decode(key, value)[0][1][0] == first_offset  # the key's offset: the first item's
                written[w is self.windows[1]].append((partition, first_offset, value))

            return w.flush(produce)

        a, b, _, _ = self.both(call)
        assert a == b == len(written[0])
        assert written[0] == written[1]  # byte for byte (the keys' clocks aside)
        return [(p, v) for p, _, v in written[0]]

    def run(self, op: tuple) -> None:
        kind = op[0]
        if kind == "admit":
            self.admit(op[1], op[2])
        elif kind == "commit":
            self.committed += self.flush()
            self.both(lambda w: w.commit())
        elif kind == "abort":
            if op[1]:
                self.flush()  # written in the aborted transaction: never read back
            self.both(lambda w: w.rollback())
        elif kind == "forget":
            self.both(lambda w: w.forget(set(op[1])))
        else:  # restore: the partitions' windows read back from the committed changelog
            loaded: dict[int, list] = {p: [] for p in sorted(op[1])}
            for partition, value in self.committed:
                if partition in loaded:
                    loaded[partition] += decode(b"\xff", value)
            _, _, ea, eb = self.both(lambda w: w.install(loaded))
            assert ea == eb
        self.check()

    def check(self) -> None:
        ref, core = self.windows
        assert ref.size == core.size
        assert ref.newest == core.newest
        assert ref.partitions() == core.partitions()
        for p in ref.partitions():
            assert [(o, t) for _, o, t in ref.entries(p)] == [(o, t) for _, o, t in core.entries(p)]
        assert sum(len(core.entries(p)) for p in core.partitions()) == core.size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window_s=st.sampled_from([1.0, 60.0]), max_ids=st.sampled_from([1, 2, 3, 5, 40, 100_000]), ops=operations)
def test_the_core_window_does_what_the_reference_does(window_s, max_ids, ops):
    pair = Pair(window_s, max_ids)
    for op in ops:
        pair.run(op)
    pair.run(("commit",))
    pair.run(("restore", set(range(PARTITIONS))))


@pytest.mark.parametrize("window_s, max_ids", [(1.0, 100_000), (2.0, 300), (60.0, 50)])
def test_a_long_run_agrees(window_s, max_ids):
    """Thousands of records (hypothesis's sequences are short): the periodic expiry every 256
    admissions, the bound under churn, restores of a long changelog."""
    rng = random.Random(f"{window_s}/{max_ids}")
    pair = Pair(window_s, max_ids)
    for n in range(300):
        batch = [
            (
                rng.randrange(PARTITIONS),
                f"m{rng.randrange(2000)}".encode(),
                rng.choice([-3, -1, 0, 1, 1, 1, 1, 1, 2]),
                rng.choice([0, 0, 1, 10, 30, 300]) if rng.random() > 0.002 else 5_000,
                rng.random() < 0.05,
            )
            for _ in range(rng.randrange(1, 120))
        ]
        pair.run(("admit", batch, n % 2 == 0))
        pair.run(rng.choice([("commit",), ("commit",), ("commit",), ("abort", True), ("abort", False)]))
        if n % 50 == 49:
            pair.run(("restore", {rng.randrange(PARTITIONS), rng.randrange(PARTITIONS)}))
        if n % 70 == 69:
            pair.run(("forget", {rng.randrange(PARTITIONS)}))


def test_the_window_edge_is_inside_in_both():
    """An id exactly ``window`` older than the newest record is still held (a copy dropped);
    a millisecond older it is forgotten (a copy written)."""
    pair = Pair(1.0, 100)
    pair.run(("admit", [(0, b"a", 1, 0, False), (0, b"b", 1, 0, False)], False))
    pair.run(("admit", [(0, b"c", 1, 1_000, False), (0, b"a", 1, 0, False)], True))
    assert [(o, t) for _, o, t in pair.windows[1].entries(0)][-1] == (3, pair.clock)  # c; the copy of a dropped
    pair.run(("admit", [(0, b"d", 1, 1, False), (0, b"b", 1, 0, False)], False))
    # b (a millisecond past the window) written again at 6, its place at 2 skipped; a, as old,
    # is treated as forgotten but removed only at a periodic expiry
    assert [o for _, o, _ in pair.windows[1].entries(0)] == [1, 3, 5, 6]


def test_changelog_records_are_cut_alike_at_the_chunk_size():
    """63 items of exactly ``CHUNK_BYTES`` with the header fill one record; one more starts the next."""
    pair = Pair(600.0, 100_000)
    items = [(0, b"%04d" % i + b"k" * (MAX_ID_BYTES - 4), 1, 1, False) for i in range(62)]
    items.append((0, b"last" + b"k" * 904, 1, 1, False))  # 6 + 62 x 1,042 + 926 = 65,536
    pair.run(("admit", items, False))
    assert len(pair.flush()) == 1
    pair.run(("commit",))
    pair.run(
        (
            "admit",
            [(0, b"n" + key[1:], step, dt, r) for _, key, step, dt, r in items] + [(0, b"extra", 1, 1, False)],
            False,
        )
    )
    pair.run(("admit", [(1, b"one more", 1, 1, False)], False))
    written = pair.flush()
    assert [p for p, _ in written] == [0, 0, 1] and len(written[0][1]) == CHUNK_BYTES
    pair.run(("commit",))


def test_many_admissions_of_one_id_are_undone_and_compacted_alike():
    """Past 1,024 places of ids admitted again, a commit compacts the order: alike in both,
    and an abort before it undoes them place for place."""
    pair = Pair(600.0, 10)
    redriven = [(0, b"m0", 1, 1, True)] * 40
    pair.run(("admit", [(0, b"m1", 1, 1, False), (0, b"m2", 1, 1, False)] + redriven, False))
    pair.run(("commit",))
    for _ in range(60):
        pair.run(("admit", redriven, True))
    pair.run(("abort", True))
    for _ in range(60):
        pair.run(("admit", redriven, False))
    pair.run(("commit",))
    pair.run(("admit", [(0, f"n{i}".encode(), 1, 1, False) for i in range(12)], False))
    pair.run(("restore", {0, 1}))


def test_the_core_is_used_when_built_and_agrees():
    core_module()
    s = Settings(raw_topic="r")
    assert isinstance(dedup_window(s, require=True), CoreDedupWindow)


def test_without_the_core_the_reference_is_used_or_it_is_an_error(monkeypatch):
    s = Settings(raw_topic="r")
    monkeypatch.setitem(sys.modules, "streams_core", None)  # import streams_core raises ImportError
    assert type(dedup_window(s, require=False)) is DedupWindow
    with pytest.raises(ConfigError) as refused:
        dedup_window(s, require=True)
    assert "STREAMS_REQUIRE_CORE=1" in str(refused.value) and "\n" not in str(refused.value)


def test_a_core_that_disagrees_with_the_reference_is_not_used(monkeypatch):
    real = core_module()

    class Forgetful:
        """The core's window, but an abort keeps what the aborted transaction admitted."""

        def __init__(self, window_ms: int, limit: int) -> None:
            self.window = real.DedupWindow(window_ms, limit)

        def __getattr__(self, name: str):
            return getattr(self.window, name)

        def rollback(self) -> None:
            pass

    wrong = type(sys)("streams_core")
    wrong.DedupWindow = Forgetful  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "streams_core", wrong)
    s = Settings(raw_topic="r")
    assert type(dedup_window(s, require=False)) is DedupWindow
    with pytest.raises(ConfigError, match="differ from the reference"):
        dedup_window(s, require=True)


def test_the_core_holds_an_id_in_far_less_than_the_reference():
    """What the core's tables and queues take per id held, at its worst over a full window
    under churn (the reference: at most ``ENTRY_BYTES``, 216; ~163 on average)."""
    core = core_module()
    held = 43_691  # 3 x 43,691 is just over 2**17: the map has just regrown
    w = core.DedupWindow(600_000, held)
    most = 0.0
    for start in range(0, held + 50_000, 1000):
        batch = range(start, start + 1000)
        keys = [f"{i:08x}-0000-4000-8000-{i:012x}".encode() for i in batch]
        w.admit_batch([0] * 1000, list(batch), keys, [1_764_000_000_000 + i for i in batch])
        w.flush()
        w.commit()
        if w.size == held:
            most = max(most, w.heap_bytes() / w.size)
    assert w.size == held and most <= 110
