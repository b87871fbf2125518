"""``streams stack up|down|status``: joins the ``streams`` CLI through an entry point."""

from __future__ import annotations

import sys

from streams.settings import Settings


def _stack(settings: Settings, args) -> None:
    from streams_dev import stack

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


def register(sub) -> None:
    p = sub.add_parser(
        "stack", help="manage the local process stack (Kafka, PostgreSQL, ElasticMQ, Apicurio Registry, moto KMS)"
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_stack)
