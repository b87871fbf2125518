"""A Faust consumer that commits past holes in a partition (compacted topics, replays).

faust-streaming 0.15.3 never commits past a hole right after the first record it reads:
its drain loop only records a gap when the previous read offset is truthy, so the hole
after offset 0 is never recorded, and ``_new_offset``'s head-gap check then refuses to
move past it (``min(acked) - committed > 1``). On the compacted masked topic (offsets
{0, 3, 4, ...}) the sink's lag never reaches zero and a crash reprocesses everything.

Our agents ack every event of a partition in offset order, one batch after another
(``delivery.batch_agent``, concurrency 1), so an offset between the committed position
and the lowest acked one was never delivered: it is a hole, never unfinished work. This
consumer fills such head holes before Faust computes the offset to commit.

Pinned to the exact Faust code it corrects: tests/unit/test_faust_pins.py fails when
faust-streaming's ``_new_offset`` or the drain loop's gap check change upstream.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

FAUST_VERSION = "0.15.3"


class HoleTolerantConsumer(faust_aiokafka.Consumer):
    def _new_offset(self, tp: Any) -> int | None:
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked and committed is not None:
            lowest = min(acked)
            if lowest > committed:
                # committed is the next offset to read; everything below the lowest
                # acked offset was never delivered (see the module docstring).
                acked.extend(range(committed, lowest))
        return super()._new_offset(tp)


class StreamsTransport(faust_aiokafka.Transport):
    Consumer = HoleTolerantConsumer


class StreamsApp(faust.App):
    """``faust.App`` whose consumer tolerates holes (see the module docstring)."""

    def _new_transport(self) -> Any:
        return StreamsTransport(self.conf.broker_consumer, self)
