"""`make bench`: every stage next to its comparators, on the same input, in one run, one table.

    python -m benchmarks.run [--messages 20000] [--pollers 4] [--rss-backlogs 10000,100000]

On the shared local stack, in a sandbox of its own (database, topics of 6 partitions,
queues, groups, keys), removed afterwards. N login bodies with every ``ip`` and
``device_id`` distinct. Each row is one process (or two, end to end) run until its
input is done; its steady rate and CPU seconds per 100,000 events are taken between
10 % and 90 % done (start-up and tail left out). Rows, same run:

- mask transform alone (µs and CPU per record) | the primitives it cannot avoid;
- mask stage (``streams worker``, STREAMS_STAGES=mask, exactly-once) | the same with its
  dedup window off | a bare confluent-kafka consume -> same MaskTransform -> produce ->
  commit loop | a bare transactional loop (EOS v2, the stage's commit interval);
- the agent's shape with a byte copy (Faust alone) | the same byte copy in a bare loop;
- sink stage (STREAMS_STAGES=sink, over the mask stage's output) | COPY of the same rows
  and vault rows into both tables | the sink's write path alone (no Kafka);
- bridge (``streams bridge``) | a bare receive(10) + delete loop, same pollers, same input;
- end to end (bridge + one worker) | the bare SQS loop;
- worker (mask,sink) peak RSS at two backlog sizes.

Outputs are checked byte for byte: the mask stage's and the bare loop's masked topics
against the transform run here over the same inputs (the golden transform), the byte
copies against their inputs, the rows in PostgreSQL by count. A comparator slower than it
can plausibly be (a bare byte copy under ``--min-bare-copy`` or slower than Faust doing
the same, a bare loop or COPY slower than the project stage it bounds) marks the run
INVALID (exit 1): a loaded machine must not flatter the project.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac as hmac_module
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import fastavro
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from benchmarks.harness import (
    Result,
    Sandbox,
    TopicProgress,
    fill,
    logins,
    measure,
    python,
    raw_records,
)
from streams.io.codec import Codecs
from streams.io.kafka import read_topic
from streams.io.sqs import queue_url, send_bodies, sqs_client
from streams.ops.schemas import register as register_schemas
from streams.ops.topics import ensure_topics
from streams.pipeline.mask import MaskTransform
from streams.privacy.keys import settings_keyring
from streams.privacy.masking import Masker
from streams_dev.sandbox import settings_from_env

PARTITIONS = 6


# --- per-record CPU, in this process ------------------------------------------------------


def _cpu_per_call(fn: Callable[[object], object], items: list, repeat: int = 3, fresh=None) -> float:
    """Best CPU µs per call over ``repeat`` rounds (``fresh()`` makes each round's ``fn``)."""
    best = float("inf")
    for _ in range(repeat):
        call = fresh() if fresh else fn
        start = time.process_time()
        for item in items:
            call(item)
        best = min(best, time.process_time() - start)
    return best / len(items) * 1e6


def transform_costs(transform_factory: Callable[[], MaskTransform], raw: list[bytes], keyring) -> tuple[float, float]:
    """(µs CPU per record of the whole transform, µs of the primitives it cannot avoid)."""
    transform = transform_factory()
    codecs = Codecs()
    decoded = [codecs.raw._decode(v) for v in raw[:5000]]
    bodies = [d["body"] for d in decoded]
    masked = [codecs.masked._decode(transform(None, v, "b").value) for v in raw[:5000]]
    siv = AESSIV(next(iter(keyring.encryption_keys.values())))
    key = next(iter(keyring.active_join_keys().values()))
    block = bytes(256)
    ad = [b"ip", b"k1", b"v2", b"h1." + b"x" * 43]

    def fastavro_decode(v: bytes) -> object:
        return fastavro.schemaless_reader(io.BytesIO(v[10:]), codecs.raw.schema, None)

    def fastavro_encode(d: dict) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, codecs.masked.schema, d)
        return buf.getvalue()

    def floor_once() -> float:
        return (
            2 * _cpu_per_call(lambda _: siv.encrypt(block, ad), bodies, repeat=1)
            + 2 * _cpu_per_call(lambda b: hmac_module.digest(key, b[:12].encode(), "sha256"), bodies, repeat=1)
            + _cpu_per_call(json.loads, bodies, repeat=1)
            + _cpu_per_call(fastavro_decode, raw[:5000], repeat=1)
            + _cpu_per_call(fastavro_encode, masked, repeat=1)
        )

    def whole_once() -> float:  # a fresh transform (empty cache) each round: no value seen before
        t = transform_factory()
        return _cpu_per_call(lambda v: t(None, v, "bench"), raw, repeat=1)

    # Interleaved rounds, best of each: the machine's load changes under both alike.
    rounds = [(whole_once(), floor_once()) for _ in range(5)]
    return min(w for w, _ in rounds), min(f for _, f in rounds)


def core_costs(
    transform_factory: Callable[[], MaskTransform], raw: list[bytes], batch: int
) -> tuple[float, float] | None:
    """(µs CPU per record of ``MaskTransform.batch`` in the stage's batch size, the share of
    records the compiled core declined); a fresh transform per round, best of 5. None
    without the core (make bench sets STREAMS_REQUIRE_CORE=1: an error there)."""
    messages = [(None, v, "bench") for v in raw]
    best, declined = float("inf"), 0.0
    for _ in range(5):
        t = transform_factory()
        if t.core is None:
            return None
        start = time.process_time()
        for i in range(0, len(messages), batch):
            t.batch(messages[i : i + batch])
        best = min(best, time.process_time() - start)
        declined = t.core_declined / max(t.core_declined + t.core_masked, 1)
    return best / len(messages) * 1e6, declined


# --- SQS helpers ---------------------------------------------------------------------------


def seed(settings, bodies: list[str], concurrency: int = 16) -> None:
    async def go() -> None:
        async with sqs_client(settings, max_pool=concurrency + 2) as sqs:
            url = await queue_url(sqs, settings)
            chunk = len(bodies) // concurrency + 10
            await asyncio.gather(*(send_bodies(sqs, url, bodies[i : i + chunk]) for i in range(0, len(bodies), chunk)))

    asyncio.run(go())


class QueueProgress:
    """Messages deleted from a queue seeded with ``total`` (visible + in flight = not yet)."""

    def __init__(self, settings, total: int) -> None:
        import botocore.session

        self.client = botocore.session.get_session().create_client(
            "sqs",
            endpoint_url=settings.sqs_endpoint,
            region_name=settings.sqs_region,
            aws_access_key_id=settings.aws_access_key_id.get_secret_value(),
            aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
        )
        self.url = self.client.create_queue(QueueName=settings.sqs_queue)["QueueUrl"]
        self.total = total

    def __call__(self) -> int:
        attrs = self.client.get_queue_attributes(
            QueueUrl=self.url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )["Attributes"]
        return (
            self.total - int(attrs["ApproximateNumberOfMessages"]) - int(attrs["ApproximateNumberOfMessagesNotVisible"])
        )


def row_counter(dsn: str) -> Callable[[], int]:
    """Rows in ``user_logins`` of one database (0 before its migration), on one connection."""
    import asyncpg

    loop = asyncio.new_event_loop()
    conn = None

    def count() -> int:
        nonlocal conn
        try:
            if conn is None:
                conn = loop.run_until_complete(asyncpg.connect(dsn))
            return loop.run_until_complete(conn.fetchval("SELECT count(*) FROM user_logins"))
        except asyncpg.UndefinedTableError:
            return 0
        except (OSError, asyncpg.PostgresError):
            conn = None
            return 0

    return count


# --- the run -------------------------------------------------------------------------------


def _check(name: str, got: dict, expected: dict) -> str:
    if got == expected:
        return f"{name}: {len(got)} outputs identical byte for byte"
    missing = len(set(expected) - set(got))
    differ = sum(1 for k, v in got.items() if k in expected and expected[k] != v)
    return f"{name}: MISMATCH ({missing} missing, {differ} different, {len(set(got) - set(expected))} unexpected)"


def _outputs(settings, topic: str) -> dict:
    return dict(read_topic(settings, topic))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=int(os.environ.get("BENCH_MESSAGES", 20_000)))
    parser.add_argument(
        "--kafka-messages",
        type=int,
        default=int(os.environ.get("BENCH_KAFKA_MESSAGES", 100_000)),
        help="backlog of the Kafka and sink rows (they run 5-50x faster than SQS allows)",
    )
    parser.add_argument("--pollers", type=int, default=int(os.environ.get("BENCH_POLLERS", 4)))
    parser.add_argument(
        "--bridge-rounds", type=int, default=3, help="interleaved rounds of bridge and bare SQS loop (their medians)"
    )
    parser.add_argument("--rss-backlogs", default=os.environ.get("BENCH_RSS_BACKLOGS", "10000,100000"))
    parser.add_argument(
        "--min-bare-copy",
        type=float,
        default=float(os.environ.get("BENCH_MIN_BARE_COPY", 40_000)),
        help="ev/s below which the bare byte-copy loop marks the run invalid",
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--transform-costs", type=int, help=argparse.SUPPRESS)  # the child that measures them
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to skip: kafka,sink,bridge,e2e,rss (the sink without kafka reads the golden output)",
    )
    args = parser.parse_args(argv)
    if args.transform_costs:
        from streams.settings import load_settings

        settings = load_settings()
        keyring = settings_keyring(settings)
        raw = [v for _, _, v in raw_records("t", logins(args.transform_costs))]
        whole, floor = transform_costs(
            lambda: MaskTransform(Masker(keyring, cache_size=settings.mask_cache_size), Codecs()), raw, keyring
        )
        core = core_costs(
            lambda: MaskTransform(Masker(keyring, cache_size=settings.mask_cache_size), Codecs()),
            raw,
            settings.batch_size,
        )
        if core:
            print(f"core {core[0]:.2f} {core[1]:.6f}")
        print(f"{whole:.2f} {floor:.2f}")
        return 0
    skip = set(filter(None, args.skip.split(",")))
    n, nk = args.messages, args.kafka_messages
    load_before = os.getloadavg()
    started = time.monotonic()
    sb = Sandbox("bench")
    results: list[tuple[str, Result | None, str]] = []  # (group, result, target note)
    checks: list[str] = []
    invalid: list[str] = []
    try:
        s = sb.settings
        keyring = settings_keyring(s)  # the sandbox's dev keys, shared with every child
        bodies = logins(max(n, nk))
        raw = raw_records(s.raw_topic, bodies[:nk])
        bodies = bodies[:n]
        print(
            f"bench: {nk} / {n} distinct logins (Kafka / SQS), {PARTITIONS} partitions, {args.pollers} pollers; "
            f"load average {load_before[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )
        fill(s, raw)
        codecs = Codecs()
        golden_transform = MaskTransform(Masker(keyring), codecs)
        expected = {k: golden_transform(k, v, "golden").value for _, k, v in raw}
        # In a process of its own: this one's heap (the expected outputs) would slow it.
        costs = subprocess.run(
            python("-m", "benchmarks.run", "--transform-costs", "20000"),
            env={**os.environ, **sb.env()},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        transform_row = (float(costs[-2]), float(costs[-1]))
        core_row = (
            (float(costs[costs.index("core") + 1]), float(costs[costs.index("core") + 2])) if "core" in costs else None
        )

        def kafka_run(name: str, cmd: list[str], group: str, out: str, **env: str) -> Result:
            child_env = sb.env(
                STREAMS_APP_ID=group,
                STREAMS_MASKED_TOPIC=out,
                STREAMS_STAGES="mask",
                STREAMS_LOG_LEVEL="WARNING",
                **env,
            )
            ensure_topics(settings_from_env(child_env))  # so the progress reader sees 6 partitions from the start
            register_schemas(settings_from_env(child_env))  # sb.topic() named the topic first: env() skipped this
            progress = TopicProgress(s, out, PARTITIONS)
            try:
                return measure(name, [cmd], child_env, nk, progress, args.timeout)
            finally:
                progress.close()

        masked_topic = sb.topic("masked-stage")
        if "kafka" not in skip:
            g = sb.group("mask")
            mask = kafka_run("mask stage", python("-m", "streams", "worker"), g, masked_topic)
            checks.append(_check("mask stage vs golden transform", _outputs(s, masked_topic), expected))
            g = sb.group("mask-nodedup")
            out = sb.topic("masked-nodedup")
            mask_nodedup = kafka_run(
                "mask stage, dedup window off", python("-m", "streams", "worker"), g, out, STREAMS_DEDUP_WINDOW="0"
            )
            checks.append(_check("mask stage (dedup off) vs golden transform", _outputs(s, out), expected))
            g = sb.group("bare-mask")
            out = sb.topic("masked-bare")
            bare_mask = kafka_run("bare mask loop", python("-m", "benchmarks.bare", "kafka-mask", out, g), g, out)
            checks.append(_check("bare mask loop vs golden transform", _outputs(s, out), expected))
            g = sb.group("bare-mask-txn")
            out = sb.topic("masked-bare-txn")
            bare_txn = kafka_run(
                "bare transactional mask loop", python("-m", "benchmarks.bare", "kafka-mask-txn", out, g), g, out
            )
            checks.append(_check("bare transactional loop vs golden transform", _outputs(s, out), expected))
            g = sb.group("copy-agent")
            out = sb.topic("copy-agent")
            copy_agent = kafka_run("agent byte copy", python("-m", "benchmarks.copy_worker"), g, out)
            inputs = {k: v for _, k, v in raw}
            checks.append(_check("agent byte copy vs its input", _outputs(s, out), inputs))
            g = sb.group("copy-bare")
            out = sb.topic("copy-bare")
            copy_bare = kafka_run("bare byte copy", python("-m", "benchmarks.bare", "kafka-copy", out, g), g, out)
            checks.append(_check("bare byte copy vs its input", _outputs(s, out), inputs))
            results += [
                ("mask", mask, "target ≥ 0.8× bare loop and ≥ 25,000 ev/s"),
                ("mask", mask_nodedup, "the stage without its dedup changelog writes"),
                ("mask", bare_mask, "comparator"),
                ("mask", bare_txn, "comparator (EOS, same commit interval as the stage)"),
                ("copy", copy_agent, "target ≥ 50,000 ev/s"),
                ("copy", copy_bare, "comparator (plausibility floor)"),
            ]
            if copy_bare.rate is None or copy_bare.rate < args.min_bare_copy:
                invalid.append(
                    f"bare byte copy at {copy_bare.rate or 0:,.0f} ev/s < {args.min_bare_copy:,.0f} (--min-bare-copy)"
                )
            if copy_bare.rate and copy_agent.rate and copy_bare.rate < copy_agent.rate:
                invalid.append("bare byte copy slower than the Faust agent doing the same")
            if bare_mask.rate and mask.rate and bare_mask.rate < mask.rate:
                invalid.append("bare mask loop slower than the mask stage")

        if "sink" not in skip:
            if "kafka" in skip:  # the sink part alone: its input is the golden transform's output
                sink_input = settings_from_env(sb.env(STREAMS_MASKED_TOPIC=masked_topic))
                ensure_topics(sink_input)
                register_schemas(sink_input)  # what the mask stage's run would have done
                fill(s, [(masked_topic, k, v) for k, v in expected.items()])
            dsn = sb.new_database("sink")
            g = sb.group("sink")
            env = sb.env(
                STREAMS_APP_ID=g,
                STREAMS_MASKED_TOPIC=masked_topic,
                STREAMS_STAGES="sink",
                STREAMS_PG_DSN=dsn,
                STREAMS_LOG_LEVEL="WARNING",
            )
            sink = measure("sink stage", [python("-m", "streams", "worker")], env, nk, row_counter(dsn), args.timeout)
            rows = row_counter(dsn)()
            checks.append(f"sink stage: {rows} rows for {nk} records" + ("" if rows == nk else " MISMATCH"))
            comparators = []
            for kind, label in (("pg-copy", "COPY into both tables"), ("pg-write", "sink write path alone")):
                dsn = sb.new_database(kind.replace("-", "_"))
                env = sb.env(STREAMS_MASKED_TOPIC=masked_topic, STREAMS_LOG_LEVEL="WARNING")
                r = measure(
                    label, [python("-m", "benchmarks.bare", kind, dsn)], env, nk, row_counter(dsn), args.timeout
                )
                comparators.append(r)
            results += [
                ("sink", sink, "target ≥ 0.7× COPY, ≤ 20 µs CPU per row"),
                ("sink", comparators[0], "comparator"),
                ("sink", comparators[1], "the sink's SQL alone"),
            ]
            if comparators[0].rate and sink.rate and comparators[0].rate < sink.rate:
                invalid.append("COPY slower than the sink stage")

        if "bridge" not in skip:
            from benchmarks.bridge import BARE, BRIDGE, bridge_rounds, median_rows

            medians = median_rows(bridge_rounds(sb, bodies, args.pollers, args.bridge_rounds, args.timeout, checks))
            results += [
                ("bridge", medians[BRIDGE], f"target ≥ 0.9× bare SQS loop; median of {args.bridge_rounds} rounds"),
                ("bridge", medians[BARE], "comparator"),
            ]

        if "e2e" not in skip:
            dsn = sb.new_database("e2e")
            env = sb.env(
                STREAMS_SQS_QUEUE=f"{s.sqs_queue}-e2e",
                STREAMS_RAW_TOPIC=sb.topic("raw-e2e"),
                STREAMS_MASKED_TOPIC=sb.topic("masked-e2e"),
                STREAMS_DLQ_TOPIC=sb.topic("dlq-e2e"),
                STREAMS_APP_ID=sb.group("e2e"),
                STREAMS_PG_DSN=dsn,
                STREAMS_BRIDGE_POLLERS=str(args.pollers),
                STREAMS_LOG_LEVEL="WARNING",
            )
            seed(settings_from_env(env), bodies)
            e2e = measure(
                "end to end",
                [python("-m", "streams", "worker"), python("-m", "streams", "bridge")],
                env,
                n,
                row_counter(dsn),
                args.timeout,
            )
            rows = row_counter(dsn)()
            checks.append(f"end to end: {rows} rows for {n} messages" + ("" if rows == n else " MISMATCH"))
            results.append(("e2e", e2e, "target ≥ 0.8× bare SQS loop"))

        rss: list[tuple[int, Result]] = []
        if "rss" not in skip:
            for backlog in (int(b) for b in args.rss_backlogs.split(",") if b):
                topic = sb.topic(f"raw-rss{backlog}")
                dsn = sb.new_database(f"rss{backlog}")
                env = sb.env(
                    STREAMS_RAW_TOPIC=topic,
                    STREAMS_MASKED_TOPIC=sb.topic(f"masked-rss{backlog}"),
                    STREAMS_DLQ_TOPIC=sb.topic(f"dlq-rss{backlog}"),
                    STREAMS_APP_ID=sb.group(f"rss{backlog}"),
                    STREAMS_PG_DSN=dsn,
                    STREAMS_LOG_LEVEL="WARNING",
                )
                rs = settings_from_env(env)
                ensure_topics(rs)
                more = logins(backlog, seed=backlog)
                for i in range(0, backlog, 100_000):
                    fill(rs, raw_records(topic, more[i : i + 100_000], first=i))
                r = measure(
                    f"worker, backlog {backlog}",
                    [python("-m", "streams", "worker")],
                    env,
                    backlog,
                    row_counter(dsn),
                    args.timeout * max(1, backlog // nk),
                )
                rss.append((backlog, r))
    finally:
        sb.close()

    load_after = os.getloadavg()
    for check in checks:
        if "MISMATCH" in check:
            invalid.append(check)
    _print_table(
        n,
        args,
        results,
        transform_row if "transform_row" in locals() else None,
        rss,
        load_before,
        load_after,
        time.monotonic() - started,
        core_row if "core_row" in locals() else None,
    )
    print()
    for check in checks:
        print(f"check: {check}")
    for r in [r for _, r, _ in results if r] + [r for _, r in rss]:
        for note in r.notes:
            print(f"note: {r.name}: {note}")
    if invalid:
        print("\nRUN INVALID: " + "; ".join(invalid))
        return 1
    return 0


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


def _print_table(n, args, results, transform_row, rss, load_before, load_after, seconds, core_row=None) -> None:
    print()
    print(
        f"`python -m benchmarks.run --messages {n} --kafka-messages {args.kafka_messages} --pollers {args.pollers} "
        f"--bridge-rounds {args.bridge_rounds} "
        f"--rss-backlogs {args.rss_backlogs}`: "
        f"{seconds:.0f} s, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after, "
        f"{os.cpu_count()} cores"
    )
    print()
    print("| stage | row | steady ev/s | CPU s / 100k | × comparator | note |")
    print("|---|---|---:|---:|---:|---|")
    if transform_row:
        whole, floor = transform_row
        print(
            f"| mask transform alone | MaskTransform, distinct values | {1e6 / whole:,.0f} | {whole / 10:.2f} | | "
            f"{whole:.1f} µs CPU/record (target ≤ 20); the primitives alone, stock calls: {floor:.1f} µs |"
        )
        if core_row:
            core_us, declined = core_row
            print(
                f"| | MaskTransform.batch, compiled core | {1e6 / core_us:,.0f} | {core_us / 10:.2f} | "
                f"{whole / core_us:.2f} | {core_us:.1f} µs CPU/record (target ≤ 10; × is the reference's µs "
                f"over the core's); {declined:.2%} of records declined by the core (masked by the reference) |"
            )
    by_group: dict[str, list[tuple[Result, str]]] = {}
    for group, r, note in results:
        by_group.setdefault(group, []).append((r, note))
    labels = {
        "mask": "mask stage",
        "copy": "agent shape, byte copy",
        "sink": "sink stage",
        "bridge": "bridge",
        "e2e": "end to end",
    }
    bare_sqs = next((r for g, r, _ in results if g == "bridge" and r.name == "bare SQS loop"), None)
    for group, rows in by_group.items():
        base = rows[1][0] if len(rows) > 1 else bare_sqs if group == "e2e" else None
        for i, (r, note) in enumerate(rows):
            ratio = ""
            if i == 0 and base is not None and base.rate and r.rate:
                ratio = f"{r.rate / base.rate:.2f}"
            print(
                f"| {labels[group] if i == 0 else ''} | {r.name} | {_fmt(r.rate)} | {_fmt(r.cpu_per_100k, '.2f')} | "
                f"{ratio} | {note} |"
            )
    for backlog, r in rss:
        print(
            f"| worker peak RSS | mask,sink, backlog {backlog:,} | {_fmt(r.rate)} | {_fmt(r.cpu_per_100k, '.2f')} | | "
            f"peak RSS {_fmt(r.peak_rss_mib, '.0f')} MiB (target ≤ 200) |"
        )


if __name__ == "__main__":
    sys.exit(main())
