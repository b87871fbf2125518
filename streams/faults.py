"""Fault injection for tests and ``make chaos``: die (or raise) at a named point.

The runtime keeps only this hook: a no-op unless ``configure`` was given a spec (the
``STREAMS_FAULT`` setting). ``STREAMS_FAULT=<point>[@<n>][:raise]`` SIGKILLs this process the n-th time (default:
first) it reaches ``fault_point(<point>)``, or with ``:raise`` raises ``InjectedFault``
there (an agent bug), or with ``:hang`` never returns from ``fault_hang(<point>)`` (a call
that hangs: the liveness probe must catch it), or with ``:stall`` blocks in
``fault_stall(<point>)`` past a bound (a commit that answered too late). Unset in production, where the check is one
falsy test per batch. Points: bridge_after_produce (Kafka acked, SQS not deleted),
mask_after_produce (masked records acked, raw offsets not acked), sink_before_commit
(batch decoded, database not written), sink_after_commit (database committed, masked
offsets not acked; with :stall, the sink's Kafka transaction open, its dead letters
produced, its commit not begun, past the bound: it is aborted), mask_after_commit (:stall:
the commit done, its answer late);
``streams erase``: erase_after_append, erase_after_confirm,
erase_after_delete (rows gone, no tombstones yet).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

_FAULT_NAME = ""
_FAULT_AT = ""
_FAULT_MODE = ""
_fault_hits = 0


def configure(spec: str) -> None:
    """Arm the hook from the ``fault`` setting (empty: off)."""
    global _FAULT_NAME, _FAULT_AT, _FAULT_MODE, _fault_hits  # noqa: PLW0603
    point, _, _FAULT_MODE = spec.partition(":")
    _FAULT_NAME, _, _FAULT_AT = point.partition("@")
    _fault_hits = 0


class InjectedFault(RuntimeError):
    """Raised by ``fault_point`` in ``:raise`` mode."""


async def fault_hang(name: str) -> None:
    """Hang here forever (a call that never returns) the n-th time, when the spec is ``<name>[@<n>]:hang``."""
    global _fault_hits
    if _FAULT_NAME and name == _FAULT_NAME and _FAULT_MODE == "hang":
        _fault_hits += 1
        if _fault_hits >= int(_FAULT_AT or 1):
            logging.getLogger("streams.fault").warning("fault injected at %s (hang)", name)
            await asyncio.Event().wait()


def fault_stall(name: str, seconds: float) -> None:
    """Block this thread ``seconds`` the n-th time, when the spec is ``<name>[@<n>]:stall``
    (a blocking call that did its work but answered too late)."""
    global _fault_hits
    if _FAULT_NAME and name == _FAULT_NAME and _FAULT_MODE == "stall":
        _fault_hits += 1
        if _fault_hits == int(_FAULT_AT or 1):
            logging.getLogger("streams.fault").warning("fault injected at %s (stall)", name)
            time.sleep(seconds)


def fault_point(name: str) -> None:
    """Die here, like a power cut, when ``STREAMS_FAULT`` names this point."""
    global _fault_hits
    if _FAULT_NAME and name == _FAULT_NAME and _FAULT_MODE not in ("hang", "stall"):
        _fault_hits += 1
        if _fault_hits >= int(_FAULT_AT or 1):
            logging.getLogger("streams.fault").warning("fault injected at %s (%s)", name, _FAULT_MODE or "kill")
            if _FAULT_MODE == "raise":
                raise InjectedFault(name)
            os.kill(os.getpid(), signal.SIGKILL)
