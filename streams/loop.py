"""The event loop every stage runs on: uvloop (issue 12: a third less CPU per event or SQS call)."""

from __future__ import annotations


def use_uvloop() -> None:
    """uvloop for every event loop made from here on (the stage's own and Faust's consumer thread's)."""
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# Bytes: larger blocks are mapped on their own and returned on free; free memory over
# TRIM_THRESHOLD at an arena's top goes back to the system.
MMAP_THRESHOLD = 2**20
TRIM_THRESHOLD = 2 * 2**20


def fewer_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (``MALLOC_ARENA_MAX``) before the worker starts its threads.

    Each thread that allocates (Faust's consumer thread, librdkafka's callbacks, the
    delivery thread) otherwise gets an arena of its own, up to 8 per core, and freed
    memory stays fragmented across them: measured, a few MiB of the worker's peak RSS.
    A no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(ctypes.c_int(-8), ctypes.c_int(arenas))  # M_ARENA_MAX
        # M_MMAP_THRESHOLD fixed: glibc otherwise raises it to the largest block freed so far,
        # and librdkafka's fetch and decompression buffers then come from the arenas and
        # fragment them (measured: ~15 MiB of peak RSS, issue 20). Not at glibc's initial
        # 128 KiB, though: the producer's message-set and compression buffers (128 KiB to
        # 1 MiB) were then mapped and unmapped per request, ~0.4 page faults per record and
        # ~0.6 µs of its broker thread's CPU (benchmarks: peak RSS 187 instead of 181 MiB on
        # a 1,000,000 backlog). Fixing it also fixes M_TRIM_THRESHOLD at its 128 KiB, which
        # returned and refaulted the same memory as often: 2 MiB keeps a request's worth.
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(MMAP_THRESHOLD))
        libc.mallopt(ctypes.c_int(-1), ctypes.c_int(TRIM_THRESHOLD))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
