"""PostgresSink on a real database: new rows by COPY, written rows by the merge, races, refusals.

The sink COPYs a batch of new message ids straight into the tables (blind, or after a
lookup), and merges a batch with a written id through its staging tables; all must give
the same rows, and a key another session commits between the lookup and the COPY must not
fail the batch.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from streams.io.postgres import connect, migrate
from streams.pipeline.sink import PostgresSink
from tests.factories import CODECS, masked_value

pytestmark = pytest.mark.integration


def row(message_id: str, **over: object) -> dict:
    return {**CODECS.masked.decode(masked_value(message_id)), **over}


async def _db(pipeline):
    dsn = pipeline.settings.pg_dsn.get_secret_value()
    conn = await connect(dsn)
    await migrate(conn)
    return dsn, conn


async def _logins(conn) -> dict[str, tuple]:
    rows = await conn.fetch("SELECT message_id, user_id, masked_ip, xmin::text AS x FROM user_logins")
    return {r["message_id"]: (r["user_id"], r["masked_ip"], r["x"]) for r in rows}


async def _vault(conn) -> dict[tuple[str, str], str]:
    return {(r["field"], r["token"]): r["ciphertext"] for r in await conn.fetch("SELECT * FROM pii_vault")}


async def _wait_for_lock_wait(conn, timeout: float = 20) -> None:
    """Until some other session of this database waits on a lock (the sink's COPY)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sink never waited on the uncommitted key")


def test_new_written_and_mixed_batches_give_the_same_rows(pipeline):
    async def go() -> None:
        dsn, conn = await _db(pipeline)
        sink = PostgresSink(dsn)
        try:
            # New ids; the device token is shared by every row: one vault row for it.
            assert await sink.write_batch([row("a"), row("b")]) == []
            first = await _logins(conn)
            assert {k: v[:2] for k, v in first.items()} == {"a": ("u", "h1.a"), "b": ("u", "h1.b")}
            assert await _vault(conn) == {("ip", "h1.a"): "k1.c", ("ip", "h1.b"): "k1.c", ("device_id", "h1.b"): "k1.d"}
            # A new id whose tokens are all in the vault already: COPYed, the vault unchanged.
            assert await sink.write_batch([row("c", masked_ip="h1.a")]) == []
            assert (await _logins(conn))["c"][:2] == ("u", "h1.a")
            assert len(await _vault(conn)) == 3
            # A replay of written ids: nothing touched (same row versions).
            before = await _logins(conn)
            assert await sink.write_batch([row("a"), row("b")]) == []
            assert await _logins(conn) == before
            # A written id changed, a new id, a tombstone, in one batch.
            assert await sink.write_batch([row("a", user_id="u2"), row("d")], ["b"]) == []
            after = await _logins(conn)
            assert {k: v[:2] for k, v in after.items()} == {
                "a": ("u2", "h1.a"),
                "c": ("u", "h1.a"),
                "d": ("u", "h1.d"),
            }
            assert after["c"][2] == before["c"][2]
            assert ("ip", "h1.d") in await _vault(conn)
        finally:
            await sink.close()
            await conn.close()

    asyncio.run(go())


@pytest.mark.parametrize("table", ["pii_vault", "user_logins"])
def test_a_key_committed_by_another_session_after_the_lookup_is_merged(pipeline, table):
    """The COPY meets the other session's key (unique violation): the batch is merged, not refused."""

    async def go() -> None:
        dsn, conn = await _db(pipeline)
        other = await connect(dsn)
        sink = PostgresSink(dsn)
        mid = f"m-{uuid.uuid4().hex[:6]}"
        try:
            await sink.write_batch([row("warm")])  # connection and staging tables made
            tx = other.transaction()
            await tx.start()
            if table == "pii_vault":
                await other.execute(  # the same user's entry (the vault is keyed by user, migration 0006)
                    "INSERT INTO pii_vault (user_id, field, token, key_id, ciphertext) VALUES ('u', 'ip', $1, 'k0', 'k0.other')",
                    f"h1.{mid}",
                )
            else:
                await other.execute(
                    "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id,"
                    " create_date, app_version_raw, sent_at) VALUES ($1, 'other', 'ios', 'x', 'y', now(), '1', now())",
                    mid,
                )
            write = asyncio.ensure_future(sink.write_batch([row(mid), row(f"{mid}-2")]))
            await _wait_for_lock_wait(conn)
            await tx.commit()
            assert await asyncio.wait_for(write, 30) == []
            logins = await _logins(conn)
            assert logins[mid][0] == "u" and logins[f"{mid}-2"][0] == "u"  # the batch's values won
            vault = await _vault(conn)
            expected_ip = "k0.other" if table == "pii_vault" else "k1.c"  # a vault row is never replaced
            assert vault[("ip", f"h1.{mid}")] == expected_ip
            assert vault[("ip", f"h1.{mid}-2")] == "k1.c"
        finally:
            await sink.close()
            await other.close()
            await conn.close()

    asyncio.run(go())


def test_a_refused_row_is_returned_and_the_rest_of_its_batch_written(pipeline):
    async def go() -> None:
        dsn, conn = await _db(pipeline)
        sink = PostgresSink(dsn)
        try:
            bad = row("bad", user_id="u" * 200)  # varchar(128)
            refused = await sink.write_batch([row("ok-1"), bad, row("ok-2")], ["gone"])
            assert [(r["message_id"], state) for r, state in refused] == [("bad", "22001")]
            assert set(await _logins(conn)) == {"ok-1", "ok-2"}
        finally:
            await sink.close()
            await conn.close()

    asyncio.run(go())


def test_the_keys_are_looked_up_by_index_after_the_table_grew(pipeline):
    """A plan cached while the table was empty must not scan the grown table for every batch."""

    async def seq_scans(conn, sink: PostgresSink) -> int:
        assert sink._conn is not None
        await sink._conn.execute("SELECT pg_stat_force_next_flush()")  # the sink's counts, now
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return await conn.fetchval("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'user_logins'")

    async def go() -> None:
        dsn, conn = await _db(pipeline)
        await conn.execute("ALTER TABLE user_logins SET (autovacuum_enabled = false)")  # no ANALYZE meanwhile
        sink = PostgresSink(dsn)
        try:
            for i in range(8):  # enough runs for PostgreSQL to settle on a cached plan, on an empty table
                assert await sink.write_batch([row(f"early-{i}")], [f"gone-{i}"]) == []
            await conn.execute(
                "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id,"
                " create_date, app_version_raw, sent_at)"
                " SELECT 'bulk-' || i, 'u', 'ios', 'x', 'y', now(), '1', now() FROM generate_series(1, 20000) i"
            )
            before = await seq_scans(conn, sink)
            for i in range(4):
                assert await sink.write_batch([row(f"late-{i}"), row(f"early-{i}")], [f"bulk-{i}"]) == []
            assert await seq_scans(conn, sink) == before
            assert await conn.fetchval("SELECT count(*) FROM user_logins WHERE message_id LIKE 'late-%'") == 4
        finally:
            await sink.close()
            await conn.close()

    asyncio.run(go())


def test_new_keys_are_copied_without_a_lookup_and_a_written_id_after_them_is_merged(pipeline):
    """Once a lookup found nothing, new keys are COPYed blind (no index scan); a replayed id still merges."""

    def fresh(message_id: str, **over: object) -> dict:
        return row(message_id, masked_device_id=f"h1.d-{message_id}", **over)

    async def index_scans(conn, sink: PostgresSink) -> int:
        assert sink._conn is not None
        await sink._conn.execute("SELECT pg_stat_force_next_flush()")  # the sink's counts, now
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return await conn.fetchval(
            "SELECT sum(idx_scan) FROM pg_stat_user_tables WHERE relname IN ('user_logins', 'pii_vault')"
        )

    async def go() -> None:
        dsn, conn = await _db(pipeline)
        sink = PostgresSink(dsn)
        try:
            assert await sink.write_batch([fresh("n-1")]) == []  # looked up: found nothing
            before = await index_scans(conn, sink)
            for i in range(2, 5):
                assert await sink.write_batch([fresh(f"n-{i}"), fresh(f"n-{i}b")]) == []
            assert await index_scans(conn, sink) == before  # no key looked up
            assert await sink.write_batch([fresh("n-6")], ["n-4b"]) == []  # blind too: a tombstone deletes
            written = await _logins(conn)
            assert set(written) == {"n-1", "n-2", "n-2b", "n-3", "n-3b", "n-4", "n-6"}
            # A replayed id beside a new one: the blind COPY fails, the batch is looked up and merged.
            assert await sink.write_batch([fresh("n-2"), fresh("n-5", user_id="u5")]) == []
            after = await _logins(conn)
            assert after["n-2"] == written["n-2"]  # untouched: the same row version
            assert after["n-5"][0] == "u5"
            assert await index_scans(conn, sink) > before
            vault = await _vault(conn)
            assert vault[("device_id", "h1.d-n-5")] == "k1.d" and len(vault) == 2 * 9  # a tombstone leaves the vault
        finally:
            await sink.close()
            await conn.close()

    asyncio.run(go())


def test_sealed_values_are_copied_blind_and_never_rewritten_by_a_replay(pipeline):
    """Per-user key mode: sealed values instead of vault rows, COPYed blind; the first one of an id stays."""

    def sealed(message_id: str, seal: bytes) -> dict:
        return row(
            message_id,
            masked_device_id=f"h1.d-{message_id}",
            ip_ciphertext="",
            device_id_ciphertext="",
            ip_sealed=seal,
            device_id_sealed=seal,
        )

    async def go() -> None:
        dsn, conn = await _db(pipeline)
        sink = PostgresSink(dsn)
        try:
            assert await sink.write_batch([sealed("s-1", b"one")]) == []
            assert sink.mode.blind
            assert await sink.write_batch([sealed("s-2", b"two")]) == []  # blind
            assert sink.mode.blind
            assert await sink.write_batch([sealed("s-2", b"other"), sealed("s-3", b"three")]) == []  # a replay
            assert not sink.mode.blind
            got = {r["message_id"]: r["ip_sealed"] for r in await conn.fetch("SELECT * FROM sealed_values")}
            assert got == {"s-1": b"one", "s-2": b"two", "s-3": b"three"}
            assert set(await _logins(conn)) == {"s-1", "s-2", "s-3"}
            assert await _vault(conn) == {}
        finally:
            await sink.close()
            await conn.close()

    asyncio.run(go())
