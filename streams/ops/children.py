"""Stage processes (`streams bridge`, `streams worker`) as children: start, watch, stop.

One way to do it for ``streams run``, the chaos run and the tests: each child logs to its
own file; stopping sends SIGTERM, waits, and SIGKILLs what did not stop in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path


def start_stage(command: str, log_path: Path, env: Mapping[str, str] | None = None, *args: str) -> subprocess.Popen:
    """``python -m streams COMMAND ARGS`` with ``env`` over this process's environment."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "streams", command, *args],
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop(children: Iterable[subprocess.Popen], timeout: float = 30.0) -> int:
    """SIGTERM every child still running, wait up to ``timeout`` in all; the first non-zero exit code."""
    children = list(children)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    worst = 0
    for child in children:
        try:
            code = child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        worst = worst or code
    return worst


def kill(child: subprocess.Popen) -> None:
    """SIGKILL, like a power cut, and reap."""
    if child.poll() is None:
        child.kill()
    child.wait()
