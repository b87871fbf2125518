"""The production image: runtime dependencies only, numeric user, read-only root, health check."""

from __future__ import annotations

import json

import pytest

from tests.containers.conftest import run

pytestmark = pytest.mark.containers

DEV_ONLY = {"pytest", "pytest-asyncio", "hypothesis", "testcontainers", "docker", "pgserver", "psutil", "streams-dev"}
LIST_DISTS = (
    "import importlib.metadata as m; print('\\n'.join(sorted({d.metadata['Name'].lower() for d in m.distributions()})))"
)


def docker_run(image: str, *args: str, entrypoint: str | None = None, check: bool = True):
    cmd = ["docker", "run", "--rm", "--read-only", "--tmpfs", "/var/lib/streams:uid=10001,gid=10001,mode=0700"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return run(*cmd, image, *args, check=check)


def test_runtime_dependencies_only(app_image):
    dists = set(docker_run(app_image, "-c", LIST_DISTS, entrypoint="python").stdout.split())
    assert "streams" in dists and "faust-streaming" in dists
    assert not dists & DEV_ONLY, dists & DEV_ONLY
    refused = docker_run(app_image, "-c", "import pgserver", entrypoint="python", check=False)
    assert refused.returncode != 0 and "No module named 'pgserver'" in refused.stderr
    # The installed package, not a source tree: no tests or dev tooling in the image.
    found = docker_run(
        app_image, "-c", "ls -d /app/tests /app/dev /app/.venv /opt/streams/bin/pip 2>/dev/null; true", entrypoint="sh"
    )
    assert found.stdout.strip() == ""


def test_numeric_user_labels_healthcheck(app_image):
    config = json.loads(run("docker", "image", "inspect", app_image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["streams"]
    assert config["Env"] and "STREAMS_DATA_DIR=/var/lib/streams" in config["Env"]
    labels = config["Labels"]
    for key in ("title", "description", "version", "revision"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    test = config["Healthcheck"]["Test"]
    assert test[:3] == ["CMD", "python", "-c"] and "/healthz" in test[3] and "streams" not in test[3]
    assert docker_run(app_image, "-u", entrypoint="id").stdout.strip() == "10001"


def test_cli_and_sample_with_a_read_only_root(app_image):
    assert "bridge" in docker_run(app_image, "--help").stdout
    sample = docker_run(
        app_image, "-c", "import json; print(len(json.load(open('/app/data/sample_data.json'))))", entrypoint="python"
    )
    assert sample.stdout.strip() == "100"
    # The only writable path the worker needs is STREAMS_DATA_DIR (a tmpfs here).
    probe = "import os, pathlib; p = pathlib.Path(os.environ['STREAMS_DATA_DIR']) / 'x'; p.mkdir(); print('ok')"
    assert docker_run(app_image, "-c", probe, entrypoint="python").stdout.strip() == "ok"
    no_write = docker_run(app_image, "-c", "open('/app/x', 'w')", entrypoint="python", check=False)
    assert no_write.returncode != 0 and "Read-only file system" in no_write.stderr
    # A worker without a key file fails closed with one line, never a traceback.
    refused = docker_run(app_image, "worker", check=False)
    assert refused.returncode != 0
    assert "no key file" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
