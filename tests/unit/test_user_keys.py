"""Per-user key mode (issue 19 item 2): the pure primitives and the lifetime's key handling.

The KMS here is a recording stand-in (pure logic); tests/integration/test_key_split.py runs
the same code against moto's KMS with IAM checks, and the real pipeline.
"""

from __future__ import annotations

import hmac
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streams.io.codec import Codecs
from streams.pipeline.mask import SealingMaskTransform
from streams.privacy import masking
from streams.privacy.masking import (
    DEVICE_ID_SIZES,
    IP_SIZE,
    RevealError,
    UserMasker,
    associated,
    join_token,
    open_value,
    pad_field,
    seal,
    sealed_value,
    split_sealed,
)
from streams.privacy.user_keys import KeyRows, Lifetime, wrap_ad

JOIN = {"ip": b"i" * 32, "device_id": b"d" * 32}


class RecordingKms:
    """Stands in for streams.privacy.kms.Kms: counts calls, makes data keys, never decrypts."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def arn(self) -> str:
        return "arn:aws:kms:us-east-1:123456789012:key/test"

    def _call(self, operation: str, **kwargs):
        self.calls.append((operation, kwargs))
        assert operation == "generate_data_key"
        return {"Plaintext": os.urandom(kwargs["NumberOfBytes"]), "CiphertextBlob": b"blob" + os.urandom(8)}


def masker(kms=None, max_users: int = 1000) -> UserMasker:
    return UserMasker(JOIN, "g1", Lifetime(kms or RecordingKms(), "dep", max_users))


def test_tokens_are_the_reference_hmac_with_field_and_version_in_the_input():
    m = masker()
    token = m.token("ip", "192.0.2.1")
    digest = join_token(JOIN["ip"], b"ip", b"g1", b"192.0.2.1")
    assert digest == hmac.digest(JOIN["ip"], b"ip\x00g1\x00192.0.2.1", "sha256")
    assert token == "g1." + masking._b64(digest)
    assert m.token("device_id", "192.0.2.1") != token


def test_a_sealed_value_is_the_reference_aes_siv_names_its_key_and_is_deterministic_for_given_keys():
    m = masker()
    token, value = m.mask("u1", "ip", "192.0.2.1")
    key_id, body = split_sealed(value)
    assert value[0] == masking.SEALED_FORMAT and key_id == m.lifetime.key_id
    # The reference: the same user key gives the same bytes (a compiled core is checked against this).
    _, siv = m.lifetime.data_key("u1")
    assert m.mask("u1", "ip", "192.0.2.1") == (token, value)
    assert isinstance(value, bytes) and len(value) == 1 + 8 + 16 + IP_SIZE
    plain = pad_field("ip", b"192.0.2.1")
    assert len(plain) == IP_SIZE and plain[:2] == b"\x00\x09"
    assert open_value(siv, "ip", "u1", token, value) == "192.0.2.1"


def test_seal_primitive_matches_the_masker_byte_for_byte():
    key = os.urandom(64)
    ad = associated(b"ip", b"u1", b"12345678", b"g1.tok")
    expected = AESSIV(key).encrypt(pad_field("ip", b"10.0.0.1"), [ad])
    assert seal(key, pad_field("ip", b"10.0.0.1"), ad) == expected
    assert sealed_value(b"12345678", expected)[1:9] == b"12345678"


@pytest.mark.parametrize(
    "ip", ["0.0.0.0", "255.255.255.255", "::1", "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", "2001:db8::cafe"]
)
def test_every_ip_address_pads_to_48_bytes(ip):
    assert len(pad_field("ip", ip.encode())) == IP_SIZE


def test_device_ids_get_the_smallest_bucket_that_holds_them():
    assert [len(pad_field("device_id", b"x" * n)) for n in (1, 46, 47, 94, 95, 206, 207)] == [
        48,
        48,
        96,
        96,
        208,
        208,
        816,
    ]
    assert len(pad_field("device_id", ("设" * 200).encode())) == DEVICE_ID_SIZES[-1]
    assert len(pad_field("ip", b"not an ip" * 10)) == 96  # an invalid ip is masked as text, in the device buckets


def test_a_sealed_value_opens_only_for_its_user_token_and_field():
    m = masker()
    token, value = m.mask("u1", "ip", "192.0.2.1")
    _, siv = m.lifetime.data_key("u1")
    for user, field, tok in (("u2", "ip", token), ("u1", "device_id", token), ("u1", "ip", "g1.other")):
        with pytest.raises(RevealError):
            open_value(siv, field, user, tok, value)


def test_one_kms_call_per_lifetime_and_one_key_row_per_user_never_per_record():
    kms = RecordingKms()
    m = masker(kms, max_users=3)
    for n in range(10):
        m.mask(f"u{n % 3}", "ip", f"10.0.0.{n}")
        m.mask(f"u{n % 3}", "device_id", f"d{n}")
    assert [op for op, _ in kms.calls] == ["generate_data_key"]
    context = kms.calls[0][1]["EncryptionContext"]
    assert context == {"deployment": "dep", "purpose": "user-kek", "key_id": m.lifetime.key_id.hex()}
    lifetimes, rows = m.lifetime.take()
    assert rows.user_ids == ["u0", "u1", "u2"] and len(lifetimes) == 1
    assert m.lifetime.take() == ([], KeyRows())
    m.mask("u3", "ip", "10.0.0.1")  # a 4th user: past max_users a new lifetime starts
    assert len(kms.calls) == 2 and m.lifetime.take()[1].key_ids == [m.lifetime.key_id]


def test_the_worker_keeps_only_wrapped_user_keys():
    kms = RecordingKms()
    m = masker(kms)
    m.mask("u1", "ip", "10.0.0.1")
    _, rows = m.lifetime.take()
    row = rows.rows()[0]
    _, siv = m.lifetime.data_key("u1")
    kek = m.lifetime._kek  # the plaintext lifetime key lives in worker memory only
    key = kek.decrypt(row.wrapped_key, [wrap_ad("dep", row.key_id, "u1")])
    assert AESSIV(key).encrypt(b"x", [b"y"]) == siv.encrypt(b"x", [b"y"])
    assert len(row.wrapped_key) == 16 + 64  # AES-SIV of the 64-byte key: never the key itself


def test_the_sealing_transform_writes_masked_schema_v3_with_bytes_and_no_recovery_text():
    import datetime as dt

    codecs = Codecs()
    transform = SealingMaskTransform(masker(), codecs)
    body = (
        '{"user_id": "u1", "device_type": "ios", "ip": "::ffff:192.0.2.1", "device_id": "dev-1",'
        ' "app_version": "2.3.0", "locale": null}'
    )
    raw = codecs.raw.encode(
        {"message_id": "m1", "sent_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "body": body, "attributes": {}}
    )
    out = transform(b"m1", raw, "t/0/0")
    assert out.reason is None
    record = codecs.masked.decode(out.value)
    assert codecs.masked.version == 3
    assert record["ip_ciphertext"] == "" and record["device_id_ciphertext"] == ""
    assert isinstance(record["ip_sealed"], bytes) and len(record["ip_sealed"]) == 73
    assert record["masked_ip"].startswith("g1.")
    assert b"192.0.2.1" not in out.value and b"dev-1" not in out.value


def test_the_hot_path_mask_login_gives_the_reference_bytes():
    m = masker()
    ip_token, ip_sealed, device_token, device_sealed = m.mask_login("u1", "192.0.2.1", "dev-1")
    assert (ip_token, ip_sealed) == m.mask("u1", "ip", "192.0.2.1")
    assert (device_token, device_sealed) == m.mask("u1", "device_id", "dev-1")
    key_id, siv = m.lifetime.data_key("u1")
    assert ip_sealed == sealed_value(
        key_id, siv.encrypt(pad_field("ip", b"192.0.2.1"), [associated(b"ip", b"u1", key_id, ip_token.encode())])
    )


def test_each_user_gets_its_own_random_key():
    m = masker()
    values = {m.mask(f"u{n}", "ip", "192.0.2.1")[1] for n in range(300)}  # past one block of drawn keys
    assert len(values) == 300


def test_a_sealed_sink_dead_letter_is_redriven_as_it_is_without_decrypting():
    import datetime as dt

    from streams.errors import Refused
    from streams.ops.dlq import redrive_records
    from streams.settings import Settings

    codecs = Codecs()
    m = masker()
    ip_token, ip_sealed, device_token, device_sealed = m.mask_login("u1", "192.0.2.1", "dev-1")
    record = {
        "message_id": "m1",
        "sent_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "user_id": "u1",
        "device_type": "ios",
        "locale": None,
        "app_version_raw": "1",
        "app_version": 1000000,
        "masked_ip": ip_token,
        "masked_device_id": device_token,
        "ip_ciphertext": "",
        "device_id_ciphertext": "",
        "ip_is_valid": True,
        "ip_sealed": ip_sealed,
        "device_id_sealed": device_sealed,
    }
    payload = codecs.masked.encode(record)
    letter = {"message_id": "m1", "stage": "sink", "payload": payload, "payload_truncated": False}
    settings = Settings(_env_file=None, schema_registry_url="")
    # No keyring is given and none exists: a keyring-mode remask would refuse for want of keys.
    assert [(k, v) for _, k, v in redrive_records(settings, [letter])] == [(b"m1", payload)]
    other = settings.model_copy(update={"join_version": "g2"})
    with pytest.raises(Refused, match="join version g2"):
        redrive_records(other, [letter])


def test_the_bridge_and_the_split_sink_get_no_key_material():
    from pathlib import Path

    import yaml

    k8s = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
    for path in (k8s / "common" / "bridge-deployment.yaml", k8s / "split" / "sink-deployment.yaml"):
        spec = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]
        secrets = [v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v]
        assert "streams-keys" not in secrets, path.name
        env = {e["name"] for c in spec["containers"] for e in c.get("env", [])}
        assert not env & {"STREAMS_KEYS_JSON", "STREAMS_KMS_KEY_ID", "STREAMS_KMS_MAC_KEY_ID"}, path.name


def test_forgetting_a_user_drops_its_key_and_its_unstored_row():
    m = masker()
    _, first = m.mask("u1", "ip", "192.0.2.1")
    m.mask("u2", "ip", "192.0.2.1")
    m.lifetime.forget("u1")
    _, rows = m.lifetime.take()
    assert rows.user_ids == ["u2"]
    _, again = m.mask("u1", "ip", "192.0.2.1")
    assert again != first  # a new data key: nothing made before the erasure opens with it


def test_new_keys_in_bulk_are_the_keys_made_one_at_a_time():
    """``Lifetime.new_keys``: the same keys, key rows and random draws as ``new_key`` per user in
    order, across the random buffer's refills (256 keys each); nothing made when the users do
    not fit the lifetime or one has no UTF-8 form."""
    import random

    users = [f"u-{i}" for i in range(700)] + ["ü-✓"]
    for sizes in ([1, 255, 1, 300, 144], [701], [256, 256, 189]):
        seed = len(sizes)
        bulk = Lifetime(RecordingKms(), "dep", 10_000, random_bytes=random.Random(seed).randbytes)
        single = Lifetime(RecordingKms(), "dep", 10_000, random_bytes=random.Random(seed).randbytes)
        at = 0
        for size in sizes:
            part = users[at : at + size]
            at += size
            assert bulk.new_keys(part) == [single.new_key(u) for u in part]
        assert [bulk.known(u) for u in users] == [single.known(u) for u in users]
        assert bulk._new_users == single._new_users and bulk._new_keys == single._new_keys
    full = Lifetime(RecordingKms(), "dep", 3)
    assert full.new_keys(["a", "b", "c", "d"]) is None and full.known("a") is None
    assert full.new_keys(["a", "\ud800"]) is None and full.known("a") is None
    assert full.new_keys(["a", "b", "c"]) is not None and len(full.take()[1]) == 3
