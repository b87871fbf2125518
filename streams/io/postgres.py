"""PostgreSQL access: connections and the versioned migrations shipped in ``streams/io/migrations``."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import asyncpg

from streams.errors import TransientError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_ID = 0x5354524D  # advisory lock: one migrator at a time, however many workers start


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir():
        match = _MIGRATION.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every migration not yet recorded in ``schema_migrations``; returns what it applied."""
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migration_files(directory):
            if version in done:
                continue
            await conn.execute(path.read_text())
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name)
            applied.append(path.name)
            log.info("applied migration %s", path.name)
    return applied


async def connect(dsn: str, timeout: float = 15.0, command_timeout: float | None = None) -> asyncpg.Connection:
    """The one way to open a connection, so every caller gets the same bounds."""
    return await asyncpg.connect(dsn, timeout=timeout, command_timeout=command_timeout)


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """One query on a connection of its own (commands and tests)."""
    conn = await connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def require_migrated(dsn: str) -> list[str]:
    """Connect and migrate at process start; an unreachable database is one line naming the fix."""

    async def go() -> list[str]:
        conn = await connect(dsn)
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except Exception as exc:
        raise TransientError(
            f"cannot prepare PostgreSQL ({type(exc).__name__}): start it (`streams stack up` locally) or set STREAMS_PG_DSN"
        ) from None
