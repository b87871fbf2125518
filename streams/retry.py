"""Capped, jittered exponential backoff: the one retry policy of every stage.

A transient failure (a dependency down or slow) is waited out for as long as it lasts;
each attempt is logged with the exception type only (messages may quote data) and
counted. Cancellation (SIGTERM) interrupts the wait, so nothing unfinished is acked.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from streams.errors import TransientError
from streams.metrics import LAST_RETRY, LIVENESS, RETRIES

T = TypeVar("T")

FIRST_DELAY = 0.2


class Backoff:
    """Delays of 0.2 s doubling up to ``cap``, each jittered to 50-100 %."""

    def __init__(self, cap: float = 10.0, operation: str = "other", first: float = FIRST_DELAY) -> None:
        self.cap, self.first, self.operation = cap, first, operation
        self.delay = first
        self.attempts = 0

    async def wait(self) -> None:
        """Sleep before the next attempt; counted, and a sign of life (the work is not stuck)."""
        self.attempts += 1
        RETRIES.labels(self.operation).inc()
        LAST_RETRY.labels(self.operation).set_to_current_time()
        LIVENESS.beat()
        await asyncio.sleep(self.delay * (0.5 + random.random() / 2))
        self.delay = min(self.delay * 2, self.cap)

    def wait_blocking(self) -> None:
        """``wait`` for code on a thread of its own (a blocking Kafka call's retry)."""
        self.attempts += 1
        RETRIES.labels(self.operation).inc()
        LIVENESS.beat()
        time.sleep(self.delay * (0.5 + random.random() / 2))
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay, self.attempts = self.first, 0


def wait_at_start(check: Callable[[], T], what: str, log: logging.Logger, timeout: float) -> T:
    """Run a start-up ``check`` until it passes or ``timeout`` seconds have gone by.

    A dependency that is briefly down while a process (re)starts - a broker restart, a
    database failover - is waited out, not a crash loop; one still down after
    ``timeout`` re-raises its ``TransientError``, which names the setting to check.
    """
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    while True:
        try:
            return check()
        except TransientError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s; waiting", what, exc)
            time.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 5.0)


async def retry_forever(
    operation: Callable[[], Awaitable[T]],
    what: str,
    log: logging.Logger,
    max_backoff: float = 10.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    label: str = "other",
) -> T:
    """Run ``operation`` until it succeeds; ``label`` names it in metrics (no counts, no data)."""
    backoff = Backoff(max_backoff, label)
    while True:
        try:
            return await operation()
        except retry_on as exc:
            log.warning(
                "%s failed (%s), attempt %d; retrying",
                what,
                type(exc).__name__,
                backoff.attempts + 1,
                extra={"operation": label, "attempt": backoff.attempts + 1},
            )
            await backoff.wait()
