"""Chaos run: push N messages through while killing stages and restarting services, then audit.

``python -m streams_dev.chaos --messages 100000 --kills 5`` (``make chaos``) starts a private
stack on its own ports (the shared one is never touched), feeds the queue at a steady
rate with ``--malformed`` of the bodies invalid, SIGKILLs the worker and the bridge
``--kills`` times each (by pid, restarting them at once), restarts Kafka and PostgreSQL
once each, and checks: rows == valid ids exactly, dead-lettered ids == malformed ids,
the queue empty, consumer lag zero. It prints what was injected and what was found, and
exits 1 if the promise was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from streams.io.codec import Codecs
from streams.io.kafka import ensure_topics
from streams.io.postgres import require_migrated
from streams.io.postgres import fetch
from streams.ops import children
from streams.ops.state import current_queue_depth, dead_letters, pipeline_lag
from streams_dev.sandbox import private_settings, sandbox_env, settings_from_env
from streams.settings import Settings
from streams.io.sqs import bodies_from_json, ensure_queue, send_bodies, sqs_client
from streams.io.kafka import read_topic

MALFORMED = ["", "null", "[1,", "{'a': 1}", '{"user_id": "x"}', "[" * 5000, '{"user_id": "x", "user_id": "y"}']


@dataclass
class Report:
    messages: int = 0
    malformed: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {"worker SIGKILL": 0, "bridge SIGKILL": 0, "kafka restart": 0, "postgres restart": 0})
    rows: int = 0
    lost: int = 0
    unexpected_rows: int = 0
    dead_lettered_ids: int = 0
    dead_letter_records: int = 0
    missing_dead_letters: int = 0
    raw_records: int = 0
    queue_depth: int = -1
    lag: int = -1
    send_seconds: float = 0.0
    drain_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected_rows or self.missing_dead_letters or self.queue_depth or self.lag)

    def table(self) -> str:
        lines = [
            ("messages sent", self.messages),
            ("  of which malformed", self.malformed),
            *((f"injected: {name}", n) for name, n in self.faults.items()),
            ("raw records (redeliveries included)", self.raw_records),
            ("rows in user_logins", self.rows),
            ("lost (valid id without a row)", self.lost),
            ("duplicated / unexpected rows", self.unexpected_rows),
            ("dead-lettered ids", self.dead_lettered_ids),
            ("dead-letter records (at least once)", self.dead_letter_records),
            ("malformed ids not dead-lettered", self.missing_dead_letters),
            ("queue depth at the end", self.queue_depth),
            ("consumer lag at the end", self.lag),
            ("send time (s)", f"{self.send_seconds:.1f}"),
            ("drain time after last send (s)", f"{self.drain_seconds:.1f}"),
            ("verdict", "OK" if self.ok else "BROKEN"),
        ]
        width = max(len(name) for name, _ in lines)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def make_bodies(n: int, malformed_ratio: float, seed: int = 7) -> list[tuple[str, bool]]:
    """``(body, valid)`` pairs: a steady sprinkle of malformed bodies among unique logins."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < malformed_ratio:
            out.append((MALFORMED[i % len(MALFORMED)] or " ", False))
        else:
            login = {"user_id": f"c{i}", "app_version": f"{i % 4}.{i % 100}", "device_type": "ios",
                     "ip": f"10.{i % 256}.{(i // 256) % 256}.1", "locale": None if i % 3 else "DE", "device_id": f"dev-{i}"}
            out.append((bodies_from_json([login])[0], True))
    return out


class Stages:
    """The bridge and worker processes of the run; killed only by their own pid."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir, self.count = env, workdir, 0
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, command: str) -> None:
        self.count += 1
        self.procs[command] = children.start_stage(command, self.workdir / f"{command}-{self.count}.log", self.env)

    def check(self) -> None:
        """A stage that exits by itself is a bug the run must surface, not wait out."""
        for command, proc in self.procs.items():
            if proc.poll() is not None:
                log = max(self.workdir.glob(f"{command}-*.log"), key=lambda f: f.stat().st_mtime)
                raise RuntimeError(f"{command} exited with {proc.returncode} by itself; see {log}")

    def kill_and_restart(self, command: str) -> None:
        children.kill(self.procs[command])
        self.start(command)

    def stop_all(self) -> None:
        children.stop(self.procs.values())


def run(base: Settings, messages: int, malformed: float, kills: int, rate: float, workdir: Path,
        timeout: float = 600, say=print) -> Report:
    """One chaos run on the running stack ``base``; ``base``'s Kafka and PostgreSQL get restarted."""
    from streams_dev import stack

    env = sandbox_env(
        base, workdir, prefix="chaos",
        STREAMS_BRIDGE_VISIBILITY_TIMEOUT="10", STREAMS_RETRY_MAX_BACKOFF="2", STREAMS_TOPIC_PARTITIONS="3",
    )
    s = settings_from_env(env)
    ensure_topics(s)
    require_migrated(s.pg_dsn.get_secret_value())  # the workers only check the schema version
    report = Report()
    bodies = make_bodies(messages, malformed)
    valid_ids: set[str] = set()
    malformed_ids: set[str] = set()

    async def feed() -> None:
        async with sqs_client(s) as sqs:
            url = await ensure_queue(sqs, s.sqs_queue)
            began = time.monotonic()
            for start in range(0, len(bodies), 100):
                chunk = bodies[start : start + 100]
                ids = await send_bodies(sqs, url, [b for b, _ in chunk])
                for message_id, (_, valid) in zip(ids, chunk):
                    (valid_ids if valid else malformed_ids).add(message_id)
                ahead = (start + len(chunk)) / rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)

    stages = Stages(env, workdir)
    stages.start("bridge")
    stages.start("worker")
    feeder = threading.Thread(target=lambda: asyncio.run(feed()), name="chaos-feed")
    began = time.monotonic()
    feeder.start()
    planned = [("worker", i) for i in range(kills)] + [("bridge", i) for i in range(kills)] + [("kafka", 0), ("postgres", 0)]
    random.Random(11).shuffle(planned)
    send_estimate = messages / rate
    try:
        for n, (target, _) in enumerate(planned, 1):
            while time.monotonic() < began + send_estimate * n / (len(planned) + 1):
                stages.check()
                time.sleep(0.2)
            if target in ("worker", "bridge"):
                stages.kill_and_restart(target)
                report.faults[f"{target} SIGKILL"] += 1
            else:
                stack.stop_service(base, target)
                time.sleep(2)
                stack.start_service(base, target)
                report.faults[f"{target} restart"] += 1
            say(f"[{time.monotonic() - began:6.1f}s] injected {target} fault {n}/{len(planned)}")
        feeder.join()
        report.send_seconds = time.monotonic() - began
        sent_at = time.monotonic()
        say(f"[{report.send_seconds:6.1f}s] sent {messages} messages; draining")
        _drain(s, len(valid_ids), timeout, say, stages.check)
        report.drain_seconds = time.monotonic() - sent_at
    finally:
        stages.stop_all()
    _audit(s, report, valid_ids, malformed_ids)
    return report


def _rows(s: Settings) -> list[str]:
    try:
        return [r[0] for r in asyncio.run(fetch(s.pg_dsn.get_secret_value(), "SELECT message_id FROM user_logins"))]
    except asyncpg.UndefinedTableError:
        return []


def _drain(s: Settings, valid: int, timeout: float, say, check) -> None:
    deadline = time.monotonic() + timeout
    last_said = 0.0
    while time.monotonic() < deadline:
        check()
        try:
            rows = len(_rows(s))
            if rows >= valid and asyncio.run(current_queue_depth(s)) == 0 and pipeline_lag(s) == 0:
                return
            if time.monotonic() - last_said > 15:
                say(f"draining: {rows}/{valid} rows")
                last_said = time.monotonic()
        except Exception as exc:  # a service may still be coming back
            say(f"drain check failed ({type(exc).__name__}); retrying")
        time.sleep(2)
    say(f"not drained after {timeout:.0f}s")


def _audit(s: Settings, report: Report, valid_ids: set[str], malformed_ids: set[str]) -> None:
    rows = _rows(s)
    dead = [d["message_id"] for d in dead_letters(s)]
    report.messages = len(valid_ids) + len(malformed_ids)
    report.malformed = len(malformed_ids)
    report.rows = len(rows)
    report.lost = len(valid_ids - set(rows))
    report.unexpected_rows = len(rows) - len(set(rows)) + len(set(rows) - valid_ids)
    report.dead_letter_records = len(dead)
    report.dead_lettered_ids = len(set(dead))
    report.missing_dead_letters = len(malformed_ids - set(dead)) + len(set(dead) - malformed_ids)
    report.raw_records = len(read_topic(s, s.raw_topic))
    report.queue_depth = asyncio.run(current_queue_depth(s))
    report.lag = pipeline_lag(s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streams_dev.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--malformed", type=float, default=0.02, help="share of malformed bodies")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs of the worker, and of the bridge")
    parser.add_argument("--rate", type=float, default=1000.0, help="messages per second sent to the queue")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the drain")
    args = parser.parse_args(argv)
    from streams_dev import stack

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # run the finally blocks: stop our stages and our stack

    signal.signal(signal.SIGTERM, interrupted)

    workdir = Path(tempfile.mkdtemp(prefix="streams-chaos-"))
    base = private_settings(workdir / "stack")
    stack.up(base, report=print)
    try:
        report = run(base, args.messages, args.malformed, args.kills, args.rate, workdir, args.timeout)
    except RuntimeError as exc:
        print(f"chaos run broken: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        stack.down(base, report=print)
    print(report.table())
    if report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"stage logs kept in {workdir}")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
