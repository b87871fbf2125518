"""The whole pipeline on the real stack: SQS -> bridge -> Kafka -> mask -> sink -> PostgreSQL."""

from __future__ import annotations

import json

import pytest

from streams.privacy.masking import canonical_device_id, canonical_ip
from streams_dev.sandbox import local_env

pytestmark = pytest.mark.integration

SHARED_IP = "203.0.113.77"
PAIR = [
    {
        "user_id": "pair-1",
        "app_version": "2.00",
        "device_type": "ios",
        "ip": SHARED_IP,
        "locale": "DE",
        "device_id": "900-00-0001",
    },
    {
        "user_id": "pair-2",
        "app_version": "0.60",
        "device_type": "android",
        "ip": "::ffff:" + SHARED_IP,
        "locale": None,
        "device_id": "900-00-0002",
    },
]


def table_dump(pipeline) -> list[tuple]:
    return [tuple(r) for r in pipeline.query("SELECT *, xmin::text AS xmin FROM user_logins ORDER BY message_id")]


def test_sample_flows_end_to_end(pipeline, sample_path):
    sample = json.loads(sample_path.read_text())
    ids = pipeline.send(sample + PAIR)
    sample_ids, pair_ids = ids[: len(sample)], ids[len(sample) :]
    bad_index = next(i for i, r in enumerate(sample) if "foo" in r)
    valid_ids = set(ids) - {sample_ids[bad_index]}

    bridge = pipeline.start("bridge")
    worker = pipeline.start("worker", STREAMS_LOG_FORMAT="json")  # the leak checks below cover both formats
    pipeline.wait_for(lambda: pipeline.row_count() == len(valid_ids), 120, f"{len(valid_ids)} rows")
    pipeline.wait_for(lambda: pipeline.queue_depth() == 0, 60, "an empty queue")
    s = pipeline.settings
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic, s.masked_topic]) == 0, 60, "committed offsets")
    assert pipeline.stop(bridge) == 0
    assert pipeline.stop(worker) == 0

    rows = pipeline.query("SELECT * FROM user_logins")
    assert {r["message_id"] for r in rows} == valid_ids
    assert sum(r["message_id"] in set(sample_ids) for r in rows) == 99

    dead = pipeline.dead_letters()
    assert [(d["message_id"], d["reason"], d["stage"]) for d in dead] == [
        (sample_ids[bad_index], "missing_field", "mask")
    ]
    assert "user_id" in dead[0]["detail"]

    by_id = {r["message_id"]: r for r in rows}
    assert by_id[pair_ids[0]]["masked_ip"] == by_id[pair_ids[1]]["masked_ip"]
    assert by_id[pair_ids[0]]["masked_device_id"] != by_id[pair_ids[1]]["masked_device_id"]
    assert (by_id[pair_ids[0]]["app_version"], by_id[pair_ids[0]]["app_version_raw"]) == (2_000_000, "2.00")
    null_locales = sum("locale" in r and r["locale"] is None for r in sample)  # 29: the 30th is the bad message
    assert sum(r["locale"] is None for r in rows if r["message_id"] in set(sample_ids)) == null_locales
    sent = pipeline.query("SELECT bool_and(create_date = (sent_at AT TIME ZONE 'UTC')::date) AS ok FROM user_logins")
    assert sent[0]["ok"] is True

    # No plaintext PII anywhere it must not be.
    secrets = {r[f] for r in sample + PAIR if "ip" in r for f in ("ip", "device_id")}
    table_text = "\n".join(map(str, pipeline.query("SELECT * FROM user_logins")))
    masked_bytes = b"".join(v for _, v in pipeline.topic(s.masked_topic))
    dlq_text = "\n".join(d["reason"] + d["detail"] for d in dead)
    logs = pipeline.logs()
    for value in secrets:
        assert value not in table_text
        assert value.encode() not in masked_bytes
        assert value not in dlq_text
        assert value not in logs
    json_lines = [json.loads(line) for line in pipeline.log_of(worker).splitlines() if line.startswith("{")]
    assert any(e["logger"].startswith("streams") for e in json_lines)
    assert any(e["logger"].startswith("faust") for e in json_lines)  # Faust's own logs in the same format

    # The vault holds one ciphertext per distinct value per field (and user: erasure, migration 0006), none in clear.
    vault = pipeline.query("SELECT field, count(DISTINCT token) AS n FROM pii_vault GROUP BY field ORDER BY field")
    distinct_ips = len({r["ip"] for r in sample + PAIR if "ip" in r} - {"::ffff:" + SHARED_IP})
    assert {r["field"]: r["n"] for r in vault}["ip"] == distinct_ips

    # Running the sink again over the whole masked topic changes no row (xmin included).
    before = table_dump(pipeline)
    replay_app = s.app_id + "-replay"
    replay_group = replay_app + "-sink"  # the sink stage's group under that app id
    sink = pipeline.start("worker", STREAMS_STAGES="sink", STREAMS_APP_ID=replay_app)
    pipeline.wait_for(
        lambda: pipeline.lag([s.masked_topic], group=replay_group) == 0, 90, "the replayed sink to catch up"
    )
    assert pipeline.stop(sink) == 0
    assert table_dump(pipeline) == before


def test_run_drain_seeds_runs_and_summarises(pipeline, sample_path):
    """`make run DRAIN=1`'s command: seeds, runs both stages, exits by itself with a summary."""
    result = pipeline.run("run", "--seed", str(sample_path), "--drain", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "seeded 100 messages" in out
    assert "rows in user_logins: 99" in out
    assert "dead letters: 1" in out and "missing_field: 1" in out
    assert "masked_ip=h1." in out
    assert pipeline.row_count() == 99 and pipeline.queue_depth() == 0
    for record in json.loads(sample_path.read_text()):
        if "ip" in record:
            assert record["ip"] not in out and record["device_id"] not in out


def test_make_run_seals_values_that_only_reveal_through_kms_opens(pipeline, sample_path):
    """`make run`'s settings (local.env) are per-user key mode: the worker seals, nothing is
    in pii_vault, no key file exists, and `streams reveal` opens a value through the KMS."""
    kms = {k: v for k, v in local_env().items() if k.startswith("STREAMS_KMS_")}
    pipeline.env.update(kms)
    assert kms.get("STREAMS_KMS_MAC_KEY_ID") and kms.get("STREAMS_KMS_KEY_ID"), kms
    result = pipeline.run("run", "--seed", str(sample_path), "--drain", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rows in user_logins: 99" in result.stdout
    assert "sealed values: 99, pii_vault entries: 0" in result.stdout
    assert "masked_ip=g1." in result.stdout
    assert not pipeline.settings.keys_file.exists(), "per-user key mode loads no key file"
    assert pipeline.query("SELECT count(*) AS n FROM key_lifetimes")[0]["n"] >= 1

    row = pipeline.query("SELECT message_id, user_id FROM sealed_values ORDER BY message_id LIMIT 1")[0]
    records = [r for r in json.loads(sample_path.read_text()) if r.get("user_id") == row["user_id"]]
    sent = {(canonical_ip(r["ip"])[0], canonical_device_id(r["device_id"])) for r in records}
    shown = pipeline.run("reveal", "--message-id", row["message_id"], "--operator", "ann", "--reason", "DEV-1")
    assert shown.returncode == 0, shown.stderr
    values = {item["field"]: item["value"] for item in map(json.loads, shown.stdout.splitlines())}
    assert (values["ip"], values["device_id"]) in sent
    audit = pipeline.query("SELECT action, user_id, outcome FROM pii_reveal_audit WHERE operator = 'ann'")
    assert {tuple(a.values()) for a in audit} == {("reveal", row["user_id"], "revealed")}
