"""A real Prometheus fires and resolves the dependency alert against a real worker.

Prometheus (Debian's package, fetched and cached by streams_dev.tools; no JVM) is started
by this test only. It scrapes the worker every second and evaluates
deploy/prometheus/alerts.yml with nothing changed but the ``for:`` durations. The
PostgreSQL stopped is the private stack's (conftest_faults), never the shared one.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from streams_dev import stack, tools
from tests.helpers import wait_for
from tests.integration.test_faults import drained, logins
from tests.integration.test_health import free_port, get

pytestmark = [pytest.mark.integration, pytest.mark.prometheus]

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
SHORT_FOR = "3s"
DEADLINE = 60.0  # seconds for the alert to fire, and again to resolve
ALERT = {"alertname": "StreamsDependencyDown", "operation": "database write"}


def rules_with_short_for(dest: Path) -> Path:
    """A copy of the rules where only ``for:`` changes, so the test does not wait minutes."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


@contextlib.contextmanager
def prometheus(workdir: Path, target_port: int) -> Iterator[int]:
    """Prometheus on a free loopback port, scraping ``target_port`` every second; yields its port."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules_with_short_for(workdir / "alerts.yml"))],
                "scrape_configs": [
                    {"job_name": "streams-worker", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
                ],
            }
        )
    )
    argv = [
        str(tools.prometheus()),
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                tail = (workdir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{tail}")
            return get(port, "/-/ready")[0] == 200

        wait_for(ready, 30, "Prometheus to be ready")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def api(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def target_up(port: int) -> bool:
    targets = api(port, "/api/v1/targets")["activeTargets"]
    return bool(targets) and all(t["health"] == "up" for t in targets)


def alert_state(port: int) -> str:
    """``firing``, ``pending`` or ``inactive`` (Prometheus lists only the first two)."""
    for alert in api(port, "/api/v1/alerts")["alerts"]:
        if all(alert["labels"].get(k) == v for k, v in ALERT.items()):
            return alert["state"]
    return "inactive"


def test_postgres_down_fires_the_dependency_alert_and_its_return_resolves_it(
    fault_pipeline, private_stack, tmp_path, record_property
):
    p = fault_pipeline
    metrics_port = free_port()
    p.start("bridge")
    worker = p.start("worker", STREAMS_METRICS_PORT=str(metrics_port))
    first = p.send(logins(20, "a"))
    p.wait_for(lambda: p.row_count() == 20, 120, "the first 20 rows")

    with prometheus(tmp_path, metrics_port) as prom:
        p.wait_for(lambda: target_up(prom), 60, "Prometheus to scrape the worker")
        assert alert_state(prom) == "inactive"

        stack.stop_service(private_stack, "postgres")
        stopped = time.monotonic()
        second = p.send(logins(50, "b"))  # work the sink cannot write: it retries
        p.wait_for(lambda: alert_state(prom) == "firing", DEADLINE, f"{ALERT} to fire")
        fired = time.monotonic() - stopped

        stack.start_service(private_stack, "postgres")
        restarted = time.monotonic()
        p.wait_for(lambda: alert_state(prom) == "inactive", DEADLINE, f"{ALERT} to resolve")
        resolved = time.monotonic() - restarted

    record_property("fired_after_s", round(fired, 1))
    record_property("resolved_after_s", round(resolved, 1))
    print(f"alert fired {fired:.1f} s after PostgreSQL stopped, resolved {resolved:.1f} s after it restarted")
    drained(p, set(first) | set(second))
    assert worker.poll() is None
    assert not p.dead_letters()

    # The exposition of a worker that ran, retried and recovered is what promtool lints.
    status, text = get(metrics_port, "/metrics")
    assert status == 200 and 'operation="database write"' in text
    lint = subprocess.run([str(tools.promtool()), "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
