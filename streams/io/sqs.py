"""SQS access (aiobotocore): client, queue lookup, seeding and depth."""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from aiobotocore.session import get_session
from botocore.config import Config

from streams.errors import Refused
from streams.settings import Settings

BATCH = 10  # SQS's limit for batch send, receive and delete


@asynccontextmanager
async def sqs_client(settings: Settings, max_pool: int = 20):
    async with get_session().create_client(
        "sqs",
        endpoint_url=settings.sqs_endpoint,
        region_name=settings.sqs_region,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value(),
        aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
        config=Config(max_pool_connections=max_pool, retries={"max_attempts": 3, "mode": "standard"}),
    ) as client:
        yield client


async def queue_url(client, settings: Settings) -> str:
    """The configured queue's URL."""
    return await ensure_queue(client, settings.sqs_queue)


async def ensure_queue(client, name: str) -> str:
    """Queue URL, creating the queue if it does not exist (local stack and tests)."""
    return (await client.create_queue(QueueName=name))["QueueUrl"]


async def queue_depth(client, queue_url: str) -> int:
    """Visible plus in-flight messages: zero means the bridge has nothing left to do."""
    attrs = (
        await client.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def bodies_from_file(path: Path) -> list[str]:
    """Bodies of a JSON array file (``streams seed``); ``Refused`` naming the problem."""
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise Refused(f"no such file {path}") from None
    except json.JSONDecodeError as exc:
        raise Refused(f"{path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise Refused(f"{path} must hold a JSON array of records")
    return bodies_from_json(records)


async def send_to_queue(settings: Settings, bodies: list[str]) -> list[str]:
    """Send ``bodies`` to the configured queue; their SQS message ids."""
    async with sqs_client(settings) as sqs:
        return await send_bodies(sqs, await queue_url(sqs, settings), bodies)


def bodies_from_json(records: Iterable[object]) -> list[str]:
    """Objects become their JSON text; strings are sent verbatim (to seed malformed bodies)."""
    return [item if isinstance(item, str) else json.dumps(item) for item in records]


async def send_bodies(client, queue_url: str, bodies: list[str]) -> list[str]:
    """Send bodies in batches of ten; returns the SQS message ids in order."""
    ids: list[str] = []
    for start in range(0, len(bodies), BATCH):
        chunk = bodies[start : start + BATCH]
        entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(chunk)]
        response = await client.send_message_batch(QueueUrl=queue_url, Entries=entries)
        if response.get("Failed"):
            failed = response["Failed"][0]
            raise Refused(f"SQS refused {len(response['Failed'])} messages: {failed.get('Code')}")
        by_entry = {int(ok["Id"]): ok["MessageId"] for ok in response["Successful"]}
        ids.extend(by_entry[i] for i in range(len(chunk)))
    return ids
