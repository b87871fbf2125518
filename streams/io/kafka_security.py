"""Kafka security settings, mapped once into both client dialects, and failures as one line.

The worker runs two Kafka clients: aiokafka inside Faust (consuming) and librdkafka
(producing, admin, every command). One set of ``STREAMS_KAFKA_*`` settings feeds both:

| setting | librdkafka | aiokafka (Faust ``broker_credentials``) |
|---|---|---|
| ``SECURITY_PROTOCOL`` | ``security.protocol`` | ``SSLCredentials`` / ``SASLCredentials`` (protocol) |
| ``SASL_MECHANISM`` | ``sasl.mechanism`` | ``SASLCredentials(mechanism=)`` |
| ``SASL_USERNAME`` / ``SASL_PASSWORD`` | ``sasl.username`` / ``sasl.password`` | ``SASLCredentials(username=, password=)`` |
| ``SSL_CA_FILE`` | ``ssl.ca.location`` | ``ssl.create_default_context(cafile=)`` |
| ``SSL_CERT_FILE`` / ``SSL_KEY_FILE`` / ``SSL_KEY_PASSWORD`` | ``ssl.certificate.location`` / ``ssl.key.location`` / ``ssl.key.password`` | ``SSLContext.load_cert_chain`` |

Without a CA file both verify the broker against the system trust store, and both check
the broker's host name. Secrets never appear in a message.
"""

from __future__ import annotations

import ssl
from typing import Any

from streams.errors import ConfigError
from streams.settings import Settings


def uses_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def librdkafka_security(settings: Settings) -> dict[str, Any]:
    """The librdkafka properties of the security settings (nothing for PLAINTEXT)."""
    s = settings
    if s.kafka_security_protocol == "PLAINTEXT":
        return {}
    conf: dict[str, Any] = {"security.protocol": s.kafka_security_protocol.lower()}
    if uses_sasl(s):
        assert s.kafka_sasl_password is not None  # load_settings checked it
        conf["sasl.mechanism"] = s.kafka_sasl_mechanism
        conf["sasl.username"] = s.kafka_sasl_username
        conf["sasl.password"] = s.kafka_sasl_password.get_secret_value()
    if uses_tls(s):
        conf["ssl.endpoint.identification.algorithm"] = "https"
        if s.kafka_ssl_ca_file is not None:
            conf["ssl.ca.location"] = str(s.kafka_ssl_ca_file)
        if s.kafka_ssl_cert_file is not None:
            conf["ssl.certificate.location"] = str(s.kafka_ssl_cert_file)
            conf["ssl.key.location"] = str(s.kafka_ssl_key_file)
            if s.kafka_ssl_key_password is not None:
                conf["ssl.key.password"] = s.kafka_ssl_key_password.get_secret_value()
    return conf


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context aiokafka uses: the CA file (or the system store), hostname checked."""
    s = settings
    try:
        context = ssl.create_default_context(
            purpose=ssl.Purpose.SERVER_AUTH, cafile=str(s.kafka_ssl_ca_file) if s.kafka_ssl_ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"invalid setting STREAMS_KAFKA_SSL_CA_FILE: not a PEM CA bundle ({type(exc).__name__})"
        ) from None
    if s.kafka_ssl_cert_file is not None:
        password = s.kafka_ssl_key_password.get_secret_value() if s.kafka_ssl_key_password else None
        try:
            context.load_cert_chain(str(s.kafka_ssl_cert_file), str(s.kafka_ssl_key_file), password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "invalid setting STREAMS_KAFKA_SSL_CERT_FILE / STREAMS_KAFKA_SSL_KEY_FILE: "
                f"certificate and key do not load ({type(exc).__name__})"
            ) from None
    return context


def faust_credentials(settings: Settings) -> Any:
    """Faust's ``broker_credentials`` for the security settings (None for PLAINTEXT)."""
    import faust

    s = settings
    if s.kafka_security_protocol == "PLAINTEXT":
        return None
    if s.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(ssl_context(s))
    assert s.kafka_sasl_password is not None
    credentials = faust.SASLCredentials(
        username=s.kafka_sasl_username,
        password=s.kafka_sasl_password.get_secret_value(),
        mechanism=s.kafka_sasl_mechanism,
        ssl_context=ssl_context(s) if uses_tls(s) else None,
    )
    return credentials


def explain(settings: Settings, errors: list[Any], timeout: float, what: str = "Kafka") -> str:
    """One line for a connection that failed, naming the setting to check.

    ``errors`` are the ``KafkaError``s librdkafka reported while trying (its error
    callback), most recent last; the most telling one decides the message.
    """
    from confluent_kafka import KafkaError

    s = settings
    where = f"{what} at {s.kafka_bootstrap} ({s.kafka_security_protocol})"
    codes = {e.code() for e in errors}
    tls_text = " ".join(e.str() for e in errors if e.code() in (KafkaError._SSL, KafkaError._TRANSPORT)).lower()
    if KafkaError._SSL in codes or "ssl routines" in tls_text:
        if "certificate verify failed" in tls_text and ("hostname" in tls_text or "ip address mismatch" in tls_text):
            return f"{where}: the broker's TLS certificate does not match its host name: check STREAMS_KAFKA_BOOTSTRAP"
        if "certificate verify failed" in tls_text or "could not be verified" in tls_text:
            return f"{where}: the broker's TLS certificate is not trusted: check STREAMS_KAFKA_SSL_CA_FILE" + (
                "" if s.kafka_ssl_ca_file else " (unset: the system trust store was used)"
            )
        if uses_tls(s):
            return f"{where}: TLS handshake failed: check STREAMS_KAFKA_SSL_CA_FILE and STREAMS_KAFKA_SSL_CERT_FILE/KEY_FILE"
        return f"{where}: the listener speaks TLS: set STREAMS_KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL"
    if KafkaError._AUTHENTICATION in codes:
        if uses_sasl(s):
            return (
                f"{where} refused the SASL {s.kafka_sasl_mechanism} login of user {s.kafka_sasl_username!r}: "
                "check STREAMS_KAFKA_SASL_PASSWORD (and STREAMS_KAFKA_SASL_USERNAME, STREAMS_KAFKA_SASL_MECHANISM)"
            )
        return f"{where} wants authentication: set STREAMS_KAFKA_SECURITY_PROTOCOL and STREAMS_KAFKA_SASL_*"
    if KafkaError.TOPIC_AUTHORIZATION_FAILED in codes or KafkaError.CLUSTER_AUTHORIZATION_FAILED in codes:
        return f"{where} denied access to {s.kafka_sasl_username or 'this client'}: check the principal's ACLs"
    return (
        f"cannot reach {where} within {timeout:g}s: start it (`streams stack up` locally) or check "
        "STREAMS_KAFKA_BOOTSTRAP and STREAMS_KAFKA_SECURITY_PROTOCOL"
    )
