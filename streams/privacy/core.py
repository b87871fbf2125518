"""The compiled mask core: masking a whole batch in one call, or the Python reference.

``streams_core`` (core/ in the repository, Rust, built from source by ``make install``
and the image's builder stage) holds primitives only: HMAC-SHA256 tokens and AES-SIV
sealing with key schedules set once, and a parser of the common raw record shape
(``parse_logins``: envelope, flat JSON body, the mask stage's validation; it declines
everything else, which the reference reads). How a token and a ciphertext are
composed (keys, MAC prefix, associated data, text format) is written here, beside the
reference it must equal (``masking.Masker``), and checked against it when loaded: a
core that does not give the reference's bytes is not used.

Without the extension (or with one that disagrees), the mask stage runs the Python
reference, says so once at start (a log line, the ``streams_mask_core`` gauge at 0) and
works as before. ``STREAMS_REQUIRE_CORE=1`` (CI, ``make bench``) makes that an error
instead, so a comparison of core and reference can never be one of the reference with
itself.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import cast

from streams import metrics
from streams.errors import ConfigError
from streams.io.codec import AvroCodec
from streams.privacy.masking import BOUND, PAD_BLOCK, Masker, _bound_ad, mac_prefix

log = logging.getLogger(__name__)

REQUIRE_ENV = "STREAMS_REQUIRE_CORE"
# Values the self-check masks with both: ASCII, IPv6, non-ASCII, a value over one pad block.
_PROBES = ("10.0.0.1", "2001:db8::1", "ÿ-devíce-✓", "é" * 150)
_announced: set[bool] = set()  # log the core's state once per process, not per transform


class CoreMismatch(RuntimeError):
    """The compiled core's output differs from the reference's (a scheme it does not follow)."""


class CoreMasker:
    """Tokens and ciphertexts of a batch of canonical values, as ``Masker.mask`` makes them,
    and the parse of a batch of raw records.

    ``parse`` and ``mask`` return ``None`` in place of a record or value the core declines;
    the caller reads or masks that one with the reference.
    """

    def __init__(self, masker: Masker, module: ModuleType, raw_headers: list[bytes] | None = None) -> None:
        keyring = masker.keyring
        self._parse = module.parse_logins
        self._raw_headers = raw_headers or []
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

    def parse(self, values: list[bytes | None]) -> list[tuple | None]:
        """``MaskTransform``'s fields of each raw record (the tuple ``mask._fields`` makes),
        ``None`` where the core declines (not the common shape, or no known raw header)."""
        if not self._raw_headers:
            return [None] * len(values)
        return self._parse(values, self._raw_headers)

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
    if require is None:
        require = core_required()
    try:
        import streams_core
    except ImportError:
        _fallback("the extension streams_core is not built (make install builds it)", require)
        return None
    try:
        core = CoreMasker(masker, streams_core, raw_headers(raw) if raw is not None else None)
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


def _fallback(reason: str, require: bool) -> None:
    if require:
        raise ConfigError(f"{REQUIRE_ENV}=1 but the compiled mask core is unusable: {reason}")
    metrics.MASK_CORE.set(0)
    if False not in _announced:
        _announced.add(False)
        log.warning("mask transform: Python reference in use, not the compiled core: %s", reason)
    return None
