"""`streams replay` on the real stack: offsets move, the stage reprocesses, the table stays right."""

from __future__ import annotations

import json
import time

import pytest

from streams.privacy.keys import generate_document, write_document

pytestmark = pytest.mark.integration


def checksum(pipeline) -> str:
    """An ordered checksum of every column of user_logins."""
    return pipeline.query("SELECT md5(string_agg(t::text, '|' ORDER BY message_id)) AS h FROM user_logins t")[0]["h"]


def committed(pipeline, topic: str) -> dict[int, tuple[int, int]]:
    from streams.io.kafka import group_lag

    return {p: v for (t, p), v in group_lag(pipeline.settings, [topic]).items() if t == topic}


def replay(pipeline, *args: str, **env: str):
    """Run `streams replay`; a just-stopped worker may take a moment to leave the group."""
    return pipeline.wait_for(
        lambda: (r := pipeline.run("replay", *args, **env)).returncode == 0 and r,
        60,
        f"replay {' '.join(args)} to succeed",
    )


def drain(pipeline, topics: list[str], **env: str) -> None:
    worker = pipeline.start("worker", **env)
    pipeline.wait_for(lambda: pipeline.lag(topics) == 0, 120, f"the worker to commit {topics}")
    assert pipeline.stop(worker) == 0


def test_sink_replay_from_earliest_keeps_table_and_is_refused_while_running(pipeline, sample_path):
    sample = json.loads(sample_path.read_text())
    pipeline.send(sample)
    bridge = pipeline.start("bridge")
    worker = pipeline.start("worker")
    s = pipeline.settings
    pipeline.wait_for(lambda: pipeline.row_count() == 99, 120, "99 rows")
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic, s.masked_topic]) == 0, 60, "committed offsets")

    refused = pipeline.run("replay", "sink", "--to", "earliest")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "live member" in refused.stderr and "Traceback" not in refused.stderr
    assert all(end == c for c, end in committed(pipeline, s.masked_topic).values())  # nothing moved

    assert pipeline.stop(worker) == 0
    assert pipeline.stop(bridge) == 0
    before = checksum(pipeline)
    ends = {p: end for p, (_, end) in committed(pipeline, s.masked_topic).items()}

    dry = replay(pipeline, "sink", "--to", "earliest", "--dry-run")
    for p, end in ends.items():
        assert f"partition {p}: {end} -> 0" in dry.stdout
    assert {p: c for p, (c, _) in committed(pipeline, s.masked_topic).items()} == ends  # dry run changed nothing

    replay(pipeline, "sink", "--to", "earliest")
    # The masked topic is transactional: its end offsets count the commit markers too.
    assert pipeline.lag([s.masked_topic]) == sum(ends.values()) > len(pipeline.topic(s.masked_topic)) == 99
    drain(pipeline, [s.masked_topic], STREAMS_STAGES="sink")
    assert checksum(pipeline) == before
    assert pipeline.row_count() == 99


def test_mask_replay_after_join_key_change_from_timestamp_then_earliest(pipeline, sample_path):
    sample = [r for r in json.loads(sample_path.read_text()) if "ip" in r]
    first, second = sample[:50], sample[50:]
    s = pipeline.settings
    first_ids = set(pipeline.send(first))
    pipeline.start("bridge")
    pipeline.start("worker")
    pipeline.wait_for(lambda: pipeline.row_count() == len(first), 120, "the first rows")
    boundary_ms = int(time.time() * 1000)
    second_ids = set(pipeline.send(second))
    pipeline.wait_for(lambda: pipeline.row_count() == len(sample), 120, "every row")
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic, s.masked_topic]) == 0, 60, "committed offsets")
    for proc, _ in list(pipeline.procs):
        pipeline.stop(proc)
    old = {
        r["message_id"]: (r["masked_ip"], r["masked_device_id"]) for r in pipeline.query("SELECT * FROM user_logins")
    }

    # The masking change: a new join key version h2 (same encryption keys, so the vault stays readable).
    doc = json.loads(s.keys_file.read_text())
    doc["join"] = generate_document(join_version="h2")["join"]
    new_keys = s.keys_file.with_name("keys-h2.json")
    write_document(new_keys, doc)

    replay(pipeline, "mask", "--to", str(boundary_ms))
    assert pipeline.lag([s.raw_topic]) == len(second)
    drain(pipeline, [s.raw_topic, s.masked_topic], STREAMS_KEYS_FILE=str(new_keys))
    rows = {r["message_id"]: r for r in pipeline.query("SELECT * FROM user_logins")}
    assert len(rows) == len(sample)
    for mid in first_ids:  # sent before the timestamp: untouched
        assert (rows[mid]["masked_ip"], rows[mid]["masked_device_id"]) == old[mid]
    for mid in second_ids:  # sent after it: rewritten with the new join key
        assert rows[mid]["masked_ip"].startswith("h2.") and rows[mid]["masked_device_id"].startswith("h2.")
        assert rows[mid]["masked_ip"] != old[mid][0]

    replay(pipeline, "mask", "--to", "earliest")
    drain(pipeline, [s.raw_topic, s.masked_topic], STREAMS_KEYS_FILE=str(new_keys))
    rows = pipeline.query("SELECT * FROM user_logins")
    assert len(rows) == len(sample)
    assert all(r["masked_ip"].startswith("h2.") and r["masked_device_id"].startswith("h2.") for r in rows)
    assert all(r["masked_ip"] != old[r["message_id"]][0] for r in rows)
