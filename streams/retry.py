"""Retry-until-done with capped exponential backoff, for stages that must not skip work."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def retry_forever(
    operation: Callable[[], Awaitable[T]],
    what: str,
    log: logging.Logger,
    max_backoff: float = 10.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> T:
    """Run ``operation`` until it succeeds. Only the exception type is logged (messages may quote data).

    Cancellation (SIGTERM) interrupts the wait, so nothing unfinished is ever acked.
    """
    delay = 0.2
    attempt = 0
    while True:
        try:
            return await operation()
        except retry_on as exc:
            attempt += 1
            log.warning("%s failed (%s), attempt %d; retrying in %.1fs", what, type(exc).__name__, attempt, delay)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, max_backoff)


# --- Fault injection (tests and `make chaos` only) ------------------------------------
# ``STREAMS_FAULT=<point>[@<n>][:raise]`` SIGKILLs this process the n-th time (default:
# first) it reaches ``fault_point(<point>)``, or with ``:raise`` raises ``InjectedFault``
# there (an agent bug). Unset in production, where the check is one
# falsy test per batch. Points: bridge_after_produce (Kafka acked, SQS not deleted),
# mask_after_produce (masked records acked, raw offsets not acked), sink_before_commit
# (batch decoded, database not written), sink_after_commit (database committed, masked
# offsets not acked).
_FAULT_SPEC, _, _FAULT_MODE = os.environ.get("STREAMS_FAULT", "").partition(":")
_FAULT_NAME, _, _FAULT_AT = _FAULT_SPEC.partition("@")
_fault_hits = 0


class InjectedFault(RuntimeError):
    """Raised by ``fault_point`` in ``:raise`` mode."""


def fault_point(name: str) -> None:
    """Die here, like a power cut, when ``STREAMS_FAULT`` names this point."""
    global _fault_hits
    if _FAULT_NAME and name == _FAULT_NAME:
        _fault_hits += 1
        if _fault_hits >= int(_FAULT_AT or 1):
            logging.getLogger("streams.fault").warning("fault injected at %s (%s)", name, _FAULT_MODE or "kill")
            if _FAULT_MODE == "raise":
                raise InjectedFault(name)
            os.kill(os.getpid(), signal.SIGKILL)
