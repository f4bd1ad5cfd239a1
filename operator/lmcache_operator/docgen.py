"""The CRD reference (``docs/reference/crds.md``), rendered from the generated CRDs.

The page is built from :func:`lmcache_operator.crdgen.build_crd`, the same objects written
to ``crds/``, so it cannot say anything the API server does not enforce. Regenerate it with
``make docs`` (scripts/docgen.py); ``make docs-check`` fails when the committed page
differs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lmcache_operator.api import ALL_KINDS
from lmcache_operator.api.k8s_types import K8S_TYPE_KEY, kubernetes_version
from lmcache_operator.crdgen import build_crd

FILE_NAME = "crds.md"


@dataclass(frozen=True)
class FieldRow:
    path: str
    type: str
    default: str
    constraints: str
    description: str


@dataclass(frozen=True)
class RuleRow:
    path: str
    message: str
    rule: str


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, one line."""
    return " ".join(text.replace("|", "\\|").split())


def code(value: str) -> str:
    """An inline code span (backticks inside the value widen the fence)."""
    fence = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def _json(value: Any) -> str:
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def type_name(schema: dict[str, Any]) -> str:
    """A short, Go-like name of a schema's type: ``[]string``, ``map[string]integer``."""
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    if K8S_TYPE_KEY in schema:
        return f"core/v1 {schema[K8S_TYPE_KEY]}"
    kind = str(schema.get("type", "object"))
    if kind == "array":
        return "[]" + type_name(schema.get("items", {}))
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return "map[string]" + type_name(extra)
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return "object (free-form)"
    return kind


def constraints(schema: dict[str, Any], required: bool) -> str:
    parts: list[str] = ["required"] if required else []
    if "enum" in schema:
        parts.append("one of " + ", ".join(code(_json(v)) for v in schema["enum"]))
    if "minimum" in schema:
        op = ">" if schema.get("exclusiveMinimum") is True else ">="
        parts.append(f"{op} {_json(schema['minimum'])}")
    if "maximum" in schema:
        op = "<" if schema.get("exclusiveMaximum") is True else "<="
        parts.append(f"{op} {_json(schema['maximum'])}")
    for key, label in (
        ("minLength", "minLength"),
        ("maxLength", "maxLength"),
        ("minItems", "minItems"),
        ("maxItems", "maxItems"),
        ("minProperties", "minProperties"),
        ("maxProperties", "maxProperties"),
        ("format", "format"),
    ):
        if key in schema:
            parts.append(f"{label} {_json(schema[key])}")
    if "pattern" in schema:
        parts.append("pattern " + code(str(schema["pattern"])))
    messages = [str(rule.get("message", "")) for rule in schema.get("x-kubernetes-validations", [])]
    parts.extend(f"rule: {message}" for message in messages if message)
    return "; ".join(parts)


def walk(
    schema: dict[str, Any], path: str, required: bool = False
) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Every field path under ``schema`` (itself first), depth first, in schema order."""
    yield path, schema, required
    needed = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}", name in needed)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and ("properties" in extra or "items" in extra):
        yield from walk(extra, f"{path}.<key>")
    items = schema.get("items")
    if isinstance(items, dict) and ("properties" in items or "items" in items):
        yield from walk(items, f"{path}[]")


def field_rows(schema: dict[str, Any], root: str) -> list[FieldRow]:
    return [
        FieldRow(
            path=path,
            type=type_name(sub),
            default=_json(sub["default"]) if "default" in sub else "",
            constraints=constraints(sub, required),
            description=str(sub.get("description", "")),
        )
        for path, sub, required in walk(schema, root)
    ]


def rule_rows(schema: dict[str, Any], root: str) -> list[RuleRow]:
    return [
        RuleRow(path, str(rule.get("message", "")), str(rule["rule"]))
        for path, sub, _ in walk(schema, root)
        for rule in sub.get("x-kubernetes-validations", [])
    ]


def _fields_table(rows: list[FieldRow]) -> list[str]:
    lines = [
        "| Field | Type | Default | Constraints | Description |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        default = code(row.default) if row.default else ""
        lines.append(
            f"| {cell(code(row.path))} | {cell(row.type)} | {cell(default)} "
            f"| {cell(row.constraints)} | {cell(row.description)} |"
        )
    return lines


def render_kind(crd: dict[str, Any]) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    version = spec["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    kind = names["kind"]
    subresources = ", ".join(sorted(version.get("subresources", {}))) or "none"
    lines = [
        f"## {kind}",
        "",
        cell(str(root.get("description", ""))),
        "",
        "| | |",
        "|---|---|",
        f"| Group | {code(spec['group'])} |",
        f"| Version | {code(version['name'])} |",
        f"| apiVersion | {code(spec['group'] + '/' + version['name'])} |",
        f"| Kind | {code(kind)} |",
        f"| CRD | {code(crd['metadata']['name'])} |",
        f"| Plural / singular | {code(names['plural'])} / {code(names['singular'])} |",
        f"| Short names | {', '.join(code(n) for n in names.get('shortNames', [])) or 'none'} |",
        f"| Categories | {', '.join(code(n) for n in names.get('categories', [])) or 'none'} |",
        f"| Scope | {spec['scope']} |",
        f"| Subresources | {subresources} |",
        "",
        "### Printer columns (`kubectl get`)",
        "",
        "| Name | Type | JSON path | Description |",
        "|---|---|---|---|",
    ]
    for column in version.get("additionalPrinterColumns", []):
        lines.append(
            f"| {cell(column['name'])} | {cell(column['type'])} | {cell(code(column['jsonPath']))} "
            f"| {cell(column.get('description', ''))} |"
        )
    for part in ("spec", "status"):
        schema = root["properties"][part]
        required = part in root.get("required", [])
        title = f"### `{part}`"
        lines += ["", title, ""]
        if required:
            lines += [f"`{part}` is required.", ""]
        lines += _fields_table(field_rows(schema, part))
    rules = [
        row for part in ("spec", "status") for row in rule_rows(root["properties"][part], part)
    ]
    lines += ["", "### Validation rules (CEL, checked by the API server)", ""]
    if rules:
        lines += ["| Field | Message | Rule |", "|---|---|---|"]
        lines += [
            f"| {cell(code(r.path))} | {cell(r.message)} | {cell(code(r.rule))} |" for r in rules
        ]
    else:
        lines.append("None.")
    return lines


def render() -> str:
    """The whole ``crds.md`` page."""
    crds = [build_crd(kind, k8s_types=False) for kind in ALL_KINDS]
    lines = [
        "<!-- Generated by `make docs` (scripts/docgen.py) from the CRD schemas; do not edit. -->",
        "",
        "# CRD reference",
        "",
        "The custom resources of lmcache-k8s, generated from the same schemas as `crds/` "
        "(the operator's pydantic API models). Field paths use the wire (camelCase) names; "
        "`[]` steps into array items and `<key>` into map values. Defaults are applied by the "
        "API server; constraints and rules are enforced by it on create and update. "
        f"A `core/v1 ...` type is the Kubernetes {kubernetes_version()} schema of that type "
        "(see the Kubernetes API reference): the API server rejects unknown fields in it; a "
        "`hostPath.path` in it is at most 1024 characters without `..`, `//` or a trailing `/`.",
        "",
    ]
    kinds = [str(crd["spec"]["names"]["kind"]) for crd in crds]
    lines += [f"- [{kind}](#{kind.lower()})" for kind in kinds]
    for crd in crds:
        lines += ["", *render_kind(crd)]
    return "\n".join(lines) + "\n"


def files() -> dict[str, str]:
    """File name -> text of every generated reference page of the operator."""
    return {FILE_NAME: render()}
