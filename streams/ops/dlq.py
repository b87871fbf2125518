"""Inspect dead letters and send chosen ones back through the pipeline (``streams dlq``).

Listing shows reason codes, counts and message ids only: the payload may hold PII.
Redrive produces a dead letter, keyed by its original message id, onto the input topic of
the stage that refused it (mask -> raw topic, sink -> masked topic), so once the cause is
fixed it lands on the same row as any other delivery would.

- A mask-stage dead letter holds the raw envelope: it goes back as it is (the mask stage
  masks it with the keys of the day).
- In per-user key mode (docs/privacy.md) a sink-stage dead letter's sealed values still
  open under their user's key: it goes back as it is, nothing is decrypted (one whose
  tokens are of another join version is refused).
- A sink-stage dead letter holds a masked record frozen with the keys of its day (join
  token version, encryption key id), which a `keys rejoin` or `retire` may have retired
  since. It is re-masked first: its ciphertexts are opened with the keyring and the values
  masked again under the current keys (token and token-bound ciphertext), as rotation
  does. One whose encryption key is no longer in the keyring is refused, and so is the
  whole redrive, before anything is sent: a redrive never brings back a retired token or key.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from streams.errors import Refused
from streams.io.codec import CodecError, Codecs
from streams.io.kafka import send_records
from streams.ops.state import dead_letters
from streams.ops.topology import stage_topic
from streams.pipeline.dedup import REDRIVE_HEADER
from streams.privacy.keys import PII_FIELDS, KeyRing, settings_keyring
from streams.privacy.masking import Masker, MissingKeyError, RevealError, ciphertext_key_id
from streams.settings import Settings

SINK = "sink"  # the stage whose dead letters hold masked records


@dataclass
class ReasonSummary:
    stage: str
    reason: str
    count: int = 0
    message_ids: list[str] = field(default_factory=list)


def summarize(letters: list[dict], sample: int = 5) -> list[ReasonSummary]:
    """One line per (stage, reason): how many, and a few message ids to redrive or inspect."""
    groups: dict[tuple[str, str], ReasonSummary] = {}
    for d in letters:
        s = groups.setdefault((d["stage"], d["reason"]), ReasonSummary(d["stage"], d["reason"]))
        s.count += 1
        if len(s.message_ids) < sample and d["message_id"] not in s.message_ids:
            s.message_ids.append(d["message_id"])
    return sorted(groups.values(), key=lambda s: (-s.count, s.stage, s.reason))


def select(letters: list[dict], reasons: list[str], ids: list[str], stage: str | None) -> list[dict]:
    """Dead letters matching any given reason or id (and the stage, if given); latest per message id."""
    chosen: dict[str, dict] = {}
    for d in letters:
        if stage and d["stage"] != stage:
            continue
        if d["reason"] in reasons or d["message_id"] in ids:
            chosen[d["message_id"]] = d
    return list(chosen.values())


def remask(masker: Masker, codec, message_id: str, payload: bytes) -> bytes:
    """A sink-stage dead letter's masked record, masked again under ``masker``'s current keys.

    Refused (one line, no value) when the payload is not a masked record, when a
    ciphertext's encryption key is not in the keyring (retired), or when it does not open.
    """
    try:
        record = codec.decode(payload)
    except (CodecError, TypeError):
        raise Refused(
            f"dead letter {message_id}: its payload is not a masked record, so it cannot be re-masked"
        ) from None
    for name in PII_FIELDS:
        ciphertext, token = record[f"{name}_ciphertext"], record[f"masked_{name}"]
        key_id = ciphertext_key_id(ciphertext)
        try:
            value = masker.decrypt(name, ciphertext, token)
        except MissingKeyError:
            raise Refused(
                f"dead letter {message_id}: its {name} is under encryption key {key_id!r}, which is retired"
                " (not in the keyring); it cannot be redriven"
            ) from None
        except RevealError:
            raise Refused(
                f"dead letter {message_id}: its {name} ciphertext does not open with key {key_id!r}; it cannot be redriven"
            ) from None
        fresh = masker.mask(name, value)
        record[f"masked_{name}"], record[f"{name}_ciphertext"] = fresh.token, fresh.ciphertext
    return codec.encode(record)


def sealed_record(settings: Settings, codec, message_id: str, payload: bytes) -> bool:
    """Whether a sink-stage dead letter holds per-user sealed values that go back as they are.

    They still open under their user's data key, so a redrive needs no decryption; tokens of
    another join version than the current one are refused (re-masking them would need a
    join rotation, which decrypts under audit). False for a keyring-mode record.
    """
    try:
        record = codec.decode(payload)
    except (CodecError, TypeError):
        return False  # ``remask`` refuses it with its own message
    if record.get("ip_sealed") is None:
        return False
    for name in PII_FIELDS:
        if record[f"masked_{name}"].partition(".")[0] != settings.join_version:
            raise Refused(
                f"dead letter {message_id}: its {name} token is not of join version {settings.join_version}; "
                "it cannot be redriven without re-masking"
            )
    return True


def redrive_records(
    settings: Settings, chosen: list[dict], keyring: KeyRing | None = None
) -> list[tuple[str, bytes, bytes]]:
    """``(topic, key, value)`` to produce back to the refusing stage's input.

    Mask-stage payloads go back as they are; sink-stage ones are re-masked under the
    current keys (``keyring``, loaded from the settings when not given, never generated).
    """
    masker = codec = None
    records = []
    for d in chosen:
        payload = d["payload"]
        if d["stage"] == SINK:
            if d.get("payload_truncated"):
                raise Refused(f"dead letter {d['message_id']}: its payload was cut to fit Kafka; it cannot be redriven")
            if codec is None:
                codec = Codecs.from_settings(settings).masked
            if sealed_record(settings, codec, d["message_id"], payload):
                records.append((stage_topic(settings, d["stage"]), d["message_id"].encode("utf-8"), payload))
                continue
            if masker is None:
                masker = Masker(keyring or settings_keyring(settings.model_copy(update={"dev_keys": False})))
            payload = remask(masker, codec, d["message_id"], payload)
        records.append((stage_topic(settings, d["stage"]), d["message_id"].encode("utf-8"), payload))
    return records


def redrive(settings: Settings, reasons: list[str], ids: list[str], stage: str | None, dry_run: bool) -> dict[str, int]:
    """Re-produce the chosen dead letters; returns how many went to each topic.

    Every record is prepared (sink-stage ones re-masked) before any is sent, so a refusal
    sends nothing; a dry run prepares them too, so it shows the same refusals.
    """
    if not reasons and not ids:
        raise Refused("choose what to redrive: --reason CODE and/or --id MESSAGE_ID (see `streams dlq list`)")
    chosen = select(dead_letters(settings), reasons, ids, stage)
    records = redrive_records(settings, chosen)
    counts: dict[str, int] = defaultdict(int)
    for topic, _, _ in records:
        counts[topic] += 1
    if records and not dry_run:
        # Marked as a redrive: the mask stage's dedup window must not take it for a bridge copy.
        send_records(settings, records, headers=[(REDRIVE_HEADER, b"1")])
    return dict(counts)
