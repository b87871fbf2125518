"""A small HTTP server for probes: ``/healthz`` (liveness) and ``/readyz`` (readiness),
``/metrics``, and ``/``: the process's status page (streams/ops/status_page.py).

Every long-running process (bridge, worker) starts one on ``STREAMS_METRICS_PORT`` when
that is above 0. ``/healthz`` answers 200 as long as the process's event loop runs: a
dependency being down is not a liveness failure (restarting would not fix it).
``/readyz`` answers 200 when the process's readiness callback says it is connected to its
dependencies (for a worker: it has partitions assigned), else 503 with the reason.

For the page's charts the server samples its own counters every ``sample_every`` seconds
into a small ring buffer (15 minutes). Routes are registrable (``add_route``), also after start, so ``/metrics`` can join the same
server. Probes (Kubernetes ``httpGet``, the image's ``HEALTHCHECK``, compose) only make an
HTTP request; nothing here imports the pipeline or touches Kafka or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST

from streams.metrics import LIVENESS, RECENT_DEAD_LETTERS, REGISTRY, exposition
from streams.ops import status_page

log = logging.getLogger("streams.health")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# A readiness check: ``None`` when ready, else a short reason (sync or async).
ReadyCheck = Callable[[], "str | None | Awaitable[str | None]"]


class HealthServer:
    """HTTP on ``host:port`` with a path -> handler table; ``/healthz`` and ``/readyz`` built in."""

    def __init__(
        self, port: int, ready: ReadyCheck, host: str = "0.0.0.0", title: str | None = None, sample_every: float = 5.0
    ) -> None:
        self.port = port
        self.host = host
        command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in ("bridge", "worker") else "process"
        self.title = title or f"streams {command} · {socket.gethostname()} (pid {os.getpid()})"
        self._started = time.monotonic()
        self._ready = ready
        self._routes: dict[str, Handler] = {}
        self._runner: web.ServerRunner | None = None
        self.history = status_page.History(every=sample_every)
        self._sampler: asyncio.Task | None = None
        self.add_route("/", self._page)
        self.add_route("/healthz", self._healthz)
        self.add_route("/readyz", self._readyz)
        self.add_route("/metrics", self._metrics)

    def add_route(self, path: str, handler: Handler) -> None:
        """Serve ``GET`` (and ``HEAD``) of ``path`` with ``handler(request) -> Response``."""
        self._routes[path] = handler

    async def readiness(self) -> str | None:
        """``None`` when ready, else why not (a failing check is a reason too)."""
        try:
            result = self._ready()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            return f"readiness check failed ({type(exc).__name__})"
        return result

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        stuck = LIVENESS.stuck_for()
        if stuck is not None:  # work in flight, no progress and no retry: a restart may help
            return web.Response(status=503, text=f"stuck: no progress for {stuck:.0f}s\n")
        return web.Response(text="ok\n")

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _page(self, request: web.BaseRequest) -> web.Response:
        """The status page from this process's own metrics; ``?refresh=0`` stops the reload."""
        totals = status_page.totals_from(REGISTRY.collect())
        history = [*self.history.samples(), (time.time(), totals.series())]
        try:
            refresh = max(int(request.query.get("refresh", "10")), 0)
        except ValueError:
            refresh = 10
        page = status_page.process_page(
            self.title,
            LIVENESS.stuck_for(),
            await self.readiness(),
            totals,
            up_for=time.monotonic() - self._started,
            recent=RECENT_DEAD_LETTERS.newest_first(),
            history=history,
            refresh=refresh,
        )
        return web.Response(text=status_page.render(page), content_type="text/html", headers=status_page.HEADERS)

    async def _sample(self) -> None:
        """Every ``history.every`` seconds: the counters the page's charts draw."""
        while True:
            self.history.add(status_page.totals_from(REGISTRY.collect()).series())
            await asyncio.sleep(self.history.every)

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        reason = await self.readiness()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = self._routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not found\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"})
        return await handler(request)

    async def start(self) -> None:
        self._runner = web.ServerRunner(web.Server(self._dispatch, access_log=None), handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        self._sampler = asyncio.ensure_future(self._sample())
        log.info("health endpoints on http://%s:%d/healthz and /readyz, status page on /", self.host, self.port)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class HealthService(Service):
    """The server as a mode/Faust service: ``app.service(HealthService(server))``."""

    def __init__(self, server: HealthServer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server = server

    async def on_start(self) -> None:
        await self.server.start()

    async def on_stop(self) -> None:
        await self.server.stop()


def worker_readiness(app) -> str | None:
    """A Faust worker is ready once its consumer has partitions assigned (and it is not stopping)."""
    if getattr(app, "should_stop", False):
        return "stopping"
    try:
        assigned = app.consumer.assignment()
    except Exception as exc:  # ConsumerNotStarted before the consumer thread runs
        return f"consumer not started ({type(exc).__name__})"
    if not assigned:
        return "no partitions assigned"
    return None
