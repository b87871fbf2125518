"""The bridge next to a bare aiobotocore loop, in interleaved rounds (the bridge row of ``make bench``).

    python -m benchmarks.bridge [--messages 20000] [--pollers 4] [--rounds 3]
                                [--private-stack] [--baseline /path/to/other/checkout]

Each round seeds a fresh queue per row with the same N login bodies and runs, one after
the other, ``streams bridge`` (into a fresh raw topic) and the bare loop of
``benchmarks.bare sqs`` (receive(10) + delete, no Kafka) with the same pollers. Rounds
rotate which goes first, so a change of load on a shared machine hits every row alike.
The verdict is the median over the rounds of the per-round ratio; CPU per message is the
process tree's CPU between 10 % and 90 % done.

- ``--baseline DIR``: a third row, the bridge of another checkout (e.g. a worktree of
  main), with that checkout's ``streams`` first on ``sys.path``: before
  and after in the same rounds.
- ``--private-stack``: on a Kafka, ElasticMQ and PostgreSQL of its own (free ports,
  removed afterwards), after one unmeasured round that warms their JVMs up, also sampling
  the CPU of that Kafka and ElasticMQ, which nothing else uses: the whole cost of a
  message, client and services, which does not depend on what else the machine runs.
  On a machine the run saturates, the rates go as the inverse of those totals.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.harness import Result, Sandbox, logins, measure, python
from streams.io.kafka import read_topic
from streams_dev.sandbox import settings_from_env

TARGET = 0.9
_RUN_FROM = "import runpy, sys; sys.path.insert(0, {path!r}); runpy.run_module('streams', run_name='__main__')"
BRIDGE, BASELINE, BARE = "bridge", "bridge (baseline)", "bare SQS loop"


def _us(r: Result) -> float | None:
    return None if r.cpu_per_100k is None else r.cpu_per_100k * 10  # CPU s / 100k -> µs / message


def _total(r: Result) -> float | None:
    """µs of CPU per message, client and watched services together."""
    us = _us(r)
    return None if us is None else us + sum(r.service_cpu_per_100k.values()) * 10


def bridge_rounds(
    sb: Sandbox,
    bodies: list[str],
    pollers: int,
    rounds: int,
    timeout: float,
    checks: list[str],
    services: dict[str, int] | None = None,
    baseline: Path | None = None,
    tag: str = "",
) -> list[dict[str, Result]]:
    """``rounds`` of every row on the same bodies; each bridge's raw topic checked for every message."""
    from benchmarks.run import QueueProgress, seed

    s = sb.settings
    n = len(bodies)
    rows = [BRIDGE, *([BASELINE] if baseline else []), BARE]
    out = []
    for i in range(rounds):
        results: dict[str, Result] = {}
        for row in rows[i % len(rows) :] + rows[: i % len(rows)]:
            slug = {BRIDGE: "bridge", BASELINE: "baseline", BARE: "bare"}[row]
            env = sb.env(
                STREAMS_SQS_QUEUE=f"{s.sqs_queue}-{slug}{tag}{i}",
                STREAMS_RAW_TOPIC=sb.topic(f"raw-{slug}{tag}{i}"),
                STREAMS_BRIDGE_POLLERS=str(pollers),
                STREAMS_LOG_LEVEL="WARNING",
            )
            qs = settings_from_env(env)
            seed(qs, bodies)
            if row == BARE:
                cmd = python("-m", "benchmarks.bare", "sqs", str(pollers))
            elif row == BASELINE:  # that checkout's streams first on sys.path (-m would put this one's cwd first)
                cmd = python("-c", _RUN_FROM.format(path=str(baseline)), "bridge")
            else:
                cmd = python("-m", "streams", "bridge")
            results[row] = measure(row, [cmd], env, n, QueueProgress(qs, n), timeout, services=services)
            if row != BARE:
                got = len({k for k, _ in read_topic(qs, qs.raw_topic)})
                checks.append(
                    f"{row} round {i + 1}: {got} distinct raw records for {n} messages"
                    + ("" if got == n else " MISMATCH")
                )
        out.append(results)
    return out


def median_rows(rounds: list[dict[str, Result]]) -> dict[str, Result]:
    """Each row's median rate and CPU over the rounds (``make bench``'s bridge rows)."""
    out = {}
    for row in rounds[0]:
        rows = [results[row] for results in rounds]
        m = Result(row, rows[0].events, seconds=statistics.median(r.seconds for r in rows))
        rates = [r.rate for r in rows if r.rate]
        cpus = [r.cpu_per_100k for r in rows if r.cpu_per_100k]
        m.rate = statistics.median(rates) if rates else None
        m.cpu_per_100k = statistics.median(cpus) if cpus else None
        m.notes = [note for r in rows for note in r.notes]
        out[row] = m
    return out


def report(rounds: list[dict[str, Result]]) -> dict[str, float]:
    """Print the rounds and their medians; the median ratio to the bare loop of each bridge row."""
    names = sorted({name for r in rounds for res in r.values() for name in res.service_cpu_per_100k})
    extra = "".join(f" {name} µs/msg |" for name in names) + (" total µs/msg |" if names else "")
    print(f"| round | row | steady msg/s | × bare | client µs CPU/msg |{extra}")
    print("|---|---|---:|---:|---:|" + "---:|" * (len(names) + (1 if names else 0)))
    per_row: dict[str, dict[str, list[float]]] = {}
    for i, results in enumerate(rounds, 1):
        bare = results[BARE]
        for row, r in results.items():
            ratio = r.rate / bare.rate if r.rate and bare.rate else None
            acc = per_row.setdefault(row, {"rate": [], "ratio": [], "client": [], "total": []})
            for key, value in (("rate", r.rate), ("ratio", ratio), ("client", _us(r)), ("total", _total(r))):
                if value is not None:
                    acc[key].append(value)
            services = "".join(f" {r.service_cpu_per_100k.get(name, 0) * 10:.0f} |" for name in names)
            total = f" {_total(r) or 0:.0f} |" if names else ""
            print(
                f"| {i} | {row} | {r.rate or 0:,.0f} | {'' if row == BARE else f'{ratio or 0:.2f}'} | "
                f"{_us(r) or 0:.0f} |{services}{total}"
            )
    ratios = {}
    for row, acc in per_row.items():
        med = {key: statistics.median(values) if values else 0.0 for key, values in acc.items()}
        if row != BARE:
            ratios[row] = med["ratio"]
        total = f" {med['total']:.0f} |" if names else ""
        shown = "" if row == BARE else f"{med['ratio']:.2f}"
        print(f"| median | {row} | {med['rate']:,.0f} | {shown} | {med['client']:.0f} |{' |' * len(names)}{total}")
    if names:
        bare_total = statistics.median(per_row[BARE]["total"] or [0])
        for row in ratios:
            row_total = statistics.median(per_row[row]["total"] or [0])
            if row_total:
                print(f"\n{row}: CPU-bound estimate (bare total / its total, medians) {bare_total / row_total:.2f}")
    return ratios


@contextmanager
def private_stack():
    """A Kafka, ElasticMQ and PostgreSQL of this run's own; yields the pids of Kafka and ElasticMQ."""
    from streams_dev import stack
    from streams_dev.sandbox import private_settings

    stack_dir = Path(tempfile.mkdtemp(prefix="streams-bench-stack-"))
    settings = private_settings(stack_dir)
    saved = dict(os.environ)
    try:
        stack.up(settings)
        os.environ.update(
            STREAMS_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
            STREAMS_SQS_ENDPOINT=settings.sqs_endpoint or "",
            STREAMS_PG_DSN=settings.pg_dsn.get_secret_value(),
            STREAMS_STACK_DIR=str(stack_dir),
        )
        yield {s.name: s.pid for s in stack.status(settings) if s.name in ("kafka", "sqs") and s.pid}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stack.down(settings)
        shutil.rmtree(stack_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=int(os.environ.get("BENCH_MESSAGES", 20_000)))
    parser.add_argument("--pollers", type=int, default=int(os.environ.get("BENCH_POLLERS", 4)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--private-stack", action="store_true", help="own Kafka/ElasticMQ, their CPU measured too")
    parser.add_argument("--baseline", type=Path, help="another checkout whose bridge runs as a third row")
    args = parser.parse_args(argv)
    if args.private_stack:
        with private_stack() as services:
            return run(args, services)
    return run(args, None)


def run(args: argparse.Namespace, services: dict[str, int] | None) -> int:
    load_before = os.getloadavg()
    started = time.monotonic()
    sb = Sandbox("benchbridge")
    checks: list[str] = []
    baseline = args.baseline.resolve() if args.baseline else None
    try:
        bodies = logins(args.messages)
        if services is not None:  # fresh JVMs: one round unmeasured, so the JIT has compiled the hot paths
            bridge_rounds(sb, bodies, args.pollers, 1, args.timeout, [], services, baseline, tag="warmup")
        rounds = bridge_rounds(sb, bodies, args.pollers, args.rounds, args.timeout, checks, services, baseline)
    finally:
        sb.close()
    load_after = os.getloadavg()
    options = (" --private-stack" if services is not None else "") + (f" --baseline {baseline}" if baseline else "")
    print(
        f"\n`python -m benchmarks.bridge --messages {args.messages} --pollers {args.pollers} --rounds {args.rounds}"
        f"{options}`: {time.monotonic() - started:.0f} s, "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after, {os.cpu_count()} cores\n"
    )
    ratios = report(rounds)
    print()
    for check in checks:
        print(f"check: {check}")
    for results in rounds:
        for r in results.values():
            for note in r.notes:
                print(f"note: {r.name}: {note}")
    for row, ratio in ratios.items():
        print(f"\n{row} / bare SQS loop: {ratio:.2f} (median of the rounds; target ≥ {TARGET})")
    return 1 if any("MISMATCH" in c for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
