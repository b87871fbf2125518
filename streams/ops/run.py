"""``streams run``: the bridge and a worker as child processes, with progress and a summary.

It runs ``streams migrate`` first (and registers the schemas), as whoever STREAMS_PG_DSN names (the worker itself
only checks the schema version). Children log to files under ``STREAMS_LOG_DIR``; this process prints one progress line
every few seconds. Ctrl-C (or SIGTERM) stops both children cleanly. With ``drain`` it
stops once the queue is empty and both stages have committed everything. It needs no
development tooling: any reachable Kafka, SQS and PostgreSQL will do.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from streams.io.postgres import fetch, require_migrated
from streams.ops import children
from streams.ops.state import current_queue_depth, dead_letter_counts, pipeline_lag, row_count
from streams.settings import Settings

PROGRESS_EVERY = 2.0


def print_summary(settings: Settings) -> None:
    rows = asyncio.run(row_count(settings))
    print(f"\nrows in user_logins: {rows}")
    counts = dead_letter_counts(settings)
    print(
        f"dead letters: {sum(counts.values())}" + "".join(f"\n  {reason}: {n}" for reason, n in sorted(counts.items()))
    )
    sealed, vault = asyncio.run(
        fetch(
            settings.pg_dsn.get_secret_value(),
            "SELECT (SELECT count(*) FROM sealed_values) AS sealed, (SELECT count(*) FROM pii_vault) AS vault",
        )
    )[0].values()
    # Per-user key mode writes sealed values (opened only through KMS), keyring mode the vault.
    print(f"sealed values: {sealed}, pii_vault entries: {vault}")
    print("a few masked rows:")
    sample = asyncio.run(
        fetch(
            settings.pg_dsn.get_secret_value(),
            "SELECT user_id, device_type, masked_ip, masked_device_id, locale, app_version, app_version_raw, create_date"
            " FROM user_logins ORDER BY sent_at, message_id LIMIT 3",
        )
    )
    for row in sample:
        print("  " + " | ".join(f"{k}={v}" for k, v in row.items()))


def run_pipeline(settings: Settings, drain: bool = False) -> int:
    """Migrate (the worker never does: its role needs only DML), then run both stages."""
    from streams.ops import schemas

    applied = require_migrated(settings.pg_dsn.get_secret_value())
    if applied:
        print(f"migrations applied: {', '.join(applied)}")
    schemas.register(settings)  # with a schema registry: `streams migrate` registers the schemas too
    log_dir = settings.log_dir
    # With STREAMS_METRICS_PORT=P the bridge serves on P and the worker on P+1.
    port = settings.metrics_port
    envs = [{"STREAMS_METRICS_PORT": str(port + i)} if port else {} for i in range(2)]
    envs[1]["STREAMS_WORKER_SLOT"] = "0"  # the worker is child 0: a restart fences the old one at once
    procs = [
        children.start_stage(c, log_dir / f"{c}.log", env) for c, env in zip(("bridge", "worker"), envs, strict=True)
    ]
    print(f"bridge pid {procs[0].pid}, worker pid {procs[1].pid}; logs in {log_dir}")
    if port:
        print(f"metrics: curl http://127.0.0.1:{port}/metrics (bridge), http://127.0.0.1:{port + 1}/metrics (worker)")
    stop_requested = False

    def request_stop(*_):
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    started = time.monotonic()
    settled = 0
    try:
        while not stop_requested:
            time.sleep(PROGRESS_EVERY)
            if any(c.poll() is not None for c in procs):
                print("a child process exited; see its log", file=sys.stderr)
                break
            depth = asyncio.run(current_queue_depth(settings))
            lag = pipeline_lag(settings)
            rows = asyncio.run(row_count(settings))
            print(f"[{time.monotonic() - started:6.1f}s] queue {depth} | uncommitted {lag} | rows {rows}", flush=True)
            settled = settled + 1 if depth == 0 and lag == 0 else 0
            if drain and settled >= 2:
                break
    finally:
        code = children.stop(procs)
    print(f"stopped (exit codes {[c.returncode for c in procs]})")
    if drain:
        print_summary(settings)
    return 0 if code in (0, -signal.SIGTERM) else 1
