"""Reason codes for dead letters and the record that carries them.

A reason is a short, stable code analysts can count on; the detail explains it in
words but never quotes a field's value (values can be PII).
"""

from __future__ import annotations

import time
from enum import Enum

from streams.errors import Rejected


class Reason(str, Enum):  # noqa: UP042 - str() must stay the member name for existing callers
    EMPTY_BODY = "empty_body"
    INVALID_JSON = "invalid_json"
    TOO_DEEP = "too_deep"
    DUPLICATE_KEY = "duplicate_key"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    NULL_FIELD = "null_field"
    WRONG_TYPE = "wrong_type"
    FIELD_TOO_LONG = "field_too_long"
    EMPTY_FIELD = "empty_field"
    NUL_CHARACTER = "nul_character"
    INVALID_UNICODE = "invalid_unicode"
    NUMBER_TOO_LONG = "number_too_long"
    EMPTY_RECORD = "empty_record"
    INVALID_MESSAGE_ID = "invalid_message_id"
    TOO_LARGE = "too_large"
    UNDECODABLE_RECORD = "undecodable_record"
    UNKNOWN_SCHEMA = "unknown_schema"  # a Confluent-format schema id the registry (which answered) does not have
    PROCESSING_ERROR = "processing_error"
    REJECTED_BY_DATABASE = "rejected_by_database"


MAX_PAYLOAD = 64 * 1024  # bytes of the input a too-large dead letter keeps
MAX_MESSAGE_ID = 128  # characters: SQS ids are 36; longer ones are refused where they enter


def dead_letter(message_id: str, stage: str, rejected: Rejected, payload: bytes | None, truncate: bool = False) -> dict:
    """The DLQ datum for one rejected input (a null input has an empty payload).

    With ``truncate`` (the input was too large to carry whole) the payload keeps its
    first ``MAX_PAYLOAD`` bytes and says so; an over-long message id is cut the same way.
    """
    payload = payload or b""
    truncated = truncate and len(payload) > MAX_PAYLOAD
    return {
        "message_id": message_id[:MAX_MESSAGE_ID],
        "stage": stage,
        "reason": rejected.reason.value,
        "detail": rejected.detail,
        "payload": payload[:MAX_PAYLOAD] if truncated else payload,
        "failed_at": int(time.time() * 1000),
        "payload_truncated": truncated,
    }


def refused_by_kafka(record: tuple, err, stage: str, codec, dlq_topic: str) -> tuple:
    """The record to produce instead of one Kafka refused for good (its size).

    A dead letter that is itself too large keeps its reason with its payload cut to
    ``MAX_PAYLOAD``; any other record becomes a ``too_large`` dead letter. ``codec`` is
    the dead-letter codec. The replacement keeps the record's timestamp, if it had one.
    """
    topic, key, value = record[:3]
    if topic == dlq_topic:
        datum = codec.decode(value)
        datum["payload"], datum["payload_truncated"] = datum["payload"][:MAX_PAYLOAD], True
    else:
        message_id = (key or b"").decode("utf-8", "replace")
        rejected = Rejected(Reason.TOO_LARGE, f"Kafka refused the record: {err.name()}")
        datum = dead_letter(message_id, stage, rejected, value, truncate=True)
    return (dlq_topic, datum["message_id"].encode("utf-8", "replace"), codec.encode(datum), *record[3:])
