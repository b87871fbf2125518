"""``streams seed|bridge|worker|run|ping|migrate``: run the pipeline and check its peers."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from streams import faults
from streams.errors import Refused, StreamsError
from streams.settings import Settings


def _seed_file(settings: Settings, path: str, repeat: int = 1) -> int:
    from streams.io.sqs import bodies_from_file, send_to_queue

    return len(asyncio.run(send_to_queue(settings, bodies_from_file(Path(path)) * repeat)))


def _seed(settings: Settings, args) -> None:
    print(f"sent {_seed_file(settings, args.file, args.repeat)} messages to {settings.sqs_queue}")


def _bridge(settings: Settings, args) -> None:
    from streams.pipeline.bridge import run_bridge
    from streams.privacy.hardening import no_core_dumps

    no_core_dumps()  # plaintext bodies in memory
    faults.configure(settings.fault)
    run_bridge(settings)


def _worker(settings: Settings, args) -> None:
    from streams.pipeline.startup import start_checks
    from streams.privacy.hardening import no_core_dumps

    no_core_dumps()  # keys and plaintext values in memory
    faults.configure(settings.fault)
    if args.log_level:
        settings = settings.model_copy(update={"log_level": args.log_level})
    checks = start_checks(settings)  # on threads, while Faust is imported
    from streams.pipeline.app import run_worker

    run_worker(settings, checks)


def _ping(settings: Settings, args) -> None:
    from streams.ops.ping import CHECKS

    unknown = set(args.services) - set(CHECKS)
    if unknown:
        raise Refused(f"unknown service {sorted(unknown)[0]!r}: choose from {', '.join(CHECKS)}")
    for name in args.services or list(CHECKS):
        try:
            CHECKS[name](settings, args.timeout)
        except StreamsError as exc:  # already one line naming the setting
            raise Refused(f"{name}: {exc}") from None
        except Exception as exc:
            raise Refused(
                f"{name} does not answer ({type(exc).__name__}): check its setting and that it runs"
            ) from None
        print(f"{name} ok")


def _run(settings: Settings, args) -> None:
    from streams.ops.run import run_pipeline

    if args.seed:
        print(f"seeded {_seed_file(settings, args.seed)} messages into {settings.sqs_queue}")
    sys.exit(run_pipeline(settings, drain=args.drain))


def _migrate(settings: Settings, args) -> None:
    from streams.io.postgres import require_migrated
    from streams.ops import schemas

    applied = require_migrated(settings.pg_dsn.get_secret_value())
    print(f"migrations applied: {', '.join(applied) or 'none pending'}")
    for line in schemas.register(settings):  # the deploy step: the registry's schemas too
        print(line)


def register(sub) -> None:
    p = sub.add_parser("seed", help="send a JSON array of records to the SQS queue")
    p.add_argument("file", help="JSON array; objects are sent as JSON, strings verbatim")
    p.add_argument("--repeat", type=int, default=1, help="send the file this many times")
    p.set_defaults(func=_seed)

    p = sub.add_parser("bridge", help="move messages from SQS to the raw topic until SIGTERM")
    p.set_defaults(func=_bridge)

    p = sub.add_parser("worker", help="run the mask and sink agents (STREAMS_STAGES) until SIGTERM")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: STREAMS_LOG_LEVEL")
    p.set_defaults(func=_worker)

    p = sub.add_parser("run", help="run bridge and worker together, printing progress")
    p.add_argument("--drain", action="store_true", help="exit once the queue is empty and the sink caught up")
    p.add_argument("--seed", metavar="FILE", help="seed the queue with this JSON file first")
    p.set_defaults(func=_run)

    p = sub.add_parser("ping", help="check that services answer (exit 0 when all do)")
    p.add_argument("services", nargs="*", metavar="SERVICE", help="kafka, postgres, sqs (default: all)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_ping)

    p = sub.add_parser("migrate", help="apply pending database migrations and register the schemas")
    p.set_defaults(func=_migrate)
