"""Key rotation jobs over the database, batched so each batch is one short transaction.

Both jobs are safe to interrupt (a batch either commits whole or not at all) and to rerun
(they only pick up what is still old). Neither needs the raw topic: everything is
recomputed from ``pii_vault`` with the encryption key.

- ``reencrypt``: vault rows under a non-active encryption key id, or in the older
  ciphertext format not bound to the token, are opened and sealed again under the
  active key, bound to their token.
- ``rejoin``: the join-key rotation. For each old-version vault row it decrypts the
  value, computes the new version's token, adds the new vault row (a new ciphertext
  bound to the new token, under the active key) and an old->new entry
  in ``join_token_map``; it then rewrites ``user_logins`` in keyset batches from that
  map, switches the key file so new writes use the new version, and repeats until no
  old-version token is left. Workers that still run with the old keyring keep writing
  old tokens; the final check holds a table lock, so it either sees them (and does
  another round) or they arrive after it (with their own vault row, and the next
  ``streams keys rejoin`` converts them). Only then are old vault rows deleted.

Lock order: every transaction that writes more than one of these tables takes their
locks in the order ``LOCK_ORDER`` (the rotation's final lock, the sink's merge and its
row-by-row fallback), so none waits in a cycle. A deadlock (SQLSTATE 40P01) with some
other writer is still possible in principle; the final step then gives up its round and
tries again, like a lock that was not granted in time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import asyncpg

from streams.errors import Refused
from streams.privacy.masking import BOUND, Masker, MissingKeyError, RevealError, ciphertext_key_id

LOCK_ORDER = ("user_logins", "pii_vault", "sealed_values", "join_token_map")


class Progress:
    """A one-line text progress bar on stderr (no dependency, fine in CI logs)."""

    def __init__(self, label: str, total: int, stream=sys.stderr) -> None:
        self.label, self.total, self.done, self.stream = label, max(total, 0), 0, stream

    def advance(self, n: int) -> None:
        self.done += n
        width = 30
        filled = width if not self.total else min(width, width * self.done // self.total)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _open(masker: Masker, field: str, ciphertext: str, token: str) -> str:
    """The value of one vault row, checked against its token where that join version is loaded.

    Opens both ciphertext formats (rotation moves older, unbound ones to the token-bound
    one). A value that does not belong to its token (a ciphertext copied under another
    token) stops the job: carrying it on would bind the wrong person to that token.
    """
    key_id = ciphertext_key_id(ciphertext)
    try:
        value = masker.decrypt(field, ciphertext, token)
    except RevealError as exc:
        raise Refused(f"a {field} vault row under key id {key_id!r} does not open ({exc}): restore that key") from None
    try:
        belongs = masker.belongs(field, token, value)
    except MissingKeyError:  # an old join version already removed: the encryption key is all we need
        belongs = True
    if not belongs:
        raise Refused(
            f"a {field} vault row under key id {key_id!r} holds a value that does not belong to its token"
            " (copied or tampered): investigate pii_vault before rotating"
        )
    return value


# --- encryption key ---------------------------------------------------------------

# Another key id than the active one ($1), or the older format without the token in its
# associated data (``<key id>.<body>``: no ``v2`` marker in the second part).
_STALE = f"key_id <> $1 OR split_part(ciphertext, '.', 2) <> '{BOUND}'"


async def reencrypt(
    conn: asyncpg.Connection, masker: Masker, batch_size: int, max_batches: int | None = None, out=sys.stderr
) -> int:
    """Move vault rows to the active key id and the token-bound format; returns how many rows it moved."""
    active = masker.keyring.encryption_key_id
    total = await conn.fetchval(f"SELECT count(*) FROM pii_vault WHERE {_STALE}", active)
    progress, moved, batches, last = Progress(f"re-encrypting to {active}", total, out), 0, 0, ("", "")
    while max_batches is None or batches < max_batches:
        async with conn.transaction():
            rows = await conn.fetch(  # keyset walk along the primary key: linear, not quadratic
                f"SELECT field, token, ciphertext FROM pii_vault WHERE ({_STALE}) AND (field, token) > ($3, $4)"
                " ORDER BY field, token LIMIT $2 FOR UPDATE",
                active,
                batch_size,
                *last,
            )
            if not rows:
                break
            last = (rows[-1]["field"], rows[-1]["token"])
            sealed = [
                masker.encrypt(r["field"], _open(masker, r["field"], r["ciphertext"], r["token"]), r["token"])
                for r in rows
            ]
            await conn.execute(
                "UPDATE pii_vault v SET key_id = $1, ciphertext = n.ciphertext"
                " FROM unnest($2::text[], $3::text[], $4::text[]) AS n(field, token, ciphertext)"
                " WHERE v.field = n.field AND v.token = n.token",
                active,
                [r["field"] for r in rows],
                [r["token"] for r in rows],
                sealed,
            )
        moved += len(rows)
        batches += 1
        progress.advance(len(rows))
    progress.close()
    return moved


async def key_in_use(conn: asyncpg.Connection, key_id: str) -> int:
    return await conn.fetchval("SELECT count(*) FROM pii_vault WHERE key_id = $1", key_id)


# --- join key -----------------------------------------------------------------------

_OLD_LOGINS = "split_part(masked_ip, '.', 1) <> $1 OR split_part(masked_device_id, '.', 1) <> $1"


class Budget:
    """How many batches a run may still do (``--max-batches``, for staged or test runs)."""

    def __init__(self, max_batches: int | None) -> None:
        self.left = max_batches

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def map_vault(
    conn: asyncpg.Connection, masker: Masker, target: str, batch_size: int, budget: Budget, out
) -> bool:
    """Add target-version vault rows and old->new map entries; False if the budget ran out."""
    pending = """FROM pii_vault v WHERE split_part(v.token, '.', 1) <> $1 AND NOT EXISTS
        (SELECT 1 FROM join_token_map m WHERE m.field = v.field AND m.old_token = v.token)"""
    progress = Progress(f"mapping vault to {target}", await conn.fetchval(f"SELECT count(*) {pending}", target), out)
    last = ("", "")
    try:
        while True:
            rows = await conn.fetch(
                f"SELECT v.field, v.token, v.key_id, v.ciphertext {pending} AND (v.field, v.token) > ($3, $4)"
                " ORDER BY v.field, v.token LIMIT $2",
                target,
                batch_size,
                *last,
            )
            if not rows:
                return True
            if not budget.take():
                return False
            last = (rows[-1]["field"], rows[-1]["token"])
            values = [_open(masker, r["field"], r["ciphertext"], r["token"]) for r in rows]
            fields = [r["field"] for r in rows]
            new = [masker.token(f, v, target) for f, v in zip(fields, values, strict=True)]
            # The new row gets a ciphertext of its own, bound to its new token (active key).
            sealed = [masker.encrypt(f, v, t) for f, v, t in zip(fields, values, new, strict=True)]
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO pii_vault (field, token, key_id, ciphertext)"
                    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING",
                    fields,
                    new,
                    [masker.keyring.encryption_key_id] * len(rows),
                    sealed,
                )
                await conn.execute(
                    "INSERT INTO join_token_map (field, old_token, new_token)"
                    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
                    fields,
                    [r["token"] for r in rows],
                    new,
                )
            progress.advance(len(rows))
    finally:
        progress.close()


_REWRITE = f"""
WITH batch AS (
    SELECT message_id FROM user_logins WHERE message_id > $2 ORDER BY message_id LIMIT $3 FOR UPDATE
), changed AS (
    UPDATE user_logins u SET
        masked_ip = coalesce((SELECT m.new_token FROM join_token_map m
                              WHERE m.field = 'ip' AND m.old_token = u.masked_ip), u.masked_ip),
        masked_device_id = coalesce((SELECT m.new_token FROM join_token_map m
                                     WHERE m.field = 'device_id' AND m.old_token = u.masked_device_id), u.masked_device_id)
    FROM batch b
    WHERE u.message_id = b.message_id AND ({_OLD_LOGINS.replace("masked_", "u.masked_")})
    RETURNING 1
)
SELECT (SELECT max(message_id) FROM batch) AS last, (SELECT count(*) FROM changed) AS changed
"""


async def rewrite_logins(conn: asyncpg.Connection, target: str, batch_size: int, budget: Budget, out) -> bool:
    """Rewrite user_logins tokens through the map, in message_id order; False if the budget ran out."""
    progress = Progress(
        f"rewriting user_logins to {target}", await conn.fetchval("SELECT count(*) FROM user_logins"), out
    )
    last = ""
    try:
        while True:
            if not budget.take():
                return False
            async with conn.transaction():
                row = await conn.fetchrow(_REWRITE, target, last, batch_size)
            if row["last"] is None:
                return True
            last = row["last"]
            progress.advance(min(batch_size, progress.total - progress.done))
    finally:
        progress.close()


async def finish(conn: asyncpg.Connection, target: str, lock_timeout: float = 5.0) -> int | None:
    """Under a write lock: if no old token is left in user_logins, drop old vault rows and the map.

    Returns how many user_logins rows still hold old tokens (0 means finished), or None
    when the lock was not granted within ``lock_timeout`` seconds or PostgreSQL broke a
    deadlock by aborting this transaction (busy writers: a transient state, tried again
    next round, never a silent hang nor a crash).
    """
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
            await conn.execute(f"LOCK TABLE {', '.join(LOCK_ORDER)} IN SHARE ROW EXCLUSIVE MODE")
            left = await conn.fetchval(f"SELECT count(*) FROM user_logins WHERE {_OLD_LOGINS}", target)
            if left:
                return left
            await conn.execute("DELETE FROM pii_vault WHERE split_part(token, '.', 1) <> $1", target)
            await conn.execute("DELETE FROM join_token_map")
            return 0
    except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
        return None


async def rejoin(
    conn: asyncpg.Connection,
    masker: Masker,
    target: str,
    switch: Callable[[], None],
    *,
    batch_size: int,
    max_batches: int | None = None,
    rounds: int = 10,
    wait: float = 2.0,
    out=sys.stderr,
) -> bool:
    """Rotate every table to join version ``target``; False if stopped early by ``max_batches``.

    ``switch`` makes ``target`` the active version for new writes (edits the key file);
    it runs after the first full rewrite, and is idempotent.
    """
    budget = Budget(max_batches)
    for _round_no in range(rounds):
        if not await map_vault(conn, masker, target, batch_size, budget, out):
            return False
        if not await rewrite_logins(conn, target, batch_size, budget, out):
            return False
        switch()
        left = await finish(conn, target)
        if left == 0:
            return True
        if left is None:
            print("the tables are busy (lock not granted in time, or a deadlock broken); another round", file=out)
        else:
            print(f"{left} rows still hold old join tokens (workers not restarted yet?); another round", file=out)
        await asyncio.sleep(wait)
    raise Refused(
        f"rows with old join tokens keep arriving: restart every worker so it loads {target}, then rerun `streams keys rejoin`"
    )
