"""Erasure by user (``streams erase``) and subject access (``streams export``).

The order of an erasure, each step idempotent, so a rerun after a crash (kill -9
anywhere) resumes the open ledger entry and reaches the same end state:

1. ``append``: the user goes into ``erasure_ledger`` (reason code, optional ticket; the
   database stamps the time and its session user). From here every stage drops the
   user's records sent at or before that time (``streams.privacy.ledger``). The same
   transaction records the sink group's committed offsets on the masked topic, read just
   before (step ``sink_offsets``): where step 5 starts reading.
2. ``confirm``: wait (bounded) until every live stage shows that ledger version in
   ``erasure_stage_versions``: it applied it at a transaction boundary and dropped its
   caches. A stage that does not confirm stops the erasure here, named in one line.
3. ``shred_key_material``: the user's data keys (``user_data_keys``, when the key store
   exists): what makes copies taken earlier (topic snapshots, dumps) unreadable.
4. ``delete``: the user's rows in ``user_logins`` and vault entries in ``pii_vault`` (one
   transaction). A value the user shares with another user stays in the other's entry.
   The deleted rows' message ids go to ``erasure_ids`` in that transaction, so a rerun
   after kill -9 tombstones the same ids.
5. ``tombstones``: a tombstone on ``logins.masked`` for every message id of the user there
   (read read_committed), so compaction removes them; then ``done`` forgets the ids.

Step 5 does not read the whole masked topic. Its ids are (a) the deleted rows' ids, (b) the
ids of the user's sink-stage dead letters (masked records PostgreSQL refused: no row) and
(c) the user's records on the masked topic from the offsets recorded at step 1 to the end.
Why that covers every record of the user: a record before those offsets was written by the
sink before the ledger held this entry, so it made a row (deleted and captured in step 4)
or a sink dead letter. Later ones (the sink drops them, or has not read them yet) are
read. Edge cases:

- the sink replayed backwards: it reads old records again and drops the user's; they lie
  before the recorded offsets and had made rows: nothing more to find (had it moved back
  before step 1, the offsets are lower: more is read, which is fine);
- no committed offset on a partition (a new sink group, a new partition): that partition
  is read from its beginning;
- a record already tombstoned (a rerun, an earlier erasure): its latest record in the read
  range is a tombstone, so no second one; an id whose latest record there is another
  user's is left alone, as before;
- what the bounded read cannot see, read the whole topic instead (``full_scan``,
  ``streams erase --full-scan``): the sink moved *forward* past records it never applied
  (``replay sink --to latest``), a sink dead letter older than the DLQ's retention, rows
  deleted by hand. A user already in the ledger (a new request after an earlier erasure)
  always gets the whole read: the sink dropped that user's re-produced records without
  a row. So does an entry begun before ``sink_offsets`` existed.

Each step's counts (and how many masked records step 5 read) go to ``erasure_steps``.

Nothing here prints or logs a value, a token or a key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from streams.errors import Refused
from streams.faults import fault_point
from streams.io.codec import CodecError, Codecs
from streams.io.kafka import read_topic, send_records
from streams.io.postgres import connect
from streams.privacy import audit
from streams.privacy.ledger import body_user_id, millis
from streams.retry import retry_forever
from streams.settings import Settings

log = logging.getLogger("streams.erasure")

T = TypeVar("T")

REASON = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
TICKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:#/-]{0,63}$")
LIVE_WINDOW = 30.0  # seconds: a stage whose heartbeat is older is not running (it reloads the ledger at start)
# PostgreSQL down, restarting (cannot_connect_now, admin_shutdown) or the connection lost: waited out.
DB_DOWN = (
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

KNOWN_LIMITS = (
    "key store backups: a backup of the key store taken before the erasure still holds the user's data keys"
    " until that backup's documented retention has passed",
    "raw topic and DLQ: they hold plaintext bodies until their retention expires (retention.ms + segment.ms);"
    " no stage copies them again for this user",
    "tokens stay keyed pseudonyms: user_logins rows of other users and earlier exports keep their tokens",
    "a value the user shares with another user stays revealable as that other user's",
)


@dataclass
class Entry:
    seq: int
    erased_at: datetime
    done: bool


@dataclass
class Held:
    """What is held about one user (counts, no values)."""

    rows: int = 0
    vault: dict[str, int] = field(default_factory=dict)  # field -> entries
    shared: int = 0  # vault entries whose value another user also holds
    data_keys: int | None = None  # None: no key store on this deployment
    masked_ids: list[str] = field(default_factory=list)
    dead_letters: int = 0
    ledger: list[dict] = field(default_factory=list)


def check_arguments(user_id: str, reason: str, ticket: str | None) -> None:
    if not user_id or len(user_id) > 128:
        raise Refused("--user-id must be 1 to 128 characters, as in user_logins.user_id")
    if not REASON.match(reason):
        raise Refused("--reason must be a code like gdpr_art17 (lower-case letters, digits, _; no free text)")
    if ticket is not None and not TICKET.match(ticket):
        raise Refused("--ticket must be a reference like JIRA-123 (letters, digits, . _ : # / -; no free text)")


async def _with_db(settings: Settings, job: Callable[[asyncpg.Connection], Awaitable[T]], what: str) -> T:
    """``job`` on a fresh connection; PostgreSQL down or dropping the connection is waited out."""

    async def attempt() -> T:
        conn = await connect(settings.pg_dsn.get_secret_value(), timeout=10.0, command_timeout=60.0)
        try:
            return await job(conn)
        finally:
            conn.terminate()

    return await retry_forever(attempt, what, log, settings.retry_max_backoff, retry_on=DB_DOWN, label="erasure")


def _db(settings: Settings, job: Callable[[asyncpg.Connection], Awaitable[T]], what: str) -> T:
    try:
        return asyncio.run(_with_db(settings, job, what))
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedTableError) as exc:
        raise Refused(
            f"PostgreSQL refused {what} ({type(exc).__name__}): migrate (`streams migrate`) and grant"
            " STREAMS_PG_DSN's role streams_eraser (erase) or streams_reveal (export)"
        ) from None


async def _step(conn: asyncpg.Connection, seq: int, step: str, detail: dict) -> None:
    await conn.execute(
        "INSERT INTO erasure_steps (seq, step, detail) VALUES ($1, $2, $3::jsonb) ON CONFLICT DO NOTHING",
        seq,
        step,
        json.dumps(detail),
    )


async def latest_entry(conn: asyncpg.Connection, user_id: str) -> Entry | None:
    row = await conn.fetchrow(
        "SELECT e.seq, e.erased_at, EXISTS (SELECT 1 FROM erasure_steps s WHERE s.seq = e.seq AND s.step = 'done')"
        " AS done FROM erasure_ledger e WHERE e.user_id = $1 ORDER BY e.seq DESC LIMIT 1",
        user_id,
    )
    return Entry(row["seq"], row["erased_at"], row["done"]) if row else None


async def append(conn: asyncpg.Connection, user_id: str, reason: str, ticket: str | None) -> Entry:
    row = await conn.fetchrow(
        "INSERT INTO erasure_ledger (user_id, reason, ticket, os_user) VALUES ($1, $2, $3, $4) RETURNING seq, erased_at",
        user_id,
        reason,
        ticket,
        _os_user(),
    )
    return Entry(row["seq"], row["erased_at"], False)


async def open_entry(
    conn: asyncpg.Connection,
    user_id: str,
    reason: str,
    ticket: str | None,
    new_request: bool,
    positions: dict[int, int] | None = None,
) -> tuple[Entry, str]:
    """The entry to work on, found or appended in one transaction under a per-user lock.

    Two concurrent runs for one user share one entry, and a retry after a connection lost
    mid-append finds the entry that did commit instead of appending a second one. An
    appended entry records ``positions`` (the sink's committed offsets, read before it) as
    step ``sink_offsets``; none for a user erased before (the tombstone step reads all).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('streams erase'), hashtext($1))", user_id)
        entry = await latest_entry(conn, user_id)
        if entry is None or (entry.done and new_request):
            appended = await append(conn, user_id, reason, ticket)
            first = entry is None  # a user erased before: the sink dropped re-produced records without a row
            partitions = {str(p): o for p, o in sorted(positions.items())} if first and positions else None
            await _step(conn, appended.seq, "sink_offsets", {"partitions": partitions})
            return appended, "append"
        return entry, "found"


async def scan_start(conn: asyncpg.Connection, seq: int) -> dict[int, int] | None:
    """Where the tombstone step reads from: the offsets recorded at append (None: the beginning)."""
    detail = await conn.fetchval("SELECT detail FROM erasure_steps WHERE seq = $1 AND step = 'sink_offsets'", seq)
    partitions = json.loads(detail).get("partitions") if detail else None
    return None if partitions is None else {int(p): int(o) for p, o in partitions.items()}


def _os_user() -> str | None:
    name = audit.os_user()
    return name if re.match(r"^[A-Za-z0-9._:@-]{1,64}$", name) else None


# --- what is held ---------------------------------------------------------------------


async def held_in_database(conn: asyncpg.Connection, user_id: str, until: datetime | None = None) -> Held:
    """Rows, vault entries (and how many are shared with another user), data keys, ledger entries."""
    held = Held()
    bound = "" if until is None else " AND sent_at <= $2"
    args: list[Any] = [user_id] if until is None else [user_id, until]
    held.rows = await conn.fetchval(f"SELECT count(*) FROM user_logins WHERE user_id = $1{bound}", *args)
    for r in await conn.fetch(
        "SELECT v.field, count(*) AS n, count(*) FILTER (WHERE EXISTS (SELECT 1 FROM pii_vault o"
        " WHERE o.field = v.field AND o.token = v.token AND o.user_id <> v.user_id)) AS shared"
        " FROM pii_vault v WHERE v.user_id = $1 GROUP BY v.field ORDER BY v.field",
        user_id,
    ):
        held.vault[r["field"]] = r["n"]
        held.shared += r["shared"]
    if await conn.fetchval("SELECT to_regclass('user_data_keys') IS NOT NULL"):
        held.data_keys = await conn.fetchval("SELECT count(*) FROM user_data_keys WHERE user_id = $1", user_id)
    held.ledger = [
        {"seq": r["seq"], "erased_at": r["erased_at"].isoformat(), "reason": r["reason"], "ticket": r["ticket"]}
        for r in await conn.fetch(
            "SELECT seq, erased_at, reason, ticket FROM erasure_ledger WHERE user_id = $1 ORDER BY seq", user_id
        )
    ]
    return held


def _latest(codecs: Codecs, records: list[tuple[bytes | None, bytes | None]]) -> dict[str, dict | None]:
    """Message id -> its latest masked record among ``records`` (None: a tombstone, or not a masked record)."""
    latest: dict[str, dict | None] = {}
    for key, value in records:
        if key is None:
            continue
        name = key.decode("utf-8", "replace")
        if value is None:
            latest[name] = None
            continue
        try:
            latest[name] = codecs.masked.decode(value)
        except CodecError:
            latest[name] = None  # not a masked record: not the user's as far as anyone can tell
    return latest


def _is_users(record: dict | None, user_id: str, until_ms: int | None) -> bool:
    return (
        record is not None
        and record["user_id"] == user_id
        and (until_ms is None or millis(record["sent_at"]) <= until_ms)
    )


def masked_ids(settings: Settings, codecs: Codecs, user_id: str, until_ms: int | None) -> list[str]:
    """Message ids whose latest record on the masked topic (read_committed) is this user's: the whole topic."""
    latest = _latest(codecs, read_topic(settings, settings.masked_topic, committed_only=True))
    return sorted(name for name, record in latest.items() if _is_users(record, user_id, until_ms))


def sink_positions(settings: Settings) -> dict[int, int]:
    """The sink group's committed offsets on the masked topic (a partition without one: its first offset)."""
    from streams.io.kafka import group_lag
    from streams.ops.topology import stage_group

    lag = group_lag(settings, [settings.masked_topic], stage_group(settings, "sink"))
    return {partition: committed for (_, partition), (committed, _) in lag.items()}


def _sink_positions_or_none(settings: Settings) -> dict[int, int] | None:
    """``sink_positions``, or None when Kafka does not answer now (the tombstone step then reads all)."""
    from confluent_kafka import KafkaException

    try:
        return sink_positions(settings)
    except KafkaException:
        return None


def tombstone_ids(
    settings: Settings,
    codecs: Codecs,
    user_id: str,
    until_ms: int,
    known: set[str],
    start: dict[int, int] | None,
) -> tuple[list[str], int]:
    """``(ids to tombstone, masked records read)``: ``known`` ids (deleted rows, sink dead
    letters) and the user's records from ``start`` (None: the whole topic), less ids whose
    latest record read is a tombstone already or another user's."""
    records = read_topic(settings, settings.masked_topic, committed_only=True, start=start or {})
    found = set(known)
    for name, record in _latest(codecs, records).items():
        if _is_users(record, user_id, until_ms):
            found.add(name)
        else:
            found.discard(name)
    return sorted(found), len(records)


def sink_dead_letter_ids(settings: Settings, codecs: Codecs, user_id: str, until_ms: int) -> set[str]:
    """Message ids of the user's sink-stage dead letters: masked records PostgreSQL refused (no row)."""
    from streams.ops.state import dead_letters

    return {
        d["message_id"]
        for d in dead_letters(settings)
        if d.get("stage") == "sink"
        and dead_letter_user(codecs, d) == user_id
        and dead_letter_sent_ms(codecs, d) <= until_ms
    }


def dead_letter_user(codecs: Codecs, letter: dict) -> str | None:
    """The user a dead letter's payload names, when it can be parsed (raw envelope or masked record)."""
    payload = letter.get("payload")
    if not payload or letter.get("payload_truncated"):
        return None
    try:
        if letter["stage"] == "sink":
            return codecs.masked.decode(payload).get("user_id")
        return body_user_id(codecs.raw.decode(payload).get("body"))
    except (CodecError, TypeError, ValueError):
        return None


def dead_letter_sent_ms(codecs: Codecs, letter: dict) -> int:
    try:
        return millis(codecs.masked.decode(letter["payload"])["sent_at"])
    except (CodecError, TypeError, ValueError, KeyError):
        pass
    try:
        return millis(codecs.raw.decode(letter["payload"])["sent_at"])
    except (CodecError, TypeError, ValueError, KeyError):
        return 0


def count_dead_letters(settings: Settings, codecs: Codecs, user_id: str) -> int:
    from streams.ops.state import dead_letters

    return sum(1 for d in dead_letters(settings) if dead_letter_user(codecs, d) == user_id)


# --- erase ----------------------------------------------------------------------------


async def stage_versions(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT instance, stage, version, extract(epoch FROM now() - seen_at)::float8 AS age"
        " FROM erasure_stage_versions WHERE seen_at > now() - make_interval(secs => $1) ORDER BY instance",
        LIVE_WINDOW,
    )


def wait_for_stages(settings: Settings, seq: int, wait: float, say: Callable[[str], None]) -> int:
    """Until every live stage confirmed ledger version ``seq``; how many did. Refused at the deadline."""
    deadline = time.monotonic() + wait
    while True:
        live = _db(settings, stage_versions, "reading the stages' ledger versions")
        behind = [r for r in live if r["version"] < seq]
        if not behind:
            say(
                f"confirm: {len(live)} running stage(s) hold ledger version {seq}"
                if live
                else "confirm: no stage is running (a stage loads the whole ledger at start)"
            )
            return len(live)
        if time.monotonic() >= deadline:
            names = ", ".join(f"{r['instance']} (at version {r['version']}, seen {r['age']:.0f} s ago)" for r in behind)
            raise Refused(
                f"{len(behind)} stage(s) did not confirm ledger version {seq} within {wait:.0f} s: {names}."
                " The user is in the ledger, nothing is deleted yet: rerun `streams erase` (it resumes) once they"
                " confirm, or stop them"
            )
        time.sleep(0.5)


async def shred_key_material(conn: asyncpg.Connection, user_id: str) -> int | None:
    """Delete the user's data keys from the key store; None when this deployment has no key store.

    The one place where crypto-shredding happens: ``user_data_keys`` is the key store of
    per-user data keys (issue 19 item 2). Without it, ciphertexts are under shared keys
    and copies taken earlier (snapshots, dumps) still open with them.
    """
    if not await conn.fetchval("SELECT to_regclass('user_data_keys') IS NOT NULL"):
        return None
    from streams.privacy.user_keys import erase_user_keys

    return await erase_user_keys(conn, user_id)


async def delete_rows(conn: asyncpg.Connection, seq: int, user_id: str, erased_at: datetime) -> tuple[int, int]:
    """The user's rows sent at or before the erasure (their ids kept in ``erasure_ids`` for the
    tombstone step), then every vault entry of theirs no remaining row uses."""
    async with conn.transaction():
        deleted = await conn.fetch(
            "DELETE FROM user_logins WHERE user_id = $1 AND sent_at <= $2 RETURNING message_id", user_id, erased_at
        )
        ids = [r["message_id"] for r in deleted]
        if ids:
            await conn.execute(
                "INSERT INTO erasure_ids (seq, message_id) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                seq,
                ids,
            )
        vault = await conn.execute(
            "DELETE FROM pii_vault v WHERE v.user_id = $1 AND NOT EXISTS (SELECT 1 FROM user_logins l"
            " WHERE l.user_id = $1 AND ((v.field = 'ip' AND l.masked_ip = v.token)"
            " OR (v.field = 'device_id' AND l.masked_device_id = v.token)))",
            user_id,
        )
        if await conn.fetchval("SELECT to_regclass('sealed_values') IS NOT NULL"):  # per-user key mode (0005)
            await conn.execute(
                "DELETE FROM sealed_values s WHERE s.user_id = $1 AND NOT EXISTS"
                " (SELECT 1 FROM user_logins l WHERE l.message_id = s.message_id)",
                user_id,
            )
    return len(ids), int(vault.split()[-1])


async def erased_ids(conn: asyncpg.Connection, seq: int) -> set[str]:
    return {r["message_id"] for r in await conn.fetch("SELECT message_id FROM erasure_ids WHERE seq = $1", seq)}


async def finish(conn: asyncpg.Connection, seq: int) -> None:
    """``done``, and the deleted ids are forgotten: no table keeps which message ids were the user's."""
    async with conn.transaction():
        await _step(conn, seq, "done", {})
        await conn.execute("DELETE FROM erasure_ids WHERE seq = $1", seq)


def erase(
    settings: Settings,
    user_id: str,
    reason: str,
    ticket: str | None = None,
    *,
    wait: float = 60.0,
    new_request: bool = False,
    full_scan: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Erase ``user_id`` (the order in the module docstring); returns the ledger entry's seq.

    ``full_scan``: the tombstone step reads the whole masked topic (see the module docstring).
    """
    check_arguments(user_id, reason, ticket)
    positions = _sink_positions_or_none(settings)  # before the entry exists: every record before them made a row
    entry, how = _db(
        settings, lambda c: open_entry(c, user_id, reason, ticket, new_request, positions), "the erasure ledger"
    )
    if how == "append":
        say(f"append: ledger entry {entry.seq} at {entry.erased_at.isoformat()}")
    elif entry.done:
        say(f"already erased (ledger entry {entry.seq}); checking every step again")
    else:
        say(f"resuming ledger entry {entry.seq} of {entry.erased_at.isoformat()}")
    seq, erased_at = entry.seq, entry.erased_at
    fault_point("erase_after_append")

    stages = wait_for_stages(settings, seq, wait, say)
    _db(settings, lambda c: _step(c, seq, "confirmed", {"stages": stages}), "recording a step")
    fault_point("erase_after_confirm")

    keys = _db(settings, lambda c: shred_key_material(c, user_id), "deleting data keys")
    if keys is None:
        say("shred_key_material: no key store (user_data_keys) on this deployment: nothing shredded")
    elif keys == 0:
        say("shred_key_material: no data keys of this user (keyring mode: values are under the shared keyring)")
    else:
        say(f"shred_key_material: deleted {keys} data key(s)")
    _db(settings, lambda c: _step(c, seq, "keys", {"deleted": keys}), "recording a step")

    rows, vault = _db(settings, lambda c: delete_rows(c, seq, user_id, erased_at), "deleting rows")
    say(f"delete: {rows} row(s) of user_logins, {vault} pii_vault entr{'y' if vault == 1 else 'ies'}")
    _db(settings, lambda c: _step(c, seq, "rows", {"rows": rows, "vault": vault}), "recording a step")
    fault_point("erase_after_delete")

    codecs, until = Codecs.from_settings(settings), millis(erased_at)
    start = None if full_scan else _db(settings, lambda c: scan_start(c, seq), "reading the recorded offsets")
    deleted = _db(settings, lambda c: erased_ids(c, seq), "reading the deleted ids")
    letters = sink_dead_letter_ids(settings, codecs, user_id, until)
    ids, scanned = tombstone_ids(settings, codecs, user_id, until, deleted | letters, start)
    if ids:
        send_records(settings, [(settings.masked_topic, i.encode("utf-8"), None) for i in ids])
    where = "the whole topic" if start is None else "from the sink's offsets at append"
    say(f"tombstones: {len(ids)} on {settings.masked_topic} ({scanned} masked record(s) read, {where})")
    detail = {"count": len(ids), "scanned": scanned, "full_scan": start is None, "rows": len(deleted)}
    _db(settings, lambda c: _step(c, seq, "tombstones", detail), "recording a step")
    _db(settings, lambda c: finish(c, seq), "recording a step")
    say(f"erased: ledger entry {seq} done")
    return seq


def dry_run(
    settings: Settings, user_id: str, reason: str, ticket: str | None, say: Callable[[str], None] = print
) -> None:
    """What an erasure would remove, and what it cannot: nothing is changed."""
    check_arguments(user_id, reason, ticket)
    codecs = Codecs.from_settings(settings)
    held = _db(settings, lambda c: held_in_database(c, user_id), "reading what is held")
    ids = masked_ids(settings, codecs, user_id, None)
    say(f"would append {user_id!r} to the erasure ledger (reason {reason}{', ticket ' + ticket if ticket else ''})")
    if held.ledger:
        say(f"  already in the ledger: {len(held.ledger)} entr{'y' if len(held.ledger) == 1 else 'ies'}")
    if held.data_keys is None:
        say("would shred no data keys: no key store (user_data_keys) on this deployment")
    else:
        say(f"would shred {held.data_keys} data key(s) (user_data_keys)")
    say(f"would delete {held.rows} row(s) of user_logins")
    entries = ", ".join(f"{n} {f}" for f, n in held.vault.items()) or "none"
    say(f"would delete pii_vault entries: {entries} ({held.shared} of them shared with another user)")
    say(f"would write {len(ids)} tombstone(s) on {settings.masked_topic}")
    say(
        f"dead letters naming the user in {settings.dlq_topic}: {count_dead_letters(settings, codecs, user_id)}"
        " (plaintext, kept until the DLQ's retention; redrive drops them)"
    )
    say("known limits:")
    for limit in KNOWN_LIMITS:
        say(f"  - {limit}")


# --- export ---------------------------------------------------------------------------


async def _logins(conn: asyncpg.Connection, user_id: str) -> list[dict]:
    return [
        {
            "message_id": r["message_id"],
            "sent_at": r["sent_at"].isoformat(),
            "device_type": r["device_type"],
            "locale": r["locale"],
            "app_version_raw": r["app_version_raw"],
            "masked_ip": r["masked_ip"],
            "masked_device_id": r["masked_device_id"],
        }
        for r in await conn.fetch(
            "SELECT message_id, sent_at, device_type, locale, app_version_raw, masked_ip, masked_device_id"
            " FROM user_logins WHERE user_id = $1 ORDER BY sent_at, message_id",
            user_id,
        )
    ]


async def _vault(conn: asyncpg.Connection, user_id: str, with_ciphertext: bool) -> list[dict]:
    extra = ", ciphertext" if with_ciphertext else ""
    return [
        dict(r)
        for r in await conn.fetch(
            f"SELECT field, token, key_id{extra} FROM pii_vault WHERE user_id = $1 ORDER BY field, token", user_id
        )
    ]


def export(
    settings: Settings,
    user_id: str,
    *,
    masker: Any = None,
    operator: str | None = None,
    reason: str | None = None,
) -> dict:
    """What is held about ``user_id``; with a ``masker`` (``--reveal``) the values too, audited as reveal is.

    A user in the erasure ledger is refused a reveal, and the refusal is audited (``erased``).
    """
    if not user_id or len(user_id) > 128:
        raise Refused("--user-id must be 1 to 128 characters, as in user_logins.user_id")
    codecs = Codecs.from_settings(settings)

    async def job(conn: asyncpg.Connection) -> dict:
        held = await held_in_database(conn, user_id)
        result: dict[str, Any] = {
            "user_id": user_id,
            "erasures": held.ledger,
            "logins": await _logins(conn, user_id),
            "vault": await _vault(conn, user_id, with_ciphertext=masker is not None),
            "data_keys": held.data_keys,
        }
        if masker is None:
            return result
        note = {"reason": reason, "user_id": user_id}
        if held.ledger:
            await audit.record(conn, operator or "", "erased", **note)
            raise Refused(f"{user_id!r} is in the erasure ledger: nothing is revealed (the refusal is audited)")
        from streams.privacy.user_keys import Opener

        if isinstance(masker, Opener):  # per-user key mode: kms:Decrypt naming the user, audited per login
            from streams.privacy.vault import reveal_sealed

            opened = await reveal_sealed(conn, masker, operator or "", user_id=user_id, reason=reason, action="export")
            result["sealed"] = [{"field": r.field, "token": r.token, "value": r.value} for r in opened]
            return result
        for entry in result["vault"]:
            ciphertext = entry.pop("ciphertext")
            where = {**note, "field": entry["field"], "token": entry["token"]}
            try:
                value = masker.decrypt(entry["field"], ciphertext, entry["token"])
                belongs = masker.belongs(entry["field"], entry["token"], value)
            except Refused as exc:
                await audit.record(conn, operator or "", "does_not_open", **where)
                raise Refused(f"a {entry['field']} vault entry of this user does not open ({exc})") from None
            if not belongs:
                await audit.record(conn, operator or "", "token_mismatch", **where)
                raise Refused(f"a {entry['field']} vault entry does not belong to its token: nothing revealed")
            await audit.record(conn, operator or "", "revealed", **where)
            entry["value"] = value
        return result

    result = _db(settings, job, "the export")
    result["masked_topic_records"] = len(masked_ids(settings, codecs, user_id, None))
    result["dead_letters"] = count_dead_letters(settings, codecs, user_id)
    return result


# --- redrive --------------------------------------------------------------------------


def drop_erased(settings: Settings, letters: list[dict]) -> tuple[list[dict], int]:
    """Dead letters to redrive, less those of erased users sent at or before their erasure.

    Checked before anything is sent, wherever the payload names a user; a payload that
    does not parse is kept (it goes back, and is dead-lettered again, as before).
    """
    from streams.privacy.ledger import erased_users, load_ledger
    from streams.retry import wait_at_start

    if not letters:
        return letters, 0
    dsn = settings.pg_dsn.get_secret_value()
    erased = erased_users(wait_at_start(lambda: load_ledger(dsn), "PostgreSQL", log, settings.startup_timeout))
    if not erased:
        return letters, 0
    codecs = Codecs.from_settings(settings)
    kept = [d for d in letters if not erased.erased(dead_letter_user(codecs, d), dead_letter_sent_ms(codecs, d))]
    return kept, len(letters) - len(kept)
