"""The mask stage's dedup window alone: CPU per event and memory per id held, in process.

    python -m benchmarks.dedup_window [--events 100000] [--runs 5] [--max-ids 200000]
                                      [--partitions 6] [--impl path/to/dedup.py ...] [--no-core]

Pure CPU, no services. Events of 5,000 users on 6 partitions (a user's partition by its
key), each a new 36-character message id, 1 % of them a bridge copy of a recent id at a
later offset; batches of 500 (``admit_batch``, a run of records per partition), a transaction every 5,000 (``flush`` and
``commit``). Two raw-time rates, each after a warm-up that fills the window:

- ``bound``: 50,000 ev/s, the window held at its id bound: every new id evicts one;
- ``window``: 250 ev/s, 150,000 ids in the 600 s window: ids expire by raw time.

Two calls: ``admit_batch`` on ready columns (the window alone), and the mask stage's call
(``stage``): ``admit_records`` on the batch's confluent-kafka messages and outputs, or, for
a window without it, what ``MaskWriter._admitted`` did before it (a list of keys, a list
of timestamps, ``admit_batch``); both with the partitions and offsets the stage reads anyway.

The windows: this tree's Python reference, the compiled core's (``CoreDedupWindow``,
unless ``--no-core``), and any ``--impl``. CPU is ``time.process_time`` over the measured events (the machine is shared: wall-clock
is noise), the median of ``--runs`` fresh windows. Memory is tracemalloc's count of what
the window holds after each commit of the measured events (nothing pending), per id held:
the mean and the largest (a ``dict`` under churn regrows between 3 and 6 slots per id).
tracemalloc does not see the core's heap (Rust allocates with malloc): for it, the bytes of
its tables' and queues' capacities (``heap_bytes``) and glibc's count of bytes in use
(``mallinfo2``, before and after) per id held.
``--impl`` (repeatable) loads other versions of ``streams/pipeline/dedup.py`` (e.g. ``git
show main:streams/pipeline/dedup.py > /tmp/old.py``) to compare: their CPU runs interleave
(one run of each in turn), so load on a shared machine hits them alike. An id the window
keeps (the old store kept the bytes) is counted: the ids are made inside the measurement
and nothing else holds them after their batch.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import itertools
import operator
import random
import statistics
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from streams.pipeline.mask import Output
from streams.settings import Settings

USERS = 5_000
BATCH = 500
TRANSACTION = 5_000
RATES = {"bound": 50_000, "window": 250}
CALLS = ("admit_batch", "stage")
_KEY = operator.itemgetter(0)
Make = Callable[[Settings], Any]
# The columns admit_batch takes (partitions, offsets, keys, timestamps) and, for the stage's
# call, the batch's messages and outputs.
Batch = tuple[list, list, list, list, list, list]


def load(impl: str | None) -> ModuleType:
    if impl is None:
        from streams.pipeline import dedup

        return dedup
    spec = importlib.util.spec_from_file_location("dedup_under_test", impl)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def windows(impls: list[str] | None, core: bool) -> list[tuple[str, Make, bool]]:
    """``(name, constructor, compiled)`` of each window to measure."""
    from streams.pipeline import dedup

    out: list[tuple[str, Make, bool]] = [(impl, load(impl).DedupWindow, False) for impl in impls or []]
    if not impls:
        out.append(("streams/pipeline/dedup.py", dedup.DedupWindow, False))
    if core:
        import streams_core

        out.append(("core (streams_core)", lambda s: dedup.CoreDedupWindow(s, streams_core), True))
    return out


def events(n: int, rate: int, seed: int, partitions: int) -> Iterator[tuple[int, int, bytes, int]]:
    """``(partition, offset, message id, raw timestamp ms)`` in raw order."""
    rng = random.Random(seed)
    offsets = [0] * partitions
    recent: list[tuple[int, bytes]] = []
    for i in range(n):
        if recent and rng.random() < 0.01:
            partition, key = recent[rng.randrange(len(recent))]  # a bridge copy: same id, same partition
        else:
            user = f"user-{rng.randrange(USERS)}".encode()
            partition = zlib.crc32(user) % partitions
            key = f"{rng.getrandbits(32):08x}-{i % 65536:04x}-4000-8000-{i:012x}".encode()
            recent.append((partition, key))
            if len(recent) > 1000:
                recent.pop(0)
        yield partition, offsets[partition], key, 1_764_000_000_000 + i * 1000 // rate
        offsets[partition] += 1


def no_redrive(_i: int) -> bool:
    return False


def batches(records: Iterable[tuple[int, int, bytes, int]], stage: bool = False) -> Iterator[Batch]:
    """The columns ``admit_batch`` takes, ``BATCH`` records at a time, a run per partition (a
    consumer's batch holds each fetched partition's records together), in order within each;
    with ``stage``, the records as the stage has them too (messages, outputs)."""
    records = iter(records)
    while batch := sorted(itertools.islice(records, BATCH), key=lambda r: r[0]):
        messages = outputs = []
        if stage:
            messages = [
                Message(topic="bench", partition=p, offset=o, value=b"", timestamp=(TIMESTAMP_CREATE_TIME, t))
                for p, o, _, t in batch
            ]
            outputs = [Output(r[2], b"") for r in batch]
        yield (
            [r[0] for r in batch],
            [r[1] for r in batch],
            [r[2] for r in batch],
            [r[3] for r in batch],
            messages,
            outputs,
        )


def stage_admit(window: Any, batch: Batch) -> int:
    """What ``MaskWriter`` does with the window for a batch (``_admitted`` and the all-written
    check); a window without ``admit_records``: as the stage did before it. Duplicates."""
    partitions, offsets, _, _, messages, outputs = batch
    if hasattr(window, "admit_records"):
        keep = window.admit_records(messages, outputs, partitions, offsets, no_redrive)
        return 0 if keep is None or all(keep) else keep.count(False)
    keep = window.admit_batch(
        partitions, offsets, list(map(_KEY, outputs)), [m.timestamp()[1] for m in messages], no_redrive
    )
    duplicates = len(keep) - sum(keep)
    return 0 if all(keep) else duplicates


def feed(
    window: Any, columns: Iterable[Batch], call: str = "admit_batch", sample: Callable[[], None] | None = None
) -> None:
    """The mask stage's calls: a batch at a time, a transaction every ``TRANSACTION`` records."""
    for n, batch in enumerate(columns, 1):
        if call == "stage":
            stage_admit(window, batch)
        else:
            window.admit_batch(*batch[:4], no_redrive)
        if n * BATCH % TRANSACTION == 0:
            window.flush(lambda *_: None)
            window.commit()
            if sample is not None:
                sample()
    window.flush(lambda *_: None)
    window.commit()


def settings(max_ids: int) -> Settings:
    return Settings(raw_topic="bench", dedup_max_ids=max_ids, dedup_max_bytes=2**34)


def warm_up_events(rate: int, max_ids: int) -> int:
    return max_ids + 50_000 if rate == RATES["bound"] else 600 * rate + 20_000


def cpu(
    makers: list[Make], call: str, rate: int, n: int, runs: int, max_ids: int, partitions: int
) -> list[list[float]]:
    """µs of CPU per event of each run of each window, fresh windows, the windows in turn."""
    warm = warm_up_events(rate, max_ids)
    per_run: list[list[float]] = [[] for _ in makers]
    for _ in range(runs):
        for make, out in zip(makers, per_run, strict=True):
            # new ids: no hash cached in them
            columns = list(batches(events(warm + n, rate, 1, partitions), stage=call == "stage"))
            window = make(settings(max_ids))
            feed(window, columns[: warm // BATCH], call)
            start = time.process_time()
            feed(window, columns[warm // BATCH :], call)
            out.append((time.process_time() - start) / n * 1e6)
            del columns
    return per_run


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int:
    """glibc's bytes in use (heap and mmapped chunks): what the core's heap adds to."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def memory(
    make: Make, compiled: bool, rate: int, n: int, max_ids: int, partitions: int
) -> list[tuple[str, float, float]]:
    """``(how, mean, largest)`` bytes per id held over the measured commits; the ids held at the end."""
    warm = warm_up_events(rate, max_ids)
    records = batches(events(warm + n, rate, 2, partitions))
    if not compiled:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        window = make(settings(max_ids))
        feed(window, itertools.islice(records, warm // BATCH))
        used: list[tuple[int, int]] = []
        feed(window, records, sample=lambda: used.append((tracemalloc.get_traced_memory()[0] - base, window.size)))
        tracemalloc.stop()
        per_id = [b / size for b, size in used]
        return [("tracemalloc", statistics.mean(per_id), max(per_id))]
    base = malloc_in_use()
    window = make(settings(max_ids))
    feed(window, itertools.islice(records, warm // BATCH))
    heap: list[float] = []
    malloc: list[float] = []

    def sample() -> None:
        heap.append(window.core.heap_bytes() / window.size)
        malloc.append((malloc_in_use() - base) / window.size)

    feed(window, records, sample=sample)
    return [("heap_bytes", statistics.mean(heap), max(heap)), ("malloc in use", statistics.mean(malloc), max(malloc))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-ids", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--impl", action="append", help="a dedup.py to measure (default: this tree's); repeatable")
    parser.add_argument("--no-core", action="store_true", help="leave out the compiled core's window")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--calls", default=",".join(CALLS), help="which calls to time: admit_batch,stage")
    args = parser.parse_args()
    measured = windows(args.impl, not args.no_core)
    print(f"dedup window: bound {args.max_ids:,} ids, {args.partitions} partitions, {args.events:,} events measured")
    for scenario, rate in RATES.items():
        for call in args.calls.split(","):
            per_run = cpu(
                [m for _, m, _ in measured], call, rate, args.events, args.runs, args.max_ids, args.partitions
            )
            for (name, _, _), runs in zip(measured, per_run, strict=True):
                print(
                    f"  {scenario:6s} ({rate:,} ev/s) {call:11s} {name}: {statistics.median(runs):.2f} µs CPU per event",
                    end="",
                )
                print(" (runs: " + " / ".join(f"{x:.2f}" for x in runs) + ")")
        if not args.no_memory:
            for name, make, compiled in measured:
                for how, mean, largest in memory(make, compiled, rate, args.events, args.max_ids, args.partitions):
                    print(f"    memory {name} ({how}): {mean:.0f} bytes per id held (largest {largest:.0f})")


if __name__ == "__main__":
    main()
