"""Privacy on the real stack: hostile values leave no plaintext anywhere; reveal is audited.

Runs the real bridge and worker (``pipeline`` fixture), then `streams reveal` as an operator would.
"""

from __future__ import annotations

import json

import pytest

from streams.privacy.masking import canonical_device_id, canonical_ip

pytestmark = pytest.mark.integration


def login(n: int, ip, device_id, **extra) -> dict:
    return {"user_id": f"hostile-{n}", "app_version": "2.3.0", "device_type": "android", "ip": ip,
            "locale": "DE", "device_id": device_id, **extra}


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
    for message_id, record in zip(hostile_ids, VALID):
        out = pipeline.run("reveal", "--message-id", message_id, "--operator", "ann", "--reason", "INC-1")
        assert out.returncode == 0, out.stderr
        revealed = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["field"], r["value"]) for r in revealed] == [
            ("ip", canonical_ip(record["ip"])[0]),
            ("device_id", canonical_device_id(record["device_id"])),
        ]
    row = pipeline.query("SELECT masked_ip, ip_is_valid FROM user_logins WHERE message_id = $1", hostile_ids[2])[0]
    assert row["ip_is_valid"] is False  # 999.888.777.666 is masked as an opaque string
    out = pipeline.run("reveal", "--token", row["masked_ip"], "--operator", "bob")
    assert [json.loads(line)["value"] for line in out.stdout.splitlines()] == ["999.888.777.666"]

    assert "not a join token" in one_line_error(pipeline.run("reveal", "--token", "198.51.100.23", "--operator", "eve"))
    assert streams_init(pipeline, tmp_path / "other.json").returncode == 0
    wrong = pipeline.run("reveal", "--token", row["masked_ip"], "--operator", "eve", STREAMS_KEYS_FILE=str(tmp_path / "other.json"))
    assert "does not open" in one_line_error(wrong)
    missing = pipeline.run("reveal", "--token", row["masked_ip"], "--operator", "eve", STREAMS_KEYS_FILE=str(tmp_path / "none.json"))
    assert "no key file" in one_line_error(missing)

    audit = pipeline.query("SELECT * FROM pii_reveal_audit ORDER BY id")
    outcomes = [(a["operator"], a["outcome"]) for a in audit]
    assert outcomes.count(("ann", "revealed")) == 2 * len(VALID)
    assert ("bob", "revealed") in outcomes
    assert ("eve", "malformed_token") in outcomes and ("eve", "refused_key") in outcomes
    assert {a["message_id"] for a in audit if a["operator"] == "ann"} == set(hostile_ids)

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
