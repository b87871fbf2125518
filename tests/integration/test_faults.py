"""Crashes and outages on a private stack: every valid message lands exactly once, none is skipped.

Each test kills only the processes it started (by pid, or by the ``STREAMS_FAULT`` hook
that makes a stage SIGKILL itself at a precise point), and stops only the private
stack's Kafka or PostgreSQL.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from streams_dev import stack

pytestmark = pytest.mark.integration

KILLED = -signal.SIGKILL


def logins(n: int, prefix: str = "u") -> list[dict]:
    return [
        {
            "user_id": f"{prefix}{i}",
            "app_version": f"2.{i % 10}.0",
            "device_type": "android",
            "ip": f"198.51.100.{i % 250}",
            "locale": "RU",
            "device_id": f"dev-{prefix}-{i}",
        }
        for i in range(n)
    ]


def ids_in_table(p) -> list[str]:
    return [r["message_id"] for r in p.query("SELECT message_id FROM user_logins")]


def drained(p, expected: set[str], timeout: float = 180) -> None:
    """Wait until the table holds exactly ``expected``, the queue is empty and both groups caught up."""
    s = p.settings
    p.wait_for(lambda: p.row_count() >= len(expected), timeout, f"{len(expected)} rows")
    p.wait_for(lambda: p.queue_depth() == 0, 60, "an empty queue")
    p.wait_for(lambda: p.lag([s.raw_topic, s.masked_topic]) == 0, 90, "committed offsets")
    rows = ids_in_table(p)
    assert len(rows) == len(set(rows)) == len(expected)
    assert set(rows) == expected


def wait_killed(p, proc, what: str, timeout: float = 120) -> None:
    p.stopped.add(proc)
    p.wait_for(lambda: proc.poll() is not None, timeout, what)
    assert proc.returncode == KILLED, p.logs()[-3000:]


def test_bridge_killed_after_kafka_ack_before_sqs_delete(fault_pipeline):
    p = fault_pipeline
    ids = p.send(logins(30))
    bridge = p.start("bridge", STREAMS_FAULT="bridge_after_produce", STREAMS_BRIDGE_POLLERS="1")
    wait_killed(p, bridge, "the bridge to kill itself after the broker ack")
    raw_before = p.topic(p.settings.raw_topic)
    assert raw_before, "the fault fired before anything was produced"
    assert p.queue_depth() == 30  # nothing deleted: the acked batch is still on the queue

    p.start("bridge")
    p.start("worker")
    drained(p, set(ids))
    raw_ids = [k.decode() for k, _ in p.topic(p.settings.raw_topic)]
    assert len(raw_ids) > len(set(raw_ids)) == 30  # the redelivered batch is in Kafka twice...
    assert not p.dead_letters()  # ...and still made one row each


@pytest.mark.parametrize("point", ["sink_before_commit", "sink_after_commit", "mask_after_produce"])
def test_worker_killed_mid_flow_writes_every_row_once(fault_pipeline, point):
    p = fault_pipeline
    ids = p.send(logins(400))
    p.start("bridge")
    worker = p.start("worker", STREAMS_FAULT=f"{point}@2", STREAMS_BATCH_SIZE="50")
    wait_killed(p, worker, f"the worker to kill itself at {point}")
    written = p.row_count()
    assert written < 400  # killed mid-flow, with work left
    p.start("worker", STREAMS_BATCH_SIZE="50")
    drained(p, set(ids))
    assert not p.dead_letters()


def test_postgres_outage_inside_a_batch_is_retried_not_skipped(fault_pipeline, private_stack):
    p = fault_pipeline
    s = p.settings
    first = p.send(logins(50, "a"))
    p.start("bridge")
    worker = p.start("worker")
    p.wait_for(lambda: p.row_count() == 50, 120, "the first 50 rows")

    stack.stop_service(private_stack, "postgres")
    second = p.send(logins(200, "b"))
    # The mask stage keeps going; the sink cannot write and must not ack.
    p.wait_for(lambda: p.lag([s.raw_topic]) == 0 and len(p.topic(s.masked_topic)) >= 250, 120, "masked records")
    p.wait_for(lambda: "failed (" in p.logs(), 60, "the sink to retry")
    # Two more failed attempts (>= 1 s with backoff) span a commit interval (1 s).
    retries = p.logs().count("failed (")
    p.wait_for(lambda: p.logs().count("failed (") >= retries + 2, 60, "two more sink retries")
    assert p.lag([s.masked_topic]) >= 200, "the sink committed offsets it never wrote"
    stack.start_service(private_stack, "postgres")

    drained(p, set(first) | set(second))
    assert worker.poll() is None  # resumed by itself
    assert not p.dead_letters()


def test_kafka_outage_during_the_flow(fault_pipeline, private_stack):
    p = fault_pipeline
    first = p.send(logins(50, "a"))
    bridge = p.start("bridge")
    worker = p.start("worker")
    p.wait_for(lambda: p.row_count() == 50, 120, "the first 50 rows")

    refused = p.logs().count("Connection refused")
    stack.stop_service(private_stack, "kafka")
    second = p.send(logins(200, "b"))
    # The stages run into the outage: their Kafka clients report the broker refusing.
    p.wait_for(lambda: p.logs().count("Connection refused") > refused + 1, 60, "the stages to hit the outage")
    stack.start_service(private_stack, "kafka")

    drained(p, set(first) | set(second), timeout=240)
    assert bridge.poll() is None and worker.poll() is None  # resumed by themselves
    assert not p.dead_letters()


def test_poison_then_a_thousand_valid(fault_pipeline):
    p = fault_pipeline
    poison = "[" * 100_000  # RecursionError in json.loads, not a ValueError
    ids = p.send([poison, *logins(1000)])
    p.start("bridge")
    p.start("worker")
    drained(p, set(ids[1:]), timeout=240)
    dead = p.dead_letters()
    assert [(d["message_id"], d["stage"], d["reason"]) for d in dead] == [(ids[0], "mask", "too_deep")]


def test_sigterm_exits_zero_and_keeps_what_it_wrote(fault_pipeline, private_stack):
    p = fault_pipeline
    s = p.settings
    ids = p.send(logins(1500))
    p.start("bridge")
    worker = p.start("worker", STREAMS_BATCH_SIZE="100")
    p.wait_for(lambda: p.row_count() > 0, 120, "the first rows")
    began = time.monotonic()
    assert p.stop(worker, timeout=45) == 0
    assert time.monotonic() - began < 45
    assert p.lag([s.masked_topic]) < len(p.topic(s.masked_topic))  # it committed what it wrote

    # SIGTERM while the sink is stuck retrying against a dead database: still exit 0, ack nothing.
    worker = p.start("worker", STREAMS_BATCH_SIZE="100")
    ids += p.send(logins(100, "m"))
    p.wait_for(lambda: set(ids[-100:]) <= set(ids_in_table(p)), 120, "the restarted worker to write new rows")
    stack.stop_service(private_stack, "postgres")
    ids += p.send(logins(300, "c"))
    log_path = p.procs[-1][1]
    p.wait_for(lambda: "failed (" in log_path.read_text(), 120, "the sink to retry against a dead database")
    p.wait_for(lambda: p.lag([s.raw_topic]) == 0, 120, "the 300 new logins to be masked")
    began = time.monotonic()
    assert p.stop(worker, timeout=45) == 0
    assert time.monotonic() - began < 45
    assert p.lag([s.masked_topic]) >= 300  # none of the unwritten rows was committed
    stack.start_service(private_stack, "postgres")

    p.start("worker")
    drained(p, set(ids))
    assert json.dumps(sorted(ids_in_table(p))) == json.dumps(sorted(ids))


@pytest.mark.parametrize("point", ["mask_after_produce", "sink_after_commit"])
def test_agent_error_exits_instead_of_committing_or_stalling(fault_pipeline, point):
    """Faust would restart a crashed agent and leave its batch delivered but never acked."""
    p = fault_pipeline
    ids = p.send(logins(300))
    p.start("bridge")
    worker = p.start("worker", STREAMS_FAULT=f"{point}@2:raise", STREAMS_BATCH_SIZE="50")
    p.stopped.add(worker)
    p.wait_for(lambda: worker.poll() is not None, 120, f"the worker to exit after an error at {point}")
    assert worker.returncode == 70
    assert "InjectedFault" in p.logs()
    p.start("worker", STREAMS_BATCH_SIZE="50")
    drained(p, set(ids))


def test_broker_stall_longer_than_the_visibility_timeout_writes_each_message_once(fault_pipeline, private_stack):
    """Issue 9 item 6: with a 2 s visibility and a broker down far longer, SQS must not hand the
    message to another poller while its produce is pending (that wrote one message 4 times)."""
    p = fault_pipeline
    s = p.settings
    bridge = p.start("bridge", STREAMS_BRIDGE_VISIBILITY_TIMEOUT="2", STREAMS_BRIDGE_POLLERS="4")
    p.wait_for(lambda: "pollers" in p.logs(), 60, "the bridge to start polling")
    stack.stop_service(private_stack, "kafka")
    ids = p.send(logins(3, "stall"))
    # Stall for at least 4 visibility timeouts: the bridge extends visibility every 2/3 s.
    p.wait_for(
        lambda: p.logs().count("extended visibility") >= 12, 60, "the produce to stay pending past the visibility"
    )
    stack.start_service(private_stack, "kafka")
    p.wait_for(lambda: p.queue_depth() == 0, 120, "every message deleted")
    raw_keys = [k.decode() for k, _ in p.topic(s.raw_topic)]
    assert sorted(raw_keys) == sorted(ids)  # one copy each
    assert "not deleted" not in p.logs() and "receipt" not in p.logs().lower()
    assert bridge.poll() is None
