"""The event loop every stage runs on: uvloop (issue 12: a third less CPU per event or SQS call)."""

from __future__ import annotations


def use_uvloop() -> None:
    """uvloop for every event loop made from here on (the stage's own and Faust's consumer thread's)."""
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
