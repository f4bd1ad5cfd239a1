"""aiohttp app on its own thread and event loop, next to the ZMQ server.

GET /healthz (alive), /readyz (503 until the engine and the socket are ready, and while
stopping), /metrics (Prometheus text), /stats (JSON), /config (secrets redacted);
POST /cache/clear; PUT /loglevel (body: a level name, or {"level": "DEBUG"}).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from lmcache_node.server.node_server import NodeServer

log = logging.getLogger(__name__)

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_app(server: NodeServer) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        if server.ready:
            return web.json_response({"status": "ready", "endpoint": server.endpoint})
        reason = "stopping" if server.stopping else "starting"
        return web.json_response({"status": reason}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, server.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def not_ready() -> web.Response:
        return web.json_response({"error": "the server is still starting"}, status=503)

    async def stats(_: web.Request) -> web.Response:
        if not server.ready:
            return not_ready()
        return web.json_response(await asyncio.to_thread(server.stats))

    async def config(_: web.Request) -> web.Response:
        return web.json_response(server.config.redacted())

    async def clear(_: web.Request) -> web.Response:
        if not server.ready:
            return not_ready()
        cleared = await asyncio.to_thread(server.engine.clear)
        log.info("cleared %d chunk(s) through the HTTP API", cleared)
        return web.json_response({"cleared": cleared})

    async def loglevel(request: web.Request) -> web.Response:
        text = (await request.text()).strip()
        level = text
        if text.startswith("{"):
            try:
                level = str(json.loads(text).get("level", ""))
            except (ValueError, AttributeError):
                level = ""
        level = level.upper()
        if level not in LEVELS:
            return web.json_response(
                {"error": f"level {text!r} is not one of {', '.join(LEVELS)}"}, status=400
            )
        logging.getLogger().setLevel(level)
        log.warning("log level set to %s through the HTTP API", level)
        return web.json_response({"level": level})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    app.router.add_get("/config", config)
    app.router.add_post("/cache/clear", clear)
    app.router.add_put("/loglevel", loglevel)
    return app


class HttpApi:
    """Runs ``build_app(server)`` on ``host:port`` in a daemon thread with its own loop."""

    def __init__(self, server: NodeServer, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lmcache-node-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            future.result(timeout=30)
        except OSError as exc:
            self.stop()
            raise OSError(
                f"cannot serve the HTTP API on {self.host}:{self.port}: {exc}; pick another "
                "port with --http-port (0 disables the API)"
            ) from exc

    async def _start(self) -> None:
        self._runner = web.AppRunner(build_app(self.server), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = self._runner.addresses
        if sockets:
            self.port = int(sockets[0][1])
        log.info(
            "HTTP API on http://%s:%d (/healthz /readyz /metrics /stats /config)",
            self.host,
            self.port,
        )

    def stop(self) -> None:
        if self._runner is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
            self._runner = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread.is_alive():
            self._thread.join(timeout=10)
