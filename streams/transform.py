"""The mask stage as a pure function: raw envelope bytes in, masked or dead-letter bytes out.

No I/O here, so every rule is unit-testable; the Faust agent only moves bytes.
Nothing raised from here may carry a field value: details name fields, never values.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.codec import Codecs, CodecError
from streams.dead_letters import Reason, Rejected, dead_letter
from streams.masking import Masker, canonical_device_id, canonical_ip
from streams.records import parse_login

STAGE = "mask"


@dataclass(frozen=True, slots=True)
class Output:
    """One record to produce: to the masked topic, or to the DLQ when ``reason`` is set."""

    key: bytes
    value: bytes
    reason: str | None = None


class MaskTransform:
    def __init__(self, masker: Masker, codecs: Codecs) -> None:
        self.masker = masker
        self.codecs = codecs

    def __call__(self, key: bytes | None, value: bytes, where: str) -> Output:
        """Turn one consumed raw record into its output. Never raises."""
        message_id = where
        try:
            if key:
                message_id = key.decode("utf-8")
        except UnicodeDecodeError:
            pass
        try:
            try:
                envelope = self.codecs.raw.decode(value)
            except CodecError as exc:
                raise Rejected(Reason.UNDECODABLE_RECORD, str(exc)) from None
            message_id = envelope["message_id"]
            return Output(message_id.encode("utf-8"), self.codecs.masked.encode(self._mask(envelope)))
        except Rejected as rejected:
            return self._dead(message_id, rejected, value)
        except Exception as exc:  # a bug must not stop the stream; the type name carries no PII
            return self._dead(message_id, Rejected(Reason.PROCESSING_ERROR, type(exc).__name__), value)

    def _mask(self, envelope: dict) -> dict:
        login = parse_login(envelope["body"])
        ip_canonical, ip_is_valid = canonical_ip(login.ip)
        ip = self.masker.mask("ip", ip_canonical)
        device = self.masker.mask("device_id", canonical_device_id(login.device_id))
        return {
            "message_id": envelope["message_id"],
            "sent_at": envelope["sent_at"],
            "user_id": login.user_id,
            "device_type": login.device_type,
            "locale": login.locale,
            "app_version_raw": login.app_version_raw,
            "app_version": login.app_version,
            "masked_ip": ip.token,
            "masked_device_id": device.token,
            "ip_ciphertext": ip.ciphertext,
            "device_id_ciphertext": device.ciphertext,
            "ip_is_valid": ip_is_valid,
        }

    def _dead(self, message_id: str, rejected: Rejected, payload: bytes) -> Output:
        datum = dead_letter(message_id, STAGE, rejected, payload)
        return Output(
            message_id.encode("utf-8", "replace"), self.codecs.dead_letter.encode(datum), rejected.reason.value
        )
