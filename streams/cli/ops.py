"""``streams replay|status|dlq``: operate a running pipeline (see docs/operations.md)."""

from __future__ import annotations

from streams.errors import Refused
from streams.settings import Settings


def _replay(settings: Settings, args) -> None:
    from streams.ops.replay import parse_target, reset_offsets
    from streams.ops.topology import stage_group

    target = parse_target(args.to)
    moves = _kafka_call(lambda: reset_offsets(settings, args.stage, target, dry_run=args.dry_run), settings)
    verb = "would move" if args.dry_run else "moved"
    print(f"{verb} group {stage_group(settings, args.stage)} stage {args.stage} to {args.to}:")
    for m in moves:
        before = "-" if m.before is None else m.before
        print(f"  partition {m.partition}: {before} -> {m.after}")
    if not args.dry_run:
        print("start the workers (`streams worker`) to reprocess")


def _status(settings: Settings, args) -> None:
    from streams.ops.status import follow, metrics_url, render, serve, snapshot

    if not args.web and (args.metrics or args.port is not None):
        raise Refused("--port and --metrics go with --web (the status page)")
    if args.web:
        if args.follow:
            raise Refused("--web and --follow are two views: choose one")
        if args.port is None:
            args.port = "8095"
        if not args.port.isdigit() or not 0 < int(args.port) < 65536:
            raise Refused(f"--port {args.port!r}: give a TCP port number from 1 to 65535")
        interval = 5.0 if args.interval is None else args.interval
        if interval <= 0:
            raise Refused("--interval must be above 0 seconds")
        urls = [metrics_url(url) for url in args.metrics]
        _kafka_call(lambda: serve(settings, int(args.port), urls, interval), settings)
    elif args.follow:
        interval = 2.0 if args.interval is None else args.interval
        _kafka_call(lambda: follow(settings, interval, until_idle=args.until_idle), settings)
    else:
        print(render(settings, _kafka_call(lambda: snapshot(settings), settings)))


def _dlq(settings: Settings, args) -> None:
    from streams.ops import dlq
    from streams.ops.state import dead_letters

    if args.action == "list":
        summaries = dlq.summarize(_kafka_call(lambda: dead_letters(settings), settings), args.sample)
        if not summaries:
            print(f"no dead letters in {settings.dlq_topic}")
        for s in summaries:
            print(f"{s.stage:5} {s.reason:22} {s.count:6d}  e.g. {', '.join(s.message_ids)}")
        return
    counts = _kafka_call(lambda: dlq.redrive(settings, args.reason, args.id, args.stage, args.dry_run), settings)
    verb = "would redrive" if args.dry_run else "redrove"
    erased = counts.pop(dlq.DROPPED_ERASED, 0)
    print(f"{verb} {sum(counts.values())} dead letters" + "".join(f"; {n} to {t}" for t, n in counts.items()))
    if erased:
        print(f"dropped {erased} dead letter(s) of erased users (streams erase): not sent")


def _kafka_call(fn, settings: Settings):
    """Check the connection first (wrong credentials or an untrusted CA: one line naming the
    setting, bounded by STREAMS_KAFKA_TIMEOUT), then run ``fn``; a Kafka that stops answering
    becomes one line naming the fix."""
    from confluent_kafka import KafkaException

    from streams.io.kafka import preflight

    preflight(settings)
    try:
        return fn()
    except KafkaException as exc:
        raise Refused(
            f"Kafka at {settings.kafka_bootstrap} refused or did not answer ({exc.args[0].name()}): "
            "check it runs (`streams stack up`), STREAMS_KAFKA_BOOTSTRAP and the principal's ACLs"
        ) from None


def register(sub) -> None:
    """Add this group's subcommands to the ``streams`` parser."""
    p = sub.add_parser("replay", help="move a stage's committed offsets so it reprocesses (workers stopped)")
    p.add_argument("stage", choices=["mask", "sink"], help="mask reads the raw topic, sink the masked topic")
    p.add_argument(
        "--to",
        required=True,
        metavar="WHERE",
        help="earliest | latest | ISO time (UTC if no zone) | epoch ms | partition:offset[,partition:offset...]",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show each partition's offset before and after; change nothing"
    )
    p.set_defaults(func=_replay)

    p = sub.add_parser("status", help="per-stage offsets and lag, rows, dead letters, queue depth")
    p.add_argument("--follow", action="store_true", help="refresh with a progress bar until Ctrl-C")
    p.add_argument(
        "--interval", type=float, help="seconds between refreshes: --follow 2 (default), --web samples every 5"
    )
    p.add_argument("--until-idle", action="store_true", help="with --follow: exit once queue and lag are zero")
    p.add_argument(
        "--web", action="store_true", help="serve this as a status page for the whole deployment (on 127.0.0.1)"
    )
    p.add_argument("--port", metavar="N", help="with --web: the page's port (default 8095)")
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="URL",
        help="with --web: a process's metrics address, e.g. http://worker:9400/metrics (repeatable)",
    )
    p.set_defaults(func=_status)

    p = sub.add_parser("dlq", help="list dead letters, or redrive chosen ones after a fix")
    p.add_argument("action", choices=["list", "redrive"])
    p.add_argument(
        "--reason", action="append", default=[], help="redrive dead letters with this reason code (repeatable)"
    )
    p.add_argument("--id", action="append", default=[], help="redrive this message id (repeatable)")
    p.add_argument("--stage", choices=["mask", "sink"], help="only dead letters from this stage")
    p.add_argument("--sample", type=int, default=5, help="message ids shown per reason by list")
    p.add_argument("--dry-run", action="store_true", help="redrive: count what would be sent; send nothing")
    p.set_defaults(func=_dlq)
