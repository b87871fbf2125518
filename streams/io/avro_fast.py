"""Fast paths for flat Avro records: encoders and decoders generated from the schema.

fastavro's ``schemaless_writer`` / ``schemaless_reader`` cost several microseconds per
call before they touch a byte (stream objects, schema lookups, logical-type dispatch);
for our small flat records that overhead is most of the work. This module compiles a
record schema made of ``string``, ``bytes``, ``int``, ``long``, ``boolean``,
``timestamp-millis``, ``["null", X]`` and ``map<string>`` fields into one straight-line
Python function per direction.

They are *fast paths*, never the reference: each refuses (raises) on anything it does
not handle exactly as fastavro does (another type, an out-of-range number, a datetime
to encode, a negative block count, trailing bytes, invalid UTF-8, ...), and the caller
(``codec.AvroCodec``) then runs fastavro on the same input, so results and errors are
fastavro's byte for byte. ``tests/unit/test_codec.py`` compares both on random data.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Millisecond timestamps that fastavro turns into a datetime (years 1 to 9999); outside
# it raises, so the fast path leaves them to fastavro.
TS_MIN, TS_MAX = -62135596800000, 253402300799999
# Below this (2039-09-07), ``v / 1000`` as a double is within 0.25 µs of the exact time, so
# ``fromtimestamp`` (rounding to the microsecond) gives fastavro's datetime at a quarter
# of the cost of ``EPOCH + timedelta``; ``tests/unit/test_codec.py`` compares the two.
TS_FLOAT_MAX = 2**41
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
_TABLE = 4096  # precomputed encodings of the non-negative longs below this (string lengths)


class Unsupported(ValueError):
    """The schema has a shape the fast path does not compile (fastavro alone is used)."""


def encode_long(n: int) -> bytes:
    """Zig-zag varint of a long."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


LENGTHS = tuple(encode_long(n) for n in range(_TABLE))


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint at ``pos``: (value, next position); at most 10 bytes, like a long."""
    n = shift = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _kind(avro_type: Any) -> str:
    if isinstance(avro_type, str) and avro_type in ("string", "bytes", "int", "long", "boolean"):
        return avro_type
    if isinstance(avro_type, dict):
        if avro_type.get("type") == "long" and avro_type.get("logicalType") == "timestamp-millis":
            return "ts"
        if avro_type.get("type") == "map" and avro_type.get("values") == "string":
            return "map"
        if "logicalType" not in avro_type and avro_type.get("type") in ("string", "bytes", "int", "long", "boolean"):
            return avro_type["type"]
    raise Unsupported(f"field type {avro_type!r}")


def _field_kinds(schema: dict) -> list[tuple[str, str, bool]]:
    """``(name, kind, nullable)`` per field of a flat record schema."""
    if schema.get("type") != "record":
        raise Unsupported("not a record")
    fields = []
    for f in schema["fields"]:
        t = f["type"]
        if isinstance(t, list):
            if len(t) != 2 or t[0] != "null":
                raise Unsupported(f"union {t!r}")
            fields.append((f["name"], _kind(t[1]), True))
        else:
            fields.append((f["name"], _kind(t), False))
    return fields


def _encode_value(kind: str, v: str, ind: str) -> list[str]:
    if kind in ("string", "bytes"):
        cls, conv = ("str", f"{v}.encode()") if kind == "string" else ("bytes", v)
        return [
            f"{ind}if {v}.__class__ is not {cls}: raise TypeError",
            f"{ind}b = {conv}",
            f"{ind}n = len(b)",
            f"{ind}out(L[n] if n < {_TABLE} else enc(n))",
            f"{ind}out(b)",
        ]
    if kind in ("int", "long", "ts"):
        lo, hi = {"int": ("INT_MIN", "INT_MAX"), "long": ("LONG_MIN", "LONG_MAX"), "ts": ("LONG_MIN", "LONG_MAX")}[kind]
        return [  # a datetime for a timestamp is left to fastavro
            f"{ind}if {v}.__class__ is not int or not {lo} <= {v} <= {hi}: raise TypeError",
            f"{ind}out(enc({v}))",
        ]
    if kind == "boolean":
        return [
            f"{ind}if {v} is True: out(b'\\x01')",
            f"{ind}elif {v} is False: out(b'\\x00')",
            f"{ind}else: raise TypeError",
        ]
    if kind == "map":
        return [
            f"{ind}if {v}.__class__ is not dict: raise TypeError",
            f"{ind}if {v}:",
            f"{ind}    out(enc(len({v})))",
            f"{ind}    for k, x in {v}.items():",
            *_encode_value("string", "k", ind + "        "),
            *_encode_value("string", "x", ind + "        "),
            f"{ind}out(b'\\x00')",
        ]
    raise Unsupported(kind)


def compile_encoder(schema: dict, header: bytes) -> Callable[[dict], bytes]:
    """``header`` + the datum's Avro binary encoding; raises on anything it does not handle."""
    lines = ["def encode(d):", "    parts = [HEADER]", "    out = parts.append"]
    for i, (name, kind, nullable) in enumerate(_field_kinds(schema)):
        v = f"v{i}"
        lines.append(f"    {v} = d[{name!r}]")
        if nullable:
            lines += [f"    if {v} is None: out(b'\\x00')", "    else:", "        out(b'\\x02')"]
            lines += _encode_value(kind, v, "        ")
        else:
            lines += _encode_value(kind, v, "    ")
    lines.append("    return b''.join(parts)")
    namespace: dict[str, Any] = {
        "HEADER": header,
        "L": LENGTHS,
        "enc": encode_long,
        "INT_MIN": INT_MIN,
        "INT_MAX": INT_MAX,
        "LONG_MIN": LONG_MIN,
        "LONG_MAX": LONG_MAX,
    }
    exec(compile("\n".join(lines), f"<avro encoder {schema.get('name')}>", "exec"), namespace)
    return namespace["encode"]


def _read_varint(v: str, ind: str) -> list[str]:
    """Read one long into ``v`` (one byte inline, longer ones by ``read_long``)."""
    return [
        f"{ind}{v} = data[pos]",
        f"{ind}if {v} < 0x80: pos += 1; {v} = ({v} >> 1) ^ -({v} & 1)",
        f"{ind}else: {v}, pos = read_long(data, pos)",
    ]


def _decode_value(kind: str, v: str, ind: str, ts_millis: bool) -> list[str]:
    if kind in ("string", "bytes"):
        take = "data[pos:end].decode()" if kind == "string" else "data[pos:end]"  # strict UTF-8
        return [
            *_read_varint("n", ind),
            f"{ind}end = pos + n",
            f"{ind}if n < 0 or end > size: raise ValueError",
            f"{ind}{v} = {take}",
            f"{ind}pos = end",
        ]
    if kind in ("int", "long"):
        lines = _read_varint(v, ind)
        if kind == "int":
            lines.append(f"{ind}if not INT_MIN <= {v} <= INT_MAX: raise ValueError")
        return lines
    if kind == "ts":
        lines = [*_read_varint(v, ind), f"{ind}if not TS_MIN <= {v} <= TS_MAX: raise ValueError"]
        if not ts_millis:
            lines += [
                f"{ind}if 0 <= {v} < TS_FLOAT_MAX: {v} = fromtimestamp({v} / 1000, UTC)",
                f"{ind}else: {v} = EPOCH + timedelta(microseconds={v} * 1000)",
            ]
        return lines
    if kind == "boolean":
        return [
            f"{ind}{v} = data[pos]",
            f"{ind}pos += 1",
            f"{ind}if {v} == 1: {v} = True",
            f"{ind}elif {v} == 0: {v} = False",
            f"{ind}else: raise ValueError",
        ]
    if kind == "map":
        return [
            f"{ind}{v} = {{}}",
            f"{ind}while True:",
            *_read_varint("count", ind + "    "),
            f"{ind}    if count == 0: break",
            f"{ind}    if count < 0: raise ValueError",  # blocks with a byte size: fastavro's job
            f"{ind}    for _ in range(count):",
            *_decode_value("string", "k", ind + "        ", ts_millis),
            *_decode_value("string", "x", ind + "        ", ts_millis),
            f"{ind}        {v}[k] = x",
        ]
    raise Unsupported(kind)


def compile_decoder(schema: dict, offset: int, ts_millis: bool = False) -> Callable[[bytes], dict]:
    """The datum written with ``schema`` from ``offset`` to the very end of ``data``.

    With ``ts_millis`` timestamps stay epoch milliseconds (ints) instead of datetimes.
    Raises on anything it does not handle exactly as fastavro.
    """
    fields = _field_kinds(schema)
    lines = ["def decode(data):", "    size = len(data)", f"    pos = {offset}"]
    for i, (_, kind, nullable) in enumerate(fields):
        v = f"v{i}"
        if nullable:
            lines += [
                *_read_varint("branch", "    "),
                f"    if branch == 0: {v} = None",
                "    elif branch == 1:",
                *_decode_value(kind, v, "        ", ts_millis),
                "    else: raise ValueError",
            ]
        else:
            lines += _decode_value(kind, v, "    ", ts_millis)
    lines.append("    if pos != size: raise ValueError")  # fastavro ignores trailing bytes: let it decide
    lines.append("    return {" + ", ".join(f"{name!r}: v{i}" for i, (name, _, _) in enumerate(fields)) + "}")
    namespace: dict[str, Any] = {
        "read_long": read_long,
        "EPOCH": EPOCH,
        "UTC": dt.UTC,
        "fromtimestamp": dt.datetime.fromtimestamp,
        "TS_FLOAT_MAX": TS_FLOAT_MAX,
        "timedelta": dt.timedelta,
        "TS_MIN": TS_MIN,
        "TS_MAX": TS_MAX,
        "INT_MIN": INT_MIN,
        "INT_MAX": INT_MAX,
    }
    exec(compile("\n".join(lines), f"<avro decoder {schema.get('name')}>", "exec"), namespace)
    return namespace["decode"]
