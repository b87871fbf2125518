"""Issue 19 item 6: the worker and the bridge run without core dumps (RLIMIT_CORE 0)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def core_limit(pid: int) -> str | None:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])  # soft, hard
    return None


def test_worker_and_bridge_cannot_dump_core(pipeline):
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard == 0:
        pytest.skip("core dumps are already off for this test run: the check could not fail")
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # children inherit a non-zero limit...
    try:
        procs = [pipeline.start("worker", STREAMS_STAGES="mask"), pipeline.start("bridge")]
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    for proc in procs:  # ...and each turns it off itself, before it holds keys or bodies
        pipeline.wait_for(lambda p=proc: core_limit(p.pid) == "0 0", 60, f"RLIMIT_CORE 0 in {proc.args[3]}")
