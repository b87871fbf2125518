"""SQS access (aiobotocore): client, queue lookup, seeding and depth."""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from aiobotocore.session import get_session
from botocore import __version__ as botocore_version
from botocore.config import Config
from botocore.exceptions import ClientError

from streams import __version__ as streams_version
from streams.errors import ConfigError, Refused
from streams.settings import Settings

BATCH = 10  # SQS's limit for batch send, receive and delete


def lean_config() -> dict:
    """botocore options for the bridge's hot loop, which makes the same few calls millions of times.

    - no client-side parameter validation: the calls' parameters are fixed by code (and
      tested); SQS itself still validates every request;
    - a fixed User-Agent: botocore otherwise rebuilds and sanitises its ~40-part header
      twice per call.

    Together about a tenth of the bridge's CPU per message (docs/operations.md, Bridge).
    """
    return {
        "parameter_validation": False,
        "user_agent": f"streams-bridge/{streams_version} botocore/{botocore_version}",
    }


@asynccontextmanager
async def sqs_client(settings: Settings, max_pool: int = 20, lean: bool = False):
    """An SQS client. Keys only when both STREAMS_AWS_* are given; otherwise botocore's default
    chain (environment, shared config and credentials files / AWS_PROFILE, web identity
    (IRSA), container and instance roles), exactly as the AWS CLI would find them.
    ``lean``: the bridge's options (``lean_config``)."""
    session = get_session()
    region = settings.region or session.get_config_variable("region")
    if not region:
        raise ConfigError(
            "no AWS region: set STREAMS_SQS_REGION (or AWS_REGION / AWS_DEFAULT_REGION, or a profile's region)"
        )
    keys = {}
    if settings.aws_access_key_id is not None and settings.aws_secret_access_key is not None:
        keys = {
            "aws_access_key_id": settings.aws_access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.aws_secret_access_key.get_secret_value(),
        }
    elif await session.get_credentials() is None:
        raise ConfigError(
            "no AWS credentials found (environment, AWS_PROFILE / shared files, web identity, instance role): "
            "provide them the AWS way, or set STREAMS_AWS_ACCESS_KEY_ID and STREAMS_AWS_SECRET_ACCESS_KEY"
        )
    async with session.create_client(
        "sqs",
        endpoint_url=settings.sqs_endpoint,
        region_name=region,
        config=Config(
            max_pool_connections=max_pool,
            retries={"max_attempts": 3, "mode": "standard"},
            **(lean_config() if lean else {}),
        ),
        **keys,
    ) as client:
        yield client


_MISSING = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


async def queue_url(client, settings: Settings) -> str:
    """The configured queue's URL: STREAMS_SQS_QUEUE_URL, or GetQueueUrl of STREAMS_SQS_QUEUE.

    A missing queue is created only with STREAMS_SQS_CREATE_QUEUE=1 (local stack, dev runs);
    otherwise it is one line naming the settings. Production needs only
    ``sqs:GetQueueUrl`` (or the URL), never ``sqs:CreateQueue``.
    """
    if settings.sqs_queue_url:
        try:
            await client.get_queue_attributes(QueueUrl=settings.sqs_queue_url, AttributeNames=["QueueArn"])
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise ConfigError(
                    f"no SQS queue at STREAMS_SQS_QUEUE_URL={settings.sqs_queue_url}: check the URL"
                ) from None
            raise _client_failure(exc, "GetQueueAttributes") from None
        return settings.sqs_queue_url
    try:
        return (await client.get_queue_url(QueueName=settings.sqs_queue))["QueueUrl"]
    except ClientError as exc:
        if _code(exc) not in _MISSING:
            raise _client_failure(exc, "GetQueueUrl") from None
    if settings.sqs_create_queue:
        return await ensure_queue(client, settings.sqs_queue)
    raise ConfigError(
        f"SQS queue {settings.sqs_queue!r} does not exist: check STREAMS_SQS_QUEUE (or set STREAMS_SQS_QUEUE_URL); "
        "STREAMS_SQS_CREATE_QUEUE=1 creates it, for the local stack only"
    )


async def ensure_queue(client, name: str) -> str:
    """Queue URL, creating the queue if it does not exist (local stack, dev mode and tests only)."""
    return (await client.create_queue(QueueName=name))["QueueUrl"]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


_DENIED = (
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "ExpiredToken",
    "ExpiredTokenException",
)


def _client_failure(exc: ClientError, action: str) -> Exception:
    """An SQS refusal that no retry fixes becomes one line; others stay as they are (retried)."""
    code = _code(exc)
    if code in _DENIED:
        return ConfigError(f"SQS refused {action} ({code}): check the AWS credentials and that they allow sqs:{action}")
    return exc


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
