"""The router's HTTP side: an OpenAI-compatible proxy in front of the vLLM replicas.

``/v1/completions`` and ``/v1/chat/completions`` are tokenized, routed and passed through
byte for byte (streaming included: chunks are written as they arrive); ``/v1/models`` goes
to any healthy replica. ``/healthz`` (alive), ``/readyz`` (a replica to route to),
``/metrics``; ``/debug/route`` (loopback only: it tells what the caches hold) explains a
decision without forwarding. Bounded: body size (413), concurrent requests (503 with
``Retry-After``), connect and idle-read timeouts. A replica that cannot be reached before
anything was sent is marked unhealthy and the request goes to another one, once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmcache_node.router.core import Route, Router, RouteRequest
from lmcache_node.router.metrics import RouterMetrics
from lmcache_node.router.tokenize import PromptError, PromptTokenizer, WouldBlock

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip
Tokenize = Callable[..., list[int]]  # (body, max_new_chars=None) -> tokens
INLINE_CHARS = 2048  # uncached text tokenized on the event loop; more goes to a thread


@dataclass(frozen=True)
class ProxySettings:
    max_body_bytes: int = 16 * 1024**2
    max_concurrent_requests: int = 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0  # longest silence of a replica within one response
    session_header: str = "x-session-id"
    tokenizer_threads: int = 2


def _error(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in the OpenAI API's shape."""
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def _is_loopback(peer: str | None) -> bool:
    return peer is not None and (peer.startswith("127.") or peer in ("::1", "::ffff:127.0.0.1"))


class RouterApp:
    def __init__(
        self,
        router: Router,
        tokenizer: PromptTokenizer | None,
        metrics: RouterMetrics,
        settings: ProxySettings | None = None,
    ) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.settings = settings or ProxySettings()
        self.session: aiohttp.ClientSession | None = None
        self._active = 0
        self._pool = ThreadPoolExecutor(self.settings.tokenizer_threads, "router-tokenize")
        if tokenizer is not None:  # its self-checks run off the request path
            tokenizer.verify = self._in_background

    def _in_background(self, work: Callable[[], None]) -> None:
        self._pool.submit(work)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_post("/debug/route", self.debug_route)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.settings.connect_timeout_s,
            sock_read=self.settings.read_timeout_s,
        )  # fmt: skip
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, auto_decompress=False
        )

    async def _close(self, _: web.Application) -> None:
        if self.session is not None:
            await self.session.close()
        self._pool.shutdown(wait=False)

    # ----- simple endpoints -----
    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, _: web.Request) -> web.Response:
        healthy = [s for s in self.router.replicas.values() if s.healthy]
        if not healthy:
            return web.Response(status=503, text="no healthy replica")
        return web.Response(text=f"{len(healthy)} healthy replica(s)")

    async def metrics_page(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def models(self, request: web.Request) -> web.StreamResponse:
        states = self.router.candidates()
        if not states:
            return _error(503, "no vLLM replica is known yet", "service_unavailable")
        assert self.session is not None
        try:
            async with self.session.get(
                states[0].replica.url + "/v1/models", headers=_forwarded(request.headers)
            ) as upstream:
                body = await upstream.read()
                return web.Response(
                    status=upstream.status, body=body,
                    content_type=upstream.content_type or "application/json",
                )  # fmt: skip
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return _error(502, f"replica {states[0].replica.name}: {exc}", "bad_gateway")

    # ----- routed endpoints -----
    async def completions(self, request: web.Request) -> web.StreamResponse:
        tokenize = self.tokenizer.completion if self.tokenizer else None
        return await self._proxy(request, "/v1/completions", "completions", tokenize)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        tokenize = self.tokenizer.chat if self.tokenizer else None
        return await self._proxy(request, "/v1/chat/completions", "chat", tokenize)

    async def _parse(
        self, request: web.Request, tokenize: Tokenize | None
    ) -> tuple[bytes, RouteRequest] | web.Response:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.rejected.labels(reason="too_large").inc()
            return _error(413, f"the request body is over {self.settings.max_body_bytes} bytes "
                          "(--max-body-bytes)", "invalid_request_error")  # fmt: skip
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.metrics.rejected.labels(reason="bad_json").inc()
            return _error(400, f"the body is not JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict):
            self.metrics.rejected.labels(reason="bad_json").inc()
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        tokens: list[int] = []
        if tokenize is not None:
            try:
                try:  # inline when cheap (cached chat segments, token ids): no thread hop
                    tokens = tokenize(body, INLINE_CHARS)
                except WouldBlock:
                    tokens = await asyncio.get_running_loop().run_in_executor(
                        self._pool, tokenize, body
                    )
            except PromptError as exc:  # vLLM will answer it; route it by load
                log.debug("routing by load: %s", exc)
        session = request.headers.get(self.settings.session_header) or body.get("user")
        return raw, RouteRequest(tokens, str(session) if session else None)

    async def _proxy(
        self, request: web.Request, path: str, api: str, tokenize: Tokenize | None
    ) -> web.StreamResponse:
        if self._active >= self.settings.max_concurrent_requests:
            self.metrics.rejected.labels(reason="busy").inc()
            return _error(503, "the router is at --max-concurrent-requests; retry shortly",
                          "service_unavailable", {"Retry-After": "1"})  # fmt: skip
        self._active += 1
        try:
            started = time.perf_counter()
            parsed = await self._parse(request, tokenize)
            if isinstance(parsed, web.Response):
                return parsed
            raw, route_request = parsed
            tried: list[str] = []
            while True:
                try:
                    route = self.router.route(route_request, exclude=tried)
                except LookupError:
                    return _error(503, "no vLLM replica to route to", "service_unavailable")
                if not tried:
                    self._observe(route, time.perf_counter() - started)
                result = await self._forward(request, route, path, raw, api)
                if result is not None or len(tried) >= 1:
                    return result or _error(502, "no replica could be reached", "bad_gateway")
                tried.append(route.state.replica.name)
        finally:
            self._active -= 1

    def _observe(self, route: Route, seconds: float) -> None:
        self.metrics.routing.observe(seconds)
        self.metrics.decisions.labels(self.router.policy.value, route.decision.reason).inc()
        self.metrics.prompt_tokens.inc(route.prompt_tokens)
        self.metrics.cached_tokens.inc(route.decision.cached_tokens)

    async def _forward(
        self, request: web.Request, route: Route, path: str, raw: bytes, api: str
    ) -> web.StreamResponse | None:
        """Pass the request to the routed replica; None when it could not be reached."""
        assert self.session is not None
        replica = route.state.replica
        self.router.started(route)
        response: web.StreamResponse | None = None
        ok = False
        try:
            async with self.session.post(
                replica.url + path, data=raw, headers=_forwarded(request.headers)
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        response.headers.add(name, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    self.router.first_token(route)
                    await response.write(chunk)
                await response.write_eof()
                ok = True
                outcome = str(upstream.status)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            outcome = "unreachable" if response is None else "interrupted"
            log.warning("replica %s: %s %s (%s)", replica.name, path, outcome, exc)
        finally:
            self.router.finished(route, ok=ok or response is not None)
        self.metrics.requests.labels(replica.name, api, outcome).inc()
        if response is None:
            return None
        return response

    # ----- explain -----
    async def debug_route(self, request: web.Request) -> web.StreamResponse:
        """The decision for a completions or chat body, without forwarding (loopback only)."""
        if not _is_loopback(request.remote):
            return _error(403, "/debug/route answers loopback clients only (kubectl "
                          "port-forward to reach it)", "forbidden")  # fmt: skip
        kind = request.query.get("api", "completions")
        tokenize = None
        if self.tokenizer is not None:
            tokenize = self.tokenizer.chat if kind == "chat" else self.tokenizer.completion
        parsed = await self._parse(request, tokenize)
        if isinstance(parsed, web.Response):
            return parsed
        _, route_request = parsed
        try:
            route = self.router.route(route_request)
        except LookupError:
            return _error(503, "no vLLM replica to route to", "service_unavailable")
        states = {s.replica.name: s for s in self.router.candidates()}
        return web.json_response(
            {
                "policy": self.router.policy.value,
                "replica": route.state.replica.name,
                "reason": route.decision.reason,
                "prompt_tokens": route.prompt_tokens,
                "cached_tokens": route.decision.cached_tokens,
                "replicas": {
                    name: {
                        "l1_tokens": hold.l1, "l2_tokens": hold.l2,
                        "in_flight": states[name].in_flight if name in states else 0,
                        "node": states[name].replica.cache if name in states else "",
                    }
                    for name, hold in route.holds.items()
                },
            }
        )  # fmt: skip


def _forwarded(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def serve(app: web.Application, host: str, port: int) -> Callable[[], Awaitable[None]]:
    """Start serving ``app``; returns the coroutine function that stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner.cleanup
