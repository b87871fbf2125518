"""Which keys running mask workers write under, as the workers advertise it in Kafka.

A mask worker's Kafka client id names the encryption key id and join version it loaded
(``<app_id>-mask.<key id>.<join version>``; ids, never key bytes). A running worker is a
member of its consumer group, and Kafka lists each member's client id to anyone allowed
to describe the group, so ``streams keys retire`` sees every live writer without the
workers needing any database or DDL rights, and a dead worker drops out by itself when
its session expires (``session.timeout.ms``, 10 s here).
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException

from streams.errors import Refused
from streams.privacy.keys import KeyRing
from streams.settings import Settings


@dataclass(frozen=True)
class KeyUse:
    group: str
    client_id: str
    host: str
    encryption_key_id: str
    join_version: str


def client_id(settings: Settings, keyring: KeyRing | None) -> str:
    """The client id a mask worker's Kafka clients (its consumer at least) must use; a
    worker without keys (sink only) gets a plain one."""
    if keyring is None:
        return f"{settings.app_id}-worker"
    return f"{settings.app_id}-mask.{keyring.encryption_key_id}.{keyring.join_version}"


def parse_client_id(settings: Settings, text: str) -> tuple[str, str] | None:
    """``(key id, join version)`` a client id advertises, or None if it is not a mask worker's."""
    parts = text.rsplit(".", 2)
    if len(parts) != 3 or parts[0] != f"{settings.app_id}-mask":
        return None
    return parts[1], parts[2]


def mask_groups(settings: Settings) -> list[str]:
    """The groups a mask worker can be a member of: the stage's own, and the Faust app's shared one."""
    return [f"{settings.app_id}-mask", settings.app_id]


def running_writers(settings: Settings, timeout: float | None = None) -> list[KeyUse]:
    """Every live mask worker and the keys it writes under; refuses if Kafka cannot tell."""
    from streams.io.kafka import admin_client

    timeout = settings.kafka_timeout if timeout is None else timeout
    admin = admin_client(settings)
    found = []
    try:
        futures = admin.describe_consumer_groups(mask_groups(settings), request_timeout=timeout)
        for group, future in futures.items():
            description = future.result()
            for member in description.members:
                keys = parse_client_id(settings, member.client_id)
                if keys is not None:
                    found.append(KeyUse(group, member.client_id, member.host, *keys))
    except KafkaException as exc:
        raise Refused(
            f"cannot tell which keys running workers use: Kafka said {exc.args[0].name()} for the worker groups "
            f"{', '.join(mask_groups(settings))} (check STREAMS_KAFKA_* and the principal's DESCRIBE right on them)"
        ) from None
    return found
