"""LMCacheCluster: apply the children, compute and write the status.

Reconcile (create/update/resume, and repairs of drifted children): build the children, add
ownerReferences, server-side apply. Status: computed from the views (the cluster, its
DaemonSet, its pods, the nodes; cluster_events.py keeps them) and written when it changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from lmcache_operator.api.common import API_VERSION
from lmcache_operator.api.lmcachecluster import KIND, LMCacheClusterSpec
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.builders.common import owner_reference
from lmcache_operator.builders.connection import (
    build_connection_configmap,
    connection_configmap_name,
    pod_label,
)
from lmcache_operator.builders.credentials import ROTATE_ANNOTATION
from lmcache_operator.builders.lmcachecluster import (
    SERVICE_MONITOR_API,
    build_children,
    daemonset_name,
    effective_device,
    name_problems,
)
from lmcache_operator.controllers.children import ChildRepairer
from lmcache_operator.controllers.cleanup import PoolCleanup
from lmcache_operator.controllers.cluster_config import ClusterConfigs
from lmcache_operator.controllers.common import InvalidSpec, RetryLater, Settings
from lmcache_operator.controllers.credentials import CredentialController
from lmcache_operator.controllers.events import post_event
from lmcache_operator.controllers.pool_probe import HttpPoolProbe, PoolProbe
from lmcache_operator.controllers.pool_status import add_pool_fields, pools
from lmcache_operator.controllers.queue import WorkQueue
from lmcache_operator.controllers.rollout import RolloutController
from lmcache_operator.kube import FORBIDDEN_RETRY_S, KubeClient, KubeError, forbidden_message
from lmcache_operator.kube import transient as transient_error
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import Applied, ClusterView, Key, Views
from lmcache_operator.status import Observed, compute_status, now_rfc3339, same_status
from lmcache_operator.validation import validated_spec

logger = logging.getLogger(__name__)

SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
SERVICE_MONITOR_PLURAL = "servicemonitors"
API_CACHE_SECONDS = 60.0
DEFER_SAME_PHASE_S = 0.25
STATUS_SETTLE_S = 0.01  # events of one burst arrive together: one write


def validate(
    name: str, spec: Mapping[str, Any], policy: PodPolicy | None = None
) -> tuple[LMCacheClusterSpec | None, list[str]]:
    """The spec model, or the problems that make it invalid under the chart's guard rails
    ``policy`` (default: the chart's defaults); each names the field."""
    return validated_spec(
        LMCacheClusterSpec,
        spec,
        lambda model: name_problems(name) + model.semantic_problems(policy),
    )


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """What status and credentials need of the body (the rotation annotation, not the
    others); no deep copy: kopf replaces, never edits, raw bodies."""
    meta = body["metadata"]
    fields = ("name", "namespace", "uid", "generation", "deletionTimestamp", "finalizers")
    kept = {k: meta[k] for k in fields if k in meta}
    rotate = (meta.get("annotations") or {}).get(ROTATE_ANNOTATION)
    if rotate is not None:
        kept["annotations"] = {ROTATE_ANNOTATION: rotate}
    return {"metadata": kept, "spec": body.get("spec", {}), "status": body.get("status") or {}}


class ClusterController:
    """Reconciles LMCacheClusters; its dependencies come in, nothing is module-global."""

    kind = KIND

    def __init__(
        self,
        client: KubeClient,
        views: Views,
        metrics: OperatorMetrics,
        children: ChildRepairer,
        settings: Settings | None = None,
        *,
        probe: PoolProbe | None = None,
    ) -> None:
        self.client = client
        self.views = views
        self.metrics = metrics
        self.children = children
        self.settings = Settings() if settings is None else settings
        self.api_seen: dict[str, tuple[bool, float]] = {}
        self.status = WorkQueue(
            "cluster-status",
            self.refresh_status,
            settle_s=STATUS_SETTLE_S,
            depth=metrics.queue_depth,
        )
        self.repairs = WorkQueue("cluster-repair", self.repair, depth=metrics.queue_depth)
        self.credentials = CredentialController(
            client, views, metrics, self.settings, self.repairs.request
        )
        self.rollout = RolloutController(
            client, views, metrics, self.status.request,
            probe=probe if probe is not None else HttpPoolProbe(),
            probe_budget_s=self.settings.pool_probe_timeout_s,
        )  # fmt: skip
        self.cleanup = PoolCleanup(client, views, metrics, self.settings)
        self.configs = ClusterConfigs(client, self.repairs.request)

    async def api_serves(self, api_version: str, plural: str) -> bool:
        """Whether the API server serves ``plural`` in ``api_version`` (discovery: needs no
        RBAC, so it works in namespaced mode, where the operator may not read CRDs)."""
        cache_key = f"{api_version}/{plural}"
        cached = self.api_seen.get(cache_key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            listing = await self.client.request("GET", f"/apis/{api_version}")
        except KubeError as exc:
            if exc.status != 404:
                raise
            listing = None
        served = any(r.get("name") == plural for r in (listing or {}).get("resources") or [])
        self.api_seen[cache_key] = (served, time.monotonic() + API_CACHE_SECONDS)
        return served

    async def _monitoring(
        self, name: str, namespace: str, wanted: bool
    ) -> tuple[bool, dict[str, str] | None]:
        """(create the ServiceMonitor?, condition to report)."""
        exists = await self.api_serves(SERVICE_MONITOR_API, SERVICE_MONITOR_PLURAL)
        if not wanted:
            if exists:  # switched off: remove one left from before
                await self.client.delete(
                    SERVICE_MONITOR_API, "ServiceMonitor", namespace, daemonset_name(name)
                )
            return False, None
        if not exists:
            return False, {
                "type": "ServiceMonitorReady",
                "status": "False",
                "reason": "CRDNotInstalled",
                "message": f"CRD {SERVICE_MONITOR_CRD} is not installed (the API server does not "
                f"serve {SERVICE_MONITOR_API}): install the Prometheus Operator or set "
                "monitoring.serviceMonitor: false",
            }
        return True, {
            "type": "ServiceMonitorReady",
            "status": "True",
            "reason": "Created",
            "message": "ServiceMonitor applied",
        }

    def _record(self, key: Key, applied: Applied) -> None:
        self.views.cluster(key).applied = applied
        self.status.request(key)

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        """Apply the children of this generation; InvalidSpec or RetryLater when not done."""
        started = time.perf_counter()
        result = "success"
        try:
            await self._reconcile(body)
        except InvalidSpec:
            result = "invalid"
            raise
        except RetryLater as exc:
            result = "forbidden" if exc.reason == "Forbidden" else "retry"
            raise
        except Exception:
            result = "error"
            raise
        finally:
            self.metrics.reconciles.labels(kind=KIND, result=result).inc()
            self.metrics.reconcile_seconds.labels(kind=KIND).observe(time.perf_counter() - started)

    async def _reconcile(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        name, namespace = str(meta["name"]), str(meta.get("namespace") or "default")
        key: Key = (namespace, name)
        generation = int(meta.get("generation", 0))
        view = self.views.cluster(key)
        if view.body is None:
            view.body = snapshot(body)
        model, problems = validate(name, body.get("spec") or {}, self.settings.policy)
        if model is None:
            self._record(
                key, Applied(generation=generation, daemonset_generation=0, problems=problems)
            )
            raise InvalidSpec("; ".join(problems))
        try:
            user = await self.configs.resolve(key, model)  # spec.config over spec.configFrom
            if user.problems:
                self._record(
                    key,
                    Applied(generation=generation, daemonset_generation=0, problems=user.problems),
                )
                raise InvalidSpec("; ".join(user.problems))
            with_monitor, monitor_condition = await self._monitoring(
                name, namespace, model.monitoring.service_monitor
            )
            owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(meta)}
            keys = await self.credentials.ensure(key, owner)
            children = build_children(
                name,
                namespace,
                model,
                service_monitor=with_monitor,
                policy=self.settings.policy,
                images=self.settings.images,
                keys=keys.public_keys(),
                user_config=user.values,
            )
            children.append(
                build_connection_configmap(name, namespace, model, self.settings.images)
            )
            for child in children:
                child["metadata"]["ownerReferences"] = [owner_reference(owner)]
            results = await asyncio.gather(*(self.client.apply(child) for child in children))
            await self.cleanup.ensure_finalizer(key, model.cache.persistent, meta)
        except KubeError as exc:
            forbidden = forbidden_message(exc)
            if forbidden is not None:  # the operator's RBAC, not the spec: retry, never give up
                previous = view.applied
                self._record(
                    key,
                    replace(previous, forbidden=forbidden)
                    if previous is not None and not previous.problems
                    else Applied(
                        generation=generation, daemonset_generation=0, forbidden=forbidden
                    ),
                )
                raise RetryLater(forbidden, delay=FORBIDDEN_RETRY_S, reason="Forbidden") from exc
            if transient_error(exc):
                raise RetryLater(str(exc), delay=2) from exc
            problems = [f"the API server refused a generated object: {exc}"]
            self._record(
                key, Applied(generation=generation, daemonset_generation=0, problems=problems)
            )
            raise InvalidSpec(problems[0]) from exc
        except Exception as exc:
            if transient_error(exc):
                raise RetryLater(f"API server unreachable: {exc}", delay=2) from exc
            raise
        self.children.record(KIND, key, children, results)
        ds_generation = next(
            int(r["metadata"].get("generation", 0)) for r in results if r["kind"] == "DaemonSet"
        )
        self._record(
            key,
            Applied(
                generation=generation,
                daemonset_generation=ds_generation,
                monitoring_condition=monitor_condition,
            ),
        )
        message = self.configs.warnings_message(key, model, user.warnings)
        if message:
            await self._post(meta, "ConfigWarnings", message)

    async def _post(self, meta: Mapping[str, Any], reason: str, message: str) -> None:
        involved = {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta}
        try:
            await post_event(
                self.client, involved, reason=reason, message=message, now=now_rfc3339()
            )
        except KubeError as exc:
            logger.warning(
                "cannot post %s on %s/%s: %s", reason, meta.get("namespace"), meta["name"], exc
            )

    async def repair(self, key: Key) -> None:
        """Re-apply after a child was deleted or changed by someone else."""
        body = await self.client.get(API_VERSION, KIND, *key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # the owner is going: garbage collection removes the rest
        try:
            await self.reconcile(body)
        except (InvalidSpec, RetryLater) as exc:
            logger.warning("repair of %s/%s: %s", key[0], key[1], exc)

    def on_event(self, event: str, body: Mapping[str, Any]) -> None:
        """A watch event of an LMCacheCluster (through kopf)."""
        key: Key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event == "DELETED":
            self.views.clusters.pop(key, None)
            self.status.forget(key)
            self.children.forget_owner(KIND, key)
            self.credentials.forget(key)
            self.rollout.forget(key)
            self.configs.forget(key)
            return
        if body["metadata"].get("deletionTimestamp"):
            self.cleanup.on_deleting(key, body)
        self.views.cluster(key).body = snapshot(body)
        self.credentials.on_cluster_event(key)
        self.status.request(key)

    def _defer(self, key: Key, view: ClusterView, status: Mapping[str, Any]) -> bool:
        """Hold back a write that keeps the phase, so a burst of pod events costs one write.

        Phase changes (Ready, Degraded, ...) are written at once; counts and endpoints that
        move within one phase are written at most every DEFER_SAME_PHASE_S.
        """
        before = view.recorded_status()
        same_phase = before.get("phase") == status["phase"] and before.get(
            "observedGeneration"
        ) == status.get("observedGeneration")
        if not same_phase:
            view.defer_until = None
            return False
        loop = asyncio.get_running_loop()
        if view.defer_until is None:
            view.defer_until = loop.time() + DEFER_SAME_PHASE_S
            self.status.request_later(DEFER_SAME_PHASE_S, key)
            return True
        if loop.time() < view.defer_until:
            return True
        view.defer_until = None
        return False

    async def refresh_status(self, key: Key) -> None:
        """Compute the status from the views and write it when it changed."""
        view = self.views.clusters.get(key)
        if view is None or view.body is None or view.applied is None:
            return  # not reconciled by this process yet: keep the status as it is
        body, applied = view.body, view.applied
        spec = body.get("spec", {})
        model = self._spec(spec)
        nodes_with_pool, memory = pools(self.views, key, view, model)
        on_object = body.get("status") or {}
        # judged against a late event's stale Progressing, a node lost after Ready would read
        # as Progressing instead of Degraded (and the phase would flip with each late event)
        recorded = view.recorded_status()
        observed = Observed(
            generation=int(body["metadata"].get("generation", 0)),
            applied_generation=applied.generation,
            min_daemonset_generation=applied.daemonset_generation,
            problems=applied.problems,
            port=int(spec.get("server", {}).get("port", 5555)),
            node_selector=spec.get("placement", {}).get("nodeSelector", {}),
            daemonset=view.daemonset,
            pods=list(view.pods.values()),
            previous=recorded,
            monitoring_condition=applied.monitoring_condition,
            node_problems=self.views.node_problems,
            forbidden=applied.forbidden,
            device=effective_device(model) if model is not None else "",
            memory_problems=memory,
        )
        status = compute_status(observed)
        add_pool_fields(status, view, self.rollout, key, nodes_with_pool)
        status["consumers"] = sorted(k[1] for k in self.views.consumers(*key))
        credentials = self.credentials.known(key)
        if credentials is not None:
            status["credentials"] = credentials.to_status(key[1])
        if not applied.problems:  # the connection ConfigMap exists once a spec was applied
            status["connection"] = {
                "configMap": connection_configmap_name(key[1]),
                "podLabel": pod_label(key[1]),
            }
        if same_status(status, recorded):
            return
        if self._defer(key, view, status):
            return
        try:
            await self.client.patch_status(
                API_VERSION, KIND, key[0], key[1],
                removals(removals(status, on_object), view.last_written or {}),
            )  # fmt: skip
        except KubeError as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            raise
        view.last_written = status
        logger.debug("status of %s/%s: %s", key[0], key[1], status["phase"])

    @staticmethod
    def _spec(spec: Mapping[str, Any]) -> LMCacheClusterSpec | None:
        try:
            return LMCacheClusterSpec.model_validate(dict(spec))
        except ValidationError:
            return None


def removals(
    status: Mapping[str, Any], previous: Mapping[str, Any], *, top: bool = True
) -> dict[str, Any]:
    """``status`` as a merge patch over ``previous``: a key of a nested object it no longer
    has is set to None, so the patch removes it (e.g. credentials.rotation after new keys)."""
    patch = dict(status)
    for name, before in previous.items():
        now = patch.get(name)
        if isinstance(before, Mapping) and isinstance(now, Mapping):
            patch[name] = removals(now, before, top=False)
        elif name not in patch and not top:
            patch[name] = None
    return patch
