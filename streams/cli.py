"""The ``streams`` command line: one entry point for every stage and tool.

Every expected failure (bad argument, bad setting, missing service or key) ends in one
line on stderr naming the fix, and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import signal
import sys
from pathlib import Path

from streams.keys import KeyMaterialError
from streams.settings import ConfigError, Settings, load_settings


from streams.errors import CommandError

COMMAND_GROUPS = ("streams.commands.privacy", "streams.commands.operations")


def _stack(settings: Settings, args) -> None:
    from streams import stack

    if args.action == "up":
        stack.up(settings)
    elif args.action == "down":
        stack.down(settings)
    else:
        rows = stack.status(settings)
        for s in rows:
            print(f"{s.name:9} {'up  ' if s.running else 'down'}  port {s.port}  pid {s.pid or '-'}  {s.detail or ''}")
        if not all(s.running for s in rows):
            sys.exit(3)


def _send_file(settings: Settings, path: str, repeat: int = 1) -> int:
    """Send a JSON array file to the queue; returns how many messages were sent."""
    from streams.sqs import bodies_from_json, ensure_queue, send_bodies, sqs_client

    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CommandError(f"seed: no such file {path}") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"seed: {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise CommandError(f"seed: {path} must hold a JSON array of records")
    bodies = bodies_from_json(records) * repeat

    async def send() -> int:
        async with sqs_client(settings) as sqs:
            url = await ensure_queue(sqs, settings.sqs_queue)
            return len(await send_bodies(sqs, url, bodies))

    return asyncio.run(send())


def _seed(settings: Settings, args) -> None:
    print(f"sent {_send_file(settings, args.file, args.repeat)} messages to {settings.sqs_queue}")


def _bridge(settings: Settings, args) -> None:
    from streams.bridge import Bridge
    from streams.kafka import ensure_topics

    _preflight_kafka(settings, ensure_topics)

    async def run() -> None:
        bridge = Bridge(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop)
        await bridge.run()

    asyncio.run(run())


def _preflight_kafka(settings: Settings, ensure_topics) -> None:
    try:
        ensure_topics(settings, timeout=15)
    except Exception as exc:
        raise CommandError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} ({type(exc).__name__}): "
            "start it with `streams stack up` or set STREAMS_KAFKA_BOOTSTRAP"
        ) from None


def _preflight_postgres(settings: Settings) -> None:
    from streams.database import connect, migrate

    async def check() -> None:
        conn = await asyncio.wait_for(connect(settings.pg_dsn.get_secret_value()), 15)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    try:
        asyncio.run(check())
    except Exception as exc:
        raise CommandError(
            f"cannot prepare PostgreSQL ({type(exc).__name__}): start it with `streams stack up` or set STREAMS_PG_DSN"
        ) from None


def _worker(settings: Settings, args) -> None:
    import faust

    from streams.kafka import ensure_topics
    from streams.keys import load_keyring
    from streams.worker import create_app

    keyring = load_keyring(settings.keys_file)
    _preflight_kafka(settings, ensure_topics)
    if "sink" in settings.stage_list:
        _preflight_postgres(settings)
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = create_app(settings, keyring)
    faust.Worker(app, loglevel=args.log_level, quiet=True).execute_from_commandline()


def _ping(settings: Settings, args) -> None:
    from streams.health import CHECKS

    unknown = set(args.services) - set(CHECKS)
    if unknown:
        raise CommandError(f"unknown service {sorted(unknown)[0]!r}: choose from {', '.join(CHECKS)}")
    for name in args.services or list(CHECKS):
        try:
            CHECKS[name](settings, args.timeout)
        except Exception as exc:
            raise CommandError(f"{name} does not answer ({type(exc).__name__}): check its setting and that it runs") from None
        print(f"{name} ok")


def _run(settings: Settings, args) -> None:
    from streams.runner import run_pipeline

    if args.seed:
        print(f"seeded {_send_file(settings, args.seed)} messages into {settings.sqs_queue}")
    sys.exit(run_pipeline(settings, drain=args.drain))


def _migrate(settings: Settings, args) -> None:
    _preflight_postgres(settings)
    print("migrations applied")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streams", description="Login-event pipeline: SQS -> Kafka -> mask -> PostgreSQL.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stack", help="manage the local process stack (Kafka, PostgreSQL, ElasticMQ)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_stack)

    p = sub.add_parser("seed", help="send a JSON array of records to the SQS queue")
    p.add_argument("file", help="JSON array; objects are sent as JSON, strings verbatim")
    p.add_argument("--repeat", type=int, default=1, help="send the file this many times")
    p.set_defaults(func=_seed)

    p = sub.add_parser("bridge", help="move messages from SQS to the raw topic until SIGTERM")
    p.set_defaults(func=_bridge)

    p = sub.add_parser("worker", help="run the mask and sink agents (STREAMS_STAGES) until SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_worker)

    p = sub.add_parser("run", help="run bridge and worker together, printing progress")
    p.add_argument("--drain", action="store_true", help="exit once the queue is empty and the sink caught up")
    p.add_argument("--seed", metavar="FILE", help="seed the queue with this JSON file first")
    p.set_defaults(func=_run)

    p = sub.add_parser("ping", help="check that services answer (exit 0 when all do)")
    p.add_argument("services", nargs="*", metavar="SERVICE", help="kafka, postgres, sqs (default: all)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_ping)

    p = sub.add_parser("migrate", help="apply pending database migrations")
    p.set_defaults(func=_migrate)

    for module in COMMAND_GROUPS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from streams.logs import setup_logging
    from streams.stack import StackError

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
        args.func(settings, args)
    except (ConfigError, CommandError, KeyMaterialError, StackError) as exc:
        print(f"streams {args.command}: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
