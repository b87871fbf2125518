"""Both key rotations end to end on the real stack, each interrupted once and resumed.

Afterwards every row reveals to its original, duplicates still share one token, no
table holds two encryption key ids or two join versions, and every vault ciphertext is
in the token-bound format (older, unbound ones opened and moved).
"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streams.privacy.keys import generate_document, load_keyring, write_document
from streams.privacy.masking import Masker, canonical_device_id, canonical_ip, pad

pytestmark = pytest.mark.integration


def login(n: int, ip: str, device_id: str) -> dict:
    return {
        "user_id": f"rot-{n}",
        "app_version": "1.0",
        "device_type": "ios",
        "ip": ip,
        "locale": None,
        "device_id": device_id,
    }


SHARED_IP, SHARED_DEVICE = "192.0.2.10", "rot-shared-device"
BATCHES = {
    "first": [login(1, SHARED_IP, SHARED_DEVICE), login(2, "::ffff:" + SHARED_IP, "rot-device-2")],
    "after_k2": [login(3, "192.0.2.11", SHARED_DEVICE), login(4, SHARED_IP, "rot-device-4")],
    "during_rejoin": [login(5, "192.0.2.12", " " + SHARED_DEVICE), login(6, "192.0.2.13", "rot-device-6")],
    "late_old_worker": [login(7, SHARED_IP, "rot-device-7")],
    "after_h2": [login(8, "192.0.2.11", "rot-device-2"), login(9, "2001:db8::9", SHARED_DEVICE)],
}


def decrypted_rows(pipeline) -> dict[str, tuple]:
    """message_id -> (ip, device_id, masked_ip, masked_device_id), decrypted in process from the vault."""
    masker = Masker(load_keyring(pipeline.settings.keys_file))
    rows = pipeline.query(
        "SELECT u.message_id, u.masked_ip, u.masked_device_id, i.ciphertext AS ip_c, d.ciphertext AS dev_c"
        " FROM user_logins u"
        " LEFT JOIN pii_vault i ON i.field = 'ip' AND i.token = u.masked_ip"
        " LEFT JOIN pii_vault d ON d.field = 'device_id' AND d.token = u.masked_device_id"
    )
    return {
        r["message_id"]: (
            masker.decrypt("ip", r["ip_c"], r["masked_ip"]),
            masker.decrypt("device_id", r["dev_c"], r["masked_device_id"]),
            r["masked_ip"],
            r["masked_device_id"],
        )
        for r in rows
    }


def make_legacy(pipeline) -> int:
    """Rewrite every vault row in the format written before token binding (AD: field, key id)."""
    ring = load_keyring(pipeline.settings.keys_file)
    masker = Masker(ring)
    rows = pipeline.query("SELECT field, token, key_id, ciphertext FROM pii_vault")
    for r in rows:
        value = masker.decrypt(r["field"], r["ciphertext"], r["token"])
        sealed = AESSIV(ring.encryption_keys[r["key_id"]]).encrypt(
            pad(value.encode()), [r["field"].encode(), r["key_id"].encode()]
        )
        legacy = f"{r['key_id']}." + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()
        pipeline.query(
            "UPDATE pii_vault SET ciphertext = $1 WHERE field = $2 AND token = $3", legacy, r["field"], r["token"]
        )
    return len(rows)


def versions(pipeline) -> dict[str, set[str]]:
    q = pipeline.query
    return {
        "logins": {
            r["v"]
            for r in q(
                "SELECT split_part(masked_ip, '.', 1) AS v FROM user_logins"
                " UNION SELECT split_part(masked_device_id, '.', 1) FROM user_logins"
            )
        },
        "vault": {r["v"] for r in q("SELECT DISTINCT split_part(token, '.', 1) AS v FROM pii_vault")},
        "key_ids": {r["key_id"] for r in q("SELECT DISTINCT key_id FROM pii_vault")},
    }


def keys(pipeline, *args):
    result = pipeline.run("keys", *args, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_encryption_and_join_key_rotation_end_to_end(pipeline, sample_path):
    sample = [r for r in json.loads(sample_path.read_text()) if "ip" in r]
    sent: dict[str, dict] = {}

    def send(records):
        sent.update(zip(pipeline.send(records), records, strict=False))
        pipeline.wait_for(lambda: pipeline.row_count() == len(sent), 120, f"{len(sent)} rows")

    # A key file from before issue 19: h1 tokens without domain separation (rejoin moves them to h2, which has it).
    doc = generate_document()
    del doc["join"]["domain_separated"]
    write_document(pipeline.settings.keys_file, doc)
    bridge = pipeline.start("bridge")
    worker = pipeline.start("worker")
    send(sample + BATCHES["first"])
    assert make_legacy(pipeline) > 40  # rows as an older version wrote them: rotation must still open them

    # --- encryption key: k2 for new writes once workers restart; old rows move in batches
    keys(pipeline, "rotate", "encryption")
    pipeline.stop(worker)
    worker = pipeline.start("worker")
    send(BATCHES["after_k2"])
    assert versions(pipeline)["key_ids"] == {"k1", "k2"}
    k1_before = pipeline.query("SELECT count(*) AS n FROM pii_vault WHERE key_id = 'k1'")[0]["n"]
    out = keys(pipeline, "reencrypt", "--batch-size", "20", "--max-batches", "2")  # interrupted after 2 batches
    assert "re-encrypting to k2" in out.stderr
    k1_after = pipeline.query("SELECT count(*) AS n FROM pii_vault WHERE key_id = 'k1'")[0]["n"]
    assert k1_after == k1_before - 40 > 0
    assert pipeline.run("keys", "retire", "k1").returncode == 1  # still in use: refused
    keys(pipeline, "reencrypt", "--batch-size", "20")  # resumed
    assert versions(pipeline)["key_ids"] == {"k2"}
    keys(pipeline, "retire", "k1")
    assert json.loads(keys(pipeline, "list").stdout)["encryption"]["keys"] == ["k2"]

    # --- join key: h2 prepared, rewrite interrupted, old-keyring worker keeps writing h1
    keys(pipeline, "rotate", "join")
    out = keys(pipeline, "rejoin", "--batch-size", "20", "--max-batches", "3")
    assert "stopped after 3 batches" in out.stdout
    assert versions(pipeline)["logins"] == {"h1"} and versions(pipeline)["vault"] == {"h1", "h2"}
    send(BATCHES["during_rejoin"])  # the running worker still holds h1
    keys(pipeline, "rejoin", "--batch-size", "20", "--wait", "0.2")  # resumed to the end
    assert versions(pipeline) == {"logins": {"h2"}, "vault": {"h2"}, "key_ids": {"k2"}}
    assert pipeline.query("SELECT count(*) AS n FROM join_token_map")[0]["n"] == 0
    assert json.loads(keys(pipeline, "list").stdout)["join"] == {"active": "h2", "next": None, "versions": ["h2"]}
    # Each bulk decryption left its audit row (who, what, why) before it opened anything.
    bulk = pipeline.query("SELECT action, reason, db_user FROM pii_reveal_audit WHERE outcome = 'bulk_open'")
    assert {(b["action"], b["reason"]) for b in bulk} == {
        ("reencrypt", "key rotation"),
        ("rejoin", "join key rotation"),
    }
    assert len(bulk) == 4 and all(b["db_user"] for b in bulk)  # two runs of each
    assert load_keyring(pipeline.settings.keys_file).join_separated == {"h2"}

    # The window: a worker not restarted yet writes h1 after the switch; a rerun converts it.
    send(BATCHES["late_old_worker"])
    assert versions(pipeline)["logins"] == {"h1", "h2"}
    keys(pipeline, "rejoin", "--wait", "0.2")
    assert versions(pipeline)["logins"] == {"h2"} and versions(pipeline)["vault"] == {"h2"}

    pipeline.stop(worker)
    worker = pipeline.start("worker")
    send(BATCHES["after_h2"])
    assert versions(pipeline) == {"logins": {"h2"}, "vault": {"h2"}, "key_ids": {"k2"}}
    pipeline.stop(worker)
    pipeline.stop(bridge)

    # Every row reveals to its original; duplicates share a token, distinct values do not.
    rows = decrypted_rows(pipeline)
    assert set(rows) == set(sent)
    for message_id, record in sent.items():
        ip, device, *_ = rows[message_id]
        assert (ip, device) == (canonical_ip(record["ip"])[0], canonical_device_id(record["device_id"]))
    for index, field in ((0, "ip"), (1, "device_id")):
        token_of: dict[str, set[str]] = {}
        for row in rows.values():
            token_of.setdefault(row[index], set()).add(row[index + 2])
        assert all(len(tokens) == 1 for tokens in token_of.values()), field
        assert len({next(iter(t)) for t in token_of.values()}) == len(token_of), field
    shared = [rows[m] for m, r in sent.items() if canonical_ip(r["ip"])[0] == SHARED_IP]
    assert len(shared) == 4 and len({r[2] for r in shared}) == 1

    # The CLI reveal agrees with the rotated vault.
    some_id = next(m for m, r in sent.items() if r["user_id"] == "rot-9")
    out = pipeline.run("reveal", "--message-id", some_id, "--operator", "ops", "--reason", "INC-5")
    assert [json.loads(line)["value"] for line in out.stdout.splitlines()] == ["2001:db8::9", SHARED_DEVICE]

    # Rotation wrote the token-bound format only: every vault ciphertext is k2.v2.<...>.
    assert {
        r["f"]
        for r in pipeline.query(
            "SELECT DISTINCT split_part(ciphertext, '.', 1) || '.' || split_part(ciphertext, '.', 2) AS f"
            " FROM pii_vault"
        )
    } == {"k2.v2"}


def test_the_final_table_lock_gives_up_in_time_instead_of_hanging(pipeline):
    """Issue 9 item 5: busy writers hold the tables; the rejoin's last step waits a bounded time."""
    import asyncio

    from streams.io.postgres import connect, migrate
    from streams.privacy.rotation import finish

    dsn = pipeline.settings.pg_dsn.get_secret_value()

    async def go() -> int | None:
        writer, rotator = await connect(dsn), await connect(dsn)
        try:
            await migrate(writer)
            async with writer.transaction():  # a writer mid-transaction holds ROW EXCLUSIVE
                await writer.execute("LOCK TABLE user_logins IN ROW EXCLUSIVE MODE")
                return await asyncio.wait_for(finish(rotator, "h2", lock_timeout=0.3), 20)
        finally:
            await writer.close()
            await rotator.close()

    assert asyncio.run(go()) is None
