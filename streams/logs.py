"""Process-wide logging: one format for every command, text for a terminal or JSON for machines.

``STREAMS_LOG_FORMAT=json`` writes one JSON object per line: time, level, logger,
message, and the context a log call passes in ``extra`` (stage, topic, partition,
offsets, counts, reason, operation, attempt). Messages never hold field values, so
neither format can carry PII.

Defence in depth for what a library logs (Faust's ``DEVLOG`` lines quote whole records,
``log.exception("...: %r", exc)`` quotes an exception's text, which can quote a value):
every record passes ``Redact``, which turns bytes arguments into their length and
foreign exceptions into their type name, and tracebacks are printed without exception
messages (frames and type names only).
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
import traceback
from collections.abc import Mapping
from typing import Any

# The ``extra`` keys that become JSON fields (anything else stays out of the record).
CONTEXT = ("stage", "topic", "partition", "first_offset", "last_offset", "count", "reason", "operation", "attempt")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _safe_exception(exc: BaseException) -> bool:
    """Exceptions whose text never quotes data: ours (written that way) and the OS's."""
    from streams.errors import StreamsError

    return isinstance(exc, StreamsError | OSError)


def _redacted(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, BaseException) and not _safe_exception(value):
        return type(value).__name__
    return value


class Redact(logging.Filter):
    """No log argument carries record bytes or a foreign exception's text (which may quote a value)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_redacted(a) for a in args)
        elif isinstance(args, Mapping):
            record.args = {k: _redacted(v) for k, v in args.items()}
        return True


def redacted_traceback(exc: BaseException | None) -> str:
    """A traceback with its frames and exception types, never an exception's message."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        text = str(exc) if _safe_exception(exc) else "(message withheld: it may quote data)"
        parts.append("".join(traceback.format_tb(exc.__traceback__)) + f"{name}: {text}")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\n\nwhich happened while handling, or was caused by:\n\n".join(
        ["Traceback (most recent call last):\n" + p for p in parts]
    )


class TextFormatter(logging.Formatter):
    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return redacted_traceback(ei[1])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__  # the type only: messages may quote data
        return json.dumps(entry, default=str)


def logging_config(level: str = "INFO", fmt: str = "text") -> dict:
    """A ``logging.config.dictConfig`` document (also handed to Faust's worker)."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"()": TextFormatter, "fmt": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"streams": formatter},
        "filters": {"redact": {"()": Redact}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "streams",
                "filters": ["redact"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    logging.config.dictConfig(logging_config(level, fmt))
