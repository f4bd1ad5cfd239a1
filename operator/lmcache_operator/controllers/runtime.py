"""The operator's object graph: one client, one set of views, the controllers, the watches.

Made once per process by the runner and handed to kopf's handlers through ``memo``; nothing
is module-global, so tests build their own with a client of their choosing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from lmcache_operator.api.lmcachecluster import KIND as CLUSTER_KIND
from lmcache_operator.api.vllmdeployment import KIND as VLLM_KIND
from lmcache_operator.builders.common import MANAGED_BY
from lmcache_operator.controllers.children import ChildRepairer
from lmcache_operator.controllers.cluster_events import (
    DAEMONSET_SELECTOR,
    POD_SELECTOR,
    ClusterObserver,
)
from lmcache_operator.controllers.common import Settings
from lmcache_operator.controllers.credentials import every
from lmcache_operator.controllers.gates import GateController
from lmcache_operator.controllers.injection import REPORTED_POD_SELECTOR, InjectionReporter
from lmcache_operator.controllers.lmcachecluster import ClusterController
from lmcache_operator.controllers.router import ROUTER_KINDS, ROUTER_SELECTOR
from lmcache_operator.controllers.vllm_events import (
    CACHE_POD_SELECTOR,
    DEPLOYMENT_SELECTOR,
    VLLM_POD_SELECTOR,
    VLLMObserver,
)
from lmcache_operator.controllers.vllmdeployment import VLLMController
from lmcache_operator.kube import KubeClient
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import Views
from lmcache_operator.watchers import EventCallback, WatchLoop

logger = logging.getLogger(__name__)

CHILD_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"


@dataclass
class Runtime:
    client: KubeClient
    settings: Settings
    metrics: OperatorMetrics
    views: Views = field(default_factory=Views)
    watch_tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client.on_error = self.metrics.api_error
        repair = {CLUSTER_KIND: self._repair_cluster, VLLM_KIND: self._repair_vllm}
        self.children = ChildRepairer(
            repair, self.metrics, min_interval_s=self.settings.repair_interval_s
        )
        self.clusters = ClusterController(
            self.client, self.views, self.metrics, self.children, self.settings
        )
        self.vllm = VLLMController(
            self.client, self.views, self.metrics, self.children, self.settings
        )
        self.gates = GateController(self.client, self.views, self.metrics, self.settings)
        self.injection = InjectionReporter(self.client, self.metrics)
        self.cluster_observer = ClusterObserver(self.views, self._cluster_moved)
        self.vllm_observer = VLLMObserver(
            self.views, self.vllm, self.gates, self.clusters.status.request
        )

    def _cluster_moved(self, key: tuple[str, str]) -> None:
        """A cluster's DaemonSet, pods or nodes changed: its status, and its rollout."""
        self.clusters.status.request(key)
        self.clusters.rollout.queue.request(key)

    def _repair_cluster(self, key: tuple[str, str]) -> None:
        self.clusters.repairs.request(key)

    def _repair_vllm(self, key: tuple[str, str]) -> None:
        self.vllm.repairs.request(key)

    def watch_loops(self) -> list[WatchLoop]:
        """Label-selected list+watch loops of everything but the two CRDs (kopf's)."""
        restarted = self.metrics.watch_restarts
        routers = self.vllm.router
        namespaces: list[str | None] = list(self.settings.namespaces) or [None]
        loops = []
        if not self.settings.namespaced:  # namespaced mode: Roles only, no Node access
            loops.append(
                WatchLoop(
                    self.client, "v1", "Node", self.cluster_observer.on_node,
                    on_restart=lambda kind: restarted.labels(kind=kind).inc(),
                )
            )  # fmt: skip
        watched: list[tuple[str, str, str, list[EventCallback]]] = [
            (
                "apps/v1", "DaemonSet", DAEMONSET_SELECTOR,
                [self.cluster_observer.on_daemonset, self.children.on_event],
            ),
            ("v1", "Pod", POD_SELECTOR, [self.cluster_observer.on_pod]),
            (
                "apps/v1", "Deployment", DEPLOYMENT_SELECTOR,
                [
                    self.vllm_observer.on_deployment, self.children.on_event,
                    self.clusters.credentials.on_consumer_deployment,
                ],
            ),
            ("v1", "Pod", VLLM_POD_SELECTOR, [self.vllm_observer.on_vllm_pod]),
            ("v1", "Pod", CACHE_POD_SELECTOR, [self.vllm_observer.on_cache_pod]),
            ("v1", "ConfigMap", CHILD_SELECTOR, [self.children.on_event]),
            (
                "v1", "Service", CHILD_SELECTOR,
                [self.children.on_event, routers.on_event_of("Service")],
            ),
            # a VLLMDeployment's router (spec.router): repairs, and removal when turned off
            # (its Service comes through the Service watch above)
            *[
                (api_version, kind, ROUTER_SELECTOR,
                 [self.children.on_event, routers.on_event_of(kind)])
                for api_version, kind in ROUTER_KINDS
                if kind != "Service"
            ],
            # pods labelled for the webhook: an Event on each it could not wire
            ("v1", "Pod", REPORTED_POD_SELECTOR, [self.injection.on_pod]),
        ]  # fmt: skip
        for namespace in namespaces:
            for api_version, kind, selector, callbacks in watched:
                loops.append(
                    WatchLoop(
                        self.client, api_version, kind, callbacks,
                        namespace=namespace, label_selector=selector,
                        on_restart=lambda kind: restarted.labels(kind=kind).inc(),
                    )
                )  # fmt: skip
        return loops

    def start_watches(self) -> None:
        """The watch loops, and the periodic credentials pass (Secrets cannot be watched:
        the operator may not read them; a POST answering 201 finds a deleted one)."""
        loop = asyncio.get_running_loop()
        for watch in self.watch_loops():
            self.watch_tasks.append(loop.create_task(watch.run(), name=repr(watch)))
        check = every(
            self.settings.secret_check_s, self.clusters.credentials.check_all, "credentials check"
        )
        self.watch_tasks.append(loop.create_task(check, name="credentials check"))
        config_check = every(
            self.settings.config_check_s, self.clusters.configs.check_all, "configFrom check"
        )
        self.watch_tasks.append(loop.create_task(config_check, name="configFrom check"))

    async def close(self) -> None:
        for task in self.watch_tasks:
            task.cancel()
        await asyncio.gather(*self.watch_tasks, return_exceptions=True)
        self.watch_tasks.clear()
        await self.clusters.rollout.close()
        for queue in (
            self.clusters.status, self.clusters.repairs, self.clusters.credentials.rotations,
            self.clusters.cleanup.queue,
            self.vllm.status,
            self.vllm.applies, self.vllm.repairs, self.gates.queue, self.injection.queue,
        ):  # fmt: skip
            await queue.close()
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.client.requests.items()))
        logger.info("API requests made by the controllers and watches: %s", counts or "none")
        await self.client.close()
