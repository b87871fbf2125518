"""The mask stage's dedup window alone: CPU per event and memory per id held, in process.

    python -m benchmarks.dedup_window [--events 100000] [--runs 5] [--max-ids 200000]
                                      [--partitions 6] [--impl path/to/dedup.py ...]

Pure CPU, no services. Events of 5,000 users on 6 partitions (a user's partition by its
key), each a new 36-character message id, 1 % of them a bridge copy of a recent id at a
later offset; batches of 500 (``admit_batch``, a run of records per partition), a transaction every 5,000 (``flush`` and
``commit``). Two raw-time rates, each after a warm-up that fills the window:

- ``bound``: 50,000 ev/s, the window held at its id bound: every new id evicts one;
- ``window``: 250 ev/s, 150,000 ids in the 600 s window: ids expire by raw time.

CPU is ``time.process_time`` over the measured events (the machine is shared: wall-clock
is noise), the median of ``--runs`` fresh windows. Memory is tracemalloc's count of what
the window holds after each commit of the measured events (nothing pending), per id held:
the mean and the largest (a ``dict`` under churn regrows between 3 and 6 slots per id).
``--impl`` (repeatable) loads other versions of ``streams/pipeline/dedup.py`` (e.g. ``git
show main:streams/pipeline/dedup.py > /tmp/old.py``) to compare: their CPU runs interleave
(one run of each in turn), so load on a shared machine hits them alike. An id the window
keeps (the old store kept the bytes) is counted: the ids are made inside the measurement
and nothing else holds them after their batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import random
import statistics
import time
import tracemalloc
import zlib
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

from streams.settings import Settings

USERS = 5_000
BATCH = 500
TRANSACTION = 5_000
RATES = {"bound": 50_000, "window": 250}


def load(impl: str | None) -> ModuleType:
    if impl is None:
        from streams.pipeline import dedup

        return dedup
    spec = importlib.util.spec_from_file_location("dedup_under_test", impl)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def batches(records: Iterable[tuple[int, int, bytes, int]]) -> Iterator[tuple[list, list, list, list]]:
    """The columns ``admit_batch`` takes, ``BATCH`` records at a time, a run per partition (a
    consumer's batch holds each fetched partition's records together), in order within each."""
    records = iter(records)
    while batch := sorted(itertools.islice(records, BATCH), key=lambda r: r[0]):
        yield [r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch], [r[3] for r in batch]


def feed(window: Any, columns: Iterable[tuple[list, list, list, list]], sample: list[int] | None = None) -> None:
    """The mask stage's calls: a batch at a time, a transaction every ``TRANSACTION`` records."""
    for n, batch in enumerate(columns, 1):
        window.admit_batch(*batch, no_redrive)
        if n * BATCH % TRANSACTION == 0:
            window.flush(lambda *_: None)
            window.commit()
            if sample is not None:
                sample.append(tracemalloc.get_traced_memory()[0])
    window.flush(lambda *_: None)
    window.commit()


def settings(max_ids: int) -> Settings:
    return Settings(raw_topic="bench", dedup_max_ids=max_ids, dedup_max_bytes=2**34)


def warm_up_events(rate: int, max_ids: int) -> int:
    return max_ids + 50_000 if rate == RATES["bound"] else 600 * rate + 20_000


def cpu(modules: list[ModuleType], rate: int, n: int, runs: int, max_ids: int, partitions: int) -> list[list[float]]:
    """µs of CPU per event of each run of each module, fresh windows, the modules in turn."""
    warm = warm_up_events(rate, max_ids)
    per_run: list[list[float]] = [[] for _ in modules]
    for _ in range(runs):
        for module, out in zip(modules, per_run, strict=True):
            columns = list(batches(events(warm + n, rate, 1, partitions)))  # new ids: no hash cached in them
            window = module.DedupWindow(settings(max_ids))
            feed(window, columns[: warm // BATCH])
            start = time.process_time()
            feed(window, columns[warm // BATCH :])
            out.append((time.process_time() - start) / n * 1e6)
    return per_run


def memory(module: ModuleType, rate: int, n: int, max_ids: int, partitions: int) -> tuple[float, float, int]:
    """Mean and largest bytes per id held over the measured commits, and the ids held at the end."""
    warm = warm_up_events(rate, max_ids)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    window = module.DedupWindow(settings(max_ids))
    records = batches(events(warm + n, rate, 2, partitions))
    feed(window, itertools.islice(records, warm // BATCH))
    samples: list[int] = []
    feed(window, records, samples)
    tracemalloc.stop()
    per_id = [(used - base) / window.size for used in samples]
    return statistics.mean(per_id), max(per_id), window.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-ids", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--impl", action="append", help="a dedup.py to measure (default: this tree's); repeatable")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    names = args.impl or ["streams/pipeline/dedup.py"]
    modules = [load(impl) for impl in args.impl] if args.impl else [load(None)]
    print(f"dedup window: bound {args.max_ids:,} ids, {args.partitions} partitions, {args.events:,} events measured")
    for scenario, rate in RATES.items():
        per_run = cpu(modules, rate, args.events, args.runs, args.max_ids, args.partitions)
        for name, module, runs in zip(names, modules, per_run, strict=True):
            print(f"  {scenario:6s} ({rate:,} ev/s) {name}: {statistics.median(runs):.2f} µs CPU per event", end="")
            print(" (runs: " + " / ".join(f"{x:.2f}" for x in runs) + ")")
            if not args.no_memory:
                mean, largest, held = memory(module, rate, args.events, args.max_ids, args.partitions)
                print(f"    memory: {mean:.0f} bytes per id held (largest {largest:.0f}), {held:,} ids held")


if __name__ == "__main__":
    main()
