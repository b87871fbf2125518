"""Key material for masking: join (HMAC) keys per field and versioned encryption keys.

Keys come from ``STREAMS_KEYS_JSON`` (for a secret store) or the ``STREAMS_KEYS_FILE``
JSON file. With ``STREAMS_KMS_KEY_ID`` set, either holds only a KMS-wrapped document
(``streams.privacy.kms``), a plaintext one is refused (``streams keys migrate`` wraps it
once), and every command that writes keys writes them wrapped. Fail closed: a missing file stops the process, unless
``STREAMS_DEV_KEYS=1`` asks for a generated development key (``make run``, tests). A
generated file is published once, atomically, so processes starting together on one
empty volume all load the same key. A key file others can read or write is refused
(group-readable stays allowed: Kubernetes Secret volumes with ``fsGroup`` are 0440).
Key bytes are never printed.

File format::

    {"join": {"active": "h1", "next": "h2", "domain_separated": ["h2"],
              "versions": {"h1": {"ip": "<b64>", "device_id": "<b64>"}, "h2": {...}}},
     "encryption": {"active": "k1", "keys": {"k1": "<b64, 64 bytes AES-SIV>"}}}

``domain_separated`` lists the join versions whose MAC input holds the field and the
version (``streams.privacy.masking``): every version made since issue 19. A version not
listed is an older one, kept so its tokens stay joinable until ``streams keys rejoin``
moves them. The two fields of a version must have different keys.

``join.next`` is optional: it names a version being rolled out by ``streams keys
rejoin`` (new writes keep using ``active`` until the rewrite switches them).
The commands that change keys edit the file only.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streams.errors import ConfigError

if TYPE_CHECKING:
    from streams.privacy.kms import Kms

log = logging.getLogger(__name__)

PII_FIELDS = ("ip", "device_id")
JOIN_KEY_BYTES = 32
ENCRYPTION_KEY_BYTES = 64  # AES-SIV with AES-256
_ID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")


class KeyMaterialError(ConfigError):
    """Key material is missing or malformed; the message says what to fix."""


@dataclass(frozen=True)
class KeyRing:
    join_version: str
    join_keys: dict[str, dict[str, bytes]]  # version -> field -> key
    encryption_key_id: str
    encryption_keys: dict[str, bytes]  # key id -> key
    join_next: str | None = None  # version being rolled out by `keys rejoin`
    join_separated: frozenset[str] = frozenset()  # versions whose MAC input names field and version

    def active_join_keys(self) -> dict[str, bytes]:
        return self.join_keys[self.join_version]

    def describe(self) -> dict:
        """What is loaded, without key bytes (safe to print)."""
        return {
            "join": {"active": self.join_version, "next": self.join_next, "versions": sorted(self.join_keys)},
            "encryption": {"active": self.encryption_key_id, "keys": sorted(self.encryption_keys)},
        }


def _b64(value: str, what: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise KeyMaterialError(f"{what} is not base64") from None
    if len(raw) != size:
        raise KeyMaterialError(f"{what} must be {size} bytes, found {len(raw)}")
    return raw


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise KeyMaterialError(f"{what} must be 1-16 letters, digits, '-' or '_'")
    return value


def parse_keyring(text: str, source: str) -> KeyRing:
    """Validate the whole document up front, so a worker never fails mid-stream."""
    try:
        doc = json.loads(text)
        join, enc = doc["join"], doc["encryption"]
        join_version = _check_id(join["active"], f"{source}: join.active")
        join_keys = {
            _check_id(version, f"{source}: join version"): {
                field: _b64(fields[field], f"{source}: join key {version}.{field}", JOIN_KEY_BYTES)
                for field in PII_FIELDS
            }
            for version, fields in join["versions"].items()
        }
        separated = frozenset(join.get("domain_separated", [])) & join_keys.keys()
        enc_id = _check_id(enc["active"], f"{source}: encryption.active")
        enc_keys = {
            _check_id(key_id, f"{source}: encryption key id"): _b64(
                value, f"{source}: encryption key {key_id}", ENCRYPTION_KEY_BYTES
            )
            for key_id, value in enc["keys"].items()
        }
    except KeyMaterialError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else "not valid key JSON"
        raise KeyMaterialError(f"{source}: {detail}; see docs/privacy.md for the format") from None
    for version, fields in join_keys.items():
        if len(set(fields.values())) < len(fields):
            raise KeyMaterialError(
                f"{source}: join version {version} uses one key for two fields: "
                "each field needs its own key (`streams keys rotate join`, then `streams keys rejoin`)"
            )
    if join_version not in join_keys:
        raise KeyMaterialError(f"{source}: join.active {join_version!r} has no keys")
    if enc_id not in enc_keys:
        raise KeyMaterialError(f"{source}: encryption.active {enc_id!r} has no key")
    join_next = join.get("next")
    if join_next is not None and join_next not in join_keys:
        raise KeyMaterialError(f"{source}: join.next {join_next!r} has no keys")
    return KeyRing(join_version, join_keys, enc_id, enc_keys, join_next, separated)


def _new_key(size: int) -> str:
    return base64.b64encode(secrets.token_bytes(size)).decode()


def next_id(existing, prefix: str) -> str:
    """The next free id after the highest numbered one: h1 -> h2, k7 -> k8."""
    numbers = [int(i[len(prefix) :]) for i in existing if i.startswith(prefix) and i[len(prefix) :].isdigit()]
    return f"{prefix}{max(numbers, default=0) + 1}"


def _new_join_version() -> dict:
    return {f: _new_key(JOIN_KEY_BYTES) for f in PII_FIELDS}


def generate_document(join_version: str = "h1", key_id: str = "k1") -> dict:
    return {
        "join": {
            "active": join_version,
            "domain_separated": [join_version],
            "versions": {join_version: _new_join_version()},
        },
        "encryption": {"active": key_id, "keys": {key_id: _new_key(ENCRYPTION_KEY_BYTES)}},
    }


def add_encryption_key(doc: dict) -> str:
    """Add a fresh encryption key and make it active at once (old ids still decrypt)."""
    key_id = next_id(doc["encryption"]["keys"], "k")
    doc["encryption"]["keys"][key_id] = _new_key(ENCRYPTION_KEY_BYTES)
    doc["encryption"]["active"] = key_id
    return key_id


def add_join_version(doc: dict) -> str:
    """Add a fresh join version as ``next``; it becomes active only when `keys rejoin` switches."""
    join = doc["join"]
    if join.get("next"):
        raise KeyMaterialError(f"join version {join['next']} is already being rolled out: run `streams keys rejoin`")
    version = next_id(join["versions"], "h")
    join["versions"][version] = _new_join_version()
    join["domain_separated"] = sorted({*join.get("domain_separated", []), version})
    join["next"] = version
    return version


def plaintext(text: str, source: str, kms: Kms | None) -> str:
    """The keyring JSON of a stored document: unwrapped through the KMS when one is set.

    With a KMS a plaintext document is refused (nothing at rest is a plaintext key);
    without one a wrapped document cannot be opened. Both say the fix in one line.
    """
    try:
        doc = json.loads(text)
    except ValueError:
        raise KeyMaterialError(f"{source}: not valid key JSON; see docs/privacy.md for the format") from None
    wrapped = isinstance(doc, dict) and "format" in doc
    if wrapped and kms is None:
        raise KeyMaterialError(
            f"{source} is wrapped by a KMS: set STREAMS_KMS_KEY_ID (and STREAMS_KMS_ENDPOINT for a local KMS)"
        )
    if kms is None:
        return text
    if not wrapped:
        raise KeyMaterialError(
            f"{source} holds plaintext keys, refused with STREAMS_KMS_KEY_ID set: run `streams keys migrate` once "
            "to wrap it"
        )
    return kms.unwrap(doc, source)


def editable_document(keys_file: Path, keys_json: str | None = None, kms: Kms | None = None) -> dict:
    """The key file's document, for commands that change keys (never the env copy)."""
    if keys_json:
        raise KeyMaterialError(
            "keys come from STREAMS_KEYS_JSON: change them in your secret store, not with this command"
        )
    text = plaintext(read_key_file(keys_file), str(keys_file), kms)
    parse_keyring(text, str(keys_file))
    return json.loads(text)


def stored_form(doc: dict, kms: Kms | None) -> dict:
    """What goes to disk: the keyring wrapped by the KMS when one is set."""
    return kms.wrap(json.dumps(doc)) if kms is not None else doc


def migrate_to_kms(keys_file: Path, kms: Kms) -> None:
    """Replace a plaintext key file by its wrapped form, checked to open before it replaces anything."""
    text = read_key_file(keys_file)
    try:
        doc = json.loads(text)
    except ValueError:
        raise KeyMaterialError(f"{keys_file}: not valid key JSON") from None
    if isinstance(doc, dict) and "format" in doc:
        raise KeyMaterialError(f"{keys_file} is already wrapped by a KMS: nothing to migrate")
    parse_keyring(text, str(keys_file))
    wrapped = kms.wrap(json.dumps(doc))
    if json.loads(kms.unwrap(wrapped, "the new wrapped document")) != doc:
        raise KeyMaterialError("the wrapped document did not open to the same keys: nothing was changed")
    os.replace(_write_new(keys_file, wrapped), keys_file)


def _write_new(path: Path, doc: dict) -> Path:
    """A new owner-only file beside ``path``, fully on disk; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def write_document(path: Path, doc: dict, kms: Kms | None = None) -> None:
    """Replace a key file readable by its owner only, atomically (commands that change keys)."""
    os.replace(_write_new(path, stored_form(doc, kms)), path)


def publish_document(path: Path, doc: dict) -> bool:
    """Create ``path`` with ``doc`` only if it does not exist; False if another process won."""
    tmp = _write_new(path, doc)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def read_key_file(keys_file: Path) -> str:
    """The key file's text; refused when missing or open to others."""
    try:
        mode = keys_file.stat().st_mode
    except FileNotFoundError:
        raise KeyMaterialError(
            f"no key file at {keys_file}: run `streams keys init`, mount your key secret there, "
            "set STREAMS_KEYS_FILE or STREAMS_KEYS_JSON (or STREAMS_DEV_KEYS=1 for a development key)"
        ) from None
    if mode & 0o037:
        raise KeyMaterialError(f"{keys_file} is open to others (mode {mode & 0o777:o}): chmod 600 (or 440) it")
    try:
        return keys_file.read_text()
    except OSError as exc:
        raise KeyMaterialError(
            f"cannot read {keys_file} ({exc.strerror}): check its owner and STREAMS_KEYS_FILE"
        ) from None


def load_keyring(
    keys_file: Path, keys_json: str | None = None, dev_keys: bool = False, kms: Kms | None = None
) -> KeyRing:
    """The keyring every stage uses; always what the final file (or env) holds, never a private copy."""
    if keys_json:
        return parse_keyring(plaintext(keys_json, "STREAMS_KEYS_JSON", kms), "STREAMS_KEYS_JSON")
    if dev_keys and not keys_file.exists() and publish_document(keys_file, stored_form(generate_document(), kms)):
        log.warning(
            "generated a DEV masking key at %s (STREAMS_DEV_KEYS); use real key management in production", keys_file
        )
    return parse_keyring(plaintext(read_key_file(keys_file), str(keys_file), kms), str(keys_file))


def settings_keyring(settings) -> KeyRing:
    """``load_keyring`` with the process settings (and its KMS, when STREAMS_KMS_KEY_ID is set)."""
    from streams.privacy.kms import settings_kms

    keys_json = settings.keys_json.get_secret_value() if settings.keys_json else None
    return load_keyring(settings.keys_file, keys_json, settings.dev_keys, settings_kms(settings))
