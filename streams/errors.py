"""The few kinds of failure the code really tells apart; the CLI turns each into one line.

- ``ConfigError``: a setting, key or credential is missing or wrong; the process stops at
  start with the fix in the message (exit 2).
- ``Refused``: an operation the user asked for cannot be done as asked (exit 1).
- ``TransientError``: a dependency is down or slow; stages retry it with backoff.
- ``Rejected``: one record cannot become a valid output; it becomes a dead letter with
  its reason code, and the rest of the batch goes on.

No message may quote a field value (values can be PII).
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):  # noqa: UP042 - str() must stay the member name for existing callers
    """Dead-letter reason codes (streams.pipeline.dead_letters builds the record)."""

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


class StreamsError(Exception):
    """Base of the project's expected failures."""


class ConfigError(StreamsError):
    """A setting, key or credential is wrong; the message names what to fix."""


class Refused(StreamsError):
    """An operation refused as asked; the message says why and what to do instead."""


class TransientError(StreamsError):
    """A dependency is down or slow: retry with backoff, never skip the work."""


class Rejected(StreamsError):
    """Input that cannot become a valid record; carries its reason code."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
