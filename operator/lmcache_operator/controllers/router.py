"""A VLLMDeployment's router (spec.router): its children applied, or removed when disabled.

The children (ServiceAccount, Role, RoleBinding, Service, Deployment, all ``<name>-router``
and labelled ``lmcache.dev/router=<name>``) come from ``builders/router.py`` and are applied
in that order with the VLLMDeployment as their owner. Watches of the router-labelled objects
(``on_event``, one callback per kind) tell which exist, so turning the router off deletes
exactly those; garbage collection removes them with the VLLMDeployment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from lmcache_operator.api.vllmdeployment import VLLMDeploymentSpec
from lmcache_operator.builders import router
from lmcache_operator.builders.common import MANAGED_BY, owner_reference
from lmcache_operator.builders.vllm_connector import CacheConnection
from lmcache_operator.kube import KubeClient
from lmcache_operator.state import Key

logger = logging.getLogger(__name__)

ROUTER_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},{router.ROUTER_LABEL}"
# (apiVersion, kind) of the children, in apply order; removed in the reverse order
ROUTER_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
)
ChildCallback = Callable[[str, dict[str, Any]], None]


class RouterChildren:
    """Applies and removes router children; knows from the watches which exist."""

    def __init__(self, client: KubeClient, forget: Callable[[str, str, str], None]) -> None:
        self.client = client
        self.forget = forget  # (kind, namespace, name): no repair of a child we removed
        self.present: dict[Key, set[str]] = {}  # (namespace, vLLM name) -> kinds seen

    def on_event_of(self, kind: str) -> ChildCallback:
        """The watch callback of one kind (the SYNCED event of a list names no kind)."""

        def on_event(event: str, obj: dict[str, Any]) -> None:
            if event == "SYNCED":
                seen = obj["seen"]
                for key, kinds in self.present.items():
                    listed = obj["namespace"] in (None, key[0]) and kind in kinds
                    if listed and (key[0], router.router_name(key[1])) not in seen:
                        kinds.discard(kind)
                return
            meta = obj["metadata"]
            owner = (meta.get("labels") or {}).get(router.ROUTER_LABEL)
            if not owner or meta["name"] != router.router_name(owner):
                return
            key = (str(meta["namespace"]), str(owner))
            if event == "DELETED":
                self.present.get(key, set()).discard(kind)
            else:
                self.present.setdefault(key, set()).add(kind)

        return on_event

    async def reconcile(
        self,
        key: Key,
        spec: VLLMDeploymentSpec,
        conn: CacheConnection | None,
        owner: Mapping[str, Any],
        *,
        was_enabled: bool,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Apply the children (in order, owned by ``owner``), or remove them when the router
        is off; (desired, applied) for the self-healing records. ``was_enabled``: the status
        had a routerUrl (the watches may not have listed yet after a restart)."""
        namespace, name = key
        if not spec.router.enabled:
            await self.remove(key, everything=was_enabled)
            return [], []
        children = router.build_children(name, namespace, spec, conn)
        for child in children:
            child["metadata"]["ownerReferences"] = [owner_reference(owner)]
        results = [await self.client.apply(child) for child in children]
        return children, results

    async def remove(self, key: Key, *, everything: bool = False) -> None:
        """Delete the router children the watches saw (``everything``: all five names)."""
        namespace, name = key
        kinds = set(self.present.get(key, set()))
        if everything:
            kinds |= {kind for _, kind in ROUTER_KINDS}
        for api_version, kind in reversed(ROUTER_KINDS):
            if kind not in kinds:
                continue
            self.forget(kind, namespace, router.router_name(name))
            # delete() answers False when the object is gone already (404)
            if await self.client.delete(api_version, kind, namespace, router.router_name(name)):
                logger.info("router of %s/%s off: deleted %s %s", namespace, name, kind,
                            router.router_name(name))  # fmt: skip
        self.present.pop(key, None)
