"""The sink stage: masked records in, rows in PostgreSQL (or dead letters) out.

``SinkStage.plan`` is the pure part: decode a batch, keep the rows, dead-letter what
cannot be decoded. ``PostgresSink`` is the writer: one transaction per batch, and the
row-error rules (which refusals are the row's fault, not the database's).

A batch is written in one transaction. The usual batch, whose keys are all new, is
COPYed (binary) straight into ``user_logins`` and ``pii_vault`` (or ``sealed_values``),
blind: the same statements as a bare COPY. A key already there fails that COPY (unique
violation); it is rolled back and the batch looked up instead, and the sink goes on
looking batches up until they stop meeting written keys (``CopyMode``: at start, during a
replay, while vault tokens repeat). A looked-up batch: one statement deletes the
tombstoned rows and finds the batch's keys already written (``PROBE``); if no message id
is among them, the rows and the vault rows not found are COPYed; else the batch is COPYed
into two session-private staging tables and merged by one ``INSERT ... ON CONFLICT``
statement, so is any batch whose COPY met a key another worker committed meanwhile. A row
that is already identical is not touched at all, so a replay leaves the table
byte-for-byte as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from operator import itemgetter

import asyncpg

from streams.errors import Rejected
from streams.io.codec import CodecError, Codecs, UnknownSchemaError
from streams.io.postgres import connect
from streams.pipeline.dead_letters import MAX_MESSAGE_ID, Reason, dead_letter
from streams.privacy.ledger import ErasedUsers, millis

log = logging.getLogger(__name__)

STAGE = "sink"
# SQLSTATE classes 22 (data exception), 23 (integrity) and 54 (program limit exceeded,
# e.g. a key too long for its index): retrying cannot fix the row.
ROW_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)
# The connection is gone or hung: drop it, and the batch is retried on a new one.
CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError)

Message = tuple[bytes | None, bytes | None, str]  # key, value (None: a tombstone), topic/partition/offset
DeadLetter = tuple[bytes, bytes, str]  # key, encoded dead letter, reason code


@dataclass
class SinkBatch:
    """A batch planned for the database: rows to write, and dead letters already known."""

    rows: list[dict] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)  # message ids whose tombstone came last
    payloads: dict[str, bytes] = field(default_factory=dict)  # message id -> consumed bytes
    dead: list[DeadLetter] = field(default_factory=list)


class SinkStage:
    """The sink's pure part: what to write and what to dead-letter, no I/O."""

    def __init__(self, codecs: Codecs, erased: ErasedUsers | None = None) -> None:
        self.codecs = codecs
        self.erased = erased if erased is not None else ErasedUsers()  # the erasure ledger (streams.privacy.ledger)

    def plan(self, messages: Sequence[Message]) -> SinkBatch:
        """Rows to upsert and ids to delete (the last record per message id wins), and dead letters.

        A tombstone (null value) on the compacted masked topic deletes its key's row; one
        without a key deletes nothing and is dead-lettered.
        """
        batch = SinkBatch()
        last: dict[str, dict | None] = {}
        for key, value, where in messages:
            message_id = (key or where.encode()).decode("utf-8", "replace")
            if value is None and key:
                if len(message_id) <= MAX_MESSAGE_ID:
                    last.pop(message_id, None)
                    last[message_id] = None
                continue
            try:
                if value is None:
                    raise Rejected(Reason.EMPTY_RECORD, "a tombstone without a key deletes nothing")
                try:
                    row: dict | None = self.codecs.masked.decode(value)
                except UnknownSchemaError as exc:
                    raise Rejected(Reason.UNKNOWN_SCHEMA, str(exc)) from None
                except CodecError as exc:
                    raise Rejected(Reason.UNDECODABLE_RECORD, str(exc)) from None
                assert row is not None
                message_id = row["message_id"]
                if not 0 < len(message_id) <= MAX_MESSAGE_ID:
                    raise Rejected(Reason.INVALID_MESSAGE_ID, f"message id must be 1 to {MAX_MESSAGE_ID} characters")
            except Rejected as rejected:
                batch.dead.append(self._dead(message_id, rejected, value))
                continue
            if self.erased and self.erased.erased(row["user_id"], millis(row["sent_at"])):
                row = None  # an erased user's record: its row is deleted, never written (nor dead-lettered)
            last.pop(message_id, None)
            last[message_id] = row
            if row is not None:
                batch.payloads[message_id] = value
        for message_id, row in last.items():
            if row is None:
                batch.deletes.append(message_id)
            else:
                batch.rows.append(row)
        return batch

    def refused(self, batch: SinkBatch, refused: list[tuple[dict, str]]) -> list[DeadLetter]:
        """Dead letters for the rows the database refused, with the SQLSTATE as detail."""
        return [
            self._dead(
                row["message_id"],
                Rejected(Reason.REJECTED_BY_DATABASE, f"SQLSTATE {sqlstate}"),
                batch.payloads[row["message_id"]],
            )
            for row, sqlstate in refused
        ]

    def _dead(self, message_id: str, rejected: Rejected, payload: bytes | None) -> DeadLetter:
        datum = dead_letter(message_id, STAGE, rejected, payload)
        return datum["message_id"].encode("utf-8", "replace"), self.codecs.dead_letter.encode(datum), datum["reason"]


_COLUMNS = (
    "message_id",
    "user_id",
    "device_type",
    "masked_ip",
    "masked_device_id",
    "locale",
    "app_version",
    "create_date",
    "app_version_raw",
    "sent_at",
    "ip_is_valid",
)
_TYPES = ("text", "text", "text", "text", "text", "text", "int4", "date", "text", "timestamptz", "bool")

UPSERT = f"""
WITH vault AS (
    INSERT INTO pii_vault (user_id, field, token, key_id, ciphertext)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
    ON CONFLICT (field, token, user_id) DO NOTHING
)
INSERT INTO user_logins ({", ".join(_COLUMNS)})
SELECT * FROM unnest({", ".join(f"${i + 6}::{t}[]" for i, t in enumerate(_TYPES))})
ON CONFLICT (message_id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS[1:])}
WHERE ({", ".join(f"user_logins.{c}" for c in _COLUMNS[1:])})
    IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in _COLUMNS[1:])})
"""


# The tables in streams.privacy.rotation.LOCK_ORDER: every transaction of ``write`` takes
# user_logins before anything writes pii_vault (a blind COPY writes user_logins first; a
# looked-up one runs PROBE first, whose DELETE takes it); the fallback takes them explicitly.
LOCK_WRITES = "LOCK TABLE user_logins, pii_vault, sealed_values IN ROW EXCLUSIVE MODE"


def upsert_arguments(records: list[dict]) -> list[list]:
    """Column arrays for ``UPSERT``; duplicates within the batch collapse to the last one."""
    vault, rows = staged_rows(records)
    columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in _COLUMNS]
    users, fields, tokens, key_ids, ciphertexts = (
        (list(c) for c in zip(*vault, strict=True)) if vault else ([], [], [], [], [])
    )
    return [users, fields, tokens, key_ids, ciphertexts, *columns]


def staged_rows(records: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """``(vault rows, user_logins rows)`` as tuples in column order, each key once (the last wins).

    Vault rows are ``(user_id, field, token, key_id, ciphertext)``, one per distinct user
    and token (erasure deletes one user's entries, migration 0006); login rows follow ``_COLUMNS``.
    """
    latest = {r["message_id"]: r for r in records}
    vault: dict[tuple[str, str, str], str] = {}
    rows = []
    utc = UTC
    for r in latest.values():
        if r["ip_ciphertext"]:  # per-user key mode writes sealed values instead (``sealed_rows``)
            user = r["user_id"]
            vault[(user, "ip", r["masked_ip"])] = r["ip_ciphertext"]
            vault[(user, "device_id", r["masked_device_id"])] = r["device_id_ciphertext"]
        sent = r["sent_at"]
        day = sent.date() if sent.tzinfo is utc else sent.astimezone(utc).date()  # decoded: UTC already
        rows.append(
            (
                r["message_id"],
                r["user_id"],
                r["device_type"],
                r["masked_ip"],
                r["masked_device_id"],
                r["locale"],
                r["app_version"],
                day,
                r["app_version_raw"],
                sent,
                r["ip_is_valid"],
            )
        )
    return [(u, f, t, c.partition(".")[0], c) for (u, f, t), c in vault.items()], rows


_SEALED_COLUMNS = ("message_id", "user_id", "masked_ip", "masked_device_id", "ip_sealed", "device_id_sealed")


def sealed_records(records: list[dict]) -> list[tuple]:
    """The per-user sealed values of a batch (masked schema v3) as tuples in ``_SEALED_COLUMNS`` order, each id once."""
    latest = {r["message_id"]: r for r in records if r.get("ip_sealed") is not None}
    return [
        (m, r["user_id"], r["masked_ip"], r["masked_device_id"], r["ip_sealed"], r["device_id_sealed"])
        for m, r in latest.items()
    ]


def _arrays(rows: list[tuple]) -> list[list]:
    """Column arrays of non-empty rows (the arguments of an ``unnest`` statement)."""
    return [list(c) for c in zip(*rows, strict=True)]


def sealed_rows(records: list[dict]) -> list[list]:
    """Column arrays for ``ADD_SEALED``: the per-user sealed values of a batch (masked schema v3)."""
    rows = sealed_records(records)
    return _arrays(rows) if rows else []


# Sealed values are added, never rewritten: the worker role may INSERT, not UPDATE, so the
# first sealed value of a message id stays (reveal by message id trusts only this table).
ADD_SEALED = """
INSERT INTO sealed_values (message_id, user_id, masked_ip, masked_device_id, ip_sealed, device_id_sealed)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bytea[])
ON CONFLICT (message_id) DO NOTHING
"""


# COPY targets: session-private, emptied at every commit or rollback, typed like the real
# tables (CREATE TABLE AS copies the column types, not the constraints: a refused value
# is refused by the INSERT below with the same SQLSTATE class as before).
_VAULT_COLUMNS = ("user_id", "field", "token", "key_id", "ciphertext")
STAGE_VAULT, STAGE_LOGINS = "streams_stage_vault", "streams_stage_logins"
CREATE_STAGES = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGE_VAULT} ON COMMIT DELETE ROWS AS
    SELECT {", ".join(_VAULT_COLUMNS)} FROM pii_vault WITH NO DATA;
CREATE TEMP TABLE IF NOT EXISTS {STAGE_LOGINS} ON COMMIT DELETE ROWS AS
    SELECT {", ".join(_COLUMNS)} FROM user_logins WITH NO DATA;
"""
# The first statement of every batch: delete the tombstoned rows ($1), then the keys of
# the batch already in the tables: ('', '', message_id) for logins ($2), (user_id, field,
# token) for vault rows ($3 ip tokens, $4 device id tokens). Deletes and upserts never share a key
# (``plan``). The worker may read only pii_vault's key columns, which is all this reads.
PROBE = """
WITH deleted AS (
    DELETE FROM user_logins WHERE message_id = ANY($1::text[])
)
SELECT '' AS user_id, '' AS field, message_id AS token FROM user_logins WHERE message_id = ANY($2::text[])
UNION ALL
SELECT user_id, field, token FROM pii_vault WHERE field = 'ip' AND token = ANY($3::text[])
UNION ALL
SELECT user_id, field, token FROM pii_vault WHERE field = 'device_id' AND token = ANY($4::text[])
"""
# From the staged rows: the vault rows, then the upsert that leaves an identical row untouched.
MERGE_STAGED = f"""
WITH vault AS (
    INSERT INTO pii_vault ({", ".join(_VAULT_COLUMNS)})
    SELECT {", ".join(_VAULT_COLUMNS)} FROM {STAGE_VAULT}
    ON CONFLICT (field, token, user_id) DO NOTHING
)
INSERT INTO user_logins ({", ".join(_COLUMNS)})
SELECT {", ".join(_COLUMNS)} FROM {STAGE_LOGINS}
ON CONFLICT (message_id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS[1:])}
WHERE ({", ".join(f"user_logins.{c}" for c in _COLUMNS[1:])})
    IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in _COLUMNS[1:])})
"""


# asyncpg prepares every statement, and after five runs PostgreSQL may keep a generic
# plan; one made while the tables were nearly empty scanned all of user_logins for every
# batch until autovacuum analyzed it. Every statement of the sink finds its rows by key
# (the staging tables, which have no index, are read whole anyway), so its session never
# picks a sequential scan when an index serves. (A fresh plan per run instead,
# plan_cache_mode=force_custom_plan, costs milliseconds a batch: the arrays of keys.)
SESSION = {"enable_seqscan": "off"}


class CopyMode:
    """Whether the sink COPYs a batch blind, without looking its keys up first.

    The lookup (``PROBE``) costs an index lookup per key and a round trip; a batch of new
    keys, the usual one, does not need it. The sink looks keys up while batches meet keys
    already written (at start, since a restart replays its last batch; during a replay;
    while tokens repeat) and COPYs blind once ``needed`` lookups in a row found nothing.
    A blind COPY that meets a written key is rolled back and the batch looked up: each
    such miss doubles the clean lookups needed before the next blind one (up to
    ``MAX_NEEDED``), and a blind COPY that succeeds resets it.
    """

    MAX_NEEDED = 64

    def __init__(self) -> None:
        self.needed = 1
        self.clean = 0  # lookups in a row that found nothing

    @property
    def blind(self) -> bool:
        return self.clean >= self.needed

    def looked_up(self, found: bool) -> None:
        self.clean = 0 if found else self.clean + 1

    def copied(self) -> None:
        self.needed = 1

    def missed(self) -> None:
        self.clean = 0
        self.needed = min(self.needed * 2, self.MAX_NEEDED)


DELETE = "DELETE FROM user_logins WHERE message_id = ANY($1::text[])"
_VAULT_ORDER = itemgetter(1, 2, 0)  # (field, token, user_id): pii_vault's primary key


class PostgresSink:
    """A single connection is enough: a few statements per batch, batches in sequence."""

    def __init__(self, dsn: str, command_timeout: float = 30.0) -> None:
        self.dsn = dsn
        self.command_timeout = command_timeout  # a half-open connection fails, it does not hang
        self._conn: asyncpg.Connection | None = None
        self._staged: asyncpg.Connection | None = None  # the connection whose staging tables exist
        self.mode = CopyMode()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.dsn, command_timeout=self.command_timeout, server_settings=SESSION)
        return self._conn

    async def write(self, records: list[dict], deletes: Sequence[str] = ()) -> None:
        """Upsert ``records`` and delete the rows of ``deletes`` in one transaction.

        New rows are COPYed (binary) into the tables themselves, blind or after a lookup
        (``CopyMode``); a batch with a row already written goes through the staging
        tables and ``MERGE_STAGED``. The transaction commits before this returns.
        """
        conn = await self._connection()
        try:
            if self._staged is not conn:
                await conn.execute(CREATE_STAGES)
                self._staged = conn
            vault, rows = staged_rows(records)
            # In key order, so two workers adding the same new tokens do not deadlock each other.
            vault.sort(key=_VAULT_ORDER)
            sealed = sealed_records(records)
            if self.mode.blind:
                try:
                    async with conn.transaction():
                        await self._copy_blind(conn, vault, rows, sealed, deletes)
                    self.mode.copied()
                    return
                except asyncpg.UniqueViolationError:  # a key is written already: look the batch up
                    self.mode.missed()
            try:
                async with conn.transaction():
                    found = await self._copy_new(conn, vault, rows, deletes)
                    if found is None:
                        await self._merge(conn, vault, rows)
                    if sealed:
                        await conn.execute(ADD_SEALED, *_arrays(sealed))
                self.mode.looked_up(bool(found is None or found))
            except asyncpg.UniqueViolationError:
                # Another worker committed one of these keys after the lookup: merge instead.
                self.mode.looked_up(True)
                async with conn.transaction():
                    await conn.execute(PROBE, list(deletes), [], [], [])
                    await self._merge(conn, vault, rows)
                    if sealed:
                        await conn.execute(ADD_SEALED, *_arrays(sealed))
        except CONNECTION_ERRORS:
            await self.close()
            raise

    @staticmethod
    async def _copy_blind(
        conn: asyncpg.Connection, vault: list[tuple], rows: list[tuple], sealed: list[tuple], deletes: Sequence[str]
    ) -> None:
        """Delete the tombstoned rows, COPY everything: a key already there fails it (unique violation).

        user_logins first, then pii_vault: ``streams.privacy.rotation.LOCK_ORDER``.
        """
        if deletes:
            await conn.execute(DELETE, list(deletes))
        if rows:
            await conn.copy_records_to_table("user_logins", records=rows, columns=_COLUMNS)
        if vault:
            await conn.copy_records_to_table("pii_vault", records=vault, columns=_VAULT_COLUMNS)
        if sealed:
            await conn.copy_records_to_table("sealed_values", records=sealed, columns=_SEALED_COLUMNS)

    @staticmethod
    async def _merge(conn: asyncpg.Connection, vault: list[tuple], rows: list[tuple]) -> None:
        if rows:
            await conn.copy_records_to_table(STAGE_VAULT, records=vault, columns=_VAULT_COLUMNS)
            await conn.copy_records_to_table(STAGE_LOGINS, records=rows, columns=_COLUMNS)
            await conn.execute(MERGE_STAGED)

    @staticmethod
    async def _copy_new(
        conn: asyncpg.Connection, vault: list[tuple], rows: list[tuple], deletes: Sequence[str]
    ) -> set[tuple[str, str, str]] | None:
        """Delete the tombstoned rows; COPY the batch if none of its message ids is written yet.

        Returns the vault keys found (empty: nothing was there), or None: a message id is
        there already, and the batch is left for ``_merge``.
        """
        ip_tokens = [v[2] for v in vault if v[1] == "ip"]
        device_tokens = [v[2] for v in vault if v[1] == "device_id"]
        found = await conn.fetch(PROBE, list(deletes), [r[0] for r in rows], ip_tokens, device_tokens)
        known = {(u, f, t) for u, f, t in found}
        if any(f == "" for _, f, _ in known):
            return None
        new_vault = [v for v in vault if (v[0], v[1], v[2]) not in known] if known else vault
        if new_vault:
            await conn.copy_records_to_table("pii_vault", records=new_vault, columns=_VAULT_COLUMNS)
        if rows:
            await conn.copy_records_to_table("user_logins", records=rows, columns=_COLUMNS)
        return known

    async def write_one(self, records: list[dict], deletes: Sequence[str] = ()) -> None:
        """``write`` by one ``UPSERT`` statement of column arrays (the row-by-row fallback).

        ``UPSERT`` would lock pii_vault before user_logins (its WITH comes first), the
        reverse of the rotation's final lock; so the transaction takes both, in
        ``LOCK_ORDER`` (user_logins, pii_vault), before it writes. ROW EXCLUSIVE is what
        the writes take anyway: it waits for nothing they would not have waited for.
        """
        conn = await self._connection()
        try:
            async with conn.transaction():
                await conn.execute(LOCK_WRITES)
                if deletes:
                    await conn.execute("DELETE FROM user_logins WHERE message_id = ANY($1::text[])", list(deletes))
                if records:
                    await conn.execute(UPSERT, *upsert_arguments(records))
                    sealed = sealed_rows(records)
                    if sealed:
                        await conn.execute(ADD_SEALED, *sealed)
        except CONNECTION_ERRORS:
            await self.close()
            raise

    async def write_batch(self, rows: list[dict], deletes: Sequence[str] = ()) -> list[tuple[dict, str]]:
        """Write the batch; if PostgreSQL refuses a row's data, write row by row and return the refused.

        Anything else (connection lost, timeout) propagates: the caller retries the batch.
        """
        try:
            await self.write(rows, deletes)
            return []
        except ROW_ERRORS:
            if deletes:
                await self.write_one([], deletes)
            refused = []
            for row in rows:
                try:
                    await self.write_one([row])
                except ROW_ERRORS as exc:
                    refused.append((row, exc.sqlstate))
            return refused

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()
