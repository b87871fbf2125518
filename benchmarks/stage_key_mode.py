"""Whole mask stage, keyring mode vs per-user key mode: CPU of the worker per event (issue 19 item 7).

    python -m benchmarks.stage_key_mode [--messages 40000] [--rounds 3] [--users N] [--tree PATH ...]

Fills a sandbox's raw topic once (every record a new user unless ``--users``), then runs
``streams worker`` (STREAMS_STAGES=mask, on the compiled core) over it in both key modes,
alternating (the order of the two swapped every round), each run with its own consumer
group and masked topic. Per-user key mode uses
the stack's KMS keys (dev/streams_dev/local.env) and stores its key rows in the sandbox's
database, as ``make run`` does. The figure is the worker process's CPU time (user + system,
from /proc) between 5% and 100% of the backlog committed, per 100,000 events: start-up is
left out. ``--tree`` runs the worker from other checkouts too (PYTHONPATH, and the checkout's
own ``.venv`` when it has one: its own compiled core), e.g. main, to compare code versions on
the same input and stack. The budget (issue 19 item 7) is a ratio: each round's per-user
figure over the same round's keyring figure, and their median, are printed per tree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from benchmarks.harness import REPO, CommittedProgress, Sandbox, fill, logins, python, raw_records
from streams.ops.topics import ensure_topics
from streams.ops.topology import stage_group
from streams_dev.sandbox import local_env, settings_from_env

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def run_once(sb: Sandbox, n: int, mode: str, tree: Path, tag: str) -> float:
    group, masked = sb.group(tag), sb.topic(f"masked-{tag}")
    keys = {}
    if mode == "per-user":
        dev = local_env()
        keys = {k: dev[k] for k in ("STREAMS_KMS_KEY_ID", "STREAMS_KMS_MAC_KEY_ID")}
    env = sb.env(
        STREAMS_APP_ID=group,
        STREAMS_MASKED_TOPIC=masked,
        STREAMS_STAGES="mask",
        STREAMS_LOG_LEVEL="WARNING",
        STREAMS_REQUIRE_CORE="1",
        **keys,
    )
    ensure_topics(settings_from_env(env))
    progress = CommittedProgress(sb.settings, stage_group(settings_from_env(env), "mask"), sb.settings.raw_topic, 6)
    own = tree / ".venv" / "bin" / "python"
    child = subprocess.Popen(
        [str(own), "-m", "streams", "worker"] if own.exists() else python("-m", "streams", "worker"),
        env={**os.environ, **env, "PYTHONPATH": str(tree)},
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while progress() < n * 0.05:
            assert child.poll() is None and time.monotonic() < deadline, f"{mode} worker stopped or stalled"
            time.sleep(0.05)
        start, done_at = cpu_seconds(child.pid), progress()
        while (done := progress()) < n:
            assert child.poll() is None and time.monotonic() < deadline, f"{mode} worker stopped or stalled"
            time.sleep(0.05)
        return (cpu_seconds(child.pid) - start) / (done - done_at) * 100_000
    finally:
        child.terminate()
        child.wait(30)
        progress.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, help="distinct users (default: every record a new user)")
    parser.add_argument("--tree", action="append", default=[], help="another checkout to run the worker from")
    args = parser.parse_args()
    trees = [REPO, *(Path(t).resolve() for t in args.tree)]
    sb = Sandbox("keymode")
    try:
        s = sb.settings
        fill(s, raw_records(s.raw_topic, logins(args.messages, users=args.users), settings=s))
        results: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for t, tree in enumerate(trees):
                for mode in ("keyring", "per-user") if r % 2 == 0 else ("per-user", "keyring"):
                    cpu = run_once(sb, args.messages, mode, tree, f"r{r}t{t}{mode[0]}")
                    results.setdefault((str(tree), mode), []).append(cpu)
                    print(f"round {r}: {tree} {mode}: {cpu:.2f} s CPU per 100,000 events", flush=True)
        print(f"\n| tree | mode | CPU s per 100k events, {args.rounds} rounds (best, median) |\n|---|---|---|")
        for (tree, mode), cpus in results.items():
            cpus = sorted(cpus)
            print(f"| {tree} | {mode} | {cpus[0]:.2f}, {cpus[len(cpus) // 2]:.2f} |")
        print("\n| tree | per-user / keyring, each round | median |\n|---|---|---|")
        for tree in trees:
            ratios = [
                p / k for k, p in zip(results[(str(tree), "keyring")], results[(str(tree), "per-user")], strict=True)
            ]
            each = ", ".join(f"{r - 1:+.1%}" for r in ratios)
            print(f"| {tree} | {each} | {sorted(ratios)[len(ratios) // 2] - 1:+.1%} |")
    finally:
        sb.close()


if __name__ == "__main__":
    main()
