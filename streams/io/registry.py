"""A small client of the Confluent Schema Registry REST API (any compatible registry; Apicurio here).

Only what the pipeline needs: look up the id of a schema under a subject (workers, at
start), fetch the schema of an id (readers, once per id and process), and set the
compatibility and register versions (the deploy step only). Ids live in
``streams.io.codec``'s caches: nothing here runs once per record.

Failures, like ``kafka_security``'s, are one line naming the setting:
- refused credentials or an untrusted certificate: ``ConfigError`` (fail closed);
- no answer, a timeout or a 5xx: ``TransientError`` (waited out with backoff);
- a 404 from a registry that answers: ``NotFound``; an incompatible schema: ``Incompatible``.

Ids: Apicurio's ccompat API hands out **content ids** (``apicurio.ccompat.legacy-id-mode``
is off by default): the same schema text has the same id under every subject, and it is
what ``GET /schemas/ids/<id>`` takes. Confluent's own registry behaves the same way.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from streams.errors import ConfigError, Refused, TransientError
from streams.settings import Settings

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
COMPATIBILITY = "BACKWARD_TRANSITIVE"


class NotFound(Exception):
    """The registry answered: no such subject, schema or id."""


class Incompatible(Refused):
    """The registry refused a schema version (compatibility rule or invalid schema)."""


def subject(topic: str) -> str:
    """The subject of a topic's values (TopicNameStrategy, what Connect and ksqlDB expect)."""
    return f"{topic}-value"


class SchemaRegistry:
    """Blocking HTTP calls (urllib, no extra dependency); async callers run them in a thread."""

    def __init__(self, settings: Settings) -> None:
        assert settings.schema_registry_url, "no STREAMS_SCHEMA_REGISTRY_URL"
        self.settings = settings
        self.url = settings.schema_registry_url.rstrip("/")
        self.timeout = settings.schema_registry_timeout
        self._headers = {"Accept": CONTENT_TYPE, "Content-Type": CONTENT_TYPE}
        if settings.schema_registry_username is not None:
            assert settings.schema_registry_password is not None  # load_settings checked the pair
            pair = f"{settings.schema_registry_username}:{settings.schema_registry_password.get_secret_value()}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        self._context = ssl_context(settings) if self.url.startswith("https://") else None

    # --- the API calls ----------------------------------------------------------------
    def schema(self, schema_id: int) -> str:
        """The schema text of an id (``NotFound`` if the registry has no such id)."""
        return self._call("GET", f"/schemas/ids/{schema_id}")["schema"]

    def lookup(self, subject_name: str, schema: str) -> int:
        """The id of ``schema`` as registered under the subject (``NotFound`` if it is not)."""
        return int(self._call("POST", f"/subjects/{_quote(subject_name)}", {"schema": schema})["id"])

    def register(self, subject_name: str, schema: str) -> int:
        """Register a version (idempotent: an existing one keeps its id); ``Incompatible`` if refused."""
        return int(self._call("POST", f"/subjects/{_quote(subject_name)}/versions", {"schema": schema})["id"])

    def set_compatibility(self, subject_name: str, level: str = COMPATIBILITY) -> None:
        self._call("PUT", f"/config/{_quote(subject_name)}", {"compatibility": level})

    def compatibility(self, subject_name: str) -> str | None:
        try:
            answer = self._call("GET", f"/config/{_quote(subject_name)}")
        except NotFound:
            return None
        return answer.get("compatibilityLevel") or answer.get("compatibility")

    def subjects(self) -> list[str]:
        return list(self._call("GET", "/subjects"))

    def check(self) -> None:
        """One cheap call at start (``GET /config``): reachable, credentials and TLS accepted, the right URL."""
        try:
            self._call("GET", "/config")
        except NotFound:
            raise ConfigError(
                f"{self.url}/config answered 404: STREAMS_SCHEMA_REGISTRY_URL must be the base of the "
                "Confluent-compatible API (Apicurio: http://host:port/apis/ccompat/v7)"
            ) from None

    # --- transport --------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers)
        where = f"the schema registry at {self.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as response:
                answer = response.read()
        except urllib.error.HTTPError as exc:
            status, message = exc.code, _message(exc)
            if status in (401, 403):
                who = (
                    f"user {self.settings.schema_registry_username!r}"
                    if self.settings.schema_registry_username
                    else "anonymous"
                )
                raise ConfigError(
                    f"{where} refused {who} (HTTP {status}): check STREAMS_SCHEMA_REGISTRY_USERNAME and "
                    "STREAMS_SCHEMA_REGISTRY_PASSWORD"
                ) from None
            if status == 404:
                raise NotFound(message) from None
            if status in (409, 422):
                raise Incompatible(message) from None
            if status >= 500 or status == 429:
                raise TransientError(f"{where} answered HTTP {status}: {message}") from None
            raise ConfigError(f"{where} answered HTTP {status} to {method} {path}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, ssl.SSLCertVerificationError):
                if "hostname" in str(reason).lower() or "ip address mismatch" in str(reason).lower():
                    raise ConfigError(
                        f"{where}: its TLS certificate does not match its host name: check STREAMS_SCHEMA_REGISTRY_URL"
                    ) from None
                raise ConfigError(
                    f"{where}: its TLS certificate is not trusted: check STREAMS_SCHEMA_REGISTRY_CA_FILE"
                    + ("" if self.settings.schema_registry_ca_file else " (unset: the system trust store was used)")
                ) from None
            if isinstance(reason, ssl.SSLError):
                raise ConfigError(
                    f"{where}: TLS handshake failed ({type(reason).__name__}): check STREAMS_SCHEMA_REGISTRY_URL, "
                    "_CA_FILE and _CERT_FILE/_KEY_FILE"
                ) from None
            raise TransientError(
                f"cannot reach {where} ({type(reason).__name__}): start it (`streams stack up` locally) or check "
                "STREAMS_SCHEMA_REGISTRY_URL"
            ) from None
        try:
            return json.loads(answer or b"null")
        except ValueError:
            raise ConfigError(
                f"{where} answered {method} {path} with something that is not JSON: STREAMS_SCHEMA_REGISTRY_URL "
                "must be the base of the Confluent-compatible API"
            ) from None


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The CA file (or the system store), the host name checked, a client certificate if set."""
    s = settings
    try:
        context = ssl.create_default_context(
            cafile=str(s.schema_registry_ca_file) if s.schema_registry_ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"invalid setting STREAMS_SCHEMA_REGISTRY_CA_FILE: not a PEM CA bundle ({type(exc).__name__})"
        ) from None
    if s.schema_registry_cert_file is not None:
        try:
            context.load_cert_chain(str(s.schema_registry_cert_file), str(s.schema_registry_key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "invalid setting STREAMS_SCHEMA_REGISTRY_CERT_FILE / STREAMS_SCHEMA_REGISTRY_KEY_FILE: "
                f"certificate and key do not load ({type(exc).__name__})"
            ) from None
    return context


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _message(exc: urllib.error.HTTPError) -> str:
    """The registry's own error message (schema and subject names, never record data)."""
    try:
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return exc.reason or ""
    text = body.get("message") if isinstance(body, dict) else None
    return str(text or exc.reason or "")[:300]
