"""A small async Kubernetes API client (aiohttp): server-side apply, status patches, watches.

Credentials come from ``$KUBECONFIG`` (token, client certificate, CA) or, inside a pod,
from the ServiceAccount; the same sources kopf logs in with.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from lmcache_operator.api.common import FIELD_MANAGER

logger = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Secret": "secrets",
    "Pod": "pods",
    "Namespace": "namespaces",
    "Node": "nodes",
    "Event": "events",
    "DaemonSet": "daemonsets",
    "Deployment": "deployments",
    "ServiceMonitor": "servicemonitors",
    "CustomResourceDefinition": "customresourcedefinitions",
    "LMCacheCluster": "lmcacheclusters",
    "VLLMDeployment": "vllmdeployments",
}
_CLUSTER_SCOPED = {"Namespace", "Node", "CustomResourceDefinition"}


class KubeError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.body = body
        self.method = method
        self.path = path


FORBIDDEN_RETRY_S = 30.0  # RBAC is fixed by a person: retry slowly, never give up
_RBAC_VERBS = {
    "GET": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
    "WATCH": "watch",
}


def forbidden_message(exc: KubeError) -> str | None:
    """What RBAC refused (verb, resource, namespace) and how to fix it; None unless HTTP 403.

    A 403 is the operator's permissions, not the user's spec: it is retried, never reported
    as an invalid spec.
    """
    if exc.status != 403:
        return None
    parts = [p for p in exc.path.split("?")[0].split("/") if p]
    group = parts[1] if parts[:1] == ["apis"] and len(parts) > 1 else ""
    namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts[:-1] else None
    verb = _RBAC_VERBS.get(exc.method.upper(), exc.method.lower())
    resource = _resource_of(exc.path.split("?")[0])
    where = f" in namespace {namespace}" if namespace else ""
    api_group = group or "core"
    detail = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
    return (
        f"the operator may not {verb} {resource} (apiGroup {api_group}){where}: grant "
        f"'{verb}' on '{resource}' in the operator's ClusterRole/Role; retrying every "
        f"{FORBIDDEN_RETRY_S:.0f} s" + (f" (API server: {detail})" if detail else "")
    )


@dataclass(frozen=True)
class Credentials:
    server: str
    token: str | None
    ssl_context: ssl.SSLContext | bool


def _materialise(data_b64: str | None, file: str | None, suffix: str) -> str | None:
    if file:
        return file
    if not data_b64:
        return None
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the ssl context's life
        "wb", suffix=suffix, delete=False
    )
    handle.write(base64.b64decode(data_b64))
    handle.close()
    return handle.name


@dataclass(frozen=True)
class InCluster:
    """A pod's ServiceAccount login: the API server by IP (no cluster DNS needed)."""

    server: str
    token: str
    ca_path: str | None
    namespace: str | None


def in_cluster(
    sa_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> InCluster | None:
    """The ServiceAccount credentials when running in a pod, else None.

    The server is ``$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`` (set by kubelet in
    every pod), never ``kubernetes.default.svc``, which needs cluster DNS.
    """
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST")
    sa_dir = SA_DIR if sa_dir is None else sa_dir
    token_file = sa_dir / "token"
    if not host or not token_file.is_file():
        return None
    port = env.get("KUBERNETES_SERVICE_PORT") or "443"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    ca_file = sa_dir / "ca.crt"
    ns_file = sa_dir / "namespace"
    return InCluster(
        server=f"https://{host}:{port}",
        token=token_file.read_text().strip(),
        ca_path=str(ca_file) if ca_file.is_file() else None,
        namespace=(ns_file.read_text().strip() or None) if ns_file.is_file() else None,
    )


def load_credentials(kubeconfig: str | None = None) -> Credentials:
    """Credentials from a kubeconfig (argument, $KUBECONFIG, ~/.kube/config) or in-cluster."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    first = path.split(os.pathsep)[0]
    if Path(first).is_file():
        return _from_kubeconfig(Path(first))
    pod = in_cluster()
    if pod is not None:
        context = ssl.create_default_context(cafile=pod.ca_path)
        return Credentials(pod.server, pod.token, context)
    raise RuntimeError(
        f"No Kubernetes credentials: {first} does not exist and this is not a pod; "
        "set KUBECONFIG to a kubeconfig file, or run the operator in a pod"
    )


def _from_kubeconfig(path: Path) -> Credentials:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    contexts = {c["name"]: c["context"] for c in config.get("contexts", [])}
    context = contexts[config["current-context"]]
    cluster = {c["name"]: c["cluster"] for c in config.get("clusters", [])}[context["cluster"]]
    user = {u["name"]: u["user"] for u in config.get("users", [])}[context["user"]]
    ssl_context: ssl.SSLContext | bool
    if cluster.get("insecure-skip-tls-verify"):
        ssl_context = False
    else:
        cafile = _materialise(
            cluster.get("certificate-authority-data"), cluster.get("certificate-authority"), ".crt"
        )
        ssl_context = ssl.create_default_context(cafile=cafile)
        cert = _materialise(
            user.get("client-certificate-data"), user.get("client-certificate"), ".crt"
        )
        key = _materialise(user.get("client-key-data"), user.get("client-key"), ".key")
        if cert and key:
            ssl_context.load_cert_chain(cert, key)
    token = user.get("token")
    if token is None and user.get("tokenFile"):
        token = Path(user["tokenFile"]).read_text().strip()
    return Credentials(cluster["server"].rstrip("/"), token, ssl_context)


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The REST path of a collection or an object."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    plural = _PLURALS[kind]
    if kind not in _CLUSTER_SCOPED and namespace:
        base += f"/namespaces/{namespace}"
    path = f"{base}/{plural}"
    return f"{path}/{name}" if name else path


def _resource_of(path: str) -> str:
    """The resource (and subresource) a REST path names, e.g. lmcacheclusters/status."""
    parts = [p for p in path.split("/") if p]
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in _PLURALS.values():
            return "/".join(parts[index : index + 1] + parts[index + 2 : index + 3])
    return path


class KubeClient:
    """One connection pool to the API server."""

    def __init__(self, credentials: Credentials, *, timeout_s: float = 30.0) -> None:
        self.credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.requests: Counter[str] = Counter()  # "PATCH lmcacheclusters/status" -> count

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> KubeClient:
        return cls(load_credentials(kubeconfig))

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.credentials.token:
            headers["Authorization"] = f"Bearer {self.credentials.token}"
        return headers

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context, limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers(), timeout=self._timeout
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        self.requests[f"{method} {_resource_of(path)}"] += 1
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else None
        async with self.session.request(
            method,
            self.credentials.server + path,
            data=data,
            headers=headers,
            params=params,
        ) as response:
            text = await response.text()
            payload: Any = json.loads(text) if text else None
            if response.status >= 400:
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

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        """Delete; False when it was already gone."""
        try:
            await self.request("DELETE", object_path(api_version, kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Replace ``status`` through the status subresource (JSON merge patch)."""
        path = object_path(api_version, kind, namespace, name) + "/status"
        result: dict[str, Any] = await self.request(
            "PATCH",
            path,
            body={"status": dict(status)},
            content_type="application/merge-patch+json",
        )
        return result

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
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_s + 10)
        async with self.session.get(
            self.credentials.server + path, params=params, timeout=timeout
        ) as response:
            if response.status >= 400:
                raise KubeError(response.status, "WATCH", path, await response.text())
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)
