"""Pod fields typed with the real core/v1 schemas in the CRDs (api/k8s_core_v1.json).

In Python such a field stays a plain dict (the operator passes it through); in the CRD it is
the upstream schema (inlined, without descriptions), so the API server rejects a misspelt
field such as ``tolerations: [{keys: ...}]`` instead of storing and ignoring it. The JSON
file is generated from the pinned Kubernetes by ``scripts/k8s_openapi.py``.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from typing import Any

from pydantic import Field

from lmcache_operator.api.policy import HOST_PATH_MAX_LENGTH, SHAPE_RULE

K8S_TYPE_KEY = "x-lmcache-k8s-type"
"""Marks a field in the pydantic JSON schema; crdgen replaces it with the core/v1 schema."""


@cache
def _document() -> dict[str, Any]:
    text = resources.files("lmcache_operator.api").joinpath("k8s_core_v1.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def kubernetes_version() -> str:
    """The Kubernetes version the core/v1 schemas were taken from."""
    return str(_document()["kubernetesVersion"])


def k8s_schema(name: str) -> dict[str, Any]:
    """The structural schema of core/v1 ``name`` as our CRDs use it.

    Stricter than upstream in one place: a hostPath's path is at most 1024 characters and
    normalised (no '..', '//', trailing '/'), checked by CEL.
    """
    definitions = _document()["definitions"]
    if name not in definitions:
        raise KeyError(f"core/v1 {name} is not in k8s_core_v1.json: add it to k8s_openapi.TYPES")
    schema: dict[str, Any] = copy.deepcopy(definitions[name])
    host_path = (schema.get("properties") or {}).get("hostPath")
    if host_path is not None:
        path = host_path["properties"]["path"]
        path["maxLength"] = HOST_PATH_MAX_LENGTH
        path["x-kubernetes-validations"] = [dict(SHAPE_RULE)]
    return schema


def k8s_list(type_name: str, description: str, max_items: int) -> Any:
    """A ``list[dict[str, Any]]`` field typed as a list of core/v1 ``type_name``."""
    return Field(
        default_factory=list,
        max_length=max_items,
        description=description,
        json_schema_extra={K8S_TYPE_KEY: type_name},
    )


def k8s_object(type_name: str, description: str, **kwargs: Any) -> Any:
    """A ``dict[str, Any] | None`` field typed as core/v1 ``type_name``."""
    kwargs.setdefault("default", None)
    return Field(description=description, json_schema_extra={K8S_TYPE_KEY: type_name}, **kwargs)
