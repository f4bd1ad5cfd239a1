"""Credentials from the official client's loaders, kept fresh as tokens rotate.

``kubernetes_asyncio`` loads the kubeconfig (client certificates, CA, exec plugins such as
``aws eks get-token`` or ``gke-gcloud-auth-plugin``) or the pod's ServiceAccount. On top of
it: a token read from a file (a projected ServiceAccount token, a kubeconfig ``tokenFile``)
is read again every ``TOKEN_REFRESH_S`` and at once after a 401; an exec plugin is run again
when its credential expires or after a 401. kopf logs in with the same credentials.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import ConfigException, load_kube_config
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader
from kubernetes_asyncio.config.kube_config import KubeConfigLoader

logger = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REFRESH_S = 60.0  # kubelet rotates projected tokens at 80 % of their life (>= 10 min)


@dataclass(frozen=True)
class InCluster:
    """A pod's ServiceAccount: the API server by IP (no cluster DNS needed)."""

    server: str
    token_path: str
    ca_path: str | None
    namespace: str | None
    environ: Mapping[str, str]


def in_cluster(
    sa_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> InCluster | None:
    """The ServiceAccount login when running in a pod, else None.

    The server is ``$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`` (set by kubelet in
    every pod), never ``kubernetes.default.svc``, which needs cluster DNS.
    """
    env = dict(os.environ if environ is None else environ)
    host = env.get("KUBERNETES_SERVICE_HOST")
    sa_dir = SA_DIR if sa_dir is None else sa_dir
    token_file = sa_dir / "token"
    if not host or not token_file.is_file():
        return None
    env.setdefault("KUBERNETES_SERVICE_PORT", "443")
    env["KUBERNETES_SERVICE_PORT"] = env["KUBERNETES_SERVICE_PORT"] or "443"
    port = env["KUBERNETES_SERVICE_PORT"]
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    ca_file = sa_dir / "ca.crt"
    ns_file = sa_dir / "namespace"
    return InCluster(
        server=f"https://{bracketed}:{port}",
        token_path=str(token_file),
        ca_path=str(ca_file) if ca_file.is_file() else None,
        namespace=(ns_file.read_text().strip() or None) if ns_file.is_file() else None,
        environ=env,
    )


class Credentials:
    """A client Configuration whose bearer token follows rotation (file or exec plugin)."""

    def __init__(
        self,
        configuration: Configuration,
        *,
        namespace: str | None = None,
        token_file: str | None = None,
        exec_loader: KubeConfigLoader | None = None,
        refresh_s: float = TOKEN_REFRESH_S,
    ) -> None:
        self.configuration = configuration
        self.namespace = namespace
        self.token_file = token_file
        self.exec_loader = exec_loader
        self.refresh_s = refresh_s
        self._read_at = time.monotonic()
        if token_file is not None or exec_loader is not None:
            configuration.refresh_api_key_hook = self._hook

    @property
    def rotates(self) -> bool:
        """The token can change while the process runs (kopf must log in again)."""
        return self.token_file is not None or self.exec_loader is not None

    @property
    def token(self) -> str | None:
        """The bearer token without its scheme."""
        value = self.configuration.api_key.get("BearerToken")
        if not value:
            return None
        scheme, _, token = str(value).partition(" ")
        return token if scheme.lower() == "bearer" else str(value)

    async def _hook(self, _: Configuration) -> None:
        if time.monotonic() - self._read_at >= self.refresh_s:
            await self.refresh()

    async def refresh(self, *, force: bool = False) -> None:
        """Read the token file again, or run the exec plugin again (forced: even if unexpired)."""
        self._read_at = time.monotonic()
        if self.token_file is not None:
            token = Path(self.token_file).read_text(encoding="utf-8").strip()
            self.configuration.api_key["BearerToken"] = f"Bearer {token}"
        elif self.exec_loader is not None:
            if force and hasattr(self.exec_loader, "exec_plugin_expiry"):
                del self.exec_loader.exec_plugin_expiry
            await self.exec_loader.load_from_exec_plugin()
            if getattr(self.exec_loader, "token", None):
                self.configuration.api_key["BearerToken"] = self.exec_loader.token


def _kubeconfig_user(path: Path, context: str | None) -> tuple[dict[str, Any], str | None]:
    """The user entry of the (current) context, and the context's namespace."""
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    contexts = {c["name"]: c.get("context") or {} for c in config.get("contexts") or []}
    name = context or config.get("current-context")
    ctx = contexts.get(str(name), {})
    users = {u["name"]: u.get("user") or {} for u in config.get("users") or []}
    return users.get(ctx.get("user"), {}), ctx.get("namespace")


async def from_kubeconfig(path: Path, context: str | None = None) -> Credentials:
    configuration = Configuration()
    try:
        loader = await load_kube_config(
            config_file=str(path),
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, KeyError, TypeError) as exc:
        raise RuntimeError(f"cannot use the kubeconfig {path}: {exc}") from exc
    user, namespace = _kubeconfig_user(path, context)
    token_file = None
    if user.get("tokenFile") and not user.get("token") and "exec" not in user:
        token_file = str((path.parent / str(user["tokenFile"])).resolve())
    exec_loader = loader if "exec" in user else None
    credentials = Credentials(
        configuration, namespace=namespace, token_file=token_file, exec_loader=exec_loader
    )
    if token_file is not None:
        await credentials.refresh()  # the loader keeps the file's trailing newline
    return credentials


def from_service_account(pod: InCluster) -> Credentials:
    configuration = Configuration()
    loader = InClusterConfigLoader(
        token_filename=pod.token_path,
        cert_filename=pod.ca_path or "",
        try_refresh_token=False,  # ours: on a timer and after a 401
        environ=dict(pod.environ),
    )
    try:
        loader.load_and_set(configuration)
    except ConfigException as exc:
        raise RuntimeError(f"cannot use the pod's ServiceAccount: {exc}") from exc
    configuration.host = pod.server
    credentials = Credentials(configuration, namespace=pod.namespace, token_file=pod.token_path)
    token = Path(pod.token_path).read_text(encoding="utf-8").strip()
    configuration.api_key["BearerToken"] = f"Bearer {token}"
    return credentials


async def load_credentials(
    kubeconfig: str | None = None, *, sa_dir: Path | None = None
) -> Credentials:
    """From a kubeconfig (argument, $KUBECONFIG, ~/.kube/config), else the pod's account
    (``sa_dir``: its ServiceAccount directory, default ``SA_DIR``)."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    first = Path(path.split(os.pathsep)[0])
    if first.is_file():
        return await from_kubeconfig(first)
    pod = in_cluster(sa_dir)
    if pod is not None:
        return from_service_account(pod)
    raise RuntimeError(
        f"No Kubernetes credentials: {first} does not exist and this is not a pod; "
        "set KUBECONFIG to a kubeconfig file, or run the operator in a pod"
    )
