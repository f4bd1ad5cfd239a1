"""Our own list+watch loops for the objects status is computed from (DaemonSets, pods, nodes).

kopf streams every object of a watched kind in its namespaces and runs its handler machinery
for each event; a cache pod's status changes several times while it starts, so with hundreds
of clusters that machinery dominates the operator's CPU. These loops ask the API server for
our labelled objects only (a label selector, which kopf cannot pass) and hand each event to a
plain callback. They resume from the last resourceVersion and list again after 410 Gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from lmcache_operator.kube import FORBIDDEN_RETRY_S, KubeClient, KubeError
from lmcache_operator.retry import WATCH

logger = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]
RestartHook = Callable[[str], None]  # kind


class WatchLoop:
    """List, then watch from the list's resourceVersion, forever (until cancelled)."""

    def __init__(
        self,
        client: KubeClient,
        api_version: str,
        kind: str,
        callback: EventCallback | Sequence[EventCallback],
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_s: int = 300,
        on_restart: RestartHook | None = None,
    ) -> None:
        self.client = client
        self.api_version = api_version
        self.kind = kind
        self.callbacks = [callback] if callable(callback) else list(callback)
        self.on_restart = on_restart
        self.namespace = namespace
        self.label_selector = label_selector
        self.timeout_s = timeout_s
        self.synced = asyncio.Event()

    def __repr__(self) -> str:
        where = self.namespace or "all namespaces"
        return f"watch {self.kind} in {where} ({self.label_selector or 'no selector'})"

    def callback(self, event: str, obj: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(event, obj)

    async def _list(self) -> str:
        listing = await self.client.list(
            self.api_version, self.kind, self.namespace, label_selector=self.label_selector
        )
        seen = set()
        for item in listing.get("items") or []:
            item.setdefault("kind", self.kind)
            seen.add((item["metadata"].get("namespace"), item["metadata"]["name"]))
            self.callback("ADDED", item)
        self.callback("SYNCED", {"seen": seen, "namespace": self.namespace})
        self.synced.set()
        return str(listing["metadata"]["resourceVersion"])

    async def run(self) -> None:
        failures = 0
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                async for event in self.client.watch(
                    self.api_version,
                    self.kind,
                    self.namespace,
                    resource_version=version,
                    label_selector=self.label_selector,
                    timeout_s=self.timeout_s,
                ):
                    kind = event.get("type", "")
                    obj = event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            version = None  # too old: list again
                            if self.on_restart is not None:
                                self.on_restart(self.kind)
                            break
                        raise KubeError(int(obj.get("code", 500)), "WATCH", self.kind, obj)
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if kind != "BOOKMARK":
                        self.callback(kind, obj)
                failures = 0
            except asyncio.CancelledError:
                raise
            except (KubeError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if isinstance(exc, KubeError) and exc.status == 410:
                    version = None
                failures += 1
                delay = WATCH.delay(failures)
                if isinstance(exc, KubeError) and exc.status == 403:
                    delay = FORBIDDEN_RETRY_S
                    logger.warning(
                        "%r is forbidden: grant the operator list and watch on it (status "
                        "works without it, less precisely); checking again in %.0f s",
                        self,
                        delay,
                    )
                if self.on_restart is not None:
                    self.on_restart(self.kind)
                logger.warning("%r failed (%s); retrying in %.1f s", self, exc, delay)
                await asyncio.sleep(delay)
