"""`streams keys seal` is safe on a schedule (issue 19): real PostgreSQL, the stack's moto KMS.

Key rows are stored the way a mask worker stores them (``Lifetime`` + ``save_keys``), then
sealed by `streams keys seal` processes running as a login in ``streams_key_custodian``
only (migration 0008): two at once seal each key once, a run finding the lock held does
nothing, a run is bounded, a row that does not open is left without blocking the rest, and
PostgreSQL down is a temporary exit code.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import uuid

import asyncpg
import botocore.session
import pytest

from streams.privacy.core import load_copy_binary, load_key_wrapping
from streams.privacy.kms import Kms
from streams.privacy.user_keys import SEAL_LOCK, KeyRows, Lifetime, copy_binary, save_keys, user_context
from tests.helpers import REPO

pytestmark = pytest.mark.integration


@pytest.fixture
def custodian(pipeline, stack_settings):
    """Per-user key mode on fresh keys in the stack's moto, a migrated database, and the DSN of
    a login role in streams_key_custodian only (dropped afterwards)."""
    if os.environ.get("STREAMS_TEST_STACK") == "containers":
        pytest.skip("moto's KMS runs in the process stack; tests/containers has no KMS container yet")
    kms = botocore.session.get_session().create_client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{stack_settings.kms_port}",
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    key = kms.create_key(Description=f"seal test {uuid.uuid4()}")["KeyMetadata"]["KeyId"]
    mac = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
    pipeline.env.update(
        STREAMS_KMS_KEY_ID=key,
        STREAMS_KMS_MAC_KEY_ID=mac,
        STREAMS_KMS_ENDPOINT=f"http://127.0.0.1:{stack_settings.kms_port}",
        STREAMS_DEPLOYMENT=f"seal-{uuid.uuid4().hex[:8]}",
        STREAMS_DEV_KEYS="0",
    )
    pipeline.migrate()
    owner = pipeline.settings.pg_dsn.get_secret_value()
    login, password = f"c{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(12)
    pipeline.query(f"CREATE ROLE {login} LOGIN PASSWORD '{password}' IN ROLE streams_key_custodian")
    yield owner.replace("postgresql://postgres@", f"postgresql://{login}:{password}@")
    pipeline.query(f"DROP ROLE IF EXISTS {login}")


def store_keys(pipeline, users: int, max_users: int) -> dict[tuple[str, bytes], bytes]:
    """Key rows as mask workers store them (lifetimes of ``max_users``; wrapped and written by
    the compiled core when it is built, as a worker does); returns each plaintext data key."""
    settings = pipeline.settings
    lifetime = Lifetime(Kms(settings), settings.deployment, max_users=max_users, wrapping=load_key_wrapping())
    made = {}
    for i in range(users):
        user = f"user-{i:05d}"
        key_id, key = lifetime.raw_key(user)
        made[(user, key_id)] = key

    async def save() -> None:
        conn = await asyncpg.connect(settings.pg_dsn.get_secret_value())
        try:
            await save_keys(conn, *lifetime.take(), load_copy_binary())
        finally:
            await conn.close()

    asyncio.run(save())
    return made


def test_key_rows_written_as_one_binary_copy_stream_are_the_rows_the_driver_writes(pipeline):
    """The key store's COPY stream made in one call (the compiled core's, else the reference's)
    stores exactly what asyncpg's own row encoding stores: text user ids (non-ASCII too),
    hex key ids, wrapped keys of any bytes."""
    pipeline.migrate()
    users = ["u-1", "usér-✓", "x" * 128, "日本", 'u\\q"', "u 2"]
    rows = KeyRows(users, [bytes([i]) * 8 for i in range(len(users))], [bytes(range(i, i + 80)) for i in range(6)])
    encoders = {"driver": None, "reference": copy_binary}
    core = load_copy_binary()  # None without the extension (STREAMS_REQUIRE_CORE=1 makes that an error)
    if core is not None:
        encoders["core"] = core

    async def stored(encode) -> list[tuple]:
        conn = await asyncpg.connect(pipeline.settings.pg_dsn.get_secret_value())
        try:
            await conn.execute("DELETE FROM user_data_keys")
            await save_keys(conn, [], rows, encode)
            found = await conn.fetch("SELECT user_id, key_id, wrapped_key, sealed_key FROM user_data_keys")
            return sorted(tuple(r) for r in found)
        finally:
            await conn.close()

    expected = sorted(
        (u, k.hex(), w, None) for u, k, w in zip(rows.user_ids, rows.key_ids, rows.wrapped_keys, strict=True)
    )
    for name, encode in encoders.items():
        assert asyncio.run(stored(encode)) == expected, name


def seal(pipeline, dsn: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, **pipeline.env, "STREAMS_PG_DSN": dsn}
    return subprocess.Popen(
        [sys.executable, "-m", "streams", "keys", "seal", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen) -> tuple[int, list[str], str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out.splitlines(), err


def sealed_count(line: str) -> int:
    assert line.startswith("sealed "), line
    return int(line.split()[1])


def test_two_concurrent_runs_seal_every_key_once_and_a_third_finds_nothing(pipeline, custodian):
    made = store_keys(pipeline, 1200, max_users=500)  # three lifetimes
    runs = [seal(pipeline, custodian, "--batch-size", "50"), seal(pipeline, custodian, "--batch-size", "50")]
    results = [finished(p) for p in runs]
    for code, lines, err in results:
        assert code == 0 and len(lines) == 1 and err == "", (code, lines, err)
    # Each key was sealed by exactly one of the two runs (the other waited on nothing: the lock).
    assert sum(sealed_count(lines[0]) for _, lines, _ in results) == len(made), results

    rows = pipeline.query("SELECT user_id, key_id, wrapped_key, sealed_key FROM user_data_keys")
    assert len(rows) == len(made) and all(r["wrapped_key"] is None and r["sealed_key"] for r in rows)
    # Every sealed form opens (kms:Decrypt naming the user) to the key the worker made.
    kms, deployment = Kms(pipeline.settings), pipeline.settings.deployment
    for r in rows[:: len(rows) // 60]:
        key_id = bytes.fromhex(r["key_id"])
        opened = kms._call(
            "decrypt",
            CiphertextBlob=r["sealed_key"],
            KeyId=kms.arn(),
            EncryptionContext=user_context(deployment, r["user_id"], key_id),
        )["Plaintext"]
        assert opened == made[(r["user_id"], key_id)]
    # One audit row per run that opened lifetime keys.
    audited = pipeline.query("SELECT outcome, db_user FROM pii_reveal_audit WHERE action = 'seal'")
    assert len(audited) == sum(1 for _, lines, _ in results if sealed_count(lines[0]) > 0)
    assert {a["outcome"] for a in audited} == {"bulk_open"}

    code, lines, err = finished(seal(pipeline, custodian))
    assert (code, lines, err) == (
        0,
        ["sealed 0 user data keys under their users' KMS context; 0 still lifetime-wrapped"],
        "",
    )
    assert len(pipeline.query("SELECT 1 FROM pii_reveal_audit WHERE action = 'seal'")) == len(audited)


def test_a_run_that_finds_the_lock_held_does_nothing_and_exits_0(pipeline, custodian):
    store_keys(pipeline, 5, max_users=100)

    async def while_locked() -> tuple[int, list[str], str]:
        conn = await asyncpg.connect(pipeline.settings.pg_dsn.get_secret_value())
        try:
            assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", SEAL_LOCK)
            return await asyncio.to_thread(finished, seal(pipeline, custodian))
        finally:
            await conn.close()

    code, lines, err = asyncio.run(while_locked())
    assert code == 0 and err == "" and len(lines) == 1 and "holds the lock" in lines[0], (code, lines, err)
    assert sealed_count(lines[0]) == 0
    assert len(pipeline.query("SELECT 1 FROM user_data_keys WHERE sealed_key IS NULL")) == 5
    code, lines, _ = finished(seal(pipeline, custodian))  # the lock went with its connection
    assert code == 0 and sealed_count(lines[0]) == 5


def test_runs_are_bounded_and_a_row_that_does_not_open_is_left_without_blocking_the_rest(pipeline, custodian):
    made = store_keys(pipeline, 30, max_users=100)
    code, lines, err = finished(seal(pipeline, custodian, "--batch-size", "5", "--max-batches", "2"))
    assert (code, err) == (0, "") and lines == [
        "sealed 10 user data keys under their users' KMS context; 20 still lifetime-wrapped; the next run continues"
    ]
    # An altered row, first in the order of the rows left: counted, left as it is, exit 1.
    first_left = min(u for u, _ in made if u >= "user-00010")
    pipeline.query(
        "UPDATE user_data_keys SET wrapped_key = set_byte(wrapped_key, 0, get_byte(wrapped_key, 0) # 1)"
        " WHERE user_id = $1",
        first_left,
    )
    code, lines, err = finished(seal(pipeline, custodian, "--batch-size", "5"))
    assert code == 1 and err == "" and len(lines) == 1, (code, lines, err)
    assert lines[0].startswith("sealed 19 user data keys") and "1 still lifetime-wrapped (1 do not open" in lines[0]
    left = pipeline.query("SELECT user_id FROM user_data_keys WHERE sealed_key IS NULL")
    assert [r["user_id"] for r in left] == [first_left]


def test_the_custodian_role_reads_no_login_or_sealed_value(pipeline, custodian):
    async def refused(sql: str) -> type[Exception] | None:
        conn = await asyncpg.connect(custodian)
        try:
            await conn.execute(sql)
        except asyncpg.PostgresError as exc:
            return type(exc)
        finally:
            await conn.close()
        return None

    for sql in (
        "SELECT * FROM user_logins",
        "SELECT * FROM sealed_values",
        "SELECT * FROM pii_vault",
        "DELETE FROM user_data_keys",
        "INSERT INTO user_data_keys (user_id, key_id, sealed_key) VALUES ('u', 'k', '\\x00')",
    ):
        assert asyncio.run(refused(sql)) is asyncpg.InsufficientPrivilegeError, sql


def test_postgresql_down_is_a_temporary_exit_code_in_one_line(pipeline, custodian):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it is closed
    code, lines, err = finished(seal(pipeline, f"postgresql://nobody@127.0.0.1:{port}/none"))
    err_lines = [line for line in err.splitlines() if line.strip()]
    assert code == 75 and lines == [] and len(err_lines) == 1 and "Traceback" not in err, (code, err)
