"""Human messages for pydantic validation errors: each names the field as the user wrote it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

SpecT = TypeVar("SpecT", bound=BaseModel)


def describe_validation_error(exc: ValidationError, *, prefix: str = "") -> list[str]:
    problems = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"])
        where = ".".join(p for p in (prefix, path) if p)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field; check the spelling (kubectl explain lmcc.spec)"
        elif "input" in error and error["type"] != "missing":
            message = f"{message} (got {error['input']!r})"
        problems.append(f"{where or '(spec)'}: {message}")
    return problems


def validated_spec(
    model: type[SpecT], spec: Mapping[str, Any], problems: Callable[[SpecT], list[str]]
) -> tuple[SpecT | None, list[str]]:
    """``spec`` as ``model``, or the problems that make it invalid: the schema's (each named
    ``spec.<field>``), else what ``problems`` finds in the model."""
    try:
        parsed = model.model_validate(dict(spec))
    except ValidationError as exc:
        return None, describe_validation_error(exc, prefix="spec")
    found = problems(parsed)
    return (None if found else parsed), found


class RenderError(ValueError):
    """A document that cannot be rendered; the message names the document and field."""


def validated_document(
    index: int,
    doc: dict[str, Any],
    kind: str,
    model: type[SpecT],
    problems: Callable[[str, SpecT], list[str]],
) -> tuple[str, str, SpecT]:
    """(name, namespace, spec) of one resource document of ``lmcache-operator render``.

    ``problems(name, spec)`` adds what the schema alone does not catch.
    """
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise RenderError(f"document {index}: metadata.name is required")
    label = f"{kind} {name!r}"
    try:
        spec = model.model_validate(doc.get("spec") or {})
    except ValidationError as exc:
        found = describe_validation_error(exc, prefix="spec")
        raise RenderError(f"{label}:\n  " + "\n  ".join(found)) from None
    found = problems(name, spec)
    if found:
        raise RenderError(f"{label}:\n  " + "\n  ".join(found))
    return str(name), str(meta.get("namespace", "default")), spec
