"""Inspect dead letters and send chosen ones back through the pipeline (``streams dlq``).

Listing shows reason codes, counts and message ids only: the payload may hold PII.
Redrive re-produces a dead letter's original payload, keyed by its original message id,
onto the input topic of the stage that refused it (mask -> raw topic, sink -> masked
topic), so once the cause is fixed it lands on the same row as any other delivery would.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from streams.errors import Refused
from streams.io.kafka import send_records
from streams.ops.state import dead_letters
from streams.ops.topology import stage_topic
from streams.settings import Settings


@dataclass
class ReasonSummary:
    stage: str
    reason: str
    count: int = 0
    message_ids: list[str] = field(default_factory=list)


def summarize(letters: list[dict], sample: int = 5) -> list[ReasonSummary]:
    """One line per (stage, reason): how many, and a few message ids to redrive or inspect."""
    groups: dict[tuple[str, str], ReasonSummary] = {}
    for d in letters:
        s = groups.setdefault((d["stage"], d["reason"]), ReasonSummary(d["stage"], d["reason"]))
        s.count += 1
        if len(s.message_ids) < sample and d["message_id"] not in s.message_ids:
            s.message_ids.append(d["message_id"])
    return sorted(groups.values(), key=lambda s: (-s.count, s.stage, s.reason))


def select(letters: list[dict], reasons: list[str], ids: list[str], stage: str | None) -> list[dict]:
    """Dead letters matching any given reason or id (and the stage, if given); latest per message id."""
    chosen: dict[str, dict] = {}
    for d in letters:
        if stage and d["stage"] != stage:
            continue
        if d["reason"] in reasons or d["message_id"] in ids:
            chosen[d["message_id"]] = d
    return list(chosen.values())


def redrive_records(settings: Settings, chosen: list[dict]) -> list[tuple[str, bytes, bytes]]:
    """``(topic, key, value)`` to produce: the original payload back to the refusing stage's input."""
    return [(stage_topic(settings, d["stage"]), d["message_id"].encode("utf-8"), d["payload"]) for d in chosen]


def redrive(settings: Settings, reasons: list[str], ids: list[str], stage: str | None, dry_run: bool) -> dict[str, int]:
    """Re-produce the chosen dead letters; returns how many went to each topic."""
    if not reasons and not ids:
        raise Refused("choose what to redrive: --reason CODE and/or --id MESSAGE_ID (see `streams dlq list`)")
    chosen = select(dead_letters(settings), reasons, ids, stage)
    records = redrive_records(settings, chosen)
    counts: dict[str, int] = defaultdict(int)
    for topic, _, _ in records:
        counts[topic] += 1
    if records and not dry_run:
        send_records(settings, records)
    return dict(counts)
