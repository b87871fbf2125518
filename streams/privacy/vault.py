"""Supervised recovery: look a token or a message up in ``pii_vault`` and decrypt it.

Only a holder of the encryption key can open a ciphertext; every attempt, refused or not,
leaves an audit record (``streams.privacy.audit``) before anything is shown. A value is
shown only if it belongs to its token: the token is recomputed from the plaintext with the
token's own join version, so a ciphertext copied under another token is refused (and
audited), never revealed as that token's value. Needs only the ``streams_reveal`` role's
privileges (no migration, no write but the audit row).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from streams.errors import Refused
from streams.privacy import audit
from streams.privacy.keys import PII_FIELDS, KeyMaterialError
from streams.privacy.masking import Masker, MissingKeyError, RevealError, token_version


@dataclass(frozen=True)
class Revealed:
    field: str
    token: str
    value: str


async def _vault_rows(conn: asyncpg.Connection, pairs: list[tuple[str, str]]) -> list[asyncpg.Record]:
    fields, tokens = zip(*pairs, strict=False)
    return await conn.fetch(
        "SELECT v.field, v.token, v.ciphertext FROM pii_vault v"
        " JOIN unnest($1::text[], $2::text[]) AS q(field, token) USING (field, token)",
        list(fields),
        list(tokens),
    )


async def reveal(
    conn: asyncpg.Connection,
    masker: Masker,
    operator: str,
    *,
    token: str | None = None,
    message_id: str | None = None,
    field: str | None = None,
    reason: str | None = None,
) -> list[Revealed]:
    """Decrypt the values behind a token or a message id, auditing the attempt."""
    note = dict(reason=reason, field=field, token=token, message_id=message_id)
    if token is not None:
        try:
            token_version(token)
        except ValueError as exc:
            await audit.record(conn, operator, "malformed_token", **{**note, "token": None})
            raise Refused(f"{exc}; copy it from masked_ip or masked_device_id") from None
        pairs = [(f, token) for f in ([field] if field else PII_FIELDS)]
    else:
        row = await conn.fetchrow(
            "SELECT masked_ip, masked_device_id FROM user_logins WHERE message_id = $1", message_id
        )
        if row is None:
            await audit.record(conn, operator, "not_found", **note)
            raise Refused(f"no row in user_logins with message_id {message_id!r}")
        pairs = [(f, row[f"masked_{f}"]) for f in ([field] if field else PII_FIELDS)]
    rows = await _vault_rows(conn, pairs)
    if not rows:
        await audit.record(conn, operator, "not_found", **note)
        raise Refused("no pii_vault entry for that token: check the token, or that the vault was not purged")
    found = []
    for r in sorted(rows, key=lambda r: PII_FIELDS.index(r["field"])):
        where = {**note, "field": r["field"], "token": r["token"]}
        try:
            value = masker.decrypt(r["field"], r["ciphertext"], r["token"])
        except MissingKeyError as exc:
            await audit.record(conn, operator, "refused_key", **where)
            raise Refused(f"{exc}: use the key file that holds this encryption key id") from None
        except RevealError as exc:
            await audit.record(conn, operator, "does_not_open", **where)
            raise Refused(f"{exc}: use the key file that holds this encryption key id") from None
        try:
            belongs = masker.belongs(r["field"], r["token"], value)
        except MissingKeyError as exc:
            await audit.record(conn, operator, "unverifiable", **where)
            raise Refused(f"{exc}: run `streams keys rejoin` to move it to the current version") from None
        if not belongs:
            await audit.record(conn, operator, "token_mismatch", **where)
            raise Refused(
                f"the {r['field']} vault entry does not belong to its token (a ciphertext copied or tampered with): "
                "nothing revealed; investigate pii_vault"
            )
        found.append(Revealed(r["field"], r["token"], value))
    for item in found:
        await audit.record(conn, operator, "revealed", **{**note, "field": item.field, "token": item.token})
    return found


# --- per-user key mode (issue 19 item 3) ----------------------------------------------


async def reveal_sealed(
    conn: asyncpg.Connection,
    opener,
    operator: str,
    *,
    token: str | None = None,
    message_id: str | None = None,
    user_id: str | None = None,
    field: str | None = None,
    reason: str | None = None,
    action: str = "reveal",
) -> list[Revealed]:
    """Open sealed values through ``opener`` (``user_keys.Opener``: kms:Decrypt naming the user).

    By message id it reads ``sealed_values``, which the worker role may add to but never
    rewrite (not ``user_logins``, whose tokens it may update). By token it opens one
    login holding that token; by user id (``export --reveal``) every login of the user.
    Every opened user gets an audit row (who, what, why) before any value is returned.
    """
    from streams.privacy.masking import open_value
    from streams.privacy.user_keys import KeyErased

    note = dict(reason=reason, field=field, token=token, message_id=message_id, action=action, user_id=user_id)
    fields = [field] if field else list(PII_FIELDS)
    select = "SELECT message_id, user_id, masked_ip, masked_device_id, ip_sealed, device_id_sealed FROM sealed_values"
    if message_id is not None:
        rows = await conn.fetch(f"{select} WHERE message_id = $1", message_id)
    elif user_id is not None:
        rows = await conn.fetch(f"{select} WHERE user_id = $1 ORDER BY message_id", user_id)
    else:
        assert token is not None
        try:
            token_version(token)
        except ValueError as exc:
            await audit.record(conn, operator, "malformed_token", **{**note, "token": None})
            raise Refused(f"{exc}; copy it from masked_ip or masked_device_id") from None
        rows = await conn.fetch(
            f"{select} WHERE masked_ip = $1 OR masked_device_id = $1 ORDER BY message_id LIMIT 1", token
        )
        fields = [f for f in fields if rows and rows[0][f"masked_{f}"] == token]
    if not rows or not fields:
        await audit.record(conn, operator, "not_found", **note)
        raise Refused("no sealed value for that message id, token or user (per-user key mode)")
    found = []
    for row in rows:
        owner = row["user_id"]
        where = {**note, "user_id": owner, "message_id": row["message_id"]}
        for name in fields:
            sealed, masked = row[f"{name}_sealed"], row[f"masked_{name}"]
            try:
                from streams.privacy.masking import split_sealed

                key_id, _ = split_sealed(sealed)
                key = await opener.data_key(conn, owner, key_id)
                value = open_value(key, name, owner, masked, sealed)
            except KeyErased as exc:
                await audit.record(conn, operator, "erased", **{**where, "field": name, "token": masked})
                raise Refused(f"{exc}: nothing revealed") from None
            except KeyMaterialError:  # KMS refused (no Decrypt right, wrong context): audited, then its one line
                await audit.record(conn, operator, "refused_kms", **{**where, "field": name, "token": masked})
                raise
            except (RevealError, ValueError):
                await audit.record(conn, operator, "does_not_open", **{**where, "field": name, "token": masked})
                raise Refused("a sealed value does not open under its user's key (altered or moved)") from None
            found.append((where, Revealed(name, masked, value)))
    for where, item in found:
        await audit.record(conn, operator, "revealed", **{**where, "field": item.field, "token": item.token})
    return [item for _, item in found]
