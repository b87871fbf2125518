"""Avro single-object encoding: round trip, fingerprints, older writers, compatibility."""

import datetime as dt
import json

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streams.io import avro_fast
from streams.io.codec import MAGIC, SCHEMA_DIR, AvroCodec, CodecError, Codecs, fingerprint, schema_versions

SENT = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)


def masked_v2(**changes):
    return {
        "message_id": "m-1",
        "sent_at": SENT,
        "user_id": "u",
        "device_type": "ios",
        "locale": None,
        "app_version_raw": "0.96",
        "app_version": 96000,
        "masked_ip": "h1.a",
        "masked_device_id": "h1.b",
        "ip_ciphertext": "k1.c",
        "device_id_ciphertext": "k1.d",
        "ip_is_valid": False,
        "ip_sealed": None,
        "device_id_sealed": None,
        **changes,
    }


def test_round_trip_every_codec():
    codecs = Codecs()
    raw = {"message_id": "m", "sent_at": SENT, "body": "{}", "attributes": {"SentTimestamp": "1"}}
    assert codecs.raw.decode(codecs.raw.encode(raw)) == raw
    assert codecs.masked.decode(codecs.masked.encode(masked_v2())) == masked_v2()
    dead = {
        "message_id": "m",
        "stage": "mask",
        "reason": "invalid_json",
        "detail": "d",
        "payload": b"\xff\x00",
        "failed_at": SENT,
        "payload_truncated": False,
    }
    assert codecs.dead_letter.decode(codecs.dead_letter.encode(dead)) == dead


def test_single_object_header():
    codec = Codecs().masked
    data = codec.encode(masked_v2())
    assert data[:2] == MAGIC == b"\xc3\x01"
    assert data[2:10] == fingerprint(schema_versions("masked_login")[codec.version])


def test_crc64_matches_apache_avro():
    # A schema without logical types: Apache avro's canonical form then agrees with the spec.
    text = json.dumps({"type": "record", "name": "r", "fields": [{"name": "a", "type": "string"}]})
    assert fingerprint(json.loads(text)) == avro.schema.parse(text).fingerprint("CRC-64-AVRO")


def test_record_from_older_writer_resolves_to_current_reader():
    v1 = schema_versions("masked_login")[1]
    old = AvroCodec.__new__(AvroCodec)
    import fastavro

    old.schema = fastavro.parse_schema(v1)
    old.header = MAGIC + fingerprint(v1)
    datum = masked_v2()
    for name in ("ip_is_valid", "ip_sealed", "device_id_sealed"):
        del datum[name]
    decoded = Codecs().masked.decode(AvroCodec.encode(old, datum))
    assert decoded == {**datum, "ip_is_valid": True, "ip_sealed": None, "device_id_sealed": None}  # v2, v3 defaults


@pytest.mark.parametrize("data", [b"", b"{}", b"\xc3\x01" + b"\0" * 8 + b"x", b"\xc3\x01\xff"])
def test_garbage_is_a_codec_error(data):
    with pytest.raises(CodecError):
        Codecs().raw.decode(data)


def test_truncated_datum_is_a_codec_error():
    data = Codecs().raw.encode({"message_id": "m", "sent_at": SENT, "body": "x" * 50, "attributes": {}})
    with pytest.raises(CodecError):
        Codecs().raw.decode(data[:-10])


def _names():
    return sorted({p.name.split(".v")[0] for p in SCHEMA_DIR.glob("*.avsc")})


@pytest.mark.parametrize("name", _names())
def test_every_schema_version_is_readable_by_every_later_one(name):
    versions = schema_versions(name)
    parsed = {v: avro.schema.parse(json.dumps(s)) for v, s in versions.items()}
    checker = ReaderWriterCompatibilityChecker()
    for reader in parsed:
        for writer in parsed:
            if writer <= reader:
                result = checker.get_compatibility(parsed[reader], parsed[writer])
                assert result.compatibility is SchemaCompatibilityType.compatible, (name, reader, writer)


def test_schema_files_are_all_versioned():
    assert _names() == ["dead_letter", "masked_login", "raw_envelope"]
    for path in SCHEMA_DIR.glob("*.avsc"):
        assert ".v" in path.name, path


# --- the generated fast paths (streams/io/avro_fast.py) against fastavro itself ---------------

_text = st.text(max_size=300)
_ts = st.one_of(
    st.integers(min_value=avro_fast.TS_MIN - 5, max_value=avro_fast.TS_MAX + 5),
    st.integers(min_value=0, max_value=2_000_000_000_000),
)


@st.composite
def masked_millis(draw):
    return {
        "message_id": draw(_text),
        "sent_at": draw(st.integers(min_value=0, max_value=avro_fast.TS_MAX)),
        "user_id": draw(_text),
        "device_type": draw(_text),
        "locale": draw(st.none() | _text),
        "app_version_raw": draw(_text),
        "app_version": draw(st.none() | st.integers(-(2**31), 2**31 - 1)),
        "masked_ip": draw(_text),
        "masked_device_id": draw(_text),
        "ip_ciphertext": draw(_text),
        "device_id_ciphertext": draw(_text),
        "ip_is_valid": draw(st.booleans()),
        "ip_sealed": draw(st.none() | st.binary(max_size=100)),
        "device_id_sealed": draw(st.none() | st.binary(max_size=100)),
    }


@hsettings(max_examples=150, deadline=None)
@given(masked_millis())
def test_fast_encoder_writes_fastavros_bytes(datum):
    codec = Codecs().masked
    assert codec.encode(datum) == codec._encode(datum)
    assert codec.decode(codec.encode(datum)) == codec._decode(codec._encode(datum))
    assert codec.decode_millis(codec.encode(datum)) == datum


@hsettings(max_examples=150, deadline=None)
@given(st.text(), _ts, st.text(max_size=2000), st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=4))
def test_fast_raw_round_trip_matches_fastavro(message_id, sent_at, body, attributes):
    codec = Codecs().raw
    datum = {"message_id": message_id, "sent_at": sent_at, "body": body, "attributes": attributes}
    try:
        reference = codec._encode(datum)
    except Exception:
        return
    assert codec.encode(datum) == reference
    _same_decoding(codec, reference)


def _same_decoding(codec, data):
    try:
        expected = codec._decode(data)
    except CodecError as exc:
        with pytest.raises(CodecError) as caught:
            codec.decode(data)
        assert str(caught.value) == str(exc)
        return
    assert codec.decode(data) == expected


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.integers(min_value=0, max_value=60))
def test_fast_decoders_agree_with_fastavro_on_corrupt_bytes(noise, cut):
    codecs = Codecs()
    for codec, datum in (
        (
            codecs.raw,
            {"message_id": "m-1", "sent_at": 1_700_000_000_000, "body": '{"a": "é"}', "attributes": {"k": "v"}},
        ),
        (codecs.masked, {**masked_v2(), "sent_at": 1_700_000_000_000}),
    ):
        good = codec.encode(datum)
        for data in (good[: HEADER + cut] + noise, good + noise, good[:HEADER] + noise, good[: len(good) - cut]):
            _same_decoding(codec, data)


HEADER = 10


def test_the_fast_timestamp_is_fastavros_datetime_at_and_near_its_bound():
    """``fromtimestamp(ms / 1000)`` below ``TS_FLOAT_MAX``, ``EPOCH + timedelta`` above: the same datetimes."""
    import random

    codec = Codecs().masked
    rng = random.Random(20)
    bound = avro_fast.TS_FLOAT_MAX
    edges = [0, 1, 999, 1000, 1001, bound - 1, bound, bound + 1, 1_767_225_600_123, -1, -1000]
    values = (
        edges
        + [rng.randrange(0, bound) for _ in range(20_000)]
        + [bound - rng.randrange(1, 10**6) for _ in range(2000)]
    )
    for sent_at in values:
        data = codec.encode({**masked_v2(), "sent_at": sent_at})
        decoded = codec._fast_decode(data)["sent_at"]  # the fast path itself, not its fallback
        assert decoded == avro_fast.EPOCH + dt.timedelta(milliseconds=sent_at), sent_at
        assert decoded == codec._decode(data)["sent_at"]
