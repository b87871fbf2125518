"""The sink's database side next to plain COPY, in one process, interleaved rounds.

    python -m benchmarks.sink_write [--rows 50000] [--rounds 3] [--batch 500] [--profile]

No Kafka: N masked records (the mask transform's real output, every ip and device id
distinct) are written 500 at a time into a fresh migrated database per run, by

- ``copy``: plain asyncpg COPY of the same rows into ``pii_vault`` and ``user_logins``
  (the same indexed tables), one transaction per batch: the comparator;
- ``sink``: ``SinkStage.plan`` (decode the Avro values) + ``PostgresSink.write_batch``,
  the sink agent's whole per-batch work minus Kafka (after the first batch's lookup, every
  batch is COPYed blind: ``CopyMode``);
- ``lookup``: the same with every batch looked up first (``PROBE``, then COPY of what is
  new): the sink's write while batches meet written keys, and its only one before blind COPY;
- ``merge``: the same, every batch through the staging tables and ``MERGE_STAGED`` (the
  sink's write before new rows were COPYed straight into the tables; now its path for
  batches with a written message id).

Each round runs every variant once, in turn; the table gives each variant's median rows/s
(wall), the CPU µs per row of this process and of its PostgreSQL backend (read from
/proc: the local stack), and the ratio to copy per round. ``--profile`` adds a cProfile of one sink run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import math
import os
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial

import asyncpg

from benchmarks.harness import Sandbox, logins, raw_records
from streams.io.codec import Codecs
from streams.io.postgres import connect
from streams.pipeline.mask import MaskTransform
from streams.pipeline.sink import (
    _COLUMNS,
    _VAULT_COLUMNS,
    CREATE_STAGES,
    MERGE_STAGED,
    STAGE_LOGINS,
    STAGE_VAULT,
    PostgresSink,
    SinkStage,
    staged_rows,
)
from streams.privacy.keys import settings_keyring
from streams.privacy.masking import Masker

Messages = list[tuple[bytes | None, bytes, str]]


def _server_cpu(conn: asyncpg.Connection) -> float:
    """CPU seconds of the connection's PostgreSQL backend so far (the server runs on this machine)."""
    try:
        with open(f"/proc/{conn.get_server_pid()}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan  # a remote server: its CPU is not measured
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_copy(dsn: str, rows: list[dict], batch: int) -> float:
    conn = await connect(dsn)
    try:
        before = _server_cpu(conn)
        for i in range(0, len(rows), batch):
            vault, logins_ = staged_rows(rows[i : i + batch])
            async with conn.transaction():
                await conn.copy_records_to_table("pii_vault", records=vault, columns=_VAULT_COLUMNS)
                await conn.copy_records_to_table("user_logins", records=logins_, columns=_COLUMNS)
        return _server_cpu(conn) - before
    finally:
        await conn.close()


async def run_sink(dsn: str, messages: Messages, batch: int, blind: bool = True) -> float:
    stage = SinkStage(Codecs())
    sink = PostgresSink(dsn)
    if not blind:
        sink.mode.needed = 1 << 62  # never enough clean lookups: every batch looked up
    try:
        conn = await sink._connection()
        before = _server_cpu(conn)
        for i in range(0, len(messages), batch):
            planned = stage.plan(messages[i : i + batch])
            refused = await sink.write_batch(planned.rows, planned.deletes)
            assert not refused
        assert sink._conn is conn
        return _server_cpu(conn) - before
    finally:
        await sink.close()


async def run_merge(dsn: str, messages: Messages, batch: int) -> float:
    stage = SinkStage(Codecs())
    conn = await connect(dsn)
    try:
        await conn.execute(CREATE_STAGES)
        before = _server_cpu(conn)
        for i in range(0, len(messages), batch):
            vault, rows = staged_rows(stage.plan(messages[i : i + batch]).rows)
            async with conn.transaction():
                await conn.copy_records_to_table(STAGE_VAULT, records=vault, columns=_VAULT_COLUMNS)
                await conn.copy_records_to_table(STAGE_LOGINS, records=rows, columns=_COLUMNS)
                await conn.execute(MERGE_STAGED)
        return _server_cpu(conn) - before
    finally:
        await conn.close()


async def _timed(run: Callable[[], Awaitable[float]]) -> tuple[float, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    server = await run()
    return time.perf_counter() - wall, time.process_time() - cpu, server


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
        variants = {
            "copy": (run_copy, decoded),
            "sink": (run_sink, messages),
            "lookup": (partial(run_sink, blind=False), messages),
            "merge": (run_merge, messages),
        }
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, (fn, data) in variants.items():
                dsn = sb.new_database(f"{name}{r}")
                wall, cpu, server = asyncio.run(_timed(lambda fn=fn, dsn=dsn, data=data: fn(dsn, data, args.batch)))
                rows = asyncio.run(_count(dsn))
                assert rows == args.rows, (name, rows)
                results[name].append((wall, cpu, server))
                print(
                    f"round {r + 1} {name}: {args.rows / wall:,.0f} rows/s, {cpu / args.rows * 1e6:.1f} µs CPU/row"
                    f" here, {server / args.rows * 1e6:.1f} in PostgreSQL",
                    flush=True,
                )
        print(f"\n{args.rows:,} rows, batches of {args.batch}, median of {args.rounds} interleaved rounds")
        print("| variant | rows/s | CPU µs/row, this process | CPU µs/row, its PostgreSQL backend |")
        print("|---|---|---|---|")
        for name, runs in results.items():
            wall, cpu, server = (statistics.median(x[i] for x in runs) for i in range(3))
            print(
                f"| {name} | {args.rows / wall:,.0f} | {cpu / args.rows * 1e6:.1f} | {server / args.rows * 1e6:.1f} |"
            )
        for name in ("sink", "lookup", "merge"):
            ratios = [c[0] / w[0] for c, w in zip(results["copy"], results[name], strict=True)]
            print(
                f"{name} / copy per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}"
            )
        if args.profile:
            dsn = sb.new_database("profile")
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
