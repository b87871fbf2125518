"""The local process stack: status, idempotent ``up``, and a clear error for a taken port.

The stack itself is started once per session (``stack_settings`` in conftest);
``up`` here must be a cheap re-probe of the running services.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

import streams_dev.stack as stack
from streams.settings import Settings
from streams_dev.stack import StackError

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> Settings:
    if os.environ.get("STREAMS_TEST_STACK") == "containers":
        pytest.skip("these tests cover the local process stack, not testcontainers")
    return request.getfixturevalue("stack_settings")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_status_reports_every_service_running(settings):
    statuses = {s.name: s for s in stack.status(settings)}

    assert set(statuses) == {"kafka", "postgres", "sqs", "registry", "kms"}
    for s in statuses.values():
        assert s.running, f"{s.name}: {s.detail}"
        assert isinstance(s.pid, int) and s.pid > 0
    assert statuses["kafka"].port == settings.kafka_port
    assert statuses["postgres"].port == settings.pg_port
    assert statuses["sqs"].port == settings.sqs_port
    assert statuses["kms"].port == settings.kms_port
    assert statuses["registry"].port == settings.registry_port


def test_up_is_idempotent_and_fast_when_running(settings):
    before = {s.name: s.pid for s in stack.status(settings)}

    began = time.monotonic()
    stack.up(settings)
    stack.up(settings)
    elapsed = time.monotonic() - began

    after = {s.name: s.pid for s in stack.status(settings)}
    assert after == before
    assert elapsed < 10, f"re-running up on a running stack took {elapsed:.1f}s"


def test_taken_port_fails_fast_naming_the_port(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        other = Settings(
            stack_dir=tmp_path / "stack",
            kafka_port=busy,
            kafka_controller_port=_free_port(),
            pg_port=_free_port(),
            sqs_port=_free_port(),
        )

        began = time.monotonic()
        with pytest.raises(StackError, match=rf"port {busy} is taken.*STREAMS_KAFKA_PORT"):
            stack.up(other)
        assert time.monotonic() - began < 5

    assert not any(s.running for s in stack.status(other))
