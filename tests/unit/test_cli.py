"""Bad arguments and settings end in one line naming the fix, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def streams(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streams", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"STREAMS_TOPIC_PARTITIONS": "many"}, "STREAMS_TOPIC_PARTITIONS"),
        ({"STREAMS_TOPIC_PARTITIONS": "0"}, "STREAMS_TOPIC_PARTITIONS"),
        ({"STREAMS_STAGES": "mask,paint"}, "STREAMS_STAGES"),
        ({"STREAMS_BATCH_WITHIN": "-1"}, "STREAMS_BATCH_WITHIN"),
    ],
)
def test_bad_setting_is_one_line_naming_the_variable(env, expected):
    assert expected in one_line_error(streams("worker", **env))


def test_malformed_key_file_stops_the_worker_at_start(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text('{"join": {"active": "h1"}}')
    line = one_line_error(streams("worker", STREAMS_KEYS_FILE=str(keys)))
    assert str(keys) in line


def test_seed_with_missing_file(tmp_path):
    assert "no such file" in one_line_error(streams("seed", str(tmp_path / "nope.json")))


def test_seed_with_a_file_that_is_not_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert "is not JSON" in one_line_error(streams("seed", str(bad)))


def test_every_command_has_help():
    from streams.cli import build_parser

    top = streams("--help")
    assert top.returncode == 0
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = list(sub.choices)
    assert {"stack", "seed", "bridge", "worker", "run", "replay", "status", "dlq", "keys", "reveal"} <= set(commands)
    for command in commands:
        result = streams(command, "--help")
        assert result.returncode == 0 and "usage: streams " + command in result.stdout, command
