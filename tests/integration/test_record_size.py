"""Record size in the mask transaction (issue 18 item 2): the size check and the broker's refusal.

A record Kafka refuses aborts the whole transaction, so the mask stage checks each
serialized record (key + value) against the topic's ``max.message.bytes`` minus
``SIZE_MARGIN`` before it produces; a record the broker refuses anyway (the limit was
lowered after start) aborts one transaction and is dead-lettered on the retry.
Compression (lz4) stays on throughout.
"""

from __future__ import annotations

import json

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from streams.io.kafka import admin_client, send_records
from streams.ops.topics import ensure_topics, topic_configs
from streams.pipeline.mask import MaskTransform
from streams.pipeline.transactions import SIZE_MARGIN
from streams.privacy.keys import settings_keyring
from streams.privacy.masking import Masker
from tests.factories import LOGIN, raw_value

pytestmark = pytest.mark.integration


def login(user_chars: int) -> str:
    return json.dumps({**LOGIN, "user_id": "u" * user_chars})


def test_a_record_at_the_margin_is_written_and_one_byte_over_is_dead_lettered(pipeline):
    s = pipeline.settings
    assert pipeline.run("keys", "init").returncode == 0
    transform = MaskTransform(Masker(settings_keyring(s)), pipeline.codecs)  # the wire format the worker writes

    def size(message_id: str, chars: int) -> int:
        out = transform(message_id.encode(), raw_value(message_id, login(chars)), "t/0/0")
        assert out.reason is None
        return len(out.key) + len(out.value)

    at, over = "at-margin", "over-marg"  # same length: the sizes differ by the user id only
    max_bytes = size(at, 60) + SIZE_MARGIN
    assert size(over, 61) == size(at, 60) + 1
    admin = admin_client(s)
    topics = [
        NewTopic(
            s.masked_topic,
            s.topic_partitions,
            1,
            config={**topic_configs(s)[s.masked_topic], "max.message.bytes": str(max_bytes)},
        ),
    ]
    for future in admin.create_topics(topics).values():
        future.result()
    ensure_topics(s)  # the others as the settings describe them (the start-up check verifies their bounds)
    send_records(
        s,
        [
            (s.raw_topic, at.encode(), raw_value(at, login(60))),
            (s.raw_topic, over.encode(), raw_value(over, login(61))),
        ],
    )
    pipeline.start("worker", STREAMS_STAGES="mask")
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "both records masked or dead-lettered")
    masked = [k.decode() for k, _ in pipeline.topic(s.masked_topic)]
    dead = [(d["message_id"], d["reason"]) for d in pipeline.dead_letters()]
    assert masked == [at]
    assert dead == [(over, "too_large")]

    # The limit lowered under a running worker: the broker refuses, one transaction aborts,
    # and on the retry the record is dead-lettered; the next records go through.
    resource = ConfigResource(
        ResourceType.TOPIC,
        s.masked_topic,
        incremental_configs=[ConfigEntry("max.message.bytes", "200", incremental_operation=AlterConfigOpType.SET)],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result()
    refused = "refused"
    send_records(s, [(s.raw_topic, refused.encode(), raw_value(refused, login(60)))])
    pipeline.wait_for(lambda: pipeline.lag([s.raw_topic]) == 0, 120, "the refused record dead-lettered")
    dead = sorted((d["message_id"], d["reason"]) for d in pipeline.dead_letters())  # two partitions: no order
    assert dead == [(over, "too_large"), (refused, "too_large")]
    assert pipeline.logs().count("transaction aborted") == 1
