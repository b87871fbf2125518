"""py-spy profile of the mask stage on a backlog, next to the bare loop: where the time goes.

    python -m benchmarks.profile_mask [--messages 200000] [--seconds 8] [--out /tmp/mask-profile]

Fills a sandbox's raw topic, starts ``streams worker`` (STREAMS_STAGES=mask) and the bare
confluent loop of ``benchmarks.bare`` one after the other, samples each with
``py-spy record --format raw --gil`` (on-CPU, GIL-holding stacks) for ``--seconds`` once it
runs, and prints each one's top functions by own samples and by cumulative samples.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO, CommittedProgress, Sandbox, fill, logins, python, raw_records
from streams.ops.topics import ensure_topics
from streams.ops.topology import stage_group
from streams_dev.sandbox import settings_from_env


def summarize(path: Path, top: int = 25) -> str:
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
    lines = [f"{samples} samples; own:"]
    lines += [f"  {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("cumulative:")
    lines += [f"  {n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--out", default="/tmp/mask-profile")
    parser.add_argument("--only", default="stage,bare")
    args = parser.parse_args()
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
            cmd = (
                python("-m", "streams", "worker")
                if kind == "stage"
                else python("-m", "benchmarks.bare", "kafka-mask", masked, g)
            )
            progress = CommittedProgress(
                s, g if kind != "stage" else stage_group(settings_from_env(env), "mask"), s.raw_topic, 6
            )
            child = subprocess.Popen(
                cmd, env={**os.environ, **env}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                deadline = time.monotonic() + 120
                while progress() < args.messages * 0.05 and time.monotonic() < deadline:
                    time.sleep(0.1)
                path = out / f"{kind}.txt"
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
                print(f"== {kind} ({path})")
                print(summarize(path))
            finally:
                child.terminate()
                child.wait(30)
                progress.close()
    finally:
        sb.close()


if __name__ == "__main__":
    main()
