"""A cluster's own server settings (``spec.config`` over ``spec.configFrom``) for its reconcile.

``resolve`` reads the ConfigMap ``spec.configFrom`` names and checks the merged settings with
the node's own loader (``user_config.check_user_config``): its problems make the spec invalid
(ConfigValid=False), its warnings (LMCache keys ignored or converted) become one Event per
change.

A user's ConfigMap carries no label of ours, so the operator's label-selected watches do not
see it. ``check_all`` runs every ``Settings.config_check_s`` (``--config-check-interval``): it
reads each ConfigMap a cluster references and re-applies the cluster when the text changed,
appeared or went away — one GET per cluster using configFrom per interval, instead of a watch
of every ConfigMap in the namespaces.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.lmcachecluster import node_config
from lmcache_operator.builders.user_config import UserConfig, check_user_config, origin
from lmcache_operator.kube import KubeClient, KubeError
from lmcache_operator.state import Key

logger = logging.getLogger(__name__)


def digest(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tracked:
    """The ConfigMap key a cluster reads, and the digest of its text at the last reconcile."""

    configmap: str
    key: str
    digest: str | None  # None: missing (the ConfigMap or the key)


class ClusterConfigs:
    """Per cluster: what its configFrom held when last applied; the warnings last posted."""

    def __init__(self, client: KubeClient, request_repair: Callable[[Key], None]) -> None:
        self.client = client
        self.request_repair = request_repair
        self.tracked: dict[Key, Tracked] = {}
        self.published: dict[Key, str] = {}

    async def _read(self, namespace: str, configmap: str, key: str) -> str | None:
        body = await self.client.get("v1", "ConfigMap", namespace, configmap)
        data = (body or {}).get("data") or {}
        return str(data[key]) if key in data else None

    async def resolve(self, key: Key, spec: LMCacheClusterSpec) -> UserConfig:
        """The cluster's settings, checked against the operator's keys (KubeError when the
        ConfigMap cannot be read: the reconcile's error handling reports it)."""
        ref = spec.config_from
        text = None
        if ref is None:
            self.tracked.pop(key, None)
        else:
            text = await self._read(key[0], ref.name, ref.key)
            self.tracked[key] = Tracked(ref.name, ref.key, digest(text))
        if ref is None and not spec.config:
            return UserConfig()
        return check_user_config(spec, node_config(key[1], key[0], spec), text)

    def warnings_message(self, key: Key, spec: LMCacheClusterSpec, warnings: list[str]) -> str:
        """The Event message for ``warnings``; '' when they are those last posted (or none)."""
        if not warnings:
            self.published.pop(key, None)
            return ""
        text = "; ".join(warnings)
        seen = digest(text) or ""
        if self.published.get(key) == seen:
            return ""
        self.published[key] = seen
        count = len(warnings)
        return f"{origin(spec)}: {count} setting(s) ignored or converted: {text}"

    def forget(self, key: Key) -> None:
        self.tracked.pop(key, None)
        self.published.pop(key, None)

    async def check_all(self) -> None:
        """Re-apply each cluster whose configFrom text is not what its last reconcile read."""
        for key, tracked in list(self.tracked.items()):
            try:
                text = await self._read(key[0], tracked.configmap, tracked.key)
            except (KubeError, aiohttp.ClientError, TimeoutError) as exc:
                logger.warning(
                    "cannot read ConfigMap %s/%s of LMCacheCluster %s: %s",
                    key[0], tracked.configmap, key[1], exc,
                )  # fmt: skip
                continue
            if self.tracked.get(key) != tracked or digest(text) == tracked.digest:
                continue  # forgotten or re-read meanwhile, or unchanged
            logger.info(
                "ConfigMap %s/%s (key %s) of LMCacheCluster %s changed: re-applying",
                key[0], tracked.configmap, tracked.key, key[1],
            )  # fmt: skip
            self.tracked[key] = Tracked(tracked.configmap, tracked.key, digest(text))
            self.request_repair(key)
