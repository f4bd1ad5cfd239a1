"""docs/reference/crds.md is generated from the CRD schemas and kept current."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from lmcache_operator import docgen

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "reference" / docgen.FILE_NAME
FIX = "make docs"


def _committed() -> str:
    assert PAGE.is_file(), f"{PAGE.relative_to(REPO)} is missing; run `{FIX}`"
    return PAGE.read_text(encoding="utf-8")


@functools.cache
def _crds() -> tuple[dict[str, Any], ...]:
    """Every committed CRD in crds/, parsed once (libyaml's loader when present: they are big)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(
        yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        for path in sorted((REPO / "crds").glob("*.yaml"))
    )


def _crd_schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, openAPIV3Schema) of every committed CRD in crds/."""
    for crd in _crds():
        version = crd["spec"]["versions"][0]
        yield crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def _paths(
    schema: dict[str, Any], path: str, page: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Field paths of a schema; with ``page``, not below a field the page types core/v1
    (those follow the Kubernetes schema and are documented by the Kubernetes reference)."""
    yield path, schema
    if page is not None and _row(page, path)[1].lstrip("[]").startswith("core/v1 "):
        return
    for name, sub in schema.get("properties", {}).items():
        yield from _paths(sub, f"{path}.{name}", page)
    items = schema.get("items", {})
    if "properties" in items:
        yield from _paths(items, f"{path}[]", page)


def _row(page: str, path: str) -> list[str]:
    """The cells of the field row of ``path`` (split on unescaped pipes)."""
    for line in page.splitlines():
        if line.startswith(f"| `{path}` |"):
            return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    raise AssertionError(f"no row for {path} in {PAGE.name}")


def test_committed_page_is_current() -> None:
    assert _committed() == docgen.render(), f"{PAGE.relative_to(REPO)} is stale: run `{FIX}`"


def test_rendering_is_deterministic() -> None:
    assert docgen.render() == docgen.render()


def test_cpu_size_row_has_its_default_and_constraints() -> None:
    cells = _row(_committed(), "spec.cache.cpuSize")
    assert cells[1:3] == ["string", "`4Gi`"]
    assert "maxLength 64" in cells[3]
    assert "must be a quantity greater than zero" in cells[3]


def test_every_crd_field_has_a_row_with_its_type_and_default() -> None:
    page = _committed()
    checked = 0
    for kind, root in _crd_schemas():
        assert f"## {kind}" in page
        for part in ("spec", "status"):
            for path, schema in _paths(root["properties"][part], part, page):
                cells = _row(page, path)
                if "default" in schema and not isinstance(schema["default"], (dict, list)):
                    assert str(schema["default"]).lower() in cells[2].lower(), (path, cells)
                if schema.get("x-kubernetes-int-or-string"):
                    assert cells[1] == "int-or-string", (path, cells)
                elif "core/v1 " in cells[1]:
                    assert schema["type"] == ("array" if cells[1].startswith("[]") else "object")
                else:
                    prefix = {"array": "[]", "object": ("object", "map[")}.get(
                        schema["type"], schema["type"]
                    )
                    assert cells[1].startswith(prefix), (path, cells)
                checked += 1
    assert checked > 100  # both kinds, spec and status


def test_every_cel_message_appears() -> None:
    page = _committed()
    messages = set()
    for _, root in _crd_schemas():
        for part in ("spec", "status"):
            for _, schema in _paths(root["properties"][part], part):
                messages.update(r["message"] for r in schema.get("x-kubernetes-validations", []))
    assert "server.port and server.httpPort must differ" in messages
    for message in messages:
        assert message.replace("|", "\\|") in page, message


def test_table_cells_escape_pipes() -> None:
    page = _committed()
    assert "quantity(self).isGreaterThan" in page  # a rule with `||` is rendered
    for table in re.split(r"\n\n", page):
        lines = [line for line in table.splitlines() if line.startswith("|")]
        if not lines:
            continue
        width = len(re.findall(r"(?<!\\)\|", lines[0]))
        for line in lines:
            assert len(re.findall(r"(?<!\\)\|", line)) == width, line


def test_cell_escapes_pipes_and_newlines() -> None:
    assert docgen.cell("a|b\nc") == "a\\|b c"
