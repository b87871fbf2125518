"""Supervised recovery: look a token or a message up in ``pii_vault`` and decrypt it.

Only a holder of the encryption key can open a ciphertext; every attempt, refused or not,
leaves an audit record (``streams.privacy.audit``) before anything is shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from streams.privacy import audit
from streams.errors import Refused
from streams.privacy.keys import PII_FIELDS
from streams.privacy.masking import Masker, RevealError, token_version


@dataclass(frozen=True)
class Revealed:
    field: str
    token: str
    value: str


async def _vault_rows(conn: asyncpg.Connection, pairs: list[tuple[str, str]]) -> list[asyncpg.Record]:
    fields, tokens = zip(*pairs)
    return await conn.fetch(
        "SELECT v.field, v.token, v.ciphertext FROM pii_vault v"
        " JOIN unnest($1::text[], $2::text[]) AS q(field, token) USING (field, token)",
        list(fields), list(tokens),
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
    try:
        found = [Revealed(r["field"], r["token"], masker.decrypt(r["field"], r["ciphertext"])) for r in rows]
        found.sort(key=lambda item: PII_FIELDS.index(item.field))
    except RevealError as exc:
        await audit.record(conn, operator, "refused_key", **note)
        raise Refused(f"{exc}: use the key file that holds this encryption key id") from None
    for item in found:
        await audit.record(conn, operator, "revealed", **{**note, "field": item.field, "token": item.token})
    return found
