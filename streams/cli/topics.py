"""``streams topics plan|apply``: the topics as the settings describe them (see streams/ops/topics.py)."""

from __future__ import annotations

from streams.settings import Settings


def _topics(settings: Settings, args) -> None:
    from streams.cli.ops import _kafka_call
    from streams.ops import topics

    if args.action == "plan":
        steps = _kafka_call(lambda: topics.plan(settings), settings)
    else:
        from streams.ops import schemas

        steps = _kafka_call(lambda: topics.apply(settings), settings)
        for line in schemas.register(settings):  # the deploy step: schemas with the topics
            print(line)
    for step in steps:
        print(step)
    manual = [s for s in steps if s.action == "manual"]
    todo = [s for s in steps if s.action in ("create", "alter")]
    if args.action == "plan":
        print(f"{len(todo)} to apply, {len(manual)} to fix by hand" if todo or manual else "nothing to do")
    else:
        print(f"applied {len(todo)}" + (f"; {len(manual)} to fix by hand" if manual else ""))


def register(sub) -> None:
    p = sub.add_parser(
        "topics",
        help="show (plan) or create and configure (apply) the pipeline's topics (apply also registers the schemas)",
    )
    p.add_argument("action", choices=["plan", "apply"], help="plan changes nothing; apply creates what is missing")
    p.set_defaults(func=_topics)
