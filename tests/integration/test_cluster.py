"""``streams stack up --brokers 3``: a three-node KRaft cluster whose replication survives a broker.

Runs on a private stack (``private_cluster``) on free ports: killing a broker never touches
the shared stack other tests use.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException, Producer

from streams.io.kafka import admin_client, ensure_topics, send_records
from streams.ops.topics import plan
from streams_dev import stack
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def test_three_nodes_run_and_the_cli_reports_each(private_cluster):
    rows = {s.name: s for s in stack.status(private_cluster)}
    assert [n for n in rows if n.startswith("kafka")] == ["kafka-1", "kafka-2", "kafka-3"]
    assert all(rows[f"kafka-{i}"].running for i in (1, 2, 3))
    assert stack.running_brokers(private_cluster) == 3
    assert sorted(admin_client(private_cluster).list_topics(timeout=10).brokers) == [1, 2, 3]

    env = {
        "STREAMS_STACK_DIR": str(private_cluster.stack_dir),
        "STREAMS_KAFKA_PORT": str(private_cluster.kafka_port),
        "STREAMS_KAFKA_CONTROLLER_PORT": str(private_cluster.kafka_controller_port),
        "STREAMS_PG_PORT": str(private_cluster.pg_port),
        "STREAMS_SQS_PORT": str(private_cluster.sqs_port),
    }
    streams = [sys.executable, "-m", "streams", "stack"]
    out = subprocess.run([*streams, "env"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        f"export STREAMS_KAFKA_BOOTSTRAP={private_cluster.kafka_bootstrap}",
        "export STREAMS_TOPIC_REPLICATION_FACTOR=3",
        "export STREAMS_TOPIC_MIN_INSYNC_REPLICAS=2",
    ]
    # Asking for one broker while three run: one line, no traceback, nothing started.
    one = subprocess.run([*streams, "up", "--brokers", "1"], env=env, capture_output=True, text=True)
    assert one.returncode == 1 and "streams stack down" in one.stderr and "Traceback" not in one.stderr
    assert stack.running_brokers(private_cluster) == 3


def test_topics_and_internal_logs_are_replicated_three_times_with_min_insync_two(private_cluster):
    s = private_cluster.model_copy(update={"raw_topic": f"c{uuid.uuid4().hex[:8]}.raw"})
    ensure_topics(s)

    def raw_step():
        try:
            (step,) = [step for step in plan(s) if step.topic == s.raw_topic]
        except KafkaException:  # a node that has not seen the new topic yet
            return None
        return step if step.action == "ok" else None  # "create" until the metadata reached every node

    raw = wait_for(raw_step, 30, "the new topic in the cluster metadata")
    assert "replication.factor=3 min.insync.replicas=2" in raw.detail, str(raw)
    # The offsets topic and the transaction state log exist once a group and a transaction used them.
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "transactional.id": f"t-{uuid.uuid4()}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(s.raw_topic, b"x", key=b"k")
    producer.commit_transaction(30)
    consumer = Consumer(
        {"bootstrap.servers": s.kafka_bootstrap, "group.id": f"g-{uuid.uuid4()}", "auto.offset.reset": "earliest"}
    )
    try:
        consumer.subscribe([s.raw_topic])
        wait_for(lambda: consumer.poll(0.5) is not None, 60, "a record through a consumer group")
    finally:
        consumer.close()

    metadata = admin_client(s).list_topics(timeout=10).topics
    for topic in (s.raw_topic, "__consumer_offsets", "__transaction_state"):
        replicas = {len(p.replicas) for p in metadata[topic].partitions.values()}
        assert replicas == {3}, (topic, replicas)


def _partition(s, topic: str):
    """Partition 0 of ``topic`` as the cluster metadata has it (None until a node knows it)."""
    return admin_client(s).list_topics(topic, timeout=10).topics[topic].partitions.get(0)


def test_a_killed_broker_stops_no_write_and_comes_back(private_cluster):
    s = private_cluster.model_copy(update={"raw_topic": f"c{uuid.uuid4().hex[:8]}.raw", "topic_partitions": 1})
    ensure_topics(s)
    first = wait_for(lambda: (p := _partition(s, s.raw_topic)) and p.leader > 0 and p, 30, "a leader")
    leader = first.leader
    assert stack.kill_service(s, f"kafka-{leader}") is not None
    try:
        # acks=all with min.insync.replicas 2: two live replicas take the write.
        send_records(s, [(s.raw_topic, b"k", b"while one broker is dead")])
        assert _partition(s, s.raw_topic).leader not in (leader, -1)
    finally:
        stack.start_service(s, f"kafka-{leader}")

    def back_in_sync() -> bool:
        return sorted(_partition(s, s.raw_topic).isrs) == [1, 2, 3]

    wait_for(back_in_sync, 60, "the restarted broker back in the ISR", 0.5)
