"""CustomResourceDefinitions generated from the pydantic models (one file per kind).

Pydantic's JSON schema is turned into a Kubernetes structural schema: references inlined,
``Optional`` unwrapped, ``int | str`` made ``x-kubernetes-int-or-string``, free-form objects
marked ``x-kubernetes-preserve-unknown-fields``, titles dropped; descriptions kept, so
``kubectl explain`` shows them. Pod pass-through fields (marked by ``api.k8s_types``) get the
real core/v1 schemas of the pinned Kubernetes (``api/k8s_core_v1.json``), so a misspelt field
is rejected by the API server.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lmcache_operator.api import ALL_KINDS
from lmcache_operator.api.common import KindDefinition
from lmcache_operator.api.k8s_types import K8S_TYPE_KEY, k8s_schema

_DROP_KEYS = {"title", "$defs", "examples"}


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    target = copy.deepcopy(defs[ref.rsplit("/", 1)[-1]])
    merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return _resolve(merged, defs)


def _k8s_typed(schema: dict[str, Any], typed: bool) -> dict[str, Any]:
    """A field marked with a core/v1 type: that schema (or, for the docs, a placeholder)."""
    name = schema[K8S_TYPE_KEY]
    body = k8s_schema(name) if typed else {"type": "object", K8S_TYPE_KEY: name}
    keep: dict[str, Any] = {k: schema[k] for k in ("description", "maxItems") if k in schema}
    if schema.get("type") == "array":
        return {"type": "array", **keep, "items": body}
    return {**body, **keep}


def _structural(schema: dict[str, Any], defs: dict[str, Any], typed: bool) -> dict[str, Any]:
    schema = _resolve(schema, defs)
    variants = schema.get("anyOf")
    if variants is not None:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        non_null = [_resolve(v, defs) for v in variants if v.get("type") != "null"]
        types = sorted(str(v.get("type")) for v in non_null)
        if types == ["integer", "string"]:
            out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
            for key in ("description", "default"):
                if rest.get(key) is not None:
                    out[key] = rest[key]
            return out
        if len(non_null) != 1:
            raise ValueError(f"cannot express a union of {types} in a structural schema")
        merged = {**non_null[0], **rest}
        if merged.get("default", 0) is None:
            del merged["default"]
        return _structural(merged, defs, typed)
    if K8S_TYPE_KEY in schema:
        return _k8s_typed(schema, typed)

    out = {}
    for key, value in schema.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs, typed) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs, typed)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = _structural(value, defs, typed)
            elif value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            # additionalProperties: false is the structural default (unknown fields pruned)
        elif key == "default" and value is None:
            continue
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):  # JSON Schema -> OpenAPI 3.0
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
        out["type"] = "object"
    if "properties" in out:
        out["type"] = "object"
    if out.get("type") == "array" and "items" in out and out["items"].get("type") is None:
        out["items"]["type"] = "object"
    return out


def model_schema(model: type[BaseModel], *, k8s_types: bool = True) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model (aliases as field names).

    ``k8s_types=False`` leaves core/v1-typed fields as placeholders naming the type (for the
    CRD reference page, which links to the Kubernetes API reference instead of repeating it).
    """
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}), k8s_types)


def build_crd(kind: KindDefinition, *, k8s_types: bool = True) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CRD of one kind (see model_schema for ``k8s_types``)."""
    spec_schema = model_schema(kind.spec_model, k8s_types=k8s_types)
    if not spec_schema.get("required"):  # a default must itself be valid
        spec_schema["default"] = {}
    if kind.spec_rules:
        spec_schema["x-kubernetes-validations"] = [dict(rule) for rule in kind.spec_rules]
    status_schema = model_schema(kind.status_model, k8s_types=k8s_types)
    root = {
        "type": "object",
        "description": kind.description,
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    if spec_schema.get("required"):
        root["required"] = ["spec"]
    columns = [
        {
            "name": column.name,
            "type": column.type,
            "jsonPath": column.json_path,
            **({"description": column.description} if column.description else {}),
        }
        for column in kind.printer_columns
    ]
    subresources: dict[str, Any] = {"status": {}}
    if kind.scale is not None:
        spec_path, status_path, selector_path = kind.scale
        subresources["scale"] = {
            "specReplicasPath": spec_path,
            "statusReplicasPath": status_path,
            "labelSelectorPath": selector_path,
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {"app.kubernetes.io/part-of": "lmcache-k8s"},
        },
        "spec": {
            "group": kind.group,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": list(kind.categories),
            },
            "versions": [
                {
                    "name": kind.version,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


HEADER = "# Generated by `lmcache-operator crds` from the pydantic models; do not edit.\n"


def render_crd(kind: KindDefinition) -> str:
    return HEADER + yaml.safe_dump(build_crd(kind), sort_keys=False, width=100)


def crd_files() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    return {f"{kind.group}_{kind.plural}.yaml": render_crd(kind) for kind in ALL_KINDS}


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in crd_files().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_crds(directory: Path) -> list[str]:
    """Names of CRD files in ``directory`` that are missing or differ from the models."""
    return [
        name
        for name, text in crd_files().items()
        if not (directory / name).is_file()
        or (directory / name).read_text(encoding="utf-8") != text
    ]
