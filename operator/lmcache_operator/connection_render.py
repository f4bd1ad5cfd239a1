"""`lmcache-operator connection`: an LMCacheCluster's connection contract, offline.

The same ConfigMap the operator keeps (``-o yaml`` / ``-o json``), or one part of it: the
pod template patch (``-o patch``) or production-stack values (``-o helm-values``). No cluster
is needed: everything comes from the LMCacheCluster file and the chart's image defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import yaml

from lmcache_operator.api.common import API_VERSION
from lmcache_operator.api.lmcachecluster import KIND, LMCacheClusterSpec
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.builders.connection import (
    Connection,
    build_connection_configmap,
    dump_yaml,
    pod_template_patch,
    production_stack_values,
)
from lmcache_operator.builders.lmcachecluster import name_problems
from lmcache_operator.builders.node_image import DEFAULTS, NodeImageDefaults
from lmcache_operator.validation import RenderError, validated_document

OUTPUTS = ("yaml", "json", "patch", "helm-values")


def clusters(
    documents: Iterable[Any], policy: PodPolicy, namespace: str | None
) -> list[tuple[str, str, LMCacheClusterSpec]]:
    """(name, namespace, spec) of each LMCacheCluster in ``documents`` (others are skipped)."""
    found = []
    for index, doc in enumerate(documents, start=1):
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        if doc.get("apiVersion") != API_VERSION:
            raise RenderError(
                f"document {index}: apiVersion {doc.get('apiVersion')!r} is not {API_VERSION}"
            )
        meta = doc.get("metadata") or {}
        if namespace is not None and not meta.get("namespace"):
            meta = {**meta, "namespace": namespace}
        found.append(
            validated_document(
                index,
                {**doc, "metadata": meta},
                KIND,
                LMCacheClusterSpec,
                lambda name, spec: name_problems(name) + spec.semantic_problems(policy),
            )
        )
    if not found:
        raise RenderError(f"no {KIND} ({API_VERSION}) in the file")
    return found


def render_connection(
    text: str,
    output: str = "yaml",
    *,
    namespace: str | None = None,
    container: str = "vllm",
    install_connector: bool = True,
    policy: PodPolicy | None = None,
    images: NodeImageDefaults = DEFAULTS,
) -> str:
    """The contract of each LMCacheCluster in ``text`` in the ``output`` form."""
    if output not in OUTPUTS:
        raise RenderError(f"output {output!r}: use one of {', '.join(OUTPUTS)}")
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise RenderError(f"not valid YAML: {exc}") from None
    found = clusters(documents, PodPolicy() if policy is None else policy, namespace)
    if output in ("yaml", "json"):
        maps = [build_connection_configmap(n, ns, spec, images) for n, ns, spec in found]
        if output == "yaml":
            return dump_yaml(*maps)
        body = maps[0] if len(maps) == 1 else {"apiVersion": "v1", "kind": "List", "items": maps}
        return json.dumps(body, indent=2) + "\n"
    if len(found) != 1:
        names = ", ".join(n for n, _, _ in found)
        raise RenderError(f"-o {output} takes one {KIND}; the file has {len(found)} ({names})")
    name, ns, spec = found[0]
    conn = Connection.from_cluster(name, ns, spec, images)
    if output == "patch":
        patch = pod_template_patch(conn, container=container, install=install_connector)
        return dump_yaml(patch)
    return production_stack_values(conn, install=install_connector)
