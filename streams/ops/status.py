"""``streams status``: where each stage stands, what it has written, what it refused.

Read-only: it joins no group and commits nothing, so it is safe beside running workers.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from streams.io.kafka import group_lag
from streams.ops.state import current_queue_depth, dead_letter_counts, row_count
from streams.ops.topology import STAGES, stage_group, stage_topic
from streams.settings import Settings


@dataclass
class Snapshot:
    partitions: dict[str, list[tuple[int, int, int]]]  # stage -> (partition, committed, end)
    rows: int | None
    dead_letters: dict[str, int]
    queue_depth: int | None

    @property
    def lag(self) -> int:
        return sum(max(end - committed, 0) for parts in self.partitions.values() for _, committed, end in parts)


def _safe(fn):
    try:
        return fn()
    except Exception:  # a service that is down shows as "?", the rest still reports
        return None


def snapshot(settings: Settings) -> Snapshot:
    topics = {stage: stage_topic(settings, stage) for stage in STAGES}
    offsets = group_lag(settings, list(topics.values()))
    partitions = {
        stage: sorted((p, committed, end) for (t, p), (committed, end) in offsets.items() if t == topic)
        for stage, topic in topics.items()
    }
    return Snapshot(
        partitions=partitions,
        rows=_safe(lambda: asyncio.run(row_count(settings))),
        dead_letters=dict(sorted((_safe(lambda: dead_letter_counts(settings)) or {}).items())),
        queue_depth=_safe(lambda: asyncio.run(current_queue_depth(settings))),
    )


def progress_bar(done: int, total: int, width: int = 30) -> str:
    """``[#####.....]  50%``; an empty backlog counts as done."""
    fraction = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}"


def render(settings: Settings, snap: Snapshot) -> str:
    lines = [f"app {settings.app_id}"]
    for stage, parts in snap.partitions.items():
        topic = stage_topic(settings, stage)
        lag = sum(max(e - c, 0) for _, c, e in parts)
        lines.append(f"stage {stage} ({topic}): lag {lag} (group {stage_group(settings, stage)})")
        lines.append("  partition  committed        end        lag")
        for p, committed, end in parts:
            lines.append(f"  {p:9d} {committed:10d} {end:10d} {max(end - committed, 0):10d}")
        if not parts:
            lines.append("  (topic does not exist yet)")
    rows = "?" if snap.rows is None else snap.rows
    depth = "?" if snap.queue_depth is None else snap.queue_depth
    lines.append(f"rows in user_logins: {rows}")
    dead = ", ".join(f"{reason} {n}" for reason, n in snap.dead_letters.items()) or "none"
    lines.append(f"dead letters: {sum(snap.dead_letters.values())} ({dead})")
    lines.append(f"queue {settings.sqs_queue}: ~{depth} messages")
    return "\n".join(lines)


def follow(settings: Settings, interval: float, until_idle: bool = False) -> None:
    """Redraw every ``interval`` seconds with a bar of the backlog drained since the start."""
    start_lag = None
    while True:
        snap = snapshot(settings)
        backlog = snap.lag + (snap.queue_depth or 0)
        start_lag = backlog if start_lag is None else max(start_lag, backlog)
        text = render(settings, snap)
        bar = progress_bar(start_lag - backlog, start_lag)
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")
        print(f"{text}\ndrained {bar}  backlog {backlog}", flush=True)
        if until_idle and backlog == 0:
            return
        time.sleep(interval)
