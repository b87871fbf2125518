"""Time from produce to visible under ``read_committed``: what a reader of the mask stage's output waits.

Definition (``visible_latency``): the bench produces raw records at a steady rate (not a
backlog: a backlog measures queueing, not the stage) to a fresh raw topic that a running
stage (or comparator) consumes. For each record,

    latency = t_visible - t_produce

- ``t_produce``: wall-clock time just before the bench's ``produce()`` call of the raw
  record (idempotent producer, ``linger.ms=5``, ``acks=all``: what the bridge does);
- ``t_visible``: wall-clock time at which a consumer in the bench, assigned to every
  partition of the output topic with ``isolation.level=read_committed`` and
  ``fetch.wait.max.ms=10``, receives the output record with that key (the message id).

So it holds the raw produce and its acks, the stage's fetch, transform and produce, the
wait for its transaction to commit (the commit interval, ``STREAMS_COMMIT_INTERVAL``, and
the commit itself) and the reader's fetch. Records produced before the stage's first
output appeared (start-up, assignment) are left out. One clock (one machine).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from benchmarks.harness import REPO, logins, raw_records
from streams.io.kafka import client_config
from streams.settings import Settings


@dataclass
class Latency:
    name: str
    records: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    notes: list[str] = field(default_factory=list)


def _quantile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of all values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def visible_latency(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    settings: Settings,
    out_topic: str,
    partitions: int,
    rate: float,
    seconds: float,
    timeout: float = 120,
) -> Latency:
    """Run ``cmd`` on ``settings.raw_topic`` (fresh), feed it ``rate`` records/s for ``seconds``; see the module."""
    import os

    result = Latency(name)
    child = subprocess.Popen(
        cmd, env={**os.environ, **env}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    reader = Consumer(
        client_config(
            settings,
            **{
                "group.id": f"latency-{time.time_ns()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 10,
            },
        )
    )
    reader.assign([TopicPartition(out_topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    producer = Producer(client_config(settings, **{"enable.idempotence": True, "acks": "all", "linger.ms": 5}))
    n = int(rate * seconds)
    warm = raw_records(settings.raw_topic, logins(50, seed=7), first=90_000_000, settings=settings)
    records = raw_records(settings.raw_topic, logins(n, seed=8), first=80_000_000, settings=settings)
    sent: dict[bytes, float] = {}
    seen: dict[bytes, float] = {}
    try:
        # Warm up: one record every 0.2 s until the stage's first output is visible.
        deadline = time.monotonic() + timeout
        ready = False
        for topic, key, value in warm:
            producer.produce(topic, value=value, key=key)
            producer.poll(0)
            until = time.monotonic() + 0.2
            while time.monotonic() < until:
                if reader.consume(100, 0.05):
                    ready = True
            if ready or time.monotonic() > deadline:
                break
        if not ready:
            result.notes.append("no output within the warm-up")
            return result

        def feed() -> None:
            start = time.monotonic()
            for i, (topic, key, value) in enumerate(records):
                pause = start + i / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sent[key] = time.time()
                while True:
                    try:
                        producer.produce(topic, value=value, key=key)
                        break
                    except BufferError:
                        producer.poll(0.01)
                producer.poll(0)
            producer.flush(30)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        deadline = time.monotonic() + seconds + timeout
        while len(seen) < n and time.monotonic() < deadline:
            for msg in reader.consume(1000, 0.05):
                if msg.error() is None:
                    now = time.time()
                    key = msg.key()
                    if key is not None and key not in seen:
                        seen[key] = now
        feeder.join(30)
    finally:
        reader.close()
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    latencies = [(seen[k] - t) * 1000 for k, t in sent.items() if k in seen]
    if len(latencies) < n:
        result.notes.append(f"{n - len(latencies)} of {n} records never visible")
    if latencies:
        result.records = len(latencies)
        result.p50_ms = statistics.median(latencies)
        result.p99_ms = _quantile(latencies, 0.99)
        result.max_ms = max(latencies)
    return result
