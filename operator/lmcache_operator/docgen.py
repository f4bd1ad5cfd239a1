"""The CRD reference (``docs/reference/crds.md``), rendered from the generated CRDs.

The page is built from :func:`lmcache_operator.crdgen.build_crd`, the same objects written
to ``crds/``, so it cannot say anything the API server does not enforce. Regenerate it with
``make docs`` (scripts/docgen.py); ``make docs-check`` fails when the committed page
differs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jinja2

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


def kind_context(crd: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of one CRD (``templates/crds.md.j2`` lays it out)."""
    spec = crd["spec"]
    names = spec["names"]
    version = spec["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    parts = ("spec", "status")
    return {
        "name": names["kind"],
        "description": str(root.get("description", "")),
        "group": spec["group"],
        "version": version["name"],
        "crd": crd["metadata"]["name"],
        "plural": names["plural"],
        "singular": names["singular"],
        "short_names": names.get("shortNames", []),
        "categories": names.get("categories", []),
        "scope": spec["scope"],
        "subresources": ", ".join(sorted(version.get("subresources", {}))) or "none",
        "columns": version.get("additionalPrinterColumns", []),
        "parts": [
            {
                "name": part,
                "required": part in root.get("required", []),
                "rows": field_rows(root["properties"][part], part),
            }
            for part in parts
        ],
        "rules": [row for part in parts for row in rule_rows(root["properties"][part], part)],
    }


@functools.cache
def _templates() -> jinja2.Environment:
    """The page templates beside this module (``templates/*.md.j2``)."""
    env = jinja2.Environment(  # noqa: S701 - Markdown, not HTML: nothing to escape
        loader=jinja2.PackageLoader("lmcache_operator", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["cell"] = cell
    env.filters["code"] = code
    return env


def render() -> str:
    """The whole ``crds.md`` page."""
    crds = [build_crd(kind, k8s_types=False) for kind in ALL_KINDS]
    return (
        _templates()
        .get_template(FILE_NAME + ".j2")
        .render(kinds=[kind_context(crd) for crd in crds], kubernetes_version=kubernetes_version())
    )


def files() -> dict[str, str]:
    """File name -> text of every generated reference page of the operator."""
    return {FILE_NAME: render()}
