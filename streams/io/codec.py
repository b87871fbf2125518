"""Avro records on the topics, in one of two wire formats, with fastavro.

- **Confluent wire format** (with ``STREAMS_SCHEMA_REGISTRY_URL``): ``0x00``, the schema id
  (4 bytes, big-endian) from the registry, the datum. What Kafka Connect, ksqlDB, Flink,
  Spark and ClickHouse read. The ids are looked up once at start and cached; an id a
  reader has not seen is fetched from the registry once (``AvroCodec.resolve``, before a
  batch is decoded), never per record.
- **Avro single-object encoding** (no registry): ``C3 01``, the CRC-64-AVRO fingerprint of
  the writer schema (8 bytes, little-endian), the datum. Every ``schemas/<name>.v<N>.avsc``
  is a known writer, so old records stay readable without a registry.

Writers use one format; readers take both, so a replay across the switch works. The
highest schema version is the reader schema every writer version resolves to.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import fastavro
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.types import Schema

from streams.errors import ConfigError, TransientError
from streams.io import avro_fast

if TYPE_CHECKING:
    from streams.io.registry import SchemaRegistry
    from streams.settings import Settings

log = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"  # package data (a symlink in a checkout)
MAGIC = b"\xc3\x01"
HEADER_LEN = 10
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_LEN = 5


def fingerprint(schema: dict) -> bytes:
    """8-byte little-endian fingerprint of the schema's parsing canonical form."""
    canonical = to_parsing_canonical_form(fastavro.parse_schema(schema))
    return bytes.fromhex(fastavro_fingerprint(canonical, "CRC-64-AVRO"))


def confluent_header(schema_id: int) -> bytes:
    """``0x00`` and the schema id, 4 bytes big-endian."""
    return CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")


class CodecError(ValueError):
    """Bytes that are not a record of a known schema version."""


class UnknownSchemaError(CodecError):
    """A Confluent-format record whose schema id the registry does not have (it answered 404)."""


def schema_versions(name: str, schema_dir: Path = SCHEMA_DIR) -> dict[int, dict]:
    """All versions of one schema, by version number."""
    pattern = re.compile(rf"^{re.escape(name)}\.v(\d+)\.avsc$")
    versions = {}
    for path in schema_dir.glob(f"{name}.v*.avsc"):
        match = pattern.match(path.name)
        if match:
            versions[int(match.group(1))] = json.loads(path.read_text())
    if not versions:
        raise FileNotFoundError(f"no schema {name}.v*.avsc in {schema_dir}")
    return versions


def schema_text(schema: dict) -> str:
    """The text a version is registered and looked up with (compact JSON of the .avsc file)."""
    return json.dumps(schema, separators=(",", ":"))


class AvroCodec:
    """Encode with the latest version of a schema; decode any version of it, in either format.

    With a ``registry`` and ``subject``, the ids of the local versions are looked up at
    construction (the latest must be registered: ``streams topics apply`` does it) and
    records are written in the Confluent format.
    """

    # Set per instance when the schema compiles (plain functions in instance attributes).
    _fast_encode: Callable[[dict], bytes] | None = None
    _fast_decode: Callable[[bytes], dict] | None = None
    _fast_decode_millis: Callable[[bytes], dict] | None = None

    def __init__(
        self,
        name: str,
        schema_dir: Path = SCHEMA_DIR,
        registry: SchemaRegistry | None = None,
        subject: str | None = None,
    ) -> None:
        versions = schema_versions(name, schema_dir)
        self.name = name
        self.version = max(versions)
        self.schema = fastavro.parse_schema(versions[self.version])
        self.registry = registry
        self.subject = subject
        parsed = {v: self.schema if v == self.version else fastavro.parse_schema(s) for v, s in versions.items()}
        self._writers = {MAGIC + fingerprint(schema): parsed[v] for v, schema in versions.items()}
        # Confluent headers (0x00 + id) -> writer schema; ids the registry does not have.
        self._by_id: dict[bytes, Schema] = {}
        self._missing: set[bytes] = set()
        if registry is None:
            self.header = MAGIC + fingerprint(versions[self.version])
        else:
            assert subject is not None, "a registry needs the subject"
            for v, schema_id in self._lookup_ids(registry, subject, versions).items():
                self._by_id[confluent_header(schema_id)] = parsed[v]
            self.header = next(h for h, w in self._by_id.items() if w is self.schema)
        # Generated fast paths for the latest version (flat records); fastavro stays the
        # reference: whatever a fast path refuses, fastavro does (see avro_fast).
        try:
            self._fast_encode = avro_fast.compile_encoder(versions[self.version], self.header)
            self._fast_decode = avro_fast.compile_decoder(versions[self.version], len(self.header))
            self._fast_decode_millis = avro_fast.compile_decoder(
                versions[self.version], len(self.header), ts_millis=True
            )
        except avro_fast.Unsupported:
            pass

    def _lookup_ids(self, registry: SchemaRegistry, subject: str, versions: dict[int, dict]) -> dict[int, int]:
        """The registry's id of each local version (looked up, never registered: the deploy step does that)."""
        from streams.io.registry import NotFound

        ids = {}
        for v in sorted(versions, reverse=True):
            try:
                ids[v] = registry.lookup(subject, schema_text(versions[v]))
            except NotFound:
                if v == self.version:
                    raise ConfigError(
                        f"schema {self.name} v{v} is not registered under subject {subject} in the schema registry "
                        f"at {registry.url}: run `streams topics apply` (the deploy step registers schemas)"
                    ) from None
        return ids

    def encode(self, datum: dict) -> bytes:
        if self._fast_encode is not None:
            try:
                return self._fast_encode(datum)
            except Exception:
                pass  # fastavro decides: same bytes, or its own error
        return self._encode(datum)

    def _encode(self, datum: dict) -> bytes:
        buf = io.BytesIO()
        buf.write(self.header)
        fastavro.schemaless_writer(buf, self.schema, datum)
        return buf.getvalue()

    def decode(self, data: bytes | None) -> dict:
        if data and self._fast_decode is not None and data[: len(self.header)] == self.header:
            try:
                return self._fast_decode(data)
            except Exception:
                pass  # fastavro decides: same datum, or its own error
        return self._decode(data)

    def decode_millis(self, data: bytes | None) -> dict:
        """``decode``, with timestamps as epoch milliseconds (what ``encode`` takes back as they are)."""
        if data and self._fast_decode_millis is not None and data[: len(self.header)] == self.header:
            try:
                return self._fast_decode_millis(data)
            except Exception:
                pass
        datum = self._decode(data)
        for name in self._timestamps:
            value = datum.get(name)
            if isinstance(value, dt.datetime):
                datum[name] = _millis(value)
        return datum

    @functools.cached_property
    def _timestamps(self) -> list[str]:
        fields: list[dict] = cast(dict, self.schema)["fields"]
        return [
            f["name"]
            for f in fields
            if isinstance(f["type"], dict) and f["type"].get("logicalType") == "timestamp-millis"
        ]

    def _decode(self, data: bytes | None) -> dict:
        if not data:  # a tombstone (null value) or an empty record: no datum at all
            raise CodecError(f"empty record: no value ({self.name})")
        if data[:1] == CONFLUENT_MAGIC:
            offset = CONFLUENT_HEADER_LEN
            header = bytes(data[:offset])
            writer = self._by_id.get(header)
            if writer is None:
                writer = self._fetch(header)
        else:
            offset = HEADER_LEN
            header = bytes(data[:offset])
            writer = self._writers.get(header)
            if writer is None:
                if header[:2] != MAGIC:
                    raise CodecError(f"not Avro single-object encoded ({self.name})")  # nor Confluent (0x00)
                raise CodecError(f"unknown writer schema fingerprint {header[2:].hex()} ({self.name})")
        reader = None if writer is self.schema else self.schema
        try:
            datum = fastavro.schemaless_reader(io.BytesIO(data[offset:]), writer, reader)
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise CodecError(f"corrupt {self.name} datum: {type(exc).__name__}") from None
        if not isinstance(datum, dict):
            raise CodecError(f"corrupt {self.name} datum: not a record")
        return datum

    # --- schema ids not cached yet -----------------------------------------------------
    def unresolved(self, values: Iterable[bytes | None]) -> set[bytes]:
        """Confluent headers in ``values`` whose schema is not cached (empty almost always).

        One set of 5-byte prefixes per batch (a batch shares one or two): cheap next to decoding.
        """
        heads = {v[:CONFLUENT_HEADER_LEN] for v in values if v}
        heads.difference_update(self._by_id)
        heads.difference_update(self._missing)
        return {bytes(h) for h in heads if h[:1] == CONFLUENT_MAGIC}

    async def resolve(self, values: Iterable[bytes | None], max_backoff: float = 10.0) -> None:
        """Fetch the schemas of ids a batch uses that are not cached, before it is decoded.

        Once per id and process. A registry that does not answer is retried with backoff
        (the batch waits, nothing is acked); an id it does not have is remembered, and
        ``decode`` then raises ``UnknownSchemaError`` (a dead letter, ``unknown_schema``).
        """
        from streams.retry import retry_forever

        for header in self.unresolved(values):
            schema_id = int.from_bytes(header[1:], "big")
            await retry_forever(
                functools.partial(asyncio.to_thread, self._learn, header),
                f"fetch schema id {schema_id} from the schema registry",
                log,
                max_backoff,
                retry_on=(TransientError,),
                label="schema registry",
            )

    def _fetch(self, header: bytes) -> Schema:
        """``decode``'s fallback for an id nobody resolved (operator commands): one blocking fetch."""
        if header not in self._missing:
            self._learn(header)
        writer = self._by_id.get(header)
        if writer is None:
            schema_id = int.from_bytes(header[1:], "big")
            if self.registry is None:
                raise UnknownSchemaError(
                    f"schema id {schema_id} in the Confluent wire format, but no schema registry is set "
                    f"(STREAMS_SCHEMA_REGISTRY_URL) ({self.name})"
                )
            raise UnknownSchemaError(f"schema id {schema_id} is not in the schema registry ({self.name})")
        return writer

    def _learn(self, header: bytes) -> None:
        """Fetch one id's schema into the cache, or remember that the registry has no such id."""
        from streams.io.registry import NotFound

        if self.registry is None:
            self._missing.add(header)
            return
        try:
            text = self.registry.schema(int.from_bytes(header[1:], "big"))
        except NotFound:
            self._missing.add(header)
            return
        try:
            writer = fastavro.parse_schema(json.loads(text))
        except Exception:  # not Avro (another schema type under that id): no record of ours
            self._missing.add(header)
            return
        self._by_id[header] = writer


def _millis(value: dt.datetime) -> int:
    """fastavro's own datetime -> timestamp-millis conversion (an aware datetime)."""
    delta = value - avro_fast.EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + int(delta.microseconds / 1000)


RAW = "raw_envelope"
MASKED = "masked_login"
DEAD_LETTER = "dead_letter"


class Codecs:
    """The three codecs every stage uses, built once per process.

    ``Codecs()`` writes single-object encoding; ``Codecs.from_settings`` is the one place
    the stages build them from the settings (the Confluent format with a registry).
    """

    def __init__(
        self,
        schema_dir: Path = SCHEMA_DIR,
        registry: SchemaRegistry | None = None,
        topics: dict[str, str] | None = None,
    ) -> None:
        topics = topics or {}

        def codec(name: str) -> AvroCodec:
            topic = topics.get(name)
            return AvroCodec(name, schema_dir, registry, f"{topic}-value" if registry and topic else None)

        self.registry = registry
        self.raw = codec(RAW)
        self.masked = codec(MASKED)
        self.dead_letter = codec(DEAD_LETTER)

    @classmethod
    def from_settings(cls, settings: Settings, schema_dir: Path = SCHEMA_DIR) -> Codecs:
        """Codecs for these settings; with a registry, its ids looked up now (a registry that
        does not answer is waited out up to ``STREAMS_STARTUP_TIMEOUT``)."""
        if not settings.schema_registry_url:
            return cls(schema_dir)
        from streams.io.registry import SchemaRegistry
        from streams.retry import wait_at_start

        registry = SchemaRegistry(settings)

        def build() -> Codecs:
            registry.check()
            return cls(schema_dir, registry, topic_of_schema(settings))

        return wait_at_start(
            build,
            "schema registry",
            log,
            settings.startup_timeout,
        )


def topic_of_schema(settings: Settings) -> dict[str, str]:
    """Which topic carries which schema (its values)."""
    return {RAW: settings.raw_topic, MASKED: settings.masked_topic, DEAD_LETTER: settings.dlq_topic}
