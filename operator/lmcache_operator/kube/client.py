"""Thin typed helpers on the official async client: server-side apply, status, watches.

Transport, TLS and authentication are ``kubernetes_asyncio``'s (``ApiClient``); bodies go
and come back as plain JSON dicts (the builders make dicts, and not deserialising every
watch event into generated models keeps the operator's CPU low). A 401 makes the
credentials refresh (rotated token, expired exec credential) and the call run once more.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient

from lmcache_operator.api.common import FIELD_MANAGER
from lmcache_operator.kube.errors import KubeError
from lmcache_operator.kube.login import Credentials, load_credentials
from lmcache_operator.kube.paths import object_path, resource_of

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 30.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NETRC")
POOL_SIZE = 64  # connections: watches hold ~10, the rest serve bursts of applies
ErrorHook = Callable[[int, str], None]  # (HTTP status or 0 for the network, "VERB resource")


class KubeClient:
    """One connection pool to the API server, and what was asked of it."""

    def __init__(self, credentials: Credentials, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.credentials = credentials
        credentials.configuration.connection_pool_maxsize = POOL_SIZE
        self.api = ApiClient(credentials.configuration)
        if not any(os.environ.get(name) for name in PROXY_VARIABLES):
            # kubernetes_asyncio opens its session with trust_env=True: then every request
            # looks for ~/.netrc and the proxy variables in a worker thread (two thread hops
            # per request: the largest CPU cost of the client at 200 clusters, measured).
            # Without proxy variables there is nothing to find. A kubeconfig proxy-url is
            # passed per request and works either way.
            self.api.rest_client.pool_manager._trust_env = False
        self.timeout_s = timeout_s
        self.requests: Counter[str] = Counter()  # "PATCH lmcacheclusters/status" -> count
        self.on_error: ErrorHook | None = None

    @classmethod
    async def connect(
        cls, kubeconfig: str | None = None, *, sa_dir: Path | None = None
    ) -> KubeClient:
        return cls(await load_credentials(kubeconfig, sa_dir=sa_dir))

    async def close(self) -> None:
        await self.api.close()

    def _failed(self, status: int, what: str) -> None:
        if self.on_error is not None:
            self.on_error(status, what)

    async def _send(  # noqa: PLR0917 - private, called twice with every argument
        self,
        method: str,
        path: str,
        body: Any,
        content_type: str,
        params: Mapping[str, str] | None,
        timeout: float | aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """The open response (status not checked); one retry after a 401 with fresh tokens."""
        config = self.credentials.configuration
        for attempt in (1, 2):
            # The client's transport and auth (its refresh hook runs here), without its
            # generic parameter sanitising: our bodies are plain JSON already.
            headers = {
                **self.api.default_headers,
                "Content-Type": content_type,
                "Accept": "application/json",
            }
            token = await config.get_api_key_with_prefix("BearerToken")
            if token:
                headers["Authorization"] = token
            try:
                response: aiohttp.ClientResponse = await self.api.rest_client.request(
                    method,
                    f"{config.host}{path}",
                    query_params=dict(params or {}),
                    headers=headers,
                    body=body,
                    _preload_content=False,
                    _request_timeout=timeout,
                )
            except (aiohttp.ClientError, TimeoutError):
                self._failed(0, f"{method} {resource_of(path)}")
                raise
            if response.status != 401 or attempt == 2:
                return response
            response.release()
            logger.info("the API server refused our token (401): reading the credentials again")
            await self.credentials.refresh(force=True)
        raise AssertionError("unreachable")

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        what = f"{method} {resource_of(path)}"
        self.requests[what] += 1
        response = await self._send(method, path, body, content_type, params, self.timeout_s)
        async with response:
            text = await response.text()
        try:
            payload: Any = json.loads(text) if text else None
        except ValueError:  # an error page that is not JSON (e.g. discovery's 404)
            if response.status < 400:
                raise
            payload = text
        if response.status >= 400:
            self._failed(response.status, what)
            raise KubeError(response.status, method, path, payload)
        return payload

    async def apply(
        self, obj: Mapping[str, Any], *, field_manager: str = FIELD_MANAGER, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply of a whole object (create or patch)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        result: dict[str, Any] = await self.request(
            "PATCH", path, body=obj, content_type="application/apply-patch+yaml", params=params
        )
        return result

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST a new object (KubeError 409 when it exists)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        result: dict[str, Any] = await self.request("POST", path, body=obj)
        return result

    async def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str = "",
        strategic: bool = False,
    ) -> dict[str, Any]:
        """JSON merge patch (``strategic``: Kubernetes' strategic merge, which merges lists
        such as pod conditions by key instead of replacing them)."""
        path = object_path(api_version, kind, namespace, name)
        path += f"/{subresource}" if subresource else ""
        content_type = (
            "application/strategic-merge-patch+json"
            if strategic
            else "application/merge-patch+json"
        )
        result: dict[str, Any] = await self.request(
            "PATCH", path, body=dict(patch), content_type=content_type
        )
        return result

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.request(
                "GET", object_path(api_version, kind, namespace, name)
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> dict[str, Any]:
        params = {"labelSelector": label_selector} if label_selector else None
        result: dict[str, Any] = await self.request(
            "GET", object_path(api_version, kind, namespace), params=params
        )
        return result

    async def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        resource_version: str | None = None,
        uid: str | None = None,
        propagation: str | None = None,
    ) -> bool:
        """Delete (only that version or that uid, when given; ``propagation``: Background,
        Foreground or Orphan); False when it was already gone."""
        preconditions = {
            k: v for k, v in (("resourceVersion", resource_version), ("uid", uid)) if v
        }
        body: dict[str, Any] | None = {"preconditions": preconditions} if preconditions else None
        if propagation:
            body = {**(body or {}), "propagationPolicy": propagation}
        try:
            await self.request("DELETE", object_path(api_version, kind, namespace, name), body=body)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Replace ``status`` through the status subresource (JSON merge patch)."""
        return await self.merge_patch(
            api_version, kind, namespace, name, {"status": dict(status)}, subresource="status"
        )

    async def watch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        timeout_s: int = 60,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events ({type, object}) until the server ends the stream."""
        params = {"watch": "true", "timeoutSeconds": str(timeout_s)}
        if resource_version:
            params["resourceVersion"] = resource_version
        if label_selector:
            params["labelSelector"] = label_selector
        path = object_path(api_version, kind, namespace)
        self.requests[f"WATCH {resource_of(path)}"] += 1
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s + 10)
        response = await self._send("GET", path, None, "application/json", params, timeout)
        async with response:
            if response.status >= 400:
                self._failed(response.status, f"WATCH {resource_of(path)}")
                raise KubeError(response.status, "WATCH", path, await response.text())
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)
