"""The compiled mask core: masking a whole batch in one call, or the Python reference.

``streams_core`` (core/ in the repository, Rust, built from source by ``make install``
and the image's builder stage) holds primitives only: HMAC-SHA256 tokens and AES-SIV
sealing with key schedules set once, and a parser of the common raw record shape
(``parse_logins``: envelope, flat JSON body, the mask stage's validation; it declines
everything else, which the reference reads) and an encoder of flat Avro records
(``RecordEncoder``: the masked records of a batch, its fields placed by the reference's
own datum function). How a token and a ciphertext are
composed (keys, MAC prefix, associated data, text format) is written here, beside the
reference it must equal (``masking.Masker``), and checked against it when loaded: a
core that does not give the reference's bytes is not used.

Per-user key mode (``SealingCore``, issue 19) uses the same primitives: tokens under the
KMS-made join keys, each value sealed under its user's data key (one ``Siv`` per batch
holding the batch's data keys, a key index per record), composed as
``UserMasker.mask_login`` composes them and checked against it when loaded; and the new
data keys of a batch wrapped under the lifetime key in one call (``KeyWrapping``,
checked against ``Lifetime``'s reference when loaded).

Without the extension (or with one that disagrees), the mask stage runs the Python
reference, says so once at start (a log line, the ``streams_mask_core`` gauge at 0) and
works as before. ``STREAMS_REQUIRE_CORE=1`` (CI, ``make bench``) makes that an error
instead, so a comparison of core and reference can never be one of the reference with
itself.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple, cast

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streams import metrics
from streams.errors import ConfigError
from streams.io import avro_fast
from streams.io.codec import AvroCodec
from streams.privacy.masking import (
    _AD_LABEL,
    _FORMAT_BYTE,
    BOUND,
    DEVICE_ID_SIZES,
    IP_SIZE,
    PAD_BLOCK,
    Masker,
    UserMasker,
    _bound_ad,
    mac_prefix,
)

log = logging.getLogger(__name__)

REQUIRE_ENV = "STREAMS_REQUIRE_CORE"
# Values the self-check masks with both: ASCII, IPv6, non-ASCII, a value over one pad block.
_PROBES = ("10.0.0.1", "2001:db8::1", "ÿ-devíce-✓", "é" * 150)
_announced: set[bool] = set()  # log the core's state once per process, not per transform


class CoreMismatch(RuntimeError):
    """The compiled core's output differs from the reference's (a scheme it does not follow)."""


class _CoreParser:
    """The core's parse of a batch of raw records (both modes read records alike)."""

    def __init__(self, module: ModuleType, raw_headers: list[bytes] | None) -> None:
        self._parse = module.parse_logins
        self._raw_headers = raw_headers or []

    def parse(self, values: list[bytes | None]) -> list[tuple | None]:
        """``MaskTransform``'s fields of each raw record (the tuple ``mask._fields`` makes),
        ``None`` where the core declines (not the common shape, or no known raw header)."""
        if not self._raw_headers:
            return [None] * len(values)
        return self._parse(values, self._raw_headers)


class CoreMasker(_CoreParser):
    """Tokens and ciphertexts of a batch of canonical values, as ``Masker.mask`` makes them,
    and the parse of a batch of raw records.

    ``parse`` and ``mask`` return ``None`` in place of a record or value the core declines;
    the caller reads or masks that one with the reference.
    """

    def __init__(self, masker: Masker, module: ModuleType, raw_headers: list[bytes] | None = None) -> None:
        super().__init__(module, raw_headers)
        keyring = masker.keyring
        version, key_id = keyring.join_version, keyring.encryption_key_id
        self._siv = module.Siv([keyring.encryption_keys[key_id]])
        self._ciphertext_head = f"{key_id}.{BOUND}."
        self._token_head = f"{version}."
        # Per field: the MAC (key and domain prefix absorbed once) and the associated data
        # every ciphertext shares; the token is the last associated-data item.
        self._fields = {
            field: (module.Mac(key, mac_prefix(keyring, field, version)), _bound_ad(field, key_id, "")[:-1])
            for field, key in keyring.active_join_keys().items()
        }
        self._check(masker)

    def mask(self, field: str, canonicals: list[str]) -> tuple[list[str | None], list[str | None]]:
        """``(tokens, ciphertexts)`` of each value, ``None`` where the core declined it."""
        mac, shared_ad = self._fields[field]
        tokens = mac.tokens(self._token_head, canonicals)
        return tokens, self._siv.seal(0, canonicals, PAD_BLOCK, shared_ad, tokens, self._ciphertext_head)

    def _check(self, masker: Masker) -> None:
        for field in self._fields:
            tokens, ciphertexts = self.mask(field, list(_PROBES))
            for probe, token, ciphertext in zip(_PROBES, tokens, ciphertexts, strict=True):
                expected = masker._mask(field, probe)
                if (token, ciphertext) != (expected.token, expected.ciphertext):
                    raise CoreMismatch(f"field {field}: the compiled core's bytes differ from the reference's")


class _ProbeLifetime:
    """One fixed data key for every user: what the load-time check seals under."""

    def __init__(self, key_id: bytes, key: bytes) -> None:
        self.key = (key_id, AESSIV(key))

    def data_key(self, user_id: str) -> tuple[bytes, AESSIV]:
        return self.key


# masking.field_size as ascending sizes: an IP fits IP_SIZE or falls into the larger device id sizes.
_PAD_SIZES = {"ip": [IP_SIZE, *(s for s in DEVICE_ID_SIZES if s > IP_SIZE)], "device_id": list(DEVICE_ID_SIZES)}
_SEAL_PROBES = (*_PROBES, "z" * 46, "z" * 47, "y" * 150, "€" * 68)  # each of pad_field's sizes and its edges
_PROBE_USERS = ("u-1", "ü-✓-user", "x" * 128)


class SealingCore(_CoreParser):
    """Per-user key mode: join tokens and per-user sealed values of a batch, as
    ``UserMasker.mask_login`` makes them, and the parse of a batch of raw records.

    ``seal`` returns ``None`` in place of a record the core declines; the caller masks
    that one with the reference.
    """

    def __init__(self, masker: UserMasker, module: ModuleType, raw_headers: list[bytes] | None = None) -> None:
        super().__init__(module, raw_headers)
        version = masker.version
        self._siv = module.Siv
        self._token_head = f"{version}."
        # Per field: the MAC (key and ``field NUL version NUL`` absorbed once), the start of the
        # one associated-data item (``label NUL field NUL``; then user, ``NUL key id NUL``,
        # token: composed in the core, ``ad_parts``) and the padded sizes (``pad_field``: the
        # smallest that holds the value).
        self._fields = {
            field: (
                module.Mac(key, f"{field}\0{version}\0".encode()),
                _AD_LABEL + b"\0" + field.encode() + b"\0",
                _PAD_SIZES.get(field, list(DEVICE_ID_SIZES)),
            )
            for field, key in masker.join_keys.items()
        }
        self._check(masker)

    def seal(
        self,
        keys: list[bytes],
        index: list[int],
        key_ids: list[bytes],
        users: list[str],
        ips: list[str],
        devices: list[str],
    ) -> list[tuple[str, bytes, str, bytes] | None]:
        """``(ip token, ip sealed, device token, device sealed)`` of each login, ``None`` where
        the core declined it. Login i is user ``users[i]``'s, sealed under ``keys[index[i]]``,
        whose id is ``key_ids[i]``."""
        siv = self._siv(keys)  # the batch's data keys, each key schedule set once
        distinct = set(key_ids)
        if len(distinct) == 1:  # one lifetime for the whole batch (all but its last batch)
            (key_id,) = distinct
            middle: bytes | list[bytes] = b"\0" + key_id + b"\0"
            heads = [_FORMAT_BYTE + key_id] * len(key_ids)  # what a stored sealed value starts with
        else:
            middle = [b"\0" + key_id + b"\0" for key_id in key_ids]
            heads = [_FORMAT_BYTE + key_id for key_id in key_ids]
        ip_tokens, ip_sealed = self._seal_field(siv, "ip", index, users, middle, heads, ips)
        device_tokens, device_sealed = self._seal_field(siv, "device_id", index, users, middle, heads, devices)
        logins = zip(ip_tokens, ip_sealed, device_tokens, device_sealed, strict=True)
        return cast(list[tuple[str, bytes, str, bytes] | None], [m if None not in m else None for m in logins])

    def _seal_field(
        self,
        siv: Any,
        field: str,
        index: list[int],
        users: list[str],
        middle: bytes | list[bytes],
        heads: list[bytes],
        canonicals: list[str],
    ) -> tuple[list[str | None], list[bytes | None]]:
        """Tokens and stored sealed values of one field; the core pads (``pad_field``'s sizes) and
        composes each associated-data item (a user id with no UTF-8 form, or a token the core
        declined, declines the value)."""
        mac, ad_head, sizes = self._fields[field]
        tokens = mac.tokens(self._token_head, canonicals)
        return tokens, siv.seal(index, canonicals, sizes, [], None, None, heads, [ad_head, users, middle, tokens])

    def _check(self, masker: UserMasker) -> None:
        key_id, key = b"probe-id", bytes(range(64))
        reference = UserMasker(masker.join_keys, masker.version, _ProbeLifetime(key_id, key), cache_size=0)
        ips, devices = list(_SEAL_PROBES), list(reversed(_SEAL_PROBES))
        users = [_PROBE_USERS[i % len(_PROBE_USERS)] for i in range(len(_SEAL_PROBES))]
        got = self.seal([key], [0] * len(ips), [key_id] * len(ips), users, ips, devices)
        for user, ip, device, sealed in zip(users, ips, devices, got, strict=True):
            if sealed != reference.mask_login(user, ip, device):
                raise CoreMismatch("per-user sealing: the compiled core's bytes differ from the reference's")


class KeyWrapping:
    """A lifetime's new per-user data keys wrapped under its KEK in one core call, the KEK's
    key schedule set once: ``AES-SIV(KEK, data key, [prefix + user])`` each (the associated
    data made in the core), the bytes of ``Lifetime``'s reference
    (``AESSIV(kek).encrypt(key, [prefix + user.encode()])``; AES-SIV is deterministic)."""

    def __init__(self, module: ModuleType, kek: bytes) -> None:
        self._siv = module.Siv([kek])

    def wrap(self, keys: list[bytes], prefix: bytes, users: list[str]) -> list[bytes | None]:
        """The wrapped form of each key (``None`` where the core declines one: the reference wraps it)."""
        return self._siv.seal(0, keys, 0, [], ad_parts=[prefix, users])


def _check_wrapping(module: ModuleType) -> None:
    kek = bytes(range(64))
    keys = [bytes([i]) * 64 for i in range(3)]
    prefix = b"streams user key\0dep\0" + bytes(8) + b"\0"
    reference = AESSIV(kek)
    if KeyWrapping(module, kek).wrap(keys, prefix, list(_PROBE_USERS)) != [
        reference.encrypt(k, [prefix + u.encode()]) for k, u in zip(keys, _PROBE_USERS, strict=True)
    ]:
        raise CoreMismatch("key wrapping: the compiled core's bytes differ from the reference's")


def load_key_wrapping(require: bool | None = None) -> Callable[[bytes], KeyWrapping] | None:
    """What ``Lifetime`` wraps new data keys with: ``kek -> KeyWrapping`` on the compiled core
    (checked against the reference here), or ``None`` for the reference."""
    streams_core = _import_core(require)
    if streams_core is None:
        return None
    try:
        _check_wrapping(streams_core)
    except (CoreMismatch, ValueError) as exc:
        _fallback(str(exc), require)
        return None
    return functools.partial(KeyWrapping, streams_core)


def load_copy_binary(require: bool | None = None) -> Callable[[list[list]], bytes | None] | None:
    """The key store's encoder of rows into PostgreSQL's binary COPY stream: the compiled
    core's ``copy_binary`` (checked against ``user_keys.copy_binary`` here), or ``None``
    (the driver encodes the rows)."""
    from streams.privacy.user_keys import copy_binary

    streams_core = _import_core(require)
    if streams_core is None:
        return None
    probe: list[list] = [list(_PROBE_USERS), ["00ff", "", "k"], [b"", bytes(range(256)), b"\0" * 3]]
    if streams_core.copy_binary(probe) != copy_binary(probe):
        _fallback("binary COPY: the compiled core's bytes differ from the reference's", require)
        return None
    return streams_core.copy_binary


class _At(NamedTuple):
    """Where a datum's value comes from in ``RecordEncoder``'s columns (item -1: the element itself)."""

    column: int
    item: int


_ENCODED_KINDS = {
    "string": "string",
    "bytes": "bytes",
    "int": "int",
    "long": "long",
    "ts": "long",
    "boolean": "boolean",
}


class RecordEncoder:
    """The masked records of a batch, Avro-encoded in one core call (``streams_core.RecordEncoder``):
    ``Output(message id, header + encoding)`` each, or ``None`` where the core declines a record.

    Which value goes in which field is not written twice: it is read off the reference's own
    datum function (``mask._masked_datum``, ``mask._sealed_datum``) by calling it once with
    markers for arguments. The datum's arguments are the batch's columns, one element per
    record; a constant it puts in (an empty text, a null) is a column of its own. Checked
    against ``codec.encode`` on ``probes`` (datum arguments) here.
    """

    def __init__(
        self, module: ModuleType, codec: AvroCodec, datum: Callable[..., dict], probes: list[tuple], make: type
    ) -> None:
        shape = [len(arg) if isinstance(arg, tuple) else 0 for arg in probes[0]]
        markers = [tuple(_At(c, j) for j in range(n)) if n else _At(c, -1) for c, n in enumerate(shape)]
        placed = datum(*markers)
        self._constants: list[Any] = []
        fields = []
        for name, kind, nullable in avro_fast._field_kinds(cast(dict, codec.schema)):
            value = placed[name]
            if isinstance(value, _At):
                where = (value.column, value.item)
            elif value is None:
                where = (-1, -1)
            else:
                where = (len(shape) + len(self._constants), -1)
                self._constants.append(value)
            if kind not in _ENCODED_KINDS:
                raise avro_fast.Unsupported(kind)
            fields.append((_ENCODED_KINDS[kind], nullable, *where))
        key = placed["message_id"]
        self._encoder = module.RecordEncoder(codec.header, fields, (key.column, key.item))
        self._make = functools.partial(tuple.__new__, make)
        columns = [list(column) for column in zip(*probes, strict=True)]
        got, _ = self.encode(columns, len(probes))
        expected = [make(args[0][0].encode(), codec.encode(datum(*args))) for args in probes]
        if got != expected or [type(o) for o in got] != [type(o) for o in expected]:
            raise CoreMismatch(f"{codec.name}: the compiled core's encoding differs from the reference's")

    def encode(self, columns: list[list], n: int) -> tuple[list[Any], int]:
        """``(outputs, declined)`` of ``n`` records given as the datum's columns."""
        if self._constants:
            columns = [*columns, *([constant] * n for constant in self._constants)]
        return self._encoder.encode(columns, n, self._make)


def load_record_encoder(
    codec: AvroCodec, datum: Callable[..., dict], probes: list[tuple], make: type, require: bool | None = None
) -> RecordEncoder | None:
    """The core's encoder of ``datum``'s records with ``codec`` (checked on ``probes``), or
    ``None``: then the transform runs the reference throughout (a schema shape it does not
    encode, a build without it or one whose bytes differ)."""
    streams_core = _import_core(require)
    if streams_core is None:
        return None
    try:
        return RecordEncoder(streams_core, codec, datum, probes, make)
    except (avro_fast.Unsupported, CoreMismatch, AttributeError) as exc:  # AttributeError: a build without it
        _fallback(f"record encoder: {exc}", require)
        return None


def load_batch_reader(reference: Callable, probes: list, place: Callable, head_len: int, require: bool | None = None):
    """A stage's reading of a batch in one core pass (``streams_core.stage_input``, checked
    against ``reference`` on ``probes``), or ``reference``."""
    streams_core = _import_core(require)
    if streams_core is None:
        return reference
    reader = functools.partial(getattr(streams_core, "stage_input", None) or _missing, place=place, head_len=head_len)
    try:
        same = reader(probes) == reference(probes)
    except Exception as exc:  # a build without it, or one that reads otherwise
        same, why = False, type(exc).__name__
    else:
        why = "its reading of a batch differs from the reference's"
    if not same:
        _fallback(f"stage_input: {why}", require)
        return reference
    return reader


def _missing(*args: Any, **kwargs: Any) -> Any:
    raise AttributeError("stage_input")


# The raw envelope layout the core's parser reads (schemas/raw_envelope.v1.avsc); another
# layout leaves parsing to the reference (the crypto still runs in the core).
_RAW_LAYOUT = [("message_id", "string"), ("sent_at", "timestamp-millis"), ("body", "string"), ("attributes", "map")]


def raw_headers(codec: AvroCodec) -> list[bytes]:
    """The headers of raw records the core's parser can read: the current writer schema's,
    single-object and Confluent (readers take both), when its layout is the one it knows."""
    layout = []
    for f in cast(dict, codec.schema)["fields"]:
        kind = f["type"]
        if isinstance(kind, dict):
            kind = kind.get("logicalType") or (kind["type"] if kind.get("values") == "string" else None)
        layout.append((f["name"], kind))
    if layout != _RAW_LAYOUT:
        return []
    writers = {**codec._writers, **codec._by_id}
    return [codec.header] + [h for h, schema in writers.items() if schema is codec.schema and h != codec.header]


def core_required() -> bool:
    """``STREAMS_REQUIRE_CORE``: 1 makes a missing or mismatched core an error, 0 or unset a fallback."""
    value = os.environ.get(REQUIRE_ENV, "0").strip()
    if value not in ("0", "1", ""):
        raise ConfigError(f"{REQUIRE_ENV} must be 1 or 0, not {value!r}")
    return value == "1"


def load(masker: Masker, require: bool | None = None, raw: AvroCodec | None = None) -> CoreMasker | None:
    """The compiled core for this masker (its parser for records of the ``raw`` codec), or
    ``None`` for the Python reference.

    ``require`` (default: ``STREAMS_REQUIRE_CORE``) turns the fallback into a ``ConfigError``.
    """
    return _load(CoreMasker, masker, require, raw)


def load_sealing(masker: UserMasker, require: bool | None = None, raw: AvroCodec | None = None) -> SealingCore | None:
    """``load`` for per-user key mode: the compiled core sealing as ``masker`` does, or ``None``."""
    return _load(SealingCore, masker, require, raw)


def _import_core(require: bool | None):
    """The extension module, or ``None`` (logged once; an error when ``require``, which
    defaults to ``STREAMS_REQUIRE_CORE``, read here so a wrong value is an error even with a core)."""
    if require is None:
        require = core_required()
    try:
        import streams_core
    except ImportError:
        _fallback("the extension streams_core is not built (make install builds it)", require)
        return None
    return streams_core


def _load(kind, masker, require: bool | None, raw: AvroCodec | None):
    streams_core = _import_core(require)
    if streams_core is None:
        return None
    try:
        core = kind(masker, streams_core, raw_headers(raw) if raw is not None else None)
    except CoreMismatch as exc:
        _fallback(str(exc), require)
        return None
    except ValueError as exc:  # a key the core does not take (length)
        _fallback(f"a key it does not take ({exc})", require)
        return None
    metrics.MASK_CORE.set(1)
    if True not in _announced:
        _announced.add(True)
        log.info("mask transform: compiled core streams_core in use")
    return core


def _fallback(reason: str, require: bool | None) -> None:
    """The reference instead of the core: a warning once and the gauge at 0, or a
    ``ConfigError`` when ``require`` (default: ``STREAMS_REQUIRE_CORE``)."""
    if require is None:
        require = core_required()
    if require:
        raise ConfigError(f"{REQUIRE_ENV}=1 but the compiled mask core is unusable: {reason}")
    metrics.MASK_CORE.set(0)
    if False not in _announced:
        _announced.add(False)
        log.warning("mask transform: Python reference in use, not the compiled core: %s", reason)
    return None
