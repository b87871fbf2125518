"""``streams erase`` and ``streams export``: erasure by user and subject access (docs/privacy.md, Erasure).

``erase`` runs as a role granted ``streams_eraser``; ``export`` as one granted
``streams_reveal`` (``--reveal`` also needs the key file, and is audited like ``reveal``).
Neither migrates. Output names counts and ids, never a value, except ``export --reveal``,
which prints values to stdout only after their audit rows are committed.
"""

from __future__ import annotations

import json

from streams import faults
from streams.errors import Refused
from streams.settings import Settings


def _erase(settings: Settings, args) -> None:
    from streams.privacy import erasure

    faults.configure(settings.fault)  # the kill -9 tests stop it between steps
    if args.dry_run:
        erasure.dry_run(settings, args.user_id, args.reason, args.ticket)
        return
    if args.wait <= 0:
        raise Refused("--wait must be a positive number of seconds")
    erasure.erase(
        settings,
        args.user_id,
        args.reason,
        args.ticket,
        wait=args.wait,
        new_request=args.new_request,
        full_scan=args.full_scan,
    )


def _export(settings: Settings, args) -> None:
    from streams.privacy import erasure

    masker = None
    if args.reveal:
        if not (args.operator or "").strip():
            raise Refused("--reveal needs --operator naming the person (it goes to the audit trail)")
        if not (args.reason or "").strip():
            raise Refused("--reveal needs --reason giving the ticket or reason (it goes to the audit trail)")
        from streams.cli.privacy import _masker, _opener
        from streams.privacy.user_keys import split_mode

        masker = _opener(settings) if split_mode(settings) else _masker(settings)
    result = erasure.export(
        settings,
        args.user_id,
        masker=masker,
        operator=(args.operator or "").strip() or None,
        reason=(args.reason or "").strip() or None,
    )
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))


def register(sub) -> None:
    """Add ``erase`` and ``export`` to the ``streams`` parser."""
    p = sub.add_parser("erase", help="erase one user: ledger, stages confirm, keys, rows, vault, tombstones")
    p.add_argument("--user-id", required=True, help="the user_id to erase")
    p.add_argument("--reason", required=True, help="a reason code, e.g. gdpr_art17 (no free text)")
    p.add_argument("--ticket", help="an optional ticket reference, e.g. PRIV-123 (no free text)")
    p.add_argument("--dry-run", action="store_true", help="list what would go and the known limits; change nothing")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for running stages to confirm")
    p.add_argument(
        "--new-request",
        action="store_true",
        help="the user was erased before: erase again what arrived since (a new ledger entry)",
    )
    p.add_argument(
        "--full-scan",
        action="store_true",
        help="tombstones: read the whole masked topic, not only from the sink's offsets (docs/privacy.md)",
    )
    p.set_defaults(func=_erase)

    p = sub.add_parser("export", help="list what is held about one user (subject access); --reveal adds values")
    p.add_argument("--user-id", required=True)
    p.add_argument("--reveal", action="store_true", help="decrypt the user's values (audited like `streams reveal`)")
    p.add_argument("--operator", help="with --reveal: who is revealing")
    p.add_argument("--reason", help="with --reveal: ticket or reason (recorded)")
    p.set_defaults(func=_export)
