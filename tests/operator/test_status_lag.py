"""The status writer against a watch that lags behind its own writes (real API server).

kopf hands an LMCacheCluster's watch events to the operator one object at a time, behind
that object's handlers, so on a busy node the body the operator holds can still carry a
status older than the one it last wrote. The phase must follow what was last written: a
node lost after Ready is Degraded, whatever stale phase the late event still shows.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lmcache_operator.controllers.children import ChildRepairer
from lmcache_operator.controllers.cluster_events import pod_summary
from lmcache_operator.controllers.lmcachecluster import ClusterController
from lmcache_operator.kube import KubeClient
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import Applied, Views
from lmcache_operator.status import Observed, compute_status
from prometheus_client import CollectorRegistry

from tests.operator.kubectl import Cluster
from tests.operator.test_cluster import manifest, status
from tests.operator.test_status import ds, observe, pod

pytestmark = pytest.mark.k8s

NODES = ("gpu-0", "gpu-1")


def _phases(k8s: Cluster, namespace: str) -> list[str]:
    """Run a controller in this process over hand-made views of a Ready cluster whose watch
    lags: the body still shows Progressing. gpu-1 goes NotReady; then the late events
    arrive, each with a status older than the last write, and the status is refreshed after
    each. Returns the phase on the object after each refresh."""
    body = k8s.get("lmcc", "cache", namespace)
    assert body is not None
    generation = int(body["metadata"]["generation"])

    def status_with(**overrides: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"generation": generation, "applied_generation": generation}
        return compute_status(Observed(**{**observe().__dict__, **fields, **overrides}))

    starting = status_with(daemonset=ds(2, 1), pods=[pod("gpu-0"), pod("gpu-1", False)])
    ready = status_with(previous=starting)
    assert (starting["phase"], ready["phase"]) == ("Progressing", "Ready")

    async def run() -> list[str]:
        client = await KubeClient.connect(str(k8s.kubeconfig))
        metrics = OperatorMetrics(CollectorRegistry())
        controller = ClusterController(client, Views(), metrics, ChildRepairer({}, metrics))
        key = (namespace, "cache")
        try:
            await client.patch_status("lmcache.dev/v1alpha1", "LMCacheCluster", *key, ready)
            view = controller.views.cluster(key)
            view.applied = Applied(generation=generation, daemonset_generation=1)
            view.daemonset = ds(2, 2)
            view.pods = {f"p-{n}": pod_summary(pod(n)) for n in NODES}
            view.body = {**body, "status": starting}  # the watch has not seen Ready yet
            view.last_written = ready
            controller.views.node_problems["gpu-1"] = "NotReady"
            phases = []
            for late in (starting, ready, starting):  # events of older writes, in order
                view.body = {**body, "status": late}
                await controller.refresh_status(key)
                phases.append(str(status(k8s, namespace).get("phase")))
            return phases
        finally:
            await client.close()

    return asyncio.run(run())


def test_a_node_lost_while_the_watch_lags_is_degraded_and_stays_so(
    k8s_cluster: Cluster, namespace: str
) -> None:
    k8s_cluster.apply(manifest(), namespace)  # no operator runs: this test is the operator
    phases = _phases(k8s_cluster, namespace)
    assert phases == ["Degraded", "Degraded", "Degraded"]
    message = next(
        c for c in status(k8s_cluster, namespace)["conditions"] if c["type"] == "Degraded"
    )["message"]
    assert "gpu-1 (node NotReady)" in message
