"""What a process reports: Prometheus metrics on ``/metrics`` and the liveness of its work.

Labels are stages, outcomes, reason codes, operations, topics and partitions: never a
field value, a message id or a key byte. The alerts on them are deploy/prometheus/alerts.yml
(explained in docs/deployment.md).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()

RECORDS_IN = Counter("streams_records_in", "Records a stage consumed", ["stage"], registry=REGISTRY)
RECORDS_OUT = Counter(
    "streams_records_out",
    "Records a stage finished, by outcome (masked, row, deleted, dead_letter, bridged)",
    ["stage", "outcome"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter("streams_dead_letters", "Dead letters produced", ["stage", "reason"], registry=REGISTRY)
BATCH_SIZE = Histogram(
    "streams_batch_size",
    "Records per batch",
    ["stage"],
    registry=REGISTRY,
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
BATCH_SECONDS = Histogram(
    "streams_batch_seconds",
    "Time to make a batch durable",
    ["stage"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter("streams_retries", "Retry attempts after a transient failure", ["operation"], registry=REGISTRY)
# The dependency-down alert (deploy/prometheus/alerts.yml) reads this, not a rate of the
# counter: it fires while retries keep coming and resolves soon after the first success.
LAST_RETRY = Gauge(
    "streams_last_retry_timestamp_seconds",
    "Unix time of an operation's latest retry attempt",
    ["operation"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "streams_consumer_lag",
    "Records not yet committed by the worker group",
    ["stage", "topic", "partition"],
    registry=REGISTRY,
)
REVOKES = Counter(
    "streams_revokes",
    "Partitions taken from a stage by a rebalance: with work in flight (committed first), idle, or lost",
    ["stage", "when"],
    registry=REGISTRY,
)
DUPLICATES_DROPPED = Counter(
    "streams_duplicates_dropped",
    "Raw copies of a message id the mask stage had already written (bridge copies)",
    registry=REGISTRY,
)
DEDUP_EVICTIONS = Counter(
    "streams_dedup_evictions",
    "Message ids the dedup window forgot before their time (count or byte bound): copies of them are no longer caught",
    registry=REGISTRY,
)
END_TO_END = Histogram(
    "streams_end_to_end_seconds",
    "From SQS SentTimestamp to the row's database commit",
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)


def observe_many(histogram: Histogram, amounts: Iterable[float]) -> None:
    """``histogram.observe`` of each amount, with one update per bucket instead of per amount
    (the sink observes every row's latency: ~2 µs a row one by one). Reaches into
    prometheus-client's (pinned) internals; ``tests/unit/test_sink_overlap.py`` compares
    the result with ``observe``."""
    bounds = histogram._upper_bounds  # ends with +Inf: every amount has a bucket
    counts = [0] * len(bounds)
    total = 0.0
    for amount in amounts:
        total += amount
        counts[bisect_left(bounds, amount)] += 1
    if any(counts):
        histogram._sum.inc(total)
        for bucket, n in zip(histogram._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


SQS_MESSAGES = Counter(
    "streams_sqs_messages", "SQS messages by event (received, deleted)", ["event"], registry=REGISTRY
)
SQS_VISIBILITY_EXTENSIONS = Counter(
    "streams_sqs_visibility_extensions", "Visibility extensions while a produce was pending", registry=REGISTRY
)
SQS_DELETE_FAILURES = Counter(
    "streams_sqs_delete_failures", "SQS deletes refused (e.g. stale receipt handles)", registry=REGISTRY
)
KEY_IN_USE = Gauge(
    "streams_key_in_use",
    "Masking keys in use by id (1 = active); never key bytes",
    ["join_version", "encryption_key_id"],
    registry=REGISTRY,
)

# The compiled mask core (streams/privacy/core.py): whether this process masks with it,
# and the records it declined (masked by the Python reference instead).
MASK_CORE = Gauge(
    "streams_mask_core",
    "1 when the mask stage masks in compiled code (streams_core), 0 when it uses the Python reference",
    registry=REGISTRY,
)
MASK_CORE_DECLINED = Counter(
    "streams_mask_core_declined",
    "Records the compiled mask core declined (masked by the Python reference instead)",
    registry=REGISTRY,
)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


class SeenDeadLetter(NamedTuple):
    """A dead letter as the status page lists it: never its payload or detail."""

    at: float  # epoch seconds
    stage: str
    reason: str
    message_id: str  # the SQS MessageId (or ``topic/partition/offset``): an id, never a field value


class RecentDeadLetters:
    """The last ``size`` dead letters this process counted, newest first, for the status page."""

    def __init__(self, size: int = 20) -> None:
        self._seen: deque[SeenDeadLetter] = deque(maxlen=size)

    def add(self, stage: str, reason: str, message_id: bytes | str | None) -> None:
        if isinstance(message_id, bytes):
            message_id = message_id.decode("utf-8", "replace")
        self._seen.append(SeenDeadLetter(time.time(), stage, reason, (message_id or "")[:128]))

    def newest_first(self) -> list[SeenDeadLetter]:
        return list(reversed(self._seen))


RECENT_DEAD_LETTERS = RecentDeadLetters()


def count_dead_letter(stage: str, reason: str, message_id: bytes | str | None) -> None:
    """Count a dead letter (``streams_dead_letters``) and list it on the status page: the one
    call every stage makes where it dead-letters a record."""
    DEAD_LETTERS.labels(stage, reason).inc()
    RECENT_DEAD_LETTERS.add(stage, reason, message_id)


class Liveness:
    """Is the process's work moving? Stuck = work in flight with no progress and no retry
    attempt for ``stuck_after`` seconds. An idle process, or one waiting out an outage
    (it retries), is alive; a call that hangs is not."""

    def __init__(self) -> None:
        self.stuck_after = 120.0
        self._in_flight = 0
        self._last_beat = time.monotonic()

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def started(self) -> None:
        self._in_flight += 1
        self.beat()

    def finished(self) -> None:
        self._in_flight -= 1
        self.beat()

    def stuck_for(self) -> float | None:
        """Seconds without progress while work is in flight, past the threshold; else None."""
        quiet = time.monotonic() - self._last_beat
        return quiet if self._in_flight > 0 and quiet > self.stuck_after else None


LIVENESS = Liveness()
