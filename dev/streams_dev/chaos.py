"""Chaos run: push N messages through while killing stages, brokers and PostgreSQL, then audit.

``python -m streams_dev.chaos --messages 100000 --kills 5`` (``make chaos``) starts a private
stack on its own ports (the shared one is never touched), three Kafka brokers by default
(``--brokers``), feeds the queue at a steady rate with ``--malformed`` of the bodies
invalid, SIGKILLs the worker and the bridge ``--kills`` times each (by pid, restarting
them at once), SIGKILLs the leader of the busiest raw partition ``--leader-kills`` times
(found through the cluster metadata; restarted after the SQS visibility timeout, and the
next kill waits until every replica is back in sync), restarts PostgreSQL once (and, on
one broker, Kafka once, for longer than the visibility timeout), and injects the hostile
records of docs/delivery.md: bodies with a known reason each (among them a 5,000-digit
number and a body over STREAMS_MAX_BODY_BYTES), tombstones on the raw and masked topics,
and a raw record with an over-long message id. Then it audits: every valid id has exactly
one row whose content is what its input implies (tokens recomputed with the run's keys),
every injected record is dead-lettered with its specific reason (or deleted, for a masked
tombstone), the queue is empty, consumer lag zero, and a ``read_committed`` reader sees
every message id exactly once across the masked and dead-letter topics (the run's masked
topic gets a ``min.compaction.lag.ms`` beyond the run, so compaction hides no copy). It
also reports copies a ``read_uncommitted`` reader sees (aborted transactions), copies per
message id on the raw topic and in the DLQ (redeliveries after a SIGKILL between produce
and delete are at-least-once), and SQS deletes refused on stale receipt handles. It exits
1 if the promise was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from streams.io.codec import Codecs
from streams.io.kafka import admin_client, metadata_consumer, read_topic, send_records
from streams.io.postgres import fetch, require_migrated
from streams.io.sqs import bodies_from_json, ensure_queue, send_bodies, sqs_client
from streams.ops import children
from streams.ops.schemas import register as register_schemas
from streams.ops.state import current_queue_depth, dead_letters, pipeline_lag
from streams.ops.topics import ensure_topics
from streams.pipeline.dead_letters import MAX_MESSAGE_ID
from streams.pipeline.mask import parse_login
from streams.privacy.keys import settings_keyring
from streams.privacy.masking import Masker, canonical_device_id, canonical_ip
from streams.settings import Settings
from streams_dev.sandbox import private_settings, sandbox_env, settings_from_env

# The run's masked topic keeps every copy this long (compaction would hide duplicates).
KEEP_UNCOMPACTED_MS = 7 * 24 * 3600 * 1000
MAX_BODY = 100_000  # STREAMS_MAX_BODY_BYTES of the run: the oversized body below is over it
# (body, the reason its dead letter must carry)
MALFORMED = [
    (" ", "empty_body"),
    ("null", "not_an_object"),
    ("[1,", "invalid_json"),
    ("{'a': 1}", "invalid_json"),
    ('{"user_id": "x"}', "missing_field"),
    ("[" * 5000, "too_deep"),
    ('{"user_id": "x", "user_id": "y"}', "duplicate_key"),
    ('{"user_id": ' + "9" * 5000 + "}", "number_too_long"),
    ("{" + "x" * (MAX_BODY + 1000), "too_large"),
]


@dataclass
class Report:
    messages: int = 0
    malformed: int = 0
    brokers: int = 1
    faults: dict[str, int] = field(default_factory=dict)  # fault -> times injected
    killed_leaders: list[str] = field(default_factory=list)  # "raw partition 2 on kafka-3"
    rows: int = 0
    lost: int = 0
    unexpected_rows: int = 0
    dead_lettered_ids: int = 0
    dead_letter_records: int = 0
    missing_dead_letters: int = 0
    raw_records: int = 0
    wrong_reasons: int = 0
    content_mismatches: int = 0
    raw_redelivered_ids: int = 0
    dlq_redelivered_ids: int = 0
    failed_deletes: int = 0
    # Copies per message id across the masked and DLQ topics, as each kind of reader sees them.
    topic_records: int = 0
    topic_duplicated_ids: int = 0  # read_committed: ids with more than one record
    topic_extra_copies: int = 0  # read_committed: records beyond the first per id
    uncommitted_extra_copies: int = 0  # read_uncommitted: includes aborted transactions
    injected: dict[str, int] = field(default_factory=dict)
    queue_depth: int = -1
    lag: int = -1
    send_seconds: float = 0.0
    drain_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.unexpected_rows
            or self.missing_dead_letters
            or self.wrong_reasons
            or self.content_mismatches
            or self.queue_depth
            or self.lag
            or self.topic_extra_copies
        )

    def table(self) -> str:
        lines = [
            ("Kafka brokers", self.brokers),
            ("messages sent", self.messages),
            ("  of which malformed", self.malformed),
            *((f"injected: {name}", n) for name, n in self.faults.items()),
            *(("  killed leader", where) for where in self.killed_leaders),
            *((f"injected record: {name}", n) for name, n in self.injected.items()),
            ("raw records (redeliveries included)", self.raw_records),
            ("  ids with more than one raw copy", self.raw_redelivered_ids),
            ("rows in user_logins", self.rows),
            ("lost (valid id without a row)", self.lost),
            ("duplicated / unexpected rows", self.unexpected_rows),
            ("rows whose content is not what the input implies", self.content_mismatches),
            ("dead-lettered ids", self.dead_lettered_ids),
            ("dead-letter records (at least once)", self.dead_letter_records),
            ("  ids with more than one dead letter", self.dlq_redelivered_ids),
            ("injected ids not dead-lettered (or extra)", self.missing_dead_letters),
            ("dead letters with the wrong reason", self.wrong_reasons),
            ("masked + DLQ records (read_committed)", self.topic_records),
            ("  ids with more than one record (read_committed)", self.topic_duplicated_ids),
            ("  extra copies (read_committed)", self.topic_extra_copies),
            ("  extra copies (read_uncommitted)", self.uncommitted_extra_copies),
            ("SQS deletes refused (stale receipt handle)", self.failed_deletes),
            ("queue depth at the end", self.queue_depth),
            ("consumer lag at the end", self.lag),
            ("send time (s)", f"{self.send_seconds:.1f}"),
            ("drain time after last send (s)", f"{self.drain_seconds:.1f}"),
            ("verdict", "OK" if self.ok else "BROKEN"),
        ]
        width = max(len(name) for name, _ in lines)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def login(i: int) -> dict:
    return {
        "user_id": f"c{i}",
        "app_version": f"{i % 4}.{i % 100}",
        "device_type": "ios",
        "ip": f"10.{i % 256}.{(i // 256) % 256}.1",
        "locale": None if i % 3 else "DE",
        "device_id": f"dev-{i}",
    }


def make_bodies(n: int, malformed_ratio: float, seed: int = 7) -> list[tuple[str, str | None]]:
    """``(body, expected reason)`` pairs (None: valid): a steady sprinkle of malformed bodies."""
    rng = random.Random(seed)
    out: list[tuple[str, str | None]] = []
    for i in range(n):
        if rng.random() < malformed_ratio:
            out.append(MALFORMED[i % len(MALFORMED)])
        else:
            out.append((bodies_from_json([login(i)])[0], None))
    return out


def inject_records(s: Settings) -> tuple[dict[str, str], set[str]]:
    """Hostile records straight onto the topics: ``{message id: expected reason}`` and the
    ids of masked records that a tombstone then deletes."""
    codecs, tag = Codecs(), uuid.uuid4().hex[:8]
    long_id = f"long-{tag}-" + "x" * 6000
    expected = {f"tomb-{tag}": "empty_record", long_id[:MAX_MESSAGE_ID]: "invalid_message_id"}
    deleted = {f"gone-{tag}-{i}" for i in range(3)}
    now = datetime.now(UTC)
    masked = [
        (
            s.masked_topic,
            mid.encode(),
            codecs.masked.encode(
                {
                    "message_id": mid,
                    "sent_at": now,
                    "user_id": "gone",
                    "device_type": "ios",
                    "locale": None,
                    "app_version_raw": "1",
                    "app_version": 1000000,
                    "masked_ip": f"h1.{mid}",
                    "masked_device_id": "h1.d",
                    "ip_ciphertext": "k1.v2.c",
                    "device_id_ciphertext": "k1.v2.d",
                    "ip_is_valid": True,
                }
            ),
        )
        for mid in sorted(deleted)
    ]
    send_records(
        s,
        [
            (s.raw_topic, f"tomb-{tag}".encode(), None),
            (
                s.raw_topic,
                b"long",
                codecs.raw.encode({"message_id": long_id, "sent_at": 1, "body": "{}", "attributes": {}}),
            ),
            *masked,
        ],
    )
    send_records(s, [(s.masked_topic, mid.encode(), None) for mid in sorted(deleted)])
    return expected, deleted


def keep_every_copy(s: Settings, topic: str) -> None:
    """Compaction must not hide a duplicate before the audit counts it: records of the
    run's compacted ``topic`` stay uncompacted for longer than any run (as long as the
    topic's bounded max.compaction.lag.ms allows: Kafka refuses a min above the max)."""
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(
                "min.compaction.lag.ms",
                str(min(KEEP_UNCOMPACTED_MS, s.masked_compaction_lag_ms)),
                incremental_operation=AlterConfigOpType.SET,
            )
        ],
    )
    admin = admin_client(s)  # kept alive until the futures resolve
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def busiest_partition(s: Settings, topic: str) -> tuple[int, int]:
    """``(partition, leader node id)`` of the partition of ``topic`` that grew most over one
    second (the bridge writes it, the mask stage reads it), from the cluster metadata."""
    consumer = metadata_consumer(s)
    try:
        leaders = {
            p: meta.leader
            for p, meta in admin_client(s).list_topics(topic, timeout=10).topics[topic].partitions.items()
        }

        def ends() -> dict[int, int]:
            return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in leaders}

        before = ends()
        time.sleep(1)
        after = ends()
    finally:
        consumer.close()
    partition = max(leaders, key=lambda p: (after[p] - before[p], after[p]))
    return partition, leaders[partition]


def wait_in_sync(s: Settings, timeout: float, check) -> None:
    """Until every partition of the cluster has all its replicas in sync (a restarted broker
    caught up), so the next broker kill never takes a partition below min.insync.replicas."""
    admin = admin_client(s)
    deadline = time.monotonic() + timeout
    while True:
        check()
        try:
            topics = admin.list_topics(timeout=10).topics.values()
            behind = [
                (t.topic, p) for t in topics for p, meta in t.partitions.items() if len(meta.isrs) < len(meta.replicas)
            ]
        except Exception as exc:  # metadata not answered while a broker comes back
            behind = [(type(exc).__name__, -1)]
        if not behind:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas not back in sync {timeout:.0f}s after a broker restart: {behind[:3]}")
        time.sleep(0.5)


def kill_busy_leader(base: Settings, s: Settings, down_for: float, check) -> str:
    """SIGKILL the broker leading the busiest raw partition, keep it down ``down_for`` seconds
    (clients fail over), restart it and wait until its replicas are in sync again."""
    from streams_dev import stack

    wait_in_sync(s, 120, check)
    partition, node = busiest_partition(s, s.raw_topic)
    stack.kill_service(base, f"kafka-{node}")
    time.sleep(down_for)
    stack.start_service(base, f"kafka-{node}")
    wait_in_sync(s, 120, check)
    return f"raw partition {partition} on kafka-{node}"


def topic_copies(s: Settings, isolation: str, timeout: float = 30.0) -> Counter:
    """Records per message id across the masked and DLQ topics (keys are message ids), as a
    reader with ``isolation.level`` = ``isolation`` sees them, up to the partitions' ends.
    Masked tombstones and the masked records the run put there itself (``gone-*``) are not
    outputs of the pipeline and are left out. The bridge's own dead letters count once per
    id: the bridge is at-least-once by nature (SQS has no transactions), so a bridge killed
    between its produce and its SQS delete writes one again ("ids with more than one dead
    letter" reports those)."""
    consumer = metadata_consumer(s, **{"enable.partition.eof": True, "isolation.level": isolation})
    dead_letter_codec = Codecs.from_settings(s).dead_letter
    bridge_dead: set[str] = set()
    copies: Counter = Counter()
    try:
        for topic in (s.masked_topic, s.dlq_topic):
            partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            remaining = set(partitions)
            while remaining:
                msg = consumer.poll(timeout)
                if msg is None:
                    raise RuntimeError(f"reading {topic} ({isolation}): no record nor end within {timeout:.0f}s")
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"reading {topic} ({isolation}): {error.str()}")
                    remaining.discard(msg.partition())
                    continue
                key = (msg.key() or b"").decode("utf-8", "replace")
                if topic == s.masked_topic and (msg.value() is None or key.startswith("gone-")):
                    continue
                if topic == s.dlq_topic and dead_letter_codec.decode(msg.value())["stage"] == "bridge":
                    if key in bridge_dead:  # a bridge copy: at least once, counted once
                        continue
                    bridge_dead.add(key)
                copies[key] += 1
    finally:
        consumer.close()
    return copies


def written(s: Settings, topics: list[str]) -> int:
    """Records written to ``topics`` so far (end offsets summed; 0 while Kafka does not answer)."""
    consumer = metadata_consumer(s)
    try:
        metadata = consumer.list_topics(timeout=10).topics
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for topic in topics
            for p in metadata[topic].partitions
        )
    except Exception:
        return 0
    finally:
        consumer.close()


class Stages:
    """The bridge and worker processes of the run; killed only by their own pid, and only
    once they write (a kill of a stage still starting up would test nothing)."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir, self.count = env, workdir, 0
        self.settings = settings_from_env(env)
        s = self.settings
        self.outputs = {"bridge": [s.raw_topic], "worker": [s.masked_topic, s.dlq_topic]}
        self.procs: dict[str, subprocess.Popen] = {}
        self.written_at_start: dict[str, int] = {}

    def start(self, command: str) -> None:
        self.count += 1
        self.written_at_start[command] = written(self.settings, self.outputs[command])
        # The worker is child 0 of the run, and its restarts take its slot (a stable
        # transactional id, so the new one fences the killed one's transaction).
        env = {**self.env, "STREAMS_WORKER_SLOT": "0"} if command == "worker" else self.env
        # The run restarts Kafka and PostgreSQL while stages start; a stage that gave up
        # waiting at start would exit (its supervisor restarts it), which the run counts as a bug.
        env = {"STREAMS_STARTUP_TIMEOUT": "180", **env}
        self.procs[command] = children.start_stage(command, self.workdir / f"{command}-{self.count}.log", env)

    def wait_busy(self, command: str, timeout: float = 60.0) -> bool:
        """Until ``command`` wrote since its (re)start, so its kill lands mid-work; False if
        it wrote nothing within ``timeout`` (nothing left to do: the kill tests less)."""
        deadline = time.monotonic() + timeout
        while written(self.settings, self.outputs[command]) <= self.written_at_start[command]:
            self.check()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

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


def run(
    base: Settings,
    messages: int,
    malformed: float,
    kills: int,
    rate: float,
    workdir: Path,
    timeout: float = 600,
    say=print,
    leader_kills: int = 0,
) -> Report:
    """One chaos run on the running stack ``base``; ``base``'s PostgreSQL gets restarted, and its
    Kafka too (one broker) or ``leader_kills`` partition leaders SIGKILLed (several brokers)."""
    from streams_dev import stack

    visibility = 5
    env = sandbox_env(
        base,
        workdir,
        prefix="chaos",
        STREAMS_BRIDGE_VISIBILITY_TIMEOUT=str(visibility),
        STREAMS_RETRY_MAX_BACKOFF="2",
        STREAMS_TOPIC_PARTITIONS="3",
        STREAMS_MAX_BODY_BYTES=str(MAX_BODY),
    )
    s = settings_from_env(env)
    ensure_topics(s)
    keep_every_copy(s, s.masked_topic)
    require_migrated(s.pg_dsn.get_secret_value())  # the workers only check the schema version
    register_schemas(s)  # the deploy step: with a registry, the stages only look their schemas up
    report = Report(brokers=base.kafka_brokers)
    if leader_kills and base.kafka_brokers < 3:
        raise RuntimeError(
            f"a leader kill needs three brokers (min.insync.replicas 2); the stack has {base.kafka_brokers}"
        )
    bodies = make_bodies(messages, malformed)
    valid_ids: dict[str, str] = {}  # message id -> body
    malformed_ids: dict[str, str] = {}  # message id -> expected reason

    async def feed() -> None:
        async with sqs_client(s) as sqs:
            url = await ensure_queue(sqs, s.sqs_queue)
            began = time.monotonic()
            for start in range(0, len(bodies), 100):
                chunk = bodies[start : start + 100]
                ids = await send_bodies(sqs, url, [b for b, _ in chunk])
                for message_id, (body, reason) in zip(ids, chunk, strict=True):
                    if reason is None:
                        valid_ids[message_id] = body
                    else:
                        malformed_ids[message_id] = reason
                ahead = (start + len(chunk)) / rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)

    stages = Stages(env, workdir)
    stages.start("bridge")
    stages.start("worker")
    feeder = threading.Thread(target=lambda: asyncio.run(feed()), name="chaos-feed")
    began = time.monotonic()
    feeder.start()
    planned = (
        [("worker", i) for i in range(kills)]
        + [("bridge", i) for i in range(kills)]
        + [("leader", i) for i in range(leader_kills)]
        + ([("kafka", 0)] if base.kafka_brokers == 1 else [])
        + [("postgres", 0)]
    )
    random.Random(11).shuffle(planned)
    names = {"worker": "worker SIGKILL", "bridge": "bridge SIGKILL", "leader": "partition leader SIGKILL"}
    report.faults = {names.get(t, f"{t} restart"): 0 for t, _ in sorted(set(planned), key=lambda p: p[0])}
    send_estimate = messages / rate
    try:
        for n, (target, _) in enumerate(planned, 1):
            while time.monotonic() < began + send_estimate * n / (len(planned) + 1):
                stages.check()
                time.sleep(0.2)
            if target in ("worker", "bridge"):
                if not stages.wait_busy(target):
                    say(f"{target} wrote nothing since its start: killing it idle")
                stages.kill_and_restart(target)
                report.faults[f"{target} SIGKILL"] += 1
            elif target == "leader":
                report.killed_leaders.append(kill_busy_leader(base, s, down_for=visibility, check=stages.check))
                report.faults["partition leader SIGKILL"] += 1
            else:
                stack.stop_service(base, target)
                # Kafka stays down longer than the visibility timeout: produces stay pending.
                time.sleep(visibility * 2 if target == "kafka" else 2)
                stack.start_service(base, target)
                report.faults[f"{target} restart"] += 1
            if n == len(planned) // 2:
                injected, tombstoned = inject_records(s)
                malformed_ids.update(injected)
                report.injected = {"raw tombstone": 1, "over-long message id": 1, "masked tombstone": len(tombstoned)}
            say(f"[{time.monotonic() - began:6.1f}s] injected {target} fault {n}/{len(planned)}")
        feeder.join()
        report.send_seconds = time.monotonic() - began
        sent_at = time.monotonic()
        say(f"[{report.send_seconds:6.1f}s] sent {messages} messages; draining")
        _drain(s, len(valid_ids), timeout, say, stages.check)
        report.drain_seconds = time.monotonic() - sent_at
    finally:
        stages.stop_all()
    _audit(s, report, valid_ids, malformed_ids, workdir)
    return report


def _rows(s: Settings) -> list:
    try:
        return asyncio.run(fetch(s.pg_dsn.get_secret_value(), "SELECT * FROM user_logins"))
    except asyncpg.UndefinedTableError:
        return []


def _drain(s: Settings, valid: int, timeout: float, say, check) -> None:
    deadline = time.monotonic() + timeout
    last_said = 0.0
    while time.monotonic() < deadline:
        check()
        try:
            rows = len([r for r in _rows(s) if not r["message_id"].startswith("gone-")])
            if rows >= valid and asyncio.run(current_queue_depth(s)) == 0 and pipeline_lag(s) == 0:
                return
            if time.monotonic() - last_said > 15:
                say(f"draining: {rows}/{valid} rows")
                last_said = time.monotonic()
        except Exception as exc:  # a service may still be coming back
            say(f"drain check failed ({type(exc).__name__}); retrying")
        time.sleep(2)
    say(f"not drained after {timeout:.0f}s")


def _audit(s: Settings, report: Report, valid: dict[str, str], malformed: dict[str, str], workdir: Path) -> None:
    rows = _rows(s)
    row_ids = [r["message_id"] for r in rows]
    letters = dead_letters(s)
    dead = [d["message_id"] for d in letters]
    report.messages = len(valid) + len(malformed)
    report.malformed = len(malformed)
    report.rows = len(rows)
    report.lost = len(set(valid) - set(row_ids))
    report.unexpected_rows = len(row_ids) - len(set(row_ids)) + len(set(row_ids) - set(valid))
    report.content_mismatches = _content_mismatches(s, rows, valid)
    report.dead_letter_records = len(dead)
    report.dead_lettered_ids = len(set(dead))
    report.missing_dead_letters = len(set(malformed) - set(dead)) + len(set(dead) - set(malformed))
    report.wrong_reasons = sum(
        1 for d in letters if d["message_id"] in malformed and d["reason"] != malformed[d["message_id"]]
    )
    report.dlq_redelivered_ids = sum(1 for n in Counter(dead).values() if n > 1)
    raw_keys = [k for k, _ in read_topic(s, s.raw_topic)]
    report.raw_records = len(raw_keys)
    report.raw_redelivered_ids = sum(1 for n in Counter(raw_keys).values() if n > 1)
    report.failed_deletes = sum(
        log.read_text(errors="replace").count("not deleted") for log in workdir.glob("bridge-*.log")
    )
    report.queue_depth = asyncio.run(current_queue_depth(s))
    report.lag = pipeline_lag(s)
    committed = topic_copies(s, "read_committed")
    report.topic_records = sum(committed.values())
    report.topic_duplicated_ids = sum(1 for n in committed.values() if n > 1)
    report.topic_extra_copies = report.topic_records - len(committed)
    uncommitted = topic_copies(s, "read_uncommitted")
    report.uncommitted_extra_copies = sum(uncommitted.values()) - len(uncommitted)
    doubled = {key for key, n in committed.items() if n > 1}
    if doubled:  # where each copy sits, for whoever reads the run's workdir (message ids only)
        (workdir / "doubled.txt").write_text(_positions(s, doubled))


def _positions(s: Settings, keys: set[str]) -> str:
    """Topic, partition, offset and timestamp of every record keyed by one of ``keys``, raw
    topic included, and the dedup changelog entries naming them (read_committed)."""
    from streams.ops.topology import changelog_topic
    from streams.pipeline.dedup import decode

    consumer = metadata_consumer(s, **{"enable.partition.eof": True, "isolation.level": "read_committed"})
    lines = []
    try:
        for topic in (s.raw_topic, s.masked_topic, s.dlq_topic, changelog_topic(s)):
            partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            remaining = set(partitions)
            while remaining:
                msg = consumer.poll(30)
                if msg is None:
                    break
                if msg.error() is not None:
                    remaining.discard(msg.partition())
                    continue
                names = [k.decode("utf-8", "replace") for k, _ in decode(msg.key(), msg.value())]
                if topic != changelog_topic(s):
                    names = [(msg.key() or b"").decode("utf-8", "replace")]
                for name in names:
                    if name in keys:
                        lines.append(f"{name} {topic} p{msg.partition()} o{msg.offset()} t{msg.timestamp()[1]}")
    finally:
        consumer.close()
    return "\n".join(sorted(lines)) + "\n"


def _content_mismatches(s: Settings, rows: list, valid: dict[str, str]) -> int:
    """Rows whose columns differ from what their input body implies (tokens recomputed with the run's keys)."""
    masker = Masker(settings_keyring(s))
    wrong = 0
    for row in rows:
        body = valid.get(row["message_id"])
        if body is None:
            continue
        login = parse_login(body)
        expected = {
            "user_id": login.user_id,
            "device_type": login.device_type,
            "locale": login.locale,
            "app_version_raw": login.app_version_raw,
            "app_version": login.app_version,
            "masked_ip": masker.token("ip", canonical_ip(login.ip)[0]),
            "masked_device_id": masker.token("device_id", canonical_device_id(login.device_id)),
        }
        wrong += any(row[k] != v for k, v in expected.items())
    return wrong


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streams_dev.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--malformed", type=float, default=0.02, help="share of malformed bodies")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs of the worker, and of the bridge")
    parser.add_argument("--brokers", type=int, default=3, choices=[1, 3], help="Kafka brokers of the private stack")
    parser.add_argument(
        "--leader-kills", type=int, default=2, help="SIGKILLs of a busy partition's leader broker (three brokers)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="messages per second sent to the queue")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the drain")
    args = parser.parse_args(argv)
    from streams_dev import stack

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # run the finally blocks: stop our stages and our stack

    signal.signal(signal.SIGTERM, interrupted)

    workdir = Path(tempfile.mkdtemp(prefix="streams-chaos-"))
    base = private_settings(workdir / "stack", brokers=args.brokers)
    leader_kills = args.leader_kills if args.brokers > 1 else 0
    stack.up(base, report=print)
    try:
        report = run(
            base, args.messages, args.malformed, args.kills, args.rate, workdir, args.timeout, leader_kills=leader_kills
        )
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
