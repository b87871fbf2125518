"""Isolated runs on a shared stack, and private stacks for runs that break services.

Tests, the chaos run and the benchmarks each get their own database, topics, queue,
consumer group and keys (``sandbox_env``), so they never see each other's data. Runs that
stop Kafka or PostgreSQL get a whole stack of their own on free ports (``private_settings``).
"""

from __future__ import annotations

import asyncio
import random
import socket
import uuid
from pathlib import Path

from streams.io.postgres import connect
from streams.settings import Settings


def settings_from_env(env: dict[str, str]) -> Settings:
    """The Settings a stage process started with ``env`` would see (its ``STREAMS_*`` part)."""
    return Settings(**{k.removeprefix("STREAMS_").lower(): v for k, v in env.items() if k.startswith("STREAMS_")})


LOCAL_ENV_FILE = Path(__file__).resolve().parent / "local.env"


def local_env() -> dict[str, str]:
    """Dev mode on the local stack (``local.env``, also read by the Makefile's run target):
    local SQS credentials and region, queues created on first use, a generated dev key."""
    env = {}
    for line in LOCAL_ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


async def create_database(admin_dsn: str, name: str) -> None:
    conn = await connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def registry_env(base: Settings) -> str:
    """The schema registry a sandbox on ``base`` uses: base's own, else the stack's (``local.env``
    turns it on; an empty value there turns it off)."""
    if base.schema_registry_url:
        return base.schema_registry_url
    if not local_env().get("STREAMS_SCHEMA_REGISTRY_URL"):
        return ""
    from streams_dev.stack.registry import registry_url

    return registry_url(base.registry_port)


def sandbox_env(base: Settings, workdir: Path, prefix: str = "t", **extra: str) -> dict[str, str]:
    """Create a database of its own on ``base`` and return the STREAMS_* env of the sandbox."""
    tag = f"{prefix}{uuid.uuid4().hex[:10]}"
    admin_dsn = base.pg_dsn.get_secret_value()
    asyncio.run(create_database(admin_dsn, tag))
    return {
        **local_env(),
        "STREAMS_SCHEMA_REGISTRY_URL": registry_env(base),
        "STREAMS_KAFKA_BOOTSTRAP": base.kafka_bootstrap,
        # Topics replicated as the stack's Kafka can (3 and 2 on three brokers).
        "STREAMS_TOPIC_REPLICATION_FACTOR": str(base.topic_replication_factor),
        "STREAMS_TOPIC_MIN_INSYNC_REPLICAS": str(base.topic_min_insync_replicas),
        "STREAMS_SQS_ENDPOINT": base.sqs_endpoint or "",
        "STREAMS_PG_DSN": admin_dsn.rsplit("/", 1)[0] + "/" + tag,
        "STREAMS_RAW_TOPIC": f"{tag}.raw",
        "STREAMS_MASKED_TOPIC": f"{tag}.masked",
        "STREAMS_DLQ_TOPIC": f"{tag}.dlq",
        "STREAMS_SQS_QUEUE": tag,
        "STREAMS_APP_ID": f"streams-{tag}",
        "STREAMS_KEYS_FILE": str(workdir / "keys.json"),
        "STREAMS_STACK_DIR": str(base.stack_dir),
        "STREAMS_DATA_DIR": str(workdir / "faust"),
        "STREAMS_LOG_DIR": str(workdir / "logs"),
        "STREAMS_DEV_KEYS": "1",
        # Keyring mode (a dev key file), unless a test sets local.env's key ids (per-user key mode).
        "STREAMS_KMS_KEY_ID": "",
        "STREAMS_KMS_MAC_KEY_ID": "",
        "STREAMS_KMS_ENDPOINT": f"http://127.0.0.1:{base.kms_port}",
        **extra,
    }


def _free_ports(count: int, block: int = 1) -> list[int]:
    """``count`` distinct free ports below the kernel's ephemeral range (32768+), where
    outgoing connections cannot grab them between this check and the service's bind.
    With ``block`` > 1 each returned port ``p`` has ``p .. p+block-1`` all free (a
    cluster's nodes take consecutive ports)."""
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20_000, 32_000 - block)
        span = range(port, port + block)
        if any(p in ports or p - q in range(block) for p in span for q in ports):
            continue
        if all(_bindable(p) for p in span):
            ports.append(port)
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def private_settings(stack_dir: Path, brokers: int = 1) -> Settings:
    """A stack of our own on free ports, so stopping its services never touches anyone else's.

    With ``brokers`` > 1 a Kafka cluster (node n on the client port + 2(n-1), its
    controller on the next port) and topics replicated as it allows (3 and 2 on three).
    """
    from streams_dev.stack.kafka import client_env

    (kafka,) = _free_ports(1, block=2 * brokers)
    pg, sqs, registry, kms = _free_ports(4)
    while {pg, sqs, registry, kms} & set(range(kafka, kafka + 2 * brokers)):
        pg, sqs, registry, kms = _free_ports(4)
    settings = Settings(
        stack_dir=stack_dir,
        registry_port=registry,
        kafka_port=kafka,
        kafka_controller_port=kafka + 1,
        kafka_brokers=brokers,
        pg_port=pg,
        sqs_port=sqs,
        kms_port=kms,
        sqs_endpoint=f"http://127.0.0.1:{sqs}",
        pg_dsn=f"postgresql://postgres@127.0.0.1:{pg}/streams",
    )
    kafka_env = client_env(settings)
    return settings.model_copy(
        update={
            "kafka_bootstrap": kafka_env["STREAMS_KAFKA_BOOTSTRAP"],
            "topic_replication_factor": int(kafka_env["STREAMS_TOPIC_REPLICATION_FACTOR"]),
            "topic_min_insync_replicas": int(kafka_env["STREAMS_TOPIC_MIN_INSYNC_REPLICAS"]),
        }
    )
