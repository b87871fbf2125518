"""Issue 19 item 6: `keys retire` refuses while a running worker still writes under that key."""

from __future__ import annotations

import pytest

from streams.privacy.key_use import running_writers

pytestmark = pytest.mark.integration


def test_retire_refuses_while_a_running_worker_writes_under_the_key(pipeline):
    s = pipeline.settings
    assert pipeline.run("keys", "init").returncode == 0
    worker = pipeline.start("worker", STREAMS_STAGES="mask")
    writers = pipeline.wait_for(lambda: running_writers(s), 90, "the mask worker in its group")
    assert {(w.encryption_key_id, w.join_version) for w in writers} == {("k1", "h1")}

    assert pipeline.run("keys", "rotate", "encryption").returncode == 0  # k2 active in the file
    refused = pipeline.run("keys", "retire", "k1")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert "running mask worker(s) still write under k1" in lines[0] and "restart them" in lines[0]

    pipeline.stop(worker)  # restarted workers load k2; this one is simply gone
    pipeline.wait_for(lambda: not running_writers(s), 60, "the worker to leave its group")
    retired = pipeline.run("keys", "retire", "k1")
    assert retired.returncode == 0, retired.stderr
