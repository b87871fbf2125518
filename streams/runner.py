"""``streams run``: the bridge and a worker as child processes, with progress and a summary.

Children log to files under the stack folder; this process prints one progress line
every few seconds. Ctrl-C (or SIGTERM) stops both children cleanly. With ``drain`` it
stops once the queue is empty and both stages have committed everything.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from streams.codec import Codecs
from streams.kafka import group_lag
from streams.settings import Settings
from streams.sqs import ensure_queue, queue_depth, sqs_client
from streams.topic_reader import read_topic

PROGRESS_EVERY = 2.0
STOP_TIMEOUT = 30.0


async def current_queue_depth(settings: Settings) -> int:
    async with sqs_client(settings) as sqs:
        return await queue_depth(sqs, await ensure_queue(sqs, settings.sqs_queue))


async def row_count(settings: Settings) -> int | None:
    try:
        conn = await asyncpg.connect(settings.pg_dsn.get_secret_value(), timeout=5)
    except Exception:
        return None
    try:
        return await conn.fetchval("SELECT count(*) FROM user_logins")
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def pipeline_lag(settings: Settings) -> int:
    """Records the worker group has not committed yet, across raw and masked topics."""
    offsets = group_lag(settings, [settings.raw_topic, settings.masked_topic])
    return sum(max(end - committed, 0) for committed, end in offsets.values())


def dead_letter_counts(settings: Settings) -> collections.Counter:
    codec = Codecs().dead_letter
    return collections.Counter(codec.decode(v)["reason"] for _, v in read_topic(settings.kafka_bootstrap, settings.dlq_topic))


async def _sample_rows(settings: Settings, n: int = 3) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.pg_dsn.get_secret_value())
    try:
        return await conn.fetch(
            "SELECT user_id, device_type, masked_ip, masked_device_id, locale, app_version, app_version_raw, create_date"
            " FROM user_logins ORDER BY sent_at, message_id LIMIT $1",
            n,
        )
    finally:
        await conn.close()


def _spawn(command: str, log_dir: Path) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(log_dir / f"{command}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "streams", command], stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy()
    )


def _stop(children: list[subprocess.Popen]) -> int:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    worst = 0
    for child in children:
        try:
            code = child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        worst = worst or code
    return worst


def print_summary(settings: Settings) -> None:
    rows = asyncio.run(row_count(settings))
    print(f"\nrows in user_logins: {rows}")
    counts = dead_letter_counts(settings)
    print(f"dead letters: {sum(counts.values())}" + "".join(f"\n  {reason}: {n}" for reason, n in sorted(counts.items())))
    print("a few masked rows:")
    for row in asyncio.run(_sample_rows(settings)):
        print("  " + " | ".join(f"{k}={v}" for k, v in row.items()))


def run_pipeline(settings: Settings, drain: bool = False) -> int:
    log_dir = settings.stack_dir / "logs"
    children = [_spawn("bridge", log_dir), _spawn("worker", log_dir)]
    print(f"bridge pid {children[0].pid}, worker pid {children[1].pid}; logs in {log_dir}")
    stop_requested = False

    def request_stop(*_):
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    started = time.monotonic()
    settled = 0
    try:
        while not stop_requested:
            time.sleep(PROGRESS_EVERY)
            if any(c.poll() is not None for c in children):
                print("a child process exited; see its log", file=sys.stderr)
                break
            depth = asyncio.run(current_queue_depth(settings))
            lag = pipeline_lag(settings)
            rows = asyncio.run(row_count(settings))
            print(f"[{time.monotonic() - started:6.1f}s] queue {depth} | uncommitted {lag} | rows {rows}", flush=True)
            settled = settled + 1 if depth == 0 and lag == 0 else 0
            if drain and settled >= 2:
                break
    finally:
        code = _stop(children)
    print(f"stopped (exit codes {[c.returncode for c in children]})")
    if drain:
        print_summary(settings)
    return 0 if code in (0, -signal.SIGTERM) else 1
