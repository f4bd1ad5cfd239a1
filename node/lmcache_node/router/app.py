"""Wiring of the router process: tokenizer, router state, discovery, load, HTTP."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from lmcache_node.protocol.credentials import ClientCredentials, CredentialsError
from lmcache_node.router.core import Router
from lmcache_node.router.discovery import KubeDiscovery, Replica, parse_endpoints
from lmcache_node.router.load import LoadMonitor
from lmcache_node.router.metrics import RouterMetrics
from lmcache_node.router.proxy import ProxySettings, RouterApp, serve
from lmcache_node.router.scoring import Policy, Weights
from lmcache_node.router.tokenize import PromptTokenizer, TokenizerError

log = logging.getLogger(__name__)


@dataclass
class RouterService:
    router: Router
    app: RouterApp
    host: str
    port: int
    static: list[Replica] | None = None
    discovery: KubeDiscovery | None = None
    metrics_interval_s: float = 1.0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop_http: Callable[[], Awaitable[None]] | None = None
    _monitor: LoadMonitor | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.static is not None:
            await self.router.set_replicas(self.static)
        loop = asyncio.get_running_loop()
        if self.discovery is not None:
            self._tasks.append(loop.create_task(self.discovery.run(), name="discovery"))
        self._session = aiohttp.ClientSession()
        self._monitor = LoadMonitor(self.router, self._session, interval_s=self.metrics_interval_s)
        self._tasks.append(loop.create_task(self._monitor.run(), name="load"))
        self._stop_http = await serve(self.app.build(), self.host, self.port)
        log.info(
            "router serving http://%s:%d (policy %s)", self.host, self.port,
            self.router.policy.value,
        )  # fmt: skip

    async def stop(self) -> None:
        if self._stop_http is not None:
            await self._stop_http()
        if self.discovery is not None:
            self.discovery.stop()
        if self._monitor is not None:
            self._monitor.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
        await self.router.close()


def build_service(args: argparse.Namespace) -> RouterService:
    """The service the command line describes (ValueError: what to fix)."""
    policy = Policy(args.policy)
    credentials = None
    if args.credentials_dir:
        try:
            credentials = ClientCredentials.from_directory(args.credentials_dir)
        except CredentialsError as exc:
            raise ValueError(str(exc)) from None
    tokenizer = None
    if args.tokenizer:
        try:
            tokenizer = PromptTokenizer.load(args.tokenizer)
        except (TokenizerError, OSError) as exc:
            raise ValueError(f"--tokenizer {args.tokenizer}: {exc}") from None
    elif policy in (Policy.CACHE_AWARE, Policy.PREFIX_HASH):
        log.warning("no --tokenizer: the %s policy routes by load only", policy.value)
    router = Router(
        policy=policy,
        weights=Weights(l1=args.weight_l1, l2=args.weight_l2, request_tokens=args.request_tokens),
        model_name=args.model_name,
        credentials=credentials,
        index_max_keys=args.index_max_keys,
        feed_options={"resync_secs": args.resync_secs},
    )
    settings = ProxySettings(
        max_body_bytes=args.max_body_bytes,
        max_concurrent_requests=args.max_concurrent_requests,
        connect_timeout_s=args.connect_timeout_secs,
        read_timeout_s=args.read_timeout_secs,
        session_header=args.session_header,
    )
    app = RouterApp(router, tokenizer, RouterMetrics(router), settings)
    service = RouterService(
        router, app, args.host, args.port, metrics_interval_s=args.metrics_interval_secs
    )
    if args.endpoints:
        service.static = parse_endpoints(args.endpoints)
    else:
        service.discovery = KubeDiscovery(
            namespace=args.namespace,
            on_change=router.set_replicas,
            service=args.service,
            pod_selector=args.pod_selector,
            port_name=args.port_name,
            replica_port=args.replica_port,
            cache_service=args.cache_service,
        )
    return service
