"""What every side-by-side measurement needs: a sandbox, inputs, and a sampled child process.

- ``Sandbox``: its own database, topics, queue, consumer groups and keys on the shared
  stack (``streams_dev.sandbox``), removed afterwards.
- ``logins``: N login bodies whose ``ip`` and ``device_id`` are all distinct (no cache
  flattery), from a given number of distinct users.
- ``measure``: runs one child process until its progress reaches the total, sampling
  progress, CPU time and RSS; the steady rate and the CPU per 100,000 events are taken
  between 10 % and 90 % done, so start-up and the tail are left out.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from confluent_kafka import TopicPartition

from streams.io.codec import Codecs
from streams.io.kafka import admin_client, metadata_consumer, send_records
from streams.io.postgres import connect, migrate, require_migrated
from streams.ops.schemas import register as register_schemas
from streams.ops.topics import ensure_topics
from streams.pipeline.bridge import envelope
from streams.settings import Settings
from streams_dev.sandbox import sandbox_env, settings_from_env

REPO = Path(__file__).resolve().parent.parent


def compile_package() -> None:
    """Byte-compile the package (and the benchmarks) as an installed wheel ships it, once.

    ``make install`` installs it editable, and with ``PYTHONDONTWRITEBYTECODE`` set (this
    machine, the image) no process writes its bytecode: every process measured would
    compile the modules it imports again (measured: ~30 ms of a worker's start). Existing
    bytecode is still read with that setting; stale files are compiled again here."""
    import compileall

    for package in ("streams", "benchmarks"):
        compileall.compile_dir(REPO / package, quiet=1)


def logins(n: int, seed: int = 12, users: int | None = None) -> list[str]:
    """``n`` valid login bodies; every ``ip`` and every ``device_id`` distinct (no cache helps).

    ``users``: how many distinct ``user_id`` they come from (drawn uniformly: about n / users
    logins each, like a day of a login service); None: every login its own user.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        # IPv6 as a last hextet, then two past 65,535 ("2001:db8::10000" would not be an address:
        # 17 % of a 200,000-login input went to the reference's parser as not-an-IP until 2026-12-05).
        v6 = f"2001:db8::{i:x}" if i < 0x10000 else f"2001:db8::{i >> 16:x}:{i & 0xFFFF:x}"
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" if i % 4 else v6
        out.append(
            json.dumps(
                {
                    "user_id": f"user-{rng.randrange(users):08d}" if users else f"{rng.getrandbits(64):016x}-{i}",
                    "app_version": rng.choice(["2.3.0", "0.96", "5.0.1", "10.2"]),
                    "device_type": rng.choice(["ios", "android"]),
                    "ip": ip,
                    "locale": rng.choice(["EN", "RU", None]),
                    "device_id": f"{rng.getrandbits(48):012x}-{i}",
                }
            )
        )
    return out


class Sandbox:
    """Isolated names on the shared stack; ``env(**over)`` for a child, ``close()`` removes it all."""

    def __init__(self, prefix: str = "bench") -> None:
        self.base = Settings()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.base_env = sandbox_env(self.base, self.workdir, prefix=prefix)
        self.settings = settings_from_env(self.base_env)
        self.topics: set[str] = set()
        self.groups: set[str] = set()
        self.databases: set[str] = {self.settings.pg_dsn.get_secret_value().rsplit("/", 1)[1]}
        self.topics |= {self.settings.raw_topic, self.settings.masked_topic, self.settings.dlq_topic}
        ensure_topics(self.settings)  # 6 partitions each (not the broker's auto-created single one)
        register_schemas(self.settings)  # the deploy step (with a schema registry)
        self.registered = {self.settings.raw_topic, self.settings.masked_topic, self.settings.dlq_topic}
        # The deploy step's migration too: every stage reads the erasure ledger at start.
        require_migrated(self.settings.pg_dsn.get_secret_value())

    def env(self, **over: str) -> dict[str, str]:
        env = {**self.base_env, **over}
        s = settings_from_env(env)
        if not {s.raw_topic, s.masked_topic, s.dlq_topic} <= self.registered:
            register_schemas(s)  # new topics: their subjects too
            self.registered |= {s.raw_topic, s.masked_topic, s.dlq_topic}
        self.topics |= {s.raw_topic, s.masked_topic, s.dlq_topic, f"{s.raw_topic}.mask-dedup"}
        self.groups |= {s.app_id, f"{s.app_id}-mask", f"{s.app_id}-sink"}
        return env

    def topic(self, name: str) -> str:
        full = f"{self.settings.raw_topic.rsplit('.', 1)[0]}.{name}"
        self.topics.add(full)
        return full

    def group(self, name: str) -> str:
        full = f"{self.settings.app_id}-{name}"
        self.groups.add(full)
        return full

    def new_database(self, name: str) -> str:
        """A fresh database of this sandbox, migrated (a worker does not migrate); its DSN."""
        tag = f"{self.settings.pg_dsn.get_secret_value().rsplit('/', 1)[1]}_{name}"
        admin = self.base.pg_dsn.get_secret_value()
        dsn = admin.rsplit("/", 1)[0] + "/" + tag

        async def create() -> None:
            conn = await connect(admin)
            try:
                await conn.execute(f'CREATE DATABASE "{tag}"')
            finally:
                await conn.close()
            conn = await connect(dsn)
            try:
                await migrate(conn)
            finally:
                await conn.close()

        asyncio.run(create())
        self.databases.add(tag)
        return dsn

    def close(self) -> None:
        try:
            admin = admin_client(self.settings)
            existing = set(admin.list_topics(timeout=10).topics)
            # Every topic named under the sandbox's tag: a stage's own ones too (a changelog of a
            # raw topic the sandbox did not name through ``env``), not only those registered here.
            tag = self.settings.raw_topic.rsplit(".", 1)[0] + "."
            doomed = sorted(t for t in existing if t in self.topics or t.startswith(tag))
            if doomed:
                for future in admin.delete_topics(doomed, request_timeout=30).values():
                    future.result()
            groups = admin.delete_consumer_groups(list(self.groups), request_timeout=30) if self.groups else {}
            for future in groups.values():
                try:
                    future.result()
                except Exception:
                    pass  # a group that never committed does not exist
        except Exception as exc:
            print(f"warning: Kafka cleanup incomplete ({type(exc).__name__})", file=sys.stderr)
        admin_dsn = self.base.pg_dsn.get_secret_value()

        async def drop() -> None:
            conn = await connect(admin_dsn)
            try:
                for name in self.databases:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        try:
            asyncio.run(drop())
        except Exception as exc:
            print(f"warning: database cleanup incomplete ({type(exc).__name__})", file=sys.stderr)


def raw_records(
    topic: str, bodies: list[str], sent_at: int = 1_764_000_000_000, first: int = 0, settings: Settings | None = None
) -> list[tuple[str, bytes, bytes]]:
    """The bridge's records for ``bodies`` (message ids ``b-<first + i>``), ready to produce;
    encoded as the bridge of ``settings`` would (with a schema registry: its wire format)."""
    codec = (Codecs.from_settings(settings) if settings is not None else Codecs()).raw
    return [
        (
            topic,
            f"b-{i:08d}".encode(),
            codec.encode(
                envelope({"MessageId": f"b-{i:08d}", "Body": body, "Attributes": {"SentTimestamp": str(sent_at + i)}})
            ),
        )
        for i, body in enumerate(bodies, start=first)
    ]


def fill(settings: Settings, records: list[tuple[str, bytes | None, bytes]]) -> None:
    send_records(settings, records, chunk=20_000)


class CommittedProgress:
    """Records a consumer group has committed on a topic, read by one long-lived client."""

    def __init__(self, settings: Settings, group: str, topic: str, partitions: int) -> None:
        self.consumer = metadata_consumer(settings, group=group)
        self.partitions = [TopicPartition(topic, p) for p in range(partitions)]
        self.low = {}
        for tp in self.partitions:
            low, _ = self.consumer.get_watermark_offsets(tp, timeout=10)
            self.low[tp.partition] = low

    def __call__(self) -> int:
        committed = self.consumer.committed(self.partitions, timeout=10)
        return sum(max(tp.offset - self.low[tp.partition], 0) for tp in committed if tp.offset >= 0)

    def close(self) -> None:
        self.consumer.close()


class TopicProgress:
    """Records on a topic (its partitions' end offsets): a stage's durable outputs so far.

    Finer than committed offsets (Faust commits once a second) and what a stage's rate
    means: outputs acknowledged by the broker.
    """

    def __init__(self, settings: Settings, topic: str, partitions: int) -> None:
        self.consumer = metadata_consumer(settings)
        self.partitions = [TopicPartition(topic, p) for p in range(partitions)]
        self.start = 0
        self.start = self()

    def __call__(self) -> int:
        total = 0
        for tp in self.partitions:
            try:
                low, high = self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            except Exception:  # the topic is created by the stage itself, a moment after it starts
                continue
            total += high
        return total - self.start

    def close(self) -> None:
        self.consumer.close()


@dataclass
class Result:
    name: str
    events: int
    seconds: float = 0.0  # from start to done
    first: float | None = None  # from start to the first progress (start-up: imports, connections, assignment)
    rate: float | None = None  # steady events/s between 10 % and 90 % done
    cpu_per_100k: float | None = None  # CPU seconds per 100,000 events, same window
    peak_rss_mib: float | None = None
    notes: list[str] = field(default_factory=list)
    service_cpu_per_100k: dict[str, float] = field(default_factory=dict)  # ``measure(services=...)``, same window


def _tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _peak_rss_mib(proc: psutil.Process) -> float | None:
    try:
        with open(f"/proc/{proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def steady(samples: list[tuple[float, int, float]], total: int) -> tuple[float | None, float | None]:
    """(events/s, CPU s per 100k) between the first samples at or past 10 % and 90 % of ``total``."""
    lo = next((s for s in samples if s[1] >= 0.1 * total), None)
    hi = next((s for s in samples if s[1] >= 0.9 * total), None)
    if lo is None or hi is None or hi[0] <= lo[0] or hi[1] <= lo[1]:
        return None, None
    events = hi[1] - lo[1]
    return events / (hi[0] - lo[0]), (hi[2] - lo[2]) / events * 100_000


def measure(
    name: str,
    cmds: list[list[str]],
    env: dict[str, str],
    total: int,
    progress: Callable[[], int],
    timeout: float,
    interval: float = 0.1,
    services: dict[str, int] | None = None,
) -> Result:
    """Run ``cmds`` until ``progress()`` reaches ``total``; sample them; stop them (SIGTERM).

    CPU is the sum over every command's process tree; peak RSS is the first command's.
    ``services`` (name -> pid, e.g. a private stack's Kafka and ElasticMQ, used by nothing
    else): their CPU is sampled too, into ``service_cpu_per_100k``.
    """
    log_path = Path(tempfile.gettempdir()) / f"bench-{name.replace(' ', '_')}-{uuid.uuid4().hex[:6]}.log"
    children = []
    with open(log_path, "ab") as out:
        for cmd in cmds:
            children.append(
                subprocess.Popen(
                    cmd,
                    env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                    cwd=REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    procs = [psutil.Process(c.pid) for c in children]
    start = time.monotonic()
    samples: list[tuple[float, int, float]] = []
    watched = {name: psutil.Process(pid) for name, pid in (services or {}).items()}
    service_samples: dict[str, list[tuple[float, int, float]]] = {name: [] for name in watched}
    result = Result(name, total)
    peak = 0.0
    try:
        while True:
            now = time.monotonic()
            if now - start > timeout:
                result.notes.append(f"timed out after {timeout:.0f}s (log {log_path})")
                break
            if any(c.poll() is not None for c in children):
                result.notes.append(f"exited early (log {log_path})")
                break
            done = progress()
            if done and result.first is None:
                result.first = round(now - start, 1)
            cpu = sum(_tree_cpu(p) for p in procs)
            samples.append((now, done, cpu))
            for service, proc in watched.items():
                service_samples[service].append((now, done, _tree_cpu(proc)))
            peak = max(peak, _peak_rss_mib(procs[0]) or 0.0)
            if done >= total:
                break
            time.sleep(interval)
    finally:
        result.seconds = round(time.monotonic() - start, 1)
        for p in children:
            if p.poll() is None:
                p.terminate()
        for p in children:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    result.rate, result.cpu_per_100k = steady(samples, total)
    for service, taken in service_samples.items():
        _, cpu = steady(taken, total)
        if cpu is not None:
            result.service_cpu_per_100k[service] = cpu
    result.peak_rss_mib = round(peak, 1) if peak else None
    return result


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
