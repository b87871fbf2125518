"""One set of connection settings, mapped once into librdkafka's and Faust's (aiokafka's) dialects."""

from __future__ import annotations

import ssl

import faust
import pytest

from streams.errors import ConfigError
from streams.io.kafka import client_config
from streams.io.kafka_security import faust_credentials, librdkafka_security, ssl_context
from streams.io.postgres import latest_version, migration_files
from streams.pipeline.app import BatchChannel, create_app
from streams.settings import Settings, load_settings
from streams_dev.tls import LocalCA


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca = LocalCA(tmp_path_factory.mktemp("tls"))
    return ca, ca.issue("client", client=True)


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def test_plaintext_adds_nothing_and_extra_passes_through():
    s = settings(kafka_extra={"message.max.bytes": "2000000"})
    assert librdkafka_security(s) == {}
    assert client_config(s) == {"bootstrap.servers": "127.0.0.1:9092", "message.max.bytes": "2000000"}
    assert faust_credentials(s) is None


def test_sasl_ssl_in_both_dialects(tls):
    ca, _ = tls
    s = settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="app",
        kafka_sasl_password="pw",
        kafka_ssl_ca_file=ca.cert_file,
    )
    assert librdkafka_security(s) == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "app",
        "sasl.password": "pw",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": str(ca.cert_file),
    }
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.protocol.value, creds.mechanism.value, creds.username, creds.password) == (
        "SASL_SSL",
        "SCRAM-SHA-256",
        "app",
        "pw",
    )
    assert creds.ssl_context.check_hostname and creds.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in creds.ssl_context.get_ca_certs()] == [((("commonName", ca.name),),)]
    assert "pw" not in repr(creds) and "pw" not in repr(s)


def test_sasl_plaintext_has_no_tls_and_ssl_has_no_sasl(tls):
    ca, client = tls
    plain = settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
    )
    assert set(librdkafka_security(plain)) == {"security.protocol", "sasl.mechanism", "sasl.username", "sasl.password"}
    creds = faust_credentials(plain)
    assert creds.protocol.value == "SASL_PLAINTEXT" and creds.ssl_context is None

    mtls = settings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_file=ca.cert_file,
        kafka_ssl_cert_file=client.cert,
        kafka_ssl_key_file=client.key,
    )
    conf = librdkafka_security(mtls)
    assert conf["security.protocol"] == "ssl" and "sasl.mechanism" not in conf
    assert (conf["ssl.certificate.location"], conf["ssl.key.location"]) == (str(client.cert), str(client.key))
    creds = faust_credentials(mtls)
    assert isinstance(creds, faust.SSLCredentials) and creds.protocol.value == "SSL"


def test_a_key_that_does_not_match_is_one_line(tls, tmp_path):
    ca, client = tls
    other = LocalCA(tmp_path).issue("other", client=True)
    s = settings(kafka_security_protocol="SSL", kafka_ssl_cert_file=client.cert, kafka_ssl_key_file=other.key)
    with pytest.raises(ConfigError, match="STREAMS_KAFKA_SSL_CERT_FILE / STREAMS_KAFKA_SSL_KEY_FILE"):
        ssl_context(s)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"STREAMS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "STREAMS_KAFKA_SASL_USERNAME"),
        (
            {"STREAMS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "STREAMS_KAFKA_SASL_USERNAME": "u"},
            "STREAMS_KAFKA_SASL_PASSWORD",
        ),
        ({"STREAMS_KAFKA_SECURITY_PROTOCOL": "TLS"}, "STREAMS_KAFKA_SECURITY_PROTOCOL"),
        ({"STREAMS_KAFKA_SASL_MECHANISM": "GSSAPI"}, "STREAMS_KAFKA_SASL_MECHANISM"),
        ({"STREAMS_KAFKA_SSL_CA_FILE": "/nonexistent/ca.pem"}, "STREAMS_KAFKA_SSL_CA_FILE"),
        ({"STREAMS_KAFKA_SSL_CERT_FILE": "/etc/hostname"}, "STREAMS_KAFKA_SSL_KEY_FILE"),
        ({"STREAMS_AWS_ACCESS_KEY_ID": "AKIA"}, "STREAMS_AWS_SECRET_ACCESS_KEY"),
        ({"STREAMS_TOPIC_OVERRIDES": '{"raw": {"partitions": 0}}'}, "STREAMS_TOPIC_OVERRIDES"),
        ({"STREAMS_TOPIC_OVERRIDES": '{"other": {}}'}, "STREAMS_TOPIC_OVERRIDES"),
    ],
)
def test_settings_that_do_not_fit_together_are_one_line(monkeypatch, env, names):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=names) as caught:
        load_settings()
    assert "\n" not in str(caught.value)


def test_aws_keys_and_region_are_optional(monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "STREAMS_SQS_REGION"):
        monkeypatch.delenv(name, raising=False)
    s = settings()
    assert s.aws_access_key_id is None and s.aws_secret_access_key is None and s.region is None
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert settings().region == "eu-central-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert settings().region == "eu-west-1"
    assert settings(sqs_region="us-west-2").region == "us-west-2"
    assert settings(sqs_endpoint="").sqs_endpoint is None  # empty: AWS's own endpoint


def test_the_stages_own_kafka_clients_get_the_credentials_and_faust_has_none(tls):
    ca, _ = tls
    s = settings(
        stages="sink",
        kafka_bootstrap="b1:9093,b2:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="app",
        kafka_sasl_password="pw",
        kafka_ssl_ca_file=ca.cert_file,
    )
    app, services = create_app(s, None)
    assert app.boot_strategy.enable_kafka is False  # Faust starts no Kafka client of its own
    (sink,) = services
    for config in (sink.source.config, sink.writer.producer.config):
        assert config["bootstrap.servers"] == "b1:9093,b2:9093"
        assert config["security.protocol"].upper() == "SASL_SSL" and config["sasl.username"] == "app"
        assert config["ssl.ca.location"] == str(ca.cert_file)
    assert sink.source.config["isolation.level"] == "read_committed"
    assert sink.source.config["group.id"] == f"{s.app_id}-sink"
    assert sink.writer.producer.config["transactional.id"].startswith(f"{s.app_id}-sink-")
    channels = [agent.channel for agent in app.agents.values()]
    assert channels and all(isinstance(c, BatchChannel) for c in channels)  # in-memory batches, no topics


def test_the_worker_role_migration_is_the_latest():
    assert latest_version() >= 4  # later migrations (0005 user keys) come after it
    sql = dict((v, p) for v, p in migration_files())[4].read_text()
    assert "CREATE ROLE streams_worker NOLOGIN" in sql and "IF NOT EXISTS" in sql
    assert "CREATE ROLE streams_worker LOGIN" not in sql
