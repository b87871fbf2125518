"""Small chaos runs in CI: kills and restarts during a steady flow, then a full audit.

One on a single broker (Kafka restarted whole), one on three brokers (a busy partition's
leader SIGKILLed and restarted). Both count copies on the masked and DLQ topics with a
``read_committed`` reader: any message id there twice fails the run.
"""

from __future__ import annotations

import pytest

from streams_dev import chaos

pytestmark = pytest.mark.integration


def test_small_chaos_run_loses_and_doubles_nothing(private_stack, tmp_path):
    report = chaos.run(private_stack, messages=3000, malformed=0.02, kills=2, rate=150, workdir=tmp_path, timeout=240)
    print(report.table())
    assert report.faults == {"worker SIGKILL": 2, "bridge SIGKILL": 2, "kafka restart": 1, "postgres restart": 1}
    assert report.injected == {"raw tombstone": 1, "over-long message id": 1, "masked tombstone": 3}
    assert report.messages == 3000 + 2 and report.malformed > 2
    assert report.lost == 0 and report.unexpected_rows == 0 and report.content_mismatches == 0
    assert report.rows == report.messages - report.malformed  # masked tombstones deleted their rows
    assert report.dead_lettered_ids == report.malformed and report.missing_dead_letters == 0
    assert report.wrong_reasons == 0 and report.failed_deletes == 0
    assert report.queue_depth == 0 and report.lag == 0
    assert report.ok


def test_chaos_on_three_brokers_with_a_leader_kill_writes_every_id_once(private_cluster, tmp_path):
    report = chaos.run(
        private_cluster,
        messages=3000,
        malformed=0.02,
        kills=2,
        rate=60,  # sending lasts 50 s: every fault lands while records flow
        workdir=tmp_path,
        timeout=240,
        leader_kills=1,
    )
    print(report.table())
    assert report.brokers == 3
    assert report.faults == {
        "worker SIGKILL": 2,
        "bridge SIGKILL": 2,
        "partition leader SIGKILL": 1,
        "postgres restart": 1,
    }
    assert len(report.killed_leaders) == 1
    assert report.lost == 0 and report.unexpected_rows == 0 and report.content_mismatches == 0
    assert report.rows == report.messages - report.malformed
    assert report.missing_dead_letters == 0 and report.wrong_reasons == 0
    assert report.queue_depth == 0 and report.lag == 0
    # The masked and DLQ topics as any read_committed consumer sees them: every id once.
    assert report.topic_records - report.topic_extra_copies == report.messages  # every id there
    assert report.topic_duplicated_ids == 0 and report.topic_extra_copies == 0, report.table()
    assert report.ok
