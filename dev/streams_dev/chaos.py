"""Chaos run: push N messages through while killing stages and restarting services, then audit.

``python -m streams_dev.chaos --messages 100000 --kills 5`` (``make chaos``) starts a private
stack on its own ports (the shared one is never touched), feeds the queue at a steady
rate with ``--malformed`` of the bodies invalid, SIGKILLs the worker and the bridge
``--kills`` times each (by pid, restarting them at once), restarts Kafka and PostgreSQL
once each (Kafka for longer than the SQS visibility timeout), and injects the hostile
records of docs/delivery.md: bodies with a known reason each (among them a 5,000-digit
number and a body over STREAMS_MAX_BODY_BYTES), tombstones on the raw and masked topics,
and a raw record with an over-long message id. Then it audits: every valid id has exactly
one row whose content is what its input implies (tokens recomputed with the run's keys),
every injected record is dead-lettered with its specific reason (or deleted, for a masked
tombstone), the queue is empty, consumer lag zero; it also counts copies per message id
on the raw topic and in the DLQ (redeliveries after a SIGKILL between produce and delete
are at-least-once, not loss or doubling) and SQS deletes refused on stale receipt
handles. It exits 1 if the promise was broken.
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

from streams.io.codec import Codecs
from streams.io.kafka import read_topic, send_records
from streams.io.postgres import fetch, require_migrated
from streams.io.sqs import bodies_from_json, ensure_queue, send_bodies, sqs_client
from streams.ops import children
from streams.ops.state import current_queue_depth, dead_letters, pipeline_lag
from streams.ops.topics import ensure_topics
from streams.pipeline.dead_letters import MAX_MESSAGE_ID
from streams.pipeline.mask import parse_login
from streams.privacy.keys import settings_keyring
from streams.privacy.masking import Masker, canonical_device_id, canonical_ip
from streams.settings import Settings
from streams_dev.sandbox import private_settings, sandbox_env, settings_from_env

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
    faults: dict[str, int] = field(
        default_factory=lambda: {"worker SIGKILL": 0, "bridge SIGKILL": 0, "kafka restart": 0, "postgres restart": 0}
    )
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
        )

    def table(self) -> str:
        lines = [
            ("messages sent", self.messages),
            ("  of which malformed", self.malformed),
            *((f"injected: {name}", n) for name, n in self.faults.items()),
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


class Stages:
    """The bridge and worker processes of the run; killed only by their own pid."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir, self.count = env, workdir, 0
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, command: str) -> None:
        self.count += 1
        slot = (
            {"STREAMS_WORKER_SLOT": "0"} if command == "worker" else {}
        )  # one worker: a restart fences the killed one
        self.procs[command] = children.start_stage(
            command, self.workdir / f"{command}-{self.count}.log", {**self.env, **slot}
        )

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
) -> Report:
    """One chaos run on the running stack ``base``; ``base``'s Kafka and PostgreSQL get restarted."""
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
    require_migrated(s.pg_dsn.get_secret_value())  # the workers only check the schema version
    report = Report()
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
        [("worker", i) for i in range(kills)] + [("bridge", i) for i in range(kills)] + [("kafka", 0), ("postgres", 0)]
    )
    random.Random(11).shuffle(planned)
    send_estimate = messages / rate
    try:
        for n, (target, _) in enumerate(planned, 1):
            while time.monotonic() < began + send_estimate * n / (len(planned) + 1):
                stages.check()
                time.sleep(0.2)
            if target in ("worker", "bridge"):
                stages.kill_and_restart(target)
                report.faults[f"{target} SIGKILL"] += 1
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
    parser.add_argument("--rate", type=float, default=1000.0, help="messages per second sent to the queue")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the drain")
    args = parser.parse_args(argv)
    from streams_dev import stack

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # run the finally blocks: stop our stages and our stack

    signal.signal(signal.SIGTERM, interrupted)

    workdir = Path(tempfile.mkdtemp(prefix="streams-chaos-"))
    base = private_settings(workdir / "stack")
    stack.up(base, report=print)
    try:
        report = run(base, args.messages, args.malformed, args.kills, args.rate, workdir, args.timeout)
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
