"""`streams status` on the real stack: offsets, lag, rows, dead letters and queue depth."""

from __future__ import annotations

import json
import re

import pytest

from streams.io.kafka import group_lag

pytestmark = pytest.mark.integration


def test_status_reports_each_stage_rows_dead_letters_and_queue(pipeline, sample_path):
    s = pipeline.settings
    sample = json.loads(sample_path.read_text())
    pipeline.send(sample)
    bridge = pipeline.start("bridge")
    worker = pipeline.start("worker")
    pipeline.wait_for(lambda: pipeline.row_count() == 99, 120, "99 rows")
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic, s.masked_topic]) == 0, 60, "committed offsets")
    pipeline.stop(worker)

    pipeline.send(sample[:7])  # a backlog the stopped worker has not seen
    pipeline.wait_for(
        lambda: pipeline.lag([s.raw_topic]) == 7 and pipeline.queue_depth() == 0, 60, "7 records of raw lag"
    )
    out = pipeline.run("status")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "rows in user_logins: 99" in text
    assert "dead letters: 1 (missing_field 1)" in text
    assert f"queue {s.sqs_queue}: ~0 messages" in text
    assert f"stage mask ({s.raw_topic}): lag 7" in text
    assert f"stage sink ({s.masked_topic}): lag 0" in text
    offsets = group_lag(s, [s.raw_topic])
    for (_, p), (committed, end) in offsets.items():
        assert re.search(rf"^\s+{p}\s+{committed}\s+{end}\s+{end - committed}$", text, re.M), text

    # --follow draws a progress bar while the backlog drains, and --until-idle ends it at 100%.
    follow = pipeline.start("status", "--follow", "--interval", "0.5", "--until-idle")
    pipeline.stopped.add(follow)  # it is expected to exit by itself
    pipeline.start("worker")
    pipeline.wait_for(lambda: follow.poll() is not None, 120, "status --follow to see the backlog drained")
    assert follow.returncode == 0
    log = pipeline.logs()
    assert re.search(r"drained \[\.+\]\s+0%  backlog [1-9]", log) and "100%  backlog 0" in log
    pipeline.stop(bridge)
