"""Kafka, PostgreSQL and ElasticMQ in containers (testcontainers), for ``STREAMS_TEST_STACK=containers``.

- Kafka: ``apache/kafka:3.9.1`` in KRaft mode through ``ApacheKafkaContainer`` below.
  testcontainers' own ``KafkaContainer`` only runs Confluent images. The host listener must
  be advertised as ``<host ip>:<mapped port>``, known only after the container started, so
  the container's command waits for a file holding it, written by ``start()``.
- PostgreSQL: testcontainers' ``PostgresContainer("postgres:16", driver=None)``.
- ElasticMQ: a generic container, ready when ``GET /health`` answers 200.
- Apicurio Registry: a generic container with SQL storage in a database of its own on the
  PostgreSQL container (reached at its published address), ready when its
  Confluent-compatible API answers ``GET /subjects``.

Ports are published on the engine's bridge address (``get_container_host_ip()``), never
on fixed host ports unless a caller asks (``bind_port``: a restart keeps the address).
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
import uuid

from testcontainers.community.postgres import PostgresContainer
from testcontainers.core.container import DockerContainer
from testcontainers.core.wait_strategies import HttpWaitStrategy, LogMessageWaitStrategy

from streams.settings import Settings

KAFKA_IMAGE = "apache/kafka:3.9.1"
POSTGRES_IMAGE = "postgres:16"
ELASTICMQ_IMAGE = "softwaremill/elasticmq-native:1.6.16"
APICURIO_IMAGE = "quay.io/apicurio/apicurio-registry:3.3.3"
REGISTRY_DATABASE = "apicurio_registry"
START_TIMEOUT = 120


class ApacheKafkaContainer(DockerContainer):
    """Single-node KRaft Kafka from the Apache image.

    Listeners: ``PLAINTEXT`` on 9092 for the host (advertised on the mapped port),
    ``BROKER`` on 19092, the inter-broker listener (advertised as ``localhost:19092``:
    the single node reaches itself there), ``CONTROLLER`` on 9093 (inside only).
    """

    PORT = 9092
    INTERNAL_PORT = 19092
    _ADVERTISED = "/tmp/advertised-listeners"

    def __init__(self, image: str = KAFKA_IMAGE, alias: str = "kafka", **kwargs) -> None:
        super().__init__(image, **kwargs)
        self.alias = alias
        self.with_exposed_ports(self.PORT)
        self.with_envs(
            CLUSTER_ID=uuid.uuid4().hex[:22],
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS=f"PLAINTEXT://0.0.0.0:{self.PORT},BROKER://0.0.0.0:{self.INTERNAL_PORT},CONTROLLER://0.0.0.0:9093",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
            KAFKA_INTER_BROKER_LISTENER_NAME="BROKER",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS="1",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_HEAP_OPTS="-Xmx512m -Xms512m",
        )
        # The official start-up (/etc/kafka/docker/run) once the advertised listeners are known.
        self.with_command(
            [
                "bash",
                "-c",
                f"while [ ! -s {self._ADVERTISED} ]; do sleep 0.1; done; "
                f'export KAFKA_ADVERTISED_LISTENERS="$(cat {self._ADVERTISED})"; exec /etc/kafka/docker/run',
            ]
        )

    @property
    def bootstrap_server(self) -> str:
        return f"{self.get_container_host_ip()}:{self.get_exposed_port(self.PORT)}"

    def start(self) -> ApacheKafkaContainer:
        super().start()
        # BROKER is the inter-broker listener: a single node reaches itself there (transaction
        # markers, for one, go through it), so it must resolve inside the container.
        advertised = f"PLAINTEXT://{self.bootstrap_server},BROKER://localhost:{self.INTERNAL_PORT}"
        result = self.exec(
            [
                "bash",
                "-c",
                f"printf '%s' '{advertised}' > {self._ADVERTISED}.tmp && mv {self._ADVERTISED}.tmp {self._ADVERTISED}",
            ]
        )
        if result.exit_code != 0:
            raise RuntimeError(f"cannot configure Kafka's listeners: {result.output!r}")
        LogMessageWaitStrategy("Kafka Server started").with_startup_timeout(START_TIMEOUT).wait_until_ready(self)
        return self


def elasticmq_container(image: str = ELASTICMQ_IMAGE) -> DockerContainer:
    return (
        DockerContainer(image)
        .with_exposed_ports(9324)
        .waiting_for(HttpWaitStrategy(9324, "/health").for_status_code(200).with_startup_timeout(START_TIMEOUT))
    )


def postgres_container(image: str = POSTGRES_IMAGE) -> PostgresContainer:
    return PostgresContainer(image, username="postgres", password="postgres", dbname="streams", driver=None)


def registry_container(postgres: PostgresContainer, image: str = APICURIO_IMAGE) -> DockerContainer:
    """Apicurio on the PostgreSQL container's published port (its database must exist)."""
    host, port = postgres.get_container_host_ip(), postgres.get_exposed_port(5432)
    return (
        DockerContainer(image)
        .with_exposed_ports(8080)
        .with_envs(
            APICURIO_STORAGE_KIND="sql",
            APICURIO_STORAGE_SQL_KIND="postgresql",
            APICURIO_DATASOURCE_URL=f"jdbc:postgresql://{host}:{port}/{REGISTRY_DATABASE}",
            APICURIO_DATASOURCE_USERNAME="postgres",
            APICURIO_DATASOURCE_PASSWORD="postgres",
        )
        .waiting_for(
            HttpWaitStrategy(8080, "/apis/ccompat/v7/subjects").for_status_code(200).with_startup_timeout(START_TIMEOUT)
        )
    )


async def create_registry_database(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", REGISTRY_DATABASE):
            await conn.execute(f'CREATE DATABASE "{REGISTRY_DATABASE}"')
    finally:
        await conn.close()


def bind_port(container: DockerContainer, port: int) -> int:
    """Publish ``port`` on a fixed free host port (same address after a restart); returns it."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        host_port = sock.getsockname()[1]
    container.with_bind_ports(port, host_port)
    return host_port


class ContainerStack:
    """The four services, started together; ``settings`` points the pipeline at them."""

    def __init__(self) -> None:
        self.kafka = ApacheKafkaContainer()
        self.postgres = postgres_container()
        self.sqs = elasticmq_container()
        self.registry: DockerContainer | None = None
        self.started: list[DockerContainer] = []

    def start(self) -> Settings:
        import asyncio

        t0 = time.monotonic()
        try:
            for container in (self.postgres, self.sqs, self.kafka):
                container.start()
                self.started.append(container)
            asyncio.run(create_registry_database(self.postgres.get_connection_url(driver=None)))
            self.registry = registry_container(self.postgres)
            self.registry.start()
            self.started.append(self.registry)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self.settings

    @property
    def settings(self) -> Settings:
        return Settings(
            kafka_bootstrap=self.kafka.bootstrap_server,
            pg_dsn=self.postgres.get_connection_url(driver=None),
            sqs_endpoint=f"http://{self.sqs.get_container_host_ip()}:{self.sqs.get_exposed_port(9324)}",
            schema_registry_url=self.registry_url,
        )

    @property
    def registry_url(self) -> str | None:
        if self.registry is None:
            return None
        return f"http://{self.registry.get_container_host_ip()}:{self.registry.get_exposed_port(8080)}/apis/ccompat/v7"

    def stop(self) -> None:
        for container in reversed(self.started):
            try:
                container.stop()
            except Exception:  # best effort: Ryuk removes whatever is left
                pass
        self.started.clear()


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
