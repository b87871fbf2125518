"""Issue 19 item 6: rotation's final lock and the sink's fallback take their locks in one order;
a deadlock with some other writer is another round, not a crash."""

from __future__ import annotations

import asyncio

import pytest

from streams.io.postgres import connect, migrate
from streams.pipeline.sink import PostgresSink
from streams.privacy.rotation import finish
from tests.factories import CODECS, masked_value

pytestmark = pytest.mark.integration


async def locks_of(conn, pid: int) -> set[tuple[str, bool]]:
    """(table, granted) of the locks ``pid`` holds or waits for on the pipeline's tables."""
    rows = await conn.fetch(
        "SELECT c.relname, l.granted FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
        " WHERE l.pid = $1 AND c.relname IN ('user_logins', 'pii_vault', 'join_token_map')",
        pid,
    )
    return {(r["relname"], r["granted"]) for r in rows}


async def poll(condition, what: str, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if found := await condition():
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_sink_fallback_waits_for_user_logins_before_it_holds_pii_vault(pipeline):
    dsn = pipeline.settings.pg_dsn.get_secret_value()
    row = CODECS.masked.decode(masked_value("m-lock"))

    async def go() -> set[tuple[str, bool]]:
        holder, observer = await connect(dsn), await connect(dsn)
        sink = PostgresSink(dsn)
        try:
            await migrate(holder)
            async with holder.transaction():  # what rotation's final lock takes first
                await holder.execute("LOCK TABLE user_logins IN SHARE ROW EXCLUSIVE MODE")
                write = asyncio.ensure_future(sink.write_one([row]))
                await poll(lambda: asyncio.sleep(0, sink._conn is not None), "the sink's connection")
                assert sink._conn is not None
                pid = sink._conn.get_server_pid()
                waiting = await poll(lambda: _waiting_on_logins(observer, pid), "the fallback to wait for user_logins")
            await asyncio.wait_for(write, 20)  # the lock released: the row is written
            return waiting
        finally:
            await sink.close()
            await holder.close()
            await observer.close()

    held = asyncio.run(go())
    assert ("pii_vault", True) not in held, held  # nothing held while waiting: no cycle with rotation
    assert pipeline.query("SELECT count(*) AS n FROM user_logins")[0]["n"] == 1


async def _waiting_on_logins(observer, pid: int) -> set[tuple[str, bool]] | None:
    locks = await locks_of(observer, pid)
    return locks if ("user_logins", False) in locks else None


def test_a_deadlock_in_the_final_lock_is_another_round(pipeline):
    dsn = pipeline.settings.pg_dsn.get_secret_value()

    async def go() -> int | None:
        writer, rotator, observer = await connect(dsn), await connect(dsn), await connect(dsn)
        try:
            await migrate(writer)
            async with writer.transaction():  # a writer in the opposite order: pii_vault, then user_logins
                await writer.execute("LOCK TABLE pii_vault IN ROW EXCLUSIVE MODE")
                rotation = asyncio.ensure_future(finish(rotator, "h2", lock_timeout=30))
                pid = rotator.get_server_pid()
                await poll(lambda: _waiting(observer, pid), "the final lock to wait for pii_vault")
                await writer.execute("LOCK TABLE user_logins IN ROW EXCLUSIVE MODE")  # the cycle
            return await asyncio.wait_for(rotation, 30)
        finally:
            for conn in (writer, rotator, observer):
                await conn.close()

    assert asyncio.run(go()) is None  # PostgreSQL aborted the rotation's side: a busy round, tried again


async def _waiting(observer, pid: int) -> bool:
    return ("pii_vault", False) in await locks_of(observer, pid)
