"""The mask stage as a pure function: raw envelope bytes in, masked or dead-letter bytes out.

Two steps, no I/O, so every rule is unit-testable and the Faust agent only moves bytes:

1. ``parse_login``: parse, validate and flatten a login body into the fields of ``user_logins``.

   Rules (documented in docs/records.md):
   - the body must be one JSON object with unique keys, at most 64 levels deep;
   - ``user_id``, ``device_type``, ``ip``, ``device_id`` and ``app_version`` are required
     non-empty strings; ``locale`` is required but may be null; other keys are ignored;
   - text is stored exactly as sent, but must fit its column and hold no NUL character
     or lone surrogate (PostgreSQL and UTF-8 refuse both);
   - ``app_version`` keeps its text and gains an order-preserving integer (see
     ``encode_app_version``), NULL when the text is not a version we can encode.
2. ``MaskTransform``: the envelope around it, the masking call and the outcome.

Nothing raised from here may carry a field value: details name fields, never values.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from streams import metrics
from streams.errors import Rejected
from streams.io.codec import CodecError, Codecs, UnknownSchemaError
from streams.pipeline.dead_letters import MAX_MESSAGE_ID, Reason, dead_letter
from streams.privacy import core as mask_core
from streams.privacy.keys import PII_FIELDS
from streams.privacy.ledger import ERASED, ErasedUsers, body_user_id
from streams.privacy.masking import Masker, UserMasker, canonical_device_id, canonical_ip

STAGE = "mask"
MAX_DEPTH = 64
REQUIRED = ("user_id", "device_type", "ip", "device_id", "app_version")
NULLABLE = ("locale",)
MAX_CHARS = {
    "user_id": 128,
    "device_type": 32,
    "locale": 32,
    "app_version": 64,
    "ip": 200,
    "device_id": 200,
}
INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Login:
    """A validated login, PII still in clear: it never leaves the mask stage."""

    user_id: str
    device_type: str
    ip: str
    device_id: str
    locale: str | None
    app_version_raw: str
    app_version: int | None


@functools.lru_cache(maxsize=4096)  # a pure function of a field with few distinct values
def encode_app_version(text: str) -> int | None:
    """Order-preserving integer for ``MAJOR[.MINOR[.PATCH]]``: ``major*10^6 + minor*10^3 + patch``.

    Each part is a decimal number (minor and patch at most 999), so ``"2.00"`` is
    2.0.0 (2000000), ``"0.96"`` is 0.96.0 (96000) and ``"0.60"`` is 0.60.0 (60000);
    missing parts are zero. Anything else (letters, four parts, a part over 999, a
    result over int32) has no integer and stays as text only.
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 3:
        return None
    numbers = []
    for part in parts:
        if not (part.isascii() and part.isdigit()):
            return None
        numbers.append(int(part))
    if any(n > 999 for n in numbers[1:]):
        return None
    numbers += [0] * (3 - len(numbers))
    value = numbers[0] * 1_000_000 + numbers[1] * 1_000 + numbers[2]
    return value if value <= INT32_MAX else None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise Rejected(Reason.DUPLICATE_KEY, "the object repeats a key")
    return result


def _refuse_constant(name: str) -> None:
    raise Rejected(Reason.INVALID_JSON, f"{name} is not JSON")


def _depth_ok(value: object, limit: int = MAX_DEPTH) -> bool:
    """Iterative depth check: a recursive one would itself hit RecursionError."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


# ``json.loads(body, object_pairs_hook=..., parse_constant=...)`` builds this decoder anew
# on every call; one is enough (``_loads`` keeps loads' own BOM check).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)


def _loads(body: str) -> object:
    if body.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", body, 0)
    return _DECODER.decode(body)


def parse_json_object(body: str) -> dict:
    """The body as one JSON object, or ``Rejected`` with why not."""
    if not body.strip():
        raise Rejected(Reason.EMPTY_BODY, "body is empty or whitespace")
    try:
        value = _loads(body)
    except RecursionError:
        raise Rejected(Reason.TOO_DEEP, "nesting deeper than the parser allows") from None
    except json.JSONDecodeError as exc:
        raise Rejected(Reason.INVALID_JSON, f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError:  # Python's integer digit limit (4,300 digits); the message would quote the number
        raise Rejected(Reason.NUMBER_TOO_LONG, "a number has more digits than the parser converts") from None
    if not isinstance(value, dict):
        raise Rejected(Reason.NOT_AN_OBJECT, f"body is a JSON {type(value).__name__}, not an object")
    # Going deeper than MAX_DEPTH takes at least MAX_DEPTH containers, so a body with
    # fewer brackets (counted in C, strings included) needs no walk.
    if body.count("{") + body.count("[") >= MAX_DEPTH and not _depth_ok(value):
        raise Rejected(Reason.TOO_DEEP, f"nesting deeper than {MAX_DEPTH} levels")
    return value


def _check_text(name: str, value: str) -> str:
    if "\x00" in value:
        raise Rejected(Reason.NUL_CHARACTER, f"field {name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(Reason.INVALID_UNICODE, f"field {name} contains a lone surrogate") from None
    if len(value) > MAX_CHARS[name]:
        # The length of a PII value is itself a hint: say only that it is too long.
        size = "" if name in PII_FIELDS else f" has {len(value)} characters,"
        raise Rejected(Reason.FIELD_TOO_LONG, f"field {name}{size} over the limit of {MAX_CHARS[name]} characters")
    return value


def _field(obj: dict, name: str, nullable: bool) -> str | None:
    value = obj[name]
    if value is None:
        if nullable:
            return None
        raise Rejected(Reason.NULL_FIELD, f"field {name} is null")
    if not isinstance(value, str):
        raise Rejected(Reason.WRONG_TYPE, f"field {name} is a JSON {_json_type(value)}, expected string")
    if not nullable and not value.strip():
        raise Rejected(Reason.EMPTY_FIELD, f"field {name} is empty")
    return _check_text(name, value)


def _required(obj: dict, name: str) -> str:
    value = _field(obj, name, nullable=False)
    assert value is not None  # _field refuses null for a required field
    return value


def _json_type(value: object) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


_EXPECTED = frozenset((*REQUIRED, *NULLABLE))
_REQUIRED_LIMITS = tuple((name, MAX_CHARS[name]) for name in REQUIRED)


def _plain_text(value: str, suspect: bool) -> bool:
    """No NUL, no lone surrogate. A JSON string holds a NUL only through an escape (a raw
    control character is invalid JSON) and a surrogate through an escape or as a non-ASCII
    character, so an ASCII body without a backslash needs no look."""
    if not suspect:
        return True
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _login_values(body: str) -> tuple[str, str, str, str, str, str | None]:
    """``(user_id, device_type, ip, device_id, app_version, locale)`` of a valid body.

    The fast path checks that a field is valid; a field that is not goes through
    ``_field``, which raises the reason (same fields in the same order as ever).
    """
    obj = parse_json_object(body)
    if not obj.keys() >= _EXPECTED:
        missing = [name for name in (*REQUIRED, *NULLABLE) if name not in obj]
        raise Rejected(Reason.MISSING_FIELD, "missing: " + ", ".join(missing))
    suspect = "\\" in body or not body.isascii()
    values = []
    for name, limit in _REQUIRED_LIMITS:
        value = obj[name]
        if not (value.__class__ is str and len(value) <= limit and value.strip() and _plain_text(value, suspect)):
            value = _required(obj, name)
        values.append(value)
    locale = obj["locale"]
    if locale is not None and not (
        locale.__class__ is str and len(locale) <= MAX_CHARS["locale"] and _plain_text(locale, suspect)
    ):
        locale = _field(obj, "locale", nullable=True)
    user_id, device_type, ip, device_id, app_version = values
    return user_id, device_type, ip, device_id, app_version, locale


def parse_login(body: str) -> Login:
    """Validate and flatten one SQS body into a ``Login``."""
    user_id, device_type, ip, device_id, app_version, locale = _login_values(body)
    return Login(
        user_id=user_id,
        device_type=device_type,
        ip=ip,
        device_id=device_id,
        locale=locale,
        app_version_raw=app_version,
        app_version=encode_app_version(app_version),
    )


class Output(NamedTuple):  # a tuple: cheaper to make than a frozen dataclass, as immutable
    """One record to produce: to the masked topic, or to the DLQ when ``reason`` is set."""

    key: bytes
    value: bytes
    reason: str | None = None


def _fallback_id(key: bytes | None, where: str) -> str:
    """The Kafka key as text, else ``topic/partition/offset``."""
    try:
        if key:
            return key.decode("utf-8")
    except UnicodeDecodeError:
        pass
    return where


class _ErasedUser(Exception):
    """The record belongs to an erased user (sent at or before the erasure): dropped."""


# What the mask needs of a record: message_id, sent_at, user_id, device_type, ip (canonical),
# ip_is_valid, device_id (canonical), app_version (text), its number, locale. The compiled
# core's parser returns the same tuple (streams_core.parse_logins).
_Fields = tuple[str, int, str, str, str, bool, str, str, int | None, str | None]


def _fields(envelope: dict, login: tuple[str, str, str, str, str, str | None]) -> _Fields:
    user_id, device_type, ip_text, device_id, app_version, locale = login
    ip_canonical, ip_is_valid = canonical_ip(ip_text)
    return (
        envelope["message_id"],
        envelope["sent_at"],
        user_id,
        device_type,
        ip_canonical,
        ip_is_valid,
        canonical_device_id(device_id),
        app_version,
        encode_app_version(app_version),
        locale,
    )


def _masked_datum(
    fields: _Fields, masked_ip: str, masked_device_id: str, ip_ciphertext: str, device_ciphertext: str
) -> dict:
    """The masked record (schemas/masked_login), the same for the reference and the core."""
    message_id, sent_at, user_id, device_type, _, ip_is_valid, _, app_version, app_number, locale = fields
    return {
        "message_id": message_id,
        "sent_at": sent_at,
        "user_id": user_id,
        "device_type": device_type,
        "locale": locale,
        "app_version_raw": app_version,
        "app_version": app_number,
        "masked_ip": masked_ip,
        "masked_device_id": masked_device_id,
        "ip_ciphertext": ip_ciphertext,
        "device_id_ciphertext": device_ciphertext,
        "ip_is_valid": ip_is_valid,
        "ip_sealed": None,
        "device_id_sealed": None,
    }


# Datum arguments the core's record encoder is checked on when loaded (mask_core.RecordEncoder):
# ASCII and not, nulls and not, each union branch, a long text, an extreme timestamp.
_PROBE_FIELDS: list[_Fields] = [
    ("m-1", 1_764_000_000_000, "u-1", "ios", "10.0.0.1", True, "d-1", "1.2.3", 10203, None),
    ("é-✓", -1, "ü" * 90, "android", "::1", False, "", "", None, "en-GB"),
    ("m" * 128, 2**62, "u", "web", "x" * 300, False, "d" * 500, "9" * 40, 0, ""),
]
_MASKED_PROBES = [
    (fields, f"h1.{i}", "h1." + "z" * 43 * i, "k1.b." + "y" * 200 * i, "") for i, fields in enumerate(_PROBE_FIELDS)
]
_SEALED_PROBES = [
    (fields, (f"h1.{i}", bytes(range(i * 100)), "h1." + "z" * i, b"\xff" * i)) for i, fields in enumerate(_PROBE_FIELDS)
]


class MaskTransform:
    """Raw records in, outputs out. ``batch`` masks with the compiled core when there is
    one (``use_core``, see streams/privacy/core.py); ``__call__``, one record at a time, is
    the Python reference, and also the path of every record the core declines."""

    def __init__(
        self, masker: Masker, codecs: Codecs, erased: ErasedUsers | None = None, use_core: bool = True
    ) -> None:
        self.masker = masker
        self.codecs = codecs
        self._hold_ledger(erased)
        cache_clear = getattr(masker.mask, "cache_clear", None)
        if cache_clear is not None:  # an erasure drops the plaintext cache (it may hold the user's values)
            self.erased.on_change.append(lambda _users: cache_clear())
        self._decode = codecs.raw.decode_millis
        self._encode = codecs.masked.encode
        self._mask_value = masker.mask
        core = mask_core.load(masker, raw=codecs.raw) if use_core else None
        self._encoder = (
            mask_core.load_record_encoder(codecs.masked, _masked_datum, _MASKED_PROBES, Output) if core else None
        )
        self.core = core if self._encoder is not None else None  # parse, mask and encode, or none of it
        self.core_masked = 0  # records masked by the core, and those it declined (the reference's)
        self.core_declined = 0

    def _hold_ledger(self, erased: ErasedUsers | None) -> None:
        self.erased = erased if erased is not None else ErasedUsers()  # the erasure ledger (streams.privacy.ledger)
        self._erased_at = self.erased.at  # the same dict: an empty one costs one truth test per record

    def __call__(self, key: bytes | None, value: bytes | None, where: str) -> Output:
        """Turn one consumed raw record into its output. Never raises.

        The dead letter of a record whose envelope cannot be read is named by its Kafka
        key, else by ``where``; the key is only decoded then, not for every record.
        """
        message_id = None
        envelope: dict | None = None
        try:
            if not value:
                raise Rejected(Reason.EMPTY_RECORD, "the record has no value (a tombstone or an empty record)")
            try:
                envelope = self._decode(value)  # sent_at stays epoch milliseconds: it is copied as it is
            except UnknownSchemaError as exc:
                raise Rejected(Reason.UNKNOWN_SCHEMA, str(exc)) from None
            except CodecError as exc:
                raise Rejected(Reason.UNDECODABLE_RECORD, str(exc)) from None
            message_id = envelope["message_id"]
            if not 0 < len(message_id) <= MAX_MESSAGE_ID:
                raise Rejected(Reason.INVALID_MESSAGE_ID, f"message id must be 1 to {MAX_MESSAGE_ID} characters")
            return Output(message_id.encode("utf-8"), self._encode(self._mask(envelope)))
        except _ErasedUser:
            return Output((message_id or "").encode("utf-8"), b"", ERASED)
        except Rejected as rejected:
            if self.erased and envelope is not None and self._erased_body(envelope):
                return Output((message_id or "").encode("utf-8", "replace"), b"", ERASED)  # before any dead letter
            return self._dead(_fallback_id(key, where) if message_id is None else message_id, rejected, value)
        except Exception as exc:  # a bug must not stop the stream; the type name carries no PII
            if self.erased and envelope is not None and self._erased_body(envelope):
                return Output((message_id or "").encode("utf-8", "replace"), b"", ERASED)
            bug = Rejected(Reason.PROCESSING_ERROR, type(exc).__name__)
            return self._dead(_fallback_id(key, where) if message_id is None else message_id, bug, value)

    def batch(self, messages: Sequence[tuple[bytes | None, bytes | None, str]]) -> list[Output]:
        """Outputs of a batch of ``(key, value, where)``, in order, byte for byte the reference's."""
        if self.core is None:
            return [self(key, value, where) for key, value, where in messages]
        return self._core_batch(messages, self.core)

    def _core_batch(
        self, messages: Sequence[tuple[bytes | None, bytes | None, str]], core: mask_core.CoreMasker
    ) -> list[Output]:
        """Parse the batch in the core, mask it in one core call per field, then encode.

        A record the core's parser declines is parsed by the reference's functions here;
        one that does not parse cleanly even so (a dead letter) and any value the core's
        crypto declines go through ``__call__``, the reference, which decides it.
        """
        outputs, ready, declined = self._core_parsed(messages, core)
        if ready:
            ip_tokens, ip_ciphertexts = core.mask("ip", [fields[4] for _, fields in ready])
            device_tokens, device_ciphertexts = core.mask("device_id", [fields[6] for _, fields in ready])
            masked = [ip_tokens, device_tokens, ip_ciphertexts, device_ciphertexts]
            declined += self._place(messages, outputs, ready, masked)
        self._count_core(len(messages), declined)
        return outputs  # type: ignore[return-value]  # every position is filled above

    def _place(self, messages, outputs, ready, masked: list[list]) -> int:
        """Encode the records of ``ready`` in the core (the datum's columns: their fields, then
        ``masked``, what masking made of each) into ``outputs``; one it declines (``None``)
        goes through ``__call__``, the reference, which decides it. Returns the records declined."""
        assert self._encoder is not None  # loaded with the core: no core without it
        results, declined = self._encoder.encode([[fields for _, fields in ready], *masked], len(ready))
        if not declined and len(results) == len(outputs):  # the usual batch: every record masked
            outputs[:] = results
            return 0
        for (position, _), out in zip(ready, results, strict=True):
            if out is None:
                key, value, where = messages[position]
                out = self(key, value, where)
            outputs[position] = out
        return declined

    def _core_parsed(
        self, messages: Sequence[tuple[bytes | None, bytes | None, str]], core
    ) -> tuple[list[Output | None], list[tuple[int, _Fields]], int]:
        """The core's parse of a batch: ``(outputs, ready, declined)``.

        ``ready`` holds ``(position, fields)`` of the records to mask, in record order; every
        other position of ``outputs`` is already the reference's output (a record that does
        not parse: a dead letter; an erased user's record: dropped, before any masking). A
        record the core's parser declines is parsed by the reference's functions and counted.
        """
        outputs: list[Output | None] = []
        ready: list[tuple[int, _Fields]] = []
        declined = 0
        for (key, value, where), fields in zip(messages, core.parse([value for _, value, _ in messages]), strict=True):
            if fields is None:
                declined += 1
                try:
                    fields = self._parse(value)
                except Exception:  # what it is (a dead letter, a bug) is the reference's to say
                    outputs.append(self(key, value, where))
                    continue
            if self._erased_at and self.erased.erased(fields[2], fields[1]):
                outputs.append(self(key, value, where))  # the reference drops an erased user's record
                continue
            ready.append((len(outputs), fields))
            outputs.append(None)
        return outputs, ready, declined

    def _count_core(self, records: int, declined: int) -> None:
        self.core_masked += records - declined
        if declined:
            self.core_declined += declined
            metrics.MASK_CORE_DECLINED.inc(declined)

    def _parse(self, value: bytes | None) -> _Fields:
        """The reference's reading of a record that yields a masked record, else it raises."""
        envelope = self._decode(value)
        message_id = envelope["message_id"]
        if not 0 < len(message_id) <= MAX_MESSAGE_ID:
            raise ValueError("invalid message id")
        return _fields(envelope, _login_values(envelope["body"]))

    def _mask(self, envelope: dict) -> dict:
        fields = _fields(envelope, _login_values(envelope["body"]))
        if self._erased_at and self.erased.erased(fields[2], fields[1]):
            raise _ErasedUser
        ip = self._mask_value("ip", fields[4])
        device = self._mask_value("device_id", fields[6])
        return _masked_datum(fields, ip.token, device.token, ip.ciphertext, device.ciphertext)

    def _erased_body(self, envelope: dict) -> bool:
        """Whether a refused record's body still names an erased user (then no plaintext copy goes to the DLQ)."""
        return self.erased.erased(body_user_id(envelope.get("body")), envelope.get("sent_at", 0))

    def _dead(self, message_id: str, rejected: Rejected, payload: bytes | None) -> Output:
        datum = dead_letter(message_id, STAGE, rejected, payload)
        return Output(
            datum["message_id"].encode("utf-8", "replace"), self.codecs.dead_letter.encode(datum), rejected.reason.value
        )


def _sealed_datum(fields: _Fields, masked: tuple[str, bytes, str, bytes]) -> dict:
    """The masked record of per-user key mode (masked schema v3: sealed bytes, no recovery
    text), from ``(ip token, ip sealed, device token, device sealed)``, the same for the
    reference and the core."""
    ip_token, ip_sealed, device_token, device_sealed = masked
    datum = _masked_datum(fields, ip_token, device_token, "", "")
    datum["ip_sealed"] = ip_sealed
    datum["device_id_sealed"] = device_sealed
    return datum


class SealingMaskTransform(MaskTransform):
    """Per-user key mode: tokens from KMS-made join keys, values sealed under the user's data
    key (Avro ``bytes``, masked schema v3); the worker holds no key that opens older values.

    New data keys queue on ``masker.lifetime``; the mask stage stores them before the Kafka
    transaction that carries the records sealed under them commits (``user_keys.KeyStore``).
    ``batch`` seals with the compiled core when there is one (``mask_core.SealingCore``);
    ``__call__`` is the reference, and the path of every record the core declines.
    """

    core: mask_core.SealingCore | None  # the per-user key mode's core

    def __init__(
        self, masker: UserMasker, codecs: Codecs, erased: ErasedUsers | None = None, use_core: bool = True
    ) -> None:
        self.masker = masker  # type: ignore[assignment]
        self.codecs = codecs
        self._hold_ledger(erased)  # an erasure's key forgetting is wired by the app (KeyStore.forget)
        cache_clear = getattr(masker.token, "cache_clear", None)
        if cache_clear is not None:  # an erasure drops the token cache (keyed by the user's plaintext values)
            self.erased.on_change.append(lambda _users: cache_clear())
        self._decode = codecs.raw.decode_millis
        self._encode = codecs.masked.encode
        self._seal = masker.mask_login
        self._lifetime = masker.lifetime
        core = mask_core.load_sealing(masker, raw=codecs.raw) if use_core else None
        self._encoder = (
            mask_core.load_record_encoder(codecs.masked, _sealed_datum, _SEALED_PROBES, Output) if core else None
        )
        self.core = core if self._encoder is not None else None
        self.core_masked = self.core_declined = 0

    def _mask(self, envelope: dict) -> dict:
        fields = _fields(envelope, _login_values(envelope["body"]))
        if self._erased_at and self.erased.erased(fields[2], fields[1]):
            raise _ErasedUser  # before a data key is made for the user
        return _sealed_datum(fields, self._seal(fields[2], fields[4], fields[6]))

    def batch(self, messages: Sequence[tuple[bytes | None, bytes | None, str]]) -> list[Output]:
        """Outputs of a batch of ``(key, value, where)``, in order, byte for byte the reference's.

        With the core: the batch is parsed in the core (a declined record by the reference's
        functions), each record's user key is looked up (made and queued for the key store
        on first use) in record order, as the reference does, after the erasure check (an
        erased user's record is dropped by the reference before any key is made), and the
        whole batch is sealed in one core call. A record that does not parse, and any the
        core's crypto declines, goes through ``__call__``, the reference.
        """
        core = self.core
        if core is None:
            return [self(key, value, where) for key, value, where in messages]
        outputs, parsed, declined = self._core_parsed(messages, core)
        keyed = self._keys_in_bulk(parsed)
        ready, keys, index, key_ids = keyed if keyed is not None else self._keys_one_by_one(messages, outputs, parsed)
        if ready:
            sealed = core.seal(
                keys, index, key_ids, [f[2] for _, f in ready], [f[4] for _, f in ready], [f[6] for _, f in ready]
            )
            declined += self._place(messages, outputs, ready, [sealed])
        self._count_core(len(messages), declined)
        return outputs  # type: ignore[return-value]  # every position is filled above

    def _keys_in_bulk(self, parsed: list[tuple[int, _Fields]]):
        """``(ready, keys, index, key ids)`` of the parsed records: the batch's distinct data
        keys and each record's index into them, the keys of users met for the first time made
        in one ``Lifetime.new_keys`` call (in record order, as the reference makes them).
        ``None`` when they do not all fit the current lifetime (or a user id has no UTF-8
        form): ``_keys_one_by_one`` then."""
        lifetime = self._lifetime
        known = lifetime.known
        keys: list[bytes | None] = []
        slot_of: dict[str, int] = {}  # user -> its index in keys
        index: list[int] = []
        new_users: list[str] = []
        new_slots: list[int] = []
        for _, fields in parsed:
            user = fields[2]
            at = slot_of.get(user)
            if at is None:
                at = slot_of[user] = len(keys)
                data_key = known(user)
                if data_key is None:
                    new_users.append(user)
                    new_slots.append(at)
                keys.append(data_key)
            index.append(at)
        if new_users:
            made = lifetime.new_keys(new_users)
            if made is None:
                return None
            for at, data_key in zip(new_slots, made, strict=True):
                keys[at] = data_key
        return parsed, keys, index, [lifetime.key_id] * len(parsed)

    def _keys_one_by_one(self, messages, outputs: list[Output | None], parsed: list[tuple[int, _Fields]]):
        """``_keys_in_bulk``, one record at a time: a lifetime may end (a new KMS call) or a
        record go to the reference (its user id refused, the KMS call failed) mid-batch."""
        ready: list[tuple[int, _Fields]] = []
        keys: list[bytes] = []  # the batch's distinct data keys; index[i] is login i's
        key_index: dict[bytes, int] = {}
        index: list[int] = []
        key_ids: list[bytes] = []
        lifetime = self._lifetime
        known, new_key, key_id = lifetime.known, lifetime.new_key, lifetime.key_id
        for position, fields in parsed:  # in record order, after the erasure check, as the reference
            data_key = known(fields[2])
            if data_key is None:
                try:
                    data_key = new_key(fields[2])
                except Exception:  # a new lifetime's KMS call failed: the reference decides, as for any record
                    key, value, where = messages[position]
                    outputs[position] = self(key, value, where)
                    key_id = lifetime.key_id
                    continue
                key_id = lifetime.key_id  # a full lifetime gives way to a new one
            at = key_index.get(data_key)
            if at is None:
                at = key_index[data_key] = len(keys)
                keys.append(data_key)
            index.append(at)
            key_ids.append(key_id)
            ready.append((position, fields))
        return ready, keys, index, key_ids
