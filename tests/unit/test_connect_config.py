"""The shipped Kafka Connect settings (deploy/connect/) and how a run derives its own from them."""

from __future__ import annotations

import pytest

from streams_dev.connect import WORKER_PROPERTIES, apicurio_api_url, read_properties, sink_config
from streams_dev.stack.process import StackError


def test_the_worker_reads_string_keys_and_confluent_framed_values_by_content_id():
    props = read_properties(WORKER_PROPERTIES)
    assert props["key.converter"] == "org.apache.kafka.connect.storage.StringConverter"
    assert props["value.converter"] == "io.apicurio.registry.utils.converter.AvroConverter"
    assert props["value.converter.apicurio.registry.as-confluent"] == "true"
    assert props["value.converter.apicurio.registry.use-id"] == "contentId"
    assert props["value.converter.apicurio.registry.headers.enabled"] == "false"
    assert props["value.converter.apicurio.registry.url"].endswith("/apis/registry/v2")
    assert props["consumer.isolation.level"] == "read_committed"
    assert props["plugin.discovery"] == "service_load"


def test_the_converter_gets_the_core_api_of_the_registry_the_stages_use():
    assert apicurio_api_url("http://127.0.0.1:8081/apis/ccompat/v7/") == "http://127.0.0.1:8081/apis/registry/v2"
    with pytest.raises(StackError, match="ccompat"):
        apicurio_api_url("http://registry.example:8081")


def test_the_sink_upserts_by_message_id_and_deletes_on_tombstones():
    config = sink_config(topic="t1.masked", pg_dsn="postgresql://app:p%40ss@db.internal:6543/wh", table="logins")
    assert config["topics"] == "t1.masked"
    assert config["connection.url"] == "jdbc:postgresql://db.internal:6543/wh"
    assert (config["connection.username"], config["connection.password"]) == ("app", "p@ss")
    assert config["collection.name.format"] == "logins"
    assert config["primary.key.mode"] == "record_key"
    assert config["delete.enabled"] == "true"
    assert config["insert.mode"] == "upsert"
    transforms = config["transforms"].split(",")
    assert [config[f"transforms.{t}.type"] for t in transforms] == [
        "org.apache.kafka.connect.transforms.HoistField$Key",
        "org.apache.kafka.connect.transforms.ReplaceField$Value",
    ]
    assert set(config["transforms.dropCiphertexts.exclude"].split(",")) == {
        "ip_ciphertext",
        "device_id_ciphertext",
        "ip_sealed",  # masked schema v3: per-user sealed values belong in sealed_values, not analysts' tables
        "device_id_sealed",
    }


def test_properties_skip_comments_and_blank_lines(tmp_path):
    path = tmp_path / "w.properties"
    path.write_text("# a comment\n! another\n\n a.b = c=d \nx=\n")
    assert read_properties(path) == {"a.b": "c=d", "x": ""}
