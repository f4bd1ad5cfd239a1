"""Who still runs a cluster's previous client key during a rotation.

VLLMDeployments using the cluster are watched (their Deployments): rolled means the pod
template carries the new key's fingerprint and the rollout is complete (observedGeneration
current, updated == replicas == available). Pods outside our CRD that mount the client
Secret themselves (vLLM from another chart) are found by listing the namespace's pods once
the VLLMDeployments are done: one created before the rotation still holds the old key.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from lmcache_operator.builders.credentials import CLIENT_KEY_ANNOTATION, client_secret_name
from lmcache_operator.builders.vllmdeployment import DEPLOYMENT_LABEL
from lmcache_operator.kube import KubeClient
from lmcache_operator.state import Key, Views


def rollout_problem(deployment: Mapping[str, Any] | None, client_key: str) -> str:
    """Why ``deployment`` has not rolled out ``client_key`` yet ('' when it has)."""
    if deployment is None:
        return "no Deployment yet"
    template = deployment.get("spec", {}).get("template", {}).get("metadata", {})
    if (template.get("annotations") or {}).get(CLIENT_KEY_ANNOTATION) != client_key:
        return "not re-applied yet"
    generation = int(deployment.get("metadata", {}).get("generation") or 0)
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < generation:
        return "rollout not started"
    wanted = int(deployment.get("spec", {}).get("replicas", 1))
    counts = [int(status.get(k) or 0) for k in ("updatedReplicas", "replicas", "availableReplicas")]
    if counts != [wanted] * 3:
        return f"{counts[0]} of {wanted} updated, {counts[2]} available"
    return ""


def mounts_secret(pod: Mapping[str, Any], secret: str) -> bool:
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        if (volume.get("secret") or {}).get("secretName") == secret:
            return True
        for source in (volume.get("projected") or {}).get("sources") or []:
            if (source.get("secret") or {}).get("name") == secret:
                return True
    return False


def created_at(pod: Mapping[str, Any]) -> float:
    text = str(pod.get("metadata", {}).get("creationTimestamp") or "")
    try:
        parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 0.0
    return parsed.replace(tzinfo=timezone.utc).timestamp()


def pods_on_old_key(
    pods: list[Mapping[str, Any]], secret: str, ours: set[str], started: float
) -> list[str]:
    """Live pods that mount ``secret``, are not our VLLMDeployments' and predate ``started``
    (same second included: they may have mounted the old key)."""
    names = []
    for pod in pods:
        meta = pod.get("metadata", {})
        if meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in (
            "Succeeded",
            "Failed",
        ):
            continue
        if (meta.get("labels") or {}).get(DEPLOYMENT_LABEL) in ours:
            continue
        if mounts_secret(pod, secret) and created_at(pod) <= int(started):
            names.append(f"pod {meta.get('name')}")
    return sorted(names)


async def unrolled_consumers(
    client: KubeClient, views: Views, key: Key, client_key: str, started: float
) -> list[str]:
    """What still runs the previous client key of cluster ``key`` (empty: nothing)."""
    namespace, cluster = key
    consumers = sorted(views.consumers(namespace, cluster))
    waiting = []
    for consumer in consumers:
        problem = rollout_problem(views.vllm[consumer].deployment, client_key)
        if problem:
            waiting.append(f"VLLMDeployment {consumer[1]} ({problem})")
    if waiting:
        return waiting
    listing = await client.list("v1", "Pod", namespace)
    ours = {name for _, name in consumers}
    return pods_on_old_key(listing.get("items") or [], client_secret_name(cluster), ours, started)
