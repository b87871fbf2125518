"""The pipeline against a secured Kafka: SASL_SSL (SCRAM-SHA-512) with ACLs, topics it may not create.

A Kafka of its own on free ports (``streams_dev.stack.kafka.SecureKafka``) whose only client
listener is SASL_SSL, with a broker certificate from a local CA (``streams_dev.tls``) and
an authorizer that allows nothing without an ACL. ``admin`` (super user) prepares the
topics with ``streams topics apply``; the app user ``streams`` gets read/write ACLs only,
no CREATE: the bridge, the worker (aiokafka inside Faust, librdkafka beside it) and the
operator commands all run as it. SQS and PostgreSQL are the shared stack's.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
)

from streams.io.kafka import admin_client
from streams_dev.sandbox import _free_ports, settings_from_env
from streams_dev.stack.kafka import SecureKafka
from streams_dev.tls import LocalCA
from tests.helpers import isolated_pipeline

pytestmark = pytest.mark.integration

APP_USER = "streams"


@dataclass
class Secured:
    bootstrap: str
    ca_file: Path
    rogue_ca_file: Path
    passwords: dict[str, str]

    def env(self, user: str = APP_USER, **override: str) -> dict[str, str]:
        return {
            "STREAMS_KAFKA_BOOTSTRAP": self.bootstrap,
            "STREAMS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAMS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAMS_KAFKA_SASL_USERNAME": user,
            "STREAMS_KAFKA_SASL_PASSWORD": self.passwords[user],
            "STREAMS_KAFKA_SSL_CA_FILE": str(self.ca_file),
            **override,
        }


@pytest.fixture(scope="session")
def secure_kafka():
    """A SASL_SSL-only Kafka with ACLs, for this session (not under pytest's tmp: see conftest_faults)."""
    from streams.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="streams-secure-kafka-"))
    ca = LocalCA(workdir / "tls")
    rogue = LocalCA(workdir / "rogue", "rogue-ca")  # a CA the broker's certificate does not chain to
    server = ca.issue("kafka")
    passwords = {"admin": secrets.token_urlsafe(12), APP_USER: secrets.token_urlsafe(12)}
    port, controller = _free_ports(2)
    admin_settings = Settings(
        stack_dir=workdir,
        kafka_port=port,
        kafka_controller_port=controller,
        kafka_bootstrap=f"127.0.0.1:{port}",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="admin",
        kafka_sasl_password=passwords["admin"],
        kafka_ssl_ca_file=ca.cert_file,
    )
    kafka = SecureKafka(admin_settings, keystore=server.keystore, ca_file=ca.cert_file, users=passwords)
    try:
        kafka.start()
        yield Secured(f"127.0.0.1:{port}", ca.cert_file, rogue.cert_file, passwords)
    finally:
        kafka.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def grant_app_acls(secured: Secured, topic_prefix: str, group_prefix: str) -> None:
    """What the app user needs, and no more: read/write/describe its topics, use its groups. No CREATE."""
    admin = admin_client(settings_from_env(secured.env("admin")))

    def acl(resource: ResourceType, name: str, operation: AclOperation) -> AclBinding:
        return AclBinding(
            resource, name, ResourcePatternType.PREFIXED, f"User:{APP_USER}", "*", operation, AclPermissionType.ALLOW
        )

    bindings = [
        acl(ResourceType.TOPIC, topic_prefix, op)
        for op in (AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS)
    ] + [acl(ResourceType.GROUP, group_prefix, op) for op in (AclOperation.READ, AclOperation.DESCRIBE)]
    # The stages' transactional ids (<app_id>-<stage>-<slot>, issue 18).
    bindings += [
        acl(ResourceType.TRANSACTIONAL_ID, group_prefix, op) for op in (AclOperation.WRITE, AclOperation.DESCRIBE)
    ]
    for future in admin.create_acls(bindings, request_timeout=30).values():
        future.result()


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def secure_pipeline(secure_kafka: Secured, stack_settings, tmp_path):
    p = isolated_pipeline(stack_settings, tmp_path, **secure_kafka.env())
    yield p
    p.stop_all()


def test_topics_prepared_by_admin_then_bridge_worker_and_commands_run_without_create_rights(
    secure_pipeline, secure_kafka: Secured, sample_path
):
    p = secure_pipeline
    s = p.settings
    tag = s.raw_topic.removesuffix(".raw")
    admin_env = secure_kafka.env("admin")

    # The admin plans and creates the topics (topics as code); the app user may not.
    plan = p.run("topics", "plan", **admin_env)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("create ") == 4 and "replication.factor=1" in plan.stdout  # with the dedup changelog
    applied = p.run("topics", "apply", **admin_env)
    assert applied.returncode == 0, applied.stderr
    again = p.run("topics", "plan", **admin_env)
    assert again.stdout.count("ok ") == 4 and "nothing to do" in again.stdout, again.stdout

    grant_app_acls(secure_kafka, f"{tag}.", "streams-")

    # Without CREATE rights a missing topic is one line pointing at `streams topics apply`.
    missing = p.run("bridge", STREAMS_DLQ_TOPIC=f"{tag}.elsewhere", timeout=90)
    assert missing.returncode == 2
    line = one_line(missing)
    assert f"{tag}.elsewhere" in line and "streams topics apply" in line and f"user '{APP_USER}'" in line

    sample = json.loads(sample_path.read_text())[:20]
    ids = p.send(sample)
    valid = [i for i, r in zip(ids, sample, strict=True) if "foo" not in r]
    bridge = p.start("bridge")
    worker = p.start("worker")
    p.wait_for(lambda: p.row_count() == len(valid), 180, f"{len(valid)} rows through SASL_SSL")
    p.wait_for(lambda: p.queue_depth() == 0, 60, "an empty queue")
    assert p.stop(bridge) == 0
    assert p.stop(worker) == 0
    logs = p.logs()
    for record in sample:
        if "ip" in record:
            assert record["ip"] not in logs and record["device_id"] not in logs
    assert secure_kafka.passwords[APP_USER] not in logs

    # Every operator command connects as the app user.
    status = p.run("status")
    assert status.returncode == 0, status.stderr
    assert "mask" in status.stdout and "sink" in status.stdout
    dlq = p.run("dlq", "list")
    assert dlq.returncode == 0, dlq.stderr
    replay = p.run("replay", "mask", "--to", "earliest", "--dry-run")
    assert replay.returncode == 0, replay.stderr
    assert "would move" in replay.stdout
    ping = p.run("ping", "kafka")
    assert ping.returncode == 0 and "kafka ok" in ping.stdout, ping.stderr

    # Nothing declared behind the admin's back: the app's topics are exactly the four it created.
    topics = set(admin_client(settings_from_env(admin_env)).list_topics(timeout=10).topics)
    assert {t for t in topics if t.startswith(tag)} == {
        s.raw_topic,
        s.masked_topic,
        s.dlq_topic,
        f"{s.raw_topic}.mask-dedup",
    }


@pytest.mark.parametrize(
    ("command", "override", "setting"),
    [
        (("status",), {"STREAMS_KAFKA_SASL_PASSWORD": "wrong-password"}, "STREAMS_KAFKA_SASL_PASSWORD"),
        (("worker",), {"STREAMS_KAFKA_SASL_PASSWORD": "wrong-password"}, "STREAMS_KAFKA_SASL_PASSWORD"),
        (("dlq", "list"), {"STREAMS_KAFKA_SSL_CA_FILE": "ROGUE"}, "STREAMS_KAFKA_SSL_CA_FILE"),
        (("bridge",), {"STREAMS_KAFKA_SSL_CA_FILE": "ROGUE"}, "STREAMS_KAFKA_SSL_CA_FILE"),
    ],
)
def test_wrong_password_or_untrusted_ca_is_one_line_naming_the_setting(
    secure_pipeline, secure_kafka: Secured, command, override, setting
):
    override = {k: (str(secure_kafka.rogue_ca_file) if v == "ROGUE" else v) for k, v in override.items()}
    if command[0] == "worker":  # a key file, so the dev-key warning is not a second line
        assert secure_pipeline.run("keys", "init").returncode == 0
    began = time.monotonic()
    result = secure_pipeline.run(*command, timeout=60, STREAMS_KAFKA_TIMEOUT="10", **override)
    took = time.monotonic() - began
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line(result)
    assert setting in line, line
    assert "wrong-password" not in result.stderr + result.stdout
    assert secure_kafka.passwords[APP_USER] not in result.stderr + result.stdout
    assert took < 40, f"took {took:.0f}s: bounded by STREAMS_KAFKA_TIMEOUT, not a hang"
