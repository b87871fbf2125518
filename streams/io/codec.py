"""Avro single-object encoding (``C3 01`` + CRC-64-AVRO fingerprint + datum) with fastavro.

The fingerprint tells a reader which schema version wrote each record, so old records
stay readable without a registry: every ``schemas/<name>.v<N>.avsc`` is a known writer,
and the highest version is the reader schema they all resolve to.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import fastavro
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.types import Schema

from streams.io import avro_fast

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"  # package data (a symlink in a checkout)
MAGIC = b"\xc3\x01"
HEADER_LEN = 10


def fingerprint(schema: dict) -> bytes:
    """8-byte little-endian fingerprint of the schema's parsing canonical form."""
    canonical = to_parsing_canonical_form(fastavro.parse_schema(schema))
    return bytes.fromhex(fastavro_fingerprint(canonical, "CRC-64-AVRO"))


class CodecError(ValueError):
    """Bytes that are not a single-object record of a known schema version."""


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


@dataclass(frozen=True)
class _Writer:
    parsed: dict


class AvroCodec:
    """Encode with the latest version of a schema; decode any version of it."""

    # Set per instance when the schema compiles (plain functions in instance attributes).
    _fast_encode: Callable[[dict], bytes] | None = None
    _fast_decode: Callable[[bytes], dict] | None = None
    _fast_decode_millis: Callable[[bytes], dict] | None = None

    def __init__(self, name: str, schema_dir: Path = SCHEMA_DIR) -> None:
        versions = schema_versions(name, schema_dir)
        self.name = name
        self.version = max(versions)
        self.schema = fastavro.parse_schema(versions[self.version])
        self.header = MAGIC + fingerprint(versions[self.version])
        self._writers = {MAGIC + fingerprint(schema): fastavro.parse_schema(schema) for schema in versions.values()}
        # Generated fast paths for the latest version (flat records); fastavro stays the
        # reference: whatever a fast path refuses, fastavro does (see avro_fast).
        try:
            self._fast_encode = avro_fast.compile_encoder(versions[self.version], self.header)
            self._fast_decode = avro_fast.compile_decoder(versions[self.version], HEADER_LEN)
            self._fast_decode_millis = avro_fast.compile_decoder(versions[self.version], HEADER_LEN, ts_millis=True)
        except avro_fast.Unsupported:
            pass

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
        if data and self._fast_decode is not None and data[:HEADER_LEN] == self.header:
            try:
                return self._fast_decode(data)
            except Exception:
                pass  # fastavro decides: same datum, or its own error
        return self._decode(data)

    def decode_millis(self, data: bytes | None) -> dict:
        """``decode``, with timestamps as epoch milliseconds (what ``encode`` takes back as they are)."""
        if data and self._fast_decode_millis is not None and data[:HEADER_LEN] == self.header:
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
        header = bytes(data[:HEADER_LEN])
        reader: Schema | None = None
        if header == self.header:
            writer: Schema | None = self.schema
        else:
            writer = self._writers.get(header)
            if writer is None:
                if header[:2] != MAGIC:
                    raise CodecError(f"not Avro single-object encoded ({self.name})")
                raise CodecError(f"unknown writer schema fingerprint {header[2:].hex()} ({self.name})")
            reader = self.schema
        assert writer is not None
        try:
            datum = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer, reader)
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise CodecError(f"corrupt {self.name} datum: {type(exc).__name__}") from None
        if not isinstance(datum, dict):
            raise CodecError(f"corrupt {self.name} datum: not a record")
        return datum


def _millis(value: dt.datetime) -> int:
    """fastavro's own datetime -> timestamp-millis conversion (an aware datetime)."""
    delta = value - avro_fast.EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + int(delta.microseconds / 1000)


RAW = "raw_envelope"
MASKED = "masked_login"
DEAD_LETTER = "dead_letter"


class Codecs:
    """The three codecs every stage uses, parsed once per process."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.raw = AvroCodec(RAW, schema_dir)
        self.masked = AvroCodec(MASKED, schema_dir)
        self.dead_letter = AvroCodec(DEAD_LETTER, schema_dir)
