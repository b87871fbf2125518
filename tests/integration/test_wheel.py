"""The runtime wheel on its own: built from the repository, installed into a fresh venv
without the dev package, every runtime module imports, and the CLI runs (issue 8)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from streams_dev.sandbox import sandbox_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEV_ONLY = ("pgserver", "psutil", "avro", "pytest", "hypothesis", "testcontainers", "docker", "streams_dev")


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(REPO))
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("streams-*.whl")
    venv.create(root / "venv", with_pip=True)
    py = root / "venv" / "bin" / "python"
    deps = run(str(py), "-m", "pip", "install", "-q", "--require-hashes", "-r", str(REPO / "requirements.lock"))
    assert deps.returncode == 0, deps.stderr
    installed = run(str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel))
    assert installed.returncode == 0, installed.stderr
    return py


def test_every_runtime_module_imports_without_dev_dependencies(wheel_venv, tmp_path):
    script = (
        "import importlib, pkgutil, sys, streams\n"
        "names = [m.name for m in pkgutil.walk_packages(streams.__path__, 'streams.') if m.name != 'streams.__main__']\n"
        "for name in names: importlib.import_module(name)\n"
        f"leaked = sorted(n for n in {DEV_ONLY!r} if n in sys.modules)\n"
        "assert not leaked, leaked\n"
        "import streams.io.codec as c; c.Codecs()\n"
        "print(len(names))\n"
    )
    result = run(str(wheel_venv), "-c", script, cwd=tmp_path)  # not the checkout: only the wheel
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 30
    for name in DEV_ONLY:
        probe = run(str(wheel_venv), "-c", f"import {name}", cwd=tmp_path)
        assert probe.returncode != 0, f"{name} is installed in the runtime venv"


def test_cli_help_and_migrate_from_the_wheel(wheel_venv, stack_settings, tmp_path):
    streams = str(wheel_venv.parent / "streams")
    helped = run(streams, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "worker" in helped.stdout and "stack" not in helped.stdout.split("options:")[0]
    env = sandbox_env(stack_settings, tmp_path)
    migrated = run(streams, "migrate", cwd=tmp_path, env={"PATH": "/usr/bin:/bin", **env})
    assert migrated.returncode == 0, migrated.stderr
    assert "0001_init.sql" in migrated.stdout
