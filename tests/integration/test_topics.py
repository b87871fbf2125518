"""Topics as code: `streams topics plan|apply`, and the start-up check of replication."""

from __future__ import annotations

import pytest

from streams.errors import ConfigError
from streams.ops import topics

pytestmark = pytest.mark.integration


def stderr_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_plan_apply_and_alter_as_the_settings_say(pipeline):
    s = pipeline.settings
    plan = pipeline.run("topics", "plan")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("create ") == 3 and "3 to apply" in plan.stdout
    assert (
        f"create {s.masked_topic}: partitions=6 replication.factor=1 min.insync.replicas=1 cleanup.policy=compact"
        in plan.stdout
    )

    applied = pipeline.run("topics", "apply", STREAMS_TOPIC_OVERRIDES='{"dlq": {"partitions": 2}}')
    assert applied.returncode == 0, applied.stderr
    found = topics.inspect(s, topics.specs(s), 10)
    assert [found[t].partitions for t in (s.raw_topic, s.masked_topic, s.dlq_topic)] == [6, 6, 2]
    assert found[s.masked_topic].config["cleanup.policy"] == "compact"

    # A changed retention is an alter that apply carries out; a partition count only a person changes.
    changed = pipeline.run("topics", "plan", STREAMS_RAW_RETENTION_MS="3600000")
    assert f"alter  {s.raw_topic}: retention.ms 604800000 -> 3600000" in changed.stdout, changed.stdout
    assert f"manual {s.dlq_topic}: 2 partitions, settings say 6" in changed.stdout
    assert pipeline.run("topics", "apply", STREAMS_RAW_RETENTION_MS="3600000").returncode == 0
    after = topics.inspect(s, topics.specs(s), 10)[s.raw_topic]
    assert after is not None and after.config is not None and after.config["retention.ms"] == "3600000"


def test_a_replication_factor_below_the_setting_is_refused_in_one_line(pipeline):
    s = pipeline.settings
    assert pipeline.run("topics", "apply").returncode == 0  # replication factor 1 (one broker)
    assert pipeline.run("keys", "init").returncode == 0  # no dev-key warning in stderr
    for command in ("bridge", "worker"):
        result = pipeline.run(command, STREAMS_TOPIC_REPLICATION_FACTOR="3", STREAMS_LOG_LEVEL="WARNING", timeout=90)
        assert result.returncode == 2, result.stdout + result.stderr
        line = stderr_line(result)
        assert "replication factor 1, below STREAMS_TOPIC_REPLICATION_FACTOR=3" in line, line
        assert "STREAMS_ACCEPT_LOW_REPLICATION=1" in line

    # The operator's flag accepts it (with a warning); the plan shows what to fix by hand.
    accepted = s.model_copy(
        update={"topic_replication_factor": 3, "topic_min_insync_replicas": 2, "accept_low_replication": True}
    )
    topics.require(accepted)
    refused = accepted.model_copy(update={"accept_low_replication": False})
    with pytest.raises(ConfigError, match="replication factor 1, below"):
        topics.require(refused)
    plan = pipeline.run("topics", "plan", STREAMS_TOPIC_REPLICATION_FACTOR="3", STREAMS_TOPIC_MIN_INSYNC_REPLICAS="2")
    assert plan.stdout.count("manual") == 3 and "replication factor 1 is below 3" in plan.stdout, plan.stdout


def test_min_insync_replicas_above_the_replication_factor_is_a_setting_error(pipeline):
    result = pipeline.run("topics", "plan", STREAMS_TOPIC_MIN_INSYNC_REPLICAS="2")
    assert result.returncode == 2
    assert "STREAMS_TOPIC_MIN_INSYNC_REPLICAS" in stderr_line(result)
