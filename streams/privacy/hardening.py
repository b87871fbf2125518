"""Process hardening for everything that holds keys or plaintext PII in memory.

A core dump of a mask worker would write its keys and the plaintext values in its mask
cache to disk, where no retention applies. ``no_core_dumps`` sets ``RLIMIT_CORE`` to 0,
soft and hard (so nothing in the process can raise it again), at the start of the
worker, the bridge and the commands that decrypt. A kernel whose ``core_pattern`` pipes
to a collector (systemd-coredump, apport) still honours a limit of 0.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


def no_core_dumps() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:  # not expected: lowering a limit is always allowed
        log.warning("could not turn off core dumps (%s)", type(exc).__name__)
