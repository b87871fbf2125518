"""Reason codes for dead letters and the record that carries them.

A reason is a short, stable code analysts can count on; the detail explains it in
words but never quotes a field's value (values can be PII).
"""

from __future__ import annotations

import time
from enum import Enum

from streams.errors import Rejected


class Reason(str, Enum):
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
    UNDECODABLE_RECORD = "undecodable_record"
    PROCESSING_ERROR = "processing_error"
    REJECTED_BY_DATABASE = "rejected_by_database"


def dead_letter(message_id: str, stage: str, rejected: Rejected, payload: bytes) -> dict:
    """The DLQ datum for one rejected input."""
    return {
        "message_id": message_id,
        "stage": stage,
        "reason": rejected.reason.value,
        "detail": rejected.detail,
        "payload": payload,
        "failed_at": int(time.time() * 1000),
    }
