"""How a cache DaemonSet's pods are replaced: by the operator, node by node (OnDelete), or by
the DaemonSet controller (maxSurge); the template hash names the spec a pod runs."""

from __future__ import annotations

from typing import Any

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec

TEMPLATE_HASH_ANNOTATION = "lmcache.dev/template-hash"  # which spec a cache pod runs


def daemonset_update_strategy(spec: LMCacheClusterSpec) -> dict[str, Any]:
    """OnDelete: the operator replaces the pods itself, node by node, waiting for each new
    server to adopt its pool (controllers/rollout.py). With maxSurge (no host network) the
    DaemonSet controller rolls instead, as it always did."""
    strategy = spec.update_strategy
    if strategy.type == "RollingUpdate" and strategy.max_surge is not None:
        rolling = {"maxUnavailable": strategy.max_unavailable, "maxSurge": strategy.max_surge}
        return {"type": "RollingUpdate", "rollingUpdate": rolling}
    return {"type": "OnDelete"}


def operator_rolls(spec: LMCacheClusterSpec) -> bool:
    """Whether the operator replaces the cache pods of a new spec (controllers/rollout.py)."""
    return daemonset_update_strategy(spec)["type"] == "OnDelete" and (
        spec.update_strategy.type == "RollingUpdate"
    )
