"""The KMS calls real processes make are the ones the documented key policies allow (issue 19).

moto, the stack's KMS, evaluates no key policy and no condition, so a drift between the
EncryptionContexts the code sends and deploy/kms/*.json would pass every other test and
fail only on AWS, at start. Here a recording HTTP proxy sits in front of the stack's moto
(the calls still go to moto and get its real answers); each process runs with the
credentials of its role (moto accepts any key; the proxy reads the access key id from the
request's signature), so every recorded call is (role, operation, key, context). Each is
checked with the policy evaluator (tests/key_policy.py) against the policy of the key it
names, and shown to be denied with a changed context value and under a role that should
not make it, so the test cannot pass by allowing everything.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import botocore.session
import pytest

from tests.key_policy import Call, allowed, decide
from tests.unit.test_key_policy import policy

pytestmark = pytest.mark.integration

DEPLOYMENT = "prod"  # the deployment the policy files name
ARN = "arn:aws:iam::ACCOUNT:role/"
ROLES = {  # access key id -> the role whose credentials a process runs with
    "STREAMSWORKER": ARN + "streams-worker",
    "STREAMSCUSTODIAN": ARN + "streams-key-custodian",
    "STREAMSREVEAL": ARN + "streams-reveal",
    "STREAMSKEYADMIN": ARN + "streams-key-admin",
    "STREAMSERASER": ARN + "streams-eraser",
    "STREAMSBRIDGE": ARN + "streams-bridge",
}
LOGINS = [
    {
        "user_id": f"u-policy-{i % 2}",
        "app_version": "2.3.0",
        "device_type": "ios",
        "ip": f"198.51.100.{i + 10}",
        "locale": "DE",
        "device_id": f"policy-dev-{i}",
    }
    for i in range(3)
]


def creds(name: str) -> dict[str, str]:
    key = next(k for k, arn in ROLES.items() if arn.endswith("/" + name))
    return {"STREAMS_AWS_ACCESS_KEY_ID": key, "STREAMS_AWS_SECRET_ACCESS_KEY": "not-checked-by-moto"}


@dataclass(frozen=True)
class Recorded:
    role: str
    operation: str  # kms:<Operation>
    key: str  # the KeyId the request names (id, ARN or alias)
    context: dict | None
    status: int

    def call(self, role: str | None = None, context: dict | None | bool = False) -> Call:
        ctx = self.context if context is False else context
        return Call(role or self.role, self.operation, ctx, note=f"{self.operation} by {self.role}")


class RecordingProxy:
    """A loopback HTTP proxy in front of moto: forwards every request as it is, records each KMS call."""

    def __init__(self, upstream_port: int) -> None:
        self.calls: list[Recorded] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                try:
                    upstream.request("POST", self.path, body, dict(self.headers.items()))
                    answer = upstream.getresponse()
                    payload = answer.read()
                finally:
                    upstream.close()
                target = self.headers.get("X-Amz-Target", "")
                signed = re.search(r"Credential=([^/]+)/", self.headers.get("Authorization", ""))
                request = json.loads(body or b"{}")
                proxy.calls.append(
                    Recorded(
                        ROLES.get(signed.group(1) if signed else "", "unknown"),
                        "kms:" + target.split(".")[-1],
                        request.get("KeyId", ""),
                        request.get("EncryptionContext"),
                        answer.status,
                    )
                )
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def by(self, role: str) -> list[Recorded]:
        return [c for c in self.calls if c.role == ARN + role]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kms_proxy(pipeline, stack_settings):
    if os.environ.get("STREAMS_TEST_STACK") == "containers":
        pytest.skip("moto's KMS runs in the process stack; tests/containers has no KMS container yet")
    proxy = RecordingProxy(stack_settings.kms_port)
    admin = botocore.session.get_session().create_client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{stack_settings.kms_port}",  # straight to moto: not recorded
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    pipeline.env.update(
        STREAMS_KMS_ENDPOINT=proxy.url, STREAMS_DEPLOYMENT=DEPLOYMENT, STREAMS_DEV_KEYS="0", AWS_REGION="us-east-1"
    )
    try:
        yield proxy, admin
    finally:
        pipeline.stop_all()
        proxy.close()


def new_key(admin, **kwargs) -> tuple[str, str]:
    meta = admin.create_key(Description=f"policy test {uuid.uuid4()}", **kwargs)["KeyMetadata"]
    return meta["KeyId"], meta["Arn"]


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def check_against(policies: dict[str, dict], calls: list[Recorded]) -> list[str]:
    """Every recorded call allowed by the policy of the key it names; what is not, in words."""
    refused = []
    for c in calls:
        which = next((p for key, p in policies.items() if c.key in key.split("|")), None)
        if which is None:
            refused.append(f"{c.operation} by {c.role} names an unknown key {c.key!r}")
        elif not allowed(which, c.call()):
            refused.append(f"{c.operation} by {c.role} with context {c.context} is {decide(which, c.call())}")
    return refused


def shown_to_be_denied(policies: dict[str, dict], c: Recorded, others: tuple[str, ...]) -> None:
    """The same call is denied with its deployment or purpose changed, without its context, and under ``others``."""
    which = next(p for key, p in policies.items() if c.key in key.split("|"))
    if c.context:
        for name in ("deployment", "purpose"):
            assert not allowed(which, c.call(context={**c.context, name: c.context[name] + "x"})), (c, name)
        assert not allowed(which, c.call(context=None)), c
        assert not allowed(which, c.call(context={**c.context, "extra": "x"})), c
    for role in (*others, "streams-bridge", "streams-eraser"):
        assert not allowed(which, c.call(role=ARN + role)), (c, role)


def test_keyring_mode_calls_are_allowed_by_the_keyring_key_policy(pipeline, kms_proxy):
    proxy, admin = kms_proxy
    key, arn = new_key(admin)
    pipeline.env.update(STREAMS_KMS_KEY_ID=key)

    # keys migrate of a plaintext key file, keys init (the key admin), a worker (masks with
    # the keyring it opens), reveal, a rotation.
    plain = str(pipeline.workdir / "plain-keys.json")
    ok(pipeline.run("keys", "init", STREAMS_KMS_KEY_ID="", STREAMS_KEYS_FILE=plain))
    migrated = ok(pipeline.run("keys", "migrate", STREAMS_KEYS_FILE=plain, **creds("streams-key-admin"))).stdout
    assert "is now wrapped by KMS key" in migrated
    out = ok(pipeline.run("keys", "init", **creds("streams-key-admin"))).stdout
    assert "wrapped by KMS key" in out
    pipeline.start("bridge", **creds("streams-bridge"))
    pipeline.start("worker", **creds("streams-worker"))
    [message_id, *_] = pipeline.send(LOGINS)
    pipeline.wait_for(lambda: pipeline.row_count() == len(LOGINS), 120, "the rows")
    shown = ok(
        pipeline.run(
            "reveal", "--message-id", message_id, "--operator", "ann", "--reason", "INC-1", **creds("streams-reveal")
        )
    ).stdout
    assert LOGINS[0]["device_id"] in shown
    ok(pipeline.run("keys", "rotate", "encryption", **creds("streams-key-admin")))

    calls = proxy.calls
    assert calls and {c.status for c in calls} == {200}, [(c.operation, c.status) for c in calls]
    policies = {f"{key}|{arn}": policy("keyring-key-policy.json")}
    assert check_against(policies, calls) == []
    made = {(c.role.rsplit("/", 1)[1], c.operation, (c.context or {}).get("purpose")) for c in calls}
    assert made >= {
        ("streams-key-admin", "kms:DescribeKey", None),
        ("streams-key-admin", "kms:GenerateDataKey", "keyring"),
        ("streams-key-admin", "kms:Decrypt", "keyring"),  # rotate opens the document to edit it
        ("streams-worker", "kms:DescribeKey", None),
        ("streams-worker", "kms:Decrypt", "keyring"),
        ("streams-reveal", "kms:Decrypt", "keyring"),
    }, made
    assert not proxy.by("streams-bridge")  # the bridge loads no key material
    for c in calls:
        # Only the key admin wraps a keyring; a worker's or reveal's open is theirs alone among the roles here.
        others = ("streams-key-custodian",) if c.operation == "kms:Decrypt" else ("streams-worker", "streams-reveal")
        if c.operation == "kms:DescribeKey":
            others = ("streams-key-custodian",)
        shown_to_be_denied(policies, c, others)


def test_per_user_mode_calls_are_allowed_by_the_key_policies(pipeline, kms_proxy):
    proxy, admin = kms_proxy
    key, arn = new_key(admin)
    mac, mac_arn = new_key(admin, KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
    pipeline.env.update(STREAMS_KMS_KEY_ID=key, STREAMS_KMS_MAC_KEY_ID=mac)
    pipeline.migrate()

    # A worker's start (join keys, its lifetime key) and its masking; the custodian's seal;
    # reveal and export --reveal; a join rotation; an erasure.
    pipeline.start("bridge", **creds("streams-bridge"))
    worker = pipeline.start("worker", **creds("streams-worker"))
    ids = pipeline.send(LOGINS)
    pipeline.wait_for(lambda: pipeline.row_count() == len(LOGINS), 120, "the rows")
    sealed = ok(pipeline.run("keys", "seal", **creds("streams-key-custodian"))).stdout
    assert "sealed 2 user data keys" in sealed, sealed
    shown = ok(
        pipeline.run(
            "reveal", "--message-id", ids[0], "--operator", "ann", "--reason", "INC-2", **creds("streams-reveal")
        )
    ).stdout
    assert LOGINS[0]["device_id"] in shown
    exported = ok(
        pipeline.run(
            "export",
            "--user-id",
            LOGINS[1]["user_id"],
            "--reveal",
            "--operator",
            "ann",
            "--reason",
            "DSR-1",
            **creds("streams-reveal"),
        )
    ).stdout
    assert LOGINS[1]["device_id"] in exported
    rejoined = ok(
        pipeline.run("keys", "rejoin", "--reason", "CHG-1", STREAMS_JOIN_VERSION="g2", **creds("streams-key-admin"))
    ).stdout
    assert "to join version g2" in rejoined
    ok(
        pipeline.run(
            "erase", "--user-id", LOGINS[0]["user_id"], "--reason", "gdpr_art17", timeout=120, **creds("streams-eraser")
        )
    )
    assert pipeline.stop(worker) == 0

    calls = proxy.calls
    assert calls and {c.status for c in calls} == {200}, [(c.operation, c.status) for c in calls]
    policies = {f"{key}|{arn}": policy("key-policy.json"), f"{mac}|{mac_arn}": policy("mac-key-policy.json")}
    assert check_against(policies, calls) == []
    made = {
        (c.role.rsplit("/", 1)[1], c.operation, "mac" if c.key in (mac, mac_arn) else (c.context or {}).get("purpose"))
        for c in calls
    }
    assert made >= {
        ("streams-worker", "kms:DescribeKey", None),
        ("streams-worker", "kms:DescribeKey", "mac"),
        ("streams-worker", "kms:GenerateMac", "mac"),
        ("streams-worker", "kms:GenerateDataKey", "user-kek"),
        ("streams-key-custodian", "kms:DescribeKey", None),
        ("streams-key-custodian", "kms:Decrypt", "user-kek"),
        ("streams-key-custodian", "kms:Encrypt", "user-key"),
        ("streams-reveal", "kms:DescribeKey", None),
        ("streams-reveal", "kms:Decrypt", "user-key"),
        ("streams-key-admin", "kms:GenerateMac", "mac"),
        ("streams-key-admin", "kms:Decrypt", "user-key"),
    }, made
    # Each decrypt of a user key names the user; the bridge and the erasure make no KMS call.
    assert all(c.context["user_id"] for c in calls if (c.context or {}).get("purpose") == "user-key")
    assert not proxy.by("streams-bridge") and not proxy.by("streams-eraser")

    # Not vacuous: each call is denied with its context changed and under the roles that must not make it.
    must_not = {
        ("kms:GenerateDataKey", "user-kek"): ("streams-reveal", "streams-key-custodian", "streams-key-admin"),
        ("kms:Decrypt", "user-kek"): ("streams-worker", "streams-reveal"),
        ("kms:Encrypt", "user-key"): ("streams-worker", "streams-reveal"),
        ("kms:Decrypt", "user-key"): ("streams-worker", "streams-key-custodian"),
        ("kms:GenerateMac", None): ("streams-reveal", "streams-key-custodian"),
        ("kms:DescribeKey", None): (),
    }
    for c in calls:
        purpose = (c.context or {}).get("purpose")
        shown_to_be_denied(policies, c, must_not[(c.operation, purpose)])
