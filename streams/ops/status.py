"""``streams status``: where each stage stands, what it has written, what it refused.

Read-only: it joins no group and commits nothing, so it is safe beside running workers.
``--web`` serves the same as the status page (streams/ops/status_page.py) for the whole
deployment, with the processes' ``/metrics`` when their addresses are given.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from streams.errors import Refused
from streams.io.kafka import group_lag
from streams.metrics import SeenDeadLetter
from streams.ops import status_page
from streams.ops.state import current_queue_depth, dead_letters, row_count
from streams.ops.topology import STAGES, stage_group, stage_topic
from streams.settings import Settings


@dataclass
class Snapshot:
    partitions: dict[str, list[tuple[int, int, int]]]  # stage -> (partition, committed, end)
    rows: int | None
    dead_letters: dict[str, int]
    queue_depth: int | None
    # Every dead letter in the DLQ topic as the page lists it (no payload, no detail); None: unreadable.
    letters: list[SeenDeadLetter] | None = field(default=None, repr=False)

    @property
    def lag(self) -> int:
        return sum(max(end - committed, 0) for parts in self.partitions.values() for _, committed, end in parts)


def _safe(fn):
    try:
        return fn()
    except Exception:  # a service that is down shows as "?", the rest still reports
        return None


def snapshot(settings: Settings) -> Snapshot:
    topics = {stage: stage_topic(settings, stage) for stage in STAGES}
    offsets = group_lag(settings, list(topics.values()))
    partitions = {
        stage: sorted((p, committed, end) for (t, p), (committed, end) in offsets.items() if t == topic)
        for stage, topic in topics.items()
    }
    letters = _safe(lambda: [_seen(d) for d in dead_letters(settings)])
    return Snapshot(
        partitions=partitions,
        rows=_safe(lambda: asyncio.run(row_count(settings))),
        dead_letters=dict(sorted(collections.Counter(d.reason for d in letters or []).items())),
        queue_depth=_safe(lambda: asyncio.run(current_queue_depth(settings))),
        letters=letters,
    )


def _seen(letter: dict) -> SeenDeadLetter:
    failed_at = letter["failed_at"]
    at = failed_at.timestamp() if isinstance(failed_at, datetime) else failed_at / 1000
    return SeenDeadLetter(at, letter["stage"], letter["reason"], letter["message_id"][:128])


def progress_bar(done: int, total: int, width: int = 30) -> str:
    """``[#####.....]  50%``; an empty backlog counts as done."""
    fraction = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}"


def render(settings: Settings, snap: Snapshot) -> str:
    lines = [f"app {settings.app_id}"]
    for stage, parts in snap.partitions.items():
        topic = stage_topic(settings, stage)
        lag = sum(max(e - c, 0) for _, c, e in parts)
        lines.append(f"stage {stage} ({topic}): lag {lag} (group {stage_group(settings, stage)})")
        lines.append("  partition  committed        end        lag")
        for p, committed, end in parts:
            lines.append(f"  {p:9d} {committed:10d} {end:10d} {max(end - committed, 0):10d}")
        if not parts:
            lines.append("  (topic does not exist yet)")
    rows = "?" if snap.rows is None else snap.rows
    depth = "?" if snap.queue_depth is None else snap.queue_depth
    lines.append(f"rows in user_logins: {rows}")
    dead = ", ".join(f"{reason} {n}" for reason, n in snap.dead_letters.items()) or "none"
    lines.append(f"dead letters: {sum(snap.dead_letters.values())} ({dead})")
    lines.append(f"queue {settings.sqs_queue}: ~{depth} messages")
    return "\n".join(lines)


def follow(settings: Settings, interval: float, until_idle: bool = False) -> None:
    """Redraw every ``interval`` seconds with a bar of the backlog drained since the start."""
    start_lag = None
    while True:
        snap = snapshot(settings)
        backlog = snap.lag + (snap.queue_depth or 0)
        start_lag = backlog if start_lag is None else max(start_lag, backlog)
        text = render(settings, snap)
        bar = progress_bar(start_lag - backlog, start_lag)
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")
        print(f"{text}\ndrained {bar}  backlog {backlog}", flush=True)
        if until_idle and backlog == 0:
            return
        time.sleep(interval)


# --- streams status --web ------------------------------------------------------


def metrics_url(text: str) -> str:
    """``http(s)://host:port[/path]`` of a process's ``/metrics`` (the path defaults to /metrics)."""
    url = urllib.parse.urlsplit(text)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None:
        raise Refused(f"--metrics {text!r}: give a process's metrics address, e.g. http://127.0.0.1:9400/metrics")
    return urllib.parse.urlunsplit(
        (url.scheme, url.netloc, url.path if url.path not in ("", "/") else "/metrics", "", "")
    )


@dataclass
class Process:
    """What one process's HTTP port said (``/metrics``, ``/healthz``, ``/readyz``)."""

    url: str
    totals: status_page.Totals | None
    checks: list[status_page.Check]


def _get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """Status and body; (0, why) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return 0, type(exc).__name__


def scrape(url: str) -> Process:
    from prometheus_client.parser import text_string_to_metric_families

    base = url.rsplit("/", 1)[0]
    where = urllib.parse.urlsplit(url).netloc
    checks = []
    for probe in ("healthz", "readyz"):
        status, body = _get(f"{base}/{probe}")
        detail = (
            body.strip().splitlines()[0][:120]
            if status and body.strip()
            else (f"no answer ({body})" if not status else "")
        )
        checks.append(status_page.Check(f"{where} /{probe}", status == 200, detail))
    status, body = _get(url)
    totals = None
    if status == 200:
        try:
            totals = status_page.totals_from(text_string_to_metric_families(body))
        except ValueError:  # not a Prometheus exposition
            status = -1
    checks.append(
        status_page.Check(f"{where} /metrics", totals is not None, "scraped" if totals else f"status {status}")
    )
    return Process(url, totals, checks)


def deployment_page(
    settings: Settings, urls: list[str], history: status_page.History, refresh: int = 10
) -> status_page.Page:
    """Sample the deployment once (Kafka, PostgreSQL, SQS, the DLQ topic, the processes) and
    add the chart counters to ``history``. Nothing here raises: a part that is down shows so."""
    try:
        snap: Snapshot | None = snapshot(settings)
        kafka_detail = "offsets read"
    except Exception as exc:
        snap, kafka_detail = None, f"did not answer ({type(exc).__name__})"
    processes = [scrape(url) for url in urls]
    checks = [status_page.Check(f"Kafka {settings.kafka_bootstrap}", snap is not None, kafka_detail)]
    if snap is not None:
        checks.append(_check("PostgreSQL", snap.rows, "rows counted"))
        checks.append(_check(f"SQS queue {settings.sqs_queue}", snap.queue_depth, "depth read"))
        checks.append(_check(f"DLQ topic {settings.dlq_topic}", snap.letters, "read"))
    for process in processes:
        checks += process.checks
    totals = None
    for process in processes:
        if process.totals is not None:
            totals = totals or status_page.Totals()
            totals.add(process.totals)
    letters = (snap.letters if snap else None) or []
    series = totals.series() if totals else {}
    series = {k: v for k, v in series.items() if not k.startswith("dead:")}
    for (_, reason), n in _by_stage_reason(letters).items():
        series[f"dead:{reason}"] = series.get(f"dead:{reason}", 0.0) + n
    history.add(series)
    lag = None
    facts = []
    if snap is not None:
        lag = [
            status_page.LagRow(stage, stage_topic(settings, stage), p, max(end - committed, 0), committed, end)
            for stage, parts in snap.partitions.items()
            for p, committed, end in parts
        ]
        facts = [
            ("consumer group", settings.app_id),
            ("rows in user_logins", "?" if snap.rows is None else f"{snap.rows:,}"),
            (f"messages in {settings.sqs_queue}", "?" if snap.queue_depth is None else f"~{snap.queue_depth:,}"),
            ("lag, all stages", f"{snap.lag:,}"),
        ]
    return status_page.Page(
        title=f"streams deployment · {settings.app_id}",
        checks=checks,
        totals=totals,
        lag=lag,
        dead_letters=_by_stage_reason(letters),
        dead_letters_source=f"in {settings.dlq_topic} (what `streams dlq list` counts)",
        recent=sorted(letters, key=lambda d: d.at, reverse=True)[:20],
        recent_source=f"the newest 20 in {settings.dlq_topic}; ids only, never a payload or detail",
        keys=[(j, k, urllib.parse.urlsplit(p.url).netloc) for p in processes if p.totals for j, k in p.totals.keys],
        history=history.samples(),
        facts=facts,
        refresh=refresh,
    )


def _check(name: str, value, ok_detail: str) -> status_page.Check:
    return status_page.Check(name, value is not None, ok_detail if value is not None else "did not answer")


def _by_stage_reason(letters: list[SeenDeadLetter]) -> dict[tuple[str, str], float]:
    return dict(collections.Counter((d.stage, d.reason) for d in letters))


def serve(settings: Settings, port: int, urls: list[str], interval: float, host: str = "127.0.0.1") -> None:
    """Serve the deployment's page on ``host:port`` until Ctrl-C, sampling every ``interval`` s.

    Sampling runs in its own thread, so a page load costs no Kafka or database call."""
    history = status_page.History(every=interval)
    latest = {"page": deployment_page(settings, urls, history)}
    stop = threading.Event()

    def sample_forever() -> None:
        while not stop.wait(interval):
            latest["page"] = deployment_page(settings, urls, history)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/":
                self._send(404, "text/plain", b"not found\n")
                return
            query = urllib.parse.parse_qs(url.query)
            page = latest["page"]
            refresh = query.get("refresh", [""])[0]
            if refresh.isdigit():
                page = dataclasses.replace(page, refresh=int(refresh))
            self._send(200, "text/html; charset=utf-8", status_page.render(page).encode("utf-8"))

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in status_page.HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # noqa: A002 (the stdlib's signature)
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise Refused(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port") from None
    sampler = threading.Thread(target=sample_forever, name="status-sampler", daemon=True)
    sampler.start()
    print(f"status page on http://{host}:{server.server_address[1]}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        stop.set()
        server.server_close()
