"""SQS as AWS does it: the default credential chain, region from the usual variables, no CreateQueue.

ElasticMQ accepts any credentials, so what is checked is which access key id signed each
request: the SigV4 ``Authorization`` header botocore sends (``before-send``), whose
``Credential=`` scope also names the region.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import pytest

from streams.errors import ConfigError
from streams.io.sqs import queue_url, send_bodies, sqs_client
from streams.settings import Settings

pytestmark = pytest.mark.integration

CREDENTIAL = re.compile(r"Credential=([A-Z0-9]+)/\d{8}/([a-z0-9-]+)/sqs/aws4_request")
AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture
def aws_env(monkeypatch, tmp_path: Path):
    """No AWS or STREAMS_ credentials from the machine: empty shared files, no instance metadata."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in (
        "STREAMS_AWS_ACCESS_KEY_ID",
        "STREAMS_AWS_SECRET_ACCESS_KEY",
        "STREAMS_SQS_REGION",
        "STREAMS_SQS_QUEUE_URL",
        "STREAMS_SQS_CREATE_QUEUE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def settings(stack_settings: Settings, **kw) -> Settings:
    kw.setdefault("sqs_queue", f"creds-{uuid.uuid4().hex[:10]}")
    return Settings(sqs_endpoint=stack_settings.sqs_endpoint, **kw)


def signed_by(s: Settings) -> tuple[set[tuple[str, str]], list[str]]:
    """Look up (creating: the flag is on) the queue and send a message; (key id, region) pairs and operations."""
    seen: set[tuple[str, str]] = set()
    operations: list[str] = []

    def before_send(request, **_):
        header = request.headers.get("Authorization", "")
        match = CREDENTIAL.search(header.decode() if isinstance(header, bytes) else header)
        assert match, "every request is signed"
        seen.add((match.group(1), match.group(2)))

    def before_call(model, **_):
        operations.append(model.name)

    async def go() -> None:
        async with sqs_client(s) as sqs:
            sqs.meta.events.register("before-send.sqs", before_send)
            sqs.meta.events.register("before-call.sqs", before_call)
            url = await queue_url(sqs, s)
            await send_bodies(sqs, url, ["{}"])

    asyncio.run(go())
    return seen, operations


def test_no_keys_uses_the_environment_of_the_default_chain(aws_env, stack_settings):
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT0001")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    aws_env.setenv("AWS_REGION", "eu-west-1")
    seen, operations = signed_by(settings(stack_settings, sqs_create_queue=True))
    assert seen == {("AKIAENVIRONMENT0001", "eu-west-1")}
    assert operations == ["GetQueueUrl", "CreateQueue", "SendMessageBatch"]


def test_no_keys_uses_a_shared_config_profile(aws_env, stack_settings, tmp_path):
    (tmp_path / "aws-config").write_text("[profile streams-test]\nregion = ap-southeast-2\n")
    (tmp_path / "aws-credentials").write_text(
        "[streams-test]\naws_access_key_id = AKIAPROFILE00000002\naws_secret_access_key = profile-secret\n"
    )
    aws_env.setenv("AWS_PROFILE", "streams-test")
    seen, _ = signed_by(settings(stack_settings, sqs_create_queue=True))
    assert seen == {("AKIAPROFILE00000002", "ap-southeast-2")}  # the profile's region too


def test_explicit_keys_and_region_win_only_when_given(aws_env, stack_settings):
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT0001")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    aws_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s = settings(
        stack_settings,
        sqs_create_queue=True,
        sqs_region="us-west-2",
        aws_access_key_id="AKIAEXPLICIT0000003",
        aws_secret_access_key="explicit-secret",
    )
    seen, _ = signed_by(s)
    assert seen == {("AKIAEXPLICIT0000003", "us-west-2")}


def test_a_queue_url_is_used_as_given_and_nothing_is_created(aws_env, stack_settings):
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT0001")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    aws_env.setenv("AWS_REGION", "us-east-1")
    first = settings(stack_settings, sqs_create_queue=True)
    signed_by(first)  # the queue now exists
    url = f"{stack_settings.sqs_endpoint}/000000000000/{first.sqs_queue}"
    _, operations = signed_by(settings(stack_settings, sqs_queue_url=url))
    assert "CreateQueue" not in operations and "GetQueueUrl" not in operations
    _, operations = signed_by(settings(stack_settings, sqs_queue=first.sqs_queue))
    assert operations[0] == "GetQueueUrl" and "CreateQueue" not in operations


def test_a_missing_queue_without_the_create_flag_is_one_line(aws_env, stack_settings):
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT0001")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    aws_env.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(ConfigError, match="STREAMS_SQS_QUEUE .*STREAMS_SQS_QUEUE_URL"):
        signed_by(settings(stack_settings))
    url = f"{stack_settings.sqs_endpoint}/000000000000/missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError, match="STREAMS_SQS_QUEUE_URL"):
        signed_by(settings(stack_settings, sqs_queue_url=url))


def test_no_credentials_or_no_region_is_one_line(aws_env, stack_settings):
    with pytest.raises(ConfigError, match="no AWS credentials"):
        signed_by(settings(stack_settings, sqs_region="us-east-1"))
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT0001")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    with pytest.raises(ConfigError, match="STREAMS_SQS_REGION"):
        signed_by(settings(stack_settings))


def test_the_bridge_refuses_a_missing_queue_in_one_line_and_runs_on_the_default_chain(pipeline, aws_env):
    """The bridge process: no STREAMS_AWS_* keys, credentials from the environment, no create flag."""
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT0001")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    aws_env.setenv("AWS_REGION", "us-east-1")
    for name in ("STREAMS_AWS_ACCESS_KEY_ID", "STREAMS_AWS_SECRET_ACCESS_KEY", "STREAMS_SQS_REGION"):
        pipeline.env.pop(name)
    pipeline.env["STREAMS_SQS_CREATE_QUEUE"] = "0"

    result = pipeline.run("bridge", timeout=90, STREAMS_LOG_LEVEL="WARNING")  # the INFO logs are not the error
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "STREAMS_SQS_QUEUE" in lines[0] and "STREAMS_SQS_QUEUE_URL" in lines[0]
    assert "env-secret" not in result.stderr

    # Once the queue exists (here: dev mode makes it), the bridge runs on those credentials.
    created = pipeline.run("ping", "sqs", STREAMS_SQS_CREATE_QUEUE="1")
    assert created.returncode == 0, created.stderr
    ids = pipeline.send(["{}"])
    bridge = pipeline.start("bridge")
    pipeline.wait_for(lambda: pipeline.queue_depth() == 0, 60, "the message bridged")
    assert pipeline.stop(bridge) == 0
    assert ids[0].encode() in {k for k, _ in pipeline.topic(pipeline.settings.raw_topic)}
