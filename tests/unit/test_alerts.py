"""deploy/prometheus/alerts.yml: valid rules, unit-tested, on metrics the processes really serve.

promtool (Debian's prometheus package, fetched and cached by streams_dev.tools) checks the
rule file, runs the rule unit tests in alerts.test.yml, and lints the /metrics exposition
of a real HealthServer. Each check is also shown to reject a broken input.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from streams.health import HealthServer
from streams.retry import Backoff
from streams_dev import tools
from tests.integration.test_health import free_port, get

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yml"
DOCS = REPO / "docs" / "deployment.md"

# Series the rules read from other exporters (kube-state-metrics), not from our processes.
EXTERNAL = {"kube_pod_container_status_restarts_total"}


@pytest.fixture(scope="module")
def promtool() -> Path:
    return tools.promtool()


def run(*argv: object, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, text=True, timeout=120)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_rules_pass_promtool_check(promtool):
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_check_rejects_a_broken_rule(promtool, tmp_path):
    broken = yaml.safe_load(RULES.read_text())
    broken["groups"][0]["rules"][0]["expr"] = "sum by (stage) (streams_consumer_lag > "
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(broken))
    assert run(promtool, "check", "rules", tmp_path / "alerts.yml").returncode != 0


def test_rule_unit_tests_pass(promtool):
    result = run(promtool, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_catch_the_documented_naive_lag_sum(promtool, tmp_path):
    """Summing every worker's copy of the group lag (the old prose rule) fails the tests."""
    naive = RULES.read_text().replace(
        "sum by (stage) (max by (stage, topic, partition) (streams_consumer_lag)) > 50000",
        "sum by (stage) (streams_consumer_lag) > 50000",
    )
    assert naive != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(naive)
    (tmp_path / "alerts.test.yml").write_text(RULE_TESTS.read_text())
    result = run(promtool, "test", "rules", tmp_path / "alerts.test.yml")
    assert result.returncode != 0 and "StreamsBacklogGrowing" in result.stdout + result.stderr


def test_every_alert_is_documented_and_every_documented_alert_exists():
    section = DOCS.read_text().split("## What to alert on", 1)[1].split("\n## ", 1)[0]
    assert "deploy/prometheus/alerts.yml" in section
    documented = set(re.findall(r"`(Streams[A-Za-z]+)`", section))
    assert documented == {rule["alert"] for rule in rules()}


def test_every_rule_has_a_severity_and_a_summary():
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition can carry, also for families with no sample yet."""
    names = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
        names |= {sample.name for sample in family.samples}
    return names


async def served_metrics() -> str:
    """/metrics of a real HealthServer, after a real retry (the dependency alert's series)."""
    backoff = Backoff(cap=0.01, operation="database write", first=0.001)
    await backoff.wait()
    port = free_port()
    server = HealthServer(port, lambda: None, host="127.0.0.1")
    await server.start()
    try:
        status, text = await asyncio.to_thread(get, port, "/metrics")
    finally:
        await server.stop()
    assert status == 200, text
    return text


async def test_served_metrics_pass_promtool_check_metrics(promtool):
    text = await served_metrics()
    assert 'streams_last_retry_timestamp_seconds{operation="database write"}' in text
    result = run(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_metrics_rejects_a_badly_named_counter(promtool):
    bad = "# HELP streams_things Things\n# TYPE streams_things counter\nstreams_things 1\n"
    result = run(promtool, "check", "metrics", stdin=bad)
    assert result.returncode != 0 and "streams_things" in result.stdout + result.stderr


async def test_rules_read_only_metrics_the_processes_serve():
    served = exposed_names(await served_metrics())
    for rule in rules():
        names = set(re.findall(r"\b(?:streams|kube)_[a-z_]+", rule["expr"]))
        assert names, rule["alert"]
        missing = names - EXTERNAL - served
        assert not missing, f"{rule['alert']} reads {sorted(missing)}, which /metrics does not serve"
