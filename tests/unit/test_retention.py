"""Issue 19 item 5: raw and DLQ retention bounded, topic time bounds checked (pure logic); item 6: mask cache bound."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from streams.errors import ConfigError
from streams.ops import topics
from streams.pipeline.dead_letters import refused_by_kafka
from streams.settings import RETENTION_CEILING_MS, load_settings
from tests.factories import CODECS


@pytest.mark.parametrize("retention", ["-1", "0"])
def test_an_unbounded_or_zero_raw_retention_is_refused(monkeypatch, retention):
    monkeypatch.setenv("STREAMS_RAW_RETENTION_MS", retention)
    with pytest.raises(ConfigError, match="STREAMS_RAW_RETENTION_MS") as refused:
        load_settings()
    assert "\n" not in str(refused.value)


def test_a_retention_above_the_ceiling_needs_the_flag(monkeypatch):
    monkeypatch.setenv("STREAMS_RAW_RETENTION_MS", str(RETENTION_CEILING_MS + 1))
    with pytest.raises(ConfigError, match="STREAMS_ACCEPT_LONG_RETENTION=1"):
        load_settings()
    monkeypatch.setenv("STREAMS_ACCEPT_LONG_RETENTION", "1")
    assert load_settings().raw_retention_ms == RETENTION_CEILING_MS + 1
    monkeypatch.setenv("STREAMS_RAW_RETENTION_MS", "-1")
    with pytest.raises(ConfigError):  # the flag allows long, never forever
        load_settings()


def test_topic_configs_bound_every_plaintext_lifetime():
    s = load_settings(raw_retention_ms=3_600_000)
    configs = topics.topic_configs(s)
    for name in (s.raw_topic, s.dlq_topic):
        assert configs[name] == {"cleanup.policy": "delete", "retention.ms": "3600000", "segment.ms": "360000"}
    assert configs[s.masked_topic] == {
        "cleanup.policy": "compact",
        "max.compaction.lag.ms": str(s.masked_compaction_lag_ms),
        "delete.retention.ms": str(s.masked_tombstone_ms),
    }
    assert topics.segment_ms(1000) == 60_000 and topics.segment_ms(RETENTION_CEILING_MS) == 24 * 3600 * 1000


def spec_and_found(role: str, **have: str) -> tuple[topics.TopicSpec, topics.Found]:
    s = load_settings()
    spec = next(sp for sp in topics.specs(s) if sp.role == role)
    return spec, topics.Found(6, 1, {**spec.config, **have})


@pytest.mark.parametrize(
    ("role", "have", "expected"),
    [
        ("raw", {}, None),
        ("raw", {"retention.ms": "3600000"}, None),  # shorter than the settings: stricter, fine
        ("raw", {"retention.ms": "-1"}, "retention.ms=-1"),
        ("dlq", {"retention.ms": str(8 * 24 * 3600 * 1000)}, "retention.ms=691200000, above"),
        ("dlq", {"segment.ms": "604800000"}, "segment.ms=604800000"),
        ("raw", {"cleanup.policy": "compact"}, "cleanup.policy=compact, settings say delete"),
        ("masked", {"cleanup.policy": "delete"}, "cleanup.policy=delete, settings say compact"),
        ("masked", {"max.compaction.lag.ms": "9223372036854775807"}, "max.compaction.lag.ms"),
        ("masked", {"delete.retention.ms": "864000000"}, "delete.retention.ms"),
    ],
)
def test_retention_problem_of_an_existing_topic(role, have, expected):
    spec, found = spec_and_found(role, **have)
    problem = topics.retention_problem(spec, found)
    assert (problem is None) if expected is None else (expected in (problem or "")), problem


def test_a_dead_letter_replacing_a_refused_record_keeps_its_timestamp():
    dead = refused_by_kafka(
        ("raw", b"m-1", b"x" * 10, 1_700_000_000_000),
        KafkaError(KafkaError.MSG_SIZE_TOO_LARGE),
        "mask",
        CODECS.dead_letter,
        "dlq",
    )
    assert dead[0] == "dlq" and dead[3] == 1_700_000_000_000


def test_the_plaintext_mask_cache_is_bounded(monkeypatch):
    monkeypatch.setenv("STREAMS_MASK_CACHE_SIZE", str(10_000_000))
    with pytest.raises(ConfigError, match="STREAMS_MASK_CACHE_SIZE"):
        load_settings()
