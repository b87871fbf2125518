"""The worker's start-up checks, on threads, while the rest of the worker (Faust) is imported.

Each check waits on a dependency (Kafka, PostgreSQL, the schema registry): one after the
other they added their round trips to every start. Once the keys are loaded (first and
alone, as before), each runs on a thread of its own, beside each other and beside the
import of Faust (CPU-bound). Nothing is skipped or relaxed: ``run_worker`` takes every
result before it builds the app, in the order the checks always had, so a worker that
cannot start names the same first failure as before, in one line. The threads are
daemons: a failed check ends the process without waiting for a slower one to time out.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import logging
import threading
from collections.abc import Callable
from typing import Any

from streams.loop import fewer_malloc_arenas
from streams.settings import Settings

log = logging.getLogger("streams.worker")


class Check:
    """One check on a daemon thread; ``result()`` waits for it and returns or raises its outcome."""

    def __init__(self, name: str, call: Callable[[], Any]) -> None:
        self.name = name
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), name=f"check-{name}", daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._value = call()
        except BaseException as exc:  # handed to the main thread by result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def start_checks(settings: Settings) -> dict[str, Check]:
    """Start every check the worker's stages need; ``run_worker`` takes their results in this order."""
    from streams.io.codec import Codecs
    from streams.io.postgres import require_schema
    from streams.ops.replay import adopt_legacy_offsets
    from streams.ops.topics import require_topics
    from streams.privacy.keys import settings_keyring
    from streams.privacy.ledger import load_ledger
    from streams.privacy.user_keys import split_mode, worker_masker
    from streams.retry import wait_at_start

    gc.disable()  # until the start-up heap is built and frozen (app.fewer_collections)
    faulthandler.enable()  # a crash in a native library (librdkafka) leaves the Python stacks in the log
    fewer_malloc_arenas()  # before the first thread (streams.loop)
    dsn = settings.pg_dsn.get_secret_value()
    timeout = settings.startup_timeout
    masks = "mask" in settings.stage_list
    sealing = masks and split_mode(settings)

    def keys() -> tuple[Any, Any]:
        """Per-user key mode: join keys and a lifetime key from KMS, no keyring; else the keyring."""
        masker = worker_masker(settings)[0] if sealing else None
        return masker, settings_keyring(settings) if masks and masker is None else None

    # The keys first and alone, as always: a key that cannot be used stops the worker in one
    # line before it touches Kafka (where the topics check would create missing topics).
    loaded = keys()
    checks = {
        "keys": Check("keys", lambda: loaded),
        "topics": Check("topics", lambda: wait_at_start(lambda: require_topics(settings), "Kafka", log, timeout)),
    }
    if "sink" in settings.stage_list or sealing:  # a sealing mask stage stores data keys
        checks["schema"] = Check(
            "schema", lambda: wait_at_start(lambda: require_schema(dsn), "PostgreSQL", log, timeout)
        )

    def adopt() -> None:
        checks["topics"].result()  # the upgrade step only once the topics are as declared
        for name in settings.stage_list:  # once, on the first start after the upgrade (docs/operations.md)
            wait_at_start(functools.partial(adopt_legacy_offsets, settings, name), "Kafka", log, timeout)

    checks["adopt"] = Check("adopt", adopt)
    # Every stage holds the erasure ledger before it reads a record (fail closed: no ledger, no start).
    checks["ledger"] = Check("ledger", lambda: wait_at_start(lambda: load_ledger(dsn), "PostgreSQL", log, timeout))
    # With a registry: its schema ids, or one line to register them.
    checks["codecs"] = Check("codecs", lambda: Codecs.from_settings(settings))
    return checks
