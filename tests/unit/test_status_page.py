"""The status page's pure parts: metrics to totals, the ring buffer, the charts' rates, the
HTML (escaped, self-contained), the dead-letter list, and ``status --web``'s arguments."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streams import metrics
from streams.errors import Refused
from streams.health import HealthServer
from streams.metrics import RecentDeadLetters, SeenDeadLetter
from streams.ops import status_page as sp
from streams.ops.status import metrics_url
from tests.unit.test_cli import one_line_error, streams


def _registry() -> CollectorRegistry:
    """Metrics shaped like a worker's, with known values."""
    r = CollectorRegistry()
    records_in = Counter("streams_records_in", "", ["stage"], registry=r)
    records_out = Counter("streams_records_out", "", ["stage", "outcome"], registry=r)
    dead = Counter("streams_dead_letters", "", ["stage", "reason"], registry=r)
    lag = Gauge("streams_consumer_lag", "", ["stage", "topic", "partition"], registry=r)
    keys = Gauge("streams_key_in_use", "", ["join_version", "encryption_key_id"], registry=r)
    records_in.labels("mask").inc(100)
    records_in.labels("sink").inc(99)
    records_out.labels("mask", "masked").inc(99)
    records_out.labels("mask", "dead_letter").inc(1)
    records_out.labels("sink", "row").inc(99)
    dead.labels("mask", "missing_field").inc()
    lag.labels("mask", "logins.raw", "0").set(3)
    lag.labels("mask", "logins.raw", "1").set(0)
    keys.labels("h1", "k2").set(1)
    keys.labels("h1", "k1").set(0)
    return r


def test_totals_are_the_same_from_a_registry_and_from_its_exposition():
    r = _registry()
    direct = sp.totals_from(r.collect())
    parsed = sp.totals_from(text_string_to_metric_families(generate_latest(r).decode()))
    for t in (direct, parsed):
        assert t.records_in == {"mask": 100, "sink": 99}
        assert t.records_out == {("mask", "masked"): 99, ("mask", "dead_letter"): 1, ("sink", "row"): 99}
        assert t.dead_letters == {("mask", "missing_field"): 1}
        assert t.lag == {("mask", "logins.raw", 0): 3, ("mask", "logins.raw", 1): 0}
        assert t.keys == {("h1", "k2")}  # a gauge at 0 is a key no longer in use
        assert t.stages() == ["mask", "sink"]
        assert t.series() == {"in:mask": 100, "out:mask": 100, "in:sink": 99, "out:sink": 99, "dead:missing_field": 1}


def test_totals_of_two_processes_add_up():
    bridge = sp.Totals(sqs={"received": 10}, records_out={("bridge", "bridged"): 10})
    worker = sp.totals_from(_registry().collect())
    both = sp.Totals()
    both.add(bridge)
    both.add(worker)
    both.add(worker)
    assert both.stages() == ["bridge", "mask", "sink"]
    assert both.stage_in("bridge") == 10 and both.stage_in("mask") == 200
    assert both.stage_out("mask") == 200 and both.keys == {("h1", "k2")}


def test_history_keeps_only_its_span():
    h = sp.History(every=5, span=20)
    for i in range(10):
        h.add({"in:mask": i}, at=float(i))
    assert [t for t, _ in h.samples()] == [6.0, 7.0, 8.0, 9.0]


def test_rates_per_interval_survive_a_restarted_counter():
    history = [(0.0, {"x": 0.0}), (10.0, {"x": 50.0}), (20.0, {"x": 50.0}), (30.0, {"x": 20.0}), (40.0, {})]
    assert sp.rates(history, "x") == [(10.0, 5.0), (20.0, 0.0), (30.0, 2.0), (40.0, 0.0)]
    assert sp.rates(history, "x", per=60) == [(10.0, 300.0), (20.0, 0.0), (30.0, 120.0), (40.0, 0.0)]


def test_recent_dead_letters_are_bounded_newest_first_and_ids_only():
    recent = RecentDeadLetters(size=3)
    for i in range(5):
        recent.add("mask", "missing_field", f"id-{i}".encode())
    recent.add("sink", "rejected_by_database", "x" * 500)
    seen = recent.newest_first()
    assert [d.message_id for d in seen] == ["x" * 128, "id-4", "id-3"]
    assert seen[0].stage == "sink" and seen[1].reason == "missing_field"


def test_count_dead_letter_counts_and_lists():
    before = metrics.DEAD_LETTERS.labels("mask", "test_reason")._value.get()
    metrics.count_dead_letter("mask", "test_reason", b"m-1")
    assert metrics.DEAD_LETTERS.labels("mask", "test_reason")._value.get() == before + 1
    assert metrics.RECENT_DEAD_LETTERS.newest_first()[0][1:] == ("mask", "test_reason", "m-1")


def _page(**overrides) -> sp.Page:
    totals = sp.totals_from(_registry().collect())
    history = [
        (float(t), {"in:mask": t * 10.0, "out:mask": t * 9.0, "dead:missing_field": t // 20}) for t in range(0, 100, 5)
    ]
    fields = dict(
        recent=[SeenDeadLetter(1_700_000_000, "mask", "missing_field", "5d1c0d3a-id")],
        history=history,
    )
    fields.update(overrides)
    return sp.process_page("a worker", None, "no partitions assigned", totals, **fields)


def test_page_shows_every_section_with_its_numbers():
    html = sp.render(_page())
    for section in ("health", "lag", "throughput", "dead-letters", "recent-dead-letters", "keys"):
        assert f'<section id="{section}">' in html
    assert re.search(r'data-in="mask">100<', html) and re.search(r'data-out="mask:masked">99<', html)
    assert re.search(r'data-dead="mask:missing_field">1<', html)
    assert re.search(r'data-lag="mask:0">3<', html) and re.search(r'data-lag-total="mask">3<', html)
    assert "<td data-key-id>k2</td>" in html and ">k1<" not in html
    assert "5d1c0d3a-id" in html and "2023-11-14 22:13:20" in html
    assert re.search(r'data-check="readiness \(/readyz\)">failing<', html) and "no partitions assigned" in html
    assert html.count("<polyline") == 2 + 2 + 1  # in and out of mask and of sink (no history: flat), one reason
    assert '<meta http-equiv="refresh" content="10">' in html


def test_page_is_self_contained():
    html = sp.render(_page())
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(|src=|https?://", html, re.I)
    assert sp.HEADERS["Content-Security-Policy"].startswith("default-src 'none'")


def test_page_escapes_what_it_shows():
    hostile = '<script>alert("x")</script>'
    page = _page(recent=[SeenDeadLetter(0, "mask", hostile, hostile)], refresh=0)
    page.checks.append(sp.Check(hostile, False, hostile))
    html = sp.render(page)
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "http-equiv" not in html  # refresh=0: no reload


def test_times_on_the_page_are_utc_and_short_on_the_same_day():
    page = _page(recent=[SeenDeadLetter(1_700_000_000, "mask", "r", "id")], generated_at=1_700_003_600)
    html = sp.render(page)
    assert "at 2023-11-14 23:13:20 UTC" in html and "<td>22:13:20</td>" in html
    page = _page(up_for=3 * 3600)
    assert re.search(r'data-fact="up for">3 h<', sp.render(page))


def test_a_chart_waits_for_two_samples():
    html = sp.render(_page(history=[]))
    assert "collecting samples" in html and "<polyline" not in html


def test_deployment_page_without_processes_says_how_to_add_them():
    page = sp.Page(
        title="deployment",
        checks=[sp.Check("Kafka", False, "did not answer")],
        totals=None,
        lag=None,
        dead_letters={},
        dead_letters_source="in logins.dlq",
        recent=[],
        recent_source="",
        keys=[],
        history=[],
    )
    html = sp.render(page)
    assert "--metrics URL" in html and "Kafka did not answer" in html and 'data-check="Kafka">failing<' in html


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://127.0.0.1:9400", "http://127.0.0.1:9400/metrics"),
        ("http://worker-0:9400/", "http://worker-0:9400/metrics"),
        ("https://w:443/x/metrics", "https://w:443/x/metrics"),
    ],
)
def test_metrics_url(given, expected):
    assert metrics_url(given) == expected


@pytest.mark.parametrize("bad", ["worker:9400", "ftp://w:1/metrics", "http://w/metrics", "http://w:99999/"])
def test_bad_metrics_url_is_refused(bad):
    with pytest.raises(Refused, match="--metrics"):
        metrics_url(bad)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--web", "--port", "http"], "--port"),
        (["--web", "--port", "0"], "--port"),
        (["--web", "--metrics", "worker:9400"], "--metrics"),
        (["--web", "--follow"], "--follow"),
        (["--web", "--interval", "0"], "--interval"),
        (["--metrics", "http://w:1/metrics"], "--web"),
    ],
)
def test_bad_status_web_args_are_one_line(args, expected):
    assert expected in one_line_error(streams("status", *args))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, dict, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


async def test_a_process_serves_its_page_from_its_own_metrics():
    port = _free_port()
    server = HealthServer(port, lambda: None, host="127.0.0.1", title="unit process", sample_every=0.05)
    metrics.count_dead_letter("mask", "unit_reason", b"unit-message-id")
    await server.start()
    try:
        for _ in range(100):  # the sampler's first samples
            if len(server.history.samples()) >= 2:
                break
            await asyncio.sleep(0.05)
        status, headers, html = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/?refresh=0")
    finally:
        await server.stop()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == sp.HEADERS["Content-Security-Policy"]
    assert "<h1>unit process</h1>" in html and "unit-message-id" in html
    assert re.search(r'data-dead="mask:unit_reason">\d+<', html)
    assert 'data-check="readiness (/readyz)">ok<' in html and "http-equiv" not in html
    assert "dead letters per minute" in html and "<polyline" in html
