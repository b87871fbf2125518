"""Faust commits past holes in a partition (issue 9 item 4; streams/pipeline/consumer.py).

A transaction's commit marker takes an offset that no consumer ever sees: one
transactional record at offset 0, then plain records, gives offsets {0, 2, 3, 4, 5} -
the same hole right after the first record that compaction leaves on the masked topic.
Stock faust-streaming 0.15.3 never commits past offset 1 there.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from streams.io.kafka import ensure_topics, group_lag
from tests.factories import masked_value

pytestmark = pytest.mark.integration



def test_sink_commits_to_the_end_of_a_partition_with_a_hole_after_offset_0(pipeline):
    s = pipeline.settings
    ensure_topics(s)
    ids = [f"hole-{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
    tx = Producer({"bootstrap.servers": s.kafka_bootstrap, "transactional.id": f"hole-{uuid.uuid4()}"})
    tx.init_transactions(30)
    tx.begin_transaction()
    tx.produce(s.masked_topic, key=ids[0].encode(), value=(masked_value(ids[0])), partition=0)
    tx.commit_transaction(30)  # record at 0, commit marker at 1
    plain = Producer({"bootstrap.servers": s.kafka_bootstrap, "enable.idempotence": True})
    for mid in ids[1:]:
        plain.produce(s.masked_topic, key=mid.encode(), value=(masked_value(mid)), partition=0)
    assert plain.flush(30) == 0

    pipeline.start("worker", STREAMS_STAGES="sink")
    pipeline.wait_for(lambda: pipeline.row_count() == 5, 120, "5 rows")

    def committed_to_end():
        committed, end = group_lag(s, [s.masked_topic])[(s.masked_topic, 0)]
        return committed == end == 6

    pipeline.wait_for(committed_to_end, 60, "the sink group's commit at the partition end (6)")
