"""`streams dlq list|redrive` on the real stack: dead letters come back with their message ids."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

GOOD = {
    "user_id": "u-ok",
    "app_version": "2.3.0",
    "device_type": "ios",
    "ip": "198.51.100.7",
    "locale": "DE",
    "device_id": "111-22-3333",
}
BLOCKED = {**GOOD, "user_id": "u-blocked", "ip": "198.51.100.8", "device_id": "444-55-6666"}
BROKEN = {"foo": "oops_wrong_msg_type", "bar": "123"}


def test_redrive_after_cause_removed_lands_with_original_id(pipeline):
    s = pipeline.settings
    bridge = pipeline.start("bridge")
    pipeline.start("worker")
    pipeline.wait_for(
        lambda: pipeline.query("SELECT to_regclass('user_logins') AS t")[0]["t"], 120, "the migrated table"
    )
    # The cause: a constraint a DBA added by mistake refuses one user's rows.
    pipeline.query("ALTER TABLE user_logins ADD CONSTRAINT no_blocked CHECK (user_id <> 'u-blocked')")
    good_id, blocked_id, broken_id = pipeline.send([GOOD, BLOCKED, BROKEN])
    pipeline.wait_for(lambda: len(pipeline.dead_letters()) == 2, 120, "two dead letters")
    pipeline.wait_for(lambda: pipeline.row_count() == 1, 60, "the good row")

    listing = pipeline.run("dlq", "list")
    assert listing.returncode == 0, listing.stderr
    assert "rejected_by_database" in listing.stdout and blocked_id in listing.stdout
    assert "missing_field" in listing.stdout and broken_id in listing.stdout
    for secret in ("198.51.100.8", "444-55-6666", "198.51.100.7"):
        assert secret not in listing.stdout

    dry = pipeline.run("dlq", "redrive", "--reason", "rejected_by_database", "--dry-run")
    assert "would redrive 1 dead letters" in dry.stdout, dry.stderr

    # The cause removed, the chosen dead letter goes back and becomes its row.
    pipeline.query("ALTER TABLE user_logins DROP CONSTRAINT no_blocked")
    done = pipeline.run("dlq", "redrive", "--reason", "rejected_by_database")
    assert done.returncode == 0 and "redrove 1" in done.stdout, done.stderr
    pipeline.wait_for(lambda: pipeline.row_count() == 2, 120, "the redriven row")
    row = pipeline.query("SELECT * FROM user_logins WHERE message_id = $1", blocked_id)[0]
    assert row["user_id"] == "u-blocked" and row["masked_ip"].startswith("h")

    # A mask-stage dead letter goes back through the mask stage (still broken: dead-lettered again, same id).
    done = pipeline.run("dlq", "redrive", "--id", broken_id)
    assert done.returncode == 0 and f"1 to {s.raw_topic}" in done.stdout, done.stderr
    pipeline.wait_for(
        lambda: [d["message_id"] for d in pipeline.dead_letters() if d["reason"] == "missing_field"] == [broken_id] * 2,
        120,
        "the broken message dead-lettered again by the mask stage",
    )
    assert pipeline.row_count() == 2
    assert pipeline.stop(bridge) == 0


def keys(pipeline, *args):
    result = pipeline.run("keys", *args, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_sink_redrive_remasks_under_current_keys_and_refuses_a_retired_key(pipeline):
    """A sink-stage dead letter holds a masked record frozen with its day's keys: redrive re-masks it."""
    s = pipeline.settings
    bridge = pipeline.start("bridge")
    worker = pipeline.start("worker")
    pipeline.wait_for(
        lambda: pipeline.query("SELECT to_regclass('user_logins') AS t")[0]["t"], 120, "the migrated table"
    )
    pipeline.query("ALTER TABLE user_logins ADD CONSTRAINT no_blocked CHECK (user_id NOT LIKE 'u-blocked%')")
    _, under_k1 = pipeline.send([GOOD, BLOCKED])  # masked under h1 / k1
    pipeline.wait_for(lambda: len(pipeline.dead_letters()) == 1 and pipeline.row_count() == 1, 120, "k1 dead letter")

    keys(pipeline, "rotate", "encryption")  # k2; the restarted worker masks under h1 / k2
    pipeline.stop(worker)
    worker = pipeline.start("worker")
    blocked_2 = {**BLOCKED, "user_id": "u-blocked-2", "ip": "::ffff:198.51.100.9", "device_id": " 777-88-9999 "}
    (under_k2,) = pipeline.send([blocked_2])
    pipeline.wait_for(lambda: len(pipeline.dead_letters()) == 2, 120, "k2 dead letter")
    assert {d["stage"] for d in pipeline.dead_letters()} == {"sink"}

    # Then the join key moves to h2 (h1 keys removed) and k1 is retired.
    keys(pipeline, "rotate", "join")
    keys(pipeline, "rejoin", "--wait", "0.2")
    keys(pipeline, "reencrypt")
    keys(pipeline, "retire", "k1")
    assert json.loads(keys(pipeline, "list").stdout) == {
        "join": {"active": "h2", "next": None, "versions": ["h2"]},
        "encryption": {"active": "k2", "keys": ["k2"]},
    }
    pipeline.query("ALTER TABLE user_logins DROP CONSTRAINT no_blocked")

    # Under a retired key: refused in one line, and the whole redrive with it (nothing sent).
    for args in (("--id", under_k1), ("--reason", "rejected_by_database"), ("--id", under_k1, "--dry-run")):
        refused = pipeline.run("dlq", "redrive", *args)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line and under_k1 in line and "'k1'" in line and "retired" in line
        for secret in ("198.51.100.8", "444-55-6666"):
            assert secret not in refused.stdout + refused.stderr

    # Under a live key: re-masked with today's keys (h2 token, k2 token-bound ciphertext).
    done = pipeline.run("dlq", "redrive", "--id", under_k2)
    assert done.returncode == 0 and f"redrove 1 dead letters; 1 to {s.masked_topic}" in done.stdout, done.stderr
    pipeline.wait_for(lambda: pipeline.row_count() == 2, 120, "the redriven row")
    row = pipeline.query("SELECT * FROM user_logins WHERE message_id = $1", under_k2)[0]
    assert row["masked_ip"].startswith("h2.") and row["masked_device_id"].startswith("h2.")
    vault = pipeline.query(
        "SELECT field, key_id, ciphertext FROM pii_vault WHERE (field, token) IN (('ip', $1), ('device_id', $2))",
        row["masked_ip"],
        row["masked_device_id"],
    )
    assert len(vault) == 2 and all(v["key_id"] == "k2" and v["ciphertext"].startswith("k2.v2.") for v in vault)
    assert pipeline.query("SELECT count(*) AS n FROM user_logins WHERE message_id = $1", under_k1)[0]["n"] == 0
    assert {
        r["v"]
        for r in pipeline.query(
            "SELECT split_part(masked_ip, '.', 1) AS v FROM user_logins UNION SELECT split_part(token, '.', 1) FROM pii_vault"
        )
    } == {"h2"}
    assert {r["key_id"] for r in pipeline.query("SELECT DISTINCT key_id FROM pii_vault")} == {"k2"}
    out = pipeline.run("reveal", "--message-id", under_k2, "--operator", "ops", "--reason", "INC-7")
    assert [json.loads(line)["value"] for line in out.stdout.splitlines()] == ["198.51.100.9", "777-88-9999"], (
        out.stderr
    )
    pipeline.stop(worker)
    pipeline.stop(bridge)
