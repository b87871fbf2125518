"""Issue 19 items 2-3 on the real stack: workers never decrypt; only audited paths open values.

A private moto server (started here on a free port, not the stack's shared one) enforces
IAM (``INITIAL_NO_AUTH_ACTION_COUNT=0``), with one IAM user per role, made in moto's
backend before it serves. The worker runs the pipeline with the worker role's actions
only; its kms:Decrypt is refused; reveal (the reveal role) opens values through a
kms:Decrypt whose context names the user, and leaves an audit row per user.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import uuid

import asyncpg
import botocore.session
import pytest

from streams.privacy.kms import Kms
from streams.privacy.masking import IP_SIZE, canonical_device_id, canonical_ip
from streams.privacy.user_keys import Opener, erase_user_keys, kek_context
from streams.privacy.vault import reveal_sealed
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

ROLES = {
    "admin": ["kms:*"],
    "worker": ["kms:DescribeKey", "kms:GenerateMac", "kms:GenerateDataKey"],
    "reveal": ["kms:DescribeKey", "kms:Decrypt", "kms:Encrypt"],
}

# Runs in the moto process: IAM users and their access keys straight in moto's backend
# (with no unauthenticated action allowed, nothing could create them over HTTP), then serve.
BOOT = r"""
import json, sys
from moto.iam.models import iam_backends
from moto.server import main
iam = iam_backends["123456789012"]["global"]
out = {}
for name, actions in json.loads(sys.argv[2]).items():
    iam.create_user("us-east-1", name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(name, "role", json.dumps(policy))
    key = iam.create_access_key(name)
    out[name] = [key.access_key_id, key.secret_access_key]
with open(sys.argv[3] + ".tmp", "w") as fh:
    json.dump(out, fh)
import os; os.replace(sys.argv[3] + ".tmp", sys.argv[3])
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


class PrivateKms:
    def __init__(self, port: int, creds: dict[str, list[str]]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.creds = creds

    def client(self, role: str):
        key, secret = self.creds[role]
        return botocore.session.get_session().create_client(
            "kms", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret
        )

    def env(self, role: str) -> dict[str, str]:
        key, secret = self.creds[role]
        return {"STREAMS_AWS_ACCESS_KEY_ID": key, "STREAMS_AWS_SECRET_ACCESS_KEY": secret}


@pytest.fixture
def private_kms(tmp_path):
    if os.environ.get("STREAMS_TEST_STACK") == "containers":
        pytest.skip("runs moto as a local process")
    port, creds = free_port(), tmp_path / "creds.json"
    log = (tmp_path / "moto.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", BOOT, str(port), json.dumps(ROLES), str(creds)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: creds.exists() and answers(port), 30, "the private moto server")
        yield PrivateKms(port, json.loads(creds.read_text()))
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def split(pipeline, private_kms):
    """The pipeline in per-user key mode on the private KMS: a symmetric and an HMAC key."""
    admin = private_kms.client("admin")
    key = admin.create_key(Description="streams test")["KeyMetadata"]["KeyId"]
    mac = admin.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
    pipeline.env.update(
        STREAMS_KMS_KEY_ID=key,
        STREAMS_KMS_MAC_KEY_ID=mac,
        STREAMS_KMS_ENDPOINT=private_kms.url,
        STREAMS_DEPLOYMENT=f"t-{uuid.uuid4().hex[:8]}",
    )
    return private_kms


@pytest.fixture
def worker_dsn(pipeline):
    """A login role in streams_worker (migration 0004, 0005) for the worker; dropped afterwards."""
    assert pipeline.run("migrate").returncode == 0
    owner = pipeline.settings.pg_dsn.get_secret_value()
    login, password = f"w{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(12)
    pipeline.query(f"CREATE ROLE {login} LOGIN PASSWORD '{password}' IN ROLE streams_worker")
    yield owner.replace("postgresql://postgres@", f"postgresql://{login}:{password}@")
    pipeline.query(f"DROP ROLE IF EXISTS {login}")


async def refused_sql(dsn: str, sql: str) -> type[Exception] | None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        return type(exc)
    finally:
        await conn.close()
    return None


def refused(call) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    return caught.value.response["Error"]["Code"]


class RecordingKms(Kms):
    """The real KMS client, remembering each call's operation and EncryptionContext."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, dict | None]] = []

    def _call(self, operation, **kwargs):
        self.seen.append((operation, kwargs.get("EncryptionContext")))
        return super()._call(operation, **kwargs)


def test_a_worker_without_decrypt_runs_the_pipeline_and_only_audited_reveal_opens_values(
    pipeline, split, sample_path, worker_dsn
):
    import botocore.exceptions  # noqa: F401  (refused() names it)

    sample = json.loads(sample_path.read_text())
    valid = [r for r in sample if "ip" in r]
    ids = pipeline.send(sample)
    assert pipeline.run("migrate").returncode == 0
    bridge = pipeline.start("bridge")  # no KMS settings matter to it: it loads no key material
    worker = pipeline.start("worker", STREAMS_PG_DSN=worker_dsn, **split.env("worker"))
    pipeline.wait_for(lambda: pipeline.row_count() == len(valid), 120, f"{len(valid)} rows")
    assert pipeline.stop(bridge) == 0
    assert pipeline.stop(worker) == 0

    # No plaintext in the logs, the masked topic or the key store.
    s = pipeline.settings
    places = {
        "logs": pipeline.logs().encode(),
        "masked topic": b"".join((k or b"") + (v or b"") for k, v in pipeline.topic(s.masked_topic)),
        "key store": b"".join(repr(r).encode() for r in pipeline.query("SELECT * FROM user_data_keys")),
    }
    secrets_sent = {r["ip"] for r in valid} | {r["device_id"] for r in valid}
    assert [(n, v) for v in secrets_sent for n, blob in places.items() if v.encode() in blob] == []

    # What the worker wrote: tokens of the KMS-made join version, sealed values, wrapped keys only.
    rows = pipeline.query("SELECT * FROM user_logins ORDER BY message_id")
    assert {r["masked_ip"].split(".")[0] for r in rows} == {"g1"}
    assert pipeline.query("SELECT count(*) AS n FROM pii_vault")[0]["n"] == 0
    sealed = pipeline.query("SELECT * FROM sealed_values")
    assert len(sealed) == len(valid) and {len(s["ip_sealed"]) for s in sealed} == {1 + 8 + 16 + IP_SIZE}
    keys = pipeline.query("SELECT * FROM user_data_keys")
    assert {k["user_id"] for k in keys} == {r["user_id"] for r in valid}
    assert all(k["wrapped_key"] is not None and k["sealed_key"] is None for k in keys)
    lifetimes = pipeline.query("SELECT * FROM key_lifetimes")
    assert len(lifetimes) == 1  # one worker lifetime, one GenerateDataKey
    # Its database role adds keys and sealed values; it reads no key back and rewrites no sealed value.
    denied = asyncpg.InsufficientPrivilegeError
    for sql in (
        "SELECT wrapped_key FROM user_data_keys",
        "SELECT kek_blob FROM key_lifetimes",
        "SELECT ip_sealed FROM sealed_values",
        "UPDATE sealed_values SET user_id = 'x'",
        "DELETE FROM sealed_values",
        "DELETE FROM user_data_keys",
    ):
        assert asyncio.run(refused_sql(worker_dsn, sql)) is denied, sql

    # The worker's credentials: its Decrypt is refused, on the lifetime key it made itself too.
    deployment = pipeline.env["STREAMS_DEPLOYMENT"]
    worker_kms = split.client("worker")
    blob, key_id = lifetimes[0]["kek_blob"], bytes.fromhex(lifetimes[0]["key_id"])
    context = kek_context(deployment, key_id)
    assert refused(lambda: worker_kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)) in (
        "AccessDeniedException",
        "403",
    )
    assert split.client("reveal").decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"]

    # A reveal with the worker's credentials is refused in one line, and shows nothing.
    by_worker = pipeline.run(
        "reveal", "--message-id", ids[0], "--operator", "mallory", "--reason", "X", **split.env("worker")
    )
    assert by_worker.returncode != 0 and by_worker.stdout == "" and "Traceback" not in by_worker.stderr
    assert "refused decrypt" in by_worker.stderr and "check the credentials and the key policy" in by_worker.stderr
    tried = pipeline.query("SELECT outcome, user_id FROM pii_reveal_audit WHERE operator = 'mallory'")
    assert [(t["outcome"], t["user_id"]) for t in tried] == [("refused_kms", valid[0]["user_id"])]

    # Reveal by message id, as the reveal role: the values sent, audited per user.
    first = valid[0]
    out = pipeline.run(
        "reveal", "--message-id", ids[0], "--operator", "ann", "--reason", "INC-7", **split.env("reveal")
    )
    assert out.returncode == 0, out.stderr
    assert [(r["field"], r["value"]) for r in map(json.loads, out.stdout.splitlines())] == [
        ("ip", canonical_ip(first["ip"])[0]),
        ("device_id", canonical_device_id(first["device_id"])),
    ]
    audit = pipeline.query("SELECT * FROM pii_reveal_audit WHERE operator = 'ann'")
    assert {(a["action"], a["user_id"], a["outcome"], a["reason"]) for a in audit} == {
        ("reveal", first["user_id"], "revealed", "INC-7")
    }

    # Reveal by token opens one login holding it (here the same user as above).
    mine = next(r for r in rows if r["message_id"] == ids[0])
    by_token = pipeline.run(
        "reveal",
        "--token",
        mine["masked_device_id"],
        "--operator",
        "dan",
        "--reason",
        "INC-11",
        **split.env("reveal"),
    )
    assert by_token.returncode == 0, by_token.stderr
    assert [json.loads(line)["value"] for line in by_token.stdout.splitlines()] == [
        canonical_device_id(first["device_id"])
    ]

    # The custodian seals every user key under its user's context; the lifetime copy goes.
    assert pipeline.run("keys", "seal", **split.env("worker")).returncode != 0  # no Decrypt for the worker
    sealed_out = pipeline.run("keys", "seal", **split.env("reveal"))
    assert sealed_out.returncode == 0, sealed_out.stderr
    assert f"sealed {len(valid) - 1} user data keys" in sealed_out.stdout  # one user was opened (sealed) already
    assert all(k["sealed_key"] and k["wrapped_key"] is None for k in pipeline.query("SELECT * FROM user_data_keys"))
    seal_audit = pipeline.query("SELECT outcome FROM pii_reveal_audit WHERE action = 'seal'")
    assert [a["outcome"] for a in seal_audit] == ["bulk_open"] * 2  # the worker's refused attempt is audited too
    assert "no shared encryption key" in pipeline.run("keys", "reencrypt", **split.env("admin")).stderr

    # The worker role may rewrite user_logins: repointing a row at another login's tokens
    # does not change what reveal by message id shows (it reads sealed_values).
    other = rows[-1]
    pipeline.query(
        "UPDATE user_logins SET masked_ip = $1, masked_device_id = $2, user_id = $3 WHERE message_id = $4",
        other["masked_ip"],
        other["masked_device_id"],
        other["user_id"],
        ids[0],
    )
    again = pipeline.run(
        "reveal", "--message-id", ids[0], "--operator", "ann", "--reason", "INC-8", **split.env("reveal")
    )
    assert [json.loads(line)["value"] for line in again.stdout.splitlines()] == [
        canonical_ip(first["ip"])[0],
        canonical_device_id(first["device_id"]),
    ]

    # In process: each kms:Decrypt of the reveal names the user whose data it opened; then
    # erasure shreds the user's keys and reveal is refused, audited as erased.
    settings = pipeline.settings.model_copy(
        update={
            "aws_access_key_id": pydantic_secret(split.creds["reveal"][0]),
            "aws_secret_access_key": pydantic_secret(split.creds["reveal"][1]),
        }
    )
    second = valid[1]

    async def go():
        conn = await asyncpg.connect(settings.pg_dsn.get_secret_value())
        try:
            kms = RecordingKms(settings)
            opener = Opener(kms, deployment)
            shown = await reveal_sealed(conn, opener, "bob", message_id=ids[1], reason="INC-9")
            user_decrypts = [c for op, c in kms.seen if op == "decrypt" and c and c["purpose"] == "user-key"]
            assert [c["user_id"] for c in user_decrypts] == [second["user_id"]]
            # export --reveal (streams erase's subject access) opens one user's logins, audited as export.
            third = valid[2]
            exported = await reveal_sealed(
                conn, Opener(kms, deployment), "carol", user_id=third["user_id"], reason="SAR-1", action="export"
            )
            assert [e.value for e in exported] == [
                canonical_ip(third["ip"])[0],
                canonical_device_id(third["device_id"]),
            ]
            export_rows = await conn.fetch("SELECT action, user_id FROM pii_reveal_audit WHERE operator = 'carol'")
            assert {(r["action"], r["user_id"]) for r in export_rows} == {("export", third["user_id"])}
            assert await erase_user_keys(conn, second["user_id"]) == 1
            assert await erase_user_keys(conn, second["user_id"]) == 0  # idempotent
            with pytest.raises(Exception, match="erased"):
                await reveal_sealed(conn, Opener(RecordingKms(settings), deployment), "bob", message_id=ids[1])
            outcomes = await conn.fetch("SELECT outcome, user_id FROM pii_reveal_audit WHERE operator = 'bob'")
            return shown, [(o["outcome"], o["user_id"]) for o in outcomes]
        finally:
            await conn.close()

    shown, outcomes = asyncio.run(go())
    assert [s.value for s in shown] == [canonical_ip(second["ip"])[0], canonical_device_id(second["device_id"])]
    assert ("erased", second["user_id"]) in outcomes

    # Join rotation (the custodian): every login moves to g2 through an audited open per user;
    # the erased user's row stays unopenable; reveal still shows the values sent.
    g2 = {"STREAMS_JOIN_VERSION": "g2", **split.env("admin")}
    out = pipeline.run("keys", "rejoin", "--reason", "CHG-1", **g2)
    assert out.returncode == 0, out.stderr
    assert f"moved {len(valid) - 1} logins to join version g2; 1 rows of erased users" in out.stdout
    versions = {
        r["masked_ip"].split(".")[0]
        for r in pipeline.query("SELECT masked_ip FROM user_logins WHERE user_id <> $1", second["user_id"])
    }
    assert versions == {"g2"}
    rejoined = pipeline.query(
        "SELECT DISTINCT user_id FROM pii_reveal_audit WHERE action = 'rejoin' AND reason = 'CHG-1'"
    )
    assert {r["user_id"] for r in rejoined} == {r["user_id"] for r in valid}
    out = pipeline.run(
        "reveal", "--message-id", ids[0], "--operator", "ann", "--reason", "INC-10", **split.env("reveal")
    )
    assert [json.loads(line)["value"] for line in out.stdout.splitlines()] == [
        canonical_ip(first["ip"])[0],
        canonical_device_id(first["device_id"]),
    ]
    g2_tokens = {
        r["masked_ip"] for r in pipeline.query("SELECT masked_ip FROM sealed_values WHERE message_id = $1", ids[0])
    }
    assert [json.loads(line)["token"] for line in out.stdout.splitlines()][0] in g2_tokens


def pydantic_secret(text: str):
    from pydantic import SecretStr

    return SecretStr(text)


def test_a_worker_refuses_to_start_in_one_line_on_an_unusable_mac_key(pipeline, split):
    admin = split.client("admin")
    mac = pipeline.env["STREAMS_KMS_MAC_KEY_ID"]
    admin.disable_key(KeyId=mac)
    out = pipeline.run("worker", timeout=60, STREAMS_STAGES="mask", **split.env("worker"))
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "is Disabled" in lines[0] and mac in lines[0]
    missing = pipeline.run(
        "worker", timeout=60, STREAMS_STAGES="mask", STREAMS_KMS_MAC_KEY_ID="alias/none", **split.env("worker")
    )
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_a_mask_only_worker_seals_with_the_erasure_watch_and_key_writer_roles_only(pipeline):
    """The split mask Deployment (deploy/k8s/split) in per-user key mode: its login role is in
    streams_erasure_watch and streams_key_writer (migration 0007); it stores key rows and
    reads none back, nor any login."""
    from streams_dev.sandbox import local_env
    from tests.integration.test_erasure import U1, latest
    from tests.integration.test_privacy import as_role

    pipeline.env.update({k: v for k, v in local_env().items() if k.startswith("STREAMS_KMS_")})
    pipeline.migrate()
    role = f"mask_test_{uuid.uuid4().hex[:10]}"  # roles are cluster-wide: a unique name, dropped after
    pipeline.query(f'CREATE ROLE "{role}" LOGIN IN ROLE streams_erasure_watch, streams_key_writer')
    dsn = as_role(pipeline, role)
    try:
        worker = pipeline.start("worker", STREAMS_STAGES="mask", STREAMS_PG_DSN=dsn)
        pipeline.start("bridge")
        (u1,) = pipeline.send([U1])
        pipeline.wait_for(lambda: u1 in latest(pipeline), 120, "the masked record")
        assert pipeline.query("SELECT user_id FROM user_data_keys")[0]["user_id"] == U1["user_id"]
        assert pipeline.query("SELECT count(*) AS n FROM key_lifetimes")[0]["n"] == 1
        for sql in ("SELECT * FROM user_data_keys", "SELECT * FROM key_lifetimes", "SELECT * FROM sealed_values"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                asyncio.run(refused_fetch(dsn, sql))
        assert pipeline.stop(worker) == 0
    finally:
        pipeline.stop_all()
        pipeline.query(f'DROP ROLE "{role}"')


async def refused_fetch(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetch(sql)
    finally:
        await conn.close()


class HeldLock:
    """A PostgreSQL transaction that holds ``sql``'s lock until ``release`` (own thread and loop)."""

    def __init__(self, dsn: str, sql: str) -> None:
        self._held, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold(dsn, sql)), daemon=True)
        self._thread.start()
        assert self._held.wait(30), "the lock was not taken"

    async def _hold(self, dsn: str, sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(sql)
                self._held.set()
                await asyncio.to_thread(self._release.wait)
        finally:
            await conn.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)


def test_no_masked_record_is_committed_before_its_data_key_is_stored(pipeline):
    """Per-user key mode: while the key store takes no row (a lock on user_data_keys), the
    worker's key rows wait and no masked record becomes visible (read_committed), though the
    worker reads, masks and may produce them into its open transaction; once the rows are
    stored, every visible record's user has its key row."""
    from streams_dev.sandbox import local_env
    from tests.integration.test_erasure import U1, latest

    pipeline.env.update({k: v for k, v in local_env().items() if k.startswith("STREAMS_KMS_")})
    pipeline.migrate()
    records = [{**U1, "user_id": f"u-order-{i}", "device_id": f"D-{i}"} for i in range(20)]
    waiting = (
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query ILIKE '%user_data_keys%'"
    )
    lock = HeldLock(pipeline.settings.pg_dsn.get_secret_value(), "LOCK TABLE user_data_keys IN SHARE MODE")
    try:
        pipeline.start("worker", STREAMS_STAGES="mask")
        pipeline.start("bridge")
        ids = pipeline.send(records)
        pipeline.wait_for(lambda: pipeline.query(waiting)[0]["n"] > 0, 120, "the worker's key rows waiting")
        assert latest(pipeline) == {}
    finally:
        lock.release()
    try:
        pipeline.wait_for(lambda: set(ids) <= set(latest(pipeline)), 120, "every masked record")
        stored = {r["user_id"] for r in pipeline.query("SELECT user_id FROM user_data_keys")}
        assert {r["user_id"] for r in records} <= stored
    finally:
        pipeline.stop_all()
