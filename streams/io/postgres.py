"""PostgreSQL access: connections and the versioned migrations shipped in ``streams/io/migrations``."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from pathlib import Path

import asyncpg

from streams.errors import ConfigError, StreamsError, TransientError

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


async def connect(
    dsn: str, timeout: float = 15.0, command_timeout: float | None = None, server_settings: dict[str, str] | None = None
) -> asyncpg.Connection:
    """The one way to open a connection, so every caller gets the same bounds."""
    return await asyncpg.connect(dsn, timeout=timeout, command_timeout=command_timeout, server_settings=server_settings)


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """One query on a connection of its own (commands and tests)."""
    conn = await connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def latest_version(directory: Path = MIGRATIONS_DIR) -> int:
    """The version of the newest migration this code ships."""
    return max(version for version, _ in migration_files(directory))


async def schema_version(conn: asyncpg.Connection) -> int | None:
    """The newest migration applied to the database (None: never migrated)."""
    try:
        return await conn.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        return None


def connection_failure(exc: BaseException) -> StreamsError:
    """One line for a failed connection, naming what in STREAMS_PG_DSN to check; never the DSN itself.

    ``ConfigError`` when a setting must change (TLS, login, database name),
    ``TransientError`` when the server does not answer (start it, or wait).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or "verification failed"
        if "mismatch" in why.lower():
            return ConfigError(
                f"PostgreSQL's TLS certificate does not match the host ({why}): check the host in STREAMS_PG_DSN"
            )
        return ConfigError(f"PostgreSQL's TLS certificate is not trusted ({why}): check sslrootcert in STREAMS_PG_DSN")
    if isinstance(exc, ssl.SSLError):
        return ConfigError(
            f"TLS with PostgreSQL failed ({exc.reason or type(exc).__name__}): check sslmode and sslrootcert in STREAMS_PG_DSN"
        )
    if isinstance(exc, (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        return ConfigError(
            f"PostgreSQL refused the login ({type(exc).__name__}): check the user and password in STREAMS_PG_DSN"
            " (and pg_hba.conf, e.g. hostssl only)"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return ConfigError("the database in STREAMS_PG_DSN does not exist: create it, or fix the DSN")
    if isinstance(exc, (asyncpg.ClientConfigurationError, FileNotFoundError)):
        return ConfigError(
            f"STREAMS_PG_DSN is not usable ({type(exc).__name__}): check its sslmode, sslrootcert and other options"
        )
    if isinstance(exc, ConnectionError) and "ssl" in str(exc).lower():
        return ConfigError(
            "PostgreSQL does not offer TLS: check sslmode in STREAMS_PG_DSN, or enable ssl on the server"
        )
    return TransientError(
        f"cannot reach PostgreSQL ({type(exc).__name__}): start it (`streams stack up` locally) or set STREAMS_PG_DSN"
    )


async def _connect_or_explain(dsn: str) -> asyncpg.Connection:
    try:
        return await connect(dsn)
    except Exception as exc:
        raise connection_failure(exc) from None


def require_migrated(dsn: str) -> list[str]:
    """Connect and migrate (``streams migrate``); a failure is one line naming the fix."""

    async def go() -> list[str]:
        conn = await _connect_or_explain(dsn)
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except StreamsError:
        raise
    except asyncpg.InsufficientPrivilegeError:
        raise ConfigError(
            "the role in STREAMS_PG_DSN may not change the schema: run `streams migrate` as the schema owner"
        ) from None
    except asyncpg.PostgresError as exc:  # the server's text is not quoted: keep values out of errors
        raise ConfigError(f"a migration failed ({type(exc).__name__}, SQLSTATE {exc.sqlstate})") from None
    except Exception as exc:
        raise connection_failure(exc) from None


def require_schema(dsn: str) -> int:
    """At worker start: the database must be at this code's latest migration; it never migrates.

    The worker's role needs only DML (``streams_worker``); ``streams migrate`` is the
    separate step, run by the schema owner (a Job in Kubernetes, ``streams run`` locally).
    """
    latest = latest_version()

    async def go() -> int | None:
        conn = await _connect_or_explain(dsn)
        try:
            return await schema_version(conn)
        finally:
            await conn.close()

    try:
        version = asyncio.run(go())
    except StreamsError:
        raise
    except asyncpg.InsufficientPrivilegeError:
        raise ConfigError(
            "the role in STREAMS_PG_DSN may not read schema_migrations: grant it streams_worker "
            "(created by `streams migrate`)"
        ) from None
    except Exception as exc:
        raise connection_failure(exc) from None
    if version is None or version < latest:
        at = "not migrated" if version is None else f"at migration {version:04d}"
        raise ConfigError(f"the database is {at}, this worker needs {latest:04d}: run `streams migrate`")
    return version
