"""Move a stage's committed offsets so the stage reprocesses (``streams replay``).

A stage's offsets are its own group's committed offsets on its input topic: the mask
stage (group ``<app_id>-mask``) reads the raw topic, the sink (``<app_id>-sink``) the
masked topic. Kafka only lets a group's offsets be altered while the group is empty, and
a running worker would overwrite them on its next commit anyway, so we refuse while the
group has live members. The mask stage's dedup changelog is left as it is: a replay
reprocesses the same records at the same offsets, which the window never drops.

``adopt_legacy_offsets`` is the one-time upgrade from the single Faust group ``<app_id>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.errors import Refused, TransientError
from streams.io.kafka import admin_client, metadata_consumer
from streams.ops.topology import legacy_group, stage_group, stage_topic
from streams.settings import Settings

_EXPLICIT = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


@dataclass(frozen=True)
class Target:
    """Where to move: ``earliest``, ``latest``, ``timestamp`` (epoch ms) or explicit ``offsets``."""

    kind: str
    timestamp_ms: int | None = None
    offsets: dict[int, int] = field(default_factory=dict)


def parse_target(text: str) -> Target:
    """``earliest`` | ``latest`` | ``P:O[,P:O...]`` | ISO-8601 time (UTC if no zone) | epoch milliseconds."""
    text = text.strip()
    if text in ("earliest", "latest"):
        return Target(text)
    if _EXPLICIT.match(text):
        offsets: dict[int, int] = {}
        for pair in text.split(","):
            p, o = (int(x) for x in pair.split(":"))
            if p in offsets:
                raise Refused(f"--to names partition {p} twice: give each partition once")
            offsets[p] = o
        return Target("offsets", offsets=offsets)
    if text.isdigit():
        return Target("timestamp", timestamp_ms=int(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Refused(
            f"--to {text!r} is not understood: use earliest, latest, an ISO time like 2024-05-01T12:00:00Z,"
            " epoch milliseconds, or partition:offset pairs like 0:10,3:0"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Target("timestamp", timestamp_ms=int(moment.timestamp() * 1000))


def plan(
    target: Target,
    committed: dict[int, int | None],
    watermarks: dict[int, tuple[int, int]],
    by_time: dict[int, int] | None = None,
) -> dict[int, int]:
    """New committed offset per partition to move; partitions not named by explicit offsets stay.

    ``by_time`` is Kafka's ``offsets_for_times`` answer (-1: no record at or after the time,
    so the partition moves to its end).
    """
    if target.kind == "earliest":
        return {p: low for p, (low, _) in watermarks.items()}
    if target.kind == "latest":
        return {p: high for p, (_, high) in watermarks.items()}
    if target.kind == "timestamp":
        by_time = by_time or {}
        return {p: (by_time.get(p, -1) if by_time.get(p, -1) >= 0 else high) for p, (_, high) in watermarks.items()}
    result = {}
    for p, offset in target.offsets.items():
        if p not in watermarks:
            raise Refused(f"partition {p} does not exist: the topic has partitions 0-{len(watermarks) - 1}")
        low, high = watermarks[p]
        if not low <= offset <= high:
            raise Refused(f"offset {offset} is outside partition {p}'s range {low}-{high}: pick one inside it")
        result[p] = offset
    return result


@dataclass
class Move:
    partition: int
    before: int | None
    after: int


class OffsetAdmin:
    """The Kafka calls a replay needs: group membership, committed offsets, watermarks, times."""

    def __init__(
        self, settings: Settings, timeout: float = 15.0, group: str | None = None, admin: AdminClient | None = None
    ) -> None:
        self.settings = settings
        self.group = group or stage_group(settings, "mask")
        self.timeout = timeout
        # librdkafka's own connection errors would precede our one-line error: keep them quiet.
        self.admin = admin or admin_client(settings)

    def live_members(self) -> list[str]:
        """Client ids of the group's current members (empty when no worker runs)."""
        try:
            description = self.admin.describe_consumer_groups([self.group], request_timeout=self.timeout)[
                self.group
            ].result()
        except Exception as exc:  # an unknown group has no members
            if "GROUP_ID_NOT_FOUND" in str(exc):
                return []
            raise
        return [f"{m.client_id}@{m.host}" for m in description.members]

    def assignment(self) -> dict[str, list[tuple[str, int]]]:
        """Member id -> the partitions it holds, for operators and the scaling test."""
        description = self.admin.describe_consumer_groups([self.group], request_timeout=self.timeout)[
            self.group
        ].result()
        return {
            m.member_id: sorted(
                (tp.topic, tp.partition) for tp in (m.assignment.topic_partitions if m.assignment else [])
            )
            for m in description.members
        }

    def committed(self, topic: str, partitions: list[int]) -> dict[int, int | None]:
        request = ConsumerGroupTopicPartitions(self.group, [TopicPartition(topic, p) for p in partitions])
        answer = self.admin.list_consumer_group_offsets([request], request_timeout=self.timeout)[self.group].result()
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in answer.topic_partitions}

    def _consumer(self) -> Consumer:
        # A throwaway group that never subscribes nor commits: it only answers metadata queries.
        return metadata_consumer(self.settings)

    def watermarks(self, topic: str) -> dict[int, tuple[int, int]]:
        consumer = self._consumer()
        try:
            meta = consumer.list_topics(topic, timeout=self.timeout).topics.get(topic)
            if meta is None or meta.error is not None:
                raise Refused(f"topic {topic} does not exist: start the pipeline once, or check STREAMS_*_TOPIC")
            return {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=self.timeout)
                for p in sorted(meta.partitions)
            }
        finally:
            consumer.close()

    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int) -> dict[int, int]:
        consumer = self._consumer()
        try:
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, timestamp_ms) for p in partitions], timeout=self.timeout
            )
            return {tp.partition: tp.offset for tp in found}
        finally:
            consumer.close()

    def alter(self, topic: str, new: dict[int, int]) -> None:
        request = ConsumerGroupTopicPartitions(
            self.group, [TopicPartition(topic, p, o) for p, o in sorted(new.items())]
        )
        self.admin.alter_consumer_group_offsets([request], request_timeout=self.timeout)[self.group].result()


def reset_offsets(settings: Settings, stage: str, target: Target, dry_run: bool = False) -> list[Move]:
    """Move ``stage``'s committed offsets to ``target``; with ``dry_run`` only report the moves."""
    topic = stage_topic(settings, stage)
    admin = OffsetAdmin(settings, group=stage_group(settings, stage))
    members = admin.live_members()
    if members:
        raise Refused(
            f"group {admin.group} has {len(members)} live member(s) ({', '.join(members[:3])}): "
            "stop every `streams worker` of this group, then replay"
        )
    watermarks = admin.watermarks(topic)
    committed = admin.committed(topic, list(watermarks))
    by_time = None
    if target.timestamp_ms is not None:
        by_time = admin.offsets_for_time(topic, list(watermarks), target.timestamp_ms)
    new = plan(target, committed, watermarks, by_time)
    if not dry_run and new:
        admin.alter(topic, new)
    return [Move(p, committed.get(p), o) for p, o in sorted(new.items())]


def adopt_legacy_offsets(settings: Settings, stage: str) -> dict[int, int]:
    """Once, after the upgrade: start ``stage``'s group where the old Faust group stood.

    Before issue 18 both stages committed in one group named ``<app_id>``. When the
    stage's group has no committed offset yet and the old group has some on the stage's
    input topic, they are copied over, so the stage neither reprocesses the whole topic
    nor skips anything. Refused in one line while old workers still run in the old group.
    Returns the offsets copied (none: nothing to carry).
    """
    try:
        return _adopt(settings, stage)
    except KafkaException as exc:
        raise TransientError(f"Kafka did not answer while checking the upgrade of group offsets ({exc})") from None


def _committed(settings: Settings, group: str, topic: str) -> tuple[list[int], dict[int, int]]:
    """The topic's partitions and ``group``'s committed offsets on them, through a consumer
    that never joins the group (admin futures that time out while a broker restarts can
    crash librdkafka: librdkafka#4605; a consumer's offset fetch has no such path)."""
    consumer = metadata_consumer(settings, group)
    try:
        metadata = consumer.list_topics(topic, timeout=settings.kafka_timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return [], {}
        partitions = sorted(metadata.partitions)
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=settings.kafka_timeout)
        return partitions, {tp.partition: tp.offset for tp in found if tp.offset >= 0}
    finally:
        consumer.close()


def _adopt(settings: Settings, stage: str) -> dict[int, int]:
    topic = stage_topic(settings, stage)
    partitions, committed = _committed(settings, stage_group(settings, stage), topic)
    if not partitions or committed:
        return {}
    _, carried = _committed(settings, legacy_group(settings), topic)
    if not carried:
        return {}
    # The upgrade itself, once per deployment: only now the admin API.
    old = OffsetAdmin(settings, group=legacy_group(settings))
    new = OffsetAdmin(settings, group=stage_group(settings, stage), admin=old.admin)
    members = old.live_members()
    if members:
        raise Refused(
            f"group {old.group} still has {len(members)} live member(s) from before the upgrade: stop every old "
            f"`streams worker`, then start the new ones (docs/operations.md, upgrading to per-stage groups)"
        )
    try:
        new.alter(topic, carried)
    except Exception as exc:  # another new worker joined first: its group is no longer empty
        if new.live_members():
            return {}
        raise Refused(f"cannot carry offsets to group {new.group}: {type(exc).__name__}") from None
    import logging

    logging.getLogger("streams.worker").info(
        "carried %d committed offsets of %s from group %s to group %s", len(carried), topic, old.group, new.group
    )
    return carried
