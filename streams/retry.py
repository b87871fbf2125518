"""Retry-until-done with capped exponential backoff, for stages that must not skip work."""

from __future__ import annotations

import asyncio
import logging
import random
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
