"""Upgrading from the single Faust group (``<app_id>``) to one group per stage (issue 18 item 6).

On its first start a stage whose group has no committed offsets copies the old group's
offsets on its input topic, so it neither reprocesses the topic nor skips anything; while
old workers still run in the old group it refuses in one line naming the step.
"""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import Consumer, TopicPartition

from benchmarks.throughput import produce_raw
from streams.io.kafka import client_config, group_lag
from streams.ops.topics import ensure_topics
from streams.ops.topology import legacy_group, stage_group

pytestmark = pytest.mark.integration


def commit_as_old_group(settings, topic: str, offsets: dict[int, int]) -> None:
    consumer = Consumer(client_config(settings, **{"group.id": legacy_group(settings), "enable.auto.commit": False}))
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def test_the_first_start_carries_the_old_groups_offsets(pipeline, sample_path):
    import json

    s = pipeline.settings
    ensure_topics(s)
    sample = [r for r in json.loads(sample_path.read_text()) if "ip" in r]
    produce_raw(s, sample * 2)  # 198 records the old workers had already masked...
    ends = {p: end for (_, p), (_, end) in group_lag(s, [s.raw_topic], group="nobody").items()}
    commit_as_old_group(s, s.raw_topic, ends)
    new_ids = set(produce_raw(s, sample))  # ...and 99 they had not

    pipeline.start("worker", STREAMS_STAGES="mask")
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the new mask group at the end of raw")
    assert "carried 6 committed offsets" in pipeline.logs()
    masked = {k.decode() for k, _ in pipeline.topic(s.masked_topic)}
    assert masked == new_ids  # only what the old group had not done; nothing skipped


def test_old_workers_still_running_are_refused_in_one_line(pipeline):
    s = pipeline.settings
    ensure_topics(s)
    commit_as_old_group(s, s.raw_topic, {p: 0 for p in range(s.topic_partitions)})
    assert pipeline.run("keys", "init").returncode == 0  # no dev-key warning in stderr
    old = Consumer(client_config(s, **{"group.id": legacy_group(s), "enable.auto.commit": False}))
    old.subscribe([s.masked_topic])
    stop = threading.Event()

    def member() -> None:  # an old worker: a live member of the old group
        while not stop.is_set():
            old.poll(0.2)

    thread = threading.Thread(target=member, daemon=True)
    thread.start()
    try:
        pipeline.wait_for(
            lambda: pipeline.run("status").returncode == 0 and _members(s) > 0, 60, "the old member to join"
        )
        result = pipeline.run("worker", STREAMS_STAGES="mask", STREAMS_LOG_LEVEL="WARNING", timeout=120)
    finally:
        stop.set()
        thread.join(10)
        old.close()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert legacy_group(s) in lines[0] and "stop every old `streams worker`" in lines[0]
    assert stage_group(s, "mask") not in _groups_with_offsets(s)


def _members(settings) -> int:
    from streams.ops.replay import OffsetAdmin

    return len(OffsetAdmin(settings, group=legacy_group(settings)).live_members())


def _groups_with_offsets(settings) -> set[str]:
    from streams.ops.replay import OffsetAdmin

    admin = OffsetAdmin(settings, group=stage_group(settings, "mask"))
    committed = admin.committed(settings.raw_topic, list(range(settings.topic_partitions)))
    return {admin.group} if any(o is not None for o in committed.values()) else set()
