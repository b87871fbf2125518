"""Metrics and liveness during real runs (issue 11 items 6 and 7)."""

from __future__ import annotations

import json
import re

import pytest

from streams_dev import stack
from tests.factories import LOGIN
from tests.integration.test_health import free_port, get

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on ``/metrics``."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for key, v in samples.items():
        metric, _, rest = key.partition("{")
        if metric == name and ",".join(sorted(rest.rstrip("}").split(","))) == wanted:
            return v
    return 0.0


def test_metrics_match_what_happened(pipeline, sample_path):
    p = pipeline
    sample = json.loads(sample_path.read_text())
    p.send(sample)
    bridge_port, worker_port = free_port(), free_port()
    p.start("bridge", STREAMS_METRICS_PORT=str(bridge_port))
    p.start("worker", STREAMS_METRICS_PORT=str(worker_port), STREAMS_LAG_INTERVAL="1")
    p.wait_for(lambda: p.row_count() == 99, 120, "99 rows")
    s = p.settings
    p.wait_for(lambda: p.lag([s.raw_topic, s.masked_topic]) == 0, 60, "committed offsets")

    def settled():
        w = scrape(worker_port)
        lag = sum(v for k, v in w.items() if k.startswith("streams_consumer_lag{"))
        return (
            w
            if value(w, "streams_records_out_total", stage="sink", outcome="row") == 99
            and lag == 0
            and any(k.startswith("streams_consumer_lag{") for k in w)
            else None
        )

    w = p.wait_for(settled, 60, "the worker's counters and lag gauges to settle")
    assert value(w, "streams_records_in_total", stage="mask") == 100
    assert value(w, "streams_records_out_total", stage="mask", outcome="masked") == 99
    assert value(w, "streams_dead_letters_total", stage="mask", reason="missing_field") == 1
    assert value(w, "streams_end_to_end_seconds_count") == 99
    assert value(w, "streams_batch_size_count", stage="sink") >= 1
    assert any(k.startswith("streams_key_in_use{") and v == 1 for k, v in w.items())

    b = p.wait_for(
        lambda: (m := scrape(bridge_port)) and value(m, "streams_sqs_messages_total", event="deleted") == 100 and m,
        60,
        "the bridge's counters",
    )
    assert value(b, "streams_sqs_messages_total", event="received") == 100
    assert value(b, "streams_records_out_total", stage="bridge", outcome="bridged") == 100

    text = get(worker_port, "/metrics")[1] + get(bridge_port, "/metrics")[1]
    for record in sample:
        for field in ("ip", "device_id", "user_id"):
            if field in record:
                assert str(record[field]) not in text
    assert not re.search(r"message_id|[0-9a-f]{8}-[0-9a-f]{4}-", text)


def test_healthz_fails_when_an_agent_hangs(pipeline):
    p = pipeline
    port = free_port()
    p.send([LOGIN])
    p.start("bridge")
    p.start("worker", STREAMS_METRICS_PORT=str(port), STREAMS_STUCK_AFTER="2", STREAMS_FAULT="sink_before_commit:hang")
    p.wait_for(lambda: get(port, "/healthz")[0] == 503, 120, "/healthz to report the hung sink")
    assert "stuck" in get(port, "/healthz")[1]


def test_waiting_out_a_database_outage_is_not_stuck(fault_pipeline, private_stack):
    p = fault_pipeline
    port = free_port()
    p.start("bridge")
    p.start("worker", STREAMS_METRICS_PORT=str(port), STREAMS_STUCK_AFTER="2", STREAMS_RETRY_MAX_BACKOFF="0.5")
    login = LOGIN
    p.send([login])
    p.wait_for(lambda: p.row_count() == 1, 120, "the first row")
    stack.stop_service(private_stack, "postgres")
    try:
        p.send([login])
        healthz = []

        def retried_long_enough():
            healthz.append(get(port, "/healthz")[0])
            return value(scrape(port), "streams_retries_total", operation="database write") >= 12  # > 2 s of retries

        p.wait_for(retried_long_enough, 120, "the sink to retry the write for longer than STREAMS_STUCK_AFTER")
        assert set(healthz) == {200}
    finally:
        stack.start_service(private_stack, "postgres")
    p.wait_for(lambda: p.row_count() == 2, 120, "the row after the outage")
