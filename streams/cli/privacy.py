"""``streams keys ...`` and ``streams reveal``: key management and supervised recovery.

Nothing here prints key bytes or logs a revealed value; the value goes to stdout only,
after its audit record is committed. ``reveal`` never migrates (it runs as the
least-privilege ``streams_reveal`` role); the key jobs, run by the schema owner, do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from streams.errors import ConfigError, Refused, TransientError
from streams.privacy import keys as keymod
from streams.settings import Settings


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def _connect(settings: Settings, migrate: bool = True, connect_timeout: float = 15.0):
    """A connection; the key jobs (run by the schema owner) migrate first, reveal never does."""
    from streams.io import postgres

    try:
        conn = await postgres.connect(settings.pg_dsn.get_secret_value(), timeout=connect_timeout)
        if migrate:
            await postgres.migrate(conn)
    except Exception as exc:
        raise Refused(
            f"cannot reach PostgreSQL ({type(exc).__name__}): start it with `streams stack up` or set STREAMS_PG_DSN"
        ) from None
    return conn


def _with_db(settings: Settings, job, migrate: bool = True):
    async def go():
        conn = await _connect(settings, migrate)
        try:
            return await job(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def _keys_json(settings: Settings) -> str | None:
    return settings.keys_json.get_secret_value() if settings.keys_json else None


def _kms(settings: Settings):
    """The KMS that wraps the key file (STREAMS_KMS_KEY_ID), or None for a plaintext file."""
    from streams.privacy.kms import settings_kms

    return settings_kms(settings)


def _masker(settings: Settings):
    from streams.privacy.hardening import no_core_dumps
    from streams.privacy.masking import Masker

    no_core_dumps()  # this process is about to hold keys and decrypted values
    return Masker(keymod.settings_keyring(settings.model_copy(update={"dev_keys": False})))


# --- keys -----------------------------------------------------------------------------


async def _audit_bulk(conn, action: str, reason: str) -> None:
    """A bulk decryption (keyring mode: the whole vault) leaves its audit row before it starts."""
    from streams.privacy import audit

    await audit.record(conn, audit.os_user(), "bulk_open", reason=reason, action=action)


def _keys_init(settings: Settings, args) -> None:
    path = settings.keys_file
    kms = _kms(settings)
    if path.exists():
        raise Refused(f"{path} already exists: keys are never overwritten; use `streams keys rotate`")
    if not keymod.publish_document(path, keymod.stored_form(keymod.generate_document(), kms)):
        raise Refused(f"{path} already exists: keys are never overwritten; use `streams keys rotate`")
    wrapped = f", wrapped by KMS key {settings.kms_key_id}" if kms is not None else ""
    print(f"wrote new keys to {path} (mode 600{wrapped}); back it up in your secret store")


def _keys_migrate(settings: Settings, args) -> None:
    kms = _kms(settings)
    if kms is None:
        raise Refused(
            "set STREAMS_KMS_KEY_ID (and STREAMS_KMS_ENDPOINT for a local KMS) to the key that will wrap the file"
        )
    keymod.migrate_to_kms(settings.keys_file, kms)
    print(f"{settings.keys_file} is now wrapped by KMS key {settings.kms_key_id}; the plaintext form is gone from it")


def _keys_list(settings: Settings, args) -> None:
    ring = keymod.settings_keyring(settings.model_copy(update={"dev_keys": False}))
    print(json.dumps(ring.describe(), indent=2))


def _keys_rotate(settings: Settings, args) -> None:
    kms = _kms(settings)
    doc = keymod.editable_document(settings.keys_file, _keys_json(settings), kms)
    if args.what == "encryption":
        key_id = keymod.add_encryption_key(doc)
        keymod.write_document(settings.keys_file, doc, kms)
        print(f"encryption key {key_id} is active; restart workers, then run `streams keys reencrypt`")
    else:
        version = keymod.add_join_version(doc)
        keymod.write_document(settings.keys_file, doc, kms)
        print(f"join version {version} added; run `streams keys rejoin` to move every table to it")


def _keys_reencrypt(settings: Settings, args) -> None:
    from streams.privacy.rotation import reencrypt
    from streams.privacy.user_keys import split_mode

    if split_mode(settings):
        raise Refused(
            "per-user key mode has no shared encryption key to re-encrypt to: data keys are per user and worker "
            "lifetime; `streams keys seal` re-wraps new ones by KMS, and the KMS key rotates in the KMS"
        )
    masker = _masker(settings)

    async def job(conn):
        await _audit_bulk(conn, "reencrypt", args.reason)
        return await reencrypt(conn, masker, args.batch_size, args.max_batches)

    moved = _with_db(settings, job)
    print(f"re-encrypted {moved} vault rows to {masker.keyring.encryption_key_id}")


def _keys_retire(settings: Settings, args) -> None:
    from streams.privacy.key_use import running_writers
    from streams.privacy.rotation import key_in_use

    kms = _kms(settings)
    doc = keymod.editable_document(settings.keys_file, _keys_json(settings), kms)
    enc = doc["encryption"]
    if args.key_id not in enc["keys"]:
        raise Refused(f"no encryption key {args.key_id!r}; `streams keys list` shows the ids")
    if args.key_id == enc["active"]:
        raise Refused(f"{args.key_id} is the active key: rotate first with `streams keys rotate encryption`")
    writers = [w for w in running_writers(settings) if w.encryption_key_id == args.key_id]
    if writers:
        raise Refused(
            f"{len(writers)} running mask worker(s) still write under {args.key_id} (e.g. {writers[0].client_id} on "
            f"{writers[0].host}): restart them so they load {enc['active']}, run `streams keys reencrypt`, then retire"
        )
    used = _with_db(settings, lambda conn: key_in_use(conn, args.key_id))
    if used:
        raise Refused(f"{used} vault rows still use {args.key_id}: run `streams keys reencrypt` first")
    del enc["keys"][args.key_id]
    keymod.write_document(settings.keys_file, doc, kms)
    print(f"encryption key {args.key_id} removed")


def _keys_rejoin_sealed(settings: Settings, args) -> None:
    """Per-user key mode: move every login to STREAMS_JOIN_VERSION (opens each user through KMS, audited)."""
    from streams.privacy.audit import os_user
    from streams.privacy.user_keys import deployment, join_keys, kms_pair, rejoin_sealed

    opener = _opener(settings)
    _, mac = kms_pair(settings)
    target = settings.join_version
    join = join_keys(mac, deployment(settings), target)
    moved, skipped = _with_db(
        settings,
        lambda conn: rejoin_sealed(conn, opener, join, target, os_user(), args.reason, args.batch_size),
    )
    erased = f"; {skipped} rows of erased users left as they are" if skipped else ""
    print(f"moved {moved} logins to join version {target}{erased}")


def _keys_rejoin(settings: Settings, args) -> None:
    from streams.privacy.hardening import no_core_dumps
    from streams.privacy.masking import Masker
    from streams.privacy.rotation import rejoin
    from streams.privacy.user_keys import split_mode

    if split_mode(settings):
        _keys_rejoin_sealed(settings, args)
        return
    no_core_dumps()
    kms = _kms(settings)
    doc = keymod.editable_document(settings.keys_file, _keys_json(settings), kms)
    ring = keymod.parse_keyring(json.dumps(doc), str(settings.keys_file))
    target = ring.join_next or ring.join_version

    def switch() -> None:
        current = keymod.editable_document(settings.keys_file, _keys_json(settings), kms)
        if current["join"].get("next") == target:
            current["join"]["active"] = target
            del current["join"]["next"]
            keymod.write_document(settings.keys_file, current, kms)
            print(f"new writes now use {target} (restart workers to load it)", file=sys.stderr)

    async def job(conn):
        await _audit_bulk(conn, "rejoin", args.reason)
        return await rejoin(
            conn,
            Masker(ring),
            target,
            switch,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
            rounds=args.rounds,
            wait=args.wait,
        )

    done = _with_db(settings, job)
    if not done:
        print(f"stopped after {args.max_batches} batches; rerun `streams keys rejoin` to continue")
        return
    final = keymod.editable_document(settings.keys_file, _keys_json(settings), kms)
    final["join"]["versions"] = {target: final["join"]["versions"][target]}
    final["join"]["domain_separated"] = [v for v in final["join"].get("domain_separated", []) if v == target]
    keymod.write_document(settings.keys_file, final, kms)
    print(f"every table uses join version {target}; older join keys removed")


# --- reveal ---------------------------------------------------------------------------


def _audit_no_keys(settings: Settings, args) -> None:
    """Best effort: record a reveal attempt refused for want of key material."""
    from streams.privacy import audit
    from streams.privacy.masking import TOKEN

    token = args.token if args.token and TOKEN.match(args.token) else None  # never a pasted value

    async def go():
        conn = await _connect(settings, migrate=False, connect_timeout=5.0)
        try:
            await audit.record(
                conn,
                args.operator.strip(),
                "no_keys",
                reason=args.reason.strip(),
                field=args.field,
                token=token,
                message_id=args.message_id,
            )
        finally:
            await conn.close()

    try:
        asyncio.run(go())
    except Exception:  # the key error is what the operator must see; no database is no audit
        pass


def _reveal(settings: Settings, args) -> None:
    import asyncpg

    from streams.privacy.vault import reveal

    if not args.operator.strip():
        raise Refused("--operator must name the person revealing (it goes to the audit trail)")
    if not args.reason.strip():
        raise Refused("--reason must give the ticket or reason (it goes to the audit trail)")
    from streams.privacy.user_keys import split_mode

    if split_mode(settings):
        _print_revealed(_reveal_sealed(settings, args))
        return
    try:
        masker = _masker(settings)
    except keymod.KeyMaterialError:
        _audit_no_keys(settings, args)
        raise
    try:
        found = _with_db(
            settings,
            lambda conn: reveal(
                conn,
                masker,
                args.operator.strip(),
                token=args.token,
                message_id=args.message_id,
                field=args.field,
                reason=args.reason.strip(),
            ),
            migrate=False,  # reveal runs as the least-privilege streams_reveal role
        )
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
        raise Refused(
            f"PostgreSQL refused the reveal ({type(exc).__name__}): the database must be migrated"
            " (`streams migrate`, as the schema owner) and STREAMS_PG_DSN's role granted streams_reveal"
        ) from None
    except asyncpg.PostgresError as exc:  # the server's message is not quoted: keep values out of errors
        raise Refused(f"PostgreSQL refused the reveal ({type(exc).__name__}, SQLSTATE {exc.sqlstate})") from None
    _print_revealed(found)


def _print_revealed(found) -> None:
    for item in found:  # JSON lines: a value may hold tabs or newlines
        print(json.dumps({"field": item.field, "token": item.token, "value": item.value}, ensure_ascii=False))


def _opener(settings: Settings):
    """The decrypting side of per-user key mode: KMS (kms:Decrypt naming the user) and no keyring."""
    from streams.privacy.hardening import no_core_dumps
    from streams.privacy.kms import Kms
    from streams.privacy.user_keys import Opener, deployment

    no_core_dumps()  # this process is about to hold data keys and decrypted values
    return Opener(Kms(settings), deployment(settings))


def _reveal_sealed(settings: Settings, args):
    """``streams reveal`` in per-user key mode: sealed values opened through KMS, audited per user."""
    import asyncpg

    from streams.privacy.vault import reveal_sealed

    opener = _opener(settings)
    try:
        return _with_db(
            settings,
            lambda conn: reveal_sealed(
                conn,
                opener,
                args.operator.strip(),
                token=args.token,
                message_id=args.message_id,
                field=args.field,
                reason=args.reason.strip(),
            ),
            migrate=False,
        )
    except asyncpg.PostgresError as exc:  # the server's message is not quoted: keep values out of errors
        raise Refused(f"PostgreSQL refused the reveal ({type(exc).__name__}, SQLSTATE {exc.sqlstate})") from None


SEAL_TEMPORARY = 75  # EX_TEMPFAIL: PostgreSQL did not answer; the next scheduled run retries


def _keys_seal(settings: Settings, args) -> None:
    """Re-wrap lifetime-wrapped user keys by KMS under each user's context (the key custodian's job).

    Made to run on a schedule (a CronJob in deploy/k8s, the ``key-seal`` service in compose):
    one run at a time, bounded, idempotent, one summary line. Exit 0: done (or another run
    holds the lock); 1: rows that do not open were left; 2: settings, KMS or schema;
    75: PostgreSQL unreachable, retry later. ``--every`` repeats it until stopped.
    """
    from streams.privacy.user_keys import split_mode

    if not split_mode(settings):
        raise ConfigError(
            "`streams keys seal` is for per-user key mode: set STREAMS_KMS_KEY_ID and STREAMS_KMS_MAC_KEY_ID"
        )
    opener = _opener(settings)
    if args.every is None:
        code = _seal_once(settings, opener, args)
        if code:
            sys.exit(code)
        return
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # PID 1 in a container: SIGTERM ends the loop
    while not stop.is_set():
        _seal_once(settings, opener, args)
        sys.stdout.flush()
        stop.wait(args.every)


def _seal_once(settings: Settings, opener, args) -> int:
    """One bounded run; prints its summary line and returns its exit code."""
    import asyncpg

    from streams.io import postgres
    from streams.privacy.audit import os_user
    from streams.privacy.user_keys import seal_user_keys

    dsn = settings.pg_dsn.get_secret_value()

    async def go():
        try:
            conn = await postgres.connect(dsn)
        except Exception as exc:
            raise postgres.connection_failure(exc) from None
        try:
            return await seal_user_keys(conn, opener, os_user(), args.batch_size, args.max_batches)
        finally:
            await conn.close()

    try:
        postgres.require_schema(dsn)
        run = asyncio.run(go())
    except TransientError as exc:
        print(f"streams keys seal: {exc}", file=sys.stderr)
        return SEAL_TEMPORARY
    except asyncpg.InsufficientPrivilegeError:
        raise ConfigError(
            "PostgreSQL refused the key custodian: grant STREAMS_PG_DSN's role streams_key_custodian (migration 0008)"
        ) from None
    except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:  # lost mid-run
        print(f"streams keys seal: lost PostgreSQL ({type(exc).__name__}); the next run continues", file=sys.stderr)
        return SEAL_TEMPORARY
    if run.locked:
        print("sealed 0 user data keys: another `streams keys seal` run holds the lock (it seals them)")
        return 0
    line = f"sealed {run.sealed} user data keys under their users' KMS context; {run.left} still lifetime-wrapped"
    if run.unopenable:
        print(f"{line} ({run.unopenable} do not open under their lifetime key: altered or moved, see docs/privacy.md)")
        return 1
    print(f"{line}{'; the next run continues' if run.left else ''}")
    return 0


def register(sub) -> None:
    """Add this group's subcommands to the ``streams`` parser."""
    p = sub.add_parser("keys", help="manage masking keys (never prints key bytes)")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    k = ksub.add_parser("init", help="create a new key file at STREAMS_KEYS_FILE")
    k.set_defaults(func=_keys_init)
    k = ksub.add_parser("migrate", help="wrap today's plaintext key file with the KMS key STREAMS_KMS_KEY_ID (once)")
    k.set_defaults(func=_keys_migrate)
    k = ksub.add_parser("list", help="show key ids and versions in use")
    k.set_defaults(func=_keys_list)
    k = ksub.add_parser("rotate", help="add a new encryption key (active at once) or join version (see rejoin)")
    k.add_argument("what", choices=["encryption", "join"])
    k.set_defaults(func=_keys_rotate)
    k = ksub.add_parser("reencrypt", help="move pii_vault rows to the active encryption key, in batches")
    k.add_argument("--batch-size", type=_positive, default=500)
    k.add_argument("--max-batches", type=_positive, help="stop after this many batches (rerun to continue)")
    k.add_argument("--reason", default="key rotation", help="why (recorded in pii_reveal_audit)")
    k.set_defaults(func=_keys_reencrypt)
    k = ksub.add_parser("retire", help="remove an encryption key no vault row uses any more")
    k.add_argument("key_id")
    k.set_defaults(func=_keys_retire)
    k = ksub.add_parser("seal", help="per-user key mode: wrap new user data keys by KMS under each user's context")
    k.add_argument("--batch-size", type=_positive, default=500, help="rows per transaction")
    k.add_argument("--max-batches", type=_positive, help="stop after this many batches (the next run continues)")
    k.add_argument("--every", type=_positive, metavar="SECONDS", help="run again every SECONDS until stopped")
    k.set_defaults(func=_keys_seal)
    k = ksub.add_parser("rejoin", help="move every table to the new join version, then switch writes to it")
    k.add_argument("--batch-size", type=_positive, default=500)
    k.add_argument("--max-batches", type=_positive, help="stop after this many batches (rerun to continue)")
    k.add_argument("--rounds", type=_positive, default=10, help="rounds to wait for workers still writing old tokens")
    k.add_argument("--wait", type=float, default=2.0, help="seconds between rounds")
    k.add_argument("--reason", default="join key rotation", help="why (recorded in pii_reveal_audit)")
    k.set_defaults(func=_keys_rejoin)

    p = sub.add_parser("reveal", help="decrypt a masked value for an authorised operator (audited)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--token", help="a masked_ip or masked_device_id value")
    what.add_argument("--message-id", help="reveal the ip and device id of one login")
    p.add_argument("--field", choices=["ip", "device_id"], help="only this field")
    p.add_argument(
        "--operator",
        required=True,
        help="who is revealing (recorded in pii_reveal_audit beside the database session user and the OS user)",
    )
    p.add_argument("--reason", required=True, help="ticket or reason (recorded)")
    p.set_defaults(func=_reveal)
