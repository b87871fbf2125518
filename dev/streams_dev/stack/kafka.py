"""Apache Kafka 3.9.1 in KRaft mode: each node one JVM that is both broker and controller.

One node by default; ``streams stack up --brokers 3`` starts a cluster of three on
loopback (``kafka-1``..``kafka-3``, ports ``STREAMS_KAFKA_PORT`` + 2*(node-1) and
``STREAMS_KAFKA_CONTROLLER_PORT`` + 2*(node-1)) whose topics, offsets topic and
transaction log are replicated 3 times with ``min.insync.replicas`` 2, so one broker
can die without stopping a write.

Jars come from Maven Central through the pinned ``poms/kafka/pom.xml`` (package data) (no
tarball mirror to trust, cached once outside the work tree). Readiness is a
real produce + consume round trip, because the listener port opens well
before the controller has elected itself and the broker can take writes.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import subprocess
import time
import uuid
from pathlib import Path

from .process import (
    LOOPBACK,
    NotReady,
    Service,
    StackError,
    ensure_jars,
    port_open,
    require_java,
    spawn,
)

VERSION = "3.9.1"
POM = Path(__file__).resolve().parent / "poms" / "kafka" / "pom.xml"
HEALTH_TOPIC = "_streams_health"

# librdkafka reports every refused connection while the broker boots; the
# probe's own error already says what matters, so keep its chatter out of the CLI.
_client_log = logging.getLogger("streams.stack.kafka.client")
_client_log.addHandler(logging.NullHandler())
_client_log.propagate = False


def new_cluster_id() -> str:
    """A Kafka cluster id (base64url of 16 random bytes), without starting a JVM for it."""
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka's Uuid.randomUuid() rejects these too
            return cid


def replication(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of ``brokers``: 3 and 2 on
    three or more (one broker may fail), 1 and 1 on one."""
    factor = min(brokers, 3)
    return factor, max(factor - 1, 1)


def node_ports(settings, node: int) -> tuple[int, int]:
    """(client port, controller port) of cluster node ``node`` (1-based)."""
    step = 2 * (node - 1)
    return settings.kafka_port + step, settings.kafka_controller_port + step


def bootstrap(settings, brokers: int | None = None) -> str:
    """The bootstrap list of the stack's brokers (every node, so clients start with any one down)."""
    n = settings.kafka_brokers if brokers is None else brokers
    return ",".join(f"{LOOPBACK}:{node_ports(settings, i)[0]}" for i in range(1, n + 1))


def client_env(settings, brokers: int | None = None) -> dict[str, str]:
    """The ``STREAMS_*`` a process needs to use this stack's Kafka as the stack built it."""
    n = settings.kafka_brokers if brokers is None else brokers
    factor, isr = replication(n)
    return {
        "STREAMS_KAFKA_BOOTSTRAP": bootstrap(settings, n),
        "STREAMS_TOPIC_REPLICATION_FACTOR": str(factor),
        "STREAMS_TOPIC_MIN_INSYNC_REPLICAS": str(isr),
    }


class Kafka(Service):
    """One Kafka node. ``nodes == 1``: the one-node stack (dir ``kafka``); else node ``node``
    of a cluster of ``nodes`` (dir ``kafka-<node>``, one cluster id shared by all)."""

    name = "kafka"
    ready_timeout = 90.0

    def __init__(self, settings, node: int = 1, nodes: int = 1) -> None:
        self.node, self.nodes = node, nodes
        if nodes > 1:
            self.name = f"kafka-{node}"
        super().__init__(settings)
        self.client_port, self.controller_port = node_ports(settings, node)

    @property
    def port(self) -> int:
        return self.client_port

    def ports(self) -> list[tuple[int, str]]:
        return [
            (self.client_port, "STREAMS_KAFKA_PORT"),
            (self.controller_port, "STREAMS_KAFKA_CONTROLLER_PORT"),
        ]

    @property
    def config_file(self) -> Path:
        return self.dir / "server.properties"

    @property
    def marker(self) -> str:
        return str(self.config_file)

    @property
    def stdout_file(self) -> Path:
        # JVM-level failures (bad flags, missing class) never reach log4j.
        return self.dir / "kafka.out"

    @property
    def logs(self) -> tuple[Path, ...]:
        return (self.log_file, self.stdout_file)

    @property
    def jar_dir(self) -> Path:
        return self.cache_dir / f"kafka-{VERSION}"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def detail(self) -> str:
        if self.nodes == 1:
            return f"bootstrap {LOOPBACK}:{self.port}, log {self.log_file}"
        return (
            f"node {self.node} of {self.nodes}, bootstrap {bootstrap(self.settings, self.nodes)}, log {self.log_file}"
        )

    # -- start -----------------------------------------------------------------
    def prepare(self) -> None:
        self._java = require_java()
        ensure_jars(POM, self.jar_dir, self.dir / "maven.log")
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            self._format()

    def _java_argv(self, main: str, *args: str, heap: str = "1g") -> list[str]:
        return [
            self._java,
            f"-Xmx{heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.dir}",
            "-cp",
            f"{self.jar_dir}/*",
            main,
            *args,
        ]

    def _write_config(self) -> None:
        host = LOOPBACK
        factor, isr = replication(self.nodes)
        voters = ",".join(f"{i}@{host}:{node_ports(self.settings, i)[1]}" for i in range(1, self.nodes + 1))
        self.config_file.write_text(
            "\n".join(
                [
                    "# Generated by `streams stack up` on every start; edits are overwritten.",
                    "process.roles=broker,controller",
                    f"node.id={self.node}",
                    f"controller.quorum.voters={voters}",
                    f"listeners=PLAINTEXT://{host}:{self.client_port},CONTROLLER://{host}:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{host}:{self.client_port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.data_dir}",
                    "num.partitions=1",
                    f"default.replication.factor={factor}",
                    f"min.insync.replicas={isr}",
                    f"offsets.topic.replication.factor={factor}",
                    f"transaction.state.log.replication.factor={factor}",
                    f"transaction.state.log.min.isr={isr}",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    "",
                ]
            )
        )
        self._write_log4j()

    def _write_log4j(self) -> None:
        (self.dir / "log4j.properties").write_text(
            "\n".join(
                [
                    "log4j.rootLogger=INFO, file",
                    "log4j.appender.file=org.apache.log4j.RollingFileAppender",
                    f"log4j.appender.file.File={self.log_file}",
                    "log4j.appender.file.MaxFileSize=20MB",
                    "log4j.appender.file.MaxBackupIndex=2",
                    "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
                    "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
                    "log4j.logger.kafka.request.logger=WARN",
                    "log4j.logger.state.change.logger=WARN",
                    "log4j.logger.org.apache.kafka.clients=WARN",
                    "",
                ]
            )
        )

    def _format_args(self) -> list[str]:
        return []

    def _format(self) -> None:
        """Stamp the storage dir with a cluster id kept next to it, so re-formatting
        after a wiped data dir keeps the same id."""
        cluster_id = self._cluster_id()
        with open(self.stdout_file, "ab") as out:
            rc = subprocess.run(
                self._java_argv(
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(self.config_file),
                    "--ignore-formatted",
                    *self._format_args(),
                    heap="256m",
                ),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
            ).returncode
        if rc != 0:
            raise StackError(f"kafka storage format failed: {self.last_log_line()} (see {self.stdout_file})")

    def _cluster_id(self) -> str:
        """This node's cluster id: its own file on one node; on a cluster one file in the
        stack dir, created atomically (the nodes are prepared in parallel)."""
        id_file = self.dir / "cluster-id" if self.nodes == 1 else self.stack_dir / "kafka-cluster-id"
        if not id_file.exists():
            staged = id_file.with_name(f"{id_file.name}.{os.getpid()}.{self.node}")
            staged.write_text(new_cluster_id() + "\n")
            with contextlib.suppress(FileExistsError):
                os.link(staged, id_file)  # the first node to get here wins
            staged.unlink()
        return id_file.read_text().strip()

    def launch(self) -> subprocess.Popen:
        return spawn(
            self._java_argv("kafka.Kafka", str(self.config_file)),
            pid_file=self.pid_file,
            log_file=self.stdout_file,
            cwd=self.dir,
        )

    # -- readiness -------------------------------------------------------------
    def client_security(self) -> dict:
        """The probe's librdkafka security properties: those of the settings (none locally)."""
        from streams.io.kafka_security import librdkafka_security

        return librdkafka_security(self.settings)

    def probe(self, timeout: float) -> None:
        """Produce one message to the health topic and read that very message back."""
        if not port_open(self.port):
            raise NotReady(f"port {self.port} not accepting connections yet")
        from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

        bootstrap = f"{LOOPBACK}:{self.port}"
        token = uuid.uuid4().hex.encode()
        if self.nodes > 1:
            self._probe_member(bootstrap, timeout)
        result: dict = {}
        producer = Producer(
            {
                **self.client_security(),
                "bootstrap.servers": bootstrap,
                "logger": _client_log,
                "message.timeout.ms": int(timeout * 1000),
                "acks": "all",
            }
        )
        producer.produce(HEALTH_TOPIC, value=token, on_delivery=lambda err, msg: result.update(err=err, msg=msg))
        producer.flush(timeout + 1)
        if "msg" not in result:
            raise NotReady("produce to the health topic timed out")
        if result["err"] is not None:
            raise NotReady(f"produce failed: {result['err'].str()}")
        sent = result["msg"]

        consumer = Consumer(
            {
                **self.client_security(),
                "bootstrap.servers": bootstrap,
                "logger": _client_log,
                "group.id": "_streams_health",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        try:
            # assign(), not subscribe(): no group join, no rebalance delay.
            consumer.assign([TopicPartition(HEALTH_TOPIC, sent.partition(), sent.offset())])
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                if msg.value() == token:
                    return
            raise NotReady("consuming the health message back timed out")
        except KafkaException as exc:
            raise NotReady(f"consume failed: {exc}") from None
        finally:
            consumer.close()

    def _probe_member(self, bootstrap: str, timeout: float) -> None:
        """A cluster node serves once the controller lists it as a live (unfenced) broker."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.client_security(), "bootstrap.servers": bootstrap, "logger": _client_log})
        try:
            brokers = admin.list_topics(timeout=timeout).brokers
        except KafkaException as exc:
            raise NotReady(f"metadata request failed: {exc}") from None
        if self.node not in brokers:
            raise NotReady(f"node {self.node} is not a live broker of the cluster yet (live: {sorted(brokers)})")


class SecureKafka(Kafka):
    """A Kafka whose only client listener is SASL_SSL, with ACLs enforced: a secured cluster in small.

    - TLS: the broker's certificate and key in a PEM keystore (``ssl.keystore.type=PEM``),
      issued by a local CA (``streams_dev.tls``); clients must trust that CA.
    - SASL/SCRAM-SHA-512: the users are created when the storage is formatted
      (``kafka-storage format --add-scram``); ``admin`` is the inter-broker user and a
      super user, every other user gets only the ACLs granted to it (StandardAuthorizer,
      nothing allowed without an ACL).
    - The controller listener stays PLAINTEXT on loopback and is never advertised.

    ``settings`` carry the ports, the stack dir and the admin's client security settings
    (used by the readiness probe). Started and stopped directly (``start()``/``stop()``),
    beside the shared stack, never in place of it.
    """

    name = "kafka-secure"

    def __init__(self, settings, *, keystore: Path, ca_file: Path, users: dict[str, str], admin: str = "admin") -> None:
        super().__init__(settings)
        if admin not in users:
            raise StackError(f"the admin user {admin!r} needs a password in users")
        self.keystore, self.ca_file, self.users, self.admin = keystore, ca_file, users, admin

    def _write_config(self) -> None:
        s = self.settings
        host = LOOPBACK
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{self.admin}" password="{self.users[self.admin]}";'
        )
        self.config_file.write_text(
            "\n".join(
                [
                    "# Generated by SecureKafka on every start; edits are overwritten.",
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{host}:{s.kafka_controller_port}",
                    f"listeners=SASL_SSL://{host}:{s.kafka_port},CONTROLLER://{host}:{s.kafka_controller_port}",
                    f"advertised.listeners=SASL_SSL://{host}:{s.kafka_port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=SASL_SSL",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
                    "sasl.enabled.mechanisms=SCRAM-SHA-512",
                    "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
                    f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={jaas}",
                    "ssl.keystore.type=PEM",
                    f"ssl.keystore.location={self.keystore}",
                    "ssl.truststore.type=PEM",
                    f"ssl.truststore.location={self.ca_file}",
                    "ssl.client.auth=none",
                    "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                    # The controller listener (PLAINTEXT, loopback, not advertised) is ANONYMOUS.
                    f"super.users=User:{self.admin};User:ANONYMOUS",
                    "allow.everyone.if.no.acl.found=false",
                    f"log.dirs={self.data_dir}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=5",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    "",
                ]
            )
        )
        super()._write_log4j()

    def _format_args(self) -> list[str]:
        args = []
        for user, password in self.users.items():
            args += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        return args
