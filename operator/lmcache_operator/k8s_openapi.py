"""The core/v1 types our CRDs pass through, cut from the Kubernetes OpenAPI v3 document.

``extract(openapi, version)`` turns ``GET /openapi/v3/api/v1`` of a pinned Kubernetes into the
committed, reviewable ``api/k8s_core_v1.json`` (``scripts/k8s_openapi.py`` writes it; a
cluster test checks it against the local API server). A CRD schema cannot hold references,
so every ``$ref`` is inlined, and the result follows the structural-schema rules:

- descriptions dropped (they would make the CRDs several times larger; ``kubectl explain``
  on the core types documents them);
- ``enum`` and ``default`` dropped: Kubernetes validates those values in code when the
  operator applies the pod, so enums would only refuse values Kubernetes accepts (``""``),
  and object defaults ({} with required fields) are not valid CRD defaults; a default on a
  list-map key is kept (the list type needs it);
- int-or-string and quantities become ``x-kubernetes-int-or-string``;
- extensions a CRD cannot carry (patch strategy, unions, group-version-kind) dropped;
- ObjectMeta (only in an ephemeral volume's claim template) cut to labels and annotations,
  the only fields Kubernetes accepts there.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

CORE = "io.k8s.api.core.v1."
TYPES: dict[str, str] = {
    "Affinity": CORE + "Affinity",
    "EnvFromSource": CORE + "EnvFromSource",
    "EnvVar": CORE + "EnvVar",
    "PodSecurityContext": CORE + "PodSecurityContext",
    "SecurityContext": CORE + "SecurityContext",
    "Toleration": CORE + "Toleration",
    "TopologySpreadConstraint": CORE + "TopologySpreadConstraint",
    "Volume": CORE + "Volume",
    "VolumeMount": CORE + "VolumeMount",
}
"""Our name -> the upstream definition. VolumeSource (a Volume without its name) is derived."""

INT_OR_STRING = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString",
    "io.k8s.apimachinery.pkg.api.resource.Quantity",
}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_KEEP_EXTENSIONS = {
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
}
_DROP = {"description", "enum", "default", "example", "externalDocs", "title"}


class SchemaError(ValueError):
    """The OpenAPI document has something a structural schema cannot express."""


def _ref_name(schema: Mapping[str, Any]) -> str | None:
    ref = schema.get("$ref")
    if ref is None and len(schema.get("allOf") or []) == 1:
        ref = schema["allOf"][0].get("$ref")
    return str(ref).rsplit("/", 1)[-1] if ref else None


def _inline(schema: Mapping[str, Any], defs: Mapping[str, Any], stack: tuple[str, ...]) -> Any:
    name = _ref_name(schema)
    if name is not None:
        if name in INT_OR_STRING:
            return {"x-kubernetes-int-or-string": True}
        if name in stack:
            raise SchemaError(f"recursive type {' -> '.join((*stack, name))}")
        if name not in defs:
            raise SchemaError(f"unknown type {name}")
        target = defs[name]
        if name == OBJECT_META:
            props = {k: target["properties"][k] for k in ("labels", "annotations")}
            target = {**target, "properties": props}
        return _inline(target, defs, (*stack, name))
    if "oneOf" in schema or "anyOf" in schema:
        raise SchemaError(f"a union in {' -> '.join(stack)} has no structural form")
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP or (key.startswith("x-") and key not in _KEEP_EXTENSIONS):
            continue
        if key == "properties":
            out[key] = {prop: _inline(sub, defs, stack) for prop, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _inline(value, defs, stack)
        else:
            out[key] = copy.deepcopy(value)
    for key in schema.get("x-kubernetes-list-map-keys") or []:  # list-map keys need defaults
        item = schema.get("items") or {}
        default = ((item.get("properties") or {}).get(key) or {}).get("default")
        if default is not None and key not in (item.get("required") or []):
            out["items"]["properties"][key]["default"] = default
    return out


def extract(openapi: Mapping[str, Any], kubernetes_version: str) -> dict[str, Any]:
    """The definitions of TYPES (and VolumeSource), inlined and structural."""
    defs = openapi["components"]["schemas"]
    definitions = {name: _inline({"$ref": full}, defs, ()) for name, full in sorted(TYPES.items())}
    source = copy.deepcopy(definitions["Volume"])
    del source["properties"]["name"]
    source.pop("required", None)
    definitions["VolumeSource"] = source
    return {
        "kubernetesVersion": kubernetes_version,
        "source": "GET /openapi/v3/api/v1 (lmcache_operator.k8s_openapi.extract)",
        "definitions": dict(sorted(definitions.items())),
    }
