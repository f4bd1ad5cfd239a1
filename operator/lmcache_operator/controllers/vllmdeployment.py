"""VLLMDeployment: apply the Service and Deployment, compute and write the status.

Reconcile (create/update/resume, when the referenced LMCacheCluster appears or changes, and
repairs of drifted children): resolve the cluster's connection settings, build the Service
and Deployment, server-side apply. Status is computed from the views vllm_events.py keeps.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from lmcache_operator.api.common import API_VERSION, FIELD_MANAGER
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.api.vllmdeployment import KIND, VLLMDeploymentSpec
from lmcache_operator.builders import router
from lmcache_operator.builders.common import owner_reference
from lmcache_operator.builders.credentials import public_keys_from_status
from lmcache_operator.builders.lmcachecluster import name_problems as cluster_name_problems
from lmcache_operator.builders.vllm_connector import CacheConnection, compatibility_problems
from lmcache_operator.builders.vllm_status import VLLMObserved, compute_status
from lmcache_operator.builders.vllmdeployment import (
    build_children,
    name_problems,
    selector_string,
    service_url,
)
from lmcache_operator.controllers.children import ChildRepairer
from lmcache_operator.controllers.common import InvalidSpec, RetryLater, Settings
from lmcache_operator.controllers.queue import WorkQueue
from lmcache_operator.controllers.router import RouterChildren
from lmcache_operator.kube import FORBIDDEN_RETRY_S, KubeClient, KubeError, forbidden_message
from lmcache_operator.kube import transient as transient_error
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import CacheView, Key, Views, VLLMApplied, VLLMView, cluster_ref
from lmcache_operator.validation import validated_spec

logger = logging.getLogger(__name__)


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({k: body[k] for k in ("metadata", "spec", "status") if k in body})


def validate(
    name: str, spec: Mapping[str, Any], policy: PodPolicy | None = None
) -> tuple[VLLMDeploymentSpec | None, list[str]]:
    """The spec model, or the problems that make it invalid under the chart's guard rails
    ``policy`` (default: the chart's defaults); each names the field."""

    def problems(model: VLLMDeploymentSpec) -> list[str]:
        found = name_problems(name) + model.semantic_problems(policy)
        return found + (router.name_problems(name) if model.router.enabled else [])

    return validated_spec(VLLMDeploymentSpec, spec, problems)


def connection(
    view: CacheView | None, key: Key, settings: Settings | None = None
) -> tuple[CacheConnection | None, str]:
    """The connection settings of LMCacheCluster ``key`` (namespace, name), or why there are
    none ('' when it does not exist); its spec is held to the same guard rails."""
    settings = Settings() if settings is None else settings
    namespace, cluster = key
    if view is None or view.body is None:
        return None, ""
    spec, problems = validated_spec(
        LMCacheClusterSpec,
        view.body.get("spec") or {},
        lambda model: cluster_name_problems(cluster) + model.semantic_problems(settings.policy),
    )
    if spec is None:
        return None, f"LMCacheCluster {cluster!r} has an invalid spec: {'; '.join(problems)}"
    conn = CacheConnection.from_cluster(
        cluster, spec, namespace=namespace, images=settings.images, keys=view.keys
    )
    return conn, ""


def replicas_scaled_by_others(deployment: Mapping[str, Any] | None) -> bool:
    """Another manager (an HPA, kubectl scale) set spec.replicas through the scale subresource."""
    for entry in (deployment or {}).get("metadata", {}).get("managedFields") or []:
        fields = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        scaled = entry.get("subresource") == "scale" and "f:replicas" in fields
        if scaled and entry.get("manager") != FIELD_MANAGER:
            return True
    return False


class VLLMController:
    """Reconciles VLLMDeployments; dependencies come in, nothing is module-global."""

    kind = KIND

    def __init__(
        self,
        client: KubeClient,
        views: Views,
        metrics: OperatorMetrics,
        children: ChildRepairer,
        settings: Settings | None = None,
    ) -> None:
        self.client = client
        self.views = views
        self.metrics = metrics
        self.children = children
        self.settings = Settings() if settings is None else settings
        depth = metrics.queue_depth
        self.status = WorkQueue("vllm-status", self.refresh_status, depth=depth)
        self.applies = WorkQueue("vllm-apply", self.apply_in_background, depth=depth)
        self.repairs = WorkQueue("vllm-repair", self.repair, depth=depth)
        self.router = RouterChildren(client, children.forget_child)

    def _record(self, key: Key, applied: VLLMApplied) -> None:
        self.views.vllm.setdefault(key, VLLMView()).applied = applied
        self.status.request(key)

    async def reconcile(self, body: Mapping[str, Any], *, repair: bool = False) -> None:
        """Apply the children; InvalidSpec or RetryLater when not done."""
        meta = body["metadata"]
        key: Key = (str(meta.get("namespace") or "default"), str(meta["name"]))
        self.views.vllm.setdefault(key, VLLMView()).body = snapshot(body)
        started, result = time.perf_counter(), "success"
        try:
            await self.apply_children(key, repair=repair)
        except InvalidSpec:
            result = "invalid"
            raise
        except KubeError as exc:
            forbidden = forbidden_message(exc)
            if forbidden is not None:  # the operator's RBAC, not the spec: retry, never give up
                result = "forbidden"
                view = self.views.vllm.setdefault(key, VLLMView())
                previous = view.applied
                self._record(
                    key,
                    replace(previous, forbidden=forbidden)
                    if previous is not None and not previous.problems
                    else VLLMApplied(generation=None, forbidden=forbidden),
                )
                raise RetryLater(forbidden, delay=FORBIDDEN_RETRY_S, reason="Forbidden") from exc
            if transient_error(exc):
                result = "retry"
                raise RetryLater(str(exc), delay=2) from exc
            result = "invalid"
            message = f"the API server refused a generated object: {exc}"
            generation = int(meta.get("generation", 0))
            self._record(key, VLLMApplied(generation=generation, problems=[message]))
            raise InvalidSpec(message) from exc
        except Exception as exc:
            result = "retry" if transient_error(exc) else "error"
            if transient_error(exc):
                raise RetryLater(f"API server unreachable: {exc}", delay=2) from exc
            raise
        finally:
            self.metrics.reconciles.labels(kind=KIND, result=result).inc()
            self.metrics.reconcile_seconds.labels(kind=KIND).observe(time.perf_counter() - started)

    async def _load_cluster(self, namespace: str, cluster: str) -> None:
        """Fill the cluster view from the API server when its watch event has not arrived."""
        view = self.views.caches.setdefault((namespace, cluster), CacheView())
        if view.body is not None:
            return
        body = await self.client.get(API_VERSION, "LMCacheCluster", namespace, cluster)
        if body is not None and view.body is None:
            view.body = snapshot(body)
            view.generation = int(body["metadata"].get("generation", 0))
            view.keys = public_keys_from_status(body.get("status"))

    async def apply_children(self, key: Key, *, repair: bool = False) -> None:
        """Build and apply the Service and Deployment from the current spec and cluster."""
        view = self.views.vllm.get(key)
        if view is None or view.body is None:
            return
        namespace, name = key
        meta = view.body["metadata"]
        generation = int(meta.get("generation", 0))
        model, problems = validate(name, view.body.get("spec") or {}, self.settings.policy)
        if model is None:
            self._record(key, VLLMApplied(generation=generation, problems=problems))
            raise InvalidSpec("; ".join(problems))
        conn: CacheConnection | None = None
        if model.cache.enabled and model.cache.cluster_ref is not None:
            cluster = model.cache.cluster_ref.name
            await self._load_cluster(namespace, cluster)
            conn, _ = connection(
                self.views.caches.get((namespace, cluster)), (namespace, cluster), self.settings
            )
            if conn is None:  # missing or invalid: keep what runs, follow replicas only
                if view.deployment is not None:
                    try:
                        await self.client.merge_patch(
                            "apps/v1", "Deployment", namespace, name,
                            {"spec": {"replicas": model.replicas}},
                        )  # fmt: skip
                    except KubeError as exc:
                        if exc.status != 404:  # gone meanwhile: nothing to scale
                            raise
                if view.applied is None or view.applied.problems:
                    view.applied = VLLMApplied(generation=None)  # status says why
                self.status.request(key)
                return
        children = build_children(name, namespace, model, conn, self.settings.policy)
        owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(meta)}
        for child in children:
            child["metadata"]["ownerReferences"] = [owner_reference(owner)]
            if (
                repair
                and child["kind"] == "Deployment"
                and replicas_scaled_by_others(view.deployment)
            ):
                del child["spec"]["replicas"]  # leave the scaler's replicas alone
        results = [await self.client.apply(child) for child in children]
        deployment_generation = int(results[-1]["metadata"].get("generation", 0))
        was_enabled = bool((view.body.get("status") or {}).get("routerUrl"))
        router_children, router_results = await self.router.reconcile(
            key, model, conn, owner, was_enabled=was_enabled
        )
        self.children.record(KIND, key, [*children, *router_children], [*results, *router_results])
        self._record(
            key, VLLMApplied(generation=generation, deployment_generation=deployment_generation)
        )

    async def apply_in_background(self, key: Key) -> None:
        """Re-apply after the LMCacheCluster changed (outside kopf's handler retries)."""
        body = (self.views.vllm.get(key) or VLLMView()).body
        if body is None:
            return
        await self._reapply(key, body, repair=False)

    async def repair(self, key: Key) -> None:
        """Re-apply after a child was deleted or changed by someone else."""
        body = await self.client.get(API_VERSION, KIND, *key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # the owner is going: garbage collection removes the rest
        await self._reapply(key, body, repair=True)

    async def _reapply(self, key: Key, body: Mapping[str, Any], *, repair: bool) -> None:
        try:
            await self.reconcile(body, repair=repair)
        except InvalidSpec as exc:
            logger.warning("%s/%s: %s", key[0], key[1], exc)
        except RetryLater as exc:
            logger.warning("%s/%s: %s; again in %.0f s", key[0], key[1], exc, exc.delay)
            self.applies.request_later(exc.delay, key)

    def observe(self, key: Key, view: VLLMView) -> VLLMObserved | None:
        body = view.body
        if body is None or view.applied is None:
            return None  # not reconciled by this process yet: keep the status as it is
        namespace, name = key
        spec = body.get("spec") or {}
        model, _ = validate(name, spec, self.settings.policy)
        cluster = cluster_ref(body)
        cache_view = self.views.caches.get((namespace, cluster)) if cluster else None
        conn, cluster_problem = (
            connection(cache_view, (namespace, cluster), self.settings) if cluster else (None, "")
        )
        compat = compatibility_problems(model, conn) if model is not None and conn else []
        applied = view.applied
        return VLLMObserved(
            generation=int(body["metadata"].get("generation", 0)),
            desired_replicas=int(spec.get("replicas", 1)),
            applied_generation=applied.generation if not applied.problems else None,
            min_deployment_generation=applied.deployment_generation,
            problems=applied.problems,
            cache_enabled=cluster is not None,
            cluster_ref=cluster or "",
            cluster_found=cache_view is not None and cache_view.body is not None,
            cluster_problem=cluster_problem,
            compat_problems=compat,
            ready_cache_nodes=cache_view.ready_nodes if cache_view else frozenset(),
            deployment=view.deployment,
            pods=list(view.pods.values()),
            previous=view.recorded_status(),
            url=service_url(name, namespace, model) if model is not None else "",
            router_url=(
                router.router_url(name, namespace, model)
                if model is not None and model.router.enabled
                else ""
            ),
            selector=selector_string(name),
            forbidden=applied.forbidden,
        )

    async def refresh_status(self, key: Key) -> None:
        view = self.views.vllm.get(key)
        observed = self.observe(key, view) if view is not None else None
        if view is None or observed is None:
            return
        status = compute_status(observed)
        if same_status(status, observed.previous):
            return
        if status["cache"].get("compatible") is None:
            status["cache"]["compatible"] = None  # merge patch: remove a stale value
        try:
            await self.client.patch_status(API_VERSION, KIND, key[0], key[1], status)
        except KubeError as exc:
            if exc.status == 404:
                return
            raise
        view.last_written = status


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def same_status(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def strip(status: Mapping[str, Any]) -> Any:
        out = dict(_without_none(dict(status)))
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in out.get("conditions") or []
        ]
        return out

    return bool(strip(a) == strip(b))
