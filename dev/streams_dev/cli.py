"""``streams stack up|down|status|env``: joins the ``streams`` CLI through an entry point."""

from __future__ import annotations

import sys

from streams.settings import Settings


def _stack(settings: Settings, args) -> None:
    from streams_dev import stack

    # Without --brokers: the Kafka already running in this stack dir, else STREAMS_KAFKA_BROKERS.
    brokers = args.brokers or stack.running_brokers(settings) or settings.kafka_brokers
    settings = settings.model_copy(update={"kafka_brokers": brokers})
    if args.action == "up":
        stack.up(settings)
        if brokers > 1:
            print(f'{brokers} Kafka brokers: point processes at them with  eval "$(streams stack env)"')
    elif args.action == "down":
        stack.down(settings)
    elif args.action == "env":
        for name, value in stack.client_env(settings).items():
            print(f"export {name}={value}")
    else:
        rows = stack.status(settings)
        for s in rows:
            print(f"{s.name:9} {'up  ' if s.running else 'down'}  port {s.port}  pid {s.pid or '-'}  {s.detail or ''}")
        if not all(s.running for s in rows):
            sys.exit(3)


def _brokers(text: str) -> int:
    import argparse

    if not text.isdigit() or not 1 <= int(text) <= 9:
        raise argparse.ArgumentTypeError(f"expected a number of brokers from 1 to 9, got {text!r}")
    return int(text)


def register(sub) -> None:
    p = sub.add_parser(
        "stack", help="manage the local process stack (Kafka, PostgreSQL, ElasticMQ, Apicurio Registry, moto KMS)"
    )
    p.add_argument(
        "action",
        choices=["up", "down", "status", "env"],
        help="env: the STREAMS_* settings that point processes at this stack's Kafka (for eval)",
    )
    p.add_argument(
        "--brokers",
        type=_brokers,
        default=None,
        help="Kafka nodes (1, or 3 for failover tests: replication 3, min.insync 2); "
        "default: what runs, else STREAMS_KAFKA_BROKERS (1)",
    )
    p.set_defaults(func=_stack)
