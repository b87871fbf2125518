"""One settings object for every stage, read from ``STREAMS_*`` environment variables.

Defaults point at the local process stack (``streams stack up``), so a newcomer
needs no configuration; production overrides them through the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.errors import ConfigError


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "streams"


class Settings(BaseSettings):
    """Everything a stage needs to find its peers and tune its batches."""

    model_config = SettingsConfigDict(env_prefix="STREAMS_", extra="ignore")

    # --- Kafka -----------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_extra: dict[str, str] = Field(default_factory=dict, description="librdkafka properties passed through (JSON)")
    raw_topic: str = "logins.raw"
    masked_topic: str = "logins.masked"
    dlq_topic: str = "logins.dlq"
    topic_partitions: int = Field(6, ge=1)
    raw_retention_ms: int = Field(7 * 24 * 3600 * 1000, description="raw topic and DLQ hold PII: bounded")
    app_id: str = Field("streams", description="Faust app id; mask and sink consumer groups derive from it")

    # --- SQS -------------------------------------------------------------
    sqs_endpoint: str = "http://127.0.0.1:9324"
    sqs_queue: str = "login-queue"
    sqs_region: str = "us-east-1"
    aws_access_key_id: SecretStr = SecretStr("x")
    aws_secret_access_key: SecretStr = SecretStr("x")
    bridge_pollers: int = Field(4, ge=1, description="concurrent SQS receivers")
    bridge_inflight: int = Field(
        2, ge=1, description="batches per poller being produced/acked/deleted while it receives the next"
    )
    bridge_wait_seconds: int = Field(1, ge=0, le=20)
    bridge_visibility_timeout: int = Field(30, ge=1, description="extended while a produce is pending")
    bridge_attributes: str = Field("SentTimestamp", description="SQS attributes kept in the raw envelope (allow-list)")
    bridge_stop_grace: float = Field(20.0, gt=0, description="seconds batches in flight get to finish on SIGTERM")
    max_body_bytes: int = Field(262_144, ge=1, description="larger bodies are dead-lettered as too_large (SQS's own limit)")

    # --- PostgreSQL ------------------------------------------------------
    pg_dsn: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/streams")
    pg_command_timeout: float = Field(30.0, gt=0, description="seconds a statement may take before it is retried")

    # --- Worker ----------------------------------------------------------
    stages: str = Field("mask,sink", description="comma-separated stages this worker runs")
    batch_size: int = Field(500, ge=1)
    batch_within: float = Field(0.5, gt=0)
    stream_buffer_bytes: int = Field(
        64 * 2**20, ge=2**20, description="bytes a worker may hold delivered but not yet acked (value + ~1 KiB per event)"
    )
    stream_buffer_maxsize: int = Field(
        16384, ge=2, description="events Faust may buffer per stream; the worker delivers at most half of it unacked"
    )
    retry_max_backoff: float = Field(10.0, gt=0)
    mask_cache_size: int = Field(
        16384, ge=0, description="masked values the mask stage remembers (duplicates skip HMAC and AES-SIV); 0 = none"
    )

    data_dir: Path = Field(
        default_factory=lambda: _default_home() / "faust",
        description="Faust's data directory (it keeps no tables here, but needs a writable folder)",
    )

    # --- Masking keys ----------------------------------------------------
    keys_file: Path = Field(default_factory=lambda: _default_home() / "keys.json")
    keys_json: SecretStr | None = Field(None, description="the key document itself (from a secret store)")
    dev_keys: bool = Field(False, description="generate a development key file when none exists")

    # --- Process ---------------------------------------------------------
    log_dir: Path = Field(
        default_factory=lambda: _default_home() / "logs", description="where `streams run` puts its children's logs"
    )
    log_level: str = Field("INFO", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    metrics_port: int = Field(0, ge=0, le=65535, description="HTTP port for /healthz, /readyz, /metrics; 0 = off")
    fault: str = Field("", description="fault injection for tests and chaos: <point>[@<n>][:raise]")

    # --- Local stack -----------------------------------------------------
    stack_dir: Path = Field(default_factory=lambda: _default_home() / "stack")
    stack_cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "streams")
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    pg_port: int = 5432
    sqs_port: int = 9324

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]


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
    return settings
