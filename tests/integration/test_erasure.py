"""`streams erase` and `streams export` on the real stack (issue 19 item 4).

Users U and V share an ip, and U also has a record in the DLQ. A topic snapshot and a data
dump are taken, U is erased, and every point is checked against them: rows and vault
entries gone for U and kept for V, tombstones on the masked topic (read read_committed),
no resurrection by re-produced masked records, a mask replay from earliest or a DLQ
redrive, reveal of U refused and audited, V still revealable.
"""

from __future__ import annotations

import json
import signal

import pytest

from streams.io.kafka import read_topic, send_records

pytestmark = pytest.mark.integration

SHARED_IP = "203.0.113.50"
U = "u-erase-me"
V = "u-keep-me"
U1 = {
    "user_id": U,
    "app_version": "2.3.0",
    "device_type": "ios",
    "ip": SHARED_IP,
    "locale": "DE",
    "device_id": "U-DEV-1",
}
U2 = {**U1, "ip": "198.51.100.77"}
U_BROKEN = {**U1, "app_version": 5}  # a number: dead-lettered by the mask stage (wrong_type), with U's plaintext
V1 = {**U1, "user_id": V, "device_id": "V-DEV-9"}
ERASE = ("erase", "--user-id", U, "--reason", "gdpr_art17", "--ticket", "PRIV-42")


def latest(pipeline) -> dict[str, bytes | None]:
    """Message id -> latest value on the masked topic, read read_committed (None: a tombstone)."""
    s = pipeline.settings
    found: dict[str, bytes | None] = {}
    for key, value in read_topic(s, s.masked_topic, committed_only=True):
        if key is not None:
            found[key.decode()] = value
    return found


def masked_of(pipeline, user_id: str) -> list[dict]:
    s = pipeline.settings
    records = [pipeline.codecs.masked.decode(v) for _, v in read_topic(s, s.masked_topic, committed_only=True) if v]
    return [r for r in records if r["user_id"] == user_id]


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def start(pipeline):
    bridge = pipeline.start("bridge")
    worker = pipeline.start("worker")
    pipeline.wait_for(
        lambda: pipeline.query("SELECT to_regclass('erasure_ledger') AS t")[0]["t"], 120, "the migrated tables"
    )
    return bridge, worker


def test_erase_user_against_a_snapshot_and_a_dump(pipeline):
    s = pipeline.settings
    bridge, worker = start(pipeline)
    u1, u2, u_broken, v1 = pipeline.send([U1, U2, U_BROKEN, V1])
    pipeline.wait_for(lambda: pipeline.row_count() == 3, 120, "three rows")
    pipeline.wait_for(lambda: len(pipeline.dead_letters()) == 1, 60, "U's dead letter")
    pipeline.wait_for(
        lambda: len(pipeline.query("SELECT 1 FROM erasure_stage_versions")) == 2, 30, "both stages' heartbeats"
    )

    # The snapshot and the dump, taken before the erasure.
    snapshot = read_topic(s, s.masked_topic, committed_only=True)
    dump_rows = {r["message_id"]: dict(r) for r in pipeline.query("SELECT * FROM user_logins")}
    dump_vault = [dict(r) for r in pipeline.query("SELECT user_id, field, token FROM pii_vault")]
    assert {r["user_id"] for r in dump_vault} == {U, V}
    shared_token = dump_rows[v1]["masked_ip"]
    assert dump_rows[u1]["masked_ip"] == shared_token  # U and V share the ip: one token, an entry each

    # Export lists what is held, without values.
    listing = json.loads(ok(pipeline.run("export", "--user-id", U)).stdout)
    assert {x["message_id"] for x in listing["logins"]} == {u1, u2}
    assert len(listing["vault"]) == 3 and listing["dead_letters"] == 1 and listing["masked_topic_records"] == 2
    assert SHARED_IP not in json.dumps(listing) and "U-DEV-1" not in json.dumps(listing)

    # The dry run lists what would go and the known limits, and changes nothing.
    dry = ok(pipeline.run(*ERASE, "--dry-run")).stdout
    assert "would delete 2 row(s)" in dry and "would write 2 tombstone(s)" in dry
    assert "(1 of them shared with another user)" in dry and "dead letters naming the user" in dry
    for limit in ("key store", "retention", "pseudonyms", "shares with another user"):
        assert limit in dry
    assert pipeline.row_count() == 3 and not pipeline.query("SELECT 1 FROM erasure_ledger")

    out = ok(pipeline.run(*ERASE, timeout=120)).stdout
    assert "confirm: 2 running stage(s)" in out and "tombstones: 2" in out, out
    # Keyring mode (this test's): no per-user data keys to shred, and the output says so.
    assert "shred_key_material: no data keys of this user" in out

    # Rows and vault entries: gone for U, kept for V (the shared ip too).
    assert [r["message_id"] for r in pipeline.query("SELECT message_id FROM user_logins")] == [v1]
    vault = {(r["user_id"], r["field"], r["token"]) for r in pipeline.query("SELECT * FROM pii_vault")}
    assert {u for u, _, _ in vault} == {V} and (V, "ip", shared_token) in vault
    ledger = pipeline.query("SELECT * FROM erasure_ledger")
    assert [(r["user_id"], r["reason"], r["ticket"]) for r in ledger] == [(U, "gdpr_art17", "PRIV-42")]
    assert ledger[0]["db_user"]
    # Tombstones on the masked topic for U's ids (read_committed); V's record stays.
    now = latest(pipeline)
    assert now[u1] is None and now[u2] is None and now[v1] is not None
    assert u_broken not in now  # never masked

    # Reveal of U: refused and audited as erased; V stays revealable, the shared value as V's.
    refused = pipeline.run("export", "--user-id", U, "--reveal", "--operator", "ann", "--reason", "DSR-7")
    assert refused.returncode == 1 and "erasure ledger" in refused.stderr and SHARED_IP not in refused.stdout
    audit = pipeline.query("SELECT outcome, user_id FROM pii_reveal_audit ORDER BY id")
    assert audit[-1]["outcome"] == "erased" and audit[-1]["user_id"] == U
    gone = pipeline.run("reveal", "--token", dump_rows[u1]["masked_device_id"], "--operator", "ann", "--reason", "x")
    assert gone.returncode == 1 and "U-DEV-1" not in gone.stdout
    shared = ok(pipeline.run("reveal", "--token", shared_token, "--operator", "ann", "--reason", "INC-9"))
    assert json.loads(shared.stdout)["value"] == SHARED_IP
    v_export = json.loads(
        ok(pipeline.run("export", "--user-id", V, "--reveal", "--operator", "ann", "--reason", "DSR-8")).stdout
    )
    assert sorted(x["value"] for x in v_export["vault"]) == sorted([SHARED_IP, "V-DEV-9"])
    assert {r["outcome"] for r in pipeline.query("SELECT outcome FROM pii_reveal_audit WHERE user_id = $1", V)} == {
        "revealed"
    }

    # A restore: U's old masked records re-produced from the snapshot do not bring U back.
    old = [(s.masked_topic, k, v) for k, v in snapshot if k is not None and k.decode() in (u1, u2)]
    assert len(old) == 2
    send_records(s, old)
    pipeline.wait_for(lambda: pipeline.lag([s.masked_topic]) == 0, 120, "the sink to read the restored records")
    assert not pipeline.query("SELECT 1 FROM user_logins WHERE user_id = $1", U)
    assert not pipeline.query("SELECT 1 FROM pii_vault WHERE user_id = $1", U)

    # A mask replay from earliest reprocesses U's raw records (plaintext until retention): none comes back,
    # and U's broken record is dropped, not dead-lettered again.
    u_on_masked = len(masked_of(pipeline, U))
    assert pipeline.stop(worker) == 0
    pipeline.wait_for(
        lambda: (r := pipeline.run("replay", "mask", "--to", "earliest")).returncode == 0 and r, 60, "the replay"
    )
    pipeline.start("worker")
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic, s.masked_topic]) == 0, 120, "the replay to finish")
    assert [r["message_id"] for r in pipeline.query("SELECT message_id FROM user_logins")] == [v1]
    assert len(masked_of(pipeline, U)) == u_on_masked
    assert len(pipeline.dead_letters()) == 1

    # Redrive of U's dead letter: dropped before anything is sent.
    redrive = ok(pipeline.run("dlq", "redrive", "--id", u_broken))
    assert "redrove 0 dead letters" in redrive.stdout and "dropped 1" in redrive.stdout
    assert pipeline.stop(bridge) == 0


def test_erase_waits_for_stages_and_resumes_after_kill_9(pipeline):
    start(pipeline)
    u1, v1 = pipeline.send([U1, V1])
    pipeline.wait_for(lambda: pipeline.row_count() == 2, 120, "two rows")

    # A live stage that does not confirm stops the erasure before anything is deleted, named in one line.
    pipeline.query("INSERT INTO erasure_stage_versions (instance, stage, version) VALUES ('mask@stuck/1', 'mask', 0)")
    stuck = pipeline.run(*ERASE, "--wait", "3")
    assert stuck.returncode == 1 and "mask@stuck/1" in stuck.stderr and len(stuck.stderr.strip().splitlines()) == 1
    assert pipeline.row_count() == 2
    # U is in the ledger, the rows not deleted yet: reveal of U is refused and audited as erased; V's is not.
    ann = ("--operator", "ann", "--reason", "INC-1")
    device = pipeline.query("SELECT masked_device_id FROM user_logins WHERE message_id = $1", u1)[0][0]
    for what in (("--message-id", u1), ("--token", device)):
        refused = pipeline.run("reveal", *what, *ann)
        assert refused.returncode == 1 and "erasure ledger" in refused.stderr and "U-DEV-1" not in refused.stdout
        assert pipeline.query("SELECT outcome FROM pii_reveal_audit ORDER BY id DESC LIMIT 1")[0][0] == "erased"
    assert "V-DEV-9" in ok(pipeline.run("reveal", "--message-id", v1, *ann)).stdout
    pipeline.query("DELETE FROM erasure_stage_versions WHERE instance = 'mask@stuck/1'")

    # kill -9 after the delete, before the tombstones: rerun resumes the same ledger entry.
    killed = pipeline.run(*ERASE, timeout=120, STREAMS_FAULT="erase_after_delete")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [r["message_id"] for r in pipeline.query("SELECT message_id FROM user_logins")] == [v1]
    assert latest(pipeline)[u1] is not None  # no tombstone yet
    # The deleted row's id was kept in the delete's own transaction: the rerun tombstones it.
    assert [r["message_id"] for r in pipeline.query("SELECT message_id FROM erasure_ids")] == [u1]

    resumed = ok(pipeline.run(*ERASE, timeout=120)).stdout
    assert "resuming ledger entry" in resumed and "tombstones: 1" in resumed
    again = ok(pipeline.run(*ERASE, timeout=120)).stdout
    assert "already erased" in again and "tombstones: 0" in again
    assert len(pipeline.query("SELECT 1 FROM erasure_ledger")) == 1
    steps = {r["step"] for r in pipeline.query("SELECT step FROM erasure_steps")}
    assert steps == {"sink_offsets", "confirmed", "keys", "rows", "tombstones", "done"}
    assert not pipeline.query("SELECT 1 FROM erasure_ids")  # forgotten once done
    assert latest(pipeline)[u1] is None and latest(pipeline)[v1] is not None
    assert not pipeline.query("SELECT 1 FROM pii_vault WHERE user_id = $1", U)
    # The ledger is append-only, for the owner too.
    with pytest.raises(Exception, match="append-only"):
        pipeline.query("DELETE FROM erasure_ledger")

    # Two runs at once for one user share one ledger entry (found or appended under a per-user lock).
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    erase_v = [sys.executable, "-m", "streams", "erase", "--user-id", V, "--reason", "gdpr_art17"]
    runs = [
        subprocess.Popen(erase_v, env={**os.environ, **pipeline.env}, cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    assert [r.wait(timeout=120) for r in runs] == [0, 0]
    assert len(pipeline.query("SELECT 1 FROM erasure_ledger WHERE user_id = $1", V)) == 1
    assert pipeline.row_count() == 0 and latest(pipeline)[v1] is None


def test_tombstones_read_the_masked_topic_only_from_the_sinks_offsets(pipeline):
    """After the sink drained, the tombstone step reads only what the sink had not applied, and
    still tombstones every id of the user: deleted rows by id, the unapplied record by reading."""
    s = pipeline.settings
    bridge, worker = start(pipeline)
    others = [{**V1, "device_id": f"V-DEV-{i}"} for i in range(6)]
    u1, u2, *v_ids = pipeline.send([U1, U2, *others])
    pipeline.wait_for(lambda: pipeline.row_count() == 8, 120, "eight rows")
    pipeline.wait_for(lambda: pipeline.lag([s.masked_topic]) == 0, 60, "the sink to commit")
    # The sink stops; a mask-only worker masks one more login of U, which no row holds.
    assert pipeline.stop(worker) == 0
    pipeline.start("worker", STREAMS_STAGES="mask")
    (u3,) = pipeline.send([{**U1, "device_id": "U-DEV-3"}])
    pipeline.wait_for(lambda: u3 in latest(pipeline), 120, "U's unapplied masked record")
    held = len(read_topic(s, s.masked_topic, committed_only=True))
    assert held == 9

    out = ok(pipeline.run(*ERASE, timeout=120)).stdout
    assert "tombstones: 3" in out, out
    detail = pipeline.query("SELECT detail FROM erasure_steps WHERE step = 'tombstones'")[0]["detail"]
    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert detail["full_scan"] is False and detail["rows"] == 2
    assert 1 <= detail["scanned"] < held  # U3's record only: the rest the sink had applied
    now = latest(pipeline)
    assert now[u1] is None and now[u2] is None and now[u3] is None
    assert all(now[v] is not None for v in v_ids)

    # A user erased before is read for in the whole topic (the sink dropped their re-produced
    # records without a row); the tombstones above are found and not written twice.
    again = ok(pipeline.run(*ERASE, "--new-request", timeout=120)).stdout
    assert "tombstones: 0" in again and f"({held + 3} masked record(s) read, the whole topic)" in again, again
    # --full-scan reads the whole topic for a first erasure too.
    erase_v = ("erase", "--user-id", V, "--reason", "gdpr_art17", "--full-scan")
    full = ok(pipeline.run(*erase_v, timeout=120)).stdout
    assert "tombstones: 6" in full and f"({held + 3} masked record(s) read, the whole topic)" in full, full
    after = latest(pipeline)
    assert all(after[v] is None for v in v_ids)
    assert pipeline.stop(bridge) == 0


def test_the_vault_is_rekeyed_by_user_keeping_existing_entries(pipeline, tmp_path):
    """Migration 0006 on a database with data: one entry per user of a token, an unowned one kept."""
    import asyncio
    import shutil

    from streams.io.postgres import connect, migrate, migration_files

    before = tmp_path / "before"
    before.mkdir()
    for version, path in migration_files():
        if version < 6:
            shutil.copy(path, before / path.name)
    login = "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id,"
    login += " create_date, app_version_raw, sent_at) VALUES ($1, $2, 'ios', $3, $4, '2024-05-01', '1', now())"

    async def go():
        conn = await connect(pipeline.settings.pg_dsn.get_secret_value())
        try:
            await migrate(conn, before)
            await conn.execute(login, "m1", U, "h1.shared", "h1.du")
            await conn.execute(login, "m2", V, "h1.shared", "h1.dv")
            await conn.executemany(
                "INSERT INTO pii_vault (field, token, key_id, ciphertext) VALUES ($1, $2, 'k1', $3)",
                [
                    ("ip", "h1.shared", "c-shared"),
                    ("device_id", "h1.du", "c-du"),
                    ("device_id", "h1.dv", "c-dv"),
                    ("ip", "h1.orphan", "c-orphan"),
                ],
            )
            await migrate(conn)
            return {tuple(r) for r in await conn.fetch("SELECT user_id, field, token, ciphertext FROM pii_vault")}
        finally:
            await conn.close()

    assert asyncio.run(go()) == {
        (U, "ip", "h1.shared", "c-shared"),
        (V, "ip", "h1.shared", "c-shared"),
        (U, "device_id", "h1.du", "c-du"),
        (V, "device_id", "h1.dv", "c-dv"),
        ("", "ip", "h1.orphan", "c-orphan"),
    }


def test_a_login_role_granted_streams_eraser_can_erase_and_not_rewrite_the_ledger(pipeline):
    import asyncio
    import uuid

    from streams.io.postgres import fetch
    from tests.integration.test_privacy import as_role

    start(pipeline)
    pipeline.send([U1])
    pipeline.wait_for(lambda: pipeline.row_count() == 1, 120, "the row")
    role = f"eraser_test_{uuid.uuid4().hex[:10]}"  # roles are cluster-wide: a unique name, dropped after
    pipeline.query(f'CREATE ROLE "{role}" LOGIN IN ROLE streams_eraser')
    try:
        dsn = as_role(pipeline, role)
        ok(pipeline.run(*ERASE, timeout=120, STREAMS_PG_DSN=dsn))
        assert pipeline.row_count() == 0
        assert pipeline.query("SELECT db_user FROM erasure_ledger")[0]["db_user"] == role
        for sql in (
            "UPDATE erasure_ledger SET reason = 'x'",
            "DELETE FROM erasure_steps",
            "SELECT ciphertext FROM pii_vault",
            "INSERT INTO user_logins (message_id) VALUES ('x')",
            "DROP TABLE user_logins",
        ):
            with pytest.raises(Exception, match="permission denied|must be owner"):
                asyncio.run(fetch(dsn, sql))
    finally:
        pipeline.query(f'DROP ROLE "{role}"')


def test_postgres_down_is_waited_out_by_the_stages_and_the_command(fault_pipeline, private_stack):
    """PostgreSQL stopped while a worker runs and `streams erase` starts: both retry, then finish."""
    import os
    import subprocess
    import sys

    from streams_dev import stack
    from tests.helpers import REPO

    p = fault_pipeline
    start(p)
    (u1,) = p.send([U1])
    p.wait_for(lambda: p.row_count() == 1, 120, "the row")
    p.wait_for(lambda: len(p.query("SELECT 1 FROM erasure_stage_versions")) == 2, 30, "both stages' heartbeats")
    p.deploy()
    stack.stop_service(private_stack, "postgres")
    try:
        p.wait_for(lambda: "erasure ledger not refreshed" in p.logs(), 60, "the stages to retry the ledger")
        out_path, err_path = p.workdir / "erase.out", p.workdir / "erase.err"
        with out_path.open("w") as out, err_path.open("w") as err:
            erase = subprocess.Popen(
                [sys.executable, "-m", "streams", *ERASE], env={**os.environ, **p.env}, cwd=REPO, stdout=out, stderr=err
            )
        p.wait_for(lambda: err_path.read_text().count("failed (") >= 2, 60, "the command to retry")
        assert erase.poll() is None, err_path.read_text()
    finally:
        stack.start_service(private_stack, "postgres")
    assert erase.wait(timeout=180) == 0, err_path.read_text()
    assert "tombstones: 1" in out_path.read_text()
    assert p.row_count() == 0 and latest(p)[u1] is None


def test_a_mask_only_worker_needs_only_the_erasure_watch_role(pipeline):
    import asyncio
    import uuid

    from streams.io.postgres import fetch
    from tests.integration.test_privacy import as_role

    pipeline.migrate()
    role = f"mask_test_{uuid.uuid4().hex[:10]}"  # roles are cluster-wide: a unique name, dropped after
    pipeline.query(f'CREATE ROLE "{role}" LOGIN IN ROLE streams_erasure_watch')
    dsn = as_role(pipeline, role)
    try:
        worker = pipeline.start("worker", STREAMS_STAGES="mask", STREAMS_PG_DSN=dsn)
        bridge = pipeline.start("bridge")
        (u1,) = pipeline.send([U1])
        pipeline.wait_for(lambda: u1 in latest(pipeline), 120, "the masked record")
        pipeline.wait_for(
            lambda: pipeline.query("SELECT stage FROM erasure_stage_versions"), 30, "the mask stage's heartbeat"
        )
        for sql in (
            "SELECT * FROM user_logins",
            "SELECT token FROM pii_vault",
            "INSERT INTO erasure_ledger DEFAULT VALUES",
        ):
            with pytest.raises(Exception, match="permission denied"):
                asyncio.run(fetch(dsn, sql))
        assert pipeline.stop(worker) == 0 and pipeline.stop(bridge) == 0
    finally:
        pipeline.stop_all()
        pipeline.query(f'DROP ROLE "{role}"')
