"""One settings object for every stage, read from ``STREAMS_*`` environment variables.

Defaults point at the local process stack (``streams stack up``), so a newcomer
needs no configuration; production overrides them through the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.errors import ConfigError


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "streams"


class TopicOverride(BaseModel):
    """Per-topic exceptions to the topic defaults (``STREAMS_TOPIC_OVERRIDES``)."""

    model_config = {"extra": "forbid"}

    partitions: int | None = Field(None, ge=1)
    replication_factor: int | None = Field(None, ge=1)
    min_insync_replicas: int | None = Field(None, ge=1)


class Settings(BaseSettings):
    """Everything a stage needs to find its peers and tune its batches."""

    model_config = SettingsConfigDict(env_prefix="STREAMS_", extra="ignore")

    # --- Kafka -----------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_extra: dict[str, str] = Field(default_factory=dict, description="librdkafka properties passed through (JSON)")
    # One set of security settings, mapped once into librdkafka's and aiokafka's (Faust's)
    # dialects by streams.io.kafka_security.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_file: Path | None = Field(
        None, description="CA bundle the broker certificate must chain to; none = system store"
    )
    kafka_ssl_cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    kafka_ssl_key_file: Path | None = Field(None, description="its private key (PEM)")
    kafka_ssl_key_password: SecretStr | None = None
    kafka_timeout: float = Field(15.0, gt=0, description="seconds a start-up or command connection check may take")
    raw_topic: str = "logins.raw"
    masked_topic: str = "logins.masked"
    dlq_topic: str = "logins.dlq"
    # Topics as code (streams topics plan|apply): defaults for every topic, exceptions per topic.
    topic_partitions: int = Field(6, ge=1)
    topic_replication_factor: int = Field(1, ge=1, description="local default 1; 3 on a real cluster")
    topic_min_insync_replicas: int = Field(1, ge=1, description="local default 1; 2 on a real cluster")
    topic_overrides: dict[Literal["raw", "masked", "dlq"], TopicOverride] = Field(
        default_factory=dict, description='JSON, e.g. {"dlq": {"partitions": 1}}'
    )
    accept_low_replication: bool = Field(
        False, description="start even if a topic's replication factor or min.insync.replicas is below the setting"
    )
    raw_retention_ms: int = Field(
        7 * 24 * 3600 * 1000,
        description="raw topic and DLQ hold PII: bounded, > 0 and at most RETENTION_CEILING_MS (docs/privacy.md)",
    )
    accept_long_retention: bool = Field(
        False, description="allow a raw/DLQ retention above the ceiling (and such topics at start)"
    )
    masked_compaction_lag_ms: int = Field(
        24 * 3600 * 1000, gt=0, description="masked topic: longest a replaced or deleted value may stay uncompacted"
    )
    masked_tombstone_ms: int = Field(
        24 * 3600 * 1000, gt=0, description="masked topic: how long a tombstone stays for readers (delete.retention.ms)"
    )
    app_id: str = Field("streams", description="Faust app id; the consumer groups are <app_id>-mask and <app_id>-sink")

    # --- SQS -------------------------------------------------------------
    sqs_endpoint: str | None = Field("http://127.0.0.1:9324", description="empty: AWS's own endpoint for the region")
    sqs_queue: str = "login-queue"
    sqs_queue_url: str | None = Field(None, description="the queue's URL; else looked up by name (GetQueueUrl)")
    sqs_create_queue: bool = Field(False, description="create a missing queue: local stack and dev runs only")
    sqs_region: str | None = Field(None, description="else AWS_REGION, AWS_DEFAULT_REGION or the profile's region")
    # Explicit keys only when given; otherwise botocore's default credential chain
    # (environment, shared config/profile, web identity (IRSA), container or instance role).
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    bridge_pollers: int = Field(4, ge=1, description="concurrent SQS receivers")
    bridge_inflight: int = Field(
        16, ge=1, description="batches per poller being produced/acked/deleted while it receives the next"
    )
    bridge_linger_ms: int = Field(
        30,
        ge=0,
        description="librdkafka linger.ms of the bridge's producer: more records per produce request (the "
        "broker's work per request dominated its cost per message at 5 ms)",
    )
    bridge_wait_seconds: int = Field(1, ge=0, le=20)
    bridge_visibility_timeout: int = Field(30, ge=1, description="extended while a produce is pending")
    bridge_attributes: str = Field("SentTimestamp", description="SQS attributes kept in the raw envelope (allow-list)")
    bridge_stop_grace: float = Field(20.0, gt=0, description="seconds batches in flight get to finish on SIGTERM")
    max_body_bytes: int = Field(
        262_144, ge=1, description="larger bodies are dead-lettered as too_large (SQS's own limit)"
    )

    # --- Schema registry (Confluent REST API) ------------------------------
    # Set: every record is in the Confluent wire format (0x00, 4-byte schema id, datum) and
    # schemas are registered by the deploy step; empty: Avro single-object encoding.
    schema_registry_url: str | None = Field(
        None, description="base of the Confluent-compatible API, e.g. http://127.0.0.1:8081/apis/ccompat/v7"
    )
    schema_registry_username: str | None = Field(None, description="HTTP basic auth user")
    schema_registry_password: SecretStr | None = None
    schema_registry_ca_file: Path | None = Field(
        None, description="CA bundle the registry's certificate must chain to; none = system store"
    )
    schema_registry_cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    schema_registry_key_file: Path | None = Field(None, description="its private key (PEM)")
    schema_registry_timeout: float = Field(10.0, gt=0, description="seconds one registry request may take")

    # --- PostgreSQL ------------------------------------------------------
    pg_dsn: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/streams")
    pg_command_timeout: float = Field(30.0, gt=0, description="seconds a statement may take before it is retried")

    # --- Worker ----------------------------------------------------------
    stages: str = Field("mask,sink", description="comma-separated stages this worker runs")
    batch_size: int = Field(
        1000,
        ge=1,
        description="records per poll of a stage's consumer (1,000: ~3% less mask-stage CPU per record than 500, "
        "the same at 2,000 within noise; the bytes held stay within stream_buffer_bytes)",
    )
    sink_batch_size: int | None = Field(
        None,
        ge=1,
        description="records per sink batch (default: batch_size); a bigger one spreads the commit of its "
        "transactions over more rows",
    )
    batch_within: float = Field(0.5, gt=0)
    stream_buffer_bytes: int = Field(
        16 * 2**20,
        ge=2**20,
        description="bytes each stage may hold read and not yet committed: half delivered to the stage (value + "
        "256 per record), half librdkafka's prefetch (keys and values, and ~0.5 KiB per record)",
    )
    producer_buffer_bytes: int = Field(
        32 * 2**20,
        ge=2**20,
        description="bytes a producer may queue unacknowledged (librdkafka's queue.buffering.max.kbytes; its default "
        "is 1 GiB); when full, producing waits",
    )
    stream_buffer_maxsize: int = Field(
        16384, ge=2, description="events Faust may buffer per stream; the worker delivers at most half of it unacked"
    )
    retry_max_backoff: float = Field(10.0, gt=0)
    startup_timeout: float = Field(30.0, ge=0, description="seconds a starting stage waits for Kafka and PostgreSQL")
    worker_slot: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="stable id of this worker (StatefulSet ordinal, `streams run` child index): "
        "transactional.id <app_id>-<stage>-<slot>; none = random id",
    )
    commit_records: int = Field(
        5000, ge=1, description="the mask stage commits its transaction after this many records"
    )
    commit_interval: float = Field(0.2, gt=0, description="... or after this many seconds, whichever comes first")
    transaction_timeout: float = Field(
        30.0,
        ge=1,
        le=900,
        description="seconds a crashed worker's open transaction can stall readers (<= 30 without a slot)",
    )
    commit_timeout: float = Field(
        20.0, gt=0, description="seconds a Kafka transaction commit or abort may take before the producer is replaced"
    )
    revoke_timeout: float = Field(10.0, gt=0, description="seconds a revoke waits for the in-flight batch to commit")
    dedup_window: float = Field(
        600.0,
        ge=0,
        description="seconds of raw-record time the mask stage remembers written message ids (bridge copies "
        "within it are dropped); longer than the SQS visibility timeout plus the bridge's retries; 0 = off",
    )
    dedup_max_ids: int = Field(
        200_000,
        ge=1,
        description="message ids the dedup window holds at most (31-40 MiB at 200,000; the worker's 200 MiB)",
    )
    dedup_max_bytes: int = Field(
        42 * 2**20, ge=2**20, description="bytes the dedup window may use (counted as 216 per id, its worst and slack)"
    )
    mask_cache_size: int = Field(
        16384,
        ge=0,
        le=262_144,
        description="masked values the mask stage remembers (duplicates skip HMAC and AES-SIV); 0 = none. "
        "Each entry holds a plaintext value in worker memory (~700 bytes): bounded, see docs/privacy.md",
    )

    data_dir: Path = Field(
        default_factory=lambda: _default_home() / "faust",
        description="Faust's data directory (it keeps no tables here, but needs a writable folder)",
    )

    # --- Masking keys ----------------------------------------------------
    keys_file: Path = Field(default_factory=lambda: _default_home() / "keys.json")
    keys_json: SecretStr | None = Field(None, description="the key document itself (from a secret store)")
    dev_keys: bool = Field(False, description="generate a development key file when none exists")
    # Key material wrapped by a KMS (docs/privacy.md): with a key id set, the key file holds
    # only a KMS-wrapped document and a plaintext one is refused.
    kms_key_id: str | None = Field(None, description="AWS KMS key id, ARN or alias that wraps the key document")
    kms_endpoint: str | None = Field(None, description="KMS endpoint override (local moto); empty: AWS's own")
    kms_region: str | None = Field(None, description="else AWS_REGION, AWS_DEFAULT_REGION or us-east-1")
    kms_timeout: float = Field(10.0, gt=0, description="seconds a KMS call may take at start")
    deployment: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="names this deployment in every KMS EncryptionContext; else STREAMS_APP_ID",
    )
    # Workers that never decrypt (issue 19 item 2, docs/privacy.md): with an HMAC KMS key
    # set, join keys come from kms:GenerateMac and values are sealed under per-user keys.
    kms_mac_key_id: str | None = Field(
        None, description="AWS KMS HMAC_256 key whose GenerateMac makes the join keys (per-user key mode)"
    )
    join_version: str = Field(
        "g1", pattern=r"^[A-Za-z0-9_-]{1,16}$", description="join token version in per-user key mode"
    )

    # --- Process ---------------------------------------------------------
    log_dir: Path = Field(
        default_factory=lambda: _default_home() / "logs", description="where `streams run` puts its children's logs"
    )
    log_level: str = Field("INFO", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    log_format: Literal["text", "json"] = Field("text", description="json: one object per line, for log shippers")
    metrics_port: int = Field(0, ge=0, le=65535, description="HTTP port for /healthz, /readyz, /metrics; 0 = off")
    stuck_after: float = Field(120.0, gt=0, description="/healthz fails after this long without progress or retry")
    lag_interval: float = Field(10.0, gt=0, description="seconds between consumer-lag gauge updates")
    fault: str = Field("", description="fault injection for tests and chaos: <point>[@<n>][:raise]")

    # --- Local stack -----------------------------------------------------
    stack_dir: Path = Field(default_factory=lambda: _default_home() / "stack")
    stack_cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "streams")
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_brokers: int = Field(
        1, ge=1, le=9, description="Kafka nodes the local stack runs (3: `streams stack up --brokers 3`)"
    )
    pg_port: int = 5432
    sqs_port: int = 9324
    kms_port: int = 9350
    registry_port: int = Field(8081, description="the local stack's schema registry (Apicurio)")

    @field_validator(
        "sqs_endpoint",
        "sqs_queue_url",
        "worker_slot",
        "sink_batch_size",
        "sqs_region",
        "aws_access_key_id",
        "aws_secret_access_key",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_ca_file",
        "kafka_ssl_cert_file",
        "kafka_ssl_key_file",
        "kafka_ssl_key_password",
        "kms_key_id",
        "kms_mac_key_id",
        "kms_endpoint",
        "kms_region",
        "deployment",
        "schema_registry_url",
        "schema_registry_username",
        "schema_registry_password",
        "schema_registry_ca_file",
        "schema_registry_cert_file",
        "schema_registry_key_file",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]

    def stage_batch_size(self, stage: str) -> int:
        """Records a stage takes per batch: the sink's own size when set, else ``batch_size``."""
        return self.sink_batch_size if stage == "sink" and self.sink_batch_size else self.batch_size

    @property
    def region(self) -> str | None:
        """The SQS region: STREAMS_SQS_REGION, else AWS_REGION or AWS_DEFAULT_REGION (else the profile's)."""
        return self.sqs_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


RETENTION_CEILING_MS = 30 * 24 * 3600 * 1000  # raw and DLQ keep plaintext PII at most this long (docs/privacy.md)


def check_retention(settings: Settings) -> None:
    """Raw and DLQ hold plaintext PII: their retention is bounded (never -1, the broker's "forever")."""
    retention = settings.raw_retention_ms
    if retention <= 0:
        raise ConfigError(
            f"invalid setting STREAMS_RAW_RETENTION_MS={retention}: the raw topic and DLQ hold PII, "
            f"use a bound > 0 (at most {RETENTION_CEILING_MS} ms, 30 days)"
        )
    if retention > RETENTION_CEILING_MS and not settings.accept_long_retention:
        raise ConfigError(
            f"STREAMS_RAW_RETENTION_MS={retention} is above the {RETENTION_CEILING_MS} ms (30 days) ceiling for PII: "
            "lower it, or set STREAMS_ACCEPT_LONG_RETENTION=1 to accept it"
        )


def _check_combinations(settings: Settings) -> None:
    """Settings valid one by one but not together: one line naming what to set."""
    s = settings
    check_retention(s)
    if s.kafka_security_protocol.startswith("SASL"):
        if not s.kafka_sasl_username:
            raise ConfigError(
                f"STREAMS_KAFKA_SECURITY_PROTOCOL={s.kafka_security_protocol} needs STREAMS_KAFKA_SASL_USERNAME"
            )
        if s.kafka_sasl_password is None:
            raise ConfigError(
                f"STREAMS_KAFKA_SECURITY_PROTOCOL={s.kafka_security_protocol} needs STREAMS_KAFKA_SASL_PASSWORD"
            )
    if (s.kafka_ssl_cert_file is None) != (s.kafka_ssl_key_file is None):
        raise ConfigError("set both STREAMS_KAFKA_SSL_CERT_FILE and STREAMS_KAFKA_SSL_KEY_FILE, or neither")
    for name in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
        path = getattr(s, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"invalid setting STREAMS_{name.upper()}: no such file {path}")
    _check_registry(s)
    if (s.aws_access_key_id is None) != (s.aws_secret_access_key is None):
        raise ConfigError(
            "set both STREAMS_AWS_ACCESS_KEY_ID and STREAMS_AWS_SECRET_ACCESS_KEY, or neither (the default AWS credential chain)"
        )


def _check_registry(s: Settings) -> None:
    """The schema registry settings, like Kafka's: credentials in pairs, files that exist, TLS only with https."""
    url = s.schema_registry_url
    used = [
        name
        for name in ("username", "password", "ca_file", "cert_file", "key_file")
        if getattr(s, f"schema_registry_{name}") is not None
    ]
    if url is None:
        if used:
            raise ConfigError(
                f"STREAMS_SCHEMA_REGISTRY_{used[0].upper()} is set but STREAMS_SCHEMA_REGISTRY_URL is not"
            )
        return
    if not url.startswith(("http://", "https://")):
        raise ConfigError("invalid setting STREAMS_SCHEMA_REGISTRY_URL: use an http:// or https:// URL")
    if (s.schema_registry_username is None) != (s.schema_registry_password is None):
        raise ConfigError("set both STREAMS_SCHEMA_REGISTRY_USERNAME and STREAMS_SCHEMA_REGISTRY_PASSWORD, or neither")
    if (s.schema_registry_cert_file is None) != (s.schema_registry_key_file is None):
        raise ConfigError("set both STREAMS_SCHEMA_REGISTRY_CERT_FILE and STREAMS_SCHEMA_REGISTRY_KEY_FILE, or neither")
    tls = [name for name in used if name.endswith("_file")]
    if tls and not url.startswith("https://"):
        raise ConfigError(f"STREAMS_SCHEMA_REGISTRY_{tls[0].upper()} needs an https:// STREAMS_SCHEMA_REGISTRY_URL")
    for name in tls:
        path = getattr(s, f"schema_registry_{name}")
        if not path.is_file():
            raise ConfigError(f"invalid setting STREAMS_SCHEMA_REGISTRY_{name.upper()}: no such file {path}")


def load_settings(**overrides) -> Settings:
    """Build settings, turning pydantic's report into one line naming the env var."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "STREAMS_" + str(err["loc"][0]).upper() if err["loc"] else "STREAMS_*"
        raise ConfigError(f"invalid setting {name}: {err['msg']}") from None
    unknown = set(settings.stage_list) - {"mask", "sink"}
    if unknown or not settings.stage_list:
        raise ConfigError(f"invalid setting STREAMS_STAGES={settings.stages!r}: use 'mask', 'sink' or 'mask,sink'")
    _check_combinations(settings)
    return settings
