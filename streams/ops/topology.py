"""Which stage reads and writes which topic, in which consumer group: one place for all.

Each worker stage owns its consumer, in a group of its own: ``<app_id>-mask`` reads the
raw topic, ``<app_id>-sink`` the masked topic. A stage's position is its group's committed
offsets on its input topic. Before issue 18 Faust read both topics in one group named
``<app_id>`` (``legacy_group``): a worker carries its offsets over once (docs/operations.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.errors import Refused
from streams.settings import Settings

STAGES = ("mask", "sink")


@dataclass(frozen=True)
class Stage:
    name: str
    input: str
    outputs: tuple[str, ...]  # topics (the sink also writes the database)
    group: str


def stage_group(settings: Settings, name: str) -> str:
    """The consumer group of one stage."""
    return f"{settings.app_id}-{name}"


def legacy_group(settings: Settings) -> str:
    """The one group Faust used for both stages before issue 18."""
    return settings.app_id


def stage(settings: Settings, name: str) -> Stage:
    if name == "mask":
        return Stage(name, settings.raw_topic, (settings.masked_topic, settings.dlq_topic), stage_group(settings, name))
    if name == "sink":
        return Stage(name, settings.masked_topic, (settings.dlq_topic,), stage_group(settings, name))
    raise Refused(f"unknown stage {name!r}: choose mask or sink")


def group_of_topic(settings: Settings, topic: str) -> str:
    """The group whose committed offsets on ``topic`` are a stage's position."""
    for name in STAGES:
        if stage(settings, name).input == topic:
            return stage_group(settings, name)
    return legacy_group(settings)


def stage_topic(settings: Settings, name: str) -> str:
    """The input topic whose committed offsets are the stage's position."""
    return stage(settings, name).input


def worker_inputs(settings: Settings) -> list[str]:
    """Every topic the worker stages consume."""
    return [stage(settings, name).input for name in STAGES]


def changelog_topic(settings: Settings) -> str:
    """The mask stage's dedup changelog (``streams.pipeline.dedup``), partitioned like the raw topic."""
    return f"{settings.raw_topic}.mask-dedup"
