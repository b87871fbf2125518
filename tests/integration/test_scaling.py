"""Several `streams worker` processes in one group split the partitions, and survive churn."""

from __future__ import annotations

import json
import signal

import pytest

from benchmarks.throughput import produce_raw
from streams.ops.replay import OffsetAdmin

pytestmark = pytest.mark.integration


def raw_owners(pipeline) -> dict[str, list[int]]:
    """Member id -> raw-topic partitions it holds, as the group coordinator reports it."""
    raw = pipeline.settings.raw_topic
    try:
        assignment = OffsetAdmin(pipeline.settings).assignment()
    except Exception:
        return {}
    return {m: [p for t, p in parts if t == raw] for m, parts in assignment.items()}


def test_three_workers_split_six_partitions_and_survive_kill_and_join(pipeline, sample_path):
    s = pipeline.settings
    assert s.topic_partitions == 6
    sample = [r for r in json.loads(sample_path.read_text()) if "ip" in r]
    workers = [pipeline.start("worker", "--log-level", "warning") for _ in range(3)]

    def three_way_split():
        owners = raw_owners(pipeline)
        held = sorted(p for parts in owners.values() for p in parts)
        return len(owners) == 3 and all(owners.values()) and held == list(range(6)) and owners

    pipeline.wait_for(three_way_split, 180, "three members each holding raw partitions")

    ids = produce_raw(s, sample * 3)
    pipeline.wait_for(lambda: pipeline.row_count() > 0, 120, "the first rows")
    # One worker dies hard mid-stream (no leave-group, uncommitted work in flight)...
    workers[0].send_signal(signal.SIGKILL)
    pipeline.stopped.add(workers[0])
    ids += produce_raw(s, sample * 3)
    # ...and a fourth joins mid-stream.
    pipeline.start("worker", "--log-level", "warning")
    ids += produce_raw(s, sample * 3)

    pipeline.wait_for(lambda: pipeline.row_count() == len(ids), 300, f"{len(ids)} rows")
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic, s.masked_topic]) == 0, 180, "every offset committed")
    rows = pipeline.query("SELECT message_id FROM user_logins")
    assert len(rows) == len({r["message_id"] for r in rows}) == len(set(ids)) == len(ids)
    assert {r["message_id"] for r in rows} == set(ids)  # no lost ids, no strays
    assert pipeline.dead_letters() == []
    owners = pipeline.wait_for(
        lambda: (
            (o := raw_owners(pipeline))
            and len(o) == 3
            and sorted(p for v in o.values() for p in v) == list(range(6))
            and o
        ),
        180,
        "the group settled on the three live workers",
    )
    assert all(owners.values())
