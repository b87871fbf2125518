"""Issue 19 item 6: no raw body, no foreign exception text in any log line (ours or a library's)."""

from __future__ import annotations

import io
import logging
import logging.config

import pytest

from streams.errors import TransientError
from streams.logs import logging_config

BODY = b'{"user_id": "u", "ip": "203.0.113.99", "device_id": "555-66-7777"}'


@pytest.fixture(params=["text", "json"])
def captured(request, monkeypatch):
    stream = io.StringIO()
    config = logging_config("DEBUG", request.param)
    config["handlers"]["stderr"]["stream"] = stream
    logging.config.dictConfig(config)
    yield stream
    logging.config.dictConfig(logging_config("WARNING"))


def test_a_librarys_devlog_line_and_repr_exc_do_not_carry_the_record(captured):
    library = logging.getLogger("faust.transport.consumer")
    library.info("DROPPED MESSAGE ROFF %r: k=%r v=%r", 7, b"m-1", BODY)  # Faust's DEVLOG line
    try:
        raise ValueError(f"{BODY.decode()!r} does not appear to be an IPv4 or IPv6 address")
    except ValueError as exc:
        library.exception("Drain messages raised: %r", exc)
        library.error("failed: %(exc)s", {"exc": exc})
    text = captured.getvalue()
    assert "DROPPED MESSAGE" in text and f"<{len(BODY)} bytes>" in text and "ValueError" in text
    for secret in ("203.0.113.99", "555-66-7777", "user_id"):
        assert secret not in text, text


def test_our_own_errors_keep_their_text(captured):
    logging.getLogger("streams.retry").warning("%s: %s; waiting", "database write", TransientError("db down"))
    try:
        raise TransientError("Kafka at 127.0.0.1:9092 does not answer")
    except TransientError:
        logging.getLogger("streams").exception("stopped")
    text = captured.getvalue()
    assert "database write: db down; waiting" in text
