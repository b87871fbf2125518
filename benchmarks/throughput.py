"""Throughput of the worker and the time a replay takes, on the running local stack.

Fills a fresh raw topic with N envelopes (the sample's logins, each with its own message
id) straight through Kafka, so the SQS bridge is not what is measured, then times
``streams worker`` processes from start to every row in PostgreSQL, for 1 and for 3
workers, and the time a ``streams replay mask --to earliest`` run takes to rewrite them.

    python -m benchmarks.throughput --messages 20000 --workers 1,3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from streams.io.codec import Codecs
from streams.io.kafka import admin_client, group_lag, send_records
from streams.io.postgres import connect, require_migrated
from streams.ops.state import row_count
from streams.ops.topics import ensure_topics, topic_configs
from streams.pipeline.bridge import envelope
from streams.settings import Settings
from streams_dev.sandbox import sandbox_env, settings_from_env

REPO = Path(__file__).resolve().parent.parent
SAMPLE = next(
    (p for p in (REPO.parent / "shared/data/sample_data.json", REPO / "data/sample_data.json") if p.exists()), None
)


def produce_raw(settings: Settings, records: list[object], chunk: int = 5000) -> list[str]:
    """Put each record on the raw topic as the bridge would (fresh message ids); returns the ids.

    The topics are created first, as the settings describe them (a raw topic the broker
    auto-created would have its defaults: one partition, week-long segments)."""
    ensure_topics(settings)
    codec = Codecs().raw
    now = int(time.time() * 1000)
    ids = [str(uuid.uuid4()) for _ in records]
    encoded = [
        (
            settings.raw_topic,
            mid.encode(),
            codec.encode(
                envelope({"MessageId": mid, "Body": json.dumps(r), "Attributes": {"SentTimestamp": str(now)}})
            ),
        )
        for mid, r in zip(ids, records, strict=True)
    ]

    send_records(settings, encoded, chunk)
    return ids


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _rows(settings: Settings) -> int:
    return asyncio.run(row_count(settings)) or 0


def _run_workers(env: dict[str, str], workers: int, expected_rows: int, settings: Settings, timeout: float) -> dict:
    """Run ``workers`` processes until every row is written and every offset committed.

    ``seconds`` counts from process start (what an operator waits, start-up included);
    ``per_second`` is the steady rate: raw records committed after the first commit seen,
    over the time from then to the end, so start-up and group join are left out.
    """
    full = {**os.environ, **env}
    start = time.monotonic()
    log_path = Path(env["STREAMS_KEYS_FILE"]).with_name(f"workers-{time.time():.0f}.log")
    log = open(log_path, "ab")  # noqa: SIM115 - closed once the workers stop
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "streams", "worker", "--log-level", "warning"],
            env=full,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(workers)
    ]
    first: tuple[float, int] | None = None
    initial_raw_lag = None
    try:
        while True:
            now = time.monotonic()
            if now - start > timeout:
                raise TimeoutError(f"{workers} worker(s) did not finish {expected_rows} rows in {timeout}s")
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker exited early: see {log_path}")
            offsets = group_lag(settings, [settings.raw_topic, settings.masked_topic])
            raw_lag = sum(e - c for (t, _), (c, e) in offsets.items() if t == settings.raw_topic)
            lag = sum(e - c for c, e in offsets.values())
            initial_raw_lag = raw_lag if initial_raw_lag is None else initial_raw_lag
            if first is None and raw_lag < initial_raw_lag:
                first = (now, raw_lag)
            if lag == 0 and _rows(settings) >= expected_rows:
                result = {"seconds": round(now - start, 1)}
                if first and first[1] > 0 and now > first[0]:
                    result["per_second"] = round(first[1] / (now - first[0]))
                return result
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)


def measure(messages: int, workers: int, replay: bool, timeout: float) -> dict:
    """One isolated run: fill, process with ``workers`` processes, optionally replay the mask stage."""
    base = Settings()
    keys_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    env = sandbox_env(base, keys_dir, prefix="bench")
    settings = settings_from_env(env)
    ensure_topics(settings)
    require_migrated(settings.pg_dsn.get_secret_value())  # workers only check the schema version
    sample = [r for r in json.loads(SAMPLE.read_text()) if "ip" in r]
    records = [sample[i % len(sample)] for i in range(messages)]
    try:
        return _fill_and_time(settings, env, records, workers, replay, timeout)
    finally:
        _cleanup(settings, base)


def _cleanup(settings: Settings, base: Settings) -> None:
    """Leave no benchmark data behind on the shared stack; a failure here only warns."""
    try:
        admin = admin_client(settings)
        for future in admin.delete_topics(list(topic_configs(settings)), request_timeout=30).values():
            future.result()
        admin.delete_consumer_groups([settings.app_id], request_timeout=30)[settings.app_id].result()
        database = settings.pg_dsn.get_secret_value().rsplit("/", 1)[1]
        asyncio.run(_drop_database(base.pg_dsn.get_secret_value(), database))
    except Exception as exc:
        print(f"warning: cleanup of {settings.app_id} incomplete ({type(exc).__name__})", file=sys.stderr)


def _fill_and_time(
    settings: Settings, env: dict[str, str], records: list, workers: int, replay: bool, timeout: float
) -> dict:
    messages = len(records)
    produce_raw(settings, records)
    result = {"messages": messages, "workers": workers, **_run_workers(env, workers, messages, settings, timeout)}
    if replay:
        start = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "streams", "replay", "mask", "--to", "earliest"],
            env={**os.environ, **env},
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=120,
        )
        again = _run_workers(env, workers, messages, settings, timeout)
        result["replay_seconds"] = round(time.monotonic() - start, 1)
        result["replay_per_second"] = again.get("per_second", "?")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=int(os.environ.get("BENCH_MESSAGES", 10000)))
    parser.add_argument(
        "--workers", default=os.environ.get("BENCH_WORKERS", "1,3"), help="comma-separated worker counts"
    )
    parser.add_argument("--replay", action="store_true", help="also time a mask replay from earliest")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    for n in (int(w) for w in args.workers.split(",")):
        r = measure(args.messages, n, args.replay, args.timeout)
        line = f"{r['workers']} worker(s): {r['messages']} messages to rows in {r['seconds']}s from start"
        line += f" (steady {r.get('per_second', '?')} msg/s)"
        if "replay_seconds" in r:
            line += (
                f"; replay mask from earliest: {r['replay_seconds']}s (steady {r.get('replay_per_second', '?')} msg/s)"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
