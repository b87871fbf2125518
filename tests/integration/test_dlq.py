"""`streams dlq list|redrive` on the real stack: dead letters come back with their message ids."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

GOOD = {"user_id": "u-ok", "app_version": "2.3.0", "device_type": "ios", "ip": "198.51.100.7", "locale": "DE", "device_id": "111-22-3333"}
BLOCKED = {**GOOD, "user_id": "u-blocked", "ip": "198.51.100.8", "device_id": "444-55-6666"}
BROKEN = {"foo": "oops_wrong_msg_type", "bar": "123"}


def test_redrive_after_cause_removed_lands_with_original_id(pipeline):
    s = pipeline.settings
    bridge = pipeline.start("bridge")
    pipeline.start("worker")
    pipeline.wait_for(lambda: pipeline.query("SELECT to_regclass('user_logins') AS t")[0]["t"], 120, "the migrated table")
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
        120, "the broken message dead-lettered again by the mask stage",
    )
    assert pipeline.row_count() == 2
    assert pipeline.stop(bridge) == 0
