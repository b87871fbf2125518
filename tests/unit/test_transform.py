"""The mask stage's pure transform: envelopes in, masked records or dead letters out."""

import datetime as dt
import json

from streams.io.codec import Codecs
from streams.pipeline.mask import MaskTransform
from streams.privacy.keys import generate_document, parse_keyring
from streams.privacy.masking import Masker

SENT = dt.datetime(2024, 5, 1, 23, 59, tzinfo=dt.UTC)
LOGIN = {
    "user_id": "u1",
    "app_version": "0.96",
    "device_type": "ios",
    "ip": "10.0.0.7",
    "locale": None,
    "device_id": "111-22-3333",
}

codecs = Codecs()
transform = MaskTransform(Masker(parse_keyring(json.dumps(generate_document()), "t")), codecs)


def raw(body: str, message_id: str = "m-1") -> bytes:
    return codecs.raw.encode({"message_id": message_id, "sent_at": SENT, "body": body, "attributes": {}})


def test_valid_login_becomes_masked_record_without_plaintext():
    out = transform(b"m-1", raw(json.dumps(LOGIN)), "t/0/0")
    assert out.reason is None and out.key == b"m-1"
    record = codecs.masked.decode(out.value)
    assert record["message_id"] == "m-1" and record["sent_at"] == SENT and record["app_version"] == 96000
    assert b"10.0.0.7" not in out.value and b"111-22-3333" not in out.value


def test_invalid_body_becomes_dead_letter_with_reason_and_payload():
    payload = raw('{"foo": "oops_wrong_msg_type", "bar": "123"}', "m-2")
    out = transform(b"m-2", payload, "t/0/1")
    dead = codecs.dead_letter.decode(out.value)
    assert out.reason == "missing_field" == dead["reason"]
    assert dead["message_id"] == "m-2" and dead["stage"] == "mask" and dead["payload"] == payload


def test_undecodable_bytes_on_raw_topic_are_dead_lettered_by_key_or_position():
    out = transform(None, b"\xff\xfe not avro", "logins.raw/3/17")
    dead = codecs.dead_letter.decode(out.value)
    assert (dead["reason"], dead["message_id"]) == ("undecodable_record", "logins.raw/3/17")
    assert transform(b"k-9", b"garbage", "x").key == b"k-9"


def test_invalid_ip_is_masked_and_flagged():
    out = transform(b"m-3", raw(json.dumps({**LOGIN, "ip": "not-an-ip"})), "t/0/2")
    assert codecs.masked.decode(out.value)["ip_is_valid"] is False
