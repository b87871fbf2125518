"""Which stage reads and writes which topic, in which consumer group: one place for all.

Faust derives both agents' consumer group from the app id (``STREAMS_APP_ID``), so a
worker running both stages reads raw and masked in one group; a stage's position is that
group's committed offsets on its input topic.
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


def stage(settings: Settings, name: str) -> Stage:
    if name == "mask":
        return Stage(name, settings.raw_topic, (settings.masked_topic, settings.dlq_topic), settings.app_id)
    if name == "sink":
        return Stage(name, settings.masked_topic, (settings.dlq_topic,), settings.app_id)
    raise Refused(f"unknown stage {name!r}: choose mask or sink")


def stage_topic(settings: Settings, name: str) -> str:
    """The input topic whose committed offsets are the stage's position."""
    return stage(settings, name).input


def worker_inputs(settings: Settings) -> list[str]:
    """Every topic the worker group consumes."""
    return [stage(settings, name).input for name in STAGES]
