"""What an LMCacheCluster's status says about its pools: where they are, what each new
server adopted, the rollout, and whether each node's memory holds pool and vLLM pods."""

from __future__ import annotations

from typing import Any

from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.builders.cache_memory import pool_bytes
from lmcache_operator.builders.vllm_status import active_pods
from lmcache_operator.controllers.cleanup import pool_nodes
from lmcache_operator.controllers.rollout import RolloutController
from lmcache_operator.memory import memory_problems
from lmcache_operator.state import ClusterView, Key, Views


def vllm_requests(views: Views, key: Key) -> dict[str, tuple[int, int]]:
    """Per node: the memory requests (bytes) and the count of the cluster's vLLM pods."""
    out: dict[str, tuple[int, int]] = {}
    for consumer in views.consumers(*key):
        view = views.vllm.get(consumer)
        for pod in active_pods((view.pods if view else {}).values()):
            node = pod["spec"].get("nodeName")
            if not node:
                continue
            requested, count = out.get(node, (0, 0))
            out[node] = (requested + int(pod["spec"].get("memoryRequest") or 0), count + 1)
    return out


def pools(
    views: Views, key: Key, view: ClusterView, spec: LMCacheClusterSpec | None
) -> tuple[list[str], list[str]]:
    """(status.poolNodes, the memory problems per node)."""
    pod_nodes = {
        str(p["spec"]["nodeName"])
        for p in view.pods.values()
        if p["spec"].get("nodeName") and p["status"].get("phase") not in ("Succeeded", "Failed")
    }
    gone = {n for n, why in views.node_problems.items() if why == "deleted"}
    recorded = [(view.body or {}).get("status") or {}, view.last_written or {}]
    persistent = spec is None or spec.cache.persistent
    nodes = pool_nodes(recorded, pod_nodes if persistent else set(), gone)
    if spec is None:
        return nodes, []
    problems = memory_problems(
        pool_bytes(spec), (pod_nodes - gone) | set(nodes), views.node_memory,
        vllm_requests(views, key),
    )  # fmt: skip
    return nodes, problems


def add_pool_fields(
    status: dict[str, Any], view: ClusterView, rollout: RolloutController, key: Key,
    nodes: list[str],
) -> None:  # fmt: skip
    """status.poolNodes, status.rollout and endpoints[].pool."""
    status["poolNodes"] = nodes
    progress = rollout.status(key)
    if progress is not None:
        status["rollout"] = progress
    for endpoint in status.get("endpoints") or []:
        pod = view.pods.get(endpoint["pod"])
        pool = rollout.pool_of(str(pod["metadata"].get("uid") or "")) if pod else None
        if pool is not None:
            endpoint["pool"] = pool
