"""A worker's memory does not grow with the backlog it drains (issue 20 item 4: RSS at most 200 MiB).

Before the bounds, librdkafka's defaults let each stage's consumer prefetch up to 100,000
records, plus fetch responses of 1 MiB per partition that grow ~4x when decompressed: a
worker draining a backlog of 60,000 went well past 200 MiB, and further with more.
"""

from __future__ import annotations

import pytest

from benchmarks.harness import fill, logins, raw_records
from streams.ops.topics import ensure_topics

pytestmark = pytest.mark.integration

BACKLOG = 60_000
LIMIT_MIB = 200  # the target for a worker running both stages


def peak_rss_mib(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), as the kernel counts it."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_worker_drains_a_backlog_within_its_memory_bound(pipeline):
    s = pipeline.settings
    pipeline.deploy()  # the raw codec may need the registry's schemas
    ensure_topics(s)
    fill(s, raw_records(s.raw_topic, logins(BACKLOG, seed=20, users=BACKLOG // 20), settings=s))
    worker = pipeline.start("worker", STREAMS_LOG_LEVEL="warning")

    peak = 0.0

    def drained() -> bool:
        nonlocal peak
        peak = max(peak, peak_rss_mib(worker.pid))
        return pipeline.row_count() >= BACKLOG and pipeline.lag([s.raw_topic, s.masked_topic]) == 0

    pipeline.wait_for(drained, timeout=900, what=f"the worker to drain {BACKLOG:,} records")
    peak = max(peak, peak_rss_mib(worker.pid))
    assert pipeline.row_count() == BACKLOG
    assert peak <= LIMIT_MIB, f"worker peak RSS {peak:.0f} MiB draining {BACKLOG:,} records"
