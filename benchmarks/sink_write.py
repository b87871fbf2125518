"""The sink's database side next to plain COPY, in one process, interleaved rounds.

    python -m benchmarks.sink_write [--rows 50000] [--rounds 3] [--batch 500] [--profile]

No Kafka: N masked records (the mask transform's real output, every ip and device id
distinct) are written 500 at a time into a fresh migrated database per run, by

- ``copy``: plain asyncpg COPY of the same rows into ``pii_vault`` and ``user_logins``
  (the same indexed tables), one transaction per batch: the comparator;
- ``sink``: ``SinkStage.plan`` (decode the Avro values) + ``PostgresSink.write_batch``,
  the sink agent's whole per-batch work minus Kafka.

Each round runs every variant once, in turn; the table gives each variant's median rows/s
(wall) and this process's CPU µs per row (PostgreSQL's own CPU is not in it), and the
ratio sink / copy per round. ``--profile`` adds a cProfile of one sink run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable

from benchmarks.harness import Sandbox, logins, raw_records
from streams.io.codec import Codecs
from streams.io.postgres import connect, migrate
from streams.pipeline.mask import MaskTransform
from streams.pipeline.sink import _COLUMNS, PostgresSink, SinkStage, staged_rows
from streams.privacy.keys import settings_keyring
from streams.privacy.masking import Masker

Messages = list[tuple[bytes | None, bytes, str]]


async def _migrated(dsn: str) -> None:
    conn = await connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def run_copy(dsn: str, rows: list[dict], batch: int) -> None:
    conn = await connect(dsn)
    try:
        for i in range(0, len(rows), batch):
            vault, logins_ = staged_rows(rows[i : i + batch])
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "pii_vault", records=vault, columns=["field", "token", "key_id", "ciphertext"]
                )
                await conn.copy_records_to_table("user_logins", records=logins_, columns=list(_COLUMNS))
    finally:
        await conn.close()


async def run_sink(dsn: str, messages: Messages, batch: int) -> None:
    stage = SinkStage(Codecs())
    sink = PostgresSink(dsn)
    try:
        for i in range(0, len(messages), batch):
            planned = stage.plan(messages[i : i + batch])
            refused = await sink.write_batch(planned.rows, planned.deletes)
            assert not refused
    finally:
        await sink.close()


async def _timed(run: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await run()
    return time.perf_counter() - wall, time.process_time() - cpu


async def _count(dsn: str) -> int:
    conn = await connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM user_logins")
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    sb = Sandbox("sinkw")
    try:
        s = sb.settings
        transform = MaskTransform(Masker(settings_keyring(s)), Codecs())
        messages: Messages = []
        for i, (_, k, v) in enumerate(raw_records(s.raw_topic, logins(args.rows))):
            out = transform(k, v, f"raw/0/{i}")
            assert not out.reason
            messages.append((out.key, out.value, f"masked/0/{i}"))
        decoded = SinkStage(Codecs()).plan(messages).rows  # COPY gets its rows decoded already, as in make bench
        variants = {"copy": (run_copy, decoded), "sink": (run_sink, messages)}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, (fn, data) in variants.items():
                dsn = sb.new_database(f"{name}{r}")
                asyncio.run(_migrated(dsn))
                wall, cpu = asyncio.run(_timed(lambda fn=fn, dsn=dsn, data=data: fn(dsn, data, args.batch)))
                rows = asyncio.run(_count(dsn))
                assert rows == args.rows, (name, rows)
                results[name].append((wall, cpu))
                print(
                    f"round {r + 1} {name}: {args.rows / wall:,.0f} rows/s, {cpu / args.rows * 1e6:.1f} µs CPU/row",
                    flush=True,
                )
        print(f"\n{args.rows:,} rows, batches of {args.batch}, median of {args.rounds} interleaved rounds")
        print("| variant | rows/s | process CPU µs/row |")
        print("|---|---|---|")
        for name, runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"| {name} | {args.rows / wall:,.0f} | {cpu / args.rows * 1e6:.1f} |")
        ratios = [c[0] / s_[0] for c, s_ in zip(results["copy"], results["sink"], strict=True)]
        print(f"sink / copy per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")
        if args.profile:
            dsn = sb.new_database("profile")
            asyncio.run(_migrated(dsn))
            prof = cProfile.Profile()
            prof.enable()
            asyncio.run(run_sink(dsn, messages, args.batch))
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        sb.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
