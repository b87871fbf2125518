"""py-spy profile of the mask stage on a backlog, next to the bare loop: where the time goes.

    python -m benchmarks.profile_mask [--messages 200000] [--seconds 8] [--out /tmp/mask-profile]
                                      [--only stage,bare,bare-txn,nodedup,copy,copy-bare]

Fills a sandbox's raw topic, starts ``streams worker`` (STREAMS_STAGES=mask), its byte-copy
shape (``benchmarks.copy_worker``) and the bare confluent loops of ``benchmarks.bare`` one
after the other, samples each with ``py-spy record --format raw --gil`` (on-CPU,
GIL-holding stacks) for ``--seconds`` once it runs, and prints each one's top functions by
own samples and by cumulative samples, in % and in µs of CPU per event (the process's CPU
over the window divided by the inputs committed in it), with the CPU split by thread
(Python's threads and librdkafka's, by name).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO, CommittedProgress, Sandbox, compile_package, fill, logins, python, raw_records
from benchmarks.run import drop_topic
from streams.ops.topics import ensure_topics
from streams.ops.topology import changelog_topic, stage_group
from streams_dev.sandbox import settings_from_env


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (librdkafka's ``rdk:broker3`` folded into ``rdk:broker``) of ``pid``."""
    out: collections.Counter = collections.Counter()
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")].rstrip("0123456789")
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return out


def summarize(path: Path, top: int = 25, us_per_sample: float | None = None) -> str:
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] for f in stack.split(";")
        ]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n

    def us(n: int) -> str:
        return f"{n * us_per_sample:6.2f} µs" if us_per_sample else ""

    lines = [f"{samples} samples; own:"]
    lines += [f"  {n / samples:6.1%} {us(n)}  {f}" for f, n in own.most_common(top)]
    lines.append("cumulative:")
    lines += [f"  {n / samples:6.1%} {us(n)}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--out", default="/tmp/mask-profile")
    parser.add_argument("--only", default="stage,bare")
    args = parser.parse_args()
    compile_package()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sb = Sandbox("prof")
    try:
        s = sb.settings
        fill(s, raw_records(s.raw_topic, logins(args.messages, users=args.messages // 20), settings=s))
        for kind in args.only.split(","):
            g = sb.group(kind)
            masked = sb.topic(f"masked-{kind}")
            env = sb.env(
                STREAMS_APP_ID=g, STREAMS_MASKED_TOPIC=masked, STREAMS_STAGES="mask", STREAMS_LOG_LEVEL="WARNING"
            )
            ensure_topics(settings_from_env(env))
            if kind == "nodedup":
                env["STREAMS_DEDUP_WINDOW"] = "0"
            cmd = {
                "stage": python("-m", "streams", "worker"),
                "nodedup": python("-m", "streams", "worker"),
                "copy": python("-m", "benchmarks.copy_worker"),
                "bare": python("-m", "benchmarks.bare", "kafka-mask", masked, g),
                "copy-bare": python("-m", "benchmarks.bare", "kafka-copy", masked, g),
                "bare-txn": python("-m", "benchmarks.bare", "kafka-mask-txn", masked, g),
            }[kind]
            staged = kind in ("stage", "nodedup", "copy")
            progress = CommittedProgress(
                s, stage_group(settings_from_env(env), "mask") if staged else g, s.raw_topic, 6
            )
            child = subprocess.Popen(
                cmd, env={**os.environ, **env}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                deadline = time.monotonic() + 120
                while progress() < args.messages * 0.05 and time.monotonic() < deadline:
                    time.sleep(0.1)
                path = out / f"{kind}.txt"
                done, cpu = progress(), thread_cpu(child.pid)
                subprocess.run(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "--pid",
                        str(child.pid),
                        "--duration",
                        str(int(args.seconds)),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--gil",
                        "--nonblocking",
                        "-o",
                        str(path),
                    ],
                    check=True,
                    capture_output=True,
                )
                done, cpu = progress() - done, {k: v - cpu.get(k, 0.0) for k, v in thread_cpu(child.pid).items()}
                python_cpu = sum(v for k, v in cpu.items() if not k.startswith("rdk:"))
                events = max(done, 1)
                print(f"== {kind} ({path}): {done} events in {args.seconds:.0f} s, CPU per event by thread:")
                for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
                    if seconds:
                        print(f"  {seconds / events * 1e6:7.2f} µs  {name}")
                print(f"  {sum(cpu.values()) / events * 1e6:7.2f} µs  total")
                samples = sum(int(line.rpartition(" ")[2]) for line in path.read_text().splitlines() if " " in line)
                print(summarize(path, us_per_sample=python_cpu / events * 1e6 / max(samples, 1)))
            finally:
                child.terminate()
                child.wait(30)
                progress.close()
                if staged:  # each stage run starts with no dedup window (the raw topic is shared)
                    drop_topic(s, changelog_topic(s))
    finally:
        sb.close()


if __name__ == "__main__":
    main()
