"""aiohttp app on its own thread and event loop, next to the ZMQ server.

Open and read-only (no ids, keys or secrets): GET /healthz (alive), /readyz (503 until the
engine and the socket are ready, and while stopping; when ready, ``l1`` says whether the
L1 pool was adopted and how much of it), /metrics (Prometheus text), /stats
(aggregate counts), /config (credentials redacted).
Admin: POST /cache/clear; PUT /loglevel (body: a level name, or {"level": "DEBUG"}). They need
``Authorization: Bearer <token>`` when ``http_token_file`` is set (401 otherwise), and answer
loopback clients only when it is not (403 otherwise).
Bodies above ``http_max_body_bytes`` get 413. The API binds ``http_host`` (``http_hosts``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmcache_node.config import NodeConfig
from lmcache_node.httpapi.auth import TokenFile, bearer_token, is_loopback
from lmcache_node.httpapi.view import CacheView, NodeView

log = logging.getLogger(__name__)

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_MAX_BODY_BYTES = 64 * 1024
REALM = "lmcache-node"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_hosts(config: NodeConfig) -> list[str]:
    """The addresses the HTTP API binds: ``http_host``, or 127.0.0.1 plus ``host`` when that
    names one concrete address (a wildcard host never widens the HTTP API)."""
    if config.http_host:
        hosts = [h.strip().strip("[]") for h in config.http_host.split(",") if h.strip()]
        if not hosts:
            raise ValueError(f"http_host {config.http_host!r} names no address")
    else:
        hosts = ["127.0.0.1"]
        address = _ip(config.host)
        if address is not None and not address.is_unspecified and config.host not in hosts:
            hosts.append(config.host)
    return _drop_covered(list(dict.fromkeys(hosts)))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _drop_covered(hosts: list[str]) -> list[str]:
    """A wildcard (0.0.0.0, ::) covers the other addresses of its family (which could not
    be bound next to it on the same port)."""
    wildcards = {a.version for a in map(_ip, hosts) if a is not None and a.is_unspecified}
    return [
        h for h in hosts if (a := _ip(h)) is None or a.is_unspecified or a.version not in wildcards
    ]


def l1_status(engine: CacheView) -> dict[str, object]:
    """The L1 pool for /readyz: where it came from (``pool``: adopted, created, anonymous,
    disabled; ``reason`` why not adopted), its size and use, what was adopted."""
    stats = engine.stats()
    state = engine.pool_state
    return {
        "pool": state.origin,
        "persistent": state.persistent,
        "reason": state.reason,
        "capacity_bytes": stats.capacity_bytes,
        "used_bytes": stats.used_bytes,
        "entries": stats.entries,
        "adopted_entries": stats.adopted_entries,
        "adopted_bytes": stats.adopted_bytes,
    }


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def admin_guard(token: TokenFile | None) -> Callable[[Handler], Handler]:
    """Wraps an admin handler: bearer token when configured, else loopback peers only."""

    def wrap(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if token is None:
                if is_loopback(request.remote):
                    return await handler(request)
                return _error(
                    403,
                    f"{request.path} answers loopback clients only on this node: set "
                    "http_token_file to use it from the network with a bearer token",
                )
            presented = bearer_token(request.headers.get("Authorization"))
            if await asyncio.to_thread(token.matches, presented):
                return await handler(request)
            challenge = f'Bearer realm="{REALM}"'
            if presented is not None:
                challenge += ', error="invalid_token"'
            return _error(
                401,
                f"{request.path} needs 'Authorization: Bearer <token>' with the token of "
                "http_token_file" + (" (the token given is wrong)" if presented else ""),
                {"WWW-Authenticate": challenge},
            )

        return guarded

    return wrap


def body_limit(max_body_bytes: int) -> Middleware:
    def too_large(size: str) -> web.Response:
        return _error(
            413, f"request body of {size} bytes is over the limit of {max_body_bytes} "
            "(http_max_body_bytes)",
        )  # fmt: skip

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_body_bytes:
            return too_large(str(length))
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past the cap
            return too_large("more than that")

    return middleware


def build_app(
    server: NodeView,
    *,
    token: TokenFile | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> web.Application:
    admin = admin_guard(token)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        if server.ready:
            l1 = await asyncio.to_thread(l1_status, server.engine)
            return web.json_response(
                {
                    "status": "ready",
                    "endpoint": server.endpoint,
                    "device": server.config.device,
                    "l1": l1,
                }
            )
        reason = "stopping" if server.stopping else "starting"
        return web.json_response({"status": reason}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, server.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def not_ready() -> web.Response:
        return _error(503, "the server is still starting")

    async def stats(_: web.Request) -> web.Response:
        if not server.ready:
            return not_ready()
        return web.json_response(await asyncio.to_thread(server.stats))

    async def config(_: web.Request) -> web.Response:
        return web.json_response(server.config.redacted())

    @admin
    async def clear(request: web.Request) -> web.StreamResponse:
        if not server.ready:
            return not_ready()
        cleared = await asyncio.to_thread(server.engine.clear)
        log.info("cleared %d chunk(s) through the HTTP API (client %s)", cleared, request.remote)
        return web.json_response({"cleared": cleared})

    @admin
    async def loglevel(request: web.Request) -> web.StreamResponse:
        text = (await request.text()).strip()
        level = text
        if text.startswith("{"):
            try:
                level = str(json.loads(text).get("level", ""))
            except (ValueError, AttributeError):
                level = ""
        level = level.upper()
        if level not in LEVELS:
            return _error(400, f"level {text[:64]!r} is not one of {', '.join(LEVELS)}")
        logging.getLogger().setLevel(level)
        log.warning("log level set to %s through the HTTP API (client %s)", level, request.remote)
        return web.json_response({"level": level})

    app = web.Application(client_max_size=max_body_bytes, middlewares=[body_limit(max_body_bytes)])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    app.router.add_get("/config", config)
    app.router.add_post("/cache/clear", clear)
    app.router.add_put("/loglevel", loglevel)
    return app


class HttpApi:
    """Runs ``build_app(server)`` on every address of ``hosts`` (one port) in a daemon thread
    with its own loop. ``hosts``: a list, or a comma-separated string."""

    def __init__(
        self,
        server: NodeView,
        hosts: str | Sequence[str],
        port: int,
        *,
        token: TokenFile | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.server = server
        self.hosts = (
            [h.strip() for h in hosts.split(",")] if isinstance(hosts, str) else list(hosts)
        )
        self.port = port
        self.token = token
        self.max_body_bytes = max_body_bytes
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lmcache-node-http", daemon=True
        )

    @classmethod
    def from_config(cls, server: NodeView, config: NodeConfig) -> HttpApi:
        """The API ``config`` describes; TokenFileError/ValueError when it cannot be served."""
        token = TokenFile.from_file(config.http_token_file) if config.http_token_file else None
        return cls(
            server,
            http_hosts(config),
            config.http_port,
            token=token,
            max_body_bytes=config.http_max_body_bytes,
        )

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            future.result(timeout=30)
        except OSError as exc:
            self.stop()
            raise OSError(
                f"cannot serve the HTTP API on {', '.join(self.hosts)} port {self.port}: {exc}; "
                "pick other addresses with --http-host or another port with --http-port "
                "(0 disables the API)"
            ) from exc

    async def _start(self) -> None:
        app = build_app(self.server, token=self.token, max_body_bytes=self.max_body_bytes)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for host in self.hosts:  # the first site picks the port when it is 0
            await web.TCPSite(self._runner, host, self.port).start()
            if self.port == 0 and self._runner.addresses:
                self.port = int(self._runner.addresses[0][1])
        log.info(
            "HTTP API on %s port %d (/healthz /readyz /metrics /stats /config); admin "
            "endpoints: %s",
            ", ".join(self.hosts),
            self.port,
            "bearer token of " + str(self.token.path) if self.token else "loopback clients only",
        )

    def stop(self) -> None:
        if self._runner is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
            self._runner = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread.is_alive():
            self._thread.join(timeout=10)
