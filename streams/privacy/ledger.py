"""The erasure ledger as the stages hold it: in memory, refreshed at transaction boundaries.

``streams erase`` appends a user to ``erasure_ledger`` (its ``seq`` is the ledger
version). Each running stage keeps the ledger in memory (``ErasedUsers``: one dict lookup
per record, no database read on the hot path), and a ``LedgerWatch`` beside it reads new
entries once a second. A new entry is applied under the stage writer's lock (between
batches, so a batch is transformed with one ledger), the stage's caches are dropped, and
the version is *confirmed* once no transaction begun before it can still commit: at
once when the stage is idle, else after its next commit or abort. The watch writes the
confirmed version to ``erasure_stage_versions`` (its heartbeat); ``streams erase`` waits
for every live stage to show its entry's version before it deletes anything.

A record of an erased user whose ``sent_at`` is at or before the erasure is dropped by the
mask stage and the sink (so by replays too), and by ``dlq redrive``, before any
dead-lettering. PostgreSQL down is transient: the watch keeps its ledger and retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import asyncpg

from streams.io.postgres import connect
from streams.retry import Backoff

log = logging.getLogger("streams.erasure")

POLL_INTERVAL = 1.0  # seconds between ledger reads and heartbeats of a stage
ERASED = "erased_user"  # the mask stage's Output.reason for a dropped record (never a dead letter)

ENTRIES = "SELECT seq, user_id, erased_at FROM erasure_ledger WHERE seq > $1 ORDER BY seq"
HEARTBEAT = """
INSERT INTO erasure_stage_versions (instance, stage, version, seen_at) VALUES ($1, $2, $3, now())
ON CONFLICT (instance) DO UPDATE SET version = EXCLUDED.version, seen_at = now()
"""


def millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class ErasedUsers:
    """user_id -> the latest erasure time (epoch ms), and the ledger version it reflects."""

    __slots__ = ("at", "on_change", "version")

    def __init__(self) -> None:
        self.version = 0
        self.at: dict[str, int] = {}
        self.on_change: list[Callable[[list[str]], None]] = []  # told the newly erased users: caches drop them

    def __bool__(self) -> bool:
        return bool(self.at)

    def add(self, entries: Iterable[tuple[int, str, int]]) -> None:
        """Apply ``(seq, user_id, erased_at ms)`` entries; drops the registered caches."""
        users = []
        for seq, user_id, at in entries:
            self.at[user_id] = max(at, self.at.get(user_id, at))
            self.version = max(self.version, seq)
            users.append(user_id)
        if users:
            for drop in self.on_change:
                drop(users)

    def erased(self, user_id: object, sent_at_ms: int) -> bool:
        """Was this user's record (sent at ``sent_at_ms``) erased? Later records are a new life."""
        at = self.at.get(user_id) if isinstance(user_id, str) else None
        return at is not None and sent_at_ms <= at


def body_user_id(body: object) -> str | None:
    """The ``user_id`` of a login body that may be invalid otherwise (None when none can be read)."""
    if not isinstance(body, str):
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    user_id = obj.get("user_id") if isinstance(obj, dict) else None
    return user_id if isinstance(user_id, str) else None


async def read_entries(conn: asyncpg.Connection, after: int = 0) -> list[tuple[int, str, int]]:
    return [(r["seq"], r["user_id"], millis(r["erased_at"])) for r in await conn.fetch(ENTRIES, after)]


def load_ledger(dsn: str) -> list[tuple[int, str, int]]:
    """The whole ledger, at a worker's start (before a stage reads a record).

    ``TransientError`` while PostgreSQL does not answer (``wait_at_start`` waits it out);
    ``ConfigError`` when the ledger cannot be read (not migrated, or no grant): fail closed.
    """
    from streams.errors import ConfigError
    from streams.io.postgres import connection_failure

    async def go() -> list[tuple[int, str, int]]:
        try:
            conn = await connect(dsn, timeout=10.0)
        except Exception as exc:
            raise connection_failure(exc) from None
        try:
            return await read_entries(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except (asyncpg.UndefinedTableError, asyncpg.InsufficientPrivilegeError) as exc:
        raise ConfigError(
            f"the erasure ledger cannot be read ({type(exc).__name__}): run `streams migrate` and grant"
            " STREAMS_PG_DSN's role streams_worker"
        ) from None
    except asyncpg.PostgresError as exc:
        raise connection_failure(exc) from None


def erased_users(entries: list[tuple[int, str, int]] | None) -> ErasedUsers:
    erased = ErasedUsers()
    erased.add(entries or [])
    return erased


def instance_name(stage: str) -> str:
    return f"{stage}@{socket.gethostname()}/{os.getpid()}"


class LedgerWatch:
    """One stage's ledger refresh, boundary confirmation and heartbeat (an asyncio task)."""

    def __init__(self, dsn: str, stage: str, erased: ErasedUsers, writer: Any, interval: float = POLL_INTERVAL) -> None:
        self.dsn = dsn
        self.stage = stage
        self.erased = erased
        self.writer = writer  # a StageWriter: its lock, ``boundaries`` and ``boundary_mark()``
        self.interval = interval
        self.instance = instance_name(stage)
        self.confirmed = erased.version  # loaded before the stage read anything
        self._pending: tuple[int, int | None] | None = None  # (version, boundary mark or None when idle)
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:  # a stopped stage is no longer waited for (best effort: it also goes stale)
            conn = await self._connection()
            await conn.execute("DELETE FROM erasure_stage_versions WHERE instance = $1", self.instance)
        except Exception as exc:
            log.debug("ledger heartbeat not removed (%s)", type(exc).__name__)
        await self._close()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.dsn, timeout=10.0, command_timeout=10.0)
        return self._conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _run(self) -> None:
        backoff = Backoff(10.0, "erasure ledger")
        while True:
            try:
                await self.tick()
                backoff.reset()
                await asyncio.sleep(self.interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL down or slow: keep the ledger held, try again
                log.warning(
                    "erasure ledger not refreshed (%s); retrying", type(exc).__name__, extra={"stage": self.stage}
                )
                await self._close()
                await backoff.wait()

    async def tick(self) -> None:
        """Read new entries, apply them at a boundary, confirm what is safe, beat."""
        conn = await self._connection()
        entries = await read_entries(conn, self.erased.version)
        if entries:
            await self.apply(entries)
        await conn.execute(HEARTBEAT, self.instance, self.stage, self.confirm())

    async def apply(self, entries: list[tuple[int, str, int]]) -> None:
        """Apply new entries between batches (under the writer's lock): no batch is half under the old ledger."""
        async with self.writer.lock:
            self.erased.add(entries)
            mark = self.writer.boundary_mark()
            self._pending = (self.erased.version, mark)
        log.info("erasure ledger at version %d", self.erased.version, extra={"stage": self.stage})

    def confirm(self) -> int:
        """The version this stage can vouch for: an applied one, once no transaction begun before it can commit."""
        if self._pending is not None:
            version, mark = self._pending
            if mark is None or self.writer.boundaries > mark:
                self.confirmed, self._pending = version, None
        return self.confirmed
