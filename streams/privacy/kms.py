"""Key material wrapped by a KMS (envelope encryption): nothing at rest is a plaintext key.

With ``STREAMS_KMS_KEY_ID`` set, the key file (or ``STREAMS_KEYS_JSON``) holds a wrapped
document instead of the keyring::

    {"format": "streams-wrapped-keyring/1", "kms_key_arn": "arn:aws:kms:...",
     "context": {"deployment": "<STREAMS_DEPLOYMENT or STREAMS_APP_ID>", "purpose": "keyring"},
     "data_key": "<b64 KMS CiphertextBlob>", "nonce": "<b64 12 bytes>",
     "keyring": "<b64 AES-256-GCM of the keyring JSON>", "check": "<b64 16 bytes>"}

- ``GenerateDataKey`` (AES_256) under the KMS key gives a fresh data key per write; only
  its KMS-wrapped form is stored. The keyring JSON is sealed with AES-256-GCM under it,
  with the context as associated data.
- Every KMS call that takes one carries the EncryptionContext ``{deployment, purpose}``:
  a CloudTrail line names what was opened, and the blob opens with no other context.
- ``check`` is HMAC-SHA256(data key, "streams keyring check" NUL context)[:16], made when
  the document is written. At start the process recomputes it from the unwrapped data key
  and refuses a mismatch: the wrong key or the wrong context, said in one line.
- Before any unwrap the key is checked with ``DescribeKey``: a missing, disabled or
  pending-deletion key is refused even where the KMS would still decrypt (moto does),
  and the key must be the one the document names.

KMS is reached through botocore's default credential chain (or STREAMS_AWS_ACCESS_KEY_ID
and ..._SECRET_ACCESS_KEY), ``STREAMS_KMS_ENDPOINT`` overriding the endpoint (moto locally).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from streams.privacy.keys import KeyMaterialError
from streams.settings import Settings

FORMAT = "streams-wrapped-keyring/1"
PURPOSE = "keyring"
CHECK_LABEL = b"streams keyring check\0"


class KmsError(KeyMaterialError):
    """The KMS refused, or cannot be reached; one line naming the fix, never key bytes."""


def is_wrapped(doc: object) -> bool:
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _aad(context: dict[str, str]) -> bytes:
    return json.dumps({"format": FORMAT, **context}, sort_keys=True, separators=(",", ":")).encode()


def _check(data_key: bytes, context: dict[str, str]) -> str:
    return base64.b64encode(hmac.digest(data_key, CHECK_LABEL + _aad(context), "sha256")[:16]).decode()


class Kms:
    """One KMS key and this deployment's context; every call is bounded by STREAMS_KMS_TIMEOUT."""

    def __init__(self, settings: Settings, client: Any = None) -> None:
        assert settings.kms_key_id, "Kms needs STREAMS_KMS_KEY_ID"
        self.key_id = settings.kms_key_id
        self.endpoint = settings.kms_endpoint or "AWS KMS"
        self.context = {"deployment": settings.deployment or settings.app_id, "purpose": PURPOSE}
        self._client = client or _client(settings)
        self._arn: str | None = None

    # --- checks -----------------------------------------------------------------
    def _call(self, operation: str, **kwargs: Any) -> dict:
        import botocore.exceptions as bex

        try:
            return getattr(self._client, operation)(**kwargs)
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError, bex.ConnectionClosedError):
            raise KmsError(
                f"KMS at {self.endpoint} does not answer: check STREAMS_KMS_ENDPOINT and that the KMS runs"
            ) from None
        except bex.NoCredentialsError:
            raise KmsError(
                "no AWS credentials for KMS: use the default credential chain (role, profile, environment) "
                "or STREAMS_AWS_ACCESS_KEY_ID and STREAMS_AWS_SECRET_ACCESS_KEY"
            ) from None
        except bex.ClientError as exc:
            raise self._refusal(operation, exc.response.get("Error", {}).get("Code", "?")) from None

    def _refusal(self, operation: str, code: str) -> KmsError:
        key = f"KMS key {self.key_id!r}"
        if code == "NotFoundException":
            return KmsError(f"{key} does not exist at {self.endpoint}: check STREAMS_KMS_KEY_ID")
        if code in ("DisabledException", "KMSInvalidStateException"):
            return KmsError(f"{key} is not usable ({code}): enable it, or point STREAMS_KMS_KEY_ID at a usable key")
        if code in ("InvalidCiphertextException", "IncorrectKeyException"):
            return KmsError(
                f"the key document does not open with {key} and context {self.context}: wrong key or wrong "
                "STREAMS_DEPLOYMENT (the document was wrapped under another)"
            )
        # moto's IAM check answers a bare "403" where AWS says AccessDeniedException.
        if code in (
            "AccessDeniedException",
            "AccessDenied",
            "403",
            "UnrecognizedClientException",
            "InvalidSignatureException",
        ):
            return KmsError(f"KMS refused {operation} on {key} ({code}): check the credentials and the key policy")
        return KmsError(f"KMS refused {operation} on {key} ({code})")

    def arn(self) -> str:
        """The key's ARN, once it is known to exist and be enabled (moto decrypts with a disabled key: we don't)."""
        if self._arn is None:
            meta = self._call("describe_key", KeyId=self.key_id)["KeyMetadata"]
            state = meta.get("KeyState")
            if state == "PendingDeletion":
                raise KmsError(
                    f"KMS key {self.key_id!r} is pending deletion: cancel the deletion (CancelKeyDeletion) and enable "
                    "it, or migrate to another key"
                )
            if state != "Enabled" or not meta.get("Enabled", False):
                raise KmsError(
                    f"KMS key {self.key_id!r} is {state or 'not enabled'}: enable it, or point STREAMS_KMS_KEY_ID "
                    "at a usable key"
                )
            self._arn = meta["Arn"]
        return self._arn

    # --- envelope -----------------------------------------------------------------
    def wrap(self, keyring_text: str) -> dict:
        """A wrapped document for ``keyring_text`` under a fresh data key."""
        arn = self.arn()
        made = self._call("generate_data_key", KeyId=arn, KeySpec="AES_256", EncryptionContext=self.context)
        data_key = made["Plaintext"]
        nonce = os.urandom(12)
        sealed = AESGCM(data_key).encrypt(nonce, keyring_text.encode(), _aad(self.context))
        return {
            "format": FORMAT,
            "kms_key_arn": made.get("KeyId") or arn,
            "context": dict(self.context),
            "data_key": base64.b64encode(made["CiphertextBlob"]).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "keyring": base64.b64encode(sealed).decode(),
            "check": _check(data_key, self.context),
        }

    def unwrap(self, doc: dict, source: str) -> str:
        """The keyring JSON of a wrapped document, or one line saying why not."""
        arn = self.arn()
        try:
            named, blob = doc["kms_key_arn"], base64.b64decode(doc["data_key"], validate=True)
            nonce, sealed = base64.b64decode(doc["nonce"], validate=True), base64.b64decode(doc["keyring"])
            check = doc["check"]
        except (KeyError, TypeError, ValueError):
            raise KeyMaterialError(f"{source}: not a valid wrapped key document; see docs/privacy.md") from None
        if named != arn:
            raise KmsError(
                f"{source} is wrapped by another KMS key than STREAMS_KMS_KEY_ID={self.key_id!r}: wrong key "
                "(point STREAMS_KMS_KEY_ID at the key that wrapped it)"
            )
        opened = self._call("decrypt", CiphertextBlob=blob, KeyId=arn, EncryptionContext=self.context)
        data_key = opened["Plaintext"]
        if not hmac.compare_digest(_check(data_key, self.context), check):
            raise KmsError(
                f"{source} does not match KMS key {self.key_id!r} and context {self.context}: wrong key or wrong "
                "STREAMS_DEPLOYMENT"
            )
        try:
            return AESGCM(data_key).decrypt(nonce, sealed, _aad(self.context)).decode()
        except InvalidTag:
            raise KeyMaterialError(f"{source}: the wrapped keyring was altered; restore it from backup") from None


def _client(settings: Settings):
    """A botocore KMS client: default credential chain unless explicit keys are set."""
    import botocore.config
    import botocore.session

    explicit = {}
    if settings.aws_access_key_id is not None and settings.aws_secret_access_key is not None:
        explicit = {
            "aws_access_key_id": settings.aws_access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.aws_secret_access_key.get_secret_value(),
        }
    region = settings.kms_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    timeout = settings.kms_timeout
    return botocore.session.get_session().create_client(
        "kms",
        endpoint_url=settings.kms_endpoint or None,
        region_name=region,
        config=botocore.config.Config(
            connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2, "mode": "standard"}
        ),
        **explicit,
    )


def settings_kms(settings: Settings) -> Kms | None:
    """The process's KMS when STREAMS_KMS_KEY_ID is set, else None (plaintext key files, see docs/privacy.md)."""
    return Kms(settings) if settings.kms_key_id else None
