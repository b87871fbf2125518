"""The local Kafka's layout: one node, or three with replication 3 and min.insync 2 (no process started)."""

from __future__ import annotations

import pytest

from streams.settings import Settings
from streams_dev.sandbox import private_settings
from streams_dev.stack import StackError, _select, client_env
from streams_dev.stack.kafka import Kafka, replication


def _config(settings: Settings, node: int, nodes: int) -> dict[str, str]:
    kafka = Kafka(settings, node, nodes)
    kafka.dir.mkdir(parents=True)
    kafka._write_config()
    lines = kafka.config_file.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_replication_follows_the_broker_count():
    assert replication(1) == (1, 1)
    assert replication(3) == (3, 2)


def test_three_nodes_get_their_own_ports_and_replicate_everything(tmp_path):
    s = Settings(stack_dir=tmp_path, kafka_port=19092, kafka_controller_port=19093, kafka_brokers=3)
    config = _config(s, 2, 3)
    assert config["node.id"] == "2"
    assert config["controller.quorum.voters"] == "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:19094,CONTROLLER://127.0.0.1:19095"
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
    ):
        assert config[key] == "3", key
    assert config["min.insync.replicas"] == config["transaction.state.log.min.isr"] == "2"
    assert client_env(s) == {
        "STREAMS_KAFKA_BOOTSTRAP": "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096",
        "STREAMS_TOPIC_REPLICATION_FACTOR": "3",
        "STREAMS_TOPIC_MIN_INSYNC_REPLICAS": "2",
    }


def test_one_node_stays_as_it_was(tmp_path):
    config = _config(Settings(stack_dir=tmp_path), 1, 1)
    assert Kafka(Settings(stack_dir=tmp_path)).dir == tmp_path / "kafka"
    assert config["node.id"] == "1" and config["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert config["offsets.topic.replication.factor"] == config["transaction.state.log.min.isr"] == "1"


def test_private_cluster_settings_point_at_all_three_on_free_ports(tmp_path):
    s = private_settings(tmp_path, brokers=3)
    block = set(range(s.kafka_port, s.kafka_port + 6))
    assert s.kafka_controller_port == s.kafka_port + 1 and not {s.pg_port, s.sqs_port} & block
    assert s.kafka_bootstrap.count(",") == 2
    assert (s.topic_replication_factor, s.topic_min_insync_replicas) == (3, 2)


def test_services_by_name(tmp_path):
    s = Settings(stack_dir=tmp_path, kafka_brokers=3)
    assert [svc.name for svc in _select(s, ["kafka"])] == ["kafka-1", "kafka-2", "kafka-3"]
    assert [svc.name for svc in _select(s, ["kafka-2", "postgres"])] == ["kafka-2", "postgres"]
    with pytest.raises(StackError, match="choose from kafka, postgres, sqs, registry, kms, kafka-1, kafka-2, kafka-3"):
        _select(s, ["kafka-4"])
