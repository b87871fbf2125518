"""Records as the stages write them, for tests that put them straight on a topic."""

from __future__ import annotations

from datetime import UTC, datetime

from streams.io.codec import Codecs

CODECS = Codecs()
LOGIN = {
    "user_id": "u",
    "app_version": "1.0",
    "device_type": "ios",
    "ip": "192.0.2.1",
    "locale": None,
    "device_id": "d",
}


def raw_value(message_id: str, body: str) -> bytes:
    """A raw envelope as the bridge encodes it."""
    return CODECS.raw.encode({"message_id": message_id, "sent_at": 1_764_000_000_000, "body": body, "attributes": {}})


def masked_value(message_id: str) -> bytes:
    """A masked record as the mask stage encodes it (placeholder tokens and ciphertexts)."""
    return CODECS.masked.encode(
        {
            "message_id": message_id,
            "sent_at": datetime(2026, 1, 1, tzinfo=UTC),
            "user_id": "u",
            "device_type": "ios",
            "locale": None,
            "app_version_raw": "1",
            "app_version": 1000000,
            "masked_ip": f"h1.{message_id}",
            "masked_device_id": "h1.b",
            "ip_ciphertext": "k1.c",
            "device_id_ciphertext": "k1.d",
            "ip_is_valid": True,
        }
    )
