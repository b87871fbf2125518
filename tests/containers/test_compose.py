"""docker-compose.yml end to end: the sample lands (99 rows, one dead letter, an empty queue,
every bridged message on the raw topic), then three workers in one group each hold
partitions. Runs through the lab's engine (``make containers-test``) with docker-compose
1.29; the file is also valid for v2.

Raw against bridged: the bridge deletes a message from SQS only after ``deliver`` returned,
that is after the broker acknowledged its raw record (``acks=all``, idempotent) or its
``too_large`` dead letter; its ``bridged`` counter counts those messages after the delete.
So raw records == bridged - bridge dead letters, exactly (a redelivery adds one to both).
The raw topic is neither compacted nor transactional and holds nothing near its retention,
so latest minus earliest offset counts its records exactly, with no reader that could stop
early or miss a partition assigned late. Issue 10's one run with 99 raw records after
"bridged 100" came from bridge code that is gone; this check fails if it ever recurs."""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid

import pytest

from tests.containers.conftest import run
from tests.helpers import wait_for

pytestmark = pytest.mark.containers

READY = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/readyz', timeout=3).status)"


class Compose:
    def __init__(self) -> None:
        binary = shutil.which("docker-compose")
        self.base = [binary] if binary else ["docker", "compose"]
        self.project = f"streamstest{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str, timeout: float = 120, check: bool = True):
        return run(*self.base, "-p", self.project, *args, timeout=timeout, check=check)

    def psql(self, sql: str) -> str | None:
        result = self("exec", "-T", "postgres", "psql", "-U", "postgres", "-d", "streams", "-Atc", sql, check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    def rows(self) -> int:
        out = self.psql("SELECT count(*) FROM user_logins")
        return int(out) if out and out.isdigit() else -1

    def kafka(self, *args: str) -> str:
        return self("exec", "-T", "kafka", *args, timeout=90).stdout

    def diagnostics(self) -> str:
        ps = self("ps", check=False).stdout
        logs = self(
            "logs",
            "--no-color",
            "--tail",
            "60",
            "bridge",
            "worker",
            "seed",
            "kms-keys",
            "migrate",
            "registry",
            check=False,
        ).stdout
        raw = self(
            "exec",
            "-T",
            "kafka",
            "/opt/kafka/bin/kafka-get-offsets.sh",
            "--bootstrap-server",
            "localhost:9092",
            "--topic",
            "logins.raw",
            check=False,
        ).stdout
        return f"--- ps\n{ps}\n--- raw end offsets\n{raw}\n--- logs\n{logs[-8000:]}"


METRICS = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/metrics', timeout=3).read().decode())"


def bridge_counts(compose: Compose) -> tuple[int, int]:
    """(messages the bridge finished, dead letters it wrote instead of a raw record), from its /metrics."""
    text = compose("exec", "-T", "bridge", "python", "-c", METRICS).stdout
    bridged = dead = 0.0
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("streams_records_out_total{") and 'stage="bridge"' in name and 'outcome="bridged"' in name:
            bridged += float(value)
        elif name.startswith("streams_dead_letters_total{") and 'stage="bridge"' in name:
            dead += float(value)
    return int(bridged), int(dead)


def raw_records(compose: Compose) -> int:
    """Records on the raw topic: latest minus earliest offset, summed over every partition.

    Exact for this topic: never compacted, no transactions (so no control records), and
    nothing old enough for its retention; no consumer, so no partition can be missed by a
    reader that stops early or joins a group late."""

    def offsets(spec: str) -> dict[int, int]:
        out = compose.kafka(
            "/opt/kafka/bin/kafka-get-offsets.sh",
            "--bootstrap-server",
            "localhost:9092",
            "--topic",
            "logins.raw",
            "--time",
            spec,
        )
        found = {}
        for line in out.splitlines():
            if line.startswith("logins.raw:"):
                _, partition, offset = line.strip().rsplit(":", 2)
                found[int(partition)] = int(offset)
        return found

    latest, earliest = offsets("-1"), offsets("-2")
    assert len(latest) == 6 and set(latest) == set(earliest), (latest, earliest)
    return sum(latest[p] - earliest[p] for p in latest)


def group_members(compose: Compose) -> list[int]:
    """Partitions held by each member of the mask stage's group (kafka-consumer-groups --members)."""
    out = compose.kafka(
        "/opt/kafka/bin/kafka-consumer-groups.sh",
        "--bootstrap-server",
        "localhost:9092",
        "--describe",
        "--group",
        "streams-mask",
        "--members",
    )
    counts = []
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "streams-mask" and fields[-1].isdigit():
            counts.append(int(fields[-1]))
    return counts


def test_compose_end_to_end_then_three_workers(docker_engine, record_property, capsys):
    compose = Compose()
    t0 = time.monotonic()
    try:
        compose("up", "-d", "--build", timeout=1500)
        t_up = time.monotonic() - t0
        try:
            wait_for(lambda: compose.rows() == 99, 300, "99 rows in user_logins")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{compose.diagnostics()}") from None
        t_rows = time.monotonic() - t0

        # One dead letter, reason missing_field, and nothing left on the queue (through the app's CLI).
        status = wait_for(
            lambda: (
                (out := compose("exec", "-T", "bridge", "streams", "status", check=False).stdout)
                and re.search(r"queue login-queue: ~0 messages", out)
                and out
            ),
            120,
            "an empty queue",
        )
        dlq = compose("exec", "-T", "bridge", "streams", "dlq", "list").stdout
        letters = [m.groups() for m in re.finditer(r"^(\w+)\s+(\w+)\s+(\d+)\b", dlq, re.M)]
        assert letters == [("mask", "missing_field", "1")], dlq
        assert compose.rows() == 99, status
        # Every message the bridge finished is on the raw topic (a bridge dead letter goes to
        # the DLQ instead; a redelivery adds a copy on both sides): nothing deleted from SQS
        # without its record. The seed sent 100.
        bridge: dict[str, int] = {}

        def raw_matches_bridged() -> bool:
            bridge["bridged"], bridge["bridge dead letters"] = bridge_counts(compose)
            bridge["raw"] = raw_records(compose)
            return bridge["raw"] == bridge["bridged"] - bridge["bridge dead letters"]

        try:
            wait_for(raw_matches_bridged, 30, "raw records == bridged - bridge dead letters", 1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {bridge}\n{compose.diagnostics()}") from None
        assert bridge["bridged"] >= 100 and bridge["raw"] >= 100, bridge
        # Per-user key mode: the KMS keys came from the one-shot init service; the worker
        # loaded no key file and sealed every value (sealed_values, nothing in pii_vault).
        assert "made alias/streams-dev-mac" in compose("logs", "--no-color", "kms-keys").stdout
        assert "generated a DEV masking key" not in compose("logs", "--no-color", "worker").stdout
        assert compose.psql("SELECT count(*) FROM sealed_values") == "99"
        assert compose.psql("SELECT count(*) FROM pii_vault") == "0"
        assert compose.psql("SELECT count(*) FROM key_lifetimes WHERE length(kek_blob) > 0") == "1"
        # Reveal opens a sealed value through the KMS (audited per user).
        message_id, user_id = compose.psql("SELECT message_id, user_id FROM sealed_values LIMIT 1").split("|")
        shown = compose(
            "exec",
            "-T",
            "worker",
            "streams",
            "reveal",
            "--message-id",
            message_id,
            "--operator",
            "ann",
            "--reason",
            "T-1",
        ).stdout
        fields = {json.loads(line)["field"]: json.loads(line)["value"] for line in shown.splitlines()}
        assert set(fields) == {"ip", "device_id"} and all(fields.values()), fields
        assert (
            compose.psql(
                f"SELECT DISTINCT outcome FROM pii_reveal_audit WHERE operator = 'ann' AND user_id = '{user_id}'"
            )
            == "revealed"
        )
        # The migrate job registered the schemas with the registry (the stages only look them up).
        subjects = compose(
            "exec", "-T", "registry", "curl", "-fsS", "http://127.0.0.1:8080/apis/ccompat/v7/subjects"
        ).stdout
        assert {"logins.raw-value", "logins.masked-value", "logins.dlq-value"} <= set(json.loads(subjects)), subjects

        # Three workers in the mask stage's group: every one gets some of the raw topic's 6 partitions.
        compose("up", "-d", "--no-deps", "--scale", "worker=3", "worker", timeout=300)
        workers = compose("ps", "-q", "worker").stdout.split()
        assert len(workers) == 3, workers

        def every_worker_ready() -> bool:
            codes = [run("docker", "exec", w, "python", "-c", READY, check=False).stdout.strip() for w in workers]
            return all(code == "200" for code in codes)

        def three_members_with_partitions() -> list[int] | None:
            counts = group_members(compose)
            return counts if len(counts) == 3 and all(counts) and sum(counts) == 6 else None

        try:
            counts = wait_for(three_members_with_partitions, 240, "three group members each holding partitions", 2)
            wait_for(every_worker_ready, 120, "/readyz 200 in every worker", 2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{compose.diagnostics()}") from None
        assert compose.rows() == 99  # rebalancing wrote nothing twice (upserts) and lost nothing
        t_scaled = time.monotonic() - t0
        record_property("timings", f"up {t_up:.0f}s, 99 rows {t_rows:.0f}s, scaled {t_scaled:.0f}s, members {counts}")
        with capsys.disabled():
            print(
                f"\ncompose timings: up {t_up:.0f}s, 99 rows at {t_rows:.0f}s, 3 workers ready at {t_scaled:.0f}s; partitions per member {counts}"
                f"\ncompose raw topic: {bridge} "
            )
    finally:
        compose("down", "-v", "--remove-orphans", timeout=300, check=False)
