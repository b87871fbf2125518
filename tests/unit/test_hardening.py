"""Issue 9's pure-logic fixes: tombstones, bounds, number limits, leaks, attribute allow-list."""

from __future__ import annotations

import json

from confluent_kafka import KafkaError

from streams.pipeline.bridge import envelope
from streams.pipeline.dead_letters import MAX_PAYLOAD, refused_by_kafka
from streams.pipeline.mask import MaskTransform, parse_login
from streams.pipeline.sink import SinkStage
from streams.privacy.keys import generate_document, parse_keyring
from streams.privacy.masking import Masker
from tests.factories import CODECS, LOGIN, masked_value, raw_value

TRANSFORM = MaskTransform(Masker(parse_keyring(json.dumps(generate_document()), "test")), CODECS)
BODY = LOGIN


def test_raw_tombstone_is_an_empty_record_dead_letter():
    for value in (None, b""):
        out = TRANSFORM(b"m-1", value, "t/0/5")
        assert out.reason == "empty_record"
        dead = CODECS.dead_letter.decode(out.value)
        assert dead["payload"] == b"" and dead["message_id"] == "m-1"


def test_a_5000_digit_number_has_its_own_reason():
    out = TRANSFORM(b"m", raw_value("m", '{"user_id": ' + "9" * 5000 + "}"), "t/0/0")
    assert out.reason == "number_too_long"
    assert "9999" not in CODECS.dead_letter.decode(out.value)["detail"]


def test_over_long_message_id_is_refused_where_it_enters():
    out = TRANSFORM(b"x", raw_value("x" * 6000, json.dumps(BODY)), "t/0/0")
    assert out.reason == "invalid_message_id"
    assert len(out.key) == 128


def test_pii_field_too_long_does_not_say_its_length():
    for field in ("ip", "device_id"):
        out = TRANSFORM(b"m", raw_value("m", json.dumps({**BODY, field: "1" * 237})), "t/0/0")
        detail = CODECS.dead_letter.decode(out.value)["detail"]
        assert out.reason == "field_too_long" and "237" not in detail and field in detail
    out = TRANSFORM(b"m", raw_value("m", json.dumps({**BODY, "device_type": "x" * 40})), "t/0/0")
    assert "40" in CODECS.dead_letter.decode(out.value)["detail"]  # not PII: the length helps


def test_sink_plan_tombstones_delete_and_the_last_record_per_id_wins():
    plan = SinkStage(CODECS).plan(
        [
            (b"a", masked_value("a"), "m/0/0"),
            (b"a", None, "m/0/1"),  # delete after the upsert: deleted
            (b"b", None, "m/0/2"),
            (b"b", masked_value("b"), "m/0/3"),  # upsert after the delete: written
            (None, None, "m/0/4"),  # no key: nothing to delete, a dead letter
            (b"c", masked_value("x" * 300), "m/0/5"),
        ]
    )
    assert plan.deletes == ["a"]
    assert [r["message_id"] for r in plan.rows] == ["b"]
    reasons = [CODECS.dead_letter.decode(v)["reason"] for _, v, _ in plan.dead]
    assert reasons == [reason for _, _, reason in plan.dead]
    assert reasons == ["empty_record", "invalid_message_id"]


def test_a_dead_letter_too_large_for_kafka_keeps_its_reason_with_a_truncated_payload():
    err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    big = TRANSFORM(b"m", raw_value("m", "{" * 5 + "x" * 900_000), "t/0/0")
    topic, key, value = refused_by_kafka(("dlq", big.key, big.value), err, "mask", CODECS.dead_letter, "dlq")
    dead = CODECS.dead_letter.decode(value)
    assert (topic, key, dead["reason"], dead["payload_truncated"]) == ("dlq", b"m", "invalid_json", True)
    assert len(dead["payload"]) == MAX_PAYLOAD

    topic, key, value = refused_by_kafka(("raw", b"m2", b"x" * 2_000_000), err, "bridge", CODECS.dead_letter, "dlq")
    dead = CODECS.dead_letter.decode(value)
    assert (topic, dead["reason"], dead["stage"], dead["payload_truncated"]) == ("dlq", "too_large", "bridge", True)
    assert "MSG_SIZE_TOO_LARGE" in dead["detail"]


def test_envelope_keeps_only_allowed_attributes():
    message = {
        "MessageId": "m",
        "Body": "{}",
        "Attributes": {"SentTimestamp": "1700000000000", "SenderId": "AIDAEXAMPLE", "ApproximateReceiveCount": "1"},
        "MessageAttributes": {"email": {"StringValue": "a@b.c", "DataType": "String"}},
    }
    env = envelope(message)
    assert env["attributes"] == {"SentTimestamp": "1700000000000"} and env["sent_at"] == 1700000000000
    assert envelope(message, {"attr.email"})["attributes"] == {"attr.email": "a@b.c"}


def test_parse_login_still_accepts_big_but_legal_numbers_in_ignored_fields():
    assert parse_login(json.dumps({**BODY, "n": 10**100})).user_id == "u"


def test_bridge_asks_sqs_only_for_the_attributes_it_keeps():
    from streams.pipeline.bridge import receive_attributes

    assert receive_attributes({"SentTimestamp"}) == {"AttributeNames": ["SentTimestamp"]}
    # sent_at always needs SentTimestamp; unknown names are never sent (SQS would refuse every receive)
    assert receive_attributes({"SenderId", "NoSuchAttribute"}) == {"AttributeNames": ["SenderId", "SentTimestamp"]}
    assert receive_attributes({"attr.trace"}) == {"AttributeNames": ["SentTimestamp"], "MessageAttributeNames": ["All"]}
