"""Container tests: they need a Docker engine (``make containers-test`` starts the lab's).

They run only with ``STREAMS_TEST_STACK=containers``; a plain ``make test`` deselects them
(the process stack serves it). With ``STREAMS_CONTAINERS_REQUIRED=1`` (CI) an unreachable
engine is an error, never a skip.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def containers_mode() -> bool:
    return os.environ.get("STREAMS_TEST_STACK") == "containers"


def pytest_collection_modifyitems(config, items):
    if containers_mode():
        return
    mine = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [item for item in items if item not in mine]


def pytest_sessionfinish(session, exitstatus):
    """With STREAMS_CONTAINERS_REQUIRED=1 (CI) a skipped test fails the run: a skip would hide
    a broken Docker path. Session-wide, so it covers the integration subset run with it."""
    if os.environ.get("STREAMS_CONTAINERS_REQUIRED") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.ensure_newline()
        reporter.write_line(f"STREAMS_CONTAINERS_REQUIRED=1: {len(skipped)} skipped test(s) fail the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def engine_problem() -> str | None:
    """Why the Docker engine cannot be used, or None."""
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker client unusable: {exc}"
    if result.returncode != 0:
        return f"no Docker engine (DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unset')}): {result.stderr.strip()[:300]}"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    problem = engine_problem()
    if problem is None:
        return
    if os.environ.get("STREAMS_CONTAINERS_REQUIRED") == "1":
        pytest.fail(f"container tests required but {problem}", pytrace=False)
    pytest.skip(problem)


def run(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in the repository; on failure the assertion carries its output."""
    result = subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="session")
def app_image(docker_engine) -> str:
    """The production image, built from the Dockerfile (layers cached by the engine)."""
    tag = "streams:local"
    revision = run("git", "rev-parse", "HEAD", check=False).stdout.strip() or "unknown"
    env = dict(os.environ)
    if run("docker", "buildx", "version", check=False).returncode != 0:
        env.setdefault("DOCKER_BUILDKIT", "0")  # no buildx plugin (the lab): the classic builder
    run(
        "docker",
        "build",
        "--network",
        "host",
        "--build-arg",
        f"REVISION={revision}",
        "-t",
        tag,
        ".",
        timeout=1200,
        env=env,
    )
    return tag
