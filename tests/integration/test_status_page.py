"""The status page in a real browser (Debian's headless Chromium): a process's ``/`` and
``streams status --web``, after a real pipeline drained known logins (issue 17 item 4).

Numbers on the page are compared with what the page's sources say at the same moment,
after the pipeline drained (so counters are still): the processes' ``/metrics``, Kafka's
offsets, the table and the DLQ topic. The seeded ip and device_id values never reach the DOM.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.io.kafka import group_lag
from streams.ops import status_page
from tests.helpers import isolated_pipeline
from tests.integration.test_health import free_port, get

pytestmark = [pytest.mark.integration, pytest.mark.chromium]

SEEDED = [
    {
        "user_id": f"status-user-{i}",
        "app_version": "2.3.0",
        "device_type": "android",
        "ip": f"198.51.100.{i}",
        "locale": "RU",
        "device_id": f"seeded-device-{i:03d}-7f3a",
    }
    for i in range(1, 31)
]
# Dead letters whose payloads hold seeded values: the page must show their ids, never those values.
BAD = [
    {"user_id": "status-user-99", "app_version": "1.0", "device_type": "ios", "ip": "198.51.100.250", "locale": None},
    '{"ip": "198.51.100.251", "device_id": "seeded-device-251-7f3a", ',
]
SECRETS = (
    [r["ip"] for r in SEEDED]
    + [r["device_id"] for r in SEEDED]
    + ["198.51.100.250", "198.51.100.251", "seeded-device-251-7f3a"]
)
SECTIONS = {"health", "lag", "throughput", "dead-letters", "recent-dead-letters", "keys"}


# Debian's chromium here and in .ci/run; STREAMS_CHROMIUM names another build (e.g. the
# google-chrome of GitHub's runners, the fallback), which takes the same switches.
BROWSERS = [b for b in (os.environ.get("STREAMS_CHROMIUM"), "chromium", "google-chrome") if b]


def chromium_dom(url: str, profile: Path) -> str:
    """The DOM after load, from headless Chromium; no network but the page itself."""
    binary = next(filter(None, map(shutil.which, BROWSERS)), None)
    if binary is None:
        pytest.fail("Debian's chromium is needed for the status page tests: apt-get install chromium (.ci/run does)")
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=2000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "</html>" in result.stdout, result.stderr[-2000:]
    return result.stdout


class Dom(HTMLParser):
    """Sections by id, and the text of every element carrying a ``data-*`` attribute."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections: set[str] = set()
        self.data: dict[str, list[str]] = collections.defaultdict(list)  # 'data-in=mask' -> [text, ...]
        self.polylines = 0
        self._open: list[tuple[str, str]] = []
        self.text = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and attrs.get("id"):
            self.sections.add(attrs["id"])
        if tag == "polyline":
            self.polylines += 1
        keys = [f"{k}={v or ''}" for k, v in attrs.items() if k.startswith("data-")]
        self._open.append((tag, keys[0] if keys else ""))

    def handle_endtag(self, tag):
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break

    def handle_data(self, data):
        self.text.append(data)
        if self._open and self._open[-1][1]:
            self.data[self._open[-1][1]].append(data.strip())

    def value(self, key: str) -> str:
        texts = self.data.get(key)
        assert texts, f"{key} not on the page"
        return "".join(texts)

    def number(self, key: str) -> float:
        return float(self.value(key).replace(",", ""))


def scrape(port: int) -> status_page.Totals:
    status, text = get(port, "/metrics")
    assert status == 200, text
    return status_page.totals_from(text_string_to_metric_families(text))


@pytest.fixture(scope="module")
def drained(stack_settings, tmp_path_factory):
    """One pipeline (bridge and worker with their HTTP ports) that drained the seeded logins."""
    p = isolated_pipeline(stack_settings, tmp_path_factory.mktemp("status-page"))
    ids = p.send([*SEEDED, *BAD])
    ports = {"bridge": free_port(), "worker": free_port()}
    p.start("bridge", STREAMS_METRICS_PORT=str(ports["bridge"]))
    p.start("worker", STREAMS_METRICS_PORT=str(ports["worker"]), STREAMS_LAG_INTERVAL="1")
    s = p.settings
    try:
        p.wait_for(lambda: p.row_count() == len(SEEDED), 120, "the seeded rows")
        p.wait_for(lambda: p.lag([s.raw_topic, s.masked_topic]) == 0, 60, "committed offsets")
        p.wait_for(lambda: len(p.dead_letters()) == len(BAD), 60, "the dead letters")

        def settled() -> bool:
            w, b = scrape(ports["worker"]), scrape(ports["bridge"])
            return (
                w.records_out.get(("sink", "row")) == len(SEEDED)
                and bool(w.lag)
                and sum(w.lag.values()) == 0
                and b.sqs.get("deleted") == len(SEEDED) + len(BAD)
            )

        p.wait_for(settled, 60, "the processes' counters and lag gauges to settle")
        yield p, ports, dict(zip(ids[len(SEEDED) :], ("missing_field", "invalid_json"), strict=True))
    finally:
        p.stop_all()


def assert_no_seeded_values(dom: str) -> None:
    leaked = [value for value in SECRETS if value in dom]
    assert not leaked, f"seeded values on the page: {leaked}"


def test_each_process_page_matches_its_metrics(drained, tmp_path):
    p, ports, bad_ids = drained
    s = p.settings

    dom = chromium_dom(f"http://127.0.0.1:{ports['worker']}/?refresh=0", tmp_path / "w")
    w = scrape(ports["worker"])  # drained: the counters no longer move
    page = Dom(dom)
    assert page.sections == SECTIONS
    assert w.records_in == {"mask": len(SEEDED) + len(BAD), "sink": len(SEEDED)}
    for stage in ("mask", "sink"):
        assert page.number(f"data-in={stage}") == w.records_in[stage]
        assert page.number(f"data-out-total={stage}") == w.stage_out(stage)
    for (stage, outcome), n in w.records_out.items():
        assert page.number(f"data-out={stage}:{outcome}") == n
    assert w.dead_letters == {("mask", "missing_field"): 1, ("mask", "invalid_json"): 1}
    for (stage, reason), n in w.dead_letters.items():
        assert page.number(f"data-dead={stage}:{reason}") == n
    assert page.number("data-dead-total=") == 2
    for (stage, _, partition), lag in w.lag.items():
        assert page.number(f"data-lag={stage}:{partition}") == lag == 0
    assert {t for _, t, _ in w.lag} == {s.raw_topic, s.masked_topic}
    assert len(w.keys) == 1
    (join_version, key_id) = next(iter(w.keys))
    assert page.value("data-join-version=") == join_version and page.value("data-key-id=") == key_id
    assert page.value("data-check=liveness (/healthz)") == "ok"
    assert page.value("data-check=readiness (/readyz)") == "ok"
    text = "".join(page.text)
    for message_id, reason in bad_ids.items():  # the last dead letters: id and reason
        assert message_id in text and reason in text
    assert page.polylines >= 3  # mask and sink in/out lines, the dead-letter reasons
    assert_no_seeded_values(dom)

    dom = chromium_dom(f"http://127.0.0.1:{ports['bridge']}/?refresh=0", tmp_path / "b")
    b = scrape(ports["bridge"])
    page = Dom(dom)
    assert page.sections == SECTIONS
    assert page.number("data-in=bridge") == b.sqs["received"] == len(SEEDED) + len(BAD)
    assert page.number("data-out=bridge:bridged") == b.records_out[("bridge", "bridged")]
    assert page.number("data-fact=SQS messages deleted") == b.sqs["deleted"]
    assert page.number("data-dead-total=") == 0 and not b.keys
    assert_no_seeded_values(dom)


def test_status_web_shows_the_deployment(drained, tmp_path):
    p, ports, bad_ids = drained
    s = p.settings
    port = free_port()
    web = p.start(
        "status",
        "--web",
        "--port",
        str(port),
        "--interval",
        "0.5",
        "--metrics",
        f"http://127.0.0.1:{ports['bridge']}/metrics",
        "--metrics",
        f"http://127.0.0.1:{ports['worker']}",
    )
    p.wait_for(lambda: get(port, "/?refresh=0")[0] == 200, 60, "the status page to answer")
    p.wait_for(lambda: get(port, "/?refresh=0")[1].count("<polyline") >= 3, 60, "two samples for the charts")

    dom = chromium_dom(f"http://127.0.0.1:{port}/?refresh=0", tmp_path / "d")
    page = Dom(dom)
    assert page.sections == SECTIONS
    # Kafka's offsets, per stage and partition, as `streams status` reads them.
    for stage, topic in (("mask", s.raw_topic), ("sink", s.masked_topic)):
        offsets = group_lag(s, [topic])
        assert len(offsets) == s.topic_partitions
        for (_, partition), (committed, end) in offsets.items():
            assert page.number(f"data-lag={stage}:{partition}") == end - committed == 0
        assert page.number(f"data-lag-total={stage}") == 0
    assert page.number("data-fact=rows in user_logins") == p.row_count() == len(SEEDED)
    # Dead letters as the DLQ topic holds them, the newest listed by id.
    dlq = collections.Counter((d["stage"], d["reason"]) for d in p.dead_letters())
    for (stage, reason), n in dlq.items():
        assert page.number(f"data-dead={stage}:{reason}") == n
    text = "".join(page.text)
    assert all(message_id in text for message_id in bad_ids)
    # The processes' /metrics, summed.
    both = status_page.Totals()
    both.add(scrape(ports["bridge"]))
    both.add(scrape(ports["worker"]))
    for stage in ("bridge", "mask", "sink"):
        assert page.number(f"data-in={stage}") == both.stage_in(stage)
        assert page.number(f"data-out-total={stage}") == both.stage_out(stage)
    (join_version, key_id) = next(iter(both.keys))
    assert page.value("data-key-id=") == key_id
    checks = {k.removeprefix("data-check="): v for k, v in page.data.items() if k.startswith("data-check=")}
    assert len(checks) == 4 + 3 * 2 and set(map("".join, checks.values())) == {"ok"}, checks
    assert_no_seeded_values(dom)
    p.stop(web)


def test_status_web_with_a_process_down_still_renders(drained, tmp_path):
    p, ports, _ = drained
    port, dead_port = free_port(), free_port()
    web = p.start("status", "--web", "--port", str(port), "--metrics", f"http://127.0.0.1:{dead_port}/metrics")
    p.wait_for(lambda: get(port, "/?refresh=0")[0] == 200, 60, "the status page to answer")
    page = Dom(chromium_dom(f"http://127.0.0.1:{port}/?refresh=0", tmp_path / "x"))
    assert page.value(f"data-check=127.0.0.1:{dead_port} /metrics") == "failing"
    assert page.value(f"data-check=127.0.0.1:{dead_port} /readyz") == "failing"
    assert page.value(f"data-check=Kafka {p.settings.kafka_bootstrap}") == "ok"
    assert page.number("data-fact=rows in user_logins") == len(SEEDED)
    p.stop(web)
