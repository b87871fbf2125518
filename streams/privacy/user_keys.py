"""Per-user data keys (issue 19 items 2-3): workers seal values, only audited paths open them.

Per-user key mode is on when ``STREAMS_KMS_MAC_KEY_ID`` names an HMAC_256 KMS key (beside
``STREAMS_KMS_KEY_ID``, the symmetric key). docs/privacy.md has the threat model.

- **Join keys**: ``kms:GenerateMac`` at start, one per join version and field, over
  ``"streams join key" NUL deployment NUL version NUL field``. Kept in memory only.
- **Lifetime key (KEK)**: each worker lifetime asks ``kms:GenerateDataKey`` (64 bytes,
  context ``{deployment, purpose: user-kek, key_id}``) once; only the KMS-wrapped form is
  stored (``key_lifetimes``). A lifetime also ends after ``MAX_USERS`` users, so the
  cache of per-user keys stays bounded.
- **Per-user data keys**: the first time a lifetime meets user U it draws a random
  AES-SIV key and queues it; when the mask stage takes the queue (``take``, once per
  batch) every new key is wrapped under the KEK (AES-SIV, bound to deployment, key id and
  U; the compiled core wraps them all in one call) and written to ``user_data_keys``
  before the Kafka transaction that uses them commits (one binary COPY per transaction, at
  the start of its commit). No KMS call and no database read per record.
- **Opening** (reveal, export --reveal, redrive; ``open_data_key``): only through a row of
  ``user_data_keys`` that is *sealed*: the data key wrapped by KMS itself under the
  context ``{deployment, purpose: user-key, user_id: U, key_id}``, so each ``kms:Decrypt``
  names the user whose data it opens. ``seal_user_keys`` (``streams keys seal``, the key
  custodian's right to unwrap lifetime keys) turns lifetime-wrapped rows into sealed ones
  and then drops the lifetime-wrapped copy.
- **Erasure**: ``erase_user_keys`` deletes U's rows: every value sealed under them is
  unreadable from any copy (crypto-shredding).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from streams.errors import Refused
from streams.privacy.keys import PII_FIELDS, KeyMaterialError
from streams.privacy.kms import Kms
from streams.privacy.masking import DATA_KEY_BYTES, KEY_ID_BYTES
from streams.settings import Settings

PURPOSE_JOIN = "join-key"
PURPOSE_KEK = "user-kek"
PURPOSE_USER = "user-key"
JOIN_LABEL = b"streams join key"
WRAP_LABEL = b"streams user key"
RANDOM_KEYS = 256  # data keys drawn from the OS per getrandom call
MAX_USERS = 262_144  # per lifetime: past it a new lifetime (one GenerateDataKey) starts with an empty cache


def split_mode(settings: Settings) -> bool:
    """Whether workers run without decrypt rights (per-user keys)."""
    return bool(settings.kms_key_id and settings.kms_mac_key_id)


def deployment(settings: Settings) -> str:
    return settings.deployment or settings.app_id


def kms_pair(settings: Settings) -> tuple[Kms, Kms]:
    """``(symmetric key, HMAC key)`` clients; refuses in one line without both ids."""
    if not split_mode(settings):
        raise KeyMaterialError(
            "per-user key mode needs STREAMS_KMS_KEY_ID (symmetric) and STREAMS_KMS_MAC_KEY_ID (HMAC_256)"
        )
    symmetric = Kms(settings)
    return symmetric, Kms(settings.model_copy(update={"kms_key_id": settings.kms_mac_key_id}), symmetric._client)


def join_keys(mac: Kms, deployment_name: str, version: str) -> dict[str, bytes]:
    """The join keys of ``version``, one per field, from kms:GenerateMac (never stored)."""
    arn = mac.arn()
    keys = {}
    for field in PII_FIELDS:
        message = b"\0".join((JOIN_LABEL, deployment_name.encode(), version.encode(), field.encode()))
        keys[field] = mac._call("generate_mac", KeyId=arn, Message=message, MacAlgorithm="HMAC_SHA_256")["Mac"]
    return keys


def kek_context(deployment_name: str, key_id: bytes) -> dict[str, str]:
    return {"deployment": deployment_name, "purpose": PURPOSE_KEK, "key_id": key_id.hex()}


def user_context(deployment_name: str, user_id: str, key_id: bytes) -> dict[str, str]:
    """The context of a sealed user key: every kms:Decrypt of it names the user."""
    return {"deployment": deployment_name, "purpose": PURPOSE_USER, "user_id": user_id, "key_id": key_id.hex()}


def wrap_ad(deployment_name: str, key_id: bytes, user_id: str) -> bytes:
    return b"\0".join((WRAP_LABEL, deployment_name.encode(), key_id, user_id.encode()))


class KeyWrapper(Protocol):
    """Wraps data keys under one lifetime key, one call for many (``core.KeyWrapping``):
    key i under the associated data ``prefix + users[i]`` (UTF-8), as ``wrap_ad`` makes it."""

    def wrap(self, keys: list[bytes], prefix: bytes, users: list[str]) -> list[bytes | None]: ...


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One new per-user data key, wrapped under its lifetime key: what ``user_data_keys`` stores."""

    user_id: str
    key_id: bytes
    wrapped_key: bytes


@dataclass(slots=True)
class KeyRows:
    """New per-user data keys, wrapped: the columns of ``user_data_keys`` rows, in the order
    the users were met. Columns, not a ``KeyRow`` per key: an object per new user is
    measurable on the mask stage's hot path when every login is a new user."""

    user_ids: list[str] = dataclasses.field(default_factory=list)
    key_ids: list[bytes] = dataclasses.field(default_factory=list)
    wrapped_keys: list[bytes] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.user_ids)

    def rows(self) -> list[KeyRow]:
        return [KeyRow(*r) for r in zip(self.user_ids, self.key_ids, self.wrapped_keys, strict=True)]

    def extend(self, other: KeyRows) -> None:
        self.user_ids.extend(other.user_ids)
        self.key_ids.extend(other.key_ids)
        self.wrapped_keys.extend(other.wrapped_keys)

    def without(self, user_id: str) -> KeyRows:
        """These rows but ``user_id``'s (erasure)."""
        if user_id not in self.user_ids:
            return self
        kept = [i for i, u in enumerate(self.user_ids) if u != user_id]
        return KeyRows(
            [self.user_ids[i] for i in kept], [self.key_ids[i] for i in kept], [self.wrapped_keys[i] for i in kept]
        )


class Lifetime:
    """This worker lifetime's key-encryption key and the per-user data keys it made.

    Holds the plaintext KEK and data keys in memory only (each data key as its bytes for
    the compiled core and, once the reference has sealed with it, as an AES-SIV object);
    the KMS-wrapped KEK and the wrapped data keys are what gets stored. ``random_bytes``
    (the OS's by default) draws key ids and data keys; a test gives a seeded one to get
    the same keys twice.

    Every key in ``known`` belongs to the current lifetime (``key_id``): a new lifetime
    starts with it empty. A new user costs a slice of the random buffer, two appends and
    one dict entry (no tuple, no associated data: ``take`` builds those), the hot path of
    the mask stage when every login is a new user.

    New data keys are wrapped under the KEK when they are taken for the key store
    (``take``, once per batch), all at once: with ``wrapping`` (``core.load_key_wrapping()``:
    the compiled core, the KEK's key schedule set once per lifetime) in one call, else one
    AES-SIV call each (the reference). AES-SIV is deterministic: both give the same bytes.
    """

    def __init__(
        self,
        kms: Kms,
        deployment_name: str,
        max_users: int = MAX_USERS,
        random_bytes: Callable[[int], bytes] = os.urandom,
        wrapping: Callable[[bytes], KeyWrapper] | None = None,
    ) -> None:
        self._kms = kms
        self.deployment = deployment_name
        self.max_users = max_users
        self._random_bytes = random_bytes
        self._wrapping = wrapping
        self.pending = KeyRows()  # wrapped, not taken yet
        # This lifetime's new keys, not wrapped yet: users and their data keys, in the order made.
        self._new_users: list[str] = []
        self._new_keys: list[bytes] = []
        self.new_lifetimes: list[tuple[bytes, bytes]] = []  # (key id, KMS-wrapped KEK) not yet stored
        self._keys: dict[str, bytes] = {}  # user -> data key, this lifetime's (emptied, never replaced)
        self.known = self._keys.get  # user -> data key of this lifetime, or None
        self._start()

    def _start(self) -> None:
        self._wrap_new()  # the ending lifetime's new keys, under its own KEK
        self.key_id = self._random_bytes(KEY_ID_BYTES)
        made = self._kms._call(
            "generate_data_key",
            KeyId=self._kms.arn(),
            NumberOfBytes=DATA_KEY_BYTES,
            EncryptionContext=kek_context(self.deployment, self.key_id),
        )
        self._kek = AESSIV(made["Plaintext"])
        self._kek_core = self._wrapping(made["Plaintext"]) if self._wrapping is not None else None
        self._wrap_prefix = wrap_ad(self.deployment, self.key_id, "")  # + the user id: ``wrap_ad``
        self.new_lifetimes.append((self.key_id, made["CiphertextBlob"]))
        self._keys.clear()  # the same dict: ``known`` stays bound to it
        self._sivs: dict[str, AESSIV] = {}  # user -> AES-SIV object of its data key, made when the reference seals
        self._random, self._random_at = b"", 0

    def data_key(self, user_id: str) -> tuple[bytes, AESSIV]:
        """``(key id, AES-SIV)`` of ``user_id`` in this lifetime: made and queued on first use."""
        key_id, key = self.raw_key(user_id)
        siv = self._sivs.get(user_id)
        if siv is None:  # the AES-SIV object (3 µs to make) only when the reference seals
            siv = self._sivs[user_id] = AESSIV(key)
        return key_id, siv

    def raw_key(self, user_id: str) -> tuple[bytes, bytes]:
        """``(key id, data key bytes)`` of ``user_id``, for the compiled core (which sets its own
        key schedule): the same key ``data_key`` gives, made and queued on first use the same way."""
        key = self._keys.get(user_id)
        if key is None:
            key = self.new_key(user_id)
        return self.key_id, key

    def new_key(self, user_id: str) -> bytes:
        """Make and queue the data key of a user not ``known`` yet; its id is ``key_id`` read
        after this call (a new lifetime starts when this one is full)."""
        if len(self._keys) >= self.max_users:
            self._start()
        if not user_id.isascii():
            user_id.encode()  # a user id with no UTF-8 form is refused here, before any queueing
        at = self._random_at
        if at >= len(self._random):  # one getrandom call per RANDOM_KEYS keys
            self._random, at = self._random_bytes(DATA_KEY_BYTES * RANDOM_KEYS), 0
        key = self._random[at : at + DATA_KEY_BYTES]
        self._random_at = at + DATA_KEY_BYTES
        self._new_users.append(user_id)  # wrapped at take()
        self._new_keys.append(key)
        self._keys[user_id] = key
        return key

    def new_keys(self, users: list[str]) -> list[bytes] | None:
        """``new_key`` of each of ``users`` (distinct, none ``known``), in order, in bulk: the
        same keys from the same random stream, without a call per user. ``None`` (nothing
        made) when they do not all fit this lifetime or one has no UTF-8 form: then
        ``new_key``, one at a time, decides."""
        if len(self._keys) + len(users) > self.max_users:
            return None
        if not "".join(users).isascii():
            try:
                for user_id in users:
                    user_id.encode()
            except UnicodeEncodeError:
                return None
        keys: list[bytes] = []
        buffer, at, size = self._random, self._random_at, DATA_KEY_BYTES
        need = len(users)
        while need:
            fits = (len(buffer) - at) // size
            if at >= len(buffer) or not fits:  # one getrandom call per RANDOM_KEYS keys, as new_key draws
                buffer, at = self._random_bytes(size * RANDOM_KEYS), 0
                fits = len(buffer) // size
            take = min(need, fits)
            keys += [buffer[i : i + size] for i in range(at, at + take * size, size)]
            at += take * size
            need -= take
        self._random, self._random_at = buffer, at
        self._keys.update(zip(users, keys, strict=True))
        self._new_users += users
        self._new_keys += keys
        return keys

    def _wrap_new(self) -> None:
        """Wrap this lifetime's new data keys under its KEK, in the order made, into ``pending``."""
        users, keys = self._new_users, self._new_keys
        if not users:
            return
        self._new_users, self._new_keys = [], []
        kek, prefix = self._kek, self._wrap_prefix
        if self._kek_core is None:
            wrapped = [kek.encrypt(key, [prefix + user.encode()]) for key, user in zip(keys, users, strict=True)]
        else:
            wrapped = [  # a key the core declines (none it was built for) is wrapped by the reference
                w if w is not None else kek.encrypt(key, [prefix + user.encode()])
                for w, key, user in zip(self._kek_core.wrap(keys, prefix, users), keys, users, strict=True)
            ]
        self.pending.extend(KeyRows(users, [self.key_id] * len(users), wrapped))

    def take(self) -> tuple[list[tuple[bytes, bytes]], KeyRows]:
        """The lifetimes and key rows to store now (each handed out once)."""
        self._wrap_new()
        lifetimes, rows = self.new_lifetimes, self.pending
        self.new_lifetimes, self.pending = [], KeyRows()
        return lifetimes, rows

    def forget(self, user_id: str) -> None:
        """Drop a user's data key from memory and from the rows not stored yet (erasure):
        the next record of the user makes a new one."""
        self._keys.pop(user_id, None)
        self._sivs.pop(user_id, None)
        if user_id in self._new_users:
            kept = [i for i, u in enumerate(self._new_users) if u != user_id]
            self._new_users = [self._new_users[i] for i in kept]
            self._new_keys = [self._new_keys[i] for i in kept]
        self.pending = self.pending.without(user_id)


# --- the key store ------------------------------------------------------------------

SAVE_LIFETIMES = """
INSERT INTO key_lifetimes (key_id, kek_blob)
SELECT * FROM unnest($1::text[], $2::bytea[])
"""
KEY_COLUMNS = ["user_id", "key_id", "wrapped_key"]
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\0"
_COPY_HEADER = _COPY_SIGNATURE + struct.pack(">ii", 0, 0)  # no OIDs, no header extension

CopyBinary = Callable[[list[list]], "bytes | None"]  # columns -> binary COPY stream, or None (declined)


def copy_binary(columns: list[list]) -> bytes | None:
    """PostgreSQL's binary COPY stream (``COPY ... FROM STDIN (FORMAT binary)``) of the rows
    whose columns are ``columns`` (``str`` items as UTF-8 ``text``, ``bytes`` as ``bytea``):
    the reference of ``streams_core.copy_binary``, which the key store uses when it is built
    (``core.load_copy_binary``). ``None`` where that declines (lists of different lengths,
    an item of another type, a ``str`` with no UTF-8 form)."""
    rows = len(columns[0]) if columns else 0
    if any(len(c) != rows for c in columns):
        return None
    parts = [_COPY_HEADER]
    count = struct.pack(">h", len(columns))
    for row in zip(*columns, strict=True):
        parts.append(count)
        for item in row:
            if isinstance(item, str):
                try:
                    item = item.encode("utf-8")
                except UnicodeEncodeError:
                    return None
            elif not isinstance(item, bytes):
                return None
            parts.append(struct.pack(">i", len(item)))
            parts.append(item)
    parts.append(struct.pack(">h", -1))
    return b"".join(parts)


async def save_keys(
    conn: asyncpg.Connection,
    lifetimes: list[tuple[bytes, bytes]],
    rows: KeyRows,
    encode: CopyBinary | None = None,
) -> None:
    """Store new lifetimes and key rows atomically (before the Kafka transaction that uses them commits).

    The rows go by binary COPY (one statement, atomic alone): about half the client CPU per
    row of an INSERT from unnest() of three arrays, on the mask stage's hot path when every
    login is a new user. With ``encode`` (the compiled core's ``copy_binary``) the COPY
    stream of all rows is one buffer made in one call, not a tuple per row encoded by the
    driver. A new lifetime (rare) joins them in one transaction.
    """
    if lifetimes:
        async with conn.transaction():
            await conn.execute(SAVE_LIFETIMES, [k.hex() for k, _ in lifetimes], [b for _, b in lifetimes])
            await _copy_rows(conn, rows, encode)
    else:
        await _copy_rows(conn, rows, encode)


async def _copy_rows(conn: asyncpg.Connection, rows: KeyRows, encode: CopyBinary | None) -> None:
    if not rows:
        return
    hexes = {k: k.hex() for k in set(rows.key_ids)}  # a handful of lifetimes for many rows
    key_ids = [hexes[k] for k in rows.key_ids]
    stream = encode([rows.user_ids, key_ids, rows.wrapped_keys]) if encode is not None else None
    if stream is not None:  # a memoryview: asyncpg would take bytes for a file name
        await conn.copy_to_table("user_data_keys", source=memoryview(stream), columns=KEY_COLUMNS, format="binary")
    else:
        await conn.copy_records_to_table(
            "user_data_keys", records=zip(rows.user_ids, key_ids, rows.wrapped_keys, strict=True), columns=KEY_COLUMNS
        )


async def erase_user_keys(conn: asyncpg.Connection, user_id: str) -> int:
    """Crypto-shred ``user_id``: delete every data key of the user; returns how many rows went.

    Every value sealed under them (table, topic, snapshot, dump) no longer opens. Idempotent.
    There is no key topic: the key store is this table (and its backups, see docs/privacy.md).
    """
    status = await conn.execute("DELETE FROM user_data_keys WHERE user_id = $1", user_id)
    return int(status.split()[-1])


class KeyErased(Refused):
    """No data key for that user and key id: erased (or never stored)."""


class Opener:
    """The decrypting side: opens per-user data keys through kms:Decrypt naming the user.

    Caches what it opened for this process only (a reveal, an export, a redrive run).
    """

    def __init__(self, kms: Kms, deployment_name: str) -> None:
        self.kms = kms
        self.deployment = deployment_name
        self._keys: dict[tuple[str, bytes], AESSIV] = {}
        self._keks: dict[bytes, AESSIV] = {}

    async def data_key(self, conn: asyncpg.Connection, user_id: str, key_id: bytes) -> AESSIV:
        found = self._keys.get((user_id, key_id))
        if found is not None:
            return found
        row = await conn.fetchrow(
            "SELECT sealed_key FROM user_data_keys WHERE user_id = $1 AND key_id = $2", user_id, key_id.hex()
        )
        if row is None:
            raise KeyErased("no data key for that user and key id: the user was erased (or the key never stored)")
        sealed = row["sealed_key"]
        if sealed is None:
            sealed = await self.seal(conn, user_id, key_id)
        opened = self.kms._call(
            "decrypt",
            CiphertextBlob=sealed,
            KeyId=self.kms.arn(),
            EncryptionContext=user_context(self.deployment, user_id, key_id),
        )
        found = self._keys[(user_id, key_id)] = AESSIV(opened["Plaintext"])
        return found

    async def seal(self, conn: asyncpg.Connection, user_id: str, key_id: bytes) -> bytes:
        """Re-wrap one lifetime-wrapped user key by KMS under the user's context; drop the lifetime copy.

        Needs the custodian's rights (kms:Decrypt of lifetime keys, kms:Encrypt); the
        lifetime-wrapped copy goes once sealed, so the lifetime key opens nothing more.
        """
        row = await conn.fetchrow(
            "SELECT u.wrapped_key, u.sealed_key, l.kek_blob FROM user_data_keys u"
            " JOIN key_lifetimes l USING (key_id) WHERE u.user_id = $1 AND u.key_id = $2",
            user_id,
            key_id.hex(),
        )
        if row is None:
            raise KeyErased("no data key for that user and key id: the user was erased (or the key never stored)")
        if row["sealed_key"] is not None:
            return row["sealed_key"]
        sealed = self.sealed_form(user_id, key_id, row["wrapped_key"], row["kek_blob"])
        if sealed is None:
            raise Refused("a user_data_keys row does not open under its lifetime key (moved or altered)")
        await conn.execute(_STORE_SEALED, [user_id], [key_id.hex()], [sealed])
        return sealed

    def forget_lifetime_keys(self) -> None:
        self._keks.clear()

    def sealed_form(self, user_id: str, key_id: bytes, wrapped: bytes, kek_blob: bytes) -> bytes | None:
        """The KMS-sealed form of one lifetime-wrapped key (None: it does not open under its lifetime key).

        The lifetime key is opened once per process (kms:Decrypt, purpose user-kek); each
        seal is one kms:Encrypt whose context names the user.
        """
        kek = self._keks.get(key_id)
        if kek is None:
            opened = self.kms._call(
                "decrypt",
                CiphertextBlob=kek_blob,
                KeyId=self.kms.arn(),
                EncryptionContext=kek_context(self.deployment, key_id),
            )
            kek = self._keks[key_id] = AESSIV(opened["Plaintext"])
        try:
            key = kek.decrypt(wrapped, [wrap_ad(self.deployment, key_id, user_id)])
        except InvalidTag:
            return None
        return self.kms._call(
            "encrypt",
            KeyId=self.kms.arn(),
            Plaintext=key,
            EncryptionContext=user_context(self.deployment, user_id, key_id),
        )["CiphertextBlob"]


# --- sealing on a schedule (`streams keys seal`) --------------------------------------------

SEAL_LOCK = 0x5345414C  # session advisory lock ("SEAL"): one `keys seal` run at a time per database

_UNSEALED = (
    "SELECT u.user_id, u.key_id, u.wrapped_key, l.kek_blob FROM user_data_keys u"
    " LEFT JOIN key_lifetimes l USING (key_id)"
    " WHERE u.sealed_key IS NULL AND (u.user_id, u.key_id) > ($1, $2)"
    " ORDER BY u.user_id, u.key_id LIMIT $3"
)
# Only a row still lifetime-wrapped takes the sealed form: a row sealed meanwhile (by a
# reveal's first open) keeps its own, and a row erased meanwhile stays gone.
_STORE_SEALED = (
    "UPDATE user_data_keys u SET sealed_key = n.sealed, wrapped_key = NULL"
    " FROM unnest($1::text[], $2::text[], $3::bytea[]) AS n(user_id, key_id, sealed)"
    " WHERE u.user_id = n.user_id AND u.key_id = n.key_id AND u.sealed_key IS NULL"
)


@dataclass(frozen=True, slots=True)
class SealRun:
    """What one ``streams keys seal`` run did."""

    sealed: int = 0  # rows this run moved from lifetime-wrapped to sealed
    unopenable: int = 0  # rows that do not open under their lifetime key, or whose lifetime row is gone
    left: int = 0  # rows still lifetime-wrapped when the run ended (``max_batches`` reached, or unopenable)
    locked: bool = False  # another run held the lock: this one did nothing


async def seal_user_keys(
    conn: asyncpg.Connection,
    opener: Opener,
    operator: str,
    batch_size: int = 500,
    max_batches: int | None = None,
) -> SealRun:
    """Seal lifetime-wrapped rows (``streams keys seal``), safe to run on a schedule.

    - **One run at a time**: a session advisory lock (``SEAL_LOCK``, released when the
      connection ends, also on a crash); a run that finds it held does nothing.
    - **Idempotent**: only rows still lifetime-wrapped are read and updated; a killed run
      loses at most its open batch's work, and the next run redoes it.
    - **Bounded**: ``batch_size`` rows per transaction, at most ``max_batches`` batches.
    - A row that does not open is counted and left as it is (keyset order: it never blocks
      the rows after it). Audited once per run that opens anything (action ``seal``).
    """
    from streams.privacy import audit

    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SEAL_LOCK):
        return SealRun(locked=True)
    try:
        sealed = unopenable = batches = 0
        after = ("", "")
        while max_batches is None or batches < max_batches:
            rows = await conn.fetch(_UNSEALED, *after, batch_size)
            if not rows:
                break
            if batches == 0:  # opens lifetime keys: audited before the first
                await audit.record(conn, operator, "bulk_open", reason="re-wrap user data keys by KMS", action="seal")
            batches += 1
            after = (rows[-1]["user_id"], rows[-1]["key_id"])
            done: tuple[list[str], list[str], list[bytes]] = ([], [], [])
            for r in rows:
                form = None
                if r["kek_blob"] is not None:
                    form = opener.sealed_form(r["user_id"], bytes.fromhex(r["key_id"]), r["wrapped_key"], r["kek_blob"])
                if form is None:
                    unopenable += 1
                    continue
                done[0].append(r["user_id"])
                done[1].append(r["key_id"])
                done[2].append(form)
            if done[0]:
                status = await conn.execute(_STORE_SEALED, *done)
                sealed += int(status.split()[-1])
        left = await conn.fetchval("SELECT count(*) FROM user_data_keys WHERE sealed_key IS NULL")
        return SealRun(sealed, unopenable, left)
    finally:
        opener.forget_lifetime_keys()  # a scheduled custodian holds no lifetime key between runs
        if not conn.is_closed():  # a lost connection has released it already
            await conn.execute("SELECT pg_advisory_unlock($1)", SEAL_LOCK)


class KeyStore:
    """The mask stage's writer of new lifetimes and key rows: one short write at the start of
    each Kafka transaction's commit (``MaskWriter.store_new_keys``), of every key made since the
    last. PostgreSQL down is transient (retried with backoff, the commit waits); nothing is
    read back."""

    def __init__(
        self, dsn: str, lifetime: Lifetime, command_timeout: float = 30.0, encode: CopyBinary | None = None
    ) -> None:
        self.dsn = dsn
        self.lifetime = lifetime
        self.command_timeout = command_timeout
        self.encode = encode  # the compiled core's COPY encoder (``core.load_copy_binary``), else the driver's
        self._conn: asyncpg.Connection | None = None
        self._unsaved: tuple[list[tuple[bytes, bytes]], KeyRows] = ([], KeyRows())

    async def flush(self) -> None:
        """Store what the lifetime made since the last flush (kept until it is stored)."""
        lifetimes, rows = self.lifetime.take()
        self._unsaved[0].extend(lifetimes)
        self._unsaved[1].extend(rows)
        if self._unsaved[0] or self._unsaved[1]:
            await self._save()

    async def _save(self) -> None:
        from streams.io.postgres import connect

        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect(self.dsn, command_timeout=self.command_timeout)
            await save_keys(self._conn, *self._unsaved, self.encode)
        except Exception:
            await self.close()
            raise
        self._unsaved = ([], KeyRows())

    def forget_users(self, user_ids: list[str]) -> None:
        """An erasure ledger change (``ErasedUsers.on_change``): forget each newly erased user."""
        for user_id in user_ids:
            self.forget(user_id)

    def forget(self, user_id: str) -> None:
        """Erasure: the user's key leaves memory and is never stored from here (call between batches)."""
        self.lifetime.forget(user_id)
        self._unsaved = (self._unsaved[0], self._unsaved[1].without(user_id))

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()


def worker_masker(settings: Settings):
    """``(UserMasker, Lifetime)`` for a mask worker: join keys and a lifetime key from KMS at start."""
    from streams.privacy.core import load_key_wrapping
    from streams.privacy.masking import UserMasker

    symmetric, mac = kms_pair(settings)
    name = deployment(settings)
    lifetime = Lifetime(symmetric, name, wrapping=load_key_wrapping())
    masker = UserMasker(
        join_keys(mac, name, settings.join_version), settings.join_version, lifetime, settings.mask_cache_size
    )
    return masker, lifetime


# --- join rotation in per-user key mode (a decrypting path, audited per user) -------------

_PENDING = (
    "SELECT message_id, user_id, masked_ip, masked_device_id, ip_sealed, device_id_sealed FROM sealed_values"
    " WHERE (split_part(masked_ip, '.', 1) <> $1 OR split_part(masked_device_id, '.', 1) <> $1)"
    " AND message_id > $2 ORDER BY message_id LIMIT $3"
)


async def rejoin_sealed(
    conn: asyncpg.Connection,
    opener: Opener,
    join: dict[str, bytes],
    target: str,
    operator: str,
    reason: str,
    batch_size: int = 500,
) -> tuple[int, int]:
    """Move every login to join version ``target``: ``(rows moved, rows skipped as erased)``.

    Each user's data key is opened through ``opener`` (kms:Decrypt naming the user) and
    audited once per user (action ``rejoin``) before any of their values is opened; the
    values are sealed again under the same user key, bound to their new tokens, and
    ``sealed_values`` and ``user_logins`` switch to the new tokens in one transaction per batch.
    """
    from streams.privacy import audit
    from streams.privacy.masking import UserMasker, open_value, split_sealed

    class _SameKey:
        """The user's own key, so re-sealing keeps the key id the row names."""

        key: tuple[bytes, AESSIV]

        def data_key(self, user_id: str) -> tuple[bytes, AESSIV]:
            return self.key

    same = _SameKey()
    masker = UserMasker(join, target, same, cache_size=0)
    audited: set[str] = set()
    moved = skipped = 0
    last = ""
    while True:
        rows = await conn.fetch(_PENDING, target, last, batch_size)
        if not rows:
            return moved, skipped
        last = rows[-1]["message_id"]
        updates = []
        for r in rows:
            user = r["user_id"]
            key_id, _ = split_sealed(r["ip_sealed"])
            if user not in audited:
                await audit.record(conn, operator, "bulk_open", reason=reason, action="rejoin", user_id=user)
                audited.add(user)
            try:
                key = await opener.data_key(conn, user, key_id)
            except KeyErased:
                skipped += 1
                continue
            ip = open_value(key, "ip", user, r["masked_ip"], r["ip_sealed"])
            device = open_value(key, "device_id", user, r["masked_device_id"], r["device_id_sealed"])
            same.key = (key_id, key)
            updates.append((r["message_id"], *masker.mask_login(user, ip, device)))
        if updates:
            columns = [list(c) for c in zip(*updates, strict=True)]
            async with conn.transaction():
                await conn.execute(
                    "UPDATE sealed_values s SET masked_ip = n.ip, ip_sealed = n.ip_sealed,"
                    " masked_device_id = n.device, device_id_sealed = n.device_sealed"
                    " FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[])"
                    " AS n(message_id, ip, ip_sealed, device, device_sealed) WHERE s.message_id = n.message_id",
                    *columns,
                )
                await conn.execute(
                    "UPDATE user_logins u SET masked_ip = n.ip, masked_device_id = n.device"
                    " FROM unnest($1::text[], $2::text[], $3::text[]) AS n(message_id, ip, device)"
                    " WHERE u.message_id = n.message_id",
                    columns[0],
                    columns[1],
                    columns[3],
                )
            moved += len(updates)
