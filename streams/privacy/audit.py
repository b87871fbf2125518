"""The reveal audit trail: who asked to see which token or message, when, and what happened.

Written before a revealed value is shown, so a value is never shown without its record.
It never holds the value itself, only identifiers an investigator can follow.
"""

from __future__ import annotations

import asyncpg


async def record(
    conn: asyncpg.Connection,
    operator: str,
    outcome: str,
    *,
    reason: str | None = None,
    field: str | None = None,
    token: str | None = None,
    message_id: str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO pii_reveal_audit (operator, reason, field, token, message_id, outcome)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        operator, reason, field, token, message_id, outcome,
    )
