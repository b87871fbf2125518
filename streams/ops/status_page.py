"""The status page: one self-contained HTML document (inline CSS and SVG, no script, no
external asset), so it works offline and behind any proxy.

Two servers render it: every process's HTTP port (``/`` next to ``/metrics``, from its own
metrics, see streams/health.py) and ``streams status --web`` (the whole deployment: Kafka
offsets, the table, the DLQ topic and the processes' ``/metrics``, see
streams/ops/status.py). Both build a ``Page`` and call ``render``. Everything shown is a
count, an offset, a reason code, a key id or a message id: never a field value.

Pure: no I/O, nothing imported from the pipeline, Kafka or PostgreSQL.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape

from streams.metrics import SeenDeadLetter

# A sample of the counters the charts draw: (epoch seconds, {series: cumulative value}).
Sample = tuple[float, dict[str, float]]


@dataclass(frozen=True)
class Check:
    """One line of the health table; ``ok`` None = unknown (not reported)."""

    name: str
    ok: bool | None
    detail: str


@dataclass(frozen=True)
class LagRow:
    stage: str
    topic: str
    partition: int
    lag: int
    committed: int | None = None  # known from Kafka (``streams status --web``), not from a gauge
    end: int | None = None


@dataclass
class Totals:
    """What one or more processes' metrics say, summed (counters since each process started)."""

    records_in: dict[str, float] = field(default_factory=dict)  # stage ->
    records_out: dict[tuple[str, str], float] = field(default_factory=dict)  # (stage, outcome) ->
    dead_letters: dict[tuple[str, str], float] = field(default_factory=dict)  # (stage, reason) ->
    sqs: dict[str, float] = field(default_factory=dict)  # event (received, deleted) ->
    retries: dict[str, float] = field(default_factory=dict)  # operation ->
    keys: set[tuple[str, str]] = field(default_factory=set)  # (join_version, encryption_key_id) in use
    lag: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (stage, topic, partition) ->

    def add(self, other: Totals) -> None:
        tables: tuple[tuple[dict, dict], ...] = (
            (self.records_in, other.records_in),
            (self.records_out, other.records_out),
            (self.dead_letters, other.dead_letters),
            (self.sqs, other.sqs),
            (self.retries, other.retries),
            (self.lag, other.lag),
        )
        for mine, theirs in tables:
            for k, v in theirs.items():
                _bump(mine, k, v)
        self.keys |= other.keys

    def stages(self) -> list[str]:
        """Stages this process runs, in pipeline order (the bridge counts SQS messages, not records in)."""
        seen = set(self.records_in) | {s for s, _ in self.records_out} | {s for s, _ in self.dead_letters}
        order = ["bridge", "mask", "sink"]
        return sorted(seen, key=lambda s: (order.index(s) if s in order else len(order), s))

    def stage_in(self, stage: str) -> float:
        return self.sqs.get("received", 0.0) if stage == "bridge" else self.records_in.get(stage, 0.0)

    def stage_out(self, stage: str) -> float:
        return sum(v for (s, _), v in self.records_out.items() if s == stage)

    def series(self) -> dict[str, float]:
        """The cumulative values the charts sample: ``in:<stage>``, ``out:<stage>``, ``dead:<reason>``."""
        values = {}
        for stage in self.stages():
            values[f"in:{stage}"] = self.stage_in(stage)
            values[f"out:{stage}"] = self.stage_out(stage)
        for (_, reason), n in self.dead_letters.items():
            values[f"dead:{reason}"] = values.get(f"dead:{reason}", 0.0) + n
        return values


def totals_from(families: Iterable) -> Totals:
    """``Totals`` from Prometheus metric families: ``REGISTRY.collect()`` or a parsed ``/metrics``
    (``prometheus_client.parser.text_string_to_metric_families``); unknown metrics are ignored."""
    t = Totals()
    for family in families:
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "streams_records_in_total":
                _bump(t.records_in, labels["stage"], value)
            elif name == "streams_records_out_total":
                _bump(t.records_out, (labels["stage"], labels["outcome"]), value)
            elif name == "streams_dead_letters_total":
                _bump(t.dead_letters, (labels["stage"], labels["reason"]), value)
            elif name == "streams_sqs_messages_total":
                _bump(t.sqs, labels["event"], value)
            elif name == "streams_retries_total":
                _bump(t.retries, labels["operation"], value)
            elif name == "streams_key_in_use" and value == 1:
                t.keys.add((labels["join_version"], labels["encryption_key_id"]))
            elif name == "streams_consumer_lag":
                _bump(t.lag, (labels["stage"], labels["topic"], int(labels["partition"])), value)
    return t


def _bump(table: dict, key, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


class History:
    """A ring buffer of samples for the charts: ``span`` seconds at one sample per ``every``."""

    def __init__(self, every: float = 5.0, span: float = 900.0) -> None:
        self.every = every
        self._samples: deque[Sample] = deque(maxlen=max(int(span / every), 2))

    def add(self, values: dict[str, float], at: float | None = None) -> None:
        self._samples.append((time.time() if at is None else at, dict(values)))

    def samples(self) -> list[Sample]:
        return list(self._samples)


@dataclass
class Page:
    """Everything one page shows; each server fills what it knows (None = not known here)."""

    title: str
    checks: list[Check]
    totals: Totals | None  # None: no process metrics (``status --web`` without ``--metrics``)
    lag: list[LagRow] | None  # None: not known (Kafka did not answer)
    dead_letters: dict[tuple[str, str], float]  # (stage, reason) ->
    dead_letters_source: str  # where those counts come from
    recent: list[SeenDeadLetter]
    recent_source: str
    keys: list[tuple[str, str, str]]  # (join_version, encryption_key_id, who reports it)
    history: list[Sample]
    facts: list[tuple[str, str]] = field(default_factory=list)  # (label, value)
    links: list[tuple[str, str]] = field(default_factory=list)  # (relative href, label)
    refresh: int = 10  # seconds; 0 = no automatic reload
    generated_at: float = field(default_factory=time.time)


def render(page: Page) -> str:
    """The whole page as an HTML document; every value is escaped."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{page.refresh}">' if page.refresh > 0 else "",
        f"<title>{escape(page.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>{escape(page.title)}</h1><p class=muted>at {_utc(page.generated_at)} UTC"
        + (f" · reloads every {page.refresh} s" if page.refresh > 0 else "")
        + "".join(f' · <a href="{escape(href)}">{escape(label)}</a>' for href, label in page.links)
        + "</p></header>",
        "<main>",
        _health(page),
        _throughput(page.totals, page.history),
        _lag(page.lag),
        _dead_letters(page),
        _recent(page.recent, page.recent_source, page.generated_at),
        _keys(page.keys),
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


# --- sections ---------------------------------------------------------------


def _health(page: Page) -> str:
    rows = "".join(
        f'<tr><td>{escape(c.name)}</td><td class="{_state(c.ok)}" data-check="{escape(c.name)}">'
        f"{_state_word(c.ok)}</td><td class=wrap>{escape(c.detail)}</td></tr>"
        for c in page.checks
    )
    facts = "".join(
        f'<tr><td>{escape(label)}</td><td class=num data-fact="{escape(label)}">{escape(value)}</td></tr>'
        for label, value in page.facts
    )
    return _section(
        "health",
        "Health",
        f"<table><thead><tr><th>check</th><th>state</th><th>detail</th></tr></thead><tbody>{rows}</tbody></table>"
        + (f"<table class=facts><tbody>{facts}</tbody></table>" if facts else ""),
    )


def _lag(lag: list[LagRow] | None) -> str:
    if lag is None:
        return _section("lag", "Lag per partition", "<p class=muted>Kafka did not answer</p>")
    if not lag:
        return _section(
            "lag",
            "Lag per partition",
            "<p class=muted>no consumer lag reported: the bridge consumes no topic; "
            "a worker reports it every STREAMS_LAG_INTERVAL</p>",
        )
    by_stage: dict[str, list[LagRow]] = defaultdict(list)
    for row in lag:
        by_stage[row.stage].append(row)
    has_offsets = any(r.committed is not None or r.end is not None for r in lag)
    head = "<th>stage</th><th>topic</th><th>partition</th>"
    head += "<th>committed</th><th>end</th>" if has_offsets else ""
    head += "<th>lag</th>"
    body = []
    for stage, rows in by_stage.items():
        for r in sorted(rows, key=lambda r: (r.topic, r.partition)):
            cells = f"<td>{escape(stage)}</td><td>{escape(r.topic)}</td><td class=num>{r.partition}</td>"
            if has_offsets:
                cells += f"<td class=num>{_num(r.committed)}</td><td class=num>{_num(r.end)}</td>"
            cells += (
                f'<td class="num{" warn" if r.lag else ""}" data-lag="{escape(stage)}:{r.partition}">{_num(r.lag)}</td>'
            )
            body.append(f"<tr>{cells}</tr>")
        total = sum(r.lag for r in rows)
        span = 5 if has_offsets else 3
        body.append(
            f'<tr class=total><td colspan="{span}">{escape(stage)} total</td>'
            f'<td class=num data-lag-total="{escape(stage)}">{_num(total)}</td></tr>'
        )
    return _section(
        "lag",
        "Lag per partition",
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
    )


def _throughput(totals: Totals | None, history: list[Sample]) -> str:
    title = "Records in and out"
    if totals is None:
        return _section(
            "throughput", title, "<p class=muted>no process metrics: pass --metrics URL for each process</p>"
        )
    rows = []
    for stage in totals.stages():
        outs = sorted((o, v) for (s, o), v in totals.records_out.items() if s == stage)
        out_text = ", ".join(
            f'{escape(o)} <span data-out="{escape(stage)}:{escape(o)}">{_num(v)}</span>' for o, v in outs
        )
        rows.append(
            f"<tr><td>{escape(stage)}</td>"
            f'<td class=num data-in="{escape(stage)}">{_num(totals.stage_in(stage))}</td>'
            f'<td class=num data-out-total="{escape(stage)}">{_num(totals.stage_out(stage))}</td>'
            f"<td>{out_text or '-'}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>stage</th><th>in</th><th>out</th><th>out by outcome</th></tr></thead>"
        f"<tbody>{''.join(rows) or '<tr><td colspan=4 class=muted>nothing counted yet</td></tr>'}</tbody></table>"
        "<p class=muted>since each process started; the bridge's in = SQS messages received</p>"
    )
    charts = "".join(
        _chart(
            f"{stage}: records per second",
            history,
            [(f"in:{stage}", "in", _PALETTE[0]), (f"out:{stage}", "out", _PALETTE[1] + ":dash")],
            per=1.0,
        )
        for stage in totals.stages()
    )
    return _section("throughput", title, table + f"<div class=charts>{charts}</div>")


def _dead_letters(page: Page) -> str:
    rows = "".join(
        f'<tr><td>{escape(stage)}</td><td>{escape(reason)}</td><td class=num data-dead="{escape(stage)}:{escape(reason)}">'
        f"{_num(n)}</td></tr>"
        for (stage, reason), n in sorted(page.dead_letters.items())
    )
    total = sum(page.dead_letters.values())
    table = (
        "<table><thead><tr><th>stage</th><th>reason</th><th>count</th></tr></thead>"
        f"<tbody>{rows}<tr class=total><td colspan=2>total</td><td class=num data-dead-total>{_num(total)}</td></tr>"
        f"</tbody></table><p class=muted>{escape(page.dead_letters_source)}</p>"
    )
    reasons = sorted({key.split(":", 1)[1] for _, values in page.history for key in values if key.startswith("dead:")})
    chart = (
        _chart(
            "dead letters per minute, by reason",
            page.history,
            [(f"dead:{r}", r, _PALETTE[(i + 2) % len(_PALETTE)]) for i, r in enumerate(reasons)],
            per=60.0,
        )
        if reasons
        else ""
    )
    return _section("dead-letters", "Dead letters by reason", table + (f"<div class=charts>{chart}</div>"))


def _recent(recent: list[SeenDeadLetter], source: str, now: float) -> str:
    rows = "".join(
        f"<tr><td>{_when(d.at, now)}</td><td>{escape(d.stage)}</td><td>{escape(d.reason)}</td>"
        f"<td class=id>{escape(d.message_id)}</td></tr>"
        for d in recent
    )
    body = (
        "<table><thead><tr><th>time (UTC)</th><th>stage</th><th>reason</th><th>message id</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        if rows
        else "<p class=muted>none</p>"
    )
    return _section("recent-dead-letters", "Last dead letters", body + f"<p class=muted>{escape(source)}</p>")


def _keys(keys: list[tuple[str, str, str]]) -> str:
    if not keys:
        return _section("keys", "Key ids in use", "<p class=muted>no masking key reported (no mask stage here)</p>")
    rows = "".join(
        f'<tr><td data-join-version>{escape(j)}</td><td data-key-id>{escape(k)}</td><td class="muted">{escape(w)}</td></tr>'
        for j, k, w in sorted(keys)
    )
    return _section(
        "keys",
        "Key ids in use",
        "<table><thead><tr><th>join token version</th><th>encryption key id</th><th>reported by</th></tr></thead>"
        f"<tbody>{rows}</tbody></table><p class=muted>ids only; key bytes are never shown</p>",
    )


# --- charts -------------------------------------------------------------------

_W, _H, _PAD = 520, 120, 34


def rates(history: list[Sample], key: str, per: float = 1.0) -> list[tuple[float, float]]:
    """(time, increase of ``key`` per ``per`` seconds since the previous sample); a counter that
    went down (a restarted process) counts from zero, a missing one as zero."""
    points = []
    for (t0, v0), (t1, v1) in zip(history, history[1:], strict=False):
        if t1 <= t0:
            continue
        a, b = v0.get(key, 0.0), v1.get(key, 0.0)
        increase = b - a if b >= a else b
        points.append((t1, increase / (t1 - t0) * per))
    return points


def _chart(title: str, history: list[Sample], lines: list[tuple[str, str, str]], per: float) -> str:
    """An inline SVG line chart of each series' rate over the sampled window."""
    unit = "per s" if per == 1.0 else "per min"
    series = [(label, color, rates(history, key, per)) for key, label, color in lines]
    if len(history) < 2:
        body = f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="muted">collecting samples…</text>'
        legend = ""
    else:
        t_start, t_end = history[0][0], history[-1][0]
        span = max(t_end - t_start, 1e-9)
        top = max((v for _, _, pts in series for _, v in pts), default=0.0)
        top = _nice(top)
        plot_w, plot_h = _W - _PAD - 8, _H - 28

        def xy(t: float, v: float) -> str:
            return f"{_PAD + (t - t_start) / span * plot_w:.1f},{8 + plot_h - (v / top) * plot_h:.1f}"

        grid = (
            f'<line x1="{_PAD}" y1="8" x2="{_PAD}" y2="{8 + plot_h}" class=axis />'
            f'<line x1="{_PAD}" y1="{8 + plot_h}" x2="{_W - 8}" y2="{8 + plot_h}" class=axis />'
            f'<line x1="{_PAD}" y1="8" x2="{_W - 8}" y2="8" class=grid />'
            f'<text x="{_PAD - 4}" y="12" text-anchor="end">{_short(top)}</text>'
            f'<text x="{_PAD - 4}" y="{8 + plot_h}" text-anchor="end">0</text>'
            f'<text x="{_PAD}" y="{_H - 4}">-{_ago(span)}</text>'
            f'<text x="{_W - 8}" y="{_H - 4}" text-anchor="end">now</text>'
        )
        polylines = "".join(
            f'<polyline fill="none" stroke="{_color(color)}" stroke-width="2"'
            + (' stroke-dasharray="5 3"' if color.endswith(":dash") else "")
            + f' points="{" ".join(xy(t, v) for t, v in pts)}"><title>{escape(label)}</title></polyline>'
            for label, color, pts in series
            if pts
        )
        body = grid + polylines
        legend = "".join(
            f'<span class=key><i style="background:{_color(color)}"></i>{escape(label)}: '
            f"now {_short(pts[-1][1] if pts else 0)}, peak {_short(max((v for _, v in pts), default=0))} {unit}</span>"
            for label, color, pts in series
        )
    return (
        f"<figure><figcaption>{escape(title)}</figcaption>"
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{escape(title)}">{body}</svg>'
        f"<div class=legend>{legend}</div></figure>"
    )


def _color(spec: str) -> str:
    """A palette colour, without the ``:dash`` style suffix."""
    return spec.split(":", 1)[0]


def _nice(top: float) -> float:
    """A round axis maximum at or above ``top`` (1, 2, 5 x 10^n)."""
    if top <= 0:
        return 1.0
    step = 1.0
    while step * 10 <= top:
        step *= 10
    while step > top * 10:
        step /= 10
    for m in (1, 2, 5, 10):
        if m * step >= top:
            return m * step
    return 10 * step


# --- formatting ---------------------------------------------------------------


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _short(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or float(value).is_integer() else f"{value:.2g}"


def _ago(seconds: float) -> str:
    for unit, size, above in (("d", 86400, 172800), ("h", 3600, 7200), ("min", 60, 90)):
        if seconds >= above:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _when(at: float, now: float) -> str:
    """``HH:MM:SS`` on the page's (UTC) day, else the date too."""
    day = datetime.fromtimestamp(at, UTC).date() == datetime.fromtimestamp(now, UTC).date()
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S" if day else "%Y-%m-%d %H:%M:%S")


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _state(ok: bool | None) -> str:
    return "unknown" if ok is None else ("ok" if ok else "fail")


def _state_word(ok: bool | None) -> str:
    return {None: "unknown", True: "ok", False: "failing"}[ok]


_PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"]

_CSS = """
:root{color-scheme:light dark;--fg:#1f2937;--bg:#f8fafc;--card:#fff;--line:#e5e7eb;--muted:#6b7280}
@media (prefers-color-scheme:dark){:root{--fg:#e5e7eb;--bg:#0f172a;--card:#1e293b;--line:#334155;--muted:#94a3b8}}
body{margin:0;font:14px/1.4 system-ui,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:12px 20px;border-bottom:1px solid var(--line)}
h1{font-size:20px;margin:0}h2{font-size:15px;margin:0 0 8px}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:14px;padding:14px 20px}
section{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:12px 14px;overflow:auto}
table{border-collapse:collapse;width:100%;margin-bottom:6px}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
th{font-weight:600;color:var(--muted)}
.num{text-align:right;font-variant-numeric:tabular-nums}
.total td{font-weight:600}
.ok{color:#16a34a;font-weight:600}.fail{color:#dc2626;font-weight:600}.unknown{color:var(--muted)}
.warn{color:#d97706;font-weight:600}
.muted{color:var(--muted);font-size:12px}
td.wrap{white-space:normal}
.id{font-family:ui-monospace,monospace;font-size:12px}
.facts{margin-top:8px}
figure{margin:6px 0 10px}figcaption{font-size:12px;color:var(--muted)}
svg{max-width:100%;height:auto;display:block}
svg text{font-size:10px;fill:var(--muted)}
svg .axis{stroke:var(--muted);stroke-width:1}svg .grid{stroke:var(--line);stroke-dasharray:3 3}
.legend{font-size:12px}.key{margin-right:12px;white-space:nowrap}
.key i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
a{color:inherit}
"""


def process_page(
    title: str, stuck_for: float | None, not_ready: str | None, totals: Totals, up_for: float | None = None, **page
) -> Page:
    """The page of one process (its HTTP port's ``/``) from its own metrics and probes."""
    checks = [
        Check(
            "liveness (/healthz)",
            stuck_for is None,
            "alive" if stuck_for is None else f"stuck: no progress for {stuck_for:.0f}s",
        ),
        Check("readiness (/readyz)", not_ready is None, not_ready or "ready"),
    ]
    checks += [
        Check(f"retries: {op}", None, f"{n:.0f} transient failures retried") for op, n in sorted(totals.retries.items())
    ]
    lag = [LagRow(stage, topic, p, int(v)) for (stage, topic, p), v in sorted(totals.lag.items())]
    facts = [("up for", _ago(up_for))] if up_for is not None else []
    facts += [(f"SQS messages {event}", _num(n)) for event, n in sorted(totals.sqs.items())]
    return Page(
        title=title,
        checks=checks,
        totals=totals,
        lag=lag,
        dead_letters=totals.dead_letters,
        dead_letters_source="counted by this process since it started",
        recent_source="the last 20 this process dead-lettered; ids only, never a payload or detail",
        keys=[(j, k, "this process") for j, k in totals.keys],
        facts=facts,
        links=[("metrics", "/metrics"), ("healthz", "/healthz"), ("readyz", "/readyz")],
        **page,
    )


# Nothing but this document's inline style may load: no script, no external asset.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "Cache-Control": "no-store",
}
