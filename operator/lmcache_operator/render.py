"""`lmcache-operator render`: the objects the operator would create, without a cluster."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from lmcache_operator.api.common import API_VERSION
from lmcache_operator.api.lmcachecluster import KIND, LMCacheClusterSpec
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.builders.lmcachecluster import build_children, name_problems
from lmcache_operator.builders.node_image import DEFAULTS, NodeImageDefaults
from lmcache_operator.builders.vllm_render import render_vllm_documents
from lmcache_operator.validation import RenderError, validated_document

__all__ = ["RenderError", "render_documents", "render_text"]


def render_documents(
    documents: Iterable[Any],
    *,
    service_monitor: bool = True,
    policy: PodPolicy | None = None,
    images: NodeImageDefaults = DEFAULTS,
) -> list[Any]:
    """The objects the operator would create for ``documents``, under the chart's guard
    rails ``policy`` (default: the chart's defaults) and node image defaults ``images``."""
    policy = PodPolicy() if policy is None else policy
    objects: list[Any] = []
    documents = list(documents)
    vllm_docs: list[tuple[int, dict[str, Any]]] = []
    for index, doc in enumerate(documents, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise RenderError(f"document {index}: expected a mapping, got {type(doc).__name__}")
        kind, api_version = doc.get("kind"), doc.get("apiVersion")
        if kind == "VLLMDeployment" and api_version == API_VERSION:
            vllm_docs.append((index, doc))
            continue
        if kind != KIND or api_version != API_VERSION:
            raise RenderError(
                f"document {index}: kind {kind!r} apiVersion {api_version!r} is not supported; "
                f"expected kind {KIND} or VLLMDeployment, apiVersion {API_VERSION}"
            )
        name, namespace, spec = validated_document(
            index,
            doc,
            KIND,
            LMCacheClusterSpec,
            lambda name, spec: name_problems(name) + spec.semantic_problems(policy),
        )
        objects += build_children(
            name, namespace, spec, service_monitor=service_monitor, policy=policy, images=images
        )
    objects += render_vllm_documents(vllm_docs, documents, policy, images)
    return objects


def render_text(
    text: str, policy: PodPolicy | None = None, images: NodeImageDefaults = DEFAULTS
) -> str:
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise RenderError(f"not valid YAML: {exc}") from None
    rendered = render_documents(documents, policy=policy, images=images)
    return yaml.safe_dump_all(rendered, sort_keys=False)
