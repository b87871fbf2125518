"""Masking of PII fields: keyed join tokens for analysts, AES-SIV ciphertexts for recovery.

- Join token: ``<version>.<base64url(HMAC-SHA256(field key, field NUL version NUL
  canonical value))>``: the field and the token version are inside the MAC input (domain
  separation), not only in the key, so a token of one field or version never equals
  another's even under a shared key. Older versions (no ``domain_separated`` in the key
  file) MAC the canonical value alone; they stay readable and joinable until ``streams
  keys rejoin`` moves their rows to a separated version. Equal values give equal tokens
  (duplicates stay visible); without the key the 2^32 IPv4 space cannot be
  brute-forced, unlike an unkeyed hash.
- Recovery ciphertext: ``<key id>.v2.<base64url(AES-SIV(pad(canonical)))>`` with the
  field name, key id and join token as associated data, so a ciphertext cannot be moved
  to another field, key or token (a copy under another token does not open).
  Deterministic, so one vault row serves every duplicate; padded to 256-byte blocks so
  the length of a value does not leak (any ASCII value the parser accepts fits one
  block; only long non-ASCII values fall into a larger bucket).
- Older ciphertexts, ``<key id>.<base64url>`` (associated data: field and key id only),
  still open; the reader tells the formats apart by the ``v2`` marker (base64url has no
  dot). They are not bound to a token, so ``reveal`` also recomputes the token from the
  plaintext (``Masker.belongs``) and refuses a mismatch, whatever the format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streams.errors import Refused
from streams.privacy.keys import KeyRing

PAD_BLOCK = 256  # covers every ASCII value up to the parser's 200-character limit
BOUND = "v2"  # ciphertext format marker: the join token is part of the associated data
TOKEN = re.compile(r"^([A-Za-z0-9_-]{1,16})\.[A-Za-z0-9_-]{43}$")


def token_version(token: str) -> str:
    """The version prefix of a well-formed join token; ValueError (without the text) otherwise."""
    match = TOKEN.match(token)
    if not match:
        raise ValueError("not a join token: expected <version>.<43 base64url characters>")
    return match.group(1)


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zero, like ipaddress
_DOTTED_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def canonical_ip(value: str) -> tuple[str, bool]:
    """Canonical text of an IP and whether it was one.

    Surrounding whitespace is dropped; IPv6 is compressed and lower-case; an
    IPv4-mapped IPv6 address folds to its IPv4 form; a zone id (``%eth0``) is kept
    as written. A value that is not an IP is masked as the trimmed string.
    """
    text = value.strip()
    if _DOTTED_QUAD.fullmatch(text):  # the common case, already canonical: no ipaddress object
        return text, True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text, False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped and not address.scope_id:
        return str(address.ipv4_mapped), True
    return address.compressed, True


def canonical_device_id(value: str) -> str:
    """Device ids are opaque: only surrounding whitespace is dropped."""
    return value.strip()


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE, b"=").decode("ascii")


class _HmacSha256:
    """HMAC-SHA256 with the key schedule done once (RFC 2104): each digest copies two
    keyed hash states, about a third of ``hmac.digest``'s cost."""

    __slots__ = ("_inner", "_outer")
    _IPAD = bytes(b ^ 0x36 for b in range(256))
    _OPAD = bytes(b ^ 0x5C for b in range(256))

    def __init__(self, key: bytes, prefix: bytes = b"") -> None:
        """``prefix`` starts every message; it is absorbed once here, so it costs nothing per digest."""
        block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        self._inner = hashlib.sha256(block.translate(self._IPAD) + prefix)
        self._outer = hashlib.sha256(block.translate(self._OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def mac_prefix(keyring: KeyRing, field: str, version: str) -> bytes:
    """What precedes the canonical value in the MAC input: ``field NUL version NUL`` for a
    domain-separated version, nothing for an older one (ids and fields hold no NUL)."""
    return f"{field}\0{version}\0".encode() if version in keyring.join_separated else b""


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def pad(data: bytes) -> bytes:
    """2-byte length, the data, zeros to the next multiple of PAD_BLOCK."""
    framed = len(data).to_bytes(2, "big") + data
    return framed + b"\0" * (-len(framed) % PAD_BLOCK)


def unpad(data: bytes) -> bytes:
    size = int.from_bytes(data[:2], "big")
    if size > len(data) - 2:
        raise ValueError("bad padding")
    return data[2 : 2 + size]


class RevealError(Refused):
    """A ciphertext that this keyring cannot open; never carries the value."""


class MissingKeyError(RevealError):
    """The key a ciphertext or token needs is not in the keyring (retired, or another key file)."""


def ciphertext_key_id(ciphertext: str) -> str:
    """The encryption key id a ciphertext names (its prefix, in both formats)."""
    return ciphertext.partition(".")[0]


def _bound_ad(field: str, key_id: str, token: str) -> list[bytes]:
    return [field.encode(), key_id.encode(), BOUND.encode(), token.encode()]


def parse_ciphertext(field: str, ciphertext: str, token: str | None) -> tuple[str, str, list[bytes]]:
    """``(key id, base64url body, associated data)`` of either ciphertext format."""
    parts = ciphertext.split(".")
    if len(parts) == 2:  # older format: not bound to a token
        return parts[0], parts[1], [field.encode(), parts[0].encode()]
    if len(parts) == 3 and parts[1] == BOUND:
        if token is None:
            raise RevealError("a token-bound ciphertext opens only with its join token")
        return parts[0], parts[2], _bound_ad(field, parts[0], token)
    raise RevealError("not a recovery ciphertext: expected <key id>.[v2.]<base64url>")


@dataclass(frozen=True, slots=True)
class MaskedValue:
    token: str
    ciphertext: str


class Masker:
    """Masks values with one keyring; results are cached since duplicates are common.

    The cache is keyed by the plaintext (field, canonical value): it holds at most
    ``cache_size`` plaintext values in memory (least recently used go first), never on
    disk (workers run without core dumps, ``streams.privacy.hardening``).
    """

    def __init__(self, keyring: KeyRing, cache_size: int = 65536) -> None:
        self.keyring = keyring
        self._join = keyring.active_join_keys()
        self._key_id = keyring.encryption_key_id
        self._siv = {key_id: AESSIV(key) for key_id, key in keyring.encryption_keys.items()}
        version = keyring.join_version
        self._hmac = {field: _HmacSha256(key, mac_prefix(keyring, field, version)) for field, key in self._join.items()}
        self.mask = lru_cache(maxsize=cache_size)(self._mask) if cache_size else self._mask

    def token(self, field: str, canonical: str, version: str | None = None) -> str:
        """The active version's token, or another loaded version's (used by join-key rotation)."""
        if version is None:
            digest = self._hmac[field].digest(canonical.encode("utf-8"))
            return f"{self.keyring.join_version}.{_b64(digest)}"
        message = mac_prefix(self.keyring, field, version) + canonical.encode("utf-8")
        digest = hmac.digest(self.keyring.join_keys[version][field], message, "sha256")
        return f"{version}.{_b64(digest)}"

    def encrypt(self, field: str, canonical: str, token: str) -> str:
        """A token-bound ciphertext under the active key: ``<key id>.v2.<base64url>``."""
        key_id = self._key_id
        sealed = self._siv[key_id].encrypt(pad(canonical.encode("utf-8")), _bound_ad(field, key_id, token))
        return f"{key_id}.{BOUND}.{_b64(sealed)}"

    def decrypt(self, field: str, ciphertext: str, token: str | None = None) -> str:
        """Open either format; a token-bound one opens only with the token it was sealed for."""
        key_id, body, associated = parse_ciphertext(field, ciphertext, token)
        siv = self._siv.get(key_id)
        if siv is None:
            raise MissingKeyError(f"no encryption key {key_id!r} in the keyring")
        try:
            return unpad(siv.decrypt(_unb64(body), associated)).decode("utf-8")
        except Exception:
            raise RevealError(
                "ciphertext does not open with this key (wrong key, tampered, or moved to another token)"
            ) from None

    def belongs(self, field: str, token: str, canonical: str) -> bool:
        """Whether ``token`` is this value's token under the token's own join version.

        Catches a ciphertext copied under another token (an unbound, older ciphertext
        opens anywhere). ``MissingKeyError`` when that join version is not loaded.
        """
        try:
            version = token_version(token)
        except ValueError:
            return False
        if field not in self.keyring.join_keys.get(version, {}):
            raise MissingKeyError(f"join version {version!r} is not in the keyring, so the token cannot be checked")
        return hmac.compare_digest(self.token(field, canonical, version), token)

    def _mask(self, field: str, canonical: str) -> MaskedValue:
        token = self.token(field, canonical)
        return MaskedValue(token, self.encrypt(field, canonical, token))


# --- Per-user sealing (issue 19 item 2): the primitives, bytes in, bytes out ----------
#
# The reference for any compiled core: a token is ``join_token`` of the canonical value;
# a value is ``sealed_value(key id, seal(data key, pad_field(field, canonical), associated))``.
# All deterministic for given keys.

SEALED_FORMAT = 3  # first byte of a per-user sealed value (the masked schema's v3 fields)
KEY_ID_BYTES = 8  # a data key's id: its worker lifetime's id (one data key per user per lifetime)
IP_SIZE = 48  # any IPv6 text with a zone id under 46 characters, plus 2 length bytes
DEVICE_ID_SIZES = (48, 96, 208, 816)  # 816: 200 characters of 4-byte UTF-8 plus 2 length bytes
DATA_KEY_BYTES = 64  # AES-256-SIV


def join_token(join_key: bytes, field: bytes, version: bytes, canonical: bytes) -> bytes:
    """HMAC-SHA256 of ``field NUL version NUL canonical`` (domain separation): the token digest."""
    return hmac.digest(join_key, field + b"\0" + version + b"\0" + canonical, "sha256")


def field_size(field: str, length: int) -> int:
    """The fixed padded size of a field's value of ``length`` bytes (the length does not leak beyond it)."""
    if field == "ip" and length + 2 <= IP_SIZE:
        return IP_SIZE
    for size in DEVICE_ID_SIZES:
        if length + 2 <= size:
            return size
    raise ValueError("value too long to seal")


def pad_field(field: str, canonical: bytes) -> bytes:
    """2-byte length, the value, zeros up to the field's fixed size (48 for an IP)."""
    framed = len(canonical).to_bytes(2, "big") + canonical
    return framed + b"\0" * (field_size(field, len(canonical)) - len(framed))


_AD_LABEL = b"streams-sealed/3"
_FORMAT_BYTE = bytes((SEALED_FORMAT,))


def associated(field: bytes, user_id: bytes, key_id: bytes, token: bytes) -> bytes:
    """What a sealed value is bound to: its field, its user, its key and its join token."""
    return b"\0".join((_AD_LABEL, field, user_id, key_id, token))


def seal(data_key: bytes, padded: bytes, associated_data: bytes) -> bytes:
    """AES-SIV (RFC 5297) of the padded value: the 16-byte synthetic IV, then the ciphertext."""
    return AESSIV(data_key).encrypt(padded, [associated_data])


def sealed_value(key_id: bytes, sealed: bytes) -> bytes:
    """The stored form: format byte, the key id it names, the AES-SIV output (Avro ``bytes``)."""
    return bytes((SEALED_FORMAT,)) + key_id + sealed


def split_sealed(value: bytes) -> tuple[bytes, bytes]:
    """``(key id, AES-SIV output)`` of a stored sealed value; ValueError if it is not one."""
    if len(value) < 1 + KEY_ID_BYTES + 16 or value[0] != SEALED_FORMAT:
        raise ValueError("not a per-user sealed value")
    return value[1 : 1 + KEY_ID_BYTES], value[1 + KEY_ID_BYTES :]


def open_sealed(data_key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """The canonical value of an AES-SIV output (InvalidTag if key, binding or bytes differ)."""
    return unpad(AESSIV(data_key).decrypt(sealed, [associated_data]))


class UserMasker:
    """Per-user key mode (no decrypt right): tokens under join keys from kms:GenerateMac, values
    sealed under the user's data key of this worker lifetime (``streams.privacy.user_keys``).

    Same bytes as ``join_token`` and ``seal`` (the reference); keyed HMAC states and each
    user's AES-SIV object are made once. Tokens are cached by plaintext value (bounded LRU,
    memory only); sealed values are not cached (they depend on the user).
    """

    def __init__(self, join_keys: dict[str, bytes], version: str, lifetime, cache_size: int = 65536) -> None:
        if len(set(join_keys.values())) < len(join_keys):
            raise ValueError("each field needs its own join key")
        self.version = version
        self.join_keys = dict(join_keys)  # memory only: the compiled core keys its own MACs (privacy/core.py)
        self.lifetime = lifetime  # user_keys.Lifetime: data_key(user_id) -> (key id, AESSIV)
        self._hmac = {f: _HmacSha256(k, f"{f}\0{version}\0".encode()) for f, k in join_keys.items()}
        self.token = lru_cache(maxsize=cache_size)(self._token) if cache_size else self._token

    def _token(self, field: str, canonical: str) -> str:
        return f"{self.version}.{_b64(self._hmac[field].digest(canonical.encode('utf-8')))}"

    def mask(self, user_id: str, field: str, canonical: str) -> tuple[str, bytes]:
        """``(join token, sealed value)`` of one field of one user's login."""
        token = self.token(field, canonical)
        key_id, siv = self.lifetime.data_key(user_id)
        data = associated(field.encode(), user_id.encode("utf-8"), key_id, token.encode())
        return token, sealed_value(key_id, siv.encrypt(pad_field(field, canonical.encode("utf-8")), [data]))

    def mask_login(self, user_id: str, ip: str, device_id: str) -> tuple[str, bytes, str, bytes]:
        """``mask`` of both fields of one login, the user's key looked up once (the hot path)."""
        key_id, siv = self.lifetime.data_key(user_id)
        user = user_id.encode("utf-8")
        ip_token, device_token = self.token("ip", ip), self.token("device_id", device_id)
        format_and_key = _FORMAT_BYTE + key_id
        ip_sealed = siv.encrypt(
            pad_field("ip", ip.encode("utf-8")), [b"\0".join((_AD_LABEL, b"ip", user, key_id, ip_token.encode()))]
        )
        device_sealed = siv.encrypt(
            pad_field("device_id", device_id.encode("utf-8")),
            [b"\0".join((_AD_LABEL, b"device_id", user, key_id, device_token.encode()))],
        )
        return ip_token, format_and_key + ip_sealed, device_token, format_and_key + device_sealed


def open_value(data_key: bytes | AESSIV, field: str, user_id: str, token: str, value: bytes) -> str:
    """The canonical text of a sealed value (the decrypting paths); RevealError if it does not open."""
    key_id, body = split_sealed(value)
    siv = data_key if isinstance(data_key, AESSIV) else AESSIV(data_key)
    try:
        return unpad(
            siv.decrypt(body, [associated(field.encode(), user_id.encode("utf-8"), key_id, token.encode())])
        ).decode()
    except Exception:
        raise RevealError("the sealed value does not open (another user, token or key, or altered)") from None
