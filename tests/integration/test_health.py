"""Health endpoints: ``/healthz`` and ``/readyz`` of the bridge and the worker (STREAMS_METRICS_PORT)."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from streams.health import HealthServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of ``GET path``; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def test_readiness_reason_routes_and_errors():
    state: dict[str, str | None] = {"reason": "no partitions assigned"}
    port = free_port()
    server = HealthServer(port, lambda: state["reason"], host="127.0.0.1")

    async def boom():
        raise RuntimeError("secret detail")

    async def extra(request):
        from aiohttp import web

        return web.Response(text="extra 1\n")

    await server.start()
    try:
        call = lambda path: asyncio.to_thread(get, port, path)  # noqa: E731
        assert await call("/healthz") == (200, "ok\n")
        assert await call("/readyz") == (503, "not ready: no partitions assigned\n")
        state["reason"] = None
        assert await call("/readyz") == (200, "ready\n")
        assert (await call("/extra"))[0] == 404
        server.add_route("/extra", extra)  # registrable while running
        assert await call("/extra") == (200, "extra 1\n")
        server._ready = boom
        status, body = await call("/readyz")
        assert status == 503 and "RuntimeError" in body and "secret" not in body
    finally:
        await server.stop()
    assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 0


@pytest.mark.integration
def test_bridge_and_worker_serve_health_and_readiness(pipeline, sample_path):
    import json

    worker_port, bridge_port = free_port(), free_port()
    worker = pipeline.start("worker", STREAMS_METRICS_PORT=str(worker_port))
    bridge = pipeline.start("bridge", STREAMS_METRICS_PORT=str(bridge_port))
    for name, port in (("worker", worker_port), ("bridge", bridge_port)):
        pipeline.wait_for(lambda port=port: get(port, "/healthz")[0] == 200, 60, f"{name} /healthz")
        pipeline.wait_for(lambda port=port: get(port, "/readyz")[0] == 200, 90, f"{name} /readyz")
        assert get(port, "/nope")[0] == 404

    # Ready means working: the sample flows through while both report ready.
    sample = json.loads(sample_path.read_text())
    pipeline.send(sample)
    pipeline.wait_for(lambda: pipeline.row_count() == len(sample) - 1, 120, "the sample's rows")
    assert get(worker_port, "/readyz")[0] == 200 and get(bridge_port, "/readyz")[0] == 200

    assert pipeline.stop(bridge) == 0
    assert pipeline.stop(worker) == 0
    assert get(worker_port, "/healthz")[0] == 0 and get(bridge_port, "/healthz")[0] == 0
