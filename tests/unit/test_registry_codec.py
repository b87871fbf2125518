"""The Confluent wire format and the schema-id cache, as pure logic (the real registry: tests/integration/test_registry.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest

from streams.errors import ConfigError, TransientError
from streams.io.codec import (
    MAGIC,
    AvroCodec,
    Codecs,
    UnknownSchemaError,
    confluent_header,
    fingerprint,
    schema_text,
    schema_versions,
)
from streams.io.registry import NotFound
from streams.pipeline.mask import MaskTransform
from streams.privacy.keys import generate_document, parse_keyring
from streams.privacy.masking import Masker
from streams.settings import load_settings

SENT = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)


class Registry:
    """A registry's answers in a dict: ids by schema text, texts by id; counts the calls."""

    url = "http://registry.test/apis/ccompat/v7"

    def __init__(self, subjects: dict[str, list[str]], extra: dict[int, str] | None = None, down: int = 0) -> None:
        self.texts: dict[int, str] = dict(extra or {})
        self.ids: dict[tuple[str, str], int] = {}
        for subject, texts in subjects.items():
            for text in texts:
                schema_id = next((i for i, t in self.texts.items() if t == text), None)
                if schema_id is None:
                    schema_id = 100 + len(self.texts)
                    self.texts[schema_id] = text
                self.ids[(subject, text)] = schema_id
        self.fetches: list[int] = []
        self.down = down  # the next `down` fetches fail as if the registry did not answer

    def lookup(self, subject: str, text: str) -> int:
        if (subject, text) not in self.ids:
            raise NotFound("not registered")
        return self.ids[(subject, text)]

    def schema(self, schema_id: int) -> str:
        self.fetches.append(schema_id)
        if self.down:
            self.down -= 1
            raise TransientError("registry down")
        if schema_id not in self.texts:
            raise NotFound("no such id")
        return self.texts[schema_id]


def texts(name: str) -> list[str]:
    return [schema_text(s) for _, s in sorted(schema_versions(name).items())]


def registered(**extra) -> Registry:
    return Registry(
        {
            "t.raw-value": texts("raw_envelope"),
            "t.masked-value": texts("masked_login"),
            "t.dlq-value": texts("dead_letter"),
        },
        **extra,
    )


def codecs_with(registry: Registry) -> Codecs:
    return Codecs(
        registry=registry, topics={"raw_envelope": "t.raw", "masked_login": "t.masked", "dead_letter": "t.dlq"}
    )  # type: ignore[arg-type]


def envelope(i: int = 1) -> dict:
    return {"message_id": f"m{i}", "sent_at": SENT, "body": '{"user_id": "u"}', "attributes": {"a": "b"}}


def test_confluent_bytes_are_zero_the_big_endian_id_and_the_same_datum():
    registry = registered()
    codec = codecs_with(registry).raw
    plain = Codecs().raw
    data = codec.encode(envelope())
    schema_id = registry.ids[("t.raw-value", texts("raw_envelope")[-1])]
    assert data[:5] == b"\x00" + schema_id.to_bytes(4, "big") == confluent_header(schema_id)
    assert data[5:] == plain.encode(envelope())[10:]  # the Avro datum itself does not change
    assert codec._encode(envelope()) == data  # fast path == fastavro
    assert codec._fast_encode is not None and codec._fast_decode is not None  # compiled for the 5-byte header
    assert codec._fast_decode(data) == envelope()
    assert codec.decode(data) == codec._decode(data) == envelope()
    assert registry.fetches == []  # the ids came from the lookups at start, no fetch per record


def test_readers_take_both_formats_with_and_without_a_registry():
    registry = registered()
    confluent, plain = codecs_with(registry).masked, Codecs().masked
    datum = {
        "message_id": "m",
        "sent_at": SENT,
        "user_id": "u",
        "device_type": "ios",
        "locale": None,
        "app_version_raw": "2.3.0",
        "app_version": 2003000,
        "masked_ip": "h1.x",
        "masked_device_id": "h1.y",
        "ip_ciphertext": "k1.a",
        "device_id_ciphertext": "k1.b",
        "ip_is_valid": True,
        "ip_sealed": None,
        "device_id_sealed": None,
    }
    old = plain.encode(datum)
    new = confluent.encode(datum)
    assert old[:2] == MAGIC and new[:1] == b"\x00"
    assert confluent.decode(old) == confluent.decode(new) == plain.decode(old) == datum
    assert confluent.decode_millis(old) == confluent.decode_millis(new)


def test_an_older_registered_version_decodes_to_the_current_reader():
    registry = registered()
    codec = codecs_with(registry).masked
    v1 = schema_versions("masked_login")[1]
    old = AvroCodec.__new__(AvroCodec)
    import fastavro

    old.schema = fastavro.parse_schema(v1)
    old.header = confluent_header(registry.ids[("t.masked-value", schema_text(v1))])
    datum = {
        k: v for k, v in codecs_with(registry).masked.decode(codec.encode(_masked())).items() if k != "ip_is_valid"
    }
    assert codec.decode(AvroCodec.encode(old, datum)) == {**datum, "ip_is_valid": True}
    assert registry.fetches == []


def _masked() -> dict:
    return {
        "message_id": "m",
        "sent_at": SENT,
        "user_id": "u",
        "device_type": "ios",
        "locale": "en",
        "app_version_raw": "1",
        "app_version": 1000000,
        "masked_ip": "h1.x",
        "masked_device_id": "h1.y",
        "ip_ciphertext": "k1.a",
        "device_id_ciphertext": "k1.b",
        "ip_is_valid": True,
    }


def test_a_new_id_is_fetched_once_per_process_not_per_record():
    # A newer writer (an added optional field) registered by someone else's deploy.
    newer = json.loads(texts("raw_envelope")[-1])
    newer["fields"].append({"name": "region", "type": ["null", "string"], "default": None})
    registry = registered(extra={7: json.dumps(newer)})
    codec = codecs_with(registry).raw
    import fastavro

    writer = AvroCodec.__new__(AvroCodec)
    writer.schema, writer.header = fastavro.parse_schema(newer), confluent_header(7)
    records = [AvroCodec.encode(writer, {**envelope(i), "region": "eu"}) for i in range(50)]

    assert codec.unresolved(records) == {confluent_header(7)}
    asyncio.run(codec.resolve(records))
    asyncio.run(codec.resolve(records))
    assert registry.fetches == [7]
    assert codec.unresolved(records) == set()
    assert [codec.decode(r) for r in records] == [envelope(i) for i in range(50)]  # the field unknown to us is skipped
    assert registry.fetches == [7]


def test_a_registry_that_does_not_answer_is_retried_until_it_does():
    registry = registered(down=2)
    codec = codecs_with(registry).raw
    record = confluent_header(5) + Codecs().raw.encode(envelope())[10:]
    registry.texts[5] = texts("raw_envelope")[-1]
    asyncio.run(codec.resolve([record], max_backoff=0.2))
    assert registry.fetches == [5, 5, 5]
    assert codec.decode(record) == envelope()


def test_an_id_the_registry_does_not_have_is_unknown_schema_and_asked_only_once():
    registry = registered()
    codec = codecs_with(registry).raw
    record = confluent_header(999_999) + Codecs().raw.encode(envelope())[10:]
    asyncio.run(codec.resolve([record, record]))
    assert codec.unresolved([record]) == set()
    with pytest.raises(UnknownSchemaError, match="schema id 999999 is not in the schema registry"):
        codec.decode(record)
    with pytest.raises(UnknownSchemaError):
        codec.decode(record)
    assert registry.fetches == [999_999]


def test_without_a_registry_a_confluent_record_is_unknown_schema():
    record = confluent_header(3) + Codecs().raw.encode(envelope())[10:]
    with pytest.raises(UnknownSchemaError, match="STREAMS_SCHEMA_REGISTRY_URL"):
        Codecs().raw.decode(record)


def test_the_mask_stage_dead_letters_an_unknown_id_as_unknown_schema():
    registry = registered()
    codecs = codecs_with(registry)
    keyring = parse_keyring(json.dumps(generate_document()), "test")
    transform = MaskTransform(Masker(keyring), codecs)
    record = confluent_header(424_242) + Codecs().raw.encode(envelope())[10:]
    asyncio.run(codecs.raw.resolve([record]))
    out = transform(b"m1", record, "t.raw/0/0")
    assert out.reason == "unknown_schema"
    dead = codecs.dead_letter.decode(out.value)
    assert dead["payload"] == record and "424242" in dead["detail"]
    assert out.value[:1] == b"\x00"  # the dead letter itself is in the Confluent format


def test_a_worker_refuses_to_start_when_its_schema_is_not_registered():
    registry = Registry({"t.raw-value": texts("raw_envelope")[:-1] or ["-"]})
    with pytest.raises(ConfigError, match="streams topics apply") as err:
        AvroCodec("raw_envelope", registry=registry, subject="t.raw-value")  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_the_single_object_format_is_unchanged_without_a_registry():
    data = Codecs().raw.encode(envelope())
    assert data[:10] == MAGIC + fingerprint(schema_versions("raw_envelope")[1])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"schema_registry_username": "u"}, "STREAMS_SCHEMA_REGISTRY_USERNAME is set but STREAMS_SCHEMA_REGISTRY_URL"),
        ({"schema_registry_url": "ftp://x"}, "use an http:// or https://"),
        (
            {"schema_registry_url": "https://x", "schema_registry_username": "u"},
            "set both STREAMS_SCHEMA_REGISTRY_USERNAME",
        ),
        (
            {"schema_registry_url": "https://x", "schema_registry_password": "p"},
            "set both STREAMS_SCHEMA_REGISTRY_USERNAME",
        ),
        ({"schema_registry_url": "https://x", "schema_registry_cert_file": "/etc/hostname"}, "set both"),
        ({"schema_registry_url": "http://x", "schema_registry_ca_file": "/etc/hostname"}, "needs an https://"),
        ({"schema_registry_url": "https://x", "schema_registry_ca_file": "/nonexistent.pem"}, "no such file"),
    ],
)
def test_bad_registry_settings_are_one_line(env, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_settings(**env)
    assert "\n" not in str(err.value)


def test_registry_settings_that_fit_together_load():
    s = load_settings(
        schema_registry_url="https://x/apis/ccompat/v7", schema_registry_username="u", schema_registry_password="p"
    )
    assert s.schema_registry_password is not None and "p" not in repr(s.schema_registry_password)
    assert load_settings(schema_registry_url="").schema_registry_url is None
