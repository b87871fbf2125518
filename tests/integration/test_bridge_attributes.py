"""The bridge's ReceiveMessage asks only for the kept attributes: what travels is unchanged."""

from __future__ import annotations

import asyncio

import pytest

from streams.io.sqs import queue_url, sqs_client

pytestmark = pytest.mark.integration

KEEP = "SentTimestamp,ApproximateReceiveCount,attr.trace,NoSuchAttribute"


async def _send_with_attributes(settings) -> str:
    async with sqs_client(settings) as sqs:
        url = await queue_url(sqs, settings)
        sent = await sqs.send_message(
            QueueUrl=url,
            MessageBody='{"user_id": "a"}',
            MessageAttributes={
                "trace": {"DataType": "String", "StringValue": "t-1"},
                "email": {"DataType": "String", "StringValue": "a@b.c"},
            },
        )
        return sent["MessageId"]


def test_kept_attributes_travel_and_an_unknown_name_breaks_nothing(pipeline):
    message_id = asyncio.run(_send_with_attributes(pipeline.settings))
    pipeline.start("bridge", STREAMS_BRIDGE_ATTRIBUTES=KEEP)
    raw = pipeline.wait_for(lambda: pipeline.topic(pipeline.settings.raw_topic), 60, "the raw record")
    key, value = raw[0]
    envelope = pipeline.codecs.raw.decode(value)
    assert key == message_id.encode() and envelope["message_id"] == message_id
    # the allow-list, not SQS's defaults: no SenderId, no email (not kept), the unknown name just absent
    assert set(envelope["attributes"]) == {"SentTimestamp", "ApproximateReceiveCount", "attr.trace"}
    assert envelope["attributes"]["attr.trace"] == "t-1"
    assert envelope["sent_at"].timestamp() * 1000 == int(envelope["attributes"]["SentTimestamp"])
    pipeline.wait_for(lambda: pipeline.queue_depth() == 0, 30, "the message deleted from SQS")
