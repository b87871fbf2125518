"""Issue 19 item 1 against the real moto server of the stack: key material wrapped by a KMS.

Each test makes its own KMS key (moto keeps keys per process, shared by every test).
"""

from __future__ import annotations

import base64
import json
import os
import uuid

import botocore.session
import pytest

from streams.errors import ConfigError
from streams.privacy import keys
from streams.privacy.kms import Kms
from streams_dev import stack
from streams_dev.sandbox import local_env, private_settings
from streams_dev.stack import StackError
from streams_dev.stack.kms import Kms as KmsService

pytestmark = pytest.mark.integration

LOGIN = {
    "user_id": "u-kms",
    "app_version": "2.3.0",
    "device_type": "ios",
    "ip": "198.51.100.77",
    "locale": None,
    "device_id": "kms-dev-1",
}


def kms_client(settings):
    return botocore.session.get_session().create_client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{settings.kms_port}",
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )


@pytest.fixture
def kms(pipeline, stack_settings):
    """A fresh KMS key for this test, and the pipeline's env pointing at it."""
    if os.environ.get("STREAMS_TEST_STACK") == "containers":
        pytest.skip("moto's KMS runs in the process stack; tests/containers has no KMS container yet")
    client = kms_client(stack_settings)
    key = client.create_key(Description=f"test {uuid.uuid4()}")["KeyMetadata"]
    pipeline.env.update(
        STREAMS_KMS_KEY_ID=key["KeyId"],
        STREAMS_KMS_ENDPOINT=f"http://127.0.0.1:{stack_settings.kms_port}",
        STREAMS_DEPLOYMENT=f"test-{uuid.uuid4().hex[:8]}",
    )
    return client, key


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def key_bytes(doc: dict) -> list[str]:
    return [doc["encryption"]["keys"][k] for k in doc["encryption"]["keys"]] + [
        v[f] for v in doc["join"]["versions"].values() for f in keys.PII_FIELDS
    ]


def test_a_worker_masks_with_a_wrapped_dev_key_and_reveal_opens_it(pipeline, kms):
    s = pipeline.settings
    pipeline.start("bridge")
    pipeline.start("worker")  # STREAMS_DEV_KEYS=1 in the sandbox: generates the key, wrapped
    [message_id] = pipeline.send([LOGIN])
    pipeline.wait_for(lambda: pipeline.row_count() == 1, 120, "the row")

    stored = json.loads(s.keys_file.read_text())
    assert stored["format"] == "streams-wrapped-keyring/1" and "join" not in stored
    assert stored["context"] == {"deployment": s.deployment, "purpose": "keyring"}
    ring = keys.settings_keyring(s)
    plain = [*ring.encryption_keys.values(), *(k for v in ring.join_keys.values() for k in v.values())]
    text = s.keys_file.read_text()
    assert not any(base64.b64encode(k).decode() in text for k in plain)

    out = pipeline.run("reveal", "--message-id", message_id, "--operator", "ops", "--reason", "INC-19")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["value"] for line in out.stdout.splitlines()] == ["198.51.100.77", "kms-dev-1"]


def test_every_unusable_key_or_kms_stops_a_process_at_start_in_one_line(pipeline, kms):
    client, key = kms
    assert pipeline.run("keys", "init").returncode == 0
    assert pipeline.run("keys", "list").returncode == 0

    assert "does not exist" in one_line(pipeline.run("keys", "list", STREAMS_KMS_KEY_ID="alias/no-such-key"))
    assert "does not answer" in one_line(pipeline.run("keys", "list", STREAMS_KMS_ENDPOINT="http://127.0.0.1:1"))
    line = one_line(pipeline.run("keys", "list", STREAMS_DEPLOYMENT="another-deployment"))
    assert "wrong key or wrong STREAMS_DEPLOYMENT" in line
    other = client.create_key()["KeyMetadata"]
    assert "wrapped by another KMS key" in one_line(pipeline.run("keys", "list", STREAMS_KMS_KEY_ID=other["KeyId"]))

    # A check value that does not match the unwrapped data key: the wrong key or context, said so.
    path = pipeline.settings.keys_file
    doc = json.loads(path.read_text())
    keys.write_document(path, {**doc, "check": "AAAAAAAAAAAAAAAAAAAAAA=="})
    assert "does not match KMS key" in one_line(pipeline.run("keys", "list"))
    keys.write_document(path, doc)

    # moto still decrypts with a disabled key; the start-up check does not let it.
    client.disable_key(KeyId=key["KeyId"])
    blob = base64.b64decode(doc["data_key"])
    assert client.decrypt(CiphertextBlob=blob, EncryptionContext=doc["context"])["Plaintext"]
    line = one_line(pipeline.run("worker", STREAMS_STAGES="mask", timeout=90))
    assert "is Disabled" in line and "STREAMS_KMS_KEY_ID" in line
    client.enable_key(KeyId=key["KeyId"])
    assert pipeline.run("keys", "list").returncode == 0

    client.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    assert "pending deletion" in one_line(pipeline.run("keys", "list"))


def test_one_command_migrates_a_plaintext_key_file_then_plaintext_is_refused(pipeline, kms):
    path = pipeline.settings.keys_file
    plain_env = {"STREAMS_KMS_KEY_ID": ""}  # as before: a plaintext key file
    assert pipeline.run("keys", "init", **plain_env).returncode == 0
    plaintext = path.read_text()
    before = keys.load_keyring(path)

    assert "run `streams keys migrate` once" in one_line(pipeline.run("keys", "list"))
    migrated = pipeline.run("keys", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    stored = json.loads(path.read_text())
    assert stored["format"] == "streams-wrapped-keyring/1"
    assert not any(secret in path.read_text() for secret in key_bytes(json.loads(plaintext)))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert keys.settings_keyring(pipeline.settings) == before  # the same keys, now wrapped

    assert "already wrapped" in one_line(pipeline.run("keys", "migrate"))
    assert "wrapped by a KMS: set STREAMS_KMS_KEY_ID" in one_line(pipeline.run("keys", "list", **plain_env))

    # Rotation keeps the file wrapped.
    assert pipeline.run("keys", "rotate", "encryption").returncode == 0
    assert json.loads(path.read_text())["format"] == "streams-wrapped-keyring/1"
    assert keys.settings_keyring(pipeline.settings).encryption_key_id == "k2"

    # Putting the old plaintext file back (a backup, a stale mount) is refused.
    path.write_text(plaintext)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="holds plaintext keys"):
        keys.settings_keyring(pipeline.settings)
    assert isinstance(Kms(pipeline.settings).arn(), str)


def test_stack_up_refuses_a_fresh_kms_while_the_dev_key_file_depends_on_the_old_one(pipeline, kms, tmp_path):
    assert pipeline.run("keys", "init").returncode == 0  # wrapped by a moto key
    service = KmsService(pipeline.settings.model_copy(update={"stack_dir": tmp_path / "stack"}))
    with pytest.raises(StackError, match="remove .*keys.json") as refused:
        service.prepare()  # what `stack up` runs before it starts a fresh moto
    assert "\n" not in str(refused.value)
    pipeline.settings.keys_file.unlink()
    service.prepare()  # nothing depends on the old keys: a fresh moto may start


def test_a_fresh_kms_wipes_the_dev_rows_only_its_lost_keys_opened(pipeline, stack_settings, tmp_path):
    """Per-user key mode (`make run`): a restarted moto has new keys, so `stack up` deletes
    the sealed rows, key rows and their logins of the dev database; a running one keeps them."""
    if os.environ.get("STREAMS_TEST_STACK") == "containers":
        pytest.skip("moto's KMS runs in the process stack")
    pipeline.env.update({k: v for k, v in local_env().items() if k.startswith("STREAMS_KMS_")})
    pipeline.start("bridge")
    pipeline.start("worker")
    pipeline.send([LOGIN, {**LOGIN, "user_id": "u-kms-2"}])
    pipeline.wait_for(lambda: pipeline.row_count() == 2, 120, "two rows")
    pipeline.stop_all()
    # A login of keyring mode (no sealed value) is not the KMS's: it stays.
    pipeline.query(
        "INSERT INTO user_logins SELECT (jsonb_populate_record(NULL::user_logins,"
        ' to_jsonb(l) || \'{"message_id": "keyring-row"}\')).* FROM user_logins l LIMIT 1'
    )

    def counts() -> dict[str, int]:
        tables = ("user_logins", "sealed_values", "user_data_keys", "key_lifetimes")
        return {t: pipeline.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in tables}

    before = counts()
    assert before["sealed_values"] == 2 and before["user_data_keys"] == 2 and before["key_lifetimes"] >= 1, before
    dev_db = {"pg_dsn": pipeline.settings.pg_dsn}
    stack.up(stack_settings.model_copy(update=dev_db), ["kms"])  # running: its keys still open the rows
    assert counts() == before

    fresh = private_settings(tmp_path / "stack").model_copy(update=dev_db)  # a moto that starts empty
    said: list[str] = []
    try:
        stack.up(fresh, ["kms"], report=said.append)
    finally:
        stack.down(fresh, ["kms"])
    assert counts() == {"user_logins": 1, "sealed_values": 0, "user_data_keys": 0, "key_lifetimes": 0}
    assert pipeline.query("SELECT message_id FROM user_logins")[0]["message_id"] == "keyring-row"
    assert any("wiped" in line for line in said), said
