"""The ``streams`` command line: argument parsing, and every expected failure as one line.

Each command group is a module here (pipeline, ops, privacy) that parses and calls the
domain code. Development commands (``streams stack``) join through the
``streams.commands`` entry point when the streams-dev package is installed.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from streams.cli import erasure, ops, pipeline, privacy, topics
from streams.errors import ConfigError, StreamsError
from streams.logs import setup_logging
from streams.settings import load_settings

DEV_HINT = "development commands (stack) need the dev package: pip install -e dev/ (make install does it)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streams", description="Login-event pipeline: SQS -> Kafka -> mask -> PostgreSQL.", epilog=None
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (pipeline, ops, topics, privacy, erasure):
        group.register(sub)
    plugins = entry_points(group="streams.commands")
    for plugin in plugins:
        plugin.load()(sub)
    if not plugins:
        parser.epilog = DEV_HINT
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level, settings.log_format)
        args.func(settings, args)
    except StreamsError as exc:
        print(f"streams {args.command}: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
