"""How a worker stage fails: a bug or a fatal Kafka error ends the process, never a silent skip.

A stage that raised has records in flight whose offsets are not committed; exiting lets
its supervisor (Kubernetes, `streams run`, the chaos run) restart it, and the group gives
its partitions to a member that reads them again from the committed offsets. The
rules of each stage (what is exactly-once, what at-least-once) are in docs/delivery.md.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("streams.worker")

EXIT_BUG = 70  # an unexpected exception in a stage
EXIT_FATAL = 75  # Kafka refused for good: fenced by a newer worker with the same slot, or a fatal producer error


def die(stage: str, exc: BaseException) -> None:
    """A stage raised: exit so its uncommitted records are read again by whoever takes them.

    Only the exception type is logged: messages may quote data.
    """
    log.critical("stage %s failed (%s); exiting so its uncommitted batch is read again", stage, type(exc).__name__)
    logging.shutdown()
    os._exit(EXIT_BUG)


def fatal(stage: str, why: str) -> None:
    """Kafka will not take this producer's writes any more: one line, then exit non-zero."""
    log.critical("stage %s stops: %s", stage, why)
    logging.shutdown()
    os._exit(EXIT_FATAL)
