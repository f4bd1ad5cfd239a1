"""The operator's own HTTP endpoint: /healthz (liveness, both replicas) and /metrics."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmcache_operator.metrics import OperatorMetrics


async def serve(url: str, metrics: OperatorMetrics) -> web.AppRunner:
    """Serve on the host and port of ``url`` (its path is the health path)."""
    parts = urlsplit(url)
    health_path = parts.path or "/healthz"

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "leader": metrics.leading})

    async def scrape(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get(health_path, health)
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, parts.hostname or "0.0.0.0", parts.port or 8081).start()  # noqa: S104
    return runner
