"""Schemas as code: the deploy step registers every schema version with the registry.

``streams topics apply`` and ``streams migrate`` (and ``streams run``, which migrates
first) call ``register``. For each topic the subject is ``<topic>-value`` (TopicNameStrategy,
what Kafka Connect's converters and ksqlDB look up); its compatibility is set to
``BACKWARD_TRANSITIVE`` explicitly (a registry's default may differ), then every
``schemas/<name>.v<N>.avsc`` is registered in version order, so a reader with the latest
schema can read every record ever written. A version the registry refuses (not backward
compatible with all earlier ones) stops the deploy in one line. Registering again is a
no-op: a version already there keeps its id.

Workers and the bridge never register: they look their schema up at start
(``streams.io.codec.Codecs.from_settings``) and refuse to start if it is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from streams.errors import Refused
from streams.io.codec import SCHEMA_DIR, schema_text, schema_versions, topic_of_schema
from streams.io.registry import COMPATIBILITY, Incompatible, SchemaRegistry, subject
from streams.retry import wait_at_start
from streams.settings import Settings

log = logging.getLogger(__name__)


def register(settings: Settings, schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Register every schema version under its topic's subject; one line per subject.

    Nothing to do (``[]``) without ``STREAMS_SCHEMA_REGISTRY_URL``.
    """
    if not settings.schema_registry_url:
        return []
    registry = SchemaRegistry(settings)
    wait_at_start(registry.check, "schema registry", log, settings.startup_timeout)  # down: waited out
    lines = []
    for name, topic in topic_of_schema(settings).items():
        subject_name = subject(topic)
        registry.set_compatibility(subject_name, COMPATIBILITY)
        ids = []
        versions = sorted(schema_versions(name, schema_dir).items())
        for version, schema in versions:
            try:
                ids.append(registry.register(subject_name, schema_text(schema)))
            except Incompatible as exc:
                raise Refused(
                    f"schema {name} v{version} refused by the schema registry for subject {subject_name} "
                    f"({COMPATIBILITY}): {exc}; schema changes must stay backward compatible (docs/records.md)"
                ) from None
        log.info("registered %s versions under %s: ids %s", name, subject_name, ids)
        lines.append(
            f"{subject_name}: {name} v{versions[0][0]}..v{versions[-1][0]} registered "
            f"(ids {', '.join(map(str, ids))}), {COMPATIBILITY}"
        )
    return lines
