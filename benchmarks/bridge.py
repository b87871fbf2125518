"""The bridge next to a bare aiobotocore loop, in interleaved rounds (the bridge row of ``make bench``).

    python -m benchmarks.bridge [--messages 20000] [--pollers 4] [--rounds 3]

Each round seeds two fresh queues with the same N login bodies and runs, one after the
other, ``streams bridge`` (into a fresh raw topic) and the bare loop of
``benchmarks.bare sqs`` (receive(10) + delete, no Kafka) with the same pollers. Rounds
alternate which goes first, so a change of load on a shared machine hits both alike.
The verdict is the median over the rounds of the per-round ratio; CPU per message is the
process tree's CPU between 10 % and 90 % done.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchmarks.harness import Result, Sandbox, logins, measure, python
from streams.io.kafka import read_topic
from streams_dev.sandbox import settings_from_env

TARGET = 0.9


def _us(r: Result) -> float | None:
    return None if r.cpu_per_100k is None else r.cpu_per_100k * 10  # CPU s / 100k -> µs / message


def bridge_rounds(
    sb: Sandbox, bodies: list[str], pollers: int, rounds: int, timeout: float, checks: list[str]
) -> list[tuple[Result, Result]]:
    """``rounds`` of (bridge, bare SQS loop) on the same bodies; each raw topic checked for every message."""
    from benchmarks.run import QueueProgress, seed

    s = sb.settings
    n = len(bodies)
    out = []
    for i in range(rounds):
        bridge_env = sb.env(
            STREAMS_SQS_QUEUE=f"{s.sqs_queue}-bridge{i}",
            STREAMS_RAW_TOPIC=sb.topic(f"raw-bridge{i}"),
            STREAMS_BRIDGE_POLLERS=str(pollers),
            STREAMS_LOG_LEVEL="WARNING",
        )
        bare_env = sb.env(STREAMS_SQS_QUEUE=f"{s.sqs_queue}-bare{i}", STREAMS_LOG_LEVEL="WARNING")
        results: dict[str, Result] = {}
        order = ("bridge", "bare") if i % 2 == 0 else ("bare", "bridge")
        for which in order:
            env = bridge_env if which == "bridge" else bare_env
            qs = settings_from_env(env)
            seed(qs, bodies)
            if which == "bridge":
                cmd = python("-m", "streams", "bridge")
                results[which] = measure("bridge", [cmd], env, n, QueueProgress(qs, n), timeout)
                got = len({k for k, _ in read_topic(qs, qs.raw_topic)})
                checks.append(
                    f"bridge round {i + 1}: {got} distinct raw records for {n} messages"
                    + ("" if got == n else " MISMATCH")
                )
            else:
                cmd = python("-m", "benchmarks.bare", "sqs", str(pollers))
                results[which] = measure("bare SQS loop", [cmd], env, n, QueueProgress(qs, n), timeout)
        out.append((results["bridge"], results["bare"]))
    return out


def median_pair(pairs: list[tuple[Result, Result]]) -> tuple[Result, Result, float | None]:
    """The medians of each row over the rounds, and the median of the per-round ratios."""

    def med(rows: list[Result], name: str) -> Result:
        rates = [r.rate for r in rows if r.rate]
        cpus = [r.cpu_per_100k for r in rows if r.cpu_per_100k]
        m = Result(name, rows[0].events)
        m.rate = statistics.median(rates) if rates else None
        m.cpu_per_100k = statistics.median(cpus) if cpus else None
        m.notes = [note for r in rows for note in r.notes]
        return m

    ratios = [b.rate / c.rate for b, c in pairs if b.rate and c.rate]
    return (
        med([b for b, _ in pairs], f"bridge, median of {len(pairs)}"),
        med([c for _, c in pairs], f"bare SQS loop, median of {len(pairs)}"),
        statistics.median(ratios) if ratios else None,
    )


def report(pairs: list[tuple[Result, Result]]) -> float | None:
    print("| round | bridge ev/s | bare ev/s | × bare | bridge µs CPU/msg | bare µs CPU/msg |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, (b, c) in enumerate(pairs, 1):
        ratio = f"{b.rate / c.rate:.2f}" if b.rate and c.rate else "—"
        print(f"| {i} | {b.rate or 0:,.0f} | {c.rate or 0:,.0f} | {ratio} | {_us(b) or 0:.0f} | {_us(c) or 0:.0f} |")
    b, c, ratio = median_pair(pairs)
    print(
        f"| median | {b.rate or 0:,.0f} | {c.rate or 0:,.0f} | {ratio or 0:.2f} | {_us(b) or 0:.0f} | {_us(c) or 0:.0f} |"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=int(os.environ.get("BENCH_MESSAGES", 20_000)))
    parser.add_argument("--pollers", type=int, default=int(os.environ.get("BENCH_POLLERS", 4)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    started = time.monotonic()
    sb = Sandbox("benchbridge")
    checks: list[str] = []
    try:
        pairs = bridge_rounds(sb, logins(args.messages), args.pollers, args.rounds, args.timeout, checks)
    finally:
        sb.close()
    load_after = os.getloadavg()
    print(
        f"\n`python -m benchmarks.bridge --messages {args.messages} --pollers {args.pollers} --rounds {args.rounds}`: "
        f"{time.monotonic() - started:.0f} s, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after, "
        f"{os.cpu_count()} cores\n"
    )
    ratio = report(pairs)
    print()
    for check in checks:
        print(f"check: {check}")
    for b, c in pairs:
        for r in (b, c):
            for note in r.notes:
                print(f"note: {r.name}: {note}")
    print(f"\nbridge / bare SQS loop: {ratio or 0:.2f} (target ≥ {TARGET})")
    return 1 if any("MISMATCH" in c for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
