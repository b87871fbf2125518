"""Test helpers: wait on conditions with deadlines, run stage processes, read the results."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import asyncpg
import pytest

from streams.io.codec import Codecs
from streams.io.kafka import client_config, group_lag, read_topic, total_lag
from streams.io.postgres import fetch, require_migrated
from streams.io.sqs import bodies_from_json, send_to_queue
from streams.ops import children
from streams.ops.schemas import register as register_schemas
from streams.ops.state import current_queue_depth, dead_letters
from streams.privacy import core as mask_core
from streams.settings import Settings
from streams_dev.sandbox import sandbox_env, settings_from_env

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.3) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T = None  # type: ignore[assignment]
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def core_module() -> ModuleType:
    """streams_core itself; a skip without it, unless STREAMS_REQUIRE_CORE=1 (then a failure)."""
    try:
        import streams_core
    except ImportError:
        if mask_core.core_required():
            raise
        pytest.skip("streams_core is not built (make install); STREAMS_REQUIRE_CORE=1 makes this a failure")
    return streams_core


def isolated_pipeline(stack: Settings, workdir: Path, **extra_env: str) -> Pipeline:
    """A Pipeline on ``stack`` with its own topics, queue, database, consumer group and keys."""
    env = sandbox_env(stack, workdir, STREAMS_BATCH_WITHIN="0.2", STREAMS_BRIDGE_VISIBILITY_TIMEOUT="5", **extra_env)
    return Pipeline(env, workdir)


class Pipeline:
    """One test's isolated pipeline: its settings, and the stage processes it started."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.stopped: set[subprocess.Popen] = set()
        self.migrated = False
        self.deployed = False
        self._codecs: Codecs | None = None
        self.slots: dict[subprocess.Popen, str] = {}  # worker -> its STREAMS_WORKER_SLOT

    @property
    def codecs(self) -> Codecs:
        """The sandbox's codecs (the Confluent format with a registry: its schemas registered first)."""
        if self._codecs is None:
            self.deploy()
            self._codecs = Codecs.from_settings(self.settings)
        return self._codecs

    @property
    def settings(self) -> Settings:
        return settings_from_env(self.env)

    def wait_for(self, condition: Callable[[], T], timeout: float, what: str) -> T:
        """``wait_for`` that fails at once, with the log tail, if a stage process died."""

        def check() -> T:
            for proc, log_path in self.procs:
                if proc.poll() is not None and proc not in self.stopped:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise AssertionError(
                        f"{proc.args[3]} exited with {proc.returncode} while waiting for {what}:\n{tail}"
                    )
            return condition()

        return wait_for(check, timeout, what)

    # --- processes ---------------------------------------------------------
    def migrate(self) -> None:
        """``streams migrate`` as the sandbox's owner role, once (workers never migrate)."""
        if not self.migrated:
            require_migrated(self.settings.pg_dsn.get_secret_value())
            self.migrated = True

    def deploy(self) -> None:
        """Register the sandbox's schemas, once: the deploy step (`streams topics apply`) of a real run."""
        if not self.deployed:
            register_schemas(self.settings)
            self.deployed = True

    def start(self, command: str, *args: str, **env: str) -> subprocess.Popen:
        """Start a stage process; before a worker, migrate the database as `streams run` does;
        before any stage, register the schemas as the deploy step does."""
        if command in ("worker", "bridge"):
            self.deploy()
        if command == "worker":
            self.migrate()
            if "STREAMS_WORKER_SLOT" not in env:  # the lowest slot no running worker holds, as a StatefulSet would
                held = {self.slots.get(p) for p, _ in self.procs if p.poll() is None and p not in self.stopped}
                env = {
                    **env,
                    "STREAMS_WORKER_SLOT": str(next(i for i in range(len(self.procs) + 1) if str(i) not in held)),
                }
        log_path = self.workdir / f"{command}-{len(self.procs)}.log"
        proc = children.start_stage(command, log_path, {**self.env, **env}, *args)
        self.procs.append((proc, log_path))
        if "STREAMS_WORKER_SLOT" in env:
            self.slots[proc] = env["STREAMS_WORKER_SLOT"]
        return proc

    def run(self, command: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        self.deploy()
        full_env = {**os.environ, **self.env, **env}
        return subprocess.run(
            [sys.executable, "-m", "streams", command, *args],
            env=full_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self, proc: subprocess.Popen, timeout: float = 30) -> int:
        self.stopped.add(proc)
        children.stop([proc], timeout)
        return proc.returncode

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            children.kill(proc)

    def remove_sandbox(self) -> None:
        """Delete the sandbox's topics (raw, masked, DLQ, changelogs: every name under its tag)
        and drop its database.

        Best effort, at teardown: a shared stack that keeps every test's 24 partitions runs
        its broker out of heap after a few hundred tests.
        """
        from confluent_kafka.admin import AdminClient

        tag = self.env["STREAMS_RAW_TOPIC"].rsplit(".", 1)[0] + "."
        try:
            admin = AdminClient(client_config(self.settings))
            doomed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(tag)]
            for future in admin.delete_topics(doomed, operation_timeout=30).values() if doomed else ():
                future.result(timeout=60)
        except Exception:  # a test that stopped the broker, or a topic already gone: nothing to keep
            pass
        dsn = self.settings.pg_dsn.get_secret_value()
        admin_dsn, database = dsn.rsplit("/", 1)[0] + "/postgres", dsn.rsplit("/", 1)[1]

        async def drop() -> None:
            conn = await asyncpg.connect(admin_dsn, timeout=10)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            finally:
                await conn.close()

        try:
            asyncio.run(drop())
        except Exception:  # the test's own server is gone, or the role may not drop: nothing to keep
            pass

    def log_of(self, proc: subprocess.Popen) -> str:
        return next(path.read_text(errors="replace") for p, path in self.procs if p is proc)

    def logs(self) -> str:
        return "".join(path.read_text(errors="replace") for _, path in self.procs if path.exists())

    # --- queue -------------------------------------------------------------
    def send(self, records: list[object]) -> list[str]:
        return asyncio.run(send_to_queue(self.settings, bodies_from_json(records)))

    def queue_depth(self) -> int:
        return asyncio.run(current_queue_depth(self.settings))

    # --- kafka -------------------------------------------------------------
    def topic(self, name: str) -> list[tuple[bytes | None, bytes]]:
        return read_topic(self.settings, name)

    def dead_letters(self) -> list[dict]:
        self.deploy()
        return dead_letters(self.settings)

    def lag(self, topics: list[str], group: str | None = None) -> int:
        return total_lag(group_lag(self.settings, topics, group))

    # --- database ----------------------------------------------------------
    def query(self, sql: str, *args) -> list[asyncpg.Record]:
        return asyncio.run(fetch(self.settings.pg_dsn.get_secret_value(), sql, *args))

    def row_count(self) -> int:
        try:
            return self.query("SELECT count(*) AS n FROM user_logins")[0]["n"]
        except asyncpg.UndefinedTableError:
            return 0
