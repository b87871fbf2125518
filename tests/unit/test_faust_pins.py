"""Our corrections to Faust internals hold only for the exact code they correct.

streams/pipeline/consumer.py works around faust-streaming 0.15.3's head-gap stall and
wraps its Kafka clients' start-up (and re-creates its consumer thread the same way); if
that code changes upstream the workaround may be wrong or unneeded, so these fail and
someone re-reads it.
"""

from __future__ import annotations

import hashlib
import inspect
from collections import defaultdict

import faust
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.drivers.aiokafka import Consumer as FaustKafkaConsumer
from intervaltree import IntervalTree

from streams.pipeline.consumer import FAUST_VERSION, HoleTolerantConsumer

PINNED = {
    "aiokafka.Consumer._new_consumer_thread": "0870ec53dea75083",
    "aiokafka.Producer.on_start": "219c9a7a785d77b2",
    "aiokafka.AIOKafkaConsumerThread.on_start": "38b4e8bd1e10723a",
    "Consumer._new_offset": "1d2c7ea89a7ad4f1",
    "Consumer._drain_messages": "44a2500309e83c63",
}


def _digest(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


def test_faust_version_is_the_one_the_workaround_was_written_for():
    assert faust.__version__ == FAUST_VERSION


def test_faust_code_the_workaround_depends_on_is_unchanged():
    assert {
        "aiokafka.Consumer._new_consumer_thread": _digest(faust_aiokafka.Consumer._new_consumer_thread),
        "aiokafka.Producer.on_start": _digest(faust_aiokafka.Producer.on_start),
        "aiokafka.AIOKafkaConsumerThread.on_start": _digest(faust_aiokafka.AIOKafkaConsumerThread.on_start),
        "Consumer._new_offset": _digest(FaustConsumer._new_offset),
        "Consumer._drain_messages": _digest(FaustConsumer._drain_messages),
    } == PINNED


def _bare(cls):
    consumer = cls.__new__(cls)
    consumer._acked = defaultdict(list)
    consumer._acked_index = defaultdict(set)
    consumer._gap = defaultdict(IntervalTree)
    consumer._committed_offset = defaultdict(lambda: None)
    return consumer


def _offsets_committed(cls, acked_rounds: list[list[int]]) -> list[int | None]:
    """What the commit computes after each round of acks (the drain loop recorded no gap)."""
    consumer, tp, out = _bare(cls), ("masked", 0), []
    for offsets in acked_rounds:
        consumer._acked[tp].extend(offsets)
        new = consumer._new_offset(tp)
        if new is not None:
            consumer._committed_offset[tp] = new
        out.append(new)
    return out


def test_stock_faust_never_commits_past_a_hole_after_offset_0():
    assert _offsets_committed(FaustKafkaConsumer, [[0], [3, 4, 5, 6]]) == [1, None]


def test_hole_tolerant_consumer_commits_to_the_end():
    assert _offsets_committed(HoleTolerantConsumer, [[0], [3, 4, 5, 6]]) == [1, 7]
    assert _offsets_committed(HoleTolerantConsumer, [[0, 1, 2], [3], [5, 6]]) == [3, 4, 7]
