"""`lmcache-operator render` for VLLMDeployments: the referenced LMCacheCluster comes from the
same file (the render has no cluster to read it from)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from lmcache_operator.api.common import API_VERSION
from lmcache_operator.api.lmcachecluster import KIND as CLUSTER_KIND
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.api.vllmdeployment import KIND, VLLMDeploymentSpec
from lmcache_operator.builders import node_image
from lmcache_operator.builders.node_image import NodeImageDefaults
from lmcache_operator.builders.vllm_connector import CacheConnection
from lmcache_operator.builders.vllmdeployment import build_children, name_problems
from lmcache_operator.validation import RenderError, validated_document


def _clusters(documents: Sequence[Any]) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for doc in documents:
        if isinstance(doc, dict) and doc.get("kind") == CLUSTER_KIND:
            meta = doc.get("metadata") or {}
            key = (meta.get("namespace", "default"), str(meta.get("name")))
            found[key] = doc.get("spec") or {}
    return found


def render_vllm_documents(
    indexed: Sequence[tuple[int, dict[str, Any]]],
    documents: Sequence[Any],
    policy: PodPolicy | None = None,
    images: NodeImageDefaults = node_image.DEFAULTS,
) -> list[dict[str, Any]]:
    """The children of each VLLMDeployment; ``documents`` supplies the LMCacheClusters."""
    policy = PodPolicy() if policy is None else policy
    clusters = _clusters(documents)
    objects: list[dict[str, Any]] = []
    for index, doc in indexed:
        name, namespace, spec = validated_document(
            index,
            doc,
            KIND,
            VLLMDeploymentSpec,
            lambda name, spec: name_problems(name) + spec.semantic_problems(policy),
        )
        label = f"{KIND} {name!r}"
        conn = None
        if spec.cache.enabled and spec.cache.cluster_ref is not None:
            ref = spec.cache.cluster_ref.name
            cluster = clusters.get((namespace, ref))
            if cluster is None:
                raise RenderError(
                    f"{label}: cache.clusterRef {ref!r} names no {CLUSTER_KIND} ({API_VERSION}) "
                    f"in namespace {namespace!r} of this file: add it to the file (the render "
                    "reads the connection settings from it)"
                )
            try:
                conn = CacheConnection.from_cluster(
                    ref,
                    LMCacheClusterSpec.model_validate(cluster),
                    namespace=namespace,
                    images=images,
                )
            except ValidationError:
                raise RenderError(f"{label}: {CLUSTER_KIND} {ref!r} is invalid") from None
        objects += build_children(name, namespace, spec, conn, policy)
    return objects
