"""Privacy on the real stack: hostile values leave no plaintext anywhere; reveal is audited.

Runs the real bridge and worker (``pipeline`` fixture), then `streams reveal` as an operator would.
The reveal-role, append-only audit and token-binding tests seed the database directly
(migrate, keys init, rows masked in process), which is all they need.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import json
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streams.privacy.keys import load_keyring
from streams.privacy.masking import Masker, canonical_device_id, canonical_ip, pad

pytestmark = pytest.mark.integration


def login(n: int, ip, device_id, **extra) -> dict:
    return {
        "user_id": f"hostile-{n}",
        "app_version": "2.3.0",
        "device_type": "android",
        "ip": ip,
        "locale": "DE",
        "device_id": device_id,
        **extra,
    }


VALID = [
    login(1, "::FFFF:198.51.100.23", "  dev-with-spaces  "),
    login(2, "FE80::ABCD%Eth0", "dev'; DROP TABLE user_logins; --"),
    login(3, "999.888.777.666", "ünïcødé-设备-🔑"),
    login(4, "2001:DB8::CAFE", "z" * 200),
    login(5, "10.9.8.7", 'line\nbreak\tand "quotes" \\ back'),
    login(6, " 198.51.100.23 ", "<script>alert(1)</script>"),
]
REJECTED = [
    login(7, "172.16.5.4", "dlq-device-null-user", user_id=None),
    login(8, "172.16.5.5", "y" * 201),
    '{"user_id": "u9", "ip": "172.16.5.6", "device_id": "dlq-device-broken-json", ',
    login(10, ["172.16.5.7"], "dlq-device-wrong-type"),
]


def plaintexts(records) -> set[str]:
    """Every spelling of every ip / device id sent: as written and canonical."""
    found: set[str] = set()
    for r in records:
        if isinstance(r, str):
            found |= {"172.16.5.6", "dlq-device-broken-json"}
            continue
        for field in ("ip", "device_id"):
            value = r[field]
            values = value if isinstance(value, list) else [value]
            for v in values:
                found |= {v, v.strip(), canonical_ip(v)[0], canonical_device_id(v)}
    return {v for v in found if v}


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_hostile_values_never_leak_and_reveal_is_audited(pipeline, sample_path, tmp_path):
    sample = json.loads(sample_path.read_text())
    ids = pipeline.send(sample + VALID + REJECTED)
    hostile_ids = ids[len(sample) : len(sample) + len(VALID)]
    expected_rows = len(sample) - 1 + len(VALID)

    bridge = pipeline.start("bridge")
    worker = pipeline.start("worker")
    pipeline.wait_for(lambda: pipeline.row_count() == expected_rows, 120, f"{expected_rows} rows")
    pipeline.wait_for(lambda: len(pipeline.dead_letters()) == 1 + len(REJECTED), 60, "the dead letters")
    assert pipeline.stop(bridge) == 0
    assert pipeline.stop(worker) == 0

    # Reveal: by message id, by token, and the three refusals, each one line.
    for message_id, record in zip(hostile_ids, VALID, strict=False):
        out = pipeline.run("reveal", "--message-id", message_id, "--operator", "ann", "--reason", "INC-1")
        assert out.returncode == 0, out.stderr
        revealed = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["field"], r["value"]) for r in revealed] == [
            ("ip", canonical_ip(record["ip"])[0]),
            ("device_id", canonical_device_id(record["device_id"])),
        ]
    row = pipeline.query("SELECT masked_ip, ip_is_valid FROM user_logins WHERE message_id = $1", hostile_ids[2])[0]
    assert row["ip_is_valid"] is False  # 999.888.777.666 is masked as an opaque string
    out = pipeline.run("reveal", "--token", row["masked_ip"], "--operator", "bob", "--reason", "INC-2")
    assert [json.loads(line)["value"] for line in out.stdout.splitlines()] == ["999.888.777.666"]

    eve = ("--operator", "eve", "--reason", "INC-3")
    assert "not a join token" in one_line_error(pipeline.run("reveal", "--token", "198.51.100.23", *eve))
    assert streams_init(pipeline, tmp_path / "other.json").returncode == 0
    wrong = pipeline.run("reveal", "--token", row["masked_ip"], *eve, STREAMS_KEYS_FILE=str(tmp_path / "other.json"))
    assert "does not open" in one_line_error(wrong)
    missing = pipeline.run("reveal", "--token", row["masked_ip"], *eve, STREAMS_KEYS_FILE=str(tmp_path / "none.json"))
    assert "no key file" in one_line_error(missing)

    audit = pipeline.query("SELECT * FROM pii_reveal_audit ORDER BY id")
    outcomes = [(a["operator"], a["outcome"]) for a in audit]
    assert outcomes.count(("ann", "revealed")) == 2 * len(VALID)
    assert ("bob", "revealed") in outcomes
    assert {("eve", "malformed_token"), ("eve", "does_not_open"), ("eve", "no_keys")} <= set(outcomes)
    assert {a["message_id"] for a in audit if a["operator"] == "ann"} == set(hostile_ids)
    assert {(a["db_user"], a["os_user"]) for a in audit} == {("postgres", getpass.getuser())}

    # Leak scan: logs, masked topic, DLQ reason/detail/key, user_logins, audit trail.
    s = pipeline.settings
    dead = pipeline.dead_letters()
    places = {
        "logs": pipeline.logs().encode(),
        "masked topic": b"".join((k or b"") + v for k, v in pipeline.topic(s.masked_topic)),
        "dlq text": "\n".join(d["message_id"] + d["reason"] + d["detail"] for d in dead).encode(),
        "user_logins": "\n".join(map(repr, pipeline.query("SELECT * FROM user_logins"))).encode(),
        "audit": "\n".join(map(repr, audit)).encode(),
        "pii_vault": "\n".join(map(repr, pipeline.query("SELECT * FROM pii_vault"))).encode(),
    }
    secrets = plaintexts(VALID + REJECTED) | plaintexts(r for r in sample if "ip" in r)
    leaks = [(name, value) for value in secrets for name, blob in places.items() if value.encode() in blob]
    assert leaks == []
    assert {d["reason"] for d in dead} >= {"null_field", "field_too_long", "invalid_json", "wrong_type"}


def streams_init(pipeline, path):
    return pipeline.run("keys", "init", STREAMS_KEYS_FILE=str(path))


# --- reveal role, append-only audit, token binding (database seeded directly) --------------

LOGINS = {"m-a": ("192.0.2.1", "device-a"), "m-b": ("192.0.2.2", "device-b")}


def seeded(pipeline) -> Masker:
    """A migrated database with LOGINS masked under fresh keys (as the sink would write them)."""
    for command in (("migrate",), ("keys", "init")):
        result = pipeline.run(*command)
        assert result.returncode == 0, result.stderr
    masker = Masker(load_keyring(pipeline.settings.keys_file))
    for message_id, (ip, device) in LOGINS.items():
        ip_m, dev_m = masker.mask("ip", ip), masker.mask("device_id", device)
        pipeline.query(
            "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id,"
            " create_date, app_version_raw, sent_at) VALUES ($1, 'u', 'ios', $2, $3, current_date, '1.0', now())",
            message_id,
            ip_m.token,
            dev_m.token,
        )
        pipeline.query(
            "INSERT INTO pii_vault (field, token, key_id, ciphertext) VALUES ('ip', $1, 'k1', $2), ('device_id', $3, 'k1', $4)",
            ip_m.token,
            ip_m.ciphertext,
            dev_m.token,
            dev_m.ciphertext,
        )
    return masker


def reveal(pipeline, *args: str, **env: str):
    return pipeline.run("reveal", *args, "--operator", "ann", "--reason", "INC-9", **env)


def values(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["value"] for line in result.stdout.splitlines()]


def outcomes(pipeline) -> list[str]:
    return [r["outcome"] for r in pipeline.query("SELECT outcome FROM pii_reveal_audit ORDER BY id")]


def test_audit_trail_is_append_only_even_for_the_owner(pipeline):
    seeded(pipeline)
    assert values(reveal(pipeline, "--message-id", "m-a")) == list(LOGINS["m-a"])
    before = pipeline.query("SELECT * FROM pii_reveal_audit ORDER BY id")
    assert len(before) == 2
    for sql in (
        "UPDATE pii_reveal_audit SET operator = 'nobody'",
        "DELETE FROM pii_reveal_audit",
        "TRUNCATE pii_reveal_audit",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            pipeline.query(sql)  # as postgres, the owner (a superuser here)
    assert pipeline.query("SELECT * FROM pii_reveal_audit ORDER BY id") == before
    # The database stamps who and when; an INSERT cannot choose them.
    pipeline.query(
        "INSERT INTO pii_reveal_audit (operator, outcome, db_user, revealed_at)"
        " VALUES ('x', 'test', 'someone-else', '2000-01-01')"
    )
    forged = pipeline.query("SELECT db_user, revealed_at FROM pii_reveal_audit WHERE outcome = 'test'")[0]
    assert forged["db_user"] == "postgres" and forged["revealed_at"].year > 2000


def as_role(pipeline, role: str) -> str:
    parts = urlsplit(pipeline.settings.pg_dsn.get_secret_value())
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))


def test_a_login_role_granted_streams_reveal_can_reveal_and_nothing_more(pipeline):
    seeded(pipeline)
    role = f"reveal_test_{uuid.uuid4().hex[:10]}"  # roles are cluster-wide: a unique name, dropped after
    pipeline.query(f'CREATE ROLE "{role}" LOGIN IN ROLE streams_reveal')
    try:
        dsn = as_role(pipeline, role)
        out = reveal(pipeline, "--message-id", "m-b", STREAMS_PG_DSN=dsn)
        assert values(out) == list(LOGINS["m-b"])
        audit = pipeline.query("SELECT operator, db_user, os_user, outcome FROM pii_reveal_audit ORDER BY id")
        assert [tuple(a) for a in audit] == [("ann", role, getpass.getuser(), "revealed")] * 2
        refused = reveal(pipeline, "--token", "h1." + "A" * 43, STREAMS_PG_DSN=dsn)  # a refusal, audited as the role
        assert "no pii_vault entry" in one_line_error(refused)
        assert (
            pipeline.query("SELECT db_user, outcome FROM pii_reveal_audit ORDER BY id DESC LIMIT 1")[0]["db_user"]
            == role
        )

        async def attempt(sql: str) -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        for sql in (
            "DELETE FROM pii_reveal_audit",
            "UPDATE pii_reveal_audit SET operator = 'nobody'",
            "TRUNCATE pii_reveal_audit",
            "UPDATE pii_vault SET ciphertext = 'x'",
            "DELETE FROM pii_vault",
            "DELETE FROM user_logins",
            "CREATE TABLE mine (x int)",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                asyncio.run(attempt(sql))
        assert len(pipeline.query("SELECT 1 FROM pii_reveal_audit")) == 3
    finally:
        pipeline.query(f'DROP ROLE "{role}"')


def legacy_ciphertext(pipeline, field: str, value: str) -> str:
    """A ciphertext as written before token binding (associated data: field and key id only)."""
    key = load_keyring(pipeline.settings.keys_file).encryption_keys["k1"]
    sealed = AESSIV(key).encrypt(pad(value.encode()), [field.encode(), b"k1"])
    return "k1." + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()


def test_a_ciphertext_copied_under_another_token_is_refused_and_audited(pipeline):
    masker = seeded(pipeline)
    (ip_a, dev_a), (ip_b, _) = LOGINS["m-a"], LOGINS["m-b"]
    token_b = masker.token("ip", ip_b)

    # An older, unbound ciphertext opens anywhere: reveal recomputes the token and refuses.
    pipeline.query(
        "UPDATE pii_vault SET ciphertext = $1 WHERE field = 'ip' AND token = $2",
        legacy_ciphertext(pipeline, "ip", ip_a),
        token_b,
    )
    out = reveal(pipeline, "--message-id", "m-b", "--field", "ip")
    assert "does not belong to its token" in one_line_error(out)
    assert ip_a not in out.stdout + out.stderr
    assert outcomes(pipeline) == ["token_mismatch"]

    # A new, token-bound ciphertext does not even open under another token.
    copied = pipeline.query(
        "SELECT ciphertext FROM pii_vault WHERE field = 'device_id' AND token = $1", masker.token("device_id", dev_a)
    )[0]["ciphertext"]
    assert copied.startswith("k1.v2.")
    pipeline.query(
        "UPDATE pii_vault SET ciphertext = $1 WHERE field = 'device_id' AND token = $2",
        copied,
        masker.token("device_id", LOGINS["m-b"][1]),
    )
    out = reveal(pipeline, "--message-id", "m-b", "--field", "device_id")
    assert "does not open" in one_line_error(out) and dev_a not in out.stdout + out.stderr
    assert outcomes(pipeline) == ["token_mismatch", "does_not_open"]

    # A token of a join version the keyring does not hold cannot be checked: refused too.
    stray = "h9." + "B" * 43
    pipeline.query(
        "INSERT INTO pii_vault (field, token, key_id, ciphertext) VALUES ('ip', $1, 'k1', $2)",
        stray,
        legacy_ciphertext(pipeline, "ip", ip_a),
    )
    out = reveal(pipeline, "--token", stray)
    assert "h9" in one_line_error(out) and ip_a not in out.stdout
    assert outcomes(pipeline)[-1] == "unverifiable"

    # The untouched login still reveals; the audit holds no value.
    assert values(reveal(pipeline, "--message-id", "m-a")) == [ip_a, dev_a]
    audit = "\n".join(map(repr, pipeline.query("SELECT * FROM pii_reveal_audit")))
    assert not any(v in audit for pair in LOGINS.values() for v in pair)
