"""The reveal audit trail: who asked to see which token or message, when, and what happened.

Written before a revealed value is shown, so a value is never shown without its record;
refusals are recorded too. It never holds the value itself, only identifiers an
investigator can follow. ``pii_reveal_audit`` is append-only (triggers refuse UPDATE,
DELETE and TRUNCATE, for the owner too), and the database stamps each row with its own
``session_user`` and clock (migration 0003), so neither can be chosen by the writer.

Outcomes: ``revealed``; refusals ``no_keys`` (no key material at all), ``malformed_token``,
``not_found`` (no login or vault row), ``refused_key`` (the encryption key id is not in
the keyring), ``does_not_open`` (wrong key, tampered, or a token-bound ciphertext moved to
another token), ``unverifiable`` (the token's join version is not in the keyring), and
``token_mismatch`` (the value does not belong to the token: a ciphertext copied under
another token). Per-user key mode adds ``erased`` (the user's keys are gone),
``refused_kms`` (the KMS refused to open the user's key for this caller) and
``bulk_open`` (a job that opens many users: one row per user, or per run in keyring mode).
"""

from __future__ import annotations

import getpass
import os

import asyncpg


def os_user() -> str:
    """The operating-system user running this process (beside the free-text operator)."""
    try:
        return getpass.getuser()
    except Exception:  # no login name in the environment nor in the passwd database
        return f"uid:{os.getuid()}"


async def record(
    conn: asyncpg.Connection,
    operator: str,
    outcome: str,
    *,
    reason: str | None = None,
    field: str | None = None,
    token: str | None = None,
    message_id: str | None = None,
    action: str | None = None,
    user_id: str | None = None,
) -> None:
    """One audit row, committed (autocommit) before the caller shows anything.

    ``action`` names the decrypting path (reveal, export, redrive, ...) and ``user_id``
    whose data it opened (per-user key mode, migration 0005); both stay out of the
    statement when not given, so the row is the same as before for the keyring paths.
    """
    if action is None and user_id is None:
        await conn.execute(
            "INSERT INTO pii_reveal_audit (operator, os_user, reason, field, token, message_id, outcome)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            operator,
            os_user(),
            reason,
            field,
            token,
            message_id,
            outcome,
        )
        return
    await conn.execute(
        "INSERT INTO pii_reveal_audit (operator, os_user, reason, field, token, message_id, outcome, action, user_id)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        operator,
        os_user(),
        reason,
        field,
        token,
        message_id,
        outcome,
        action or "reveal",
        user_id,
    )
