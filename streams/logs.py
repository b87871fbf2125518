"""Process-wide logging: one format for every command, text for a terminal or JSON for machines.

``STREAMS_LOG_FORMAT=json`` writes one JSON object per line: time, level, logger,
message, and the context a log call passes in ``extra`` (stage, topic, partition,
offsets, counts, reason, operation, attempt). Messages never hold field values, so
neither format can carry PII.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any

# The ``extra`` keys that become JSON fields (anything else stays out of the record).
CONTEXT = ("stage", "topic", "partition", "first_offset", "last_offset", "count", "reason", "operation", "attempt")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"streams": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "streams", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    logging.config.dictConfig(logging_config(level, fmt))
