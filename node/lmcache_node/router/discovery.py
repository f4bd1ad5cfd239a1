"""Where the vLLM replicas are, and which node server each one uses.

Static (``--endpoints URL=CACHE,...``, outside Kubernetes) or from the Kubernetes API: the
EndpointSlices of the vLLM Service (``--service``) or the pods a label selector picks
(``--pod-selector``, for vLLM deployed by someone else), joined by node name with the
EndpointSlices of the cache cluster's Service (``--cache-service``, port ``zmq``): each
replica uses the node server on its own node. Lists, then watches; any error relists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class DiscoveryError(ValueError):
    """A replica list or flag the router cannot use; the message shows the right form."""


@dataclass(frozen=True, order=True)
class Replica:
    name: str  # stable: the pod's name, else the URL
    url: str  # http://host:port of its OpenAI server
    node: str = ""  # the Kubernetes node it runs on ("" unknown)
    cache: str = ""  # tcp://host:port of the node server it uses ("" none)


OnChange = Callable[[list[Replica]], Awaitable[None]]


def parse_endpoints(text: str) -> list[Replica]:
    """``URL[=tcp://HOST:PORT],...``: each replica and (optionally) its node server."""
    replicas: list[Replica] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        url, _, cache = item.partition("=")
        if not url.startswith(("http://", "https://")):
            raise DiscoveryError(
                f"--endpoints entry {item!r}: a replica is an http(s) URL, optionally followed "
                "by =tcp://HOST:PORT of its node server, e.g. "
                "http://10.0.0.5:8000=tcp://10.0.0.5:5555"
            )
        if cache and not cache.startswith("tcp://"):
            raise DiscoveryError(
                f"--endpoints entry {item!r}: the node server is tcp://HOST:PORT (its request port)"
            )
        url = url.rstrip("/")
        replicas.append(Replica(name=url, url=url, node=cache, cache=cache))
    if not replicas:
        raise DiscoveryError("--endpoints names no replica")
    return replicas


# ----- Kubernetes -----
@dataclass(frozen=True)
class SliceEndpoint:
    name: str
    address: str
    port: int
    node: str


def slice_endpoints(body: Mapping[str, Any], port_name: str | None) -> list[SliceEndpoint]:
    """Ready endpoints of one EndpointSlice (a dict as the API returns it)."""
    ports = body.get("ports") or []
    chosen = [p for p in ports if port_name is None or p.get("name") == port_name]
    if not chosen and len(ports) == 1:
        chosen = ports
    if not chosen or chosen[0].get("port") is None:
        return []
    port = int(chosen[0]["port"])
    found: list[SliceEndpoint] = []
    for endpoint in body.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        ref = endpoint.get("targetRef") or {}
        for address in endpoint.get("addresses") or []:
            found.append(
                SliceEndpoint(
                    name=str(ref.get("name") or f"{address}:{port}"),
                    address=str(address),
                    port=port,
                    node=str(endpoint.get("nodeName") or ""),
                )
            )
    return found


def pod_endpoint(body: Mapping[str, Any], port: int) -> SliceEndpoint | None:
    """A running, ready pod as a replica endpoint; None otherwise."""
    status = body.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    ip = status.get("podIP")
    if not ready or not ip or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    return SliceEndpoint(
        name=str(body["metadata"]["name"]),
        address=str(ip),
        port=port,
        node=str((body.get("spec") or {}).get("nodeName") or ""),
    )


def join(replicas: Iterable[SliceEndpoint], caches: Iterable[SliceEndpoint]) -> list[Replica]:
    """Replicas with the node server of their node (none when the node has no cache pod)."""
    by_node = {c.node: f"tcp://{_bracket(c.address)}:{c.port}" for c in caches if c.node}
    return sorted(
        Replica(
            name=r.name,
            url=f"http://{_bracket(r.address)}:{r.port}",
            node=r.node,
            cache=by_node.get(r.node, ""),
        )
        for r in replicas
    )


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class KubeDiscovery:
    """Replicas from the Kubernetes API, reported to ``on_change`` whenever they change."""

    def __init__(
        self,
        *,
        namespace: str,
        on_change: OnChange,
        service: str | None = None,
        pod_selector: str | None = None,
        port_name: str | None = "http",
        replica_port: int = 8000,
        cache_service: str | None = None,
        cache_port_name: str = "zmq",
        kubeconfig: Mapping[str, Any] | None = None,
        relist_backoff_s: float = 2.0,
    ) -> None:
        if (service is None) == (pod_selector is None):
            raise DiscoveryError("give one of --service or --pod-selector")
        self.namespace = namespace
        self.on_change = on_change
        self.service = service
        self.pod_selector = pod_selector
        self.port_name = port_name
        self.replica_port = replica_port
        self.cache_service = cache_service
        self.cache_port_name = cache_port_name
        self.kubeconfig = kubeconfig
        self.relist_backoff_s = relist_backoff_s
        self._replicas: dict[str, list[SliceEndpoint]] = {}  # by slice or pod name
        self._caches: dict[str, list[SliceEndpoint]] = {}
        self._reported: list[Replica] | None = None
        self._stopped = asyncio.Event()

    async def _api_client(self) -> Any:
        from kubernetes_asyncio import client, config  # noqa: PLC0415 - the [router] extra

        if self.kubeconfig is not None:
            configuration = client.Configuration()
            await config.load_kube_config_from_dict(
                dict(self.kubeconfig), client_configuration=configuration
            )
            return client.ApiClient(configuration)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config()
        return client.ApiClient()

    async def run(self) -> None:
        from kubernetes_asyncio import client  # noqa: PLC0415

        api = await self._api_client()
        try:
            core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
            tasks = []
            if self.service is not None:
                tasks.append(self._follow(discovery.list_namespaced_endpoint_slice,
                                          f"{SERVICE_NAME_LABEL}={self.service}",
                                          self._replicas, self._replica_slice))  # fmt: skip
            else:
                tasks.append(self._follow(core.list_namespaced_pod, str(self.pod_selector),
                                          self._replicas, self._replica_pod))  # fmt: skip
            if self.cache_service is not None:
                tasks.append(self._follow(discovery.list_namespaced_endpoint_slice,
                                          f"{SERVICE_NAME_LABEL}={self.cache_service}",
                                          self._caches, self._cache_slice))  # fmt: skip
            await asyncio.gather(*tasks)
        finally:
            await api.close()

    def stop(self) -> None:
        self._stopped.set()

    def _replica_slice(self, body: Mapping[str, Any]) -> list[SliceEndpoint]:
        return slice_endpoints(body, self.port_name)

    def _replica_pod(self, body: Mapping[str, Any]) -> list[SliceEndpoint]:
        found = pod_endpoint(body, self.replica_port)
        return [found] if found is not None else []

    def _cache_slice(self, body: Mapping[str, Any]) -> list[SliceEndpoint]:
        return slice_endpoints(body, self.cache_port_name)

    async def _follow(
        self,
        lister: Callable[..., Any],
        selector: str,
        table: dict[str, list[SliceEndpoint]],
        parse: Callable[[Mapping[str, Any]], list[SliceEndpoint]],
    ) -> None:
        from kubernetes_asyncio import watch  # noqa: PLC0415
        from kubernetes_asyncio.client.exceptions import ApiException  # noqa: PLC0415

        while not self._stopped.is_set():
            try:
                response = await lister(self.namespace, label_selector=selector,
                                        _preload_content=False)  # fmt: skip
                try:
                    body = json.loads(await response.read())
                finally:
                    response.release()
                table.clear()
                for item in body.get("items") or []:
                    table[item["metadata"]["name"]] = parse(item)
                await self._report()
                version = body["metadata"]["resourceVersion"]
                async with watch.Watch() as watcher:
                    events = watcher.stream(
                        lister, self.namespace, label_selector=selector,
                        resource_version=version, timeout_seconds=300,
                    )  # fmt: skip
                    async for event in events:
                        kind, item = event["type"], event["raw_object"]
                        name = item["metadata"]["name"]
                        if kind == "DELETED":
                            table.pop(name, None)
                        elif kind in ("ADDED", "MODIFIED"):
                            table[name] = parse(item)
                        await self._report()
                        if self._stopped.is_set():
                            return
            except asyncio.CancelledError:
                raise
            except (ApiException, aiohttp.ClientError, OSError, asyncio.TimeoutError,
                    KeyError, ValueError) as exc:  # fmt: skip
                log.warning("discovery of %s in %s: %s; relisting", selector, self.namespace, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), self.relist_backoff_s)

    async def _report(self) -> None:
        replicas = join(
            (e for items in self._replicas.values() for e in items),
            (e for items in self._caches.values() for e in items),
        )
        if replicas != self._reported:
            self._reported = replicas
            log.info("replicas: %s", ", ".join(f"{r.name} ({r.node or '?'})" for r in replicas))
            await self.on_change(replicas)
