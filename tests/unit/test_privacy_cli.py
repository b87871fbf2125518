"""CLI behaviour of `streams keys` and `streams reveal` that needs no services."""

import json
import subprocess
import sys

from tests.helpers import REPO


def streams(tmp_path, *args, **env):
    full = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STREAMS_KEYS_FILE": str(tmp_path / "keys.json"), **env}
    return subprocess.run(
        [sys.executable, "-m", "streams", *args], env=full, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def one_line_error(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_keys_lifecycle_never_prints_key_bytes(tmp_path):
    assert streams(tmp_path, "keys", "init").returncode == 0
    assert "never overwritten" in one_line_error(streams(tmp_path, "keys", "init"))
    assert streams(tmp_path, "keys", "rotate", "encryption").returncode == 0
    assert streams(tmp_path, "keys", "rotate", "join").returncode == 0
    listed = streams(tmp_path, "keys", "list")
    assert json.loads(listed.stdout)["encryption"] == {"active": "k2", "keys": ["k1", "k2"]}
    assert json.loads(listed.stdout)["join"] == {"active": "h1", "next": "h2", "versions": ["h1", "h2"]}
    doc = json.loads((tmp_path / "keys.json").read_text())
    secrets = list(doc["encryption"]["keys"].values()) + [
        v for f in doc["join"]["versions"].values() for v in f.values()
    ]
    assert not any(s in listed.stdout + listed.stderr for s in secrets)
    assert "active key" in one_line_error(streams(tmp_path, "keys", "retire", "k2"))


NO_DB = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens: the best-effort audit of a refusal fails fast


def test_reveal_without_the_key_refuses_in_one_line(tmp_path):
    line = one_line_error(
        streams(
            tmp_path,
            "reveal",
            "--token",
            "h1." + "A" * 43,
            "--operator",
            "ann",
            "--reason",
            "INC-1",
            STREAMS_PG_DSN=NO_DB,
        )
    )
    assert "keys init" in line and not (tmp_path / "keys.json").exists()


def test_reveal_requires_a_reason(tmp_path):
    result = streams(tmp_path, "reveal", "--token", "h1." + "A" * 43, "--operator", "ann", STREAMS_PG_DSN=NO_DB)
    assert result.returncode == 2 and "--reason" in result.stderr and "Traceback" not in result.stderr
    blank = streams(
        tmp_path, "reveal", "--token", "h1." + "A" * 43, "--operator", "ann", "--reason", " ", STREAMS_PG_DSN=NO_DB
    )
    assert "--reason" in one_line_error(blank)


def test_malformed_key_file_is_one_line(tmp_path):
    (tmp_path / "keys.json").write_text("{not json")
    (tmp_path / "keys.json").chmod(0o600)
    assert "docs/privacy.md" in one_line_error(streams(tmp_path, "keys", "list"))


def test_worker_with_malformed_keys_stops_at_start_in_one_line(tmp_path):
    doc = {
        "join": {"active": "h1", "versions": {"h1": {"ip": "c2hvcnQ=", "device_id": "c2hvcnQ="}}},
        "encryption": {"active": "k1", "keys": {"k1": "c2hvcnQ="}},
    }
    (tmp_path / "keys.json").write_text(json.dumps(doc))
    (tmp_path / "keys.json").chmod(0o600)
    line = one_line_error(streams(tmp_path, "worker", STREAMS_KAFKA_BOOTSTRAP="127.0.0.1:1"))
    assert "must be 32 bytes" in line and "c2hvcnQ" not in line
