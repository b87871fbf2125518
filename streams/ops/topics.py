"""Topics as code: what the settings say the topics must be, what the cluster has, and the difference.

Each topic's partitions, replication factor and ``min.insync.replicas`` come from the
settings (``STREAMS_TOPIC_PARTITIONS``, ``..._REPLICATION_FACTOR``, ``..._MIN_INSYNC_REPLICAS``,
exceptions per topic in ``STREAMS_TOPIC_OVERRIDES``), its other configuration from
``topic_configs`` (bounded retention of raw and DLQ, compacted masked with bounded
compaction and tombstone times; docs/privacy.md has the time bounds).

- ``streams topics plan`` shows what is missing or differs; ``streams topics apply``
  creates missing topics and sets differing configuration, so an admin can prepare the
  cluster before the app runs without create rights.
- At start the bridge and the worker (``require``) create what is missing if their
  principal may (the local stack), and refuse, in one line, a topic whose replication
  factor or ``min.insync.replicas`` is below the settings, unless
  ``STREAMS_ACCEPT_LOW_REPLICATION=1``; likewise a topic whose cleanup policy differs, or
  whose retention, segment, compaction-lag or tombstone time is above the settings (plaintext
  would outlive its bound), unless ``STREAMS_ACCEPT_LONG_RETENTION=1``. Partition counts are never changed here: adding
  partitions moves keys to other partitions (the masked topic is compacted by key), so
  that stays a deliberate operator step (docs/operations.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from streams.errors import ConfigError, Refused, TransientError
from streams.io.kafka import admin_client, preflight
from streams.ops.topology import changelog_topic
from streams.settings import Settings, check_retention

log = logging.getLogger(__name__)

MIN_ISR = "min.insync.replicas"
CLEANUP = "cleanup.policy"
MINUTE_MS = 60_000
DAY_MS = 24 * 3600 * 1000
# Time bounds a topic may hold at most the settings' value of (a larger one lets data outlive them).
BOUNDS = ("retention.ms", "segment.ms", "max.compaction.lag.ms", "delete.retention.ms")


def segment_ms(retention_ms: int) -> int:
    """Kafka deletes whole closed segments: a record lives at most retention + segment.ms
    (+ the broker's log.retention.check.interval.ms). A tenth of the retention, 1 min to 1 day."""
    return max(MINUTE_MS, min(retention_ms // 10, DAY_MS))


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Raw and DLQ hold PII: deleted after a bounded retention. The masked topic is compacted,
    with a bounded time before a replaced or tombstoned value is compacted away and a
    bounded time its tombstone stays (so erasure takes effect within a documented time)."""
    s = settings
    bounded = {
        CLEANUP: "delete",
        "retention.ms": str(s.raw_retention_ms),
        "segment.ms": str(segment_ms(s.raw_retention_ms)),
    }
    compacted = {
        CLEANUP: "compact",
        "max.compaction.lag.ms": str(s.masked_compaction_lag_ms),
        "delete.retention.ms": str(s.masked_tombstone_ms),
    }
    return {
        s.raw_topic: bounded,
        s.masked_topic: compacted,
        s.dlq_topic: dict(bounded),
        # The mask stage's dedup window: one record per partition per transaction (unique
        # keys; compaction also drops the earlier format's rewritten ids), and nothing much
        # older than the window (deleted after twice its length; never under an hour).
        changelog_topic(s): {
            CLEANUP: "compact,delete",
            "retention.ms": str(max(int(s.dedup_window * 2000), 3_600_000)),
        },
    }


DENIED = (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED)


@dataclass(frozen=True)
class TopicSpec:
    role: str  # raw | masked | dlq
    name: str
    partitions: int
    replication_factor: int
    min_insync_replicas: int
    config: dict[str, str]  # managed topic configuration, min.insync.replicas included

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in sorted(self.config.items()) if k != MIN_ISR)
        return (
            f"partitions={self.partitions} replication.factor={self.replication_factor} "
            f"{MIN_ISR}={self.min_insync_replicas}{extra}"
        )


@dataclass
class Found:
    """A topic as the cluster has it (configuration limited to the keys we manage)."""

    partitions: int
    replication_factor: int  # the smallest over its partitions
    config: dict[str, str] | None  # None: not allowed to describe it


@dataclass
class Step:
    """One line of a plan: ``create``, ``alter`` (config), ``ok``, or ``manual`` (apply cannot fix it)."""

    topic: str
    action: str
    detail: str
    alter: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.action:6} {self.topic}: {self.detail}"


def specs(settings: Settings) -> list[TopicSpec]:
    s = settings
    check_retention(s)
    names = {"raw": s.raw_topic, "masked": s.masked_topic, "dlq": s.dlq_topic}
    if s.dedup_window > 0:
        names["dedup"] = changelog_topic(s)
    configs = topic_configs(s)
    result = []
    for role, name in names.items():
        # The dedup changelog is partitioned like the raw topic: partition p holds raw partition p's ids.
        override = s.topic_overrides.get("raw" if role == "dedup" else role)  # type: ignore[call-overload]
        partitions = (override and override.partitions) or s.topic_partitions
        rf = (override and override.replication_factor) or s.topic_replication_factor
        isr = (override and override.min_insync_replicas) or s.topic_min_insync_replicas
        if isr > rf:
            raise ConfigError(
                f"invalid topic settings for {name}: min.insync.replicas {isr} is above the replication factor {rf} "
                "(no write could ever be acknowledged): check STREAMS_TOPIC_MIN_INSYNC_REPLICAS"
            )
        result.append(TopicSpec(role, name, partitions, rf, isr, {**configs[name], MIN_ISR: str(isr)}))
    return result


def inspect(settings: Settings, wanted: list[TopicSpec], timeout: float) -> dict[str, Found | None]:
    """What the cluster has of each wanted topic (None: missing)."""
    admin = admin_client(settings)
    metadata = admin.list_topics(timeout=timeout)
    found: dict[str, Found | None] = {}
    resources = []
    for spec in wanted:
        topic = metadata.topics.get(spec.name)
        if topic is None or topic.error is not None and topic.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            found[spec.name] = None
            continue
        if topic.error is not None and topic.error.code() in DENIED:
            raise Refused(f"not allowed to describe topic {spec.name}: grant DESCRIBE on it to this principal")
        replicas = [len(p.replicas) for p in topic.partitions.values()] or [0]
        found[spec.name] = Found(len(topic.partitions), min(replicas), None)
        resources.append(ConfigResource(ResourceType.TOPIC, spec.name))
    if resources:
        managed = {spec.name: spec.config.keys() for spec in wanted}
        for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
            entry = found[resource.name]
            assert entry is not None
            try:
                entries = future.result()
            except KafkaException as exc:
                if exc.args[0].code() not in DENIED:
                    raise
                log.warning("not allowed to read the configuration of topic %s (DESCRIBE_CONFIGS)", resource.name)
                continue
            entry.config = {k: v.value for k, v in entries.items() if k in managed[resource.name]}
    return found


def plan(settings: Settings, timeout: float | None = None) -> list[Step]:
    """What ``apply`` would do, and what it cannot (one step per difference)."""
    timeout = settings.kafka_timeout if timeout is None else timeout
    wanted = specs(settings)
    found = inspect(settings, wanted, timeout)
    steps = []
    for spec in wanted:
        have = found[spec.name]
        if have is None:
            steps.append(Step(spec.name, "create", spec.describe()))
            continue
        problems = []
        if have.replication_factor < spec.replication_factor:
            problems.append(
                Step(
                    spec.name,
                    "manual",
                    f"replication factor {have.replication_factor} is below {spec.replication_factor} "
                    "(reassign its partitions with kafka-reassign-partitions)",
                )
            )
        elif have.replication_factor > spec.replication_factor:
            log.info(
                "topic %s has replication factor %d (settings: %d)",
                spec.name,
                have.replication_factor,
                spec.replication_factor,
            )
        if have.partitions != spec.partitions:
            problems.append(
                Step(
                    spec.name,
                    "manual",
                    f"{have.partitions} partitions, settings say {spec.partitions} (not changed here: adding partitions "
                    "moves keys; see docs/operations.md)",
                )
            )
        if have.config is None:
            problems.append(Step(spec.name, "manual", "configuration not readable (DESCRIBE_CONFIGS denied)"))
        else:
            differs = {k: v for k, v in spec.config.items() if have.config.get(k) != v}
            if differs:
                detail = ", ".join(f"{k} {have.config.get(k)} -> {v}" for k, v in sorted(differs.items()))
                problems.append(Step(spec.name, "alter", detail, alter=differs))
        steps.extend(problems or [Step(spec.name, "ok", spec.describe())])
    return steps


def apply(settings: Settings, timeout: float | None = None) -> list[Step]:
    """Create missing topics and set differing configuration; returns the plan it carried out."""
    timeout = settings.kafka_timeout if timeout is None else timeout
    steps = plan(settings, timeout)
    by_name = {spec.name: spec for spec in specs(settings)}
    _create(settings, [by_name[s.topic] for s in steps if s.action == "create"], timeout)
    alters = [s for s in steps if s.action == "alter"]
    if alters:
        admin = admin_client(settings)
        resources = [
            ConfigResource(
                ResourceType.TOPIC,
                s.topic,
                incremental_configs=[
                    ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in s.alter.items()
                ],
            )
            for s in alters
        ]
        for resource, future in admin.incremental_alter_configs(resources, request_timeout=timeout).items():
            try:
                future.result()
            except KafkaException as exc:
                raise _refusal(settings, exc, f"alter the configuration of topic {resource.name}") from None
            log.info("set the configuration of topic %s", resource.name)
    return steps


def create_missing(settings: Settings, timeout: float | None = None) -> list[str]:
    """Create the topics that do not exist yet (nothing else); returns their names."""
    timeout = settings.kafka_timeout if timeout is None else timeout
    wanted = specs(settings)
    found = inspect(settings, wanted, timeout)
    missing = [spec for spec in wanted if found[spec.name] is None]
    _create(settings, missing, timeout)
    return [spec.name for spec in missing]


def _create(settings: Settings, missing: list[TopicSpec], timeout: float) -> None:
    if not missing:
        return
    admin = admin_client(settings)
    new = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor, config=s.config)
        for s in missing
    ]
    for name, future in admin.create_topics(new, request_timeout=timeout).items():
        try:
            future.result()
            log.info("created topic %s", name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise _refusal(settings, exc, f"create topic {name}") from None


def _refusal(settings: Settings, exc: KafkaException, what: str) -> ConfigError:
    error = exc.args[0]
    if error.code() in DENIED:
        who = f"user {settings.kafka_sasl_username!r}" if settings.kafka_sasl_username else "this principal"
        return ConfigError(
            f"Kafka does not allow {who} to {what}: run `streams topics apply` with an admin's credentials first"
        )
    if error.code() == KafkaError.INVALID_REPLICATION_FACTOR:
        return ConfigError(
            f"cannot {what}: the cluster has fewer brokers than the replication factor: check STREAMS_TOPIC_REPLICATION_FACTOR"
        )
    if error.code() == KafkaError.INVALID_CONFIG:
        return ConfigError(
            f"cannot {what}: the broker refused its configuration ({error.name()}): check STREAMS_TOPIC_*"
        )
    return ConfigError(f"cannot {what}: {error.name()}")


def require(settings: Settings) -> None:
    """At process start: create missing topics, then refuse under-replicated ones in one line."""
    timeout = settings.kafka_timeout
    wanted = specs(settings)
    found = inspect(settings, wanted, timeout)
    missing = [spec for spec in wanted if found[spec.name] is None]
    if missing:
        _create(settings, missing, timeout)
        deadline = time.monotonic() + timeout
        while True:  # a topic another process just created takes a moment to show in the metadata
            found.update(inspect(settings, missing, timeout))
            if all(found[spec.name] is not None for spec in missing) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    for spec in wanted:
        have = found[spec.name]
        if have is None:
            raise ConfigError(f"topic {spec.name} does not exist: run `streams topics apply`")
        problem = None
        if have.replication_factor < spec.replication_factor:
            problem = (
                f"topic {spec.name} has replication factor {have.replication_factor}, below "
                f"STREAMS_TOPIC_REPLICATION_FACTOR={spec.replication_factor}"
            )
        elif have.config is not None and int(have.config.get(MIN_ISR, "1")) < spec.min_insync_replicas:
            problem = (
                f"topic {spec.name} has {MIN_ISR}={have.config.get(MIN_ISR)}, below "
                f"STREAMS_TOPIC_MIN_INSYNC_REPLICAS={spec.min_insync_replicas} (`streams topics apply` sets it)"
            )
        if problem and settings.accept_low_replication:
            log.warning("%s; accepted (STREAMS_ACCEPT_LOW_REPLICATION)", problem)
        elif problem:
            raise ConfigError(f"{problem}: fix the topic, or set STREAMS_ACCEPT_LOW_REPLICATION=1 to accept it")
        if have.partitions != spec.partitions:
            log.warning("topic %s has %d partitions, settings say %d", spec.name, have.partitions, spec.partitions)
        _require_retention(settings, spec, have)


def retention_problem(spec: TopicSpec, have: Found) -> str | None:
    """Why an existing topic may keep data longer than the settings allow (None: it may not)."""
    if have.config is None:
        return None  # not readable: inspect() warned
    if have.config.get(CLEANUP) != spec.config[CLEANUP]:
        return f"topic {spec.name} has {CLEANUP}={have.config.get(CLEANUP)}, settings say {spec.config[CLEANUP]}"
    for key in BOUNDS:
        if key not in spec.config:
            continue
        value = int(have.config.get(key, "-1"))
        if value < 0 or value > int(spec.config[key]):
            return f"topic {spec.name} has {key}={value}, above the settings' {spec.config[key]}"
    return None


def _require_retention(settings: Settings, spec: TopicSpec, have: Found) -> None:
    problem = retention_problem(spec, have)
    if problem is None:
        return
    if settings.accept_long_retention:
        log.warning("%s; accepted (STREAMS_ACCEPT_LONG_RETENTION)", problem)
        return
    raise ConfigError(f"{problem}: run `streams topics apply`, or set STREAMS_ACCEPT_LONG_RETENTION=1 to accept it")


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create the pipeline's missing topics as the settings describe them (``streams topics apply``)."""
    create_missing(settings, timeout=timeout)


def require_topics(settings: Settings) -> None:
    """At process start: connect (one line naming the setting if that fails), create missing
    topics, and refuse topics whose replication is below the settings (see ``streams.ops.topics``)."""
    preflight(settings)
    try:
        require(settings)
    except KafkaException as exc:
        raise TransientError(
            f"Kafka at {settings.kafka_bootstrap} stopped answering while the topics were checked "
            f"({exc.args[0].name()}): check it runs, and the principal's DESCRIBE rights on the topics"
        ) from None
